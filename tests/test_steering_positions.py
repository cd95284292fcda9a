"""Position-selective steering (issue 14): every head knob and steering vector takes positions=
(indices, negative from the end of the sequence so far, a bool mask [t], or per row [b, t]), equal
to a hook that acts at those positions only on the bare model — in forwards and in generate, where
−1 is each step's new token — and changing positions compiles nothing; resid_post is a vector site."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import attnfx
import models
from _tol import assert_close
from attnfx.errors import ShapeMismatchError, SiteIndexError, SteeringValueError

BLOCKS = {"gpt2": lambda m: m.transformer.h, "llama": lambda m: m.model.layers}
FINAL_NORM = {"gpt2": lambda m: m.transformer.ln_f, "llama": lambda m: m.model.norm}
O_PROJ = {"gpt2": lambda m, l: m.transformer.h[l].attn.c_proj, "llama": lambda m, l: m.model.layers[l].self_attn.o_proj}


def _pre_hook(module, edit):
    """A forward pre-hook applying edit(x) to the module's first input (positional or hidden_states)."""
    def pre(mod, args, kwargs):
        if args:
            return (edit(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}
    return module.register_forward_pre_hook(pre, with_kwargs=True)


def _at(positions, change):
    """edit(x): x with change(x[:, p]) at positions p of each call (a [b, t] mask: per row)."""
    def edit(x):
        x = x.clone()
        if isinstance(positions, torch.Tensor) and positions.dim() == 2:
            x[positions] = change(x[positions])
        else:
            x[:, positions] = change(x[:, positions])
        return x
    return edit


def _run(model, ids, mask, generate: bool):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        tokens = (model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                 pad_token_id=0) if generate else None)
    return logits, tokens


