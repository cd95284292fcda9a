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

from .norms import PASS_METHODS, _inactive_dropout, as_norm, skip_casts
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
    stream: tuple | None = None     # the final norm's input as a tree over these (stream_tree)
    mlp_hidden: list[Node | None] | None = None   # what the MLP's output projection reads (post-activation)
    resid_mid: list[Node | None] | None = None    # the stream the MLP reads, where not resid_pre (sequential blocks)


def is_activation(node) -> bool:
    return _is_call(node, ACTIVATION_FNS, ACTIVATION_METHODS)


def projection_input(node: Node) -> Node | None:
    """x of linear(x, W, b) / addmm(b, x, W) / matmul(x, W)."""
    if _is_call(node, _LINEAR) or _is_call(node, (torch.matmul, operator.matmul), ("matmul",)):
        return node.args[0] if isinstance(node.args[0], Node) else None
    if _is_call(node, (torch.addmm,)):
        return node.args[1] if isinstance(node.args[1], Node) else None
    return None


def _as_stream(node: Node | None, d_model: int | None, flat: bool = False) -> Node | None:
    """The projection's output as [b, t, d_model]: the node itself or its first 3-D view; with
    `flat`, a branch the residual stream adds, also the [b·t, d_model] node of a block that
    flattens its tokens (OPT's MLP: the probe pass views it back as [b, t, d_model])."""
    start = node
    for _ in range(4):
        shape = _shape(node) if node is not None else None
        if shape is not None and len(shape) == 3 and (d_model is None or shape[-1] == d_model):
            return node
        users = _value_users(node) if node is not None else []
        if len(users) != 1 or not _is_view_like(users[0]):
            break
        node = users[0]
    return start if flat and is_flat_stream(start, d_model) else None


def is_flat_stream(node: Node | None, d_model: int | None) -> bool:
    """A [b·t, d_model] tensor: the residual stream with its tokens flattened."""
    shape = _shape(node) if isinstance(node, Node) else None
    return shape is not None and len(shape) == 2 and d_model is not None and shape[-1] == d_model


def _value_users(node: Node) -> list[Node]:
    """Users that read the tensor's values: not those that read only its size (dynamic-shape graphs
    hold x.size() calls next to the ops)."""
    return [u for u in node.users if not _is_call(u, (torch.ops.aten.sym_size.int,), ("size", "dim"))]


def _feeds_only_projections(node: Node) -> bool:
    frontier, seen = _value_users(node), set()
    while frontier:
        user = frontier.pop()
        if user in seen:
            continue
        seen.add(user)
        if _is_call(user, (), PASS_METHODS) or _is_view_like(user):
            frontier.extend(_value_users(user))
        elif projection_input(user) is None:
            return False
    return True


# Low-rank projections chained in front of the value projection (DeepSeek's MLA: kv_b_proj reads
# norm(kv_a_proj(x̂))): one step back per projection; real models have one.
_LOW_RANK_STEPS = 4


def _resid_pre(site: AttentionSite, d_model: int | None) -> Node | None:
    """What the layer reads off the residual stream for v. A value projection that reads a
    low-rank latent (multi-head latent attention's compressed kv, normed and cached on its own)
    reads something narrower than the stream the output projection writes to (d_model wide): the
    stream is the first d_model-wide tensor behind the projections that made the latent."""
    # v's projection as the site found it (x·W + b written as an add of a matmul too)
    read = _read_off(site.v_proj.input if site.v_proj is not None else projection_input(list(_walk_back(site.v))[-1]))
    if read is None or d_model is None or _width(read) in (None, d_model):
        return read
    x = read
    for _ in range(_LOW_RANK_STEPS):
        x = _read_off(_latent_source(x))
        if x is None:
            break
        if _width(x) == d_model:
            return x
    return read                 # no stream behind it: another one (a narrower encoder's output, say)


def _read_off(x: Node | None) -> Node | None:
    """The tensor a projection reads, before its norm when that norm feeds only projections."""
    if x is None:
        return None
    x = skip_casts(x)
    norm = as_norm(x)
    if norm is not None and _feeds_only_projections(norm.output):
        return skip_casts(norm.input)
    return x


def _width(x: Node) -> int | None:
    shape = _shape(x)
    return shape[-1] if shape else None


def _latent_source(x: Node) -> Node | None:
    """The input of the projection that made the latent x, back through the KV cache that holds
    it, its norm, and the split that cut it from a fused projection (MLA's [kv latent | k rope])."""
    x = _behind_views_and_cache(x)
    norm = as_norm(x)
    if norm is not None:
        x = _behind_views_and_cache(norm.input)
    return projection_input(x)


def _behind_views_and_cache(x: Node) -> Node:
    """Back through views, casts and KV-cache concatenations, in any order, while any applies."""
    for _ in range(_LOW_RANK_STEPS):
        before, x = x, skip_casts(list(_walk_back(x))[-1])
        if x is before:
            break
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


