"""Steering pass: per-head runtime knobs read from state tensors (no recompiles).

For layer l with H query heads, Hkv kv heads and z = attention(q, k, v):

    q  ← q · q_scale[l, h]                                 (SHIPS; equal to scaling before RoPE,
                                                            which is linear in q)
    v  ← a_g · (c_g · v + (1 − c_g) · κ_g)                 kv head g, a = v_scale, c = v_scale_unbiased
    z  ← (1 − w_h) · z_scale[l, h] · z + w_h · source[l, h]   w = z_replace (ablation / patch-in)

With Spec.positions each knob acts only at its positions (passes/positions.py): a scale s becomes
1 + (s − 1)·m and a replacement weight w becomes w·m, m ∈ {0, 1} per (row, head, position) —
query positions for q and z, key positions for v.

Scaling v with its bias (a) equals scaling z of every query head of the group, because rows of
A sum to 1. The bias-free form (c) scales only the part of v that depends on the normalised
input, as TransformerLens (whose fold_ln moves the norm's β·W_V into b_V before b_V is folded
out) and Yu et al. 2023 do: with the norm feeding v being y = x̂·γ + β and v = y·W_V + b_V, the
constant part is κ = β·W_V + b_V (κ = b_V under RMSNorm or without a norm). κ is computed in the
graph from the parameter nodes, so it is exact for every instance sharing the graph. With all
state at identity every inserted op is exact (x · 1 + 0), so outputs are unchanged bit for bit.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from ..graph.norms import norm_feeding
from ..graph.sites import AttentionSite, example_value, value_operand
from ._build import call, replace_operand
from .positions import at_positions, head_mask


def apply(gm: GraphModule, sites: list[tuple[int, AttentionSite]], state: dict[str, Node], *,
          value_unbiased: bool = True, positions: bool = False, cross: frozenset = frozenset()) -> dict[int, Node]:
    """Rewrite every site; returns the steered z node of each layer (for the record pass).
    value_unbiased=False leaves κ out: exact while every v_scale_unbiased is 1 (its term is
    a·(1 − c)·κ = 0), and it saves a vector-matrix product per layer on every call (at decode
    with batch 1, as much as the value projection itself). positions: the knobs read their
    position groups (`cross`: the layers whose keys are another stream's, at positions 0 … S − 1)."""
    steered = {}
    for layer, site in sites:
        where = _Where(gm.graph, state, site, layer in cross) if positions else None
        with gm.graph.inserting_before(site.q_user):
            _steer_query(gm, layer, site, state, where)
        with gm.graph.inserting_before(site.v_user):
            _steer_value(gm, layer, site, state, value_unbiased, where)
        steered[layer] = _steer_z(gm, layer, site, state, where)
    return steered


class _Where:
    """A site's position masks per head, built where first needed: query positions for q and z,
    key positions for v."""

    def __init__(self, g, state, site: AttentionSite, cross: bool):
        self.g, self.state, self.site, self.cross = g, state, site, cross

    def queries(self, knob: str, layer: int, heads: int) -> Node:
        g = self.g
        t = call(g, "size", self.site.q, 2)
        end = call(g, operator.add, self.state["where_offset"], t)
        return head_mask(g, self.state, _row(g, self.state[knob], layer, heads, self.site.head_offset), end, t)

    def keys(self, knob: str, layer: int, repeat: int) -> Node:
        g, site = self.g, self.site
        s = call(g, "size", site.v, 2)
        offset = self.state["where_offset"]
        end = (call(g, operator.add, call(g, operator.mul, offset, 0), s) if self.cross
               else call(g, operator.add, offset, call(g, "size", site.q, 2)))
        return head_mask(g, self.state, _row(g, self.state[knob], layer, site.num_kv_heads, site.kv_head_offset),
                         end, s, repeat)


def _fp32_coef(g, row: Node, heads: int) -> Node:
    return call(g, "view", call(g, "to", row, torch.float32), 1, heads, 1, 1)


def _row(g, state: Node, layer: int, heads: int, first: int = 0) -> Node:
    """The layer's row of a per-head state [L, H_max], cut to its own heads (H_max when layers
    differ in heads; a full slice, so bit-exact, otherwise); under tensor parallelism, to this
    process's heads first … first + heads − 1."""
    return call(g, operator.getitem, state, (layer, slice(first or None, first + heads)))


def _head_coef(g, row: Node, dtype, heads: int, repeat: int = 1) -> Node:
    """[H] fp32 state row → [1, H·repeat, 1, 1] in the activation dtype."""
    if repeat > 1:
        row = call(g, "repeat_interleave", row, repeat)
    return call(g, "view", call(g, "to", row, dtype), 1, heads * repeat, 1, 1)


def _steer_query(gm, layer, site: AttentionSite, state, where: _Where | None):
    g = gm.graph
    dtype = example_value(site.q).dtype
    row = _row(g, state["q_scale"], layer, site.num_heads, site.head_offset)
    if where is None:
        coef = _head_coef(g, row, dtype, site.num_heads)
    else:
        mask = where.queries("at_q_scale", layer, site.num_heads)
        coef = call(g, "to", at_positions(g, _fp32_coef(g, row, site.num_heads), mask, 1.0), dtype)
    q = call(g, operator.mul, site.q, coef)
    q.meta["example_value"] = example_value(site.q)           # same shape and dtype: later passes read it
    replace_operand(site.q_user, site.q, q, 0, "query")


def _steer_value(gm, layer, site: AttentionSite, state, value_unbiased: bool, where: _Where | None):
    g = gm.graph
    val = example_value(site.v)
    heads_v = int(val.shape[1])
    repeat = heads_v // site.num_kv_heads
    a = _row(g, state["v_scale"], layer, site.num_kv_heads, site.kv_head_offset)              # [Hkv]
    c = _row(g, state["v_scale_unbiased"], layer, site.num_kv_heads, site.kv_head_offset)
    if where is not None:                                                # per key position: [B, Hv, S, 1]
        a = at_positions(g, _fp32_coef(g, call(g, "repeat_interleave", a, repeat), heads_v),
                         where.keys("at_v_scale", layer, repeat), 1.0)
        c = at_positions(g, _fp32_coef(g, call(g, "repeat_interleave", c, repeat), heads_v),
                         where.keys("at_v_scale_unbiased", layer, repeat), 1.0)
        v = call(g, operator.mul, site.v, call(g, "to", call(g, operator.mul, a, c), val.dtype))
    else:
        v = call(g, operator.mul, site.v, _head_coef(g, call(g, operator.mul, a, c), val.dtype, site.num_kv_heads, repeat))
    kappa = _value_constant(g, site) if value_unbiased else None
    if kappa is not None:
        const = _per_head(g, site, kappa)                              # [X, d], X ∈ {Hkv, Hv}
        rep_b = heads_v // int(example_value(site.v_bias_chain[-1]).shape[1]) if site.v_bias_chain else 1
        if rep_b > 1:
            const = call(g, "repeat_interleave", const, rep_b, dim=0)
        keep = call(g, operator.mul, a, call(g, operator.sub, 1.0, c))    # a·(1 − c)
        if where is not None:                                            # [B, Hv, S, 1] · [1, Hv, 1, d]
            term = call(g, operator.mul, call(g, "to", keep, val.dtype),
                        call(g, "view", call(g, "to", const, val.dtype), 1, heads_v, 1, site.head_dim))
        else:
            coef = call(g, "view", call(g, "to", call(g, "repeat_interleave", keep, repeat), val.dtype), heads_v, 1)
            term = call(g, "view", call(g, operator.mul, call(g, "to", const, val.dtype), coef), 1, heads_v, 1,
                        site.head_dim)
        v = call(g, operator.add, v, term)
    v.meta["example_value"] = val
    replace_operand(site.v_user, site.v, v, value_operand(site), "value")


def _value_constant(g, site: AttentionSite) -> Node | None:
    """κ = β·W_V + b_V over the whole output of v's projection (every head, and q and k too when
    the projection is fused): what v is when the normalised input x̂·γ is 0. None when κ = 0.
    β·W_V is computed from the parameter nodes on every call (one vector-matrix product), so it
    is exact and every model sharing the graph gets its own κ."""
    proj = site.v_proj
    if proj is None:
        return None
    norm = norm_feeding(proj.input)
    beta = norm.bias if norm is not None and isinstance(norm.bias, Node) else None
    if beta is None:                                                   # RMSNorm, no norm, no β
        return proj.bias
    weight = example_value(proj.weight)
    if weight is not None and example_value(beta) is not None and example_value(beta).dtype != weight.dtype:
        beta = call(g, "to", beta, weight.dtype)
    folded = (call(g, F.linear, beta, proj.weight) if proj.layout == "out_in"
              else call(g, torch.matmul, beta, proj.weight))
    return folded if proj.bias is None else call(g, operator.add, folded, proj.bias)


def _per_head(g, site: AttentionSite, vector: Node) -> Node:
    """Replay the view chain producer → v on a vector laid out like the producer's output (b_V,
    κ): the vector laid out as v, then [X, d]. Fused qkv layouts (GPT-2's column blocks, NeoX's
    [heads, 3, d] interleave) come out right because the chain is the model's own."""
    producer = site.v_bias_chain[0].args[0] if site.v_bias_chain else site.v
    node = call(g, "expand_as", vector, producer)
    for original in site.v_bias_chain:
        args = (node,) + tuple(original.args[1:])
        target = "reshape" if original.target == "view" else original.target
        node = (g.call_method(target, args, dict(original.kwargs)) if original.op == "call_method"
                else g.call_function(target, args, dict(original.kwargs)))
    return call(g, operator.getitem, node, (0, slice(None), 0, slice(None)))


def _steer_z(gm, layer, site: AttentionSite, state, where: _Where | None) -> Node:
    g = gm.graph
    z = site.attn
    dtype = example_value(z).dtype
    users = list(z.users)
    heads = site.num_heads
    with g.inserting_before(z.next):
        first = site.head_offset
        scale = _row(g, state["z_scale"], layer, heads, first)
        weight = _row(g, state["z_replace"], layer, heads, first)
        own = call(g, operator.getitem, state["z_source"],
                   (layer, Ellipsis, slice(first or None, first + heads), slice(None, site.head_dim)))
        source = call(g, "to", call(g, "permute", own, 0, 2, 1, 3), dtype)
        if where is None:
            keep = _head_coef(g, call(g, operator.mul, scale, call(g, operator.sub, 1.0, weight)), dtype, heads)
            mixed = call(g, operator.mul, source, _head_coef(g, weight, dtype, heads))
        else:                                                         # per query position: [B, H, t, 1]
            scale = at_positions(g, _fp32_coef(g, scale, heads), where.queries("at_z_scale", layer, heads), 1.0)
            weight = at_positions(g, _fp32_coef(g, weight, heads), where.queries("at_z_replace", layer, heads), 0.0)
            keep = call(g, "to", call(g, operator.mul, scale, call(g, operator.sub, 1.0, weight)), dtype)
            mixed = call(g, operator.mul, source, call(g, "to", weight, dtype))
        new_z = call(g, operator.add, call(g, operator.mul, z, keep), mixed)
    for user in users:
        user.replace_input_with(z, new_z)
    if example_value(z) is not None:
        new_z.meta["example_value"] = example_value(z)      # same shape and dtype: later passes read it
    return new_z
