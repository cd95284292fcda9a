"""Probe pass: multiply each probed component by a gate of ones that is a graph input.

    x ← x · gate        gate = 1 (runtime state, requires grad)   ⇒   ∂f/∂gate = Σ_d x ⊙ ∂f/∂x

so one backward pass gives the gradient × input of every component at once: per token
(gate_tokens [b, t]), per head and position (gate_heads [L, b, t, H], on the steered z), per layer
and position for the attention output, the MLP output and the residual stream entering the
layer (gate_attn / gate_mlp / gate_resid [L, b, t]). Under the lrp pass's rules that product is
the component's LRP relevance (DESIGN §3). The product is taken in fp32 and cast back, so the
forward is exact (x · 1) in every dtype and the relevance sums accumulate in fp32.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from ..blocks import Blocks
from ..sites import example_value
from ..spec import Spec, gate_name
from ._build import call


def apply(gm: GraphModule, layers: list[int], blocks: Blocks, steered: dict[int, Node], spec: Spec,
          state: dict[str, Node]) -> dict[str, list[int]]:
    """Gate every probed component found; returns, per kind, the layers gated (-1: tokens)."""
    g, current, gated = gm.graph, {}, {}
    targets = {"tokens": [(-1, blocks.tokens)],
               "resid": list(zip(layers, blocks.resid_pre)),
               "heads": [(layer, steered.get(layer)) for layer in layers],
               "attn": list(zip(layers, blocks.attn_out)),
               "mlp": list(zip(layers, blocks.mlp_out))}
    for kind in ("tokens", "resid", "heads", "attn", "mlp"):      # outer components first
        if kind not in spec.probes:
            continue
        gated[kind] = []
        for layer, node in targets[kind]:
            if node is None:
                continue
            node = current.get(node, node)                  # a node probed twice (tokens = resid 0)
            current[node] = _gate(g, node, state[gate_name(kind)], layer, heads=kind == "heads")
            gated[kind].append(layer)
    return gated


def _gate(g, x: Node, state: Node, layer: int, heads: bool) -> Node:
    """x · gate with the gate broadcast over d: [b, t] → [b, t, 1]; heads [b, t, H] → [b, H, t, 1]."""
    users = list(x.users)
    dtype = example_value(x).dtype
    with g.inserting_before(x.next):
        gate = state if layer < 0 else call(g, operator.getitem, state, layer)
        view = call(g, "unsqueeze", call(g, "permute", gate, 0, 2, 1) if heads else gate, -1)
        wide = call(g, "to", x, torch.promote_types(dtype, torch.float32))      # fp32, or fp64 for fp64
        new = call(g, "to", call(g, operator.mul, wide, view), dtype)
    for user in users:
        user.replace_input_with(x, new)
    new.meta.update(x.meta)
    return new
