"""nn.MultiheadAttention's Python path, op for op: F.multi_head_attention_forward replayed on
Proxies for the arguments of one call (the branches its flags take are decided here, from the
example values). The decompose pass emits it in place of the opaque call."""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch.fx import Node
from torch.fx.proxy import Proxy

from ..errors import UnsupportedModelError
from ..graph.sites import example_value

_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def dim(proxy: Proxy, val: torch.Tensor, index: int):
    """Size `index` of a tensor: an int when static, else a size() node."""
    size = val.shape[index]
    return int(size) if isinstance(size, int) else proxy.size(index)


def _canonical(mask, val, dtype):
    """F._canonical_mask: a boolean mask becomes 0 / −inf in the query's dtype."""
    if mask is None or val.is_floating_point():
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def mha_forward(p, node: Node):
    """F.multi_head_attention_forward (torch/nn/functional.py), replayed for the arguments of
    this call: (out, weights or None). None (left as it is) where the function itself raises."""
    a = _SIGNATURE.bind(*node.args, **node.kwargs)
    a.apply_defaults()
    a = a.arguments
    extras = [name for name in ("bias_k", "bias_v", "static_k", "static_v") if a[name] is not None]
    if extras or a["add_zero_attn"]:
        raise UnsupportedModelError(
            f"multi-head attention with {', '.join(extras) or 'add_zero_attn'}: attnfx replays "
            "F.multi_head_attention_forward without extra key/value rows, so this layer cannot be a site")
    qv, kv = example_value(a["query"]), example_value(a["key"])
    batched, heads, need_weights, causal = qv.dim() == 3, a["num_heads"], a["need_weights"], a["is_causal"]
    query, key, value, kpm, mask = (p(a[n]) for n in ("query", "key", "value", "key_padding_mask", "attn_mask"))
    kpm_val, mask_val = example_value(a["key_padding_mask"]), example_value(a["attn_mask"])
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        kpm = kpm.unsqueeze(0) if kpm is not None else None
        qv, kv = qv.unsqueeze(1), kv.unsqueeze(1)
    tgt_len, bsz, embed = dim(query, qv, 0), dim(query, qv, 1), int(qv.shape[2])
    src_len = dim(key, kv, 0)
    kpm = _canonical(kpm, kpm_val, qv.dtype)
    if causal and mask is None:
        return None                                        # the function itself raises
    if causal and kpm is None and not need_weights:
        mask = None
    else:
        mask = _canonical(mask, mask_val, qv.dtype)
        causal = causal and kpm is None
    head_dim = embed // heads
    q, k, v = _in_projection(p, a, query, key, value, embed, (tgt_len, bsz), (src_len, bsz))
    if mask is not None and mask_val.dim() == 2:
        mask = mask.unsqueeze(0)
    q = q.view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
    k = k.view(src_len, bsz * heads, head_dim).transpose(0, 1)
    v = v.view(src_len, bsz * heads, head_dim).transpose(0, 1)
    if kpm is not None:
        kpm = kpm.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1).reshape(bsz * heads, 1, src_len)
        mask = kpm if mask is None else mask + kpm
    dropout = a["dropout_p"] if a["training"] else 0.0
    # mask: [1 | b·H, t, s] → [1 | b, 1 | H, t, s], as the SDPA branch views it
    shared = kpm is None and mask_val is not None and (mask_val.dim() == 2 or mask_val.shape[0] == 1)
    mask4 = mask if mask is None else (mask.unsqueeze(0) if shared else mask.view(bsz, heads, -1, src_len))
    q, k, v = (x.view(bsz, heads, -1, head_dim) for x in (q, k, v))
    if need_weights:                     # bmm/baddbmm on [b·H, ·, ·] as 4-D matmuls: the same kernel
        scores = torch.matmul(q * math.sqrt(1.0 / float(head_dim)), k.transpose(-2, -1))
        weights = torch.softmax(scores if mask4 is None else scores + mask4, dim=-1)
        if dropout > 0.0:
            weights = F.dropout(weights, p=dropout)
        z = torch.matmul(weights, v)
    else:
        z = F.scaled_dot_product_attention(q, k, v, mask4, dropout, causal)
    out = F.linear(z.permute(2, 0, 1, 3).reshape(tgt_len * bsz, embed), p(a["out_proj_weight"]),
                   p(a["out_proj_bias"]))
    out = out.view(tgt_len, bsz, -1)
    if need_weights and a["average_attn_weights"]:
        weights = weights.mean(dim=1)
    if not batched:
        out = out.squeeze(1)
        weights = weights.squeeze(0) if need_weights else None
    return out, (weights if need_weights else None)


def _in_projection(p, a: dict, query, key, value, embed: int, q_lead: tuple, k_lead: tuple):
    """q, k, v [·, ·, E] from the packed in_proj weight, or from q/k/v_proj_weight."""
    if not a["use_separate_proj_weight"]:
        return _in_projection_packed(query, key, value, p(a["in_proj_weight"]), p(a["in_proj_bias"]),
                                     embed, q_lead, k_lead)
    bias = p(a["in_proj_bias"])
    chunks = (None, None, None) if bias is None else bias.chunk(3)
    return tuple(F.linear(x, p(a[f"{name}_proj_weight"]), chunks[i])
                 for i, (x, name) in enumerate(((query, "q"), (key, "k"), (value, "v"))))


def _in_projection_packed(q, k, v, w, b, embed: int, q_lead: tuple, k_lead: tuple):
    """F._in_projection_packed, with its unflatten written as a view (same layout) so the value
    projection can be walked back to. *_lead: the input's sizes before E."""
    if k is v and q is k:
        proj = F.linear(q, w, b)
        proj = proj.view(*q_lead, 3, embed).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        return proj[0], proj[1], proj[2]
    if k is v:
        w_split = w.split([embed, embed * 2])
        b_split = (None, None) if b is None else b.split([embed, embed * 2])
        kv = F.linear(k, w_split[1], b_split[1])
        kv = kv.view(*k_lead, 2, embed).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        return F.linear(q, w_split[0], b_split[0]), kv[0], kv[1]
    w_chunks = w.chunk(3)
    b_chunks = (None, None, None) if b is None else b.chunk(3)
    return tuple(F.linear(x, w_chunks[i], b_chunks[i]) for i, x in enumerate((q, k, v)))
