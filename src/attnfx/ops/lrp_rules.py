"""AttnLRP's elementwise rules as torch.library ops (DESIGN §3), plain-torch references.

* lrp_act(x, act, eps): forward f(x); backward the identity rule, grad_x = grad · f(x) / stab(x)
  with stab(x) = x + eps · (x ≥ 0 ? 1 : −1) (so R_x = x ⊙ grad_x = f(x) ⊙ grad = R_y)
* lrp_layer_norm / lrp_rms_norm: forward the norm; backward with σ held constant (identity rule
  on the normaliser): grad_x = (g·w − mean(g·w)) / σ, resp. g·w / rms
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError

ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu,
               "tanh": torch.tanh, "relu": F.relu}


def _act(act: str):
    if act not in ACTIVATIONS:
        raise InvalidArgumentError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
    return ACTIVATIONS[act]


def stabilize(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x + eps * torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def act_reference(x, act, eps):
    return _act(act)(x)


def act_backward_reference(grad, x, act, eps):
    xf = x.float()
    return (grad.float() * _act(act)(xf) / stabilize(xf, eps)).to(x.dtype)


@torch.library.custom_op("attnfx::lrp_act", mutates_args=())
def lrp_act(x: torch.Tensor, act: str, eps: float) -> torch.Tensor:
    return act_reference(x, act, eps)


@lrp_act.register_fake
def _(x, act, eps):
    _act(act)
    return torch.empty_like(x)


@torch.library.custom_op("attnfx::lrp_act_backward", mutates_args=())
def lrp_act_backward(grad: torch.Tensor, x: torch.Tensor, act: str, eps: float) -> torch.Tensor:
    return act_backward_reference(grad, x, act, eps)


@lrp_act_backward.register_fake
def _(grad, x, act, eps):
    return torch.empty_like(x)


def _act_setup(ctx, inputs, output):
    x, act, eps = inputs
    ctx.save_for_backward(x)
    ctx.act, ctx.eps = act, eps


def _act_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return torch.ops.attnfx.lrp_act_backward(grad, x, ctx.act, ctx.eps), None, None


lrp_act.register_autograd(_act_backward, setup_context=_act_setup)


def _stats(x, kind, eps):
    xf = x.float()
    if kind == "layer_norm":
        mean = xf.mean(-1, keepdim=True)
        return mean, torch.sqrt(xf.var(-1, unbiased=False, keepdim=True) + eps)
    return None, torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


def norm_backward_reference(grad, x, weight, eps, kind):
    """(grad_x, grad_weight, grad_bias) with σ held constant; grad_x in x's dtype."""
    mean, sigma = _stats(x, kind, eps)
    g = grad.float()
    gw = g * weight.float() if weight is not None else g
    if kind == "layer_norm":
        gw = gw - gw.mean(-1, keepdim=True)
    grad_x = (gw / sigma).to(x.dtype)
    x_hat = (x.float() - mean) / sigma if mean is not None else x.float() / sigma
    dims = tuple(range(x.dim() - 1))
    grad_w = (g * x_hat).sum(dims).to(weight.dtype) if weight is not None else None
    grad_b = g.sum(dims) if kind == "layer_norm" else None
    return grad_x, grad_w, grad_b


@torch.library.custom_op("attnfx::lrp_layer_norm", mutates_args=())
def lrp_layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


@lrp_layer_norm.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x)


@torch.library.custom_op("attnfx::lrp_rms_norm", mutates_args=())
def lrp_rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


@lrp_rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


def _norm_setup(ctx, inputs, output):
    ctx.kind = "layer_norm" if len(inputs) == 4 else "rms_norm"
    x, weight = inputs[0], inputs[1]
    ctx.eps = inputs[-1]
    ctx.save_for_backward(x, weight)


def _norm_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x, grad_w, grad_b = norm_backward_reference(grad, x, weight, ctx.eps, ctx.kind)
    if ctx.kind == "layer_norm":
        return grad_x, grad_w, (grad_b.to(grad.dtype) if grad_b is not None else None), None
    return grad_x, grad_w, None


lrp_layer_norm.register_autograd(_norm_backward, setup_context=_norm_setup)
lrp_rms_norm.register_autograd(_norm_backward, setup_context=_norm_setup)
