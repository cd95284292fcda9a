"""Find attention computations in a dynamo graph, by pattern (never by class name).

Two patterns are matched (docs/design.md §1):

* ``sdpa_call``: ``F.scaled_dot_product_attention(q, k, v, ...)``
* ``matmul_softmax_matmul``: ``softmax(q @ kᵀ ⋯) @ v`` with any mix of scaling, masking,
  soft-capping, dtype casts and dropout between the two matmuls (HF ``eager`` attention,
  hand-written code); the products may run on heads merged into the batch axis (``bmm``,
  ``baddbmm`` adding ALiBi: Bloom), and extra score columns may be joined before the softmax
  and dropped after (attention sinks: GPT-OSS)

Each match becomes an :class:`AttentionSite` holding the graph nodes the passes rewrite and the
head layout read from ``node.meta["example_value"]``. The analysis is pure: it never edits the
graph.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node

from .flex import flex_output

PATTERNS = ("sdpa_call", "matmul_softmax_matmul", "flex_attention")

# Ops that only re-lay out one tensor: walking through them keeps the values of a head.
# (repeat_interleave repeats whole heads for GQA, so it keeps every head's values too.)
_VIEW_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "expand", "unsqueeze",
                 "squeeze", "flatten", "chunk", "split", "clone", "repeat_interleave"}
_VIEW_FUNCTIONS = {torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.unsqueeze,
                   torch.squeeze, torch.chunk, torch.split, torch.repeat_interleave}
# Ops allowed between the score matmul and the softmax, and between the softmax and z.
# In-place operators (Falcon's `scores /= √d`) are the same ops; tanh is score soft-capping
# (Gemma-2: cap · tanh(s / cap)), an elementwise transform that leaves the pattern intact.
_SCORE_OPS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
              operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div, torch.where,
              torch.masked_fill, F.dropout, torch.clamp, torch.tanh}
_SCORE_METHODS = {"add", "sub", "mul", "div", "masked_fill", "to", "type", "float", "half",
                  "bfloat16", "contiguous", "clamp", "tanh", "__add__", "__mul__", "__truediv__"}
_NONLINEAR_SCORE_OPS = {torch.tanh}
_NONLINEAR_SCORE_METHODS = {"tanh"}
_CAST_METHODS = {"to", "type", "float", "half", "bfloat16", "contiguous"}
_MATMULS = {torch.matmul, operator.matmul}
# q·kᵀ and A·v on heads merged into the batch axis ([b·H, T, d]: Bloom, MPT); baddbmm adds a
# term (ALiBi) and scales the product in one call.
_BATCH_MATMULS = {torch.bmm}
_BATCH_MATMUL_METHODS = {"bmm"}
_SCORE_PRODUCTS = _MATMULS | _BATCH_MATMULS | {torch.baddbmm}
_SCORE_PRODUCT_METHODS = {"matmul", "bmm", "baddbmm"}
_SOFTMAXES = {torch.softmax, F.softmax, torch.nn.functional.softmax}


@dataclass
class Projection:
    """An affine projection y = x·W (+ b) of the graph: F.linear (W is [out, in]), addmm or
    matmul (W is [in, out])."""

    node: Node
    input: Node
    weight: Node
    layout: str                     # "out_in" | "in_out"
    bias: Node | None


@dataclass
class AttentionSite:
    """One attention computation: z = attention(q, k, v) with z of shape [b, H, t, d]."""

    pattern: str
    attn: Node                      # produces z: [b, H, t, d]
    q_user: Node                    # the node that consumes q (sdpa, or the score matmul)
    q: Node
    k: Node
    v: Node
    num_heads: int
    num_kv_heads: int
    head_dim: int
    module_stack_path: str          # dynamo's path of the innermost module around the attention
    occurrence: int                 # index among sites sharing that module path, in graph order
    causal: bool | None             # True/False when declared (is_causal); None: explicit mask
    masked: bool                    # an explicit additive/boolean mask is applied
    o_weight: Node | None = None    # output projection weight (placeholder), if found
    o_layout: str | None = None     # "out_in" (F.linear) or "in_out" (addmm / matmul)
    o_bias: Node | None = None
    o_node: Node | None = None      # the output projection node (linear / addmm / matmul)
    scale: float | None = None      # the softmax scale on q·k (None: not a constant)
    scores: Node | None = None      # hand-written attention: the softmax's input (masked logits)
    kv_heads_read: int = 0          # heads of k and v as the attention reads them (after any repeat)
    v_bias: Node | None = None      # bias of the projection that produces v, if any
    v_bias_chain: list[Node] = field(default_factory=list)  # v_proj output → pre-cache v (replayed on b_V, κ)
    v_proj: Projection | None = None  # the affine projection that produces v, if found
    v_user: Node | None = None      # the node that reads v (the A @ v product, or a view merging heads)
    score_product: Node | None = None  # q·kᵀ (matmul, bmm or baddbmm); None for SDPA
    extra_columns: int = 0          # score columns joined before the softmax and dropped after (sinks)
    gate: Node | None = None        # g of z ⊙ g between z and W_O (Qwen3-Next), laid out as z is there
    head_offset: int = 0            # tensor parallel: this process's first head (global index) and
    kv_head_offset: int = 0         # first kv head; per-head state rows are read from there


def example_value(node) -> torch.Tensor | None:
    val = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _shape(node) -> tuple | None:
    val = example_value(node)
    return tuple(val.shape) if val is not None else None


def _arg(node: Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_call(node, fns=(), methods=()) -> bool:
    if not isinstance(node, Node):
        return False
    if node.op == "call_function":
        return node.target in fns
    if node.op == "call_method":
        return node.target in methods
    return False


def _is_view_like(node: Node) -> bool:
    if _is_call(node, _VIEW_FUNCTIONS, _VIEW_METHODS):
        return True
    # x[i] on the tuple of a split/chunk, or basic slicing of a tensor
    return node.op == "call_function" and node.target is operator.getitem


def _view_input(node: Node) -> Node | None:
    src = node.args[0] if node.args else None
    return src if isinstance(src, Node) else None


def _is_shape_keeping_view(node: Node) -> bool:
    """A view/reshape to the shape it already had (Falcon re-views its scores and probabilities)."""
    return (_is_call(node, (torch.reshape,), ("view", "reshape"))
            and _view_input(node) is not None and _shape(node) == _shape(_view_input(node)))


def _is_head_merge_view(node: Node) -> bool:
    """A view/reshape between [b, H, T, X] and [b·H, T, X]: the heads merged into (or split out
    of) the batch axis, the last two axes kept."""
    if not _is_call(node, (torch.reshape,), ("view", "reshape")) or _view_input(node) is None:
        return False
    before, after = _shape(_view_input(node)), _shape(node)
    if before is None or after is None or sorted((len(before), len(after))) != [3, 4]:
        return False
    return before[-2:] == after[-2:] and math.prod(before[:-2]) == math.prod(after[:-2])


def _four_d(node: Node) -> tuple[Node, Node | None]:
    """(the [b, H, T, X] tensor behind a head-merging view, the view reading it) — or (node, None)
    when node is already 4-D."""
    if _is_head_merge_view(node) and len(_shape(node)) == 3:
        return _view_input(node), node
    return node, None


def _is_seq_cat(node: Node) -> bool:
    """torch.cat of a KV cache: the new keys/values are the last element."""
    if not _is_call(node, (torch.cat, torch.concat, torch.concatenate)):
        return False
    dim = _arg(node, 1, "dim", 0)
    shape = _shape(node)
    return shape is not None and len(shape) == 4 and dim in (-2, 2)


def _walk_back(node: Node, max_steps: int = 32):
    """Yield node and its ancestors through view-like ops and KV-cache concatenation."""
    for _ in range(max_steps):
        yield node
        if _is_seq_cat(node):
            parts = node.args[0]
            node = parts[-1] if isinstance(parts, (list, tuple)) and parts else None
        elif _is_view_like(node):
            node = _view_input(node)
        else:
            return
        if not isinstance(node, Node):
            return


def _count_kv_heads(k: Node, num_heads: int, head_dim: int) -> int:
    """Kv heads: the head axis of k as attention reads it, unless a repeat on the way back
    shows fewer (HF repeat_kv's [b, Hkv, n_rep, T, d] expand, or repeat_interleave on dim 1)."""
    shape = _shape(k)
    counts = [int(shape[1])] if shape is not None and len(shape) == 4 else [num_heads]
    for node in _walk_back(k):
        node_shape = _shape(node)
        # repeat_kv's expand [b, Hkv, n_rep, T, d] (not any 5-D view: a fused qkv permuted to
        # [3, b, H, T, d] has the batch there)
        if (node_shape is not None and len(node_shape) == 5 and node_shape[-1] == head_dim
                and _is_call(node, (), ("expand",))):
            counts.append(int(node_shape[1]))
        if _is_call(node, (torch.repeat_interleave,), ("repeat_interleave",)):
            source = _shape(node.args[0])
            if source is not None and len(source) == 4:
                counts.append(int(source[1]))
    return min(c for c in counts if c > 0 and num_heads % c == 0)


def _matrix(node) -> bool:
    shape = _shape(node)
    return isinstance(node, Node) and shape is not None and len(shape) == 2


def _untransposed(weight, layout: str):
    """(W, layout) with a transpose of a 2-D weight taken into the layout: Falcon's linear is
    x @ W.T, and the parameter, not its transpose, is what W_O must name."""
    if isinstance(weight, Node) and _matrix(weight):
        src = weight.args[0] if weight.args else None
        transposed = (
            (weight.op == "call_function" and weight.target is getattr and weight.args[1:] in (("T",), ("mT",)))
            or _is_call(weight, (torch.t,), ("t",))
            or (_is_call(weight, (torch.transpose,), ("transpose",)) and set(weight.args[1:3]) in ({0, 1}, {-1, -2})))
        if transposed and isinstance(src, Node) and _matrix(src):
            return src, {"in_out": "out_in", "out_in": "in_out"}[layout]
    return weight, layout


def _projection(node: Node) -> Projection | None:
    """node = linear(x, W, b) / addmm(b, x, W) / matmul(x, W) (+ b), with a 2-D W and a 1-D b:
    a plain projection of x's last axis (a batched matmul is not one)."""
    if _is_call(node, (F.linear, torch._C._nn.linear)) and _matrix(node.args[1]):
        bias = _arg(node, 2, "bias")
        return Projection(node, node.args[0], node.args[1], "out_in", bias if isinstance(bias, Node) else None)
    if _is_call(node, (torch.addmm,)) and _matrix(node.args[2]):
        bias = node.args[0]
        return Projection(node, node.args[1], node.args[2], "in_out", bias if isinstance(bias, Node) else None)
    if _is_call(node, _MATMULS, ("matmul",)) and _matrix(node.args[1]):
        return Projection(node, node.args[0], *_untransposed(node.args[1], "in_out"), None)
    if _is_call(node, (operator.add, torch.add), ("add", "__add__")) and len(node.args) == 2:
        a, b = node.args
        for mm, bias in ((a, b), (b, a)):
            bshape = _shape(bias)
            if isinstance(mm, Node) and bshape is not None and len(bshape) == 1:
                inner = _projection(mm) if _is_call(mm, _MATMULS, ("matmul",)) else None
                if inner is not None:
                    return Projection(node, inner.input, inner.weight, inner.layout, bias)
    return None


def _value_projection(v: Node) -> tuple[Projection | None, list[Node]]:
    """v's producing projection, and the view chain from its output to the value tensor as the
    layer made it (before any KV-cache concatenation): replaying the chain on a vector laid out
    like the projection's output (its bias, say) yields that vector per head, in v's layout."""
    path = list(_walk_back(v))
    proj = _projection(path[-1])
    if proj is None:
        return None, []
    chain = []
    for node in reversed(path[:-1]):      # producer's user first
        if _is_seq_cat(node):
            break
        chain.append(node)
    return proj, chain


def _reads_shape_only(node: Node) -> bool:
    """x.size() / x.dim() / sym_size: dynamic-shape graphs read shapes off tensors on the way."""
    return (_is_call(node, (), ("size", "dim")) or
            (node.op == "call_function" and getattr(node.target, "__name__", "") in ("sym_size", "sym_size.int")))


def _gate_operand(node: Node) -> Node | None:
    """The gate g of an elementwise product z ⊙ g on the way from z to W_O (g has z's shape there:
    Qwen3-Next's σ(gate)); the other operand is the z path."""
    if not _is_call(node, (operator.mul, torch.mul), ("mul", "__mul__")) or len(node.args) != 2:
        return None
    a, b = node.args
    if not (isinstance(a, Node) and isinstance(b, Node)) or _shape(a) != _shape(b) or _shape(node) != _shape(a):
        return None
    return b


def _gate(z: Node, o_node: Node | None) -> Node | None:
    """The gate on the single-user path z → W_O, if any (see _output_projection)."""
    node = z
    while o_node is not None and node is not o_node:
        users = [u for u in node.users if not _reads_shape_only(u)]
        if len(users) != 1:
            return None
        user = users[0]
        if user is not o_node and _gate_operand(user) is not None:
            a, b = user.args
            return b if a is node else a
        node = user
    return None


def _output_projection(z: Node, num_heads: int, head_dim: int):
    """Follow z → transpose(1, 2) → reshape [.., H*d] → projection; (node, weight, layout, bias)."""
    node, seen_transpose, none = z, False, (None, None, None, None)
    for _ in range(16):
        users = [u for u in node.users if not _reads_shape_only(u)]
        if len(users) != 1:
            return none
        node = users[0]
        if _is_call(node, (F.linear, torch._C._nn.linear)):
            ok = seen_transpose and _shape(node.args[0])[-1] == num_heads * head_dim
            return (node, node.args[1], "out_in", _arg(node, 2, "bias")) if ok else none
        if _is_call(node, (torch.addmm,)):
            return (node, node.args[2], "in_out", node.args[0]) if seen_transpose else none
        if _is_call(node, _MATMULS, ("matmul",)) and node.args[0] is not z:
            return (node, *_untransposed(node.args[1], "in_out"), None) if seen_transpose else none
        if not (_is_view_like(node) or _gate_operand(node) is not None):
            return none
        shape = _shape(node)
        if shape is not None and len(shape) == 4 and shape[2] == num_heads and shape[3] == head_dim:
            seen_transpose = True          # [b, t, H, d]: heads are now the slower index
    return none


def _is_score_product(node) -> bool:
    return _is_call(node, _SCORE_PRODUCTS, _SCORE_PRODUCT_METHODS)


def _is_score_step(node) -> bool:
    return (_is_call(node, _SCORE_OPS, _SCORE_METHODS) or _is_shape_keeping_view(node)
            or _is_head_merge_view(node) or _is_column_join(node))


def _is_column_join(node) -> bool:
    """torch.cat of the scores with extra columns on the key axis (attention sinks: a per-head
    logit joined before the softmax)."""
    if not _is_call(node, (torch.cat, torch.concat, torch.concatenate)):
        return False
    shape = _shape(node)
    return shape is not None and len(shape) == 4 and _arg(node, 1, "dim", 0) in (-1, 3)


def _score_path(softmax_in: Node) -> list[Node] | None:
    """Walk back from the softmax input through scaling, masking, soft-capping, views and
    joined sink columns to the q·kᵀ product: [softmax_in, …, product], or None."""
    path, node = [], softmax_in
    for _ in range(16):
        path.append(node)
        if _is_score_product(node):
            return path
        if not _is_score_step(node):
            return None
        shape = _shape(node)
        if _is_head_merge_view(node):
            candidates = [_view_input(node)]
        elif _is_column_join(node):
            parts = node.args[0] if isinstance(node.args[0], (list, tuple)) else []
            candidates = [p for p in parts[:1] if isinstance(p, Node)]    # the scores come first
        else:
            candidates = [a for a in node.args if isinstance(a, Node) and _shape(a) == shape]
        node = next((a for a in candidates if _is_score_product(a) or _is_score_step(a)), None)
        if node is None:
            return None
    return None


def _product_operands(product: Node) -> tuple[Node, Node]:
    """(q, kᵀ) of q @ kᵀ, bmm(q, kᵀ) or baddbmm(term, q, kᵀ)."""
    if _is_call(product, (torch.baddbmm,), ("baddbmm",)):
        return _arg(product, 1, "batch1"), _arg(product, 2, "batch2")
    return product.args[0], product.args[1]


def _is_column_drop(node: Node) -> bool:
    """probs[..., :-n]: the joined sink columns dropped after the softmax."""
    if not (node.op == "call_function" and node.target is operator.getitem):
        return False
    index = node.args[1]
    return (isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis
            and isinstance(index[1], slice) and index[1].start in (None, 0) and index[1].step in (None, 1)
            and isinstance(index[1].stop, int) and index[1].stop < 0)


def _value_product(softmax: Node) -> tuple[Node, Node, int] | None:
    """Walk forward from the softmax through casts, dropout, views and a sink-column drop to the
    A @ v product: (product, z as [b, H, t, d], sink columns dropped). Other users of the
    probabilities (returned as `output_attentions`, say) only read them."""
    node, dropped = softmax, 0
    for _ in range(8):
        onward = [u for u in node.users if (_is_call(u, _MATMULS | _BATCH_MATMULS, ("matmul", "bmm"))
                                            and u.args[0] is node)
                  or _is_call(u, (F.dropout,), _CAST_METHODS) or _is_shape_keeping_view(u)
                  or _is_head_merge_view(u) or _is_column_drop(u)]
        if len(onward) != 1:
            return None
        user = onward[0]
        if _is_column_drop(user):
            dropped += -user.args[1][1].stop
        if _is_call(user, _MATMULS | _BATCH_MATMULS, ("matmul", "bmm")):
            if len(_shape(user)) == 4:
                return user, user, dropped
            views = [u for u in user.users if _is_head_merge_view(u)]
            return (user, views[0], dropped) if len(user.users) == 1 and views else None
        node = user
    return None


def value_operand(site: "AttentionSite") -> int:
    """The operand index at which site.v_user reads v: SDPA's value (2), A @ v's right factor (1),
    or the input of the view merging heads into the batch axis (0)."""
    if site.pattern == "sdpa_call":
        return 2
    return 1 if site.v_user is site.score_product or _is_call(site.v_user, _MATMULS | _BATCH_MATMULS, ("matmul", "bmm")) else 0


def score_operands(site: "AttentionSite") -> list[tuple[Node, int]]:
    """(node, operand index) of q and kᵀ in the hand-written score product."""
    product = site.score_product
    if product is None:
        return []
    first = 1 if _is_call(product, (torch.baddbmm,), ("baddbmm",)) else 0
    return [(product, first), (product, first + 1)]


def _match_sdpa(node: Node):
    if not _is_call(node, (F.scaled_dot_product_attention,)):
        return None
    q, k, v = _arg(node, 0, "query"), _arg(node, 1, "key"), _arg(node, 2, "value")
    mask = _arg(node, 3, "attn_mask")
    causal = bool(_arg(node, 5, "is_causal", False))
    scale = _arg(node, 6, "scale", None)
    if scale is None and _shape(q) is not None:
        scale = 1.0 / math.sqrt(_shape(q)[-1])
    scale = float(scale) if isinstance(scale, (int, float)) else None
    return dict(pattern="sdpa_call", attn=node, q_user=node, q=q, k=k, v=v,
                causal=causal if mask is None else None, masked=mask is not None, scale=scale, scores=None)


def _match_flex(node: Node):
    """flex attention's output (graph/flex.py: flex_output(q, key=k, value=v, score_mod=...,
    block_mask=...)): masking and score changes live in score_mod and block_mask, which stay."""
    if not (node.op == "call_function" and node.target is flex_output):
        return None
    q, k, v = node.args[0], node.kwargs["key"], node.kwargs["value"]
    scale = node.kwargs.get("scale")
    scale = float(scale) if isinstance(scale, (int, float)) else None
    return dict(pattern="flex_attention", attn=node, q_user=node, q=q, k=k, v=v, causal=None, masked=True,
                scale=scale, scores=None)


def _match_matmul_softmax(node: Node):
    if not (_is_call(node, _SOFTMAXES, ("softmax",))):
        return None
    dim = _arg(node, 1, "dim", None)
    shape = _shape(node)
    if shape is None or len(shape) != 4 or dim not in (-1, 3):
        return None
    path = _score_path(node.args[0])
    found = _value_product(node)
    if path is None or found is None:
        return None
    product, z, dropped = found
    joined = sum(int(_shape(n)[-1]) - int(_shape(_arg(n, 0, "tensors")[0])[-1]) for n in path if _is_column_join(n))
    if joined != dropped:
        return None                    # sink columns must be joined before and dropped after
    q_t, k_t = _product_operands(path[-1])
    q, q_user = _four_d(q_t)
    k_t4, _ = _four_d(k_t)
    k = k_t4.args[0] if _is_call(k_t4, (torch.transpose,), ("transpose", "mT")) else k_t4
    k, _ = _four_d(k)
    v, v_user = _four_d(product.args[1])
    masked = any(_is_call(n, (operator.add, operator.iadd, torch.add, torch.where, torch.masked_fill),
                          ("add", "masked_fill", "__add__")) for n in path[:-1])
    masked = masked or _is_call(path[-1], (torch.baddbmm,), ("baddbmm",))
    return dict(pattern="matmul_softmax_matmul", attn=z, q_user=q_user or path[-1], q=q, k=k, v=v,
                causal=None, masked=masked, scale=_chain_scale(path), scores=node.args[0],
                v_user=v_user or product, score_product=path[-1], extra_columns=joined)


def _chain_scale(chain: list[Node]) -> float | None:
    """The constant factor that scaling ops between q @ kᵀ and the softmax apply (None if any
    factor is a tensor)."""
    scale = 1.0
    for node in chain:
        if _is_call(node, _NONLINEAR_SCORE_OPS, _NONLINEAR_SCORE_METHODS):
            return None                        # soft-capped: no single factor
        if _is_call(node, (torch.baddbmm,), ("baddbmm",)):
            alpha = _arg(node, 4, "alpha", 1)
            if not isinstance(alpha, (int, float)):
                return None
            scale *= alpha
        numbers = [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        if _is_call(node, (operator.mul, operator.imul, torch.mul), ("mul", "__mul__")):
            if len(numbers) != 1:
                return None
            scale *= numbers[0]
        elif _is_call(node, (operator.truediv, operator.itruediv, torch.div), ("div", "__truediv__")):
            if len(numbers) != 1 or node.args[1] is not numbers[0]:
                return None
            scale /= numbers[0]
    return scale


def _module_stack_path(node: Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def find_sites(graph: Graph) -> tuple[list[AttentionSite], list[str]]:
    """All attention sites of a graph in graph order, and notes on near-misses (candidates
    that matched a pattern but have a layout attnfx does not handle)."""
    sites, notes, occurrences = [], [], {}
    for node in graph.nodes:
        match = _match_sdpa(node) or _match_flex(node) or _match_matmul_softmax(node)
        if match is None:
            continue
        pattern, attn, q_user, q, k, v = (match[key] for key in ("pattern", "attn", "q_user", "q", "k", "v"))
        causal, masked, scale, scores = (match[key] for key in ("causal", "masked", "scale", "scores"))
        zshape = _shape(attn)
        if zshape is None or len(zshape) != 4 or not all(isinstance(x, Node) for x in (q, k, v)):
            notes.append(f"{pattern} at node {attn.name}: output is not [batch, heads, seq, head_dim]")
            continue
        num_heads, head_dim = int(zshape[1]), int(zshape[3])
        path = _module_stack_path(attn)
        occurrence = occurrences.get(path, 0)
        occurrences[path] = occurrence + 1
        site = AttentionSite(
            pattern=pattern, attn=attn, q_user=q_user, q=q, k=k, v=v,
            num_heads=num_heads, num_kv_heads=_count_kv_heads(k, num_heads, head_dim),
            head_dim=head_dim, module_stack_path=path, occurrence=occurrence,
            causal=causal, masked=masked, scale=scale, scores=scores,
            kv_heads_read=int(_shape(k)[1]) if _shape(k) is not None and len(_shape(k)) == 4 else num_heads,
            v_user=match.get("v_user", attn), score_product=match.get("score_product"),
            extra_columns=match.get("extra_columns", 0))
        site.o_node, site.o_weight, site.o_layout, site.o_bias = _output_projection(attn, num_heads, head_dim)
        site.gate = _gate(attn, site.o_node)
        site.v_proj, site.v_bias_chain = _value_projection(v)
        site.v_bias = site.v_proj.bias if site.v_proj is not None else None
        sites.append(site)
    return sites, notes
