"""AttnLRP's rules as local Jacobians (Achtibat et al. 2024, "AttnLRP"; docs/design.md §3), as torch.library
ops whose forwards equal torch's and whose backwards are the rules. Each backward is an op of its
own (the graph pass and AOT autograd see one node). Implementations: "cpp" (attnfx._C: the
forwards call ATen, the backwards are one fused pass; CPU and CUDA) and "reference".

    y = torch.ops.attnfx.lrp_act(x, act, eps)            # = F.gelu(x) etc., bit for bit
        grad_x = grad_y · f(x) / (x + eps·sign(x)),  sign(0) = +1           (identity rule)
    y = torch.ops.attnfx.lrp_layer_norm(x, weight, bias, eps)   # = F.layer_norm over the last dim
        σ = √(var_biased(x) + eps) constant:  grad_x = (g·w − mean_last(g·w)) / σ,
        grad_w = Σ g·x̂,  grad_b = Σ g
    y = torch.ops.attnfx.lrp_rms_norm(x, weight, eps)            # = F.rms_norm over the last dim
        rms = √(mean(x²) + eps) constant:  grad_x = g·w / rms,  grad_w = Σ g·x / rms

Backward ops: `lrp_act_backward(grad, x, act, eps)` (recomputes f(x) in fp32: only x is saved),
`lrp_layer_norm_backward(grad, x, weight, eps) -> (grad_x, grad_weight, grad_bias)` and
`lrp_rms_norm_backward(grad, x, weight, eps) -> (grad_x, grad_weight)`; Σ runs over every leading
dim, grad_w and grad_b come in weight's dtype (x's when weight is None). The identity rule makes
Gradient × Input conserve relevance: x·grad_x = f(x)·grad_y (up to ε), and Σ x·grad_x = Σ y·grad_y
through a norm without bias.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import backends
from ..errors import DeviceMismatchError, DTypeMismatchError, InvalidArgumentError, ShapeMismatchError
from . import _cpp

# ---- lrp_act --------------------------------------------------------------------------------------

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


def _act_setup(ctx, inputs, output):
    x, act, eps = inputs
    ctx.save_for_backward(x)
    ctx.act, ctx.eps = act, eps


def _act_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return torch.ops.attnfx.lrp_act_backward(grad, x, ctx.act, ctx.eps), None, None


lrp_act.register_autograd(_act_backward, setup_context=_act_setup)
_cpp.register_fake("lrp_act", _act_fake)
_cpp.register_fake("lrp_act_backward", _act_backward_fake)


# ---- LayerNorm and RMSNorm: helpers --------------------------------------------------------------

backends.register("lrp_layer_norm", {"cpp", "reference"}, cpp_ops=("lrp_layer_norm", "lrp_layer_norm_backward"))
backends.register("lrp_rms_norm", {"cpp", "reference"}, cpp_ops=("lrp_rms_norm", "lrp_rms_norm_backward"))


def norm_backward_reference(grad, x, weight, eps: float, kind: str):
    """(grad_x, grad_w, grad_b) of kind "layer_norm" or "rms_norm" with the normaliser held constant."""
    centre = kind == "layer_norm"
    acc = torch.promote_types(x.dtype, torch.float32)
    xf, g = x.to(acc), grad.to(acc)
    centred = xf - xf.mean(-1, keepdim=True) if centre else xf
    scale = (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt()        # σ, or rms
    gw = g if weight is None else g * weight.to(acc)
    if centre:
        gw = gw - gw.mean(-1, keepdim=True)
    w_dtype = x.dtype if weight is None else weight.dtype
    column_sum = lambda t: t.reshape(-1, x.shape[-1]).sum(0).to(w_dtype)    # noqa: E731  (.sum(()) sums all)
    return (gw / scale).to(x.dtype), column_sum(g * centred / scale), column_sum(g)


def check_norm(x, weight, grad=None) -> None:
    if not x.is_floating_point():
        raise DTypeMismatchError(f"x must have a floating dtype, got {x.dtype}")
    if x.dim() < 1 or (weight is not None and tuple(weight.shape) != (x.shape[-1],)):
        raise ShapeMismatchError(f"expected x [..., d] and weight [d]; got x {list(x.shape)}, weight "
                                 f"{None if weight is None else list(weight.shape)}")
    if weight is not None and weight.device != x.device:
        raise DeviceMismatchError(f"weight is on {weight.device}, x on {x.device}")
    if grad is not None and (grad.shape != x.shape or grad.device != x.device):
        raise ShapeMismatchError(f"grad must have x's shape {list(x.shape)} on {x.device}, got {list(grad.shape)} "
                                 f"on {grad.device}")


def _grad_fakes(x, weight, count: int):
    w_dtype = x.dtype if weight is None else weight.dtype
    grads = [x.new_empty(x.shape[-1], dtype=w_dtype) for _ in range(count - 1)]
    return (x.new_empty(x.shape), *grads)                              # grad_x contiguous, as computed


# ---- LayerNorm ------------------------------------------------------------------------------------

@torch.library.custom_op("attnfx::lrp_layer_norm", mutates_args=(),
                         schema="(Tensor x, Tensor? weight, Tensor? bias, float eps) -> Tensor")
def lrp_layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   eps: float) -> torch.Tensor:
    check_norm(x, weight)
    if backends.choose("lrp_layer_norm", x.device) == "cpp":
        return _cpp.ops().lrp_layer_norm(x, weight, bias, eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


@lrp_layer_norm.register_fake
def _layer_norm_fake(x, weight, bias, eps):
    check_norm(x, weight)
    return x.new_empty(x.shape)


@torch.library.custom_op("attnfx::lrp_layer_norm_backward", mutates_args=(),
                         schema="(Tensor grad, Tensor x, Tensor? weight, float eps)"
                                " -> (Tensor grad_x, Tensor grad_weight, Tensor grad_bias)")
def lrp_layer_norm_backward(grad: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                            eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_norm(x, weight, grad)
    if backends.choose("lrp_layer_norm", x.device) == "cpp":
        return _cpp.ops().lrp_layer_norm_backward(grad, x, weight, eps)
    return tuple(t.contiguous() for t in norm_backward_reference(grad, x, weight, eps, "layer_norm"))


@lrp_layer_norm_backward.register_fake
def _layer_norm_backward_fake(grad, x, weight, eps):
    check_norm(x, weight, grad)
    return _grad_fakes(x, weight, 3)


def _layer_norm_setup(ctx, inputs, output):
    x, weight, bias, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _layer_norm_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x, grad_w, grad_b = torch.ops.attnfx.lrp_layer_norm_backward(grad, x, weight, ctx.eps)
    need = ctx.needs_input_grad
    return grad_x, grad_w if need[1] else None, grad_b if need[2] else None, None


lrp_layer_norm.register_autograd(_layer_norm_backward, setup_context=_layer_norm_setup)


# ---- RMSNorm --------------------------------------------------------------------------------------

@torch.library.custom_op("attnfx::lrp_rms_norm", mutates_args=(), schema="(Tensor x, Tensor? weight, float eps) -> Tensor")
def lrp_rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    check_norm(x, weight)
    if backends.choose("lrp_rms_norm", x.device) == "cpp":
        return _cpp.ops().lrp_rms_norm(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


@lrp_rms_norm.register_fake
def _rms_norm_fake(x, weight, eps):
    check_norm(x, weight)
    return x.new_empty(x.shape)


@torch.library.custom_op("attnfx::lrp_rms_norm_backward", mutates_args=(),
                         schema="(Tensor grad, Tensor x, Tensor? weight, float eps) -> (Tensor grad_x, Tensor grad_weight)")
def lrp_rms_norm_backward(grad: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    check_norm(x, weight, grad)
    if backends.choose("lrp_rms_norm", x.device) == "cpp":
        return _cpp.ops().lrp_rms_norm_backward(grad, x, weight, eps)
    grad_x, grad_w, _ = norm_backward_reference(grad, x, weight, eps, "rms_norm")
    return grad_x.contiguous(), grad_w


@lrp_rms_norm_backward.register_fake
def _rms_norm_backward_fake(grad, x, weight, eps):
    check_norm(x, weight, grad)
    return _grad_fakes(x, weight, 2)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, eps = inputs
    ctx.save_for_backward(x, weight)
    ctx.eps = eps


def _rms_norm_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x, grad_w = torch.ops.attnfx.lrp_rms_norm_backward(grad, x, weight, ctx.eps)
    return grad_x, grad_w if ctx.needs_input_grad[1] else None, None


lrp_rms_norm.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)

for _name, _fake in (("lrp_layer_norm", _layer_norm_fake), ("lrp_layer_norm_backward", _layer_norm_backward_fake),
                     ("lrp_rms_norm", _rms_norm_fake), ("lrp_rms_norm_backward", _rms_norm_backward_fake)):
    _cpp.register_fake(_name, _fake)
