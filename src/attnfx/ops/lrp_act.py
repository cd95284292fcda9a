"""`attnfx::lrp_act`: an elementwise nonlinearity whose backward is AttnLRP's identity rule
(Achtibat et al. 2024, "AttnLRP", Prop. 3.1; DESIGN §3), as torch.library ops.

    y = torch.ops.attnfx.lrp_act(x, act, eps)          # = F.gelu(x) etc., bit for bit
    grad_x = grad_y · f(x) / (x + eps·sign(x)),         sign(0) = +1

so Gradient × Input distributes relevance R_y = y·grad_y to x unchanged: x·grad_x ≈ y·grad_y.
The backward is its own op, `attnfx::lrp_act_backward(grad, x, act, eps)`, which recomputes f(x)
in fp32 (only x is saved). act ∈ ACTIVATIONS. Implementations: "cpp" (attnfx._C: the forward
calls ATen, the backward is one fused pass; CPU and CUDA) and "reference".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends
from ..errors import DTypeMismatchError, InvalidArgumentError, ShapeMismatchError
from . import _cpp

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "tanh": torch.tanh,
    "relu": F.relu,
}
backends.register("lrp_act", {"cpp", "reference"}, cpp_ops=("lrp_act", "lrp_act_backward"))


def stabilize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x + ε·sign(x) with sign(0) = +1: never 0 for ε > 0, and never flips x's sign."""
    return x + eps * torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def act_backward_reference(grad: torch.Tensor, x: torch.Tensor, act: str, eps: float) -> torch.Tensor:
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    return (grad.to(acc) * (ACTIVATIONS[act](xf) / stabilize(xf, eps))).to(x.dtype).contiguous()


def check_act(x: torch.Tensor, act: str) -> None:
    if act not in ACTIVATIONS:
        raise InvalidArgumentError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    if not x.is_floating_point():
        raise DTypeMismatchError(f"x must have a floating dtype, got {x.dtype}")


@torch.library.custom_op("attnfx::lrp_act", mutates_args=(), schema="(Tensor x, str act, float eps) -> Tensor")
def lrp_act(x: torch.Tensor, act: str, eps: float) -> torch.Tensor:
    check_act(x, act)
    if backends.choose("lrp_act", x.device) == "cpp":
        return _cpp.ops().lrp_act(x, act, eps)
    return ACTIVATIONS[act](x)


@lrp_act.register_fake
def _act_fake(x, act, eps):
    check_act(x, act)
    return torch.empty_like(x)


@torch.library.custom_op("attnfx::lrp_act_backward", mutates_args=(),
                         schema="(Tensor grad, Tensor x, str act, float eps) -> Tensor")
def lrp_act_backward(grad: torch.Tensor, x: torch.Tensor, act: str, eps: float) -> torch.Tensor:
    check_act_backward(grad, x, act)
    if backends.choose("lrp_act", x.device) == "cpp":
        return _cpp.ops().lrp_act_backward(grad, x, act, eps)
    return act_backward_reference(grad, x, act, eps)


def check_act_backward(grad, x, act) -> None:
    check_act(x, act)
    if grad.shape != x.shape or grad.dtype != x.dtype or grad.device != x.device:
        raise ShapeMismatchError(f"grad must match x ({list(x.shape)}, {x.dtype}, {x.device}), got "
                                 f"{list(grad.shape)}, {grad.dtype}, {grad.device}")


@lrp_act_backward.register_fake
def _act_backward_fake(grad, x, act, eps):
    check_act_backward(grad, x, act)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    x, act, eps = inputs
    ctx.save_for_backward(x)
    ctx.act, ctx.eps = act, eps


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return torch.ops.attnfx.lrp_act_backward(grad, x, ctx.act, ctx.eps), None, None


lrp_act.register_autograd(_backward, setup_context=_setup)
_cpp.register_fake("lrp_act", _act_fake)
_cpp.register_fake("lrp_act_backward", _act_backward_fake)
