"""Find normalisation layers in a graph, by pattern: LayerNorm (F.layer_norm), RMSNorm (F.rms_norm,
or HF's hand-written x · rsqrt(mean(x²) + ε) · γ). Pure analysis: the final-norm finder (logit
attribution) and the LRP pass (σ detached, docs/design.md §3) both read it."""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node

from .sites import _is_call, _is_view_like, _shape

PASS_METHODS = {"to", "float", "type", "type_as", "contiguous", "half", "bfloat16", "double"}


@dataclass
class Norm:
    kind: str                 # "layer_norm" | "rms_norm"
    output: Node              # the normalised tensor (γ applied)
    input: Node               # the tensor normalised, [.., d]
    weight: Node | None       # γ
    bias: Node | None         # β (LayerNorm)
    eps: float
    scale: Node | None = None  # hand-written RMSNorm: the rsqrt(mean(x²) + ε) node (1/σ)
    fused: bool = True        # one F.layer_norm / F.rms_norm call (else hand-written)
    weight_offset: float = 0.0  # the gain is (offset + γ): Gemma's x̂ · (1 + w)


def skip_casts(node):
    """Walk back through dtype casts and views to the tensor they re-express."""
    while isinstance(node, Node) and (_is_call(node, (), PASS_METHODS) or _is_view_like(node)):
        node = node.args[0]
    return node


def _arg(node: Node, index: int, name: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


_LAYER_NORMS = (F.layer_norm, torch.layer_norm)
_RMS_NORMS = tuple(f for f in (getattr(F, "rms_norm", None), getattr(torch, "rms_norm", None)) if f is not None)


def _fused_norm(node: Node) -> Norm | None:
    if _is_call(node, _LAYER_NORMS):
        shape = _arg(node, 1, "normalized_shape")
        if shape is None or len(shape) != 1:
            return None
        return Norm("layer_norm", node, node.args[0], _arg(node, 2, "weight"), _arg(node, 3, "bias"),
                    float(_arg(node, 4, "eps", 1e-5)))
    if _is_call(node, _RMS_NORMS):
        shape = _arg(node, 1, "normalized_shape")
        if shape is None or len(shape) != 1:
            return None
        eps = _arg(node, 3, "eps")
        return Norm("rms_norm", node, node.args[0], _arg(node, 2, "weight"), None,
                    float(eps if eps is not None else torch.finfo(torch.float32).eps))
    return None


def _handwritten_rms(node: Node) -> Norm | None:
    """node = γ · cast(x · rsqrt(mean(x²) + ε)) → Norm with the rsqrt node as its scale."""
    if not _is_call(node, (operator.mul, torch.mul)) or len(node.args) != 2:
        return None
    for weight, rest in (node.args, node.args[::-1]):
        shape = _shape(weight)
        if shape is None or len(shape) != 1:
            continue
        inner = skip_casts(rest)
        if not _is_call(inner, (operator.mul, torch.mul)) or len(inner.args) != 2:
            continue
        for x, r in (inner.args, inner.args[::-1]):
            if _is_call(r, (torch.rsqrt,), ("rsqrt",)):
                add = r.args[0]
                eps = next((a for a in add.args if isinstance(a, float)), 0.0) if isinstance(add, Node) else 0.0
                return Norm("rms_norm", node, x, weight, None, float(eps), scale=r, fused=False)
    return None


_MEAN = (torch.mean,)


def _centred_input(node) -> Node | None:
    """x of x − mean(x, −1, keepdim) (casts skipped), else None."""
    node = skip_casts(node)
    if not _is_call(node, (operator.sub, torch.sub), ("sub",)) or len(node.args) != 2:
        return None
    x, mean = node.args
    if _is_call(mean, _MEAN, ("mean",)) and mean.args[0] is x:
        return x
    return None


def _handwritten_layer_norm(norm: Norm) -> Norm:
    """A hand-written RMS-shaped norm whose input is x − mean(x) and whose rsqrt reads
    mean((x − mean x)²): LayerNorm written out (Cohere's, without β)."""
    x = _centred_input(norm.input)
    if x is None:
        return norm
    add = norm.scale.args[0]
    var = next((a for a in add.args if isinstance(a, Node)), None) if isinstance(add, Node) else None
    pow_ = var.args[0] if _is_call(var, _MEAN, ("mean",)) else None
    if not _is_call(pow_, (torch.pow,), ("pow",)) or _centred_input(pow_.args[0]) is not x:
        return norm
    return Norm("layer_norm", norm.output, x, norm.weight, None, norm.eps, scale=norm.scale, fused=False)


def _gain(norm: Norm) -> Norm:
    """γ written (1 + w) (Gemma, Qwen3-Next): the parameter w and the offset 1."""
    weight = skip_casts(norm.weight)
    if _is_call(weight, (operator.add, torch.add)) and len(weight.args) == 2:
        for const, w in (weight.args, weight.args[::-1]):
            if isinstance(const, (int, float)) and isinstance(skip_casts(w), Node):
                norm.weight, norm.weight_offset = skip_casts(w), float(const)
                return norm
    norm.weight = weight
    return norm


def as_norm(node) -> Norm | None:
    """The norm whose output is `node` (casts and views skipped), if any."""
    node = skip_casts(node)
    if not isinstance(node, Node):
        return None
    fused = _fused_norm(node)
    if fused is not None:
        return fused
    norm = _handwritten_rms(node)
    return None if norm is None else _gain(_handwritten_layer_norm(norm))


def _inactive_dropout(node) -> bool:
    """F.dropout(x, p, training=False) or with p = 0: the identity (eval mode, BERT's embeddings)."""
    if not _is_call(node, (F.dropout,)):
        return False
    return _arg(node, 2, "training", True) is False or _arg(node, 1, "p", 0.5) == 0


def norm_feeding(node) -> Norm | None:
    """The norm whose output reaches `node` unchanged (through casts, views and inactive dropout):
    the norm in front of a projection, say."""
    while True:
        node = skip_casts(node)
        if not _inactive_dropout(node):
            return as_norm(node)
        node = node.args[0]


def find_norms(graph: Graph) -> list[Norm]:
    """Every LayerNorm / RMSNorm of the graph, in graph order."""
    return [norm for node in graph.nodes if (norm := _fused_norm(node) or _handwritten_rms(node)) is not None]
