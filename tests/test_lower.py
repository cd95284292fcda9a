"""The lowering pass: SDPA sites replaced by attnfx::attention inside instrumented graphs, with
steering and records kept, equal to the unlowered model; sites it cannot lower are named."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
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
    """A 4-d mask given by the user is a graph input: nothing says it is causal, SDPA is kept."""
    model = build(FAMILIES["llama"], layers=2, heads=4, kv_heads=2, head_dim=16, impl="sdpa")
    im = attnfx.instrument(model, lower=True)
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.ones(9, 9, dtype=torch.bool).tril()[None, None].expand(2, 1, 9, 9).clone()
    mask[0, :, :, :3] = False
    mask[0, :, :3, 0] = True
    before = counters["attnfx"]["sites_lowered"]
    with torch.no_grad(), pytest.warns(LoweringWarning, match="layer 0: kept SDPA .explicit attn_mask.*layer 1"):
        im(input_ids=ids, attention_mask=mask)
    assert counters["attnfx"]["sites_lowered"] == before
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


# ---- explicit masks read off their construction (passes/mask_terms.py) ----------------------------
def _padded(batch, length, pad, side):
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad:
        mask[0, :pad] = 0 if side == "left" else 1
        if side == "right":
            mask[0, length - pad:] = 0
    return mask


@pytest.mark.parametrize("family", LOWERABLE + ["bert"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_are_lowered(family, side, monkeypatch):
    """HF's padded-batch mask (causal ∧ key padding; an encoder's: q_idx ≥ 0 ∧ key padding) goes
    to the kernel as causal + key_mask: equal to the unlowered model at every real position."""
    model = build(FAMILIES[family], layers=2, heads=4, kv_heads=2 if family not in ("gpt2", "bert") else None,
                  head_dim=16, impl="sdpa")
    ids, mask = torch.randint(0, 64, (2, 11)), _padded(2, 11, 4, side)
    set_attention_backend("reference")
    calls, outs = _count_calls(monkeypatch, "reference"), []
    try:
        for lower in (False, True):
            im = attnfx.instrument(model, lower=lower)
            before = len(calls)
            with torch.no_grad():
                outs.append(output_tensor(im(input_ids=ids, attention_mask=mask)))
            assert len(calls) - before == (2 if lower else 0)                # one kernel call per layer
            im.uninstrument()
    finally:
        set_attention_backend(None)
    real = mask.bool()
    torch.testing.assert_close(outs[1][real], outs[0][real], rtol=TOL[torch.float32], atol=TOL[torch.float32])


def _lowering_of(fn, *inputs):
    """The lower pass's verdict on fn's one SDPA call: (reason kept or None, terms)."""
    from attnfx.passes import lower
    from attnfx.graph.sites import find_sites
    seen = []

    def backend(gm, example_inputs):
        sites, _ = find_sites(gm.graph)
        (site,) = sites
        seen.append((lower._why_not(site), lower._mask_terms(site)))
        return gm.forward

    torch._dynamo.reset()
    with torch._dynamo.config.patch(specialize_int=True):        # offsets as literals, as HF's are
        torch.compile(fn, backend=backend, dynamic=True)(*inputs)
    return seen[0]


def _mask_fn(shift, c_k, causal, padding, window=None):
    """HF's mask construction; queries at positions c_k + (S − T) + shift of the keys' c_k …"""
    def fn(q, k, v, pad):
        T, S = q.shape[2], k.shape[2]
        q_idx = (torch.arange(T) + (c_k + S - T + shift))[None, None, :, None]
        kv_idx = (torch.arange(S) + c_k)[None, None, None, :]
        mask = q_idx.new_ones((1, 1, 1, 1), dtype=torch.bool)
        if causal:
            mask = mask & (kv_idx <= q_idx)
        if window is not None:
            mask = mask & (kv_idx > q_idx - window)
        if padding:
            mask = mask & pad.bool()[torch.arange(q.shape[0])[:, None, None, None], kv_idx]
        mask = mask.expand(q.shape[0], 1, T, S)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return fn


@settings(max_examples=12, deadline=None)
@given(T=st.integers(2, 6), extra=st.integers(0, 3), c_k=st.integers(0, 2), shift=st.integers(-1, 1),
       causal=st.booleans(), padding=st.booleans())
def test_explicit_masks_are_read_off_their_construction(T, extra, c_k, shift, causal, padding):
    """A conjunction of a causal comparison and a key-padding lookup is lowered exactly when the
    kernel's masking (bottom-right causal, key mask) equals it for every shape; the lowered
    masking, evaluated by the reference, equals the mask SDPA is given."""
    from attnfx.ops.reference import attention_mask
    S = T + extra
    q, k = torch.randn(2, 2, T, 4), torch.randn(2, 2, S, 4)
    pad = torch.ones(2, S + c_k, dtype=torch.long)
    pad[0, c_k] = 0
    fn = _mask_fn(shift, c_k, causal, padding)                # shift 0: bottom-right, as the kernel aligns
    c_q = c_k + extra + shift
    reason, terms = _lowering_of(fn, q, k, k, pad)
    lowerable = not causal or shift == 0
    assert (reason is None) == lowerable, reason
    if lowerable and (causal or padding):
        assert terms.causal == causal and (terms.key_mask is not None) == padding
        assert not padding or terms.key_offset == c_k
        key_mask = pad.bool()[:2, c_k:c_k + S] if padding else None
        got = attention_mask(T, S, causal=causal, key_mask=key_mask).expand(2, -1, -1, -1)
        q_idx, kv_idx = torch.arange(T)[:, None] + c_q, torch.arange(S)[None, :] + c_k
        want = (kv_idx <= q_idx if causal else torch.ones(T, S, dtype=torch.bool))[None, None]
        if padding:
            want = want & pad.bool()[:, None, None, c_k:c_k + S]
        assert torch.equal(got, want.expand(2, 1, T, S))


def test_a_sliding_window_keeps_sdpa_and_is_named():
    q = torch.randn(1, 2, 5, 4)
    reason, terms = _lowering_of(_mask_fn(0, 0, True, False, window=2), q, q, q, torch.ones(1, 5))
    assert terms is None and reason == "explicit attn_mask that is not a causal and/or key-padding mask"
