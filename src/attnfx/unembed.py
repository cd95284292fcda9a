"""Find the final norm and the unembedding in a graph, by pattern: logits = x̂ W_Uᵀ with
x̂ = norm(x) a LayerNorm (F.layer_norm) or an RMSNorm (F.rms_norm, or the hand-written
x · rsqrt(mean(x²) + ε) · γ of HF models). Direct logit attribution linearises this norm at the
input with its scale frozen (DESIGN §2)."""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node

from .norms import as_norm, skip_casts
from .sites import _is_call


@dataclass
class FinalNorm:
    kind: str                 # "layer_norm" | "rms_norm"
    input: Node               # the residual stream entering the norm, [b, t, d_model]
    weight: Node | None       # γ
    eps: float
    unembed_weight: Node      # W_U
    unembed_layout: str       # "out_in" ([vocab, d_model]) or "in_out" ([d_model, vocab])


def _unembedding(graph: Graph):
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    for out in output.args[0]:
        node = skip_casts(out) if isinstance(out, Node) else None
        if _is_call(node, (F.linear, torch._C._nn.linear)):
            return node.args[0], node.args[1], "out_in"
        if _is_call(node, (torch.matmul, operator.matmul), ("matmul",)):
            return node.args[0], node.args[1], "in_out"
    return None


def find_final_norm(graph: Graph) -> FinalNorm | None:
    found = _unembedding(graph)
    if found is None:
        return None
    normed, w_u, layout = found
    norm = as_norm(normed)
    if norm is None:
        return None
    return FinalNorm(norm.kind, norm.input, norm.weight, norm.eps, w_u, layout)
