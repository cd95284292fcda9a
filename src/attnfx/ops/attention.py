"""`attnfx::attention`: the fused attention as a torch.library op (custom_op + register_fake +
register_autograd), dispatched to the Triton kernel or to the plain-torch reference.

    o, lse, readout, mass = torch.ops.attnfx.attention(q, k, v, key_mask, head_scale, directions,
                                                       spans, causal, sm_scale, lrp)

Shapes as in `src/attnfx/kernels/attention.py`; readout [b, T, H, K] and mass [b, T, H, n] are empty (K or
n = 0) when `directions` / `spans` are None. Gradients flow to q, k, v (and `directions`);
lse and mass are statistics without a gradient, head_scale is a steering factor without one.
`lrp=True` applies AttnLRP's attention rule in the backward (grad q, k × ¼, grad v × ½).

Which implementation runs: `set_attention_backend("triton" | "reference" | None)`; None (the
default) is Triton on CUDA and the reference elsewhere. On CPU, "triton" needs
TRITON_INTERPRET=1 set before the kernel module is first imported.

Both ops are `torch.library.triton_op`s. On CUDA, AOT autograd decomposes them into the
`wrap_triton` kernel calls, so Inductor sees and schedules the kernels (and the reference's torch
ops, when that backend is chosen) instead of an opaque call. Elsewhere they stay opaque nodes that
run the CPU kernel registered below — the reference, or Triton's interpreter when forced, which
cannot run on the fake tensors a decomposition would trace.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

from . import backends
from ..errors import DeviceMismatchError, InvalidArgumentError, ShapeMismatchError
from . import reference

ATTENTION_BACKENDS = ("triton", "reference")
backends.register("attention", set(ATTENTION_BACKENDS))


def set_attention_backend(name: str | None) -> None:
    """Force one implementation of attnfx::attention (None: the default order, Triton on CUDA and
    the reference elsewhere): `attnfx.set_backend(name, op="attention")`."""
    if name is not None and name not in ATTENTION_BACKENDS:
        raise InvalidArgumentError(f"attention backend must be one of {ATTENTION_BACKENDS} or None, got {name!r}")
    backends.set_backend(name, op="attention")


def attention_backend(device: torch.device) -> str:
    return backends.choose("attention", device)


def _kernels():
    """The Triton kernels (imports triton: only when used). backends.choose has already refused
    Triton on CPU without TRITON_INTERPRET=1."""
    from attnfx.kernels import attention as kernels

    return kernels


def check_inputs(q, k, v, key_mask=None, head_scale=None, directions=None, spans=None) -> None:
    """Shapes and devices as documented above, or a typed error naming what was expected."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ShapeMismatchError(f"expected q [b, H, T, d] and k, v [b, Hkv, S, d] of one shape; got q "
                                 f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    b, H, _, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or H % k.shape[1]:
        raise ShapeMismatchError(f"k/v {tuple(k.shape)} must share q's batch {b} and head dim {d}, with "
                                 f"q's {H} heads a multiple of their kv heads")
    S = k.shape[2]
    expected = {"key_mask": (key_mask, (b, S)), "head_scale": (head_scale, (H,))}
    if directions is not None:
        expected["directions"] = (directions, (H, d, directions.shape[-1]))
    if spans is not None:
        expected["spans"] = (spans, (spans.shape[0], 2))
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ShapeMismatchError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")
    for name, tensor in (("k", k), ("v", v), ("key_mask", key_mask), ("head_scale", head_scale),
                         ("directions", directions)):
        if tensor is not None and tensor.device != q.device:
            raise DeviceMismatchError(f"{name} is on {tensor.device}, q on {q.device}")


def _empty_extras(q, directions, spans):
    b, H, T, _ = q.shape
    readout = q.new_empty(b, T, H, 0, dtype=torch.float32) if directions is None else None
    mass = q.new_empty(b, T, H, 0, dtype=torch.float32) if spans is None else None
    return readout, mass


def _forward(q, k, v, key_mask, head_scale, directions, spans, causal, sm_scale, *, backend, traceable):
    check_inputs(q, k, v, key_mask, head_scale, directions, spans)
    kw = dict(causal=causal, key_mask=key_mask, sm_scale=sm_scale, head_scale=head_scale,
              directions=directions, spans=spans)
    if backend == "triton":
        out = _kernels().attention_fwd(q, k, v, traceable=traceable, **kw)
    else:
        out = reference.attention(q, k, v, **kw)
    readout, mass = _empty_extras(q, directions, spans)
    return (out["o"], out["lse"], out["readout"] if readout is None else readout,
            out["mass"] if mass is None else mass)


