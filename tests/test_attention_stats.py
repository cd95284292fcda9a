"""attnfx::attention_stats: the C++ kernel (and Triton's, in its interpreter) against the
reference oracle, with hypothesis over shapes and dtypes: odd sizes, GQA, empty and out-of-range
spans, rows with no visible key, causal with T ≠ S, key tiles beyond the first; opcheck on each
implementation and on the raw op; typed errors."""
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

from _ops import DTYPES, assert_matches, impl, run_with  # noqa: F401
from attnfx.errors import DTypeMismatchError, ShapeMismatchError
from attnfx.ops import _cpp, attention_stats, reference

stats_op = torch.ops.attnfx.attention_stats


@st.composite
def problems(draw, max_t=70, max_s=600):
    """(q, k, key_mask, spans, causal, sm_scale); S up to 600 crosses the C++ kernel's 512-key tile,
    T up to 70 its 64-row query block."""
    b, hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    T, S, d = draw(st.integers(1, max_t)), draw(st.integers(1, max_s)), draw(st.integers(1, 24))
    dtype = draw(st.sampled_from(DTYPES))
    q = torch.randn(b, hkv * group, T, d).to(dtype)
    k = (torch.randn(b, hkv, S, d) * draw(st.sampled_from([0.5, 3.0]))).to(dtype)
    key_mask = None
    if draw(st.booleans()):
        key_mask = torch.rand(b, S) < draw(st.sampled_from([0.3, 0.9]))
        key_mask[0, :] = draw(st.booleans())                 # a batch row that sees nothing, at times
    edges = st.integers(-3, S + 3)
    spans = draw(st.none() | st.lists(st.tuples(edges, edges), max_size=4))     # empty, reversed, outside
    spans = None if spans is None else torch.tensor(spans, dtype=torch.int64).reshape(-1, 2)
    return q, k, key_mask, spans, draw(st.booleans()), draw(st.sampled_from([0.125, 1.0]))


def _reference(q, k, key_mask, spans, causal, sm_scale):
    return attention_stats.stats_reference(q, k, key_mask, spans, causal, sm_scale)


@settings(max_examples=40)
@given(problem=problems())
def test_cpp_matches_the_reference(problem):
    lse, mass = run_with("cpp", stats_op, *problem)
    want_lse, want_mass = _reference(*problem)
    assert_matches(lse, want_lse)                          # −inf rows included: inf compares exactly
    assert_matches(mass, want_mass)


