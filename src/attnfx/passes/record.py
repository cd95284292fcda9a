"""Record pass: append records to the graph's outputs (no hooks, no side effects).
With a gate z ⊙ g between z and W_O, readouts and contributions use z ⊙ g (the direct effect),
computed per head by `gated_heads` (which the probe pass's "heads" component is too).

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

from ..errors import UnsupportedModelError
from ..graph.sites import AttentionSite, _gate_operand, _is_call, _walk_back, example_value
from ..state.spec import Spec
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
            if "readout" in spec.records or "contrib" in spec.records:
                z = head_output(site, z)
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


_GATED = "attnfx_gated_heads"        # node meta: the per-head z ⊙ g of a site, made once per graph


def head_output(site: AttentionSite, z: Node | None) -> Node | None:
    """What a head adds to the residual stream, before W_O: z, or z ⊙ g on a gated site."""
    return z if site.gate is None or z is None else gated_heads(site, z)


def gated_heads(site: AttentionSite, z: Node) -> Node:
    """z ⊙ g per head, [b, H, t, d], with W_O reading it (back through views): the model's product
    at W_O's input layout, re-expressed per head. Elementwise, so the values are the model's bit
    for bit; records and probes on this node are the head's direct effect, and a patch of it is a
    patch of what W_O reads. Made once per graph: later calls return the same node."""
    made = next((user for user in z.users if user.meta.get(_GATED)), None)
    if made is not None:
        return made
    product, z_first, layout = _gate_product(site, z)
    g, gate = z.graph, site.gate
    with g.inserting_before(product):
        if layout == "bt(hd)":
            gate = call(g, "unflatten", gate, -1, (site.num_heads, site.head_dim))
        if layout != "bhtd":
            gate = call(g, "transpose", gate, 1, 2)
        gated = call(g, operator.mul, z, gate) if z_first else call(g, operator.mul, gate, z)
        back = gated if layout == "bhtd" else call(g, "transpose", gated, 1, 2)
        if layout == "bt(hd)":
            back = call(g, "flatten", back, 2)
    value = example_value(product)
    gated.meta["example_value"] = example_value(z).to(value.dtype)      # [b, H, t, d] in the product's dtype
    gated.meta[_GATED] = True
    back.meta["example_value"] = value
    path = list(_walk_back(product.args[0 if z_first else 1]))
    product.replace_all_uses_with(back)
    g.erase_node(product)
    for node in path[:-1]:                   # the views of z that only the old product read
        if not node.users:
            g.erase_node(node)
    return gated


def _gate_product(site: AttentionSite, z: Node) -> tuple[Node, bool, str]:
    """(the product z ⊙ g W_O reads, whether z is its first operand, its layout: [b, t, H·d]
    'bt(hd)', [b, t, H, d] 'bthd' or [b, H, t, d] 'bhtd')."""
    h, d = site.num_heads, site.head_dim
    for product in site.gate.users:
        if _gate_operand(product) is None:
            continue
        for z_first in (True, False):
            operand = product.args[0 if z_first else 1]
            path = list(_walk_back(operand)) if isinstance(operand, Node) else []
            if not path or path[-1] is not z or operand is site.gate:
                continue
            shape = tuple(example_value(product).shape)
            moved = any(_is_call(n, (torch.transpose, torch.permute), ("transpose", "permute")) for n in path)
            if moved and len(shape) == 3 and shape[-1] == h * d:
                return product, z_first, "bt(hd)"
            if moved and len(shape) == 4 and shape[2:] == (h, d):
                return product, z_first, "bthd"
            if not moved and shape == tuple(example_value(z).shape):
                return product, z_first, "bhtd"
            raise UnsupportedModelError(
                f"layer at {site.module_stack_path or '<root>'}: the gate product z ⊙ g before W_O has layout "
                f"{shape}; attnfx reads gates laid out [b, t, H·d], [b, t, H, d] or [b, H, t, d] (H={h}, d={d})")
    raise UnsupportedModelError(f"the gate product z ⊙ g of the layer at {site.module_stack_path or '<root>'} "
                                "does not read this graph's head output z")


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
