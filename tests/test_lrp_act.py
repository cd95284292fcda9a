"""attnfx::lrp_act and attnfx::lrp_act_backward: the forward equals torch's activation bit for bit,
the backward is the identity rule grad·f(x)/(x + ε·sign(x)) (C++ against the reference, hypothesis
over shapes, dtypes, activations and ε), relevance is conserved, opcheck, typed errors."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from _ops import DTYPES, assert_matches, impl, run_with  # noqa: F401
from attnfx.errors import InvalidArgumentError, ShapeMismatchError
from attnfx.ops import _cpp, lrp_act

act_op, act_backward_op = torch.ops.attnfx.lrp_act, torch.ops.attnfx.lrp_act_backward
ACTS = sorted(lrp_act.ACTIVATIONS)


def _x(shape, dtype):
    """Values around the activations' bends, with 0, −0 and a tiny positive value up front."""
    x = torch.randn(shape) * 3
    specials = torch.tensor([0.0, -0.0, 1e-3])[: x.numel()]
    x.view(-1)[: len(specials)] = specials
    return x.to(dtype)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_is_torchs_activation_bit_for_bit(impl, act, dtype):
    x = _x((4, 33), dtype)
    assert torch.equal(act_op(x, act, 1e-6), lrp_act.ACTIVATIONS[act](x))


# The C++ kernel works in chunks of 16384 elements: sizes past two chunks check the seams.
@settings(max_examples=30)
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3) | st.just([2, 20000]),
       act=st.sampled_from(ACTS), dtype=st.sampled_from(DTYPES), eps=st.sampled_from([1e-6, 1e-2, 0.0]))
def test_backward_cpp_matches_the_reference(shape, act, dtype, eps):
    x, grad = _x(shape, dtype), torch.randn(shape).to(dtype)
    x.view(-1)[:2] = 0.0 if eps else 0.5                      # x = 0 only where ε keeps it finite
    got = run_with("cpp", act_backward_op, grad, x, act, eps)
    assert_matches(got, lrp_act.act_backward_reference(grad, x, act, eps))


def test_backward_is_the_identity_rule(impl):
    """Written out: ε signed like x, sign(0) = +1, so x = 0 divides by +ε."""
    x = torch.tensor([-2.0, -1e-3, 0.0, 1e-3, 2.0])
    grad = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    eps = 1e-2
    got = act_backward_op(grad, x, "silu", eps)
    want = grad * torch.nn.functional.silu(x) / torch.tensor([-2.01, -0.011, 0.01, 0.011, 2.01])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("act", ACTS)
def test_relevance_is_conserved(impl, act):
    """Gradient × Input through the rule: x·grad_x = f(x)·grad_y, up to ε (fp64, ε = 1e-12)."""
    x = (torch.randn(7, 19, dtype=torch.float64) * 3).requires_grad_()
    y = act_op(x, act, 1e-12)
    grad_y = torch.randn_like(y)
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    torch.testing.assert_close(x * grad_x, y * grad_y, atol=1e-10, rtol=1e-9)


def test_opcheck(impl):
    x = torch.randn(3, 8, 5).transpose(0, 2)                        # strided
    for act in ("gelu", "relu"):
        torch.library.opcheck(act_op.default, (x.clone().requires_grad_(), act, 1e-6))
        torch.library.opcheck(act_backward_op.default, (torch.randn(x.shape), x, act, 1e-6))


def test_opcheck_raw_cpp_ops():
    x = torch.randn(6, 7).bfloat16()
    torch.library.opcheck(_cpp.ops().lrp_act.default, (x, "gelu_tanh", 1e-6))
    torch.library.opcheck(_cpp.ops().lrp_act_backward.default, (torch.randn(6, 7).bfloat16(), x, "tanh", 1e-6))


def test_typed_errors():
    x = torch.randn(3)
    with pytest.raises(InvalidArgumentError, match=r"act must be one of \['gelu', 'gelu_tanh', 'relu', 'silu', 'tanh'\]"):
        act_op(x, "softplus", 1e-6)
    with pytest.raises(ShapeMismatchError, match="grad must match x"):
        act_backward_op(torch.randn(4), x, "gelu", 1e-6)
    with pytest.raises(RuntimeError, match=r"expected act in \{gelu, gelu_tanh, silu, tanh, relu\}, received 'elu'"):
        _cpp.ops().lrp_act_backward(x, x, "elu", 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernel_matches_the_reference(dtype):
    if not _cpp.has_kernels(["lrp_act_backward"], "cuda"):
        pytest.skip("attnfx._C was built without CUDA")
    x, grad = _x((300, 1001), dtype).cuda(), torch.randn(300, 1001, device="cuda").to(dtype)
    for act in ACTS:
        assert torch.equal(run_with("cpp", act_op, x, act, 1e-6), lrp_act.ACTIVATIONS[act](x))
        got = run_with("cpp", act_backward_op, grad, x, act, 1e-6)
        assert_matches(got, lrp_act.act_backward_reference(grad, x, act, 1e-6))
