"""Compile-level invariants: no recompiles on steering changes, no added graph breaks, many
models of one class each with their own state, and no silent fallback to plain execution."""
import pytest
import torch
from torch._dynamo.utils import counters

import attnfx
from attnfx.errors import NoAttentionFoundError, UninstrumentedExecutionError
from _tol import assert_close
from models import FAMILIES, PlainTransformer, build, output_tensor


def _graphs():
    return counters["attnfx"]["graphs_compiled"], counters["stats"]["unique_graphs"]


def test_hundred_steering_changes_do_not_recompile():
    model = build(FAMILIES["llama"], layers=2, heads=4, kv_heads=2)
    im = attnfx.instrument(model)
    ids = torch.randint(1, 64, (2, 12))
    reference_ids = torch.randint(1, 64, (2, 12))
    with torch.no_grad():
        im(input_ids=ids)
        im.steering.patch(0, 1, torch.randn(2, 12, 8))     # first per-position source: one compile
        im(input_ids=ids)
        im.steering.ablate(0, 0, how="mean", reference={"input_ids": reference_ids})   # compiles its recording
        im.steering.reset()
        im(input_ids=ids)
        # value_unbiased's first use compiles once: κ = β·W_V + b_V joins the graph (and the
        # mean-ablation recording's), and leaves it again after reset() without a recompile
        im.steering.scale(0, 0, 2.0, on="value_unbiased")
        im.steering.ablate(0, 0, how="mean", reference={"input_ids": reference_ids})
        im(input_ids=ids)
        im.steering.reset()
        im(input_ids=ids)
        before = _graphs()
        outputs = set()
        for step in range(100):
            layer, head = step % 2, step % 4
            kind = step % 6
            if kind == 0:
                im.steering.scale(layer, head, 0.5 + step / 10, on="z")
            elif kind == 1:
                im.steering.scale(layer, head % 2, -1.0 - step / 50, on="value")
            elif kind == 2:
                im.steering.scale(layer, head % 2, 2.0 + step / 10, on="value_unbiased")
            elif kind == 3:
                im.steering.scale(layer, head, 0.1 * step, on="query")
            elif kind == 4:
                im.steering.ablate(layer, head, how="mean", reference={"input_ids": reference_ids})
            else:
                im.steering.reset()
            outputs.add(round(float(im(input_ids=ids).logits.sum()), 4))
        assert _graphs() == before
    assert len(outputs) > 50          # the changes did change the outputs


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_new_lengths_and_batch_sizes_do_not_recompile(family):
    """Batch and sequence are symbolic from the first call: forwards and generate() at other
    sizes reuse its graphs (dynamo alone compiles again at the second length and batch size)."""
    model = build(FAMILIES[family], layers=2, heads=4, kv_heads=2)
    im = attnfx.instrument(model)
    im.steering.scale(1, 0, 2.0, on="value")

    def batch(b, t, seed):
        ids = torch.randint(1, 64, (b, t), generator=torch.Generator().manual_seed(seed))
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        return ids, mask

    with torch.no_grad():
        ids, mask = batch(2, 8, 0)
        im(input_ids=ids, attention_mask=mask)
        im.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
        before = _graphs()
        for b, t in [(2, 13), (3, 8), (5, 21)]:
            ids, mask = batch(b, t, b * t)
            assert_close(im(input_ids=ids, attention_mask=mask).logits[mask.bool()],
                         _value_scaled(model, ids, mask)[mask.bool()])
            im.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert _graphs() == before


def _value_scaled(model, ids, mask):
    """The reference: kv head 0 of layer 1 doubled by a hook on the attention output projection
    (the value scale equals z scaling every query head of the group)."""
    attn = model.transformer.h[1].attn if hasattr(model, "transformer") else model.model.layers[1].self_attn
    out_proj = attn.c_proj if hasattr(attn, "c_proj") else attn.o_proj
    heads, kv = model.config.num_attention_heads, getattr(model.config, "num_key_value_heads", None)
    group = heads // (kv or heads)
    d = model.config.hidden_size // heads

    def pre(mod, args):
        x = args[0].clone()
        x[..., :group * d] *= 2.0
        return (x,)
    handle = out_proj.register_forward_pre_hook(pre)
    try:
        return model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()


def _graph_breaks():
    return sum(counters["graph_break"].values())


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox", "bert", "plain_handwritten"])
def test_instrumenting_adds_no_graph_breaks(family):
    fam = FAMILIES[family]
    model = build(fam, layers=2, heads=2)
    ids = torch.randint(1, 64, (2, 7))
    captured = []

    def counting_backend(gm, example_inputs):
        captured.append(gm)
        return gm.forward

    breaks = _graph_breaks()
    with torch.no_grad():
        torch.compile(model, backend=counting_backend)(input_ids=ids)
    bare_graphs, bare_breaks = len(captured), _graph_breaks() - breaks

    im = attnfx.instrument(model, example_inputs={"input_ids": ids})
    compiled, breaks = counters["attnfx"]["graphs_compiled"], _graph_breaks()
    with torch.no_grad():
        im(input_ids=ids)
    assert counters["attnfx"]["graphs_compiled"] - compiled == bare_graphs == 1
    assert _graph_breaks() - breaks == bare_breaks == 0


