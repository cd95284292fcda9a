"""attnfx::lrp_layer_norm and attnfx::lrp_rms_norm: forwards equal torch's bit for bit; backwards
hold the normaliser constant (checked against autograd through a detached σ), conserve relevance
without a bias, and the C++ kernels match the reference (hypothesis over shapes, dtypes, weights);
opcheck; typed errors."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from _ops import DTYPES, assert_matches, impl, run_with  # noqa: F401
from attnfx.errors import ShapeMismatchError
from attnfx.ops import _cpp, lrp_norm

ln_op, ln_backward_op = torch.ops.attnfx.lrp_layer_norm, torch.ops.attnfx.lrp_layer_norm_backward
rms_op, rms_backward_op = torch.ops.attnfx.lrp_rms_norm, torch.ops.attnfx.lrp_rms_norm_backward
EPS = 1e-5


def _inputs(shape, dtype, w_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    w = (torch.randn(shape[-1], generator=g)).to(w_dtype or dtype)
    b = torch.randn(shape[-1], generator=g).to(w_dtype or dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [False, True])
def test_forwards_are_torchs_bit_for_bit(impl, dtype, affine):
    x, w, b = _inputs((3, 5, 37), dtype)
    w, b = (w, b) if affine else (None, None)
    assert torch.equal(ln_op(x, w, b, EPS), F.layer_norm(x, (37,), w, b, EPS))
    assert torch.equal(rms_op(x, w, EPS), F.rms_norm(x, (37,), w, EPS))


def _detached_sigma_oracles(x, w, b):
    """The rules by autograd: the normaliser computed from x.detach()."""
    xd = x.detach()
    sigma = (xd.var(-1, unbiased=False, keepdim=True) + EPS).sqrt()
    rms = (xd.pow(2).mean(-1, keepdim=True) + EPS).sqrt()
    return (x - x.mean(-1, keepdim=True)) / sigma * w + b, x / rms * w


def test_backwards_are_autograd_through_a_detached_normaliser(impl):
    x, w, b = (t.double().requires_grad_() for t in _inputs((4, 6, 23), torch.float32))
    g = torch.randn(4, 6, 23, dtype=torch.float64)
    ln_oracle, rms_oracle = _detached_sigma_oracles(x, w, b)
    for got, want, leaves in ((ln_op(x, w, b, EPS), ln_oracle, (x, w, b)), (rms_op(x, w, EPS), rms_oracle, (x, w))):
        for a, e in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g)):
            torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10)


def test_relevance_is_conserved_without_bias(impl):
    """Σ x·grad_x = Σ y·grad_y for LayerNorm (no bias) and RMSNorm: the identity rule (DESIGN §3)."""
    x, w, _ = (t.double() for t in _inputs((5, 31), torch.float32))
    x.requires_grad_()
    for y in (ln_op(x, w, None, EPS), rms_op(x, w, EPS)):
        g = torch.randn_like(y)
        (grad_x,) = torch.autograd.grad(y, x, g)
        torch.testing.assert_close((x * grad_x).sum(), (y * g).sum(), atol=1e-10, rtol=1e-10)


@settings(max_examples=30)
@given(lead=st.lists(st.integers(0, 6), max_size=3), d=st.integers(1, 70), dtype=st.sampled_from(DTYPES),
       weight=st.sampled_from(["none", "same", "float32"]))
def test_backward_cpp_matches_the_reference(lead, d, dtype, weight):
    x, w, _ = _inputs((*lead, d), dtype, torch.float32 if weight == "float32" else dtype)
    w = None if weight == "none" else w
    grad = torch.randn(x.shape).to(dtype)
    want_ln = lrp_norm.norm_backward_reference(grad, x, w, EPS, centre=True)
    want_rms = lrp_norm.norm_backward_reference(grad, x, w, EPS, centre=False)[:2]
    for got, want in ((run_with("cpp", ln_backward_op, grad, x, w, EPS), want_ln),
                      (run_with("cpp", rms_backward_op, grad, x, w, EPS), want_rms)):
        for a, e in zip(got, want):
            assert_matches(a, e)


def test_opcheck(impl):
    x, w, b = _inputs((6, 4, 9), torch.float32)
    x = x.transpose(0, 1)                                              # strided
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    torch.library.opcheck(ln_op.default, (*leaves, EPS))
    torch.library.opcheck(ln_op.default, (leaves[0], None, None, EPS))
    torch.library.opcheck(rms_op.default, (leaves[0], leaves[1], EPS))
    torch.library.opcheck(ln_backward_op.default, (torch.randn(x.shape), x, w, EPS))
    torch.library.opcheck(rms_backward_op.default, (torch.randn(x.shape), x, None, EPS))


def test_opcheck_raw_cpp_ops():
    x, w, b = _inputs((5, 12), torch.bfloat16, torch.float32)
    raw = _cpp.ops()
    torch.library.opcheck(raw.lrp_layer_norm.default, (x, w, b, EPS))
    torch.library.opcheck(raw.lrp_rms_norm.default, (x, None, EPS))
    torch.library.opcheck(raw.lrp_layer_norm_backward.default, (torch.randn(5, 12).bfloat16(), x, w, EPS))
    torch.library.opcheck(raw.lrp_rms_norm_backward.default, (torch.randn(5, 12).bfloat16(), x, w, EPS))


def test_typed_errors():
    x = torch.randn(3, 8)
    with pytest.raises(ShapeMismatchError, match=r"weight \[d\]"):
        ln_op(x, torch.randn(7), None, EPS)
    with pytest.raises(ShapeMismatchError, match="grad must have x's shape"):
        rms_backward_op(torch.randn(3, 7), x, None, EPS)
    with pytest.raises(RuntimeError, match=r"expected weight \[d\] = \[8\], received \[7\]"):
        _cpp.ops().lrp_rms_norm_backward(x, x, torch.randn(7), EPS)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernels_match_the_reference(dtype):
    if not _cpp.has_kernels(["lrp_layer_norm_backward", "lrp_rms_norm_backward"], "cuda"):
        pytest.skip("attnfx._C was built without CUDA")
    x, w, _ = (t.cuda() for t in _inputs((4, 300, 777), dtype))
    grad = torch.randn(x.shape, device="cuda").to(dtype)
    for got, centre in ((run_with("cpp", ln_backward_op, grad, x, w, EPS), True),
                        (run_with("cpp", rms_backward_op, grad, x, w, EPS), False)):
        want = lrp_norm.norm_backward_reference(grad, x, w, EPS, centre=centre)
        for a, e in zip(got, want):
            assert_matches(a, e)
