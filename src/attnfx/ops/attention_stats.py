"""`attnfx::attention_stats`: log-sum-exp and attention mass on key spans of every attention row,
without the T×S matrix (retrieval / lookback scores; docs/design.md §4).

    lse, mass = torch.ops.attnfx.attention_stats(q, k, key_mask, spans, causal, sm_scale)

q [b, H, T, d], k [b, Hkv, S, d] (H a multiple of Hkv; k is never expanded), key_mask [b, S]
bool (True = attend), spans [n, 2] int64 (start, end) key ranges. lse [b, H, T] fp32 (natural
log; −inf for a row with no visible key); mass [b, T, H, n] fp32 = Σ_{j∈[start,end)} p_tj (0 for
such a row). Causal is aligned bottom-right: query t sees keys j ≤ t + S − T. These are
attnfx.ops.reference.attention's "lse" and "mass". Statistics: no gradient.
Implementations: "triton" (the attention forward with write_o=False), "cpp" (blockwise over keys,
CPU and CUDA) and "reference".
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backends
from ..errors import DeviceMismatchError, DTypeMismatchError, ShapeMismatchError
from . import _cpp, reference

backends.register("attention_stats", {"triton", "cpp", "reference"})


def stats_reference(q, k, key_mask, spans, causal: bool, sm_scale: float):
    """The oracle itself, asked for statistics only: v with no columns makes its z free."""
    b, H, T, _ = q.shape
    out = reference.attention(q, k, k[..., :0], causal=causal, key_mask=key_mask, sm_scale=sm_scale,
                              spans=spans, write_o=False)
    mass = out.get("mass", q.new_zeros(b, T, H, 0, dtype=torch.float32))
    return out["lse"].float(), mass.float()


def _stats_triton(q, k, key_mask, spans, causal: bool, sm_scale: float):
    from attnfx.kernels.attention import attention_fwd        # imports triton: only when it runs

    b, H, T, _ = q.shape
    out = attention_fwd(q, k, k, causal=causal, key_mask=key_mask, sm_scale=sm_scale, spans=spans, write_o=False)
    return out["lse"], out.get("mass", q.new_zeros(b, T, H, 0, dtype=torch.float32))


def check_stats(q, k, key_mask, spans) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] \
            or k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ShapeMismatchError(f"expected q [b, H, T, d] and k [b, Hkv, S, d] with H a multiple of Hkv; got q "
                                 f"{tuple(q.shape)}, k {tuple(k.shape)}")
    if not q.is_floating_point() or k.dtype != q.dtype:
        raise DTypeMismatchError(f"q and k must share one floating dtype, got {q.dtype} and {k.dtype}")
    if k.device != q.device or (key_mask is not None and key_mask.device != q.device):
        raise DeviceMismatchError(f"k and key_mask must be on q's device {q.device}")
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != (q.shape[0], k.shape[2])):
        raise ShapeMismatchError(f"key_mask must be bool [b, S] = [{q.shape[0]}, {k.shape[2]}], got "
                                 f"{key_mask.dtype} {list(key_mask.shape)}")
    if spans is not None and (spans.dtype != torch.int64 or spans.dim() != 2 or spans.shape[1] != 2):
        raise ShapeMismatchError(f"spans must be int64 [n, 2] (start, end), got {spans.dtype} {list(spans.shape)}")


@torch.library.custom_op("attnfx::attention_stats", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor? key_mask, Tensor? spans, bool causal, float sm_scale)"
                                " -> (Tensor lse, Tensor mass)")
def attention_stats(q: torch.Tensor, k: torch.Tensor, key_mask: Optional[torch.Tensor],
                    spans: Optional[torch.Tensor], causal: bool, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    check_stats(q, k, key_mask, spans)
    impl = backends.choose("attention_stats", q.device)
    if impl == "cpp":
        return _cpp.ops().attention_stats(q, k, key_mask, spans, causal, sm_scale)
    run = _stats_triton if impl == "triton" else stats_reference
    return run(q, k, key_mask, spans, causal, sm_scale)


@attention_stats.register_fake
def _stats_fake(q, k, key_mask, spans, causal, sm_scale):
    check_stats(q, k, key_mask, spans)
    b, H, T, _ = q.shape
    n = 0 if spans is None else spans.shape[0]
    return q.new_empty(b, H, T, dtype=torch.float32), q.new_empty(b, T, H, n, dtype=torch.float32)


_cpp.register_fake("attention_stats", _stats_fake)
