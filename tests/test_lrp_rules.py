"""attnfx.ops.lrp_rules: forwards equal torch's bit for bit; the backwards are AttnLRP's rules —
lrp_act's identity rule grad·f(x)/(x + ε·sign(x)), the norms with the normaliser held constant
(checked against autograd through a detached σ) — and conserve relevance; the C++ kernels match
the references (hypothesis over shapes, dtypes, activations, ε, weights); opcheck; typed errors."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from _ops import DTYPES, assert_matches, impl, run_with  # noqa: F401
from attnfx.errors import InvalidArgumentError, ShapeMismatchError
from attnfx.ops import _cpp, lrp_rules

act_op, act_backward_op = torch.ops.attnfx.lrp_act, torch.ops.attnfx.lrp_act_backward
ln_op, ln_backward_op = torch.ops.attnfx.lrp_layer_norm, torch.ops.attnfx.lrp_layer_norm_backward
rms_op, rms_backward_op = torch.ops.attnfx.lrp_rms_norm, torch.ops.attnfx.lrp_rms_norm_backward
ACTS = sorted(lrp_rules.ACTIVATIONS)
EPS = 1e-5


def _x(shape, dtype):
    """Values around the activations' bends, with 0, −0 and a tiny positive value up front."""
    x = torch.randn(shape) * 3
    specials = torch.tensor([0.0, -0.0, 1e-3])[: x.numel()]
    x.view(-1)[: len(specials)] = specials
    return x.to(dtype)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_act_forward_is_torchs_bit_for_bit(impl, act, dtype):
    x = _x((4, 33), dtype)
    assert torch.equal(act_op(x, act, 1e-6), lrp_rules.ACTIVATIONS[act](x))


# The C++ kernel works in chunks of 16384 elements: sizes past two chunks check the seams.
@settings(max_examples=30)
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3) | st.just([2, 20000]),
       act=st.sampled_from(ACTS), dtype=st.sampled_from(DTYPES), eps=st.sampled_from([1e-6, 1e-2, 0.0]))
def test_act_backward_cpp_matches_the_reference(shape, act, dtype, eps):
    x, grad = _x(shape, dtype), torch.randn(shape).to(dtype)
    x.view(-1)[:2] = 0.0 if eps else 0.5                      # x = 0 only where ε keeps it finite
    got = run_with("cpp", act_backward_op, grad, x, act, eps)
    assert_matches(got, lrp_rules.act_backward_reference(grad, x, act, eps))


def test_act_backward_is_the_identity_rule(impl):
    """Written out: ε signed like x, sign(0) = +1, so x = 0 divides by +ε."""
    x = torch.tensor([-2.0, -1e-3, 0.0, 1e-3, 2.0])
    grad = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    eps = 1e-2
    got = act_backward_op(grad, x, "silu", eps)
    want = grad * torch.nn.functional.silu(x) / torch.tensor([-2.01, -0.011, 0.01, 0.011, 2.01])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("act", ACTS)
def test_act_conserves_relevance(impl, act):
    """Gradient × Input through the rule: x·grad_x = f(x)·grad_y, up to ε (fp64, ε = 1e-12)."""
    x = (torch.randn(7, 19, dtype=torch.float64) * 3).requires_grad_()
    y = act_op(x, act, 1e-12)
    grad_y = torch.randn_like(y)
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    torch.testing.assert_close(x * grad_x, y * grad_y, atol=1e-10, rtol=1e-9)


def test_act_opcheck(impl):
    x = torch.randn(3, 8, 5).transpose(0, 2)                        # strided
    for act in ("gelu", "relu"):
        torch.library.opcheck(act_op.default, (x.clone().requires_grad_(), act, 1e-6))
        torch.library.opcheck(act_backward_op.default, (torch.randn(x.shape), x, act, 1e-6))


def test_act_opcheck_raw_cpp_ops():
    x = torch.randn(6, 7).bfloat16()
    torch.library.opcheck(_cpp.ops().lrp_act.default, (x, "gelu_tanh", 1e-6))
    torch.library.opcheck(_cpp.ops().lrp_act_backward.default, (torch.randn(6, 7).bfloat16(), x, "tanh", 1e-6))


def test_act_typed_errors():
    x = torch.randn(3)
    with pytest.raises(InvalidArgumentError, match=r"act must be one of \['gelu', 'gelu_tanh', 'relu', 'silu', 'tanh'\]"):
        act_op(x, "softplus", 1e-6)
    with pytest.raises(ShapeMismatchError, match="grad must match x"):
        act_backward_op(torch.randn(4), x, "gelu", 1e-6)
    with pytest.raises(RuntimeError, match=r"expected act in \{gelu, gelu_tanh, silu, tanh, relu\}, received 'elu'"):
        _cpp.ops().lrp_act_backward(x, x, "elu", 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_act_cuda_kernel_matches_the_reference(dtype):
    if not _cpp.has_kernels(["lrp_act_backward"], "cuda"):
        pytest.skip("attnfx._C was built without CUDA")
    x, grad = _x((300, 1001), dtype).cuda(), torch.randn(300, 1001, device="cuda").to(dtype)
    for act in ACTS:
        assert torch.equal(run_with("cpp", act_op, x, act, 1e-6), lrp_rules.ACTIVATIONS[act](x))
        got = run_with("cpp", act_backward_op, grad, x, act, 1e-6)
        assert_matches(got, lrp_rules.act_backward_reference(grad, x, act, 1e-6))


def _inputs(shape, dtype, w_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    w = (torch.randn(shape[-1], generator=g)).to(w_dtype or dtype)
    b = torch.randn(shape[-1], generator=g).to(w_dtype or dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [False, True])
def test_norm_forwards_are_torchs_bit_for_bit(impl, dtype, affine):
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


def test_norm_backwards_are_autograd_through_a_detached_normaliser(impl):
    x, w, b = (t.double().requires_grad_() for t in _inputs((4, 6, 23), torch.float32))
    g = torch.randn(4, 6, 23, dtype=torch.float64)
    ln_oracle, rms_oracle = _detached_sigma_oracles(x, w, b)
    for got, want, leaves in ((ln_op(x, w, b, EPS), ln_oracle, (x, w, b)), (rms_op(x, w, EPS), rms_oracle, (x, w))):
        for a, e in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g)):
            torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10)