def _token_node(graph: Graph, user_inputs: set[Node], embeds: bool) -> Node | None:
    lookups = []
    for node in graph.nodes:
        if _is_call(node, (F.embedding,)) and isinstance(node.args[0], Node):
            source = list(_walk_back(node.args[0]))[-1]
            if source in user_inputs:
                rows = _shape(node.args[1])
                lookups.append((rows[0] if rows else 0, node))
    if lookups:
        return max(lookups, key=lambda pair: pair[0])[1]
    if not embeds:
        return None
    floats = [n for n in user_inputs if (v := n.meta.get("example_value")) is not None
              and isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() == 3]
    return floats[0] if len(floats) == 1 else None


def find_blocks(graph: Graph, sites: list[AttentionSite], user_inputs: set[Node], final_input: Node | None,
                embeds: bool = True) -> Blocks:
    """Components of each site's layer (sites in graph order); None where a pattern is absent.
    final_input: the final norm's input (unembed.find_final_norm), where the stream tree starts.
    embeds: a lone float [b, t, d] user input is the tokens (inputs_embeds) — not in a graph after
    a break, whose float inputs are the frame's locals (the stream of the layers before)."""
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
    resid_pre = [_resid_pre(s, _shape(out)[-1] if out is not None else None) for s, out in zip(sites, attn_out)]
    stream = _final_stream(graph, final_input, sites, attn_out, resid_pre)
    branches = [leaf for leaf in leaves(stream) if leaf[0] == "mlp"] if stream is not None else []
    for leaf in branches:
        # The branch the stream adds is the MLP's output: a whole MoE layer (experts + shared
        # expert), not the first expert projection the activation search finds inside it.
        alone = sum(other[1] == leaf[1] for other in branches) == 1
        if alone and (mlp_out[leaf[1]] is None or _through(mlp_out[leaf[1]]) is not _through(leaf[2])):
            mlp_out[leaf[1]] = _as_stream(leaf[2], d_model, flat=True)
    mlp_hidden = [_mlp_hidden(node) for node in mlp_out]
    resid_mid = [_mlp_reads(hidden) for hidden in mlp_hidden]
    resid_mid = [None if mid is None or mid is pre else mid for mid, pre in zip(resid_mid, resid_pre)]
    return Blocks(_token_node(graph, user_inputs, embeds), resid_pre, attn_out, mlp_out, stream, mlp_hidden, resid_mid)


def _mlp_hidden(mlp_out: Node | None) -> Node | None:
    """The input of the projection that made mlp_out, when an activation lies behind it (a whole
    MoE layer's output has no one hidden tensor: None)."""
    node = _through(mlp_out)
    x = projection_input(node) if isinstance(node, Node) else None
    return x if x is not None and _reads_activation(x) else None


def _mlp_reads(hidden: Node | None, steps: int = 24) -> Node | None:
    """The residual stream the MLP reads: behind the hidden activation, the input of its first
    (up / gate) projection, before a norm that feeds only projections (as resid_pre is read)."""
    frontier, seen = [hidden], set()
    while frontier and len(seen) < steps:
        node = frontier.pop(0)
        if not isinstance(node, Node) or node in seen:
            continue
        seen.add(node)
        x = projection_input(node)
        if x is not None and node is not hidden:
            return _read_off(x)
        if is_activation(node) or _is_call(node, ELEMENTWISE_FNS, ELEMENTWISE_METHODS) or _is_view_like(node) \
                or node is hidden:
            frontier.extend(a for a in node.args if isinstance(a, Node))
    return None


def _final_stream(graph, final_input, sites, attn_out, resid_pre):
    if not isinstance(final_input, Node) or not sites:
        return None
    return stream_tree(graph, final_input, sites, attn_out, resid_pre)


# ---- the residual stream as a linear-once-frozen expression ----------------------------------------
# From the final norm's input back to the components that write to the residual stream: a tree of
#   ("sum", children)        residual additions
#   ("scale", c, child)      multiplication by a constant (a float, or a scalar parameter node)
#   ("inverse", c, child)    division by one
#   ("norm", Norm, child)    a norm on the way (post-block norms; post-LN models' every norm),
#                            linear once its σ is frozen from the same forward pass
#   ("attn", i, node)        site i's output projection (heads + b_O), as blocks.attn_out
#   ("mlp", i, node)         a branch added to the stream after site i's attention (its MLP)
#   ("embed", i, node)       the stream entering the first site on the path (embeddings)
#   ("const", value)         a parameter / constant added to the stream
#   ("input", node)          a graph input other than the embeddings (a graph break cut the stream)
#   ("stop", node)           an op that is not linear once frozen: the stream cannot be decomposed
_SCALE_FNS = (operator.mul, operator.truediv, torch.mul, torch.div)
_SCALE_METHODS = ("mul", "div", "__mul__", "__rmul__", "__truediv__")
_ADD_FNS = (operator.add, torch.add, operator.iadd)      # Falcon: mlp_output += attention_output


def _through(node):
    """Skip casts, views, clones and inactive dropout: ops that do not change the value."""
    while isinstance(node, Node):
        if _inactive_dropout(node) or _is_call(node, (torch.clone,), ("clone",)):
            node = node.args[0]
        elif (_is_call(node, (), PASS_METHODS) or _is_view_like(node)) and isinstance(node.args[0], Node):
            node = node.args[0]
        else:
            return node
    return node