def _batch(left_pad: bool = True):
    ids = torch.randint(1, models.VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    if left_pad:
        mask[1, :2] = 0
    return ids, mask


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def built(request):
    name = request.param
    model = models.build(models.FAMILIES[name], layers=2, heads=4, kv_heads=2, impl="sdpa")
    return name, model, attnfx.instrument(model, backend="eager")


@pytest.mark.parametrize("positions", [[-1], [1, 4], "mask"])
def test_a_vector_at_positions_equals_a_hook_adding_it_there(built, positions):
    name, model, im = built
    ids, mask = _batch()
    vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    where = torch.tensor([False, True, False, True, True, False, False]) if positions == "mask" else positions
    handle = _pre_hook(BLOCKS[name](model)[1], _at(where, lambda x: x + 0.5 * vector))
    want, want_tokens = _run(model, ids, mask, generate=positions == [-1])
    handle.remove()
    with im.steering.added(1, vector, scale=0.5, positions=where):
        got, tokens = _run(im, ids, mask, generate=positions == [-1])
    assert_close(got, want)
    if tokens is not None:                                 # −1: each generate step's new token
        assert torch.equal(tokens, want_tokens)


def test_per_row_positions_act_on_each_rows_own_tokens(built):
    """A [b, t] mask: the last real token of right-padded rows (a different column per row)."""
    name, model, im = built
    ids, mask = _batch(left_pad=False)
    mask[1, 5:] = 0
    last = torch.zeros(2, 7, dtype=torch.bool)
    last[0, 6], last[1, 4] = True, True
    vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    handle = _pre_hook(BLOCKS[name](model)[0], _at(last, lambda x: x - vector))
    want, _ = _run(model, ids, mask, generate=False)
    handle.remove()
    with im.steering.added(0, vector, scale=-1.0, positions=last):
        assert_close(im(input_ids=ids, attention_mask=mask).logits, want)
        with pytest.raises(ShapeMismatchError, match="per-row positions are for batch 2"):
            im(input_ids=ids[:1], attention_mask=mask[:1])


@pytest.mark.parametrize("layer", [0, 1])
def test_resid_post_is_the_next_blocks_input_or_the_final_norms(built, layer):
    name, model, im = built
    ids, mask = _batch()
    vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    module = BLOCKS[name](model)[1] if layer == 0 else FINAL_NORM[name](model)
    handle = _pre_hook(module, _at(slice(None), lambda x: x + 2.0 * vector))
    want, want_tokens = _run(model, ids, mask, generate=True)
    handle.remove()
    with im.steering.added(layer, vector, at="resid_post", scale=2.0):
        got, tokens = _run(im, ids, mask, generate=True)
        with im.record("resid_post") as rec:
            im(input_ids=ids, attention_mask=mask)
    assert_close(got, want)
    assert torch.equal(tokens, want_tokens)
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    if layer == 0:                                         # the record is the steered stream
        assert_close(rec["resid_post", 0], hidden[1] + 2.0 * vector)


@pytest.mark.parametrize("knob", ["z", "query", "ablate", "value"])
def test_head_knobs_at_positions_equal_hooks(built, knob):
    """z, ablation and the query scale (before RoPE, which is linear) at the last query position —
    every generate step's new token — equal hooks on the output / query projection there; value
    scaling at key position 2 equals a hook on v's projection at that token (read by every step)."""
    name, model, im = built
    ids, mask = _batch()
    d = model.config.hidden_size
    width = d // 4
    head = 1
    cols = slice(head * width, (head + 1) * width)

    def scale_cols(factor):
        def change(x):
            x = x.clone()
            x[..., cols] = x[..., cols] * factor
            return x
        return change

    if knob in ("z", "ablate"):
        factor = 3.0 if knob == "z" else 0.0
        handle = O_PROJ[name](model, 0).register_forward_pre_hook(
            lambda mod, args: (_at([-1], scale_cols(factor))(args[0]),))
    elif knob == "query":
        # q scaled at the last position = the query projection's output scaled there (GPT-2's
        # fused c_attn: q is its first d columns)
        q_proj = model.transformer.h[0].attn.c_attn if name == "gpt2" else model.model.layers[0].self_attn.q_proj
        handle = q_proj.register_forward_hook(lambda mod, args, out: _at([-1], scale_cols(0.25))(out))
    else:                                                  # kv head `head` at key position 2
        if name == "gpt2":
            handle = model.transformer.h[0].attn.c_attn.register_forward_hook(
                lambda mod, args, out: _at([2], _shifted(scale_cols(0.0), 2 * d))(out) if out.shape[1] > 2 else out)
        else:
            handle = model.model.layers[0].self_attn.v_proj.register_forward_hook(
                lambda mod, args, out: _at([2], scale_cols(0.0))(out) if out.shape[1] > 2 else out)
    want, want_tokens = _run(model, ids, mask, generate=True)
    handle.remove()
    with im.steering.restoring():
        if knob == "z":
            im.steering.scale(0, head, 3.0, positions=-1)
        elif knob == "ablate":
            im.steering.ablate(0, head, positions=[-1])
        elif knob == "query":
            im.steering.scale(0, head, 0.25, on="query", positions=[-1])
        else:
            im.steering.scale(0, head, 0.0, on="value", positions=[2])
        got, tokens = _run(im, ids, mask, generate=True)
    assert_close(got, want)
    assert torch.equal(tokens, want_tokens)


def _shifted(change, offset):
    """change applied to the columns offset… of a fused projection's output (GPT-2's v block)."""
    def shifted(x):
        x = x.clone()
        x[..., offset:] = change(x[..., offset:])
        return x
    return shifted


def test_changing_positions_compiles_nothing_and_reset_restores(built):
    name, model, im = built
    ids, mask = _batch()
    vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = im(input_ids=ids, attention_mask=mask).logits
        im.steering.add(0, vector, positions=[1])
        im.steering.scale(1, 0, 2.0, positions=[-1])
        im(input_ids=ids, attention_mask=mask)
        before = counters["attnfx"]["graphs_compiled"]
        for where in ([2, 3], torch.tensor([0, 5]), [-2], torch.arange(7) % 2 == 0):
            im.steering.reset()
            im.steering.add(1, vector, positions=where)
            im.steering.scale(0, 1, 0.5, on="value", positions=where)
            im.steering.ablate(1, 3, positions=where)
            im(input_ids=ids, attention_mask=mask)
        assert counters["attnfx"]["graphs_compiled"] == before
        im.steering.reset()
        assert torch.equal(im(input_ids=ids, attention_mask=mask).logits, plain)
        with im.steering.scaled(0, 1, 5.0, positions=[3]):
            assert not torch.equal(im(input_ids=ids, attention_mask=mask).logits, plain)
        assert not im.steering.positions.in_use
        assert torch.equal(im(input_ids=ids, attention_mask=mask).logits, plain)


def test_bad_positions_raise_and_change_nothing(built):
    name, model, im = built
    d = model.config.hidden_size
    for bad, error in ((1.5, SteeringValueError), ([], SteeringValueError), (torch.zeros(3), SteeringValueError),
                       (torch.zeros(2, 2, 2, dtype=torch.bool), ShapeMismatchError), ([True], SteeringValueError),
                       (torch.zeros(4, dtype=torch.bool), SteeringValueError)):
        with pytest.raises(error):
            im.steering.add(0, torch.ones(d), positions=bad)
        with pytest.raises(error):
            im.steering.scale(0, 0, 2.0, positions=bad)
    assert im.steering.active() == [] and im.steering.vector_kinds == () and not im.steering.positions.in_use


def test_resid_post_of_an_encoders_last_layer_is_refused():
    model = models.build(models.FAMILIES["bert"], layers=2)
    im = attnfx.instrument(model, backend="eager")
    ids = torch.randint(1, models.VOCAB, (1, 5))
    im(input_ids=ids)
    with pytest.raises(SiteIndexError, match="no stream leaves layer 1"):
        im.steering.add(1, torch.ones(model.config.hidden_size), at="resid_post")
    assert im.steering.vector_kinds == ()


# ---- per-row steering (rows=): many interventions as tiles of one batch ---------------------------
def test_tiles_of_one_batch_equal_one_intervention_per_run(built):
    """rows= gives each tile of a tiled batch its own heads' knobs: tile r ablates / scales its own
    head, equal to running each intervention alone; a new set of tiles compiles nothing."""
    name, model, im = built
    ids, mask = _batch()
    knobs = [("ablate", 0, 1), ("z", 1, 2), ("value", 1, 0), ("query", 0, 3)]

    def apply(kind, layer, head, rows=None):
        if kind == "ablate":
            im.steering.ablate(layer, head, rows=rows)
        elif kind == "z":
            im.steering.scale(layer, head, 3.0, rows=rows)
        elif kind == "value":
            im.steering.scale(layer, head, 0.5, on="value", rows=rows)
        else:
            im.steering.scale(layer, head, 0.25, on="query", rows=rows)

    with torch.no_grad():
        alone = []
        for knob in knobs:
            with im.steering.restoring():
                apply(*knob)
                alone.append(im(input_ids=ids, attention_mask=mask).logits)
        tiled = {"input_ids": ids.repeat(len(knobs), 1), "attention_mask": mask.repeat(len(knobs), 1)}
        with im.steering.restoring():
            for r, knob in enumerate(knobs):
                apply(*knob, rows=range(2 * r, 2 * r + 2))
            out = im(**tiled).logits
            before = counters["attnfx"]["graphs_compiled"]
            im.steering.reset()
            for r, knob in enumerate(reversed(knobs)):              # other tiles: nothing compiles
                apply(*knob, rows=range(2 * r, 2 * r + 2))
            again = im(**tiled).logits
            assert counters["attnfx"]["graphs_compiled"] == before
    for r in range(len(knobs)):
        assert_close(out[2 * r:2 * r + 2], alone[r])
        assert_close(again[2 * r:2 * r + 2], alone[len(knobs) - 1 - r])


def test_a_masked_row_beside_its_base_row_in_generate(built):
    """A contrastive decoder's two streams as two rows of one batch (DeCoRe): row 1 with heads
    ablated, row 0 not — each equal to its own generate."""
    name, model, im = built
    ids = torch.randint(1, models.VOCAB, (1, 6), generator=torch.Generator().manual_seed(5)).repeat(2, 1)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        base = im.generate(input_ids=ids[:1], **kw)
        with im.steering.ablated(0, [0, 2]), im.steering.ablated(1, 1):
            masked = im.generate(input_ids=ids[:1], **kw)
        with im.steering.ablated(0, [0, 2], rows=[1]), im.steering.ablated(1, 1, rows=[1]):
            both = im.generate(input_ids=ids, **kw)
            with pytest.raises(ShapeMismatchError, match="rows= names row 1, this call has batch 1"):
                im(input_ids=ids[:1])
    assert not torch.equal(base.scores[0], masked.scores[0])
    assert torch.equal(both.sequences[0], base.sequences[0]) and torch.equal(both.sequences[1], masked.sequences[0])
    for step, (two, one, other) in enumerate(zip(both.scores, base.scores, masked.scores)):
        assert_close(two[0], one[0])
        assert_close(two[1], other[0])


def test_rows_and_positions_together_and_a_vector_on_some_rows(built):
    name, model, im = built
    ids, mask = _batch()
    vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(6))
    handle = _pre_hook(BLOCKS[name](model)[1], _at(torch.tensor([[False] * 7, [False] * 6 + [True]]),
                                                    lambda x: x + vector))
    want, _ = _run(model, ids, mask, generate=False)
    handle.remove()
    with im.steering.added(1, vector, positions=[-1], rows=[1]):
        assert_close(im(input_ids=ids, attention_mask=mask).logits, want)
    for bad in ([-1], [1.0], torch.zeros(2, 2, dtype=torch.bool), []):
        with pytest.raises((SteeringValueError, ShapeMismatchError)):
            im.steering.scale(0, 0, 2.0, rows=bad)
    assert not im.steering.positions.in_use
