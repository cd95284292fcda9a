"""Steering vectors (activation addition, issue 14): im.steering.add(layer, v, at=...) equals a
forward hook that adds v at the same place on the bare model — in a forward and in generate — and
changing the vectors compiles nothing after the first."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import attnfx
import models
from _tol import assert_close
from attnfx.errors import InvalidArgumentError, ShapeMismatchError, SteeringValueError

# family → (model, layer) → (the block: its input is resid_pre; the attention's output projection; the MLP's)
PLACES = {
    "gpt2": lambda m, l: (m.transformer.h[l], m.transformer.h[l].attn.c_proj, m.transformer.h[l].mlp.c_proj),
    "llama": lambda m, l: (m.model.layers[l], m.model.layers[l].self_attn.o_proj, m.model.layers[l].mlp.down_proj),
}


def _hooked(model, name, layer, at, vector):
    block, attn, mlp = PLACES[name](model, layer)
    if at == "resid_pre":
        def pre(module, args, kwargs):
            if args:
                return (args[0] + vector, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + vector}
        return block.register_forward_pre_hook(pre, with_kwargs=True)
    module = attn if at == "attn_out" else mlp
    return module.register_forward_hook(lambda mod, args, out: out + vector)


@pytest.mark.parametrize("at", ["resid_pre", "attn_out", "mlp_out"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_steering_vector_equals_a_hook_that_adds_it(name, at):
    family = models.FAMILIES[name]
    model = models.build(family, layers=2, heads=4, kv_heads=2, impl="sdpa")
    ids = torch.randint(1, models.VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    handle = _hooked(model, name, 1, at, 0.5 * vector)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        want_tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                     pad_token_id=0)
    handle.remove()
    im = attnfx.instrument(model, backend="eager")
    with torch.no_grad():
        plain = im(input_ids=ids, attention_mask=mask).logits
        im.steering.add(1, vector, at=at, scale=0.5)
        assert_close(im(input_ids=ids, attention_mask=mask).logits, want)
        assert torch.equal(im.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                       pad_token_id=0), want_tokens)
        before = counters["attnfx"]["graphs_compiled"]
        im.steering.add(1, vector, at=at, scale=-1.0)                  # now −0.5 · v: no recompile
        im.steering.add(0, vector, at=at, scale=0.0)
        handle = _hooked(model, name, 1, at, -0.5 * vector)
        want = model(input_ids=ids, attention_mask=mask).logits
        handle.remove()
        assert_close(im(input_ids=ids, attention_mask=mask).logits, want)
        assert counters["attnfx"]["graphs_compiled"] == before
        im.steering.reset()
        assert torch.equal(im(input_ids=ids, attention_mask=mask).logits, plain)


def test_bad_steering_vectors_raise_and_change_nothing():
    model = models.build(models.FAMILIES["gpt2"], layers=2)
    im = attnfx.instrument(model, backend="eager")
    d = model.config.hidden_size
    with pytest.raises(InvalidArgumentError, match="at must be one of"):
        im.steering.add(0, torch.zeros(d), at="resid")
    with pytest.raises(ShapeMismatchError, match=f"vector must be \\[{d}\\]"):
        im.steering.add(0, torch.zeros(d + 1))
    with pytest.raises(SteeringValueError, match="NaN or inf"):
        im.steering.add(0, torch.full((d,), float("nan")))
    assert im.steering.vector_kinds == ()


def test_added_is_undone_on_exit_also_when_the_body_raises():
    model = models.build(models.FAMILIES["gpt2"], layers=2)
    im = attnfx.instrument(model, backend="eager")
    ids = torch.randint(1, models.VOCAB, (1, 5), generator=torch.Generator().manual_seed(0))
    vector = torch.ones(model.config.hidden_size)
    with torch.no_grad():
        plain = im(input_ids=ids).logits
        im.steering.add(0, vector, at="mlp_out")
        once = im(input_ids=ids).logits
        with pytest.raises(RuntimeError, match="body"), im.steering.added(1, vector, at="attn_out"):
            assert not torch.equal(im(input_ids=ids).logits, once)
            raise RuntimeError("body")
        assert im.steering.vector_kinds == ("mlp",)
        assert torch.equal(im(input_ids=ids).logits, once)
        im.steering.reset()
        assert torch.equal(im(input_ids=ids).logits, plain)


# ---- resample ablation ---------------------------------------------------------------------------
def test_resample_ablation_reads_each_head_from_another_example_of_the_reference():
    """Example i's head output becomes the unsteered z of reference example π(i) ≠ i: equal to a
    pre-hook on the output projection writing those columns in; the derangement has no fixed point."""
    from attnfx.state.steering import derangement

    model = models.build(models.FAMILIES["llama"], layers=2, heads=4, kv_heads=2, impl="sdpa")
    gen = lambda: torch.Generator().manual_seed(3)                       # noqa: E731
    ids, reference = torch.randint(1, models.VOCAB, (2, 4, 6), generator=gen())
    order = derangement(4, gen())
    assert not bool((order == torch.arange(4)).any()) and sorted(order.tolist()) == [0, 1, 2, 3]
    o_proj = model.model.layers[1].self_attn.o_proj
    seen = {}
    hook = o_proj.register_forward_pre_hook(lambda mod, args: seen.__setitem__("z", args[0].detach()))
    with torch.no_grad():
        model(input_ids=reference)
    hook.remove()
    columns = [c for h in (0, 2) for c in range(h * 8, (h + 1) * 8)]

    def resampled(mod, args):
        z = args[0].clone()
        z[..., columns] = seen["z"][order][..., columns]
        return (z,)

    hook = o_proj.register_forward_pre_hook(resampled)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    hook.remove()
    im = attnfx.instrument(model, backend="eager")
    im.steering.scale(1, 1, 3.0)                         # the reference z is taken unsteered
    im.steering.ablate(1, [0, 2], how="resample", reference={"input_ids": reference}, generator=gen())
    im.steering.scale(1, 1, 1.0)
    with torch.no_grad():
        assert_close(im(input_ids=ids).logits, want)
    with pytest.raises(SteeringValueError, match="at least 2 examples"):
        im.steering.ablate(0, 0, how="resample", reference={"input_ids": reference[:1]})