def test_twelve_models_of_one_class_share_a_graph_and_keep_their_own_state():
    torch._dynamo.reset()          # graphs are shared by structure: earlier tests may hold this one
    ids = torch.randint(1, 64, (2, 9))
    models = [build(FAMILIES["llama"], layers=2, heads=4, kv_heads=2, seed=seed) for seed in range(12)]
    ims = [attnfx.instrument(m) for m in models]
    for i, im in enumerate(ims):
        im.steering.scale(i % 2, i % 4, 0.25 * i - 1.0, on="z")
        im.steering.scale((i + 1) % 2, i % 2, 1.5 + i, on="value_unbiased")
    compiled = counters["attnfx"]["graphs_compiled"]
    with torch.no_grad():
        results = [im(input_ids=ids).logits for im in ims]
    assert counters["attnfx"]["graphs_compiled"] - compiled == 1       # one graph served all twelve
    for i, (model, im) in enumerate(zip(models, ims)):
        d = 8
        head, layer = i % 4, i % 2
        kv, other = i % 2, (i + 1) % 2
        attn_z = model.model.layers[layer].self_attn.o_proj
        attn_v = model.model.layers[other].self_attn.v_proj

        def pre(mod, args, h=head, f=0.25 * i - 1.0):
            x = args[0].clone()
            x[..., h * d:(h + 1) * d] *= f
            return (x,)

        def post(mod, args, out, g=kv, f=1.5 + i):
            out = out.clone()
            out[..., g * d:(g + 1) * d] *= f           # Llama's v_proj has no bias
            return out

        handles = [attn_z.register_forward_pre_hook(pre), attn_v.register_forward_hook(post)]
        with torch.no_grad():
            expected = model(input_ids=ids).logits
        for h in handles:
            h.remove()
        assert_close(results[i], expected)


def test_recompile_limit_fallback_raises_instead_of_returning_plain_outputs():
    model = build(FAMILIES["gpt2"], layers=1, heads=2)
    im = attnfx.instrument(model)
    ids = torch.randint(1, 64, (2, 6))
    with torch.no_grad():
        im(input_ids=torch.randint(1, 64, (2, 5)), use_cache=False)
        with torch._dynamo.config.patch(recompile_limit=1):
            with pytest.raises(UninstrumentedExecutionError, match="ran without attnfx"):
                im(input_ids=ids, use_cache=True)                # a new constant: dynamo declines
        # dynamo skips that frame for good; attnfx traces a fresh one on the next call
        im.steering.scale(0, 1, 0.0)
        twin = attnfx.instrument(build(FAMILIES["gpt2"], layers=1, heads=2))
        assert not torch.equal(im(input_ids=ids, use_cache=True).logits, twin(input_ids=ids).logits)
        im.steering.reset()
        assert torch.equal(im(input_ids=ids, use_cache=True).logits, model(input_ids=ids).logits)


class _DisabledForward(PlainTransformer):
    @torch.compiler.disable
    def forward(self, input_ids, attention_mask=None):
        return super().forward(input_ids, attention_mask)


def test_a_frame_dynamo_declines_is_never_reported_as_instrumented():
    """A typed error either way: discovery finds no site in the frame it was given (torch ≥ 2.13),
    or the call finds the frame ran without attnfx's graph (torch 2.11 runs it uncompiled)."""
    model = _DisabledForward(layers=1, heads=2, kv_heads=2)
    with pytest.raises((NoAttentionFoundError, UninstrumentedExecutionError), match="sdpa_call|did not compile"):
        attnfx.instrument(model, example_inputs=torch.randint(1, 64, (1, 4)))
    assert "forward" not in model.__dict__


def test_identity_on_aot_eager_backend_and_gradients_flow():
    model = build(FAMILIES["llama"], layers=2, heads=4, kv_heads=2)
    im = attnfx.instrument(model, backend="aot_eager")
    ids = torch.randint(1, 64, (2, 6))
    out = output_tensor(im(input_ids=ids))
    assert_close(out, output_tensor(model(input_ids=ids)))
    out.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_fullgraph_instrumentation_works_on_hf_models():
    model = build(FAMILIES["mistral"], layers=2, heads=4, kv_heads=1)
    im = attnfx.instrument(model, fullgraph=True)
    ids = torch.randint(1, 64, (2, 5))
    im.steering.scale(1, 0, 2.0, on="value")
    with torch.no_grad():
        out = im(input_ids=ids).logits
        im.steering.reset()
        assert_close(im(input_ids=ids).logits, model(input_ids=ids).logits)
    assert not torch.allclose(out, model(input_ids=ids).logits)
