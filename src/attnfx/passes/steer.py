"""Steering pass: per-head runtime knobs read from state tensors (no recompiles).

For layer l with H query heads, Hkv kv heads and z = attention(q, k, v):

    q  ← q · q_scale[l, h]                                 (SHIPS; equal to scaling before RoPE,
                                                            which is linear in q)
    v  ← a_g · (c_g · v + (1 − c_g) · b_V,g)               kv head g, a = v_scale, c = v_scale_unbiased
    z  ← (1 − w_h) · z_scale[l, h] · z + w_h · source[l, h]   w = z_replace (ablation / patch-in)

Scaling v with its bias (a) equals scaling z of every query head of the group, because rows of
A sum to 1; the bias-free form (c) keeps b_V, as TransformerLens and Yu et al. 2023 do. With all
state at identity every inserted op is exact (x · 1 + 0), so outputs are unchanged bit for bit.
"""
from __future__ import annotations

import operator

from torch.fx import GraphModule, Node

from ..sites import AttentionSite, example_value
from ._build import call, replace_operand


def apply(gm: GraphModule, sites: list[tuple[int, AttentionSite]], state: dict[str, Node]) -> dict[int, Node]:
    """Rewrite every site; returns the steered z node of each layer (for the record pass)."""
    steered = {}
    for layer, site in sites:
        with gm.graph.inserting_before(site.q_user):
            _steer_query(gm, layer, site, state)
        with gm.graph.inserting_before(site.attn):
            _steer_value(gm, layer, site, state)
        steered[layer] = _steer_z(gm, layer, site, state)
    return steered


def _head_coef(g, row: Node, dtype, heads: int, repeat: int = 1) -> Node:
    """[H] fp32 state row → [1, H·repeat, 1, 1] in the activation dtype."""
    if repeat > 1:
        row = call(g, "repeat_interleave", row, repeat)
    return call(g, "view", call(g, "to", row, dtype), 1, heads * repeat, 1, 1)


def _steer_query(gm, layer, site: AttentionSite, state):
    g = gm.graph
    dtype = example_value(site.q).dtype
    coef = _head_coef(g, call(g, operator.getitem, state["q_scale"], layer), dtype, site.num_heads)
    q = call(g, operator.mul, site.q, coef)
    q.meta["example_value"] = example_value(site.q)           # same shape and dtype: later passes read it
    replace_operand(site.q_user, site.q, q, 0, "query")


def _steer_value(gm, layer, site: AttentionSite, state):
    g = gm.graph
    val = example_value(site.v)
    heads_v = int(val.shape[1])
    repeat = heads_v // site.num_kv_heads
    a = call(g, operator.getitem, state["v_scale"], layer)             # [Hkv]
    c = call(g, operator.getitem, state["v_scale_unbiased"], layer)
    v = call(g, operator.mul, site.v, _head_coef(g, call(g, operator.mul, a, c), val.dtype, site.num_kv_heads, repeat))
    if site.v_bias is not None:
        bias = _per_head_value_bias(g, site)                           # [X, d], X ∈ {Hkv, Hv}
        rep_b = heads_v // int(example_value(site.v_bias_chain[-1]).shape[1]) if site.v_bias_chain else 1
        if rep_b > 1:
            bias = call(g, "repeat_interleave", bias, rep_b, dim=0)
        keep = call(g, operator.mul, a, call(g, operator.sub, 1.0, c))    # a·(1 − c)
        coef = call(g, "view", call(g, "to", call(g, "repeat_interleave", keep, repeat), val.dtype), heads_v, 1)
        term = call(g, "view", call(g, operator.mul, call(g, "to", bias, val.dtype), coef), 1, heads_v, 1, site.head_dim)
        v = call(g, operator.add, v, term)
    value_index = 2 if site.pattern == "sdpa_call" else 1
    v.meta["example_value"] = val
    replace_operand(site.attn, site.v, v, value_index, "value")


def _per_head_value_bias(g, site: AttentionSite) -> Node:
    """Replay the view chain producer → v on the expanded bias: b_V laid out as v, then [X, d]."""
    producer = site.v_bias_chain[0].args[0] if site.v_bias_chain else site.v
    node = call(g, "expand_as", site.v_bias, producer)
    for original in site.v_bias_chain:
        args = (node,) + tuple(original.args[1:])
        target = "reshape" if original.target == "view" else original.target
        node = (g.call_method(target, args, dict(original.kwargs)) if original.op == "call_method"
                else g.call_function(target, args, dict(original.kwargs)))
    return call(g, operator.getitem, node, (0, slice(None), 0, slice(None)))


def _steer_z(gm, layer, site: AttentionSite, state) -> Node:
    g = gm.graph
    z = site.attn
    dtype = example_value(z).dtype
    users = list(z.users)
    with g.inserting_before(z.next):
        scale = call(g, operator.getitem, state["z_scale"], layer)
        weight = call(g, operator.getitem, state["z_replace"], layer)
        keep = _head_coef(g, call(g, operator.mul, scale, call(g, operator.sub, 1.0, weight)), dtype, site.num_heads)
        source = call(g, "to", call(g, "permute", call(g, operator.getitem, state["z_source"], layer), 0, 2, 1, 3), dtype)
        mixed = call(g, operator.mul, source, _head_coef(g, weight, dtype, site.num_heads))
        new_z = call(g, operator.add, call(g, operator.mul, z, keep), mixed)
    for user in users:
        user.replace_input_with(z, new_z)
    if example_value(z) is not None:
        new_z.meta["example_value"] = example_value(z)      # same shape and dtype: later passes read it
    return new_z