def _constant(value) -> bool:
    """A float, or a one-element parameter/buffer (a placeholder) seen through casts."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    value = _through(value)
    if not isinstance(value, Node) or value.op != "placeholder":
        return False
    shape = _shape(value)
    return shape is not None and all(s == 1 for s in shape)


def _as_scale(node):
    """(kind, factor, x) for x·c, c·x or x/c with c constant, else None."""
    if not _is_call(node, _SCALE_FNS, _SCALE_METHODS) or len(node.args) != 2:
        return None
    x, c = node.args
    divide = node.target in (operator.truediv, torch.div, "div", "__truediv__")
    if isinstance(x, Node) and _constant(c):
        return ("inverse" if divide else "scale"), _through(c) if isinstance(c, Node) else float(c), x
    if not divide and isinstance(c, Node) and _constant(x):
        return "scale", _through(x) if isinstance(x, Node) else float(x), c
    return None


def _is_ancestor(a: Node, b: Node, order: dict) -> bool:
    frontier, seen, first = [b], set(), order[a]
    while frontier:
        n = frontier.pop()
        if n is a:
            return True
        if n in seen or order.get(n, -1) < first:
            continue
        seen.add(n)
        frontier.extend(n.all_input_nodes)
    return False


class _Walk:
    def __init__(self, graph: Graph, sites, attn_out, embed: Node | None = None, first: int = -1):
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        self.attn = {_through(n): i for i, n in enumerate(attn_out) if n is not None}
        self.starts = [self.order[s.attn] for s in sites]
        self.embed, self.first, self.seen = embed, first, set()

    def layer_of(self, node: Node) -> int:
        return max((i for i, s in enumerate(self.starts) if s < self.order[node]), default=-1)

    def __call__(self, node, branch: bool = False):
        outer, node = node, _through(node)
        if not isinstance(node, Node):
            return ("const", node)
        if node in self.seen:                          # a DAG, not a tree: the same value counted twice
            return ("stop", node)
        self.seen.add(node)
        if node is self.embed:
            return ("embed", self.first, outer)
        if node in self.attn:
            return ("attn", self.attn[node], outer)
        scale = _as_scale(node)
        if scale is not None:
            return (scale[0], scale[1], self(scale[2], branch))
        norm = as_norm(node)
        if norm is not None and skip_casts(norm.output) is node:
            return ("norm", norm, self(norm.input, branch))
        if _is_call(node, _ADD_FNS, ("add", "__add__", "add_")) and len(node.args) == 2 and not node.kwargs:
            operands = self._operands(*node.args, branch)
            if operands is not None:
                return ("sum", operands)
        if node.op == "placeholder":
            return ("input", node)
        if branch and self.layer_of(node) >= 0:
            return ("mlp", self.layer_of(node), outer)
        return ("stop", node)

    def _operands(self, a, b, branch: bool):
        """stream + branch (the branch computed from the stream); two parallel branches (Cohere's
        x + attn + mlp, GPT-NeoX's (mlp + attn) + x); inside a branch, a sum of two parts of it
        that holds no attention output (MoE experts + shared expert): None, one leaf."""
        if not (isinstance(a, Node) and isinstance(b, Node)):
            return [self(a), self(b)]
        a_, b_ = _through(a), _through(b)
        if _is_ancestor(a_, b_, self.order):           # b is computed from the stream a
            return [self(a), self(b, branch=True)]
        if _is_ancestor(b_, a_, self.order):
            return [self(a, branch=True), self(b)]
        if branch and not (self._holds_attention(a_) or self._holds_attention(b_)):
            return None
        return [self(a, branch=True), self(b, branch=True)]

    def _holds_attention(self, node) -> bool:
        """node is an attention output, or a sum of one and other parallel branches (GPT-NeoX's
        mlp + attn + x), seen through casts and scales."""
        while (scale := _as_scale(node)) is not None:
            node = _through(scale[2])
        if node in self.attn:
            return True
        if _is_call(node, _ADD_FNS, ("add", "__add__", "add_")) and len(node.args) == 2:
            return any(isinstance(x, Node) and self._holds_attention(_through(x)) for x in node.args)
        return False


def leaves(tree) -> list:
    """Every leaf of a stream tree, in order."""
    if tree[0] == "sum":
        return [leaf for child in tree[1] for leaf in leaves(child)]
    if tree[0] in ("scale", "inverse", "norm"):
        return leaves(tree[2])
    return [tree]


def stream_tree(graph: Graph, start: Node, sites, attn_out, resid_pre):
    """The residual stream at `start` (the final norm's input) as a tree of frozen-linear ops over
    its components (see above). The embeddings are what the first site on the path reads."""
    tree = _Walk(graph, sites, attn_out)(start)
    first = min((leaf[1] for leaf in leaves(tree) if leaf[0] == "attn"), default=None)
    if first is None or resid_pre[first] is None:
        return tree
    return _Walk(graph, sites, attn_out, _through(resid_pre[first]), first)(start)
