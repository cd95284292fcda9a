"""Find the residual-stream components of each layer by pattern: the token embedding, the
residual stream entering each layer, the attention output (after W_O) and the MLP output, each a
[b, t, d_model] node. Pure analysis, like sites.py: no class names, no edits.

* tokens     the embedding lookup of a user input (the largest table if several), or a float
             [b, t, d] user input (inputs_embeds)
* resid_pre  what the layer's value projection reads, before its norm when that norm feeds only
             projections (pre-norm models); the norm's output itself otherwise (BERT's post-norm)
* attn_out   the output projection of the layer's attention site, viewed back to [b, t, d_model]
* mlp_out    the first projection after the attention whose input comes from an activation
             function (GELU, SiLU, ReLU, tanh-GELU...), possibly through a gate product
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node

from .norms import PASS_METHODS, as_norm, skip_casts
from .sites import AttentionSite, _is_call, _is_view_like, _shape, _walk_back

ACTIVATION_FNS = {F.gelu, F.silu, F.relu, torch.relu, torch.tanh, torch.sigmoid, F.sigmoid, F.mish,
                  F.softplus, torch.erf, F.tanh}
ACTIVATION_METHODS = {"tanh", "sigmoid", "relu", "erf"}
# Elementwise arithmetic and casts (in-place forms too): what lies between an activation function
# and the projection that reads it, and what the LRP plan groups into regions.
ELEMENTWISE_FNS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd,
                   operator.isub, operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
                   torch.neg, torch.pow, F.dropout}
ELEMENTWISE_METHODS = PASS_METHODS | {"add", "sub", "mul", "div", "neg", "pow", "clone", "add_", "sub_", "mul_",
                                      "div_", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__",
                                      "__truediv__", "__neg__"}
_LINEAR = (F.linear, torch._C._nn.linear)


@dataclass
class Blocks:
    tokens: Node | None
    resid_pre: list[Node | None]
    attn_out: list[Node | None]
    mlp_out: list[Node | None]


def is_activation(node) -> bool:
    return _is_call(node, ACTIVATION_FNS, ACTIVATION_METHODS)


def projection_input(node: Node) -> Node | None:
    """x of linear(x, W, b) / addmm(b, x, W) / matmul(x, W)."""
    if _is_call(node, _LINEAR) or _is_call(node, (torch.matmul, operator.matmul), ("matmul",)):
        return node.args[0] if isinstance(node.args[0], Node) else None
    if _is_call(node, (torch.addmm,)):
        return node.args[1] if isinstance(node.args[1], Node) else None
    return None


def _as_stream(node: Node | None, d_model: int | None) -> Node | None:
    """The projection's output as [b, t, d_model]: the node itself or its first 3-D view."""
    for _ in range(4):
        shape = _shape(node) if node is not None else None
        if shape is not None and len(shape) == 3 and (d_model is None or shape[-1] == d_model):
            return node
        users = list(node.users) if node is not None else []
        if len(users) != 1 or not _is_view_like(users[0]):
            return None
        node = users[0]
    return None


def _feeds_only_projections(node: Node) -> bool:
    frontier, seen = list(node.users), set()
    while frontier:
        user = frontier.pop()
        if user in seen:
            continue
        seen.add(user)
        if _is_call(user, (), PASS_METHODS) or _is_view_like(user):
            frontier.extend(user.users)
        elif projection_input(user) is None:
            return False
    return True


def _resid_pre(site: AttentionSite) -> Node | None:
    producer = list(_walk_back(site.v))[-1]
    x = projection_input(producer)
    if x is None:
        return None
    x = skip_casts(x)
    norm = as_norm(x)
    if norm is not None and _feeds_only_projections(norm.output):
        return skip_casts(norm.input)
    return x


def _reads_activation(node: Node, steps: int = 24) -> bool:
    """An activation function lies behind node through elementwise ops and views only."""
    frontier, seen = [node], set()
    while frontier and len(seen) < steps:
        n = frontier.pop()
        if not isinstance(n, Node) or n in seen:
            continue
        seen.add(n)
        if is_activation(n):
            return True
        if _is_call(n, ELEMENTWISE_FNS, ELEMENTWISE_METHODS) or _is_view_like(n):
            frontier.extend(a for a in n.args if isinstance(a, Node))
    return False


def _token_node(graph: Graph, user_inputs: set[Node]) -> Node | None:
    lookups = []
    for node in graph.nodes:
        if _is_call(node, (F.embedding,)) and isinstance(node.args[0], Node):
            source = list(_walk_back(node.args[0]))[-1]
            if source in user_inputs:
                rows = _shape(node.args[1])
                lookups.append((rows[0] if rows else 0, node))
    if lookups:
        return max(lookups, key=lambda pair: pair[0])[1]
    floats = [n for n in user_inputs if (v := n.meta.get("example_value")) is not None
              and isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() == 3]
    return floats[0] if len(floats) == 1 else None


def find_blocks(graph: Graph, sites: list[AttentionSite], user_inputs: set[Node]) -> Blocks:
    """Components of each site's layer (sites in graph order); None where a pattern is absent."""
    d_model = None
    attn_out = []
    for site in sites:
        out = _as_stream(site.o_node, None)
        attn_out.append(out)
        d_model = d_model or (_shape(out)[-1] if out is not None else None)
    order = {node: i for i, node in enumerate(graph.nodes)}
    starts = [order[site.attn] for site in sites] + [len(order)]
    mlp_out: list[Node | None] = [None] * len(sites)
    for node in graph.nodes:
        x = projection_input(node)
        if x is None or not _reads_activation(x):
            continue
        layer = next((i for i in range(len(sites)) if starts[i] < order[node] < starts[i + 1]), None)
        if layer is not None and mlp_out[layer] is None:
            mlp_out[layer] = _as_stream(node, d_model)
    return Blocks(_token_node(graph, user_inputs), [_resid_pre(s) for s in sites], attn_out, mlp_out)
