"""The lowering pass: SDPA sites replaced by attnfx::attention inside instrumented graphs, with
steering and records kept, equal to the unlowered model; sites it cannot lower are named."""
import pytest
import torch
from torch._dynamo.utils import counters

import attnfx
from _tol import TOL, assert_close
from attnfx.errors import LoweringWarning
from attnfx.ops.attention import set_attention_backend
from models import FAMILIES, build, output_tensor

# Unpadded inputs: HF's SDPA path then declares is_causal instead of passing a mask.
LOWERABLE = ["llama", "qwen2", "gpt2"]


@pytest.fixture(params=["reference", "triton"])
def impl(request):
    set_attention_backend(request.param)
    yield request.param
    set_attention_backend(None)


def _run(model, ids, lower, steer):
    im = attnfx.instrument(model, lower=lower)
    try:
        if steer:
            im.steering.scale(1, 0, 3.0, on="value_unbiased")
            im.steering.scale(0, 1, 0.0, on="z")
        with torch.no_grad(), im.record("z") as rec:
            out = output_tensor(im(input_ids=ids))
        return out, rec["z"]
    finally:
        im.uninstrument()


def _count_calls(monkeypatch, impl) -> list:
    """Count the calls reaching the chosen implementation inside the op."""
    import attnfx.kernels.attention as kernels
    from attnfx.ops import reference

    module, name = (reference, "attention") if impl == "reference" else (kernels, "attention_fwd")
    calls, original = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)
    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.mark.parametrize("family", LOWERABLE)
def test_lowered_equals_unlowered(family, impl, monkeypatch):
    model = build(FAMILIES[family], layers=2, heads=4, kv_heads=2 if family != "gpt2" else None, head_dim=16,
                  impl="sdpa")
    ids = torch.randint(0, 64, (2, 23))
    calls = _count_calls(monkeypatch, impl)
    for steer in (False, True):
        before = len(calls)
        plain, plain_z = _run(model, ids, False, steer)
        assert len(calls) == before                                   # the unlowered graph keeps SDPA
        lowered, lowered_z = _run(model, ids, True, steer)
        torch.testing.assert_close(lowered, plain, rtol=TOL[torch.float32], atol=TOL[torch.float32])
        for a, b in zip(lowered_z, plain_z):
            torch.testing.assert_close(a, b, rtol=TOL[torch.float32], atol=TOL[torch.float32])
    assert len(calls) == 2 * 2                                         # 2 layers × 2 runs


def test_masked_sites_are_kept_and_named():
    model = build(FAMILIES["llama"], layers=2, heads=4, kv_heads=2, head_dim=16, impl="sdpa")
    im = attnfx.instrument(model, lower=True)
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    before = counters["attnfx"]["sites_lowered"]
    with torch.no_grad(), pytest.warns(LoweringWarning, match="layer 0: kept SDPA .explicit attn_mask.*layer 1"):
        im(input_ids=ids, attention_mask=mask)
    assert counters["attnfx"]["sites_lowered"] == before                 # a padding mask: SDPA kept
    im.uninstrument()


class CausalCrossLength(torch.nn.Module):
    """SDPA with is_causal=True and more keys than queries: SDPA aligns the mask top-left, the
    kernel bottom-right, so this site must not be lowered."""

    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_causal_sites_with_other_key_lengths_are_kept():
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 7, 8)
    im = attnfx.instrument(CausalCrossLength(), lower=True, example_inputs=(q, k, k))
    with pytest.warns(LoweringWarning, match="aligns top-left"):
        out = im(q, k, k)
    torch.testing.assert_close(out, CausalCrossLength()(q, k, k), rtol=0, atol=0)
    im.uninstrument()


def test_gradients_flow_through_the_lowered_op():
    set_attention_backend("reference")
    try:
        model = build(FAMILIES["llama"], layers=2, heads=4, kv_heads=2, head_dim=16, impl="sdpa")
        ids = torch.randint(0, 64, (1, 11))
        grads = []
        for lower in (False, True):
            im = attnfx.instrument(model, backend="aot_eager", lower=lower)
            model.zero_grad()
            output_tensor(im(input_ids=ids)).square().mean().backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            im.uninstrument()
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    finally:
        set_attention_backend(None)


@pytest.mark.inductor
def test_lowered_model_compiles_with_inductor_and_fullgraph():
    """Inductor with fullgraph=True over the lowered op (on CPU an opaque node running the
    reference; on CUDA test_gpu covers the decomposed kernels)."""
    set_attention_backend("reference")
    try:
        model = build(FAMILIES["llama"], layers=1, heads=4, kv_heads=2, head_dim=16, impl="sdpa")
        im = attnfx.instrument(model, backend="inductor", lower=True, fullgraph=True)
        ids = torch.randint(0, 64, (2, 9))
        with torch.no_grad():
            assert_close(output_tensor(im(input_ids=ids)), output_tensor(model(input_ids=ids)))
        im.uninstrument()
    finally:
        set_attention_backend(None)