def _attention_traceable(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor],
              head_scale: Optional[torch.Tensor], directions: Optional[torch.Tensor],
              spans: Optional[torch.Tensor], causal: bool, sm_scale: float, lrp: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Traceable body: runs on CUDA, and is the fake everywhere (on CPU, only ever on fake tensors:
    the reference gives the shapes, whichever backend the CPU kernel below will run)."""
    backend = attention_backend(q.device) if q.device.type == "cuda" else "reference"
    return _forward(q, k, v, key_mask, head_scale, directions, spans, causal, sm_scale,
                    backend=backend, traceable=True)


attention = torch.library.triton_op("attnfx::attention", _attention_traceable, mutates_args=())


@attention.register_kernel("cpu")
def _(q, k, v, key_mask, head_scale, directions, spans, causal, sm_scale, lrp):
    return _forward(q, k, v, key_mask, head_scale, directions, spans, causal, sm_scale,
                    backend=attention_backend(q.device), traceable=False)


def _setup_context(ctx, inputs, output):
    q, k, v, key_mask, head_scale, directions, spans, causal, sm_scale, lrp = inputs
    o, lse, _, _ = output
    ctx.save_for_backward(q, k, v, o, lse, key_mask, head_scale, directions)
    ctx.causal, ctx.sm_scale, ctx.lrp = causal, sm_scale, lrp


def _backward(ctx, grad_o, grad_lse, grad_readout, grad_mass):
    q, k, v, o, lse, key_mask, head_scale, directions = ctx.saved_tensors
    acc = torch.promote_types(q.dtype, torch.float32)                 # fp32, or fp64 for fp64 inputs
    g = grad_o.to(acc)                                                 # gradient at the returned o
    grad_directions = None
    if directions is not None:
        g = g + torch.einsum("bthk,hdk->bhtd", grad_readout.to(acc), directions.to(acc))
        grad_directions = torch.einsum("bhtd,bthk->hdk", o.to(acc), grad_readout.to(acc)).to(directions.dtype)
    delta = (g * o.to(acc)).sum(-1)                                    # Σ grad ⊙ z, head scale included
    if head_scale is not None:
        g = g * head_scale.to(acc)[None, :, None, None]                # gradient at the unscaled z
    dq, dk, dv = torch.ops.attnfx.attention_backward(g.to(q.dtype), q, k, v, o, lse, key_mask, delta,
                                                     ctx.causal, ctx.sm_scale, ctx.lrp)
    return dq, dk, dv, None, None, grad_directions, None, None, None, None


def _backward_impl(grad_z, q, k, v, o, lse, key_mask, delta, causal, sm_scale, lrp, *, traceable):
    if attention_backend(q.device) == "triton":
        dq, dk, dv, _ = _kernels().attention_bwd(grad_z, q, k, v, o, lse, causal=causal, key_mask=key_mask,
                                                         sm_scale=sm_scale, lrp=lrp, delta=delta, traceable=traceable)
        return dq, dk, dv
    return reference.attention_backward(grad_z, q, k, v, causal=causal, key_mask=key_mask, sm_scale=sm_scale, lrp=lrp)


def _attention_backward_traceable(grad_z: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, key_mask: Optional[torch.Tensor], delta: torch.Tensor, causal: bool,
                       sm_scale: float, lrp: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv given the gradient at the unscaled z (an op of its own, so that AOT autograd
    traces the backward as one node, or on CUDA as the kernels, instead of the reference's ops)."""
    if q.device.type != "cuda":
        return tuple(t.new_empty(t.shape) for t in (q, k, v))       # fake on CPU: contiguous, as computed
    return _backward_impl(grad_z, q, k, v, o, lse, key_mask, delta, causal, sm_scale, lrp, traceable=True)


attention_backward = torch.library.triton_op("attnfx::attention_backward", _attention_backward_traceable,
                                             mutates_args=())


@attention_backward.register_kernel("cpu")
def _(grad_z, q, k, v, o, lse, key_mask, delta, causal, sm_scale, lrp):
    return _backward_impl(grad_z, q, k, v, o, lse, key_mask, delta, causal, sm_scale, lrp, traceable=False)


def _decompose_on_cuda(op, traceable):
    """AOT autograd traces ops under FunctionalTensorMode; triton_op then inlines the body. On CPU
    the body would have to run Triton's interpreter (or the reference) on fake tensors, so there
    the op stays one opaque node that runs the CPU kernel above."""
    def handler(mode, func, types, args, kwargs):
        if any(t not in (torch.Tensor, FunctionalTensor) and not issubclass(t, torch._subclasses.FakeTensor)
               for t in types):
            return NotImplemented
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if tensors and tensors[0].device.type == "cuda":
            with mode:
                return traceable(*args, **kwargs)
        return mode.__torch_dispatch__(func, types, args, kwargs)
    op.register_torch_dispatch(FunctionalTensorMode, handler)


attention.register_autograd(_backward, setup_context=_setup_context)
_decompose_on_cuda(attention, _attention_traceable)
_decompose_on_cuda(attention_backward, _attention_backward_traceable)


def fused_attention(q, k, v, *, causal=False, key_mask=None, sm_scale=None, head_scale=None, directions=None,
                    spans=None, lrp=False):
    """The op with keyword arguments and the default scale 1/√d."""
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    return torch.ops.attnfx.attention(q, k, v, key_mask, head_scale, directions, spans, causal, sm_scale, lrp)