def test_definitions_are_the_attention_oracles():
    """lse and mass are reference.attention's, at a size where rows mix visible and hidden keys."""
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 2, 13, 8, generator=g), torch.randn(2, 2, 13, 8)
    key_mask = torch.rand(2, 13, generator=g) > 0.3
    spans = torch.tensor([[0, 3], [2, 13], [5, 5]])
    lse, mass = stats_op(q, k, key_mask, spans, True, 0.3)
    want = reference.attention(q, k, v, causal=True, key_mask=key_mask, sm_scale=0.3, spans=spans)
    torch.testing.assert_close(lse, want["lse"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mass, want["mass"], atol=1e-5, rtol=1e-5)


def test_rows_without_visible_keys():
    """Causal with T > S: the first T − S queries see no key: lse −inf, mass 0, in every impl."""
    q, k = torch.randn(1, 2, 7, 4), torch.randn(1, 1, 3, 4)
    for name in ("cpp", "reference"):
        lse, mass = run_with(name, stats_op, q, k, None, torch.tensor([[0, 3]]), True, 0.5)
        assert torch.isneginf(lse[..., :4]).all() and torch.isfinite(lse[..., 4:]).all()
        assert torch.equal(mass[:, :4], torch.zeros(1, 4, 2, 1))
        torch.testing.assert_close(mass[:, 4:], torch.ones(1, 3, 2, 1))      # one span covering all keys


def test_no_spans_gives_an_empty_mass(impl):
    q, k = torch.randn(2, 2, 5, 4), torch.randn(2, 1, 6, 4)
    for spans in (None, torch.zeros(0, 2, dtype=torch.int64)):
        lse, mass = stats_op(q, k, None, spans, False, 0.5)
        assert lse.shape == (2, 2, 5) and mass.shape == (2, 5, 2, 0) and mass.dtype == torch.float32


@pytest.mark.parametrize("masked", [False, True])
def test_opcheck(impl, masked):
    q = torch.randn(2, 5, 4, 3).transpose(1, 2)                        # [b, H=4, T=5, d] strided view
    k = torch.randn(2, 2, 7, 3)
    key_mask = torch.rand(2, 7) > 0.4 if masked else None
    torch.library.opcheck(stats_op.default, (q, k, key_mask, torch.tensor([[1, 4], [0, 0]]), True, 0.5))


def test_opcheck_raw_cpp_op():
    q, k = torch.randn(1, 4, 5, 3).bfloat16(), torch.randn(1, 2, 9, 3).bfloat16()
    torch.library.opcheck(_cpp.ops().attention_stats.default, (q, k, None, torch.tensor([[2, 9]]), True, 0.5))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="Triton on CPU needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])        # bf16 is wrong in the interpreter
def test_triton_matches_the_reference(dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k = torch.randn(2, 4, 37, 16, device=device).to(dtype), torch.randn(2, 2, 45, 16, device=device).to(dtype)
    key_mask = torch.rand(2, 45, device=device) > 0.2
    key_mask[1] = False
    args = (q, k, key_mask, torch.tensor([[0, 4], [40, 60], [9, 3]]), True, 0.25)
    lse, mass = run_with("triton", stats_op, *args)
    want_lse, want_mass = _reference(*args)
    torch.testing.assert_close(lse, want_lse, atol=1e-4, rtol=1e-4)      # Triton's exp2 path: ~1e-6 per term
    torch.testing.assert_close(mass, want_mass, atol=1e-4, rtol=1e-4)


def test_typed_errors():
    q, k = torch.randn(1, 3, 5, 4), torch.randn(1, 2, 5, 4)
    with pytest.raises(ShapeMismatchError, match="multiple of Hkv"):
        stats_op(q, k, None, None, False, 1.0)
    with pytest.raises(DTypeMismatchError):
        stats_op(q[:, :2].long(), k.long(), None, None, False, 1.0)
    with pytest.raises(ShapeMismatchError, match=r"key_mask must be bool \[b, S\]"):
        stats_op(q[:, :2], k, torch.ones(1, 4, dtype=torch.bool), None, False, 1.0)
    with pytest.raises(ShapeMismatchError, match=r"spans must be int64 \[n, 2\]"):
        stats_op(q[:, :2], k, None, torch.tensor([[0, 1]], dtype=torch.int32), False, 1.0)
    with pytest.raises(RuntimeError, match=r"expected spans int64 \[n, 2\]"):
        _cpp.ops().attention_stats(q[:, :2], k, None, torch.tensor([0, 1]), False, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_kernel_matches_the_reference_and_triton(dtype, causal):
    if not _cpp.has_kernels(["attention_stats"], "cuda"):
        pytest.skip("attnfx._C was built without CUDA")
    q, k = torch.randn(2, 8, 300, 64, device="cuda").to(dtype), torch.randn(2, 2, 333, 64, device="cuda").to(dtype)
    key_mask = torch.rand(2, 333, device="cuda") > 0.1
    args = (q, k, key_mask, torch.tensor([[0, 4], [100, 333], [50, 40]]), causal, 0.125)
    lse, mass = run_with("cpp", stats_op, *args)
    want_lse, want_mass = _reference(*args)
    assert_matches(lse, want_lse)
    assert_matches(mass, want_mass)
    t_lse, t_mass = run_with("triton", stats_op, *args)
    torch.testing.assert_close(lse, t_lse, atol=1e-4, rtol=1e-4)      # as on CPU: Triton's exp2 path
    torch.testing.assert_close(mass, t_mass, atol=1e-4, rtol=1e-4)
