"""Record pass: append records to the graph's outputs (no hooks, no side effects).
With a gate z ⊙ g between z and W_O, readouts and contributions use z ⊙ g (the direct effect).

* ``z``        the steered head output, [b, t, H, d]
* ``readout``  z_h · u_h with u_h = W_O[:, h]ᵀ r_k, [b, t, H, K] in fp32 — the contraction runs
               over d_head, so [b, t, H, d_model] is never materialised
* ``contrib``  z_h W_O[:, h]ᵀ for the selected heads and positions, [b, P, n_heads, d_model]
* ``final_norm`` the residual entering the final norm, [b, t, d_model] (for DLA's frozen scale)
"""
from __future__ import annotations

import operator
from typing import NamedTuple

import torch
from torch.fx import GraphModule, Node

from ..sites import AttentionSite, example_value
from ..spec import Spec
from ._build import call


class RecordKey(NamedTuple):
    kind: str
    layer: int            # -1 for records that are not per layer
    heads: tuple = ()


def apply(gm: GraphModule, sites: list[tuple[int, AttentionSite]], steered: dict[int, Node],
          spec: Spec, state: dict[str, Node], final_norm_input: Node | None) -> list[RecordKey]:
    g = gm.graph
    output = next(n for n in reversed(g.nodes) if n.op == "output")
    records: list[tuple[RecordKey, Node]] = []
    with g.inserting_before(output):
        for layer, site in sites:
            z = steered[layer]
            if "z" in spec.records:
                records.append((RecordKey("z", layer), call(g, "transpose", z, 1, 2)))
            if site.gate is not None and ("readout" in spec.records or "contrib" in spec.records):
                z = _gated(g, site, z)
            if "readout" in spec.records:
                records.append((RecordKey("readout", layer), _readout(g, layer, site, z, state)))
            heads = tuple(h for (l, h) in spec.contrib_heads if l == layer)
            if "contrib" in spec.records and heads:
                records.append((RecordKey("contrib", layer, heads),
                                _contrib(g, site, z, heads, spec.contrib_positions)))
        if "final_norm" in spec.records and final_norm_input is not None:
            records.append((RecordKey("final_norm", -1), final_norm_input))
    return append_outputs(gm, records)


def append_outputs(gm: GraphModule, records: list[tuple[RecordKey, Node]]) -> list[RecordKey]:
    """Append record nodes to the graph's outputs; returns their keys in output order."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    output.args = (tuple(output.args[0]) + tuple(node for _, node in records),)
    return [key for key, _ in records]


def _gated(g, site: AttentionSite, z: Node) -> Node:
    """z ⊙ g per head, [b, H, t, d]: what W_O reads when a gate sits between them, so readouts and
    contributions are the head's direct effect."""
    gate = site.gate
    if len(example_value(gate).shape) == 3:                   # [b, t, H·d]
        gate = call(g, "unflatten", gate, -1, (site.num_heads, site.head_dim))
    return call(g, operator.mul, z, call(g, "to", call(g, "transpose", gate, 1, 2), example_value(site.attn).dtype))


def _per_head_weight(g, site: AttentionSite) -> tuple[Node, str]:
    """W_O viewed per head: out_in → [d_model, H, d] ('mhd'), in_out → [H, d, d_model] ('hdm')."""
    h, d = site.num_heads, site.head_dim
    if site.o_layout == "out_in":
        return call(g, "view", site.o_weight, -1, h, d), "mhd"
    return call(g, "view", site.o_weight, h, d, -1), "hdm"


def _readout(g, layer, site: AttentionSite, z: Node, state) -> Node:
    directions = call(g, operator.getitem, state["readout_directions"], layer)      # [K, d_model]
    weight, letters = _per_head_weight(g, site)
    u = call(g, torch.einsum, f"{letters},km->hdk", call(g, "float", weight), directions)  # [H, d, K]
    return call(g, torch.einsum, "bhtd,hdk->bthk", call(g, "float", z), u)


def _contrib(g, site: AttentionSite, z: Node, heads: tuple, positions) -> Node:
    weight, letters = _per_head_weight(g, site)
    heads_list = list(heads)
    z_sel = call(g, operator.getitem, z, (slice(None), heads_list))                   # [b, n, t, d]
    if positions is not None:
        z_sel = call(g, operator.getitem, z_sel, (slice(None), slice(None), list(positions)))
    if letters == "mhd":
        w_sel = call(g, operator.getitem, weight, (slice(None), heads_list))          # [m, n, d]
    else:
        w_sel = call(g, operator.getitem, weight, heads_list)                         # [n, d, m]
    return call(g, torch.einsum, f"bhpd,{letters}->bphm", z_sel, call(g, "to", w_sel, z_sel))
