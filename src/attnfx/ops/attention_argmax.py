"""`attnfx::attention_argmax`: each query's most attended key and its probability, without the T×S
matrix (retrieval heads, Wu et al. 2024: a head retrieves when its argmax key is the token copied).

    index, max_prob = torch.ops.attnfx.attention_argmax(q, k, key_mask, causal, sm_scale)

q [b, H, T, d], k [b, Hkv, S, d] (H a multiple of Hkv; query head h reads kv head h // (H / Hkv),
k is never expanded), key_mask [b, S] bool (True = attend). index [b, H, T] int64: the visible key
of highest score s_tj = q_t·k_j·sm_scale, the first on ties, −1 for a row with no visible key;
max_prob [b, H, T] fp32 = exp(s_max − lse) = 1 / Σ_j exp(s_tj − s_max) (0 for such a row). Causal is
aligned bottom-right: query t sees keys j ≤ t + S − T. Statistics: no gradient.
Implementations: "cpp" (blockwise over keys with a running max, its index and Σexp; CPU and CUDA)
and "reference" (attnfx.ops.reference.attention_argmax).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backends
from ..errors import DeviceMismatchError, DTypeMismatchError, ShapeMismatchError
from . import _cpp, reference

backends.register("attention_argmax", {"cpp", "reference"})


def argmax_reference(q, k, key_mask, causal: bool, sm_scale: float):
    return reference.attention_argmax(q, k, causal=causal, key_mask=key_mask, sm_scale=sm_scale)


def check_argmax(q, k, key_mask) -> None:
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


@torch.library.custom_op("attnfx::attention_argmax", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor? key_mask, bool causal, float sm_scale)"
                                " -> (Tensor index, Tensor max_prob)")
def attention_argmax(q: torch.Tensor, k: torch.Tensor, key_mask: Optional[torch.Tensor], causal: bool,
                     sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    check_argmax(q, k, key_mask)
    if backends.choose("attention_argmax", q.device) == "cpp":
        return _cpp.ops().attention_argmax(q, k, key_mask, causal, sm_scale)
    return argmax_reference(q, k, key_mask, causal, sm_scale)


@attention_argmax.register_fake
def _argmax_fake(q, k, key_mask, causal, sm_scale):
    check_argmax(q, k, key_mask)
    b, H, T, _ = q.shape
    return q.new_empty(b, H, T, dtype=torch.int64), q.new_empty(b, H, T, dtype=torch.float32)


_cpp.register_fake("attention_argmax", _argmax_fake)
