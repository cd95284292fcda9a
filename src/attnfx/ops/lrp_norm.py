"""`attnfx::lrp_layer_norm` and `attnfx::lrp_rms_norm`: normalisations whose backward holds the
normaliser constant — AttnLRP's identity rule on σ (Achtibat et al. 2024, §3.3; DESIGN §3).

    y = torch.ops.attnfx.lrp_layer_norm(x, weight, bias, eps)   # = F.layer_norm over the last dim
        σ = √(var_biased(x) + eps),  x̂ = (x − mean(x)) / σ
        grad_x = (g·w − mean_last(g·w)) / σ,  grad_w = Σ g·x̂,  grad_b = Σ g
    y = torch.ops.attnfx.lrp_rms_norm(x, weight, eps)           # = F.rms_norm over the last dim
        rms = √(mean(x²) + eps),  grad_x = g·w / rms,  grad_w = Σ g·x / rms

(Σ over every leading dim.) The backwards are ops of their own, `attnfx::lrp_layer_norm_backward`
and `attnfx::lrp_rms_norm_backward(grad, x, weight, eps)`; grad_w (and grad_b) come in weight's
dtype, or x's when weight is None. Implementations: "cpp" (attnfx._C: forwards call ATen,
backwards are one fused pass over rows; CPU and CUDA) and "reference".
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import backends
from ..errors import DeviceMismatchError, DTypeMismatchError, ShapeMismatchError
from . import _cpp

backends.register("lrp_layer_norm", {"cpp", "reference"}, cpp_ops=("lrp_layer_norm", "lrp_layer_norm_backward"))
backends.register("lrp_rms_norm", {"cpp", "reference"}, cpp_ops=("lrp_rms_norm", "lrp_rms_norm_backward"))


def norm_backward_reference(grad, x, weight, eps: float, centre: bool):
    """(grad_x, grad_w, grad_b) of LayerNorm (centre) or RMSNorm with the normaliser detached."""
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
    return tuple(t.contiguous() for t in norm_backward_reference(grad, x, weight, eps, centre=True))


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
    grad_x, grad_w, _ = norm_backward_reference(grad, x, weight, eps, centre=False)
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
