"""AtP*'s QK fix (Kramár et al. 2024): the effect of patching one query or one key, with the
attention softmax recomputed exactly and the rest linearised from the probabilities on:

    effect ≈ Σ_t (A'_t − A_t) V · g_t          g_t = ∂metric/∂z_t of the head, V its values

Query t of head h changes row t only: A'_t = softmax(Λ_t + s·(q'_t − q_t)·Kᵀ).
Key j changes column j of every row: with u_tj = A_tj (exp(s·q_t·(k'_j − k_j)) − 1) and
f = u / (1 + u), the new row is A_t / (1 + u) except at j, so (A'_t − A_t) V = f_tj (v_j − z_t).
Masked logits (−inf) stay masked: their probability is 0, so u = 0.
"""
from __future__ import annotations

import torch


def _probs(scores: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores, -1).nan_to_num(0.0)          # a row with nothing visible: 0


def _layer(kind, q, k, v, scores, q_new, k_new, g, scale) -> torch.Tensor:
    """One layer: q, g [b, H, T, d]; k, v [b, Hk, S, d]; scores [b, H, T, S] → [b, T or S, H or Hk]."""
    group = q.shape[1] // k.shape[1]
    k_rep, v_rep = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    probs = _probs(scores)
    if kind == "queries":
        moved = scores + scale * (q_new - q) @ k_rep.transpose(-1, -2)
        change = (_probs(moved) - probs) @ v_rep                               # [b, H, T, d]
        return (change * g).sum(-1).transpose(1, 2)                           # [b, T, H]
    z = probs @ v_rep
    shift = scale * q @ (k_new - k).repeat_interleave(group, 1).transpose(-1, -2)   # [b, H, T, S]
    u = probs * torch.expm1(shift)
    f = 1.0 - 1.0 / (1.0 + u)
    vg = g @ v_rep.transpose(-1, -2)                                          # v_j · g_t   [b, H, T, S]
    zg = (z * g).sum(-1, keepdim=True)                                        # z_t · g_t   [b, H, T, 1]
    per_head = (f * (vg - zg)).sum(2)                                         # [b, H, S]
    b, heads, S = per_head.shape
    return per_head.reshape(b, heads // group, group, S).sum(2).transpose(1, 2)   # [b, S, Hk]


def estimate(kind: str, clean: dict, corrupt: dict, grad_z: torch.Tensor, scales: list):
    """Per-example estimates [L, b, t, H] ("queries") or [L, b, S, Hk] ("keys"), each position
    patched alone. clean: captured "queries", "keys", "values" ([L, b, t, H, d]) and "scores"
    ([L, b, H, T, S]); corrupt: the patched kind; grad_z: [L, b, t, H, d]."""
    if any(scale is None for scale in scales):
        raise ValueError("the QK fix needs each site's softmax scale; a site has a non-constant scale")
    heads = lambda x: x.transpose(1, 2)                                       # noqa: E731  [b, t, H, d] → [b, H, t, d]
    out = []
    for layer, scale in enumerate(scales):
        q, k, v = (heads(clean[name][layer]) for name in ("queries", "keys", "values"))
        new = heads(corrupt[kind][layer])
        acc = torch.promote_types(q.dtype, torch.float32)
        args = [t.to(acc) for t in (q, k, v, clean["scores"][layer])]
        q_new = new.to(acc) if kind == "queries" else None
        k_new = new.to(acc) if kind == "keys" else None
        out.append(_layer(kind, *args, q_new, k_new, heads(grad_z[layer]).to(acc), scale))
    return torch.stack(out)