def test_norms_conserve_relevance_without_bias(impl):
    """Σ x·grad_x = Σ y·grad_y for LayerNorm (no bias) and RMSNorm: the identity rule (docs/design.md §3)."""
    x, w, _ = (t.double() for t in _inputs((5, 31), torch.float32))
    x.requires_grad_()
    for y in (ln_op(x, w, None, EPS), rms_op(x, w, EPS)):
        g = torch.randn_like(y)
        (grad_x,) = torch.autograd.grad(y, x, g)
        torch.testing.assert_close((x * grad_x).sum(), (y * g).sum(), atol=1e-10, rtol=1e-10)


@settings(max_examples=30)
@given(lead=st.lists(st.integers(0, 6), max_size=3), d=st.integers(1, 70), dtype=st.sampled_from(DTYPES),
       weight=st.sampled_from(["none", "same", "float32"]))
def test_norm_backward_cpp_matches_the_reference(lead, d, dtype, weight):
    x, w, _ = _inputs((*lead, d), dtype, torch.float32 if weight == "float32" else dtype)
    w = None if weight == "none" else w
    grad = torch.randn(x.shape).to(dtype)
    want_ln = lrp_rules.norm_backward_reference(grad, x, w, EPS, "layer_norm")
    want_rms = lrp_rules.norm_backward_reference(grad, x, w, EPS, "rms_norm")[:2]
    for got, want in ((run_with("cpp", ln_backward_op, grad, x, w, EPS), want_ln),
                      (run_with("cpp", rms_backward_op, grad, x, w, EPS), want_rms)):
        for a, e in zip(got, want):
            assert_matches(a, e)


def test_norm_opcheck(impl):
    x, w, b = _inputs((6, 4, 9), torch.float32)
    x = x.transpose(0, 1)                                              # strided
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    torch.library.opcheck(ln_op.default, (*leaves, EPS))
    torch.library.opcheck(ln_op.default, (leaves[0], None, None, EPS))
    torch.library.opcheck(rms_op.default, (leaves[0], leaves[1], EPS))
    torch.library.opcheck(ln_backward_op.default, (torch.randn(x.shape), x, w, EPS))
    torch.library.opcheck(rms_backward_op.default, (torch.randn(x.shape), x, None, EPS))


def test_norm_opcheck_raw_cpp_ops():
    x, w, b = _inputs((5, 12), torch.bfloat16, torch.float32)
    raw = _cpp.ops()
    torch.library.opcheck(raw.lrp_layer_norm.default, (x, w, b, EPS))
    torch.library.opcheck(raw.lrp_rms_norm.default, (x, None, EPS))
    torch.library.opcheck(raw.lrp_layer_norm_backward.default, (torch.randn(5, 12).bfloat16(), x, w, EPS))
    torch.library.opcheck(raw.lrp_rms_norm_backward.default, (torch.randn(5, 12).bfloat16(), x, w, EPS))


def test_norm_typed_errors():
    x = torch.randn(3, 8)
    with pytest.raises(ShapeMismatchError, match=r"weight \[d\]"):
        ln_op(x, torch.randn(7), None, EPS)
    with pytest.raises(ShapeMismatchError, match="grad must have x's shape"):
        rms_backward_op(torch.randn(3, 7), x, None, EPS)
    with pytest.raises(RuntimeError, match=r"expected weight \[d\] = \[8\], received \[7\]"):
        _cpp.ops().lrp_rms_norm_backward(x, x, torch.randn(7), EPS)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_cuda_kernels_match_the_reference(dtype):
    if not _cpp.has_kernels(["lrp_layer_norm_backward", "lrp_rms_norm_backward"], "cuda"):
        pytest.skip("attnfx._C was built without CUDA")
    x, w, _ = (t.cuda() for t in _inputs((2, 50, 777), dtype))    # 100 rows: fp32 sums stay within 1e-5
    grad = torch.randn(x.shape, device="cuda").to(dtype)
    for got, kind in ((run_with("cpp", ln_backward_op, grad, x, w, EPS), "layer_norm"),
                      (run_with("cpp", rms_backward_op, grad, x, w, EPS), "rms_norm")):
        want = lrp_rules.norm_backward_reference(grad, x, w, EPS, kind)
        for a, e in zip(got, want):
            assert_matches(a, e)
