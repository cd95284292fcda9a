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

from .sites import _is_call, _is_view_like, _shape

_PASS_METHODS = {"to", "float", "type", "contiguous", "half", "bfloat16"}


@dataclass
class FinalNorm:
    kind: str                 # "layer_norm" | "rms_norm"
    input: Node               # the residual stream entering the norm, [b, t, d_model]
    weight: Node | None       # γ
    eps: float
    unembed_weight: Node      # W_U
    unembed_layout: str       # "out_in" ([vocab, d_model]) or "in_out" ([d_model, vocab])


def _skip_casts(node):
    while isinstance(node, Node) and (_is_call(node, (), _PASS_METHODS) or _is_view_like(node)):
        node = node.args[0]
    return node


def _unembedding(graph: Graph):
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    for out in output.args[0]:
        node = _skip_casts(out) if isinstance(out, Node) else None
        if _is_call(node, (F.linear, torch._C._nn.linear)):
            return node.args[0], node.args[1], "out_in"
        if _is_call(node, (torch.matmul, operator.matmul), ("matmul",)):
            return node.args[0], node.args[1], "in_out"
    return None


def _rms_parts(node: Node):
    """node = γ · cast(x · rsqrt(mean(x²) + ε)) → (x, γ, ε)."""
    if not _is_call(node, (operator.mul, torch.mul)):
        return None
    for weight, rest in (node.args, node.args[::-1]):
        shape = _shape(weight)
        if shape is None or len(shape) != 1:
            continue
        inner = _skip_casts(rest)
        if not _is_call(inner, (operator.mul, torch.mul)):
            continue
        for x, r in (inner.args, inner.args[::-1]):
            if _is_call(r, (torch.rsqrt,), ("rsqrt",)):
                add = r.args[0]
                eps = next((a for a in add.args if isinstance(a, float)), 0.0) if isinstance(add, Node) else 0.0
                return x, weight, float(eps)
    return None


def find_final_norm(graph: Graph) -> FinalNorm | None:
    found = _unembedding(graph)
    if found is None:
        return None
    normed, w_u, layout = found
    node = _skip_casts(normed)
    if _is_call(node, (F.layer_norm,)):
        eps = node.args[4] if len(node.args) > 4 else node.kwargs.get("eps", 1e-5)
        weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        return FinalNorm("layer_norm", node.args[0], weight, float(eps), w_u, layout)
    if _is_call(node, (getattr(F, "rms_norm", None),)):
        eps = node.args[3] if len(node.args) > 3 else node.kwargs.get("eps")
        weight = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
        return FinalNorm("rms_norm", node.args[0], weight, float(eps or torch.finfo(torch.float32).eps),
                         w_u, layout)
    parts = _rms_parts(node)
    if parts is not None:
        x, weight, eps = parts
        return FinalNorm("rms_norm", x, weight, eps, w_u, layout)
    return None
