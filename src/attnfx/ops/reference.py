"""Plain-torch references of the kernels (docs/design.md §4): materialise everything, no tricks.

`attention(q, k, v, ...)` is the oracle of `src/attnfx/kernels/attention.py`: same arguments, same
outputs, computed from the full [b, H, T, S] probability matrix in fp32.
"""
from __future__ import annotations

import math

import torch


def attention_mask(T: int, S: int, *, causal: bool, key_mask=None, device=None) -> torch.Tensor:
    """[b or 1, 1, T, S] bool, True = visible. Causal is aligned bottom-right (query t sees
    keys j ≤ t + S − T: the KV-cache convention)."""
    visible = torch.ones(1, 1, T, S, dtype=torch.bool, device=device)
    if causal:
        t = torch.arange(T, device=device)[:, None]
        j = torch.arange(S, device=device)[None, :]
        visible = visible & (j <= t + S - T)
    if key_mask is not None:
        visible = visible & key_mask.bool()[:, None, None, :]
    return visible


def attention(q, k, v, *, causal: bool = False, key_mask=None, sm_scale: float | None = None,
              head_scale=None, directions=None, spans=None, write_o: bool = True, write_lse: bool = True):
    """q [b, H, T, d], k/v [b, Hkv, S, d]. Returns {"o", "lse", "readout", "mass"} as the kernel
    does: o in q's dtype (z_h, scaled by head_scale[h]), lse [b, H, T], readout = z_h · u_h
    [b, T, H, K], mass = Σ_{j∈[start,end)} p_tj [b, T, H, n]; fp32 statistics. A row with no
    visible key has z = 0, lse = −inf, mass = 0. Computed in fp32 (fp64 for fp64 inputs)."""
    b, H, T, D = q.shape
    group = H // k.shape[1]
    S = k.shape[2]
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    acc = torch.promote_types(q.dtype, torch.float32)                # fp32, or fp64 for fp64 inputs
    kf = k.to(acc).repeat_interleave(group, dim=1)
    vf = v.to(acc).repeat_interleave(group, dim=1)
    logits = (q.to(acc) @ kf.transpose(-1, -2)) * sm_scale
    visible = attention_mask(T, S, causal=causal, key_mask=key_mask, device=q.device)
    logits = logits.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)                             # [b, H, T]
    probs = torch.exp(logits - lse[..., None]).nan_to_num(0.0)        # rows with nothing visible → 0
    z = probs @ vf
    if head_scale is not None:
        z = z * head_scale.to(acc)[None, :, None, None]
    out = {}
    if write_o:
        out["o"] = z.to(q.dtype)
    if write_lse:
        out["lse"] = lse
    if directions is not None:
        out["readout"] = torch.einsum("bhtd,hdk->bthk", z, directions.to(acc)).contiguous()
    if spans is not None and len(spans):
        j = torch.arange(S, device=q.device)[:, None]
        spans = spans.to(q.device)
        inside = ((j >= spans[:, 0]) & (j < spans[:, 1])).to(acc)       # [S, n], no host sync (traceable)
        out["mass"] = (probs @ inside).transpose(1, 2).contiguous()    # [b, T, H, n]
    return out


def attention_backward(grad_z, q, k, v, *, causal: bool = False, key_mask=None, sm_scale: float | None = None,
                       lrp: bool = False):
    """dq, dk, dv of z = softmax(q kᵀ · scale) v written out (no autograd: it also runs inside a
    custom op, where autograd is off): dv = pᵀ g, ds = p ⊙ (g vᵀ − rowsum(g ⊙ z)), dq = ds k · s,
    dk = dsᵀ q · s, summed over the query heads of each kv head. lrp: × ¼, ¼, ½ (AttnLRP)."""
    b, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    group = H // Hkv
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    acc = torch.promote_types(q.dtype, torch.float32)
    qf, g = q.to(acc), grad_z.to(acc)
    kf = k.to(acc).repeat_interleave(group, dim=1)
    vf = v.to(acc).repeat_interleave(group, dim=1)
    logits = (qf @ kf.transpose(-1, -2)) * sm_scale
    logits = logits.masked_fill(~attention_mask(T, S, causal=causal, key_mask=key_mask, device=q.device), float("-inf"))
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    z = p @ vf
    ds = p * (g @ vf.transpose(-1, -2) - (g * z).sum(-1, keepdim=True))
    dq = ds @ kf * sm_scale
    dk = (ds.transpose(-1, -2) @ qf * sm_scale).reshape(b, Hkv, group, S, D).sum(2)
    dv = (p.transpose(-1, -2) @ g).reshape(b, Hkv, group, S, D).sum(2)
    scales = (0.25, 0.25, 0.5) if lrp else (1.0, 1.0, 1.0)
    return tuple((t * s).to(x.dtype) for t, s, x in zip((dq, dk, dv), scales, (q, k, v)))


def attention_argmax(q, k, *, causal: bool = False, key_mask=None, sm_scale: float | None = None):
    """q [b, H, T, d], k [b, Hkv, S, d] → (index [b, H, T] int64, max_prob [b, H, T] fp32): each
    query's most attended visible key (the first on ties; −1 for a row with no visible key) and its
    softmax probability exp(s_max − lse) (0 for such a row), from the full fp32 probability matrix
    (fp64 for fp64 inputs). Causal and key_mask as `attention_mask`; query head h reads kv head
    h // (H / Hkv)."""
    group = q.shape[1] // k.shape[1]
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    acc = torch.promote_types(q.dtype, torch.float32)
    logits = (q.to(acc) @ k.to(acc).repeat_interleave(group, dim=1).transpose(-1, -2)) * sm_scale
    visible = attention_mask(q.shape[2], k.shape[2], causal=causal, key_mask=key_mask, device=q.device)
    logits = logits.masked_fill(~visible, float("-inf"))
    best, index = logits.max(dim=-1)                                  # torch returns the first maximal index
    lse = torch.logsumexp(logits, dim=-1)
    seen = torch.isfinite(best)
    max_prob = torch.exp(best - lse).nan_to_num(0.0).masked_fill(~seen, 0.0)
    return index.masked_fill(~seen, -1), max_prob.float()
