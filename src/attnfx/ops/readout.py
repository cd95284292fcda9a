"""`attnfx::head_readout` and `attnfx::head_contrib`: per-head projections of the head outputs
z (docs/design.md §2), as torch.library ops (custom_op + register_fake + register_autograd).

    readout = torch.ops.attnfx.head_readout(z, u)                   # fp32 [b, t, H, K]
    contrib = torch.ops.attnfx.head_contrib(z, w_o, heads, positions)   # z's dtype [b, P, n, d_model]

z [b, t, H, d] is the head output; u [H, d, K] holds K readout directions per head
(u_h = W_O[:, h]ᵀ r); w_o [d_model, H·d] is the output projection in nn.Linear's layout.
contrib[:, p, i] = z[:, positions[p], heads[i]] @ w_o[:, h·d:(h+1)·d]ᵀ (positions None: all).
Both accumulate in fp32. Implementations: "cpp" (attnfx._C, CPU and CUDA) and "reference"
(attnfx.ops.backends chooses). Gradients flow to z and u / w_o.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import backends
from ..errors import DeviceMismatchError, DTypeMismatchError, InvalidArgumentError, ShapeMismatchError, SiteIndexError
from . import _cpp

backends.register("head_readout", {"cpp", "reference"})
backends.register("head_contrib", {"cpp", "reference"})


def readout_reference(z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bthd,hdk->bthk", z.float(), u.float()).contiguous()


def contrib_reference(z: torch.Tensor, w_o: torch.Tensor, heads: Sequence[int],
                      positions: Optional[Sequence[int]]) -> torch.Tensor:
    b, t, H, d = z.shape
    pos = list(range(t)) if positions is None else list(positions)
    picked = z.float()[:, pos][:, :, list(heads)]                      # [b, P, n, d]
    blocks = w_o.float().view(-1, H, d)[:, list(heads)]                # [d_model, n, d]
    return torch.einsum("bpnd,mnd->bpnm", picked, blocks).to(z.dtype).contiguous()


def _check_floating(**tensors) -> None:
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise DTypeMismatchError(f"{name} must have a floating dtype, got {t.dtype}")


def check_readout(z, u) -> None:
    if z.dim() != 4 or u.dim() != 3 or tuple(u.shape[:2]) != (z.shape[2], z.shape[3]):
        raise ShapeMismatchError(f"expected z [b, t, H, d] and u [H, d, K] of the same H and d; got z "
                                 f"{tuple(z.shape)}, u {tuple(u.shape)}")
    _check_floating(z=z, u=u)
    if u.device != z.device:
        raise DeviceMismatchError(f"u is on {u.device}, z on {z.device}")


def check_contrib(z, w_o, heads, positions) -> None:
    if z.dim() != 4 or w_o.dim() != 2 or w_o.shape[1] != z.shape[2] * z.shape[3]:
        raise ShapeMismatchError(f"expected z [b, t, H, d] and w_o [d_model, H*d]; got z {tuple(z.shape)}, "
                                 f"w_o {tuple(w_o.shape)}")
    _check_floating(z=z, w_o=w_o)
    if w_o.device != z.device:
        raise DeviceMismatchError(f"w_o is on {w_o.device}, z on {z.device}")
    H, t = z.shape[2], z.shape[1]
    if any(not 0 <= h < H for h in heads):
        raise SiteIndexError(f"heads must lie in [0, {H}), got {list(heads)}")
    if positions is not None and any(not 0 <= p < t for p in positions):
        raise InvalidArgumentError(f"positions must lie in [0, {t}), got {list(positions)}")


@torch.library.custom_op("attnfx::head_readout", mutates_args=(), schema="(Tensor z, Tensor u) -> Tensor")
def head_readout(z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    check_readout(z, u)
    if backends.choose("head_readout", z.device) == "cpp":
        return _cpp.ops().head_readout(z, u)
    return readout_reference(z, u)


@head_readout.register_fake
def _readout_fake(z, u):
    check_readout(z, u)
    return z.new_empty(*z.shape[:3], u.shape[-1], dtype=torch.float32)


def _readout_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _readout_backward(ctx, grad):
    z, u = ctx.saved_tensors
    grad_z = grad_u = None
    if ctx.needs_input_grad[0]:     # the same contraction with u transposed: [H, K, d]
        grad_z = torch.ops.attnfx.head_readout(grad, u.transpose(1, 2)).to(z.dtype)
    if ctx.needs_input_grad[1]:
        grad_u = torch.einsum("bthd,bthk->hdk", z.float(), grad.float()).to(u.dtype)
    return grad_z, grad_u


head_readout.register_autograd(_readout_backward, setup_context=_readout_setup)


@torch.library.custom_op("attnfx::head_contrib", mutates_args=(),
                         schema="(Tensor z, Tensor w_o, int[] heads, int[]? positions) -> Tensor")
def head_contrib(z: torch.Tensor, w_o: torch.Tensor, heads: Sequence[int],
                 positions: Optional[Sequence[int]]) -> torch.Tensor:
    check_contrib(z, w_o, heads, positions)
    if backends.choose("head_contrib", z.device) == "cpp":
        return _cpp.ops().head_contrib(z, w_o, heads, positions)
    return contrib_reference(z, w_o, heads, positions)


@head_contrib.register_fake
def _contrib_fake(z, w_o, heads, positions):
    check_contrib(z, w_o, heads, positions)
    P = z.shape[1] if positions is None else len(positions)
    return z.new_empty(z.shape[0], P, len(heads), w_o.shape[0])


def _contrib_setup(ctx, inputs, output):
    z, w_o, heads, positions = inputs
    ctx.save_for_backward(z, w_o)
    ctx.heads, ctx.positions = list(heads), positions


def _contrib_backward(ctx, grad):
    """Scatters grad back to the picked (position, head) rows of z and column blocks of w_o;
    repeated positions or heads accumulate."""
    z, w_o = ctx.saved_tensors
    b, t, H, d = z.shape
    pos = torch.arange(t, device=z.device) if ctx.positions is None else torch.tensor(ctx.positions, device=z.device)
    heads = torch.tensor(ctx.heads, dtype=torch.long, device=z.device)
    g = grad.float()                                                    # [b, P, n, d_model]
    grad_z = grad_w = None
    if ctx.needs_input_grad[0]:
        rows = torch.einsum("bpnm,mnd->bpnd", g, w_o.float().view(-1, H, d)[:, heads])
        index = (torch.arange(b, device=z.device)[:, None, None], pos[None, :, None], heads[None, None, :])
        grad_z = z.new_zeros(z.shape, dtype=torch.float32).index_put_(index, rows, accumulate=True).to(z.dtype)
    if ctx.needs_input_grad[1]:
        blocks = torch.einsum("bpnm,bpnd->mnd", g, z.float()[:, pos][:, :, heads])
        grad_w = w_o.new_zeros(w_o.shape[0], H, d, dtype=torch.float32).index_add_(1, heads, blocks)
        grad_w = grad_w.view(w_o.shape).to(w_o.dtype)
    return grad_z, grad_w, None, None


head_contrib.register_autograd(_contrib_backward, setup_context=_contrib_setup)
_cpp.register_fake("head_readout", _readout_fake)
_cpp.register_fake("head_contrib", _contrib_fake)
