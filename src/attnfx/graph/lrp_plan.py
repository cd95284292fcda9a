"""Which AttnLRP rule applies where in a graph (docs/design.md §3) — a pure analysis shared by the
efficient rewrite (passes/lrp.py) and the explicit-rule reference (analysis/lrp_explicit.py).

Relevance flows along *activations*: nodes computed from the token embeddings or a float user
input. Parameters, buffers, runtime state, masks and positions are constants. Of the activation
nodes on a path to an output (live), each is:

* a norm (LayerNorm / RMSNorm), or a division by → σ (the divisor) held constant; MoE routing
  an activation (x / Σ x)                          weights renormalised over the top-k are this
* an SDPA call                                  → q, k ¼ and v ½ of their gradient (CP-LRP: q, k
                                                  detached); a hand-written attention needs no
                                                  entry: its two matmuls are products
* a product of two activations (mul, matmul...) → uniform rule: each operand ½ of its gradient
* an elementwise nonlinearity of one activation → identity rule: Jacobian f(x)/x, for a named
  (GELU, SiLU, tanh...) or a hand-written one      activation, or for a whole region of
                                                  elementwise ops on one root (tanh-GELU)
* linear in its activation inputs (linear, add, views, casts, mean, softmax...) → the plain
  gradient (ε-rule; the DTD softmax rule falls out of the gradient)
* anything else                                 → a leak: reported, not guessed

Under the "direct" rule (no relevance rule: direct logit attribution by a gradient) every
branch's reads are cut — each site's q, k, v (and gate), each MLP's hidden activation: their
uses read them detached — and norms hold σ: the gradient runs along the residual stream alone.
Any product, nonlinearity or attention still live on that path is a leak: it is not linear once
frozen.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node

from .blocks import ACTIVATION_FNS, ACTIVATION_METHODS, ELEMENTWISE_FNS, ELEMENTWISE_METHODS
from .norms import Norm, find_norms
from ..ops import attention as _registers_the_op  # noqa: F401  (torch.ops.attnfx.attention)
from .sites import AttentionSite, _is_call, _is_view_like, example_value, score_operands

_SDPA = (F.scaled_dot_product_attention,)
_PRODUCTS_FN = {operator.mul, operator.imul, torch.mul, torch.matmul, operator.matmul, torch.bmm, torch.einsum,
                torch.baddbmm}
_PRODUCTS_METHODS = {"mul", "mul_", "matmul", "bmm", "__mul__", "__rmul__", "__matmul__", "__imul__"}
_DIVISIONS_FN = {operator.truediv, operator.itruediv, torch.div, torch.true_divide}
_DIVISIONS_METHODS = {"div", "div_", "__truediv__", "__itruediv__", "true_divide"}
_LINEAR_FN = {operator.add, operator.sub, operator.neg, operator.iadd, operator.isub, torch.topk, torch.gather,
              torch.index_select, torch.scatter_add, torch.index_add, operator.truediv, operator.getitem, torch.add, torch.sub,
              torch.neg, torch.div, torch.cat, torch.concat, torch.stack, torch.reshape, torch.transpose,
              torch.permute, torch.flatten, torch.unflatten, torch.unsqueeze, torch.squeeze, torch.chunk, torch.split, torch.mean,
              torch.sum, torch.repeat_interleave, F.linear, torch._C._nn.linear, torch.addmm, F.dropout,
              F.embedding, torch.where, torch.masked_fill, torch.softmax, F.softmax, F.pad, torch.clone, torch.lerp,
              torch.ops.attnfx.attention.default}
_LINEAR_METHODS = {"add", "sub", "neg", "div", "view", "reshape", "transpose", "permute", "contiguous", "expand",
                   "unsqueeze", "squeeze", "flatten", "unflatten", "chunk", "split", "clone", "repeat_interleave", "to",
                   "float", "half", "bfloat16", "double", "type", "mean", "sum", "masked_fill", "softmax",
                   "expand_as", "repeat", "__add__", "__radd__", "__sub__", "__rsub__", "__truediv__", "__neg__",
                   "__getitem__", "type_as", "view_as", "reshape_as", "t", "narrow", "topk", "gather",
                   "index_select", "index_add", "index_add_", "scatter_add", "add_", "sub_", "__iadd__"}
_NONLINEAR_FN = ACTIVATION_FNS | {torch.pow, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.reciprocal}
_NONLINEAR_METHODS = ACTIVATION_METHODS | {"pow", "exp", "log", "sqrt", "rsqrt", "reciprocal", "__pow__"}
# Named activations with an lrp_act kernel: node → kind.
_NAMED = {F.silu: "silu", F.relu: "relu", torch.relu: "relu", torch.tanh: "tanh", F.tanh: "tanh"}


@dataclass
class Plan:
    norms: list[Norm] = field(default_factory=list)
    sdpa: list[Node] = field(default_factory=list)              # SDPA / attnfx::attention nodes
    detach: list[tuple[Node, int]] = field(default_factory=list)   # (node, operand) held constant: CP-LRP's
                                                                   # q, k; the divisor of a normalisation
    products: list[tuple[Node, tuple[int, ...]]] = field(default_factory=list)  # uniform rule operands
    activations: list[tuple[Node, str]] = field(default_factory=list)  # single named activations
    regions: list[tuple[Node, Node]] = field(default_factory=list)     # (root x, output y): identity rule
    cuts: list[Node] = field(default_factory=list)     # "direct": nodes every use reads detached
    leaks: list[str] = field(default_factory=list)
    live: set = field(default_factory=set)


def _node_args(node: Node) -> list[tuple[int, Node]]:
    """Positional node operands (flattening lists, e.g. torch.cat's) as (position, node)."""
    out = []
    for i, a in enumerate(node.args):
        if isinstance(a, Node):
            out.append((i, a))
        elif isinstance(a, (list, tuple)):
            out.extend((i, x) for x in a if isinstance(x, Node))
    out.extend((-1, v) for v in node.kwargs.values() if isinstance(v, Node))
    return out


def _is_float(node: Node) -> bool:
    """A float tensor (or a tuple holding one: split, chunk), or a node of unknown value; not a
    size, a shape or a symbolic int (an offloaded block's graph reads x.size() of the stream)."""
    if _is_call(node, (), ("size", "dim", "numel")):
        return False
    val = node.meta.get("example_value", node.meta.get("val"))
    if val is None:
        return True
    values = val if isinstance(val, (tuple, list)) else (val,)
    return any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in values)


def _named_kind(node: Node) -> str | None:
    if _is_call(node, (F.gelu,)):
        approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return "gelu_tanh" if approx == "tanh" else "gelu"
    if node.op == "call_function" and node.target in _NAMED:
        return _NAMED[node.target]
    if node.op == "call_method" and node.target in ("tanh", "relu"):
        return node.target
    return None


def _is_grouped_mm(node: Node) -> bool:
    """A grouped (per-expert) matmul: torch._grouped_mm or a library's fallback of it."""
    name = getattr(node.target, "__name__", "") if node.op == "call_function" else ""
    return "grouped_mm" in name


def _is_elementwise(node: Node) -> bool:
    return (_is_call(node, _NONLINEAR_FN, _NONLINEAR_METHODS) or _named_kind(node) is not None
            or _is_call(node, ELEMENTWISE_FNS, ELEMENTWISE_METHODS))


def _is_nonlinear(node: Node, activation_operands: tuple[int, ...]) -> bool:
    """Nonlinear in its activation operands (x / activation, x · x and the functions above)."""
    if _is_call(node, _NONLINEAR_FN, _NONLINEAR_METHODS) or _named_kind(node) is not None:
        return True
    if _is_call(node, _DIVISIONS_FN, _DIVISIONS_METHODS):
        return 1 in activation_operands
    return _is_call(node, _PRODUCTS_FN, _PRODUCTS_METHODS) and len(activation_operands) > 1


def activation_sources(graph: Graph, user_inputs: set[Node]) -> set[Node]:
    """Where relevance lives: embedding lookups and float user inputs (inputs_embeds). In a graph
    after a break the inputs that carry relevance are those that require grad (the stream, from
    the gated graph before), not the rotary cos/sin or a float mask made from positions: when any
    float input requires grad, those are the sources."""
    lookups = {n for n in graph.nodes if _is_call(n, (F.embedding,))}
    floats = {n for n in user_inputs if (v := example_value(n)) is not None and v.is_floating_point()}
    carried = {n for n in floats if example_value(n).requires_grad}
    return lookups | (carried or floats)


def plan(graph: Graph, sources: set[Node], sites: list[AttentionSite], rule: str,
         outputs: list[Node] | None = None, branch_reads: list[Node] = ()) -> Plan:
    """The rules for `graph` under `rule` ("attnlrp", "cp-lrp" or "direct"); sources are the
    activation inputs; outputs the graph outputs relevance starts from (default: all; records are
    not); branch_reads: under "direct", the nodes besides the sites' q, k, v and gates where a
    branch reads the stream (the MLPs' hidden activations)."""
    result = Plan()
    norms = find_norms(graph)
    stops = {n.scale for n in norms if n.scale is not None}          # hand-written 1/σ: detached
    outputs_of_sites = set()
    if rule == "direct":
        reads = [n for site in sites for n in (site.q, site.k, site.v, site.gate)] + list(branch_reads)
        result.cuts = list(dict.fromkeys(n for n in reads if isinstance(n, Node)))
        stops |= set(result.cuts)
        # what a branch writes starts a path of its own: z (read at the heads' gate), the MLP's
        # hidden activation — so norms after them (Gemma-3's, OLMo-2's post-norms) hold σ too
        outputs_of_sites = {site.attn for site in sites}
        sources = set(sources) | outputs_of_sites | set(branch_reads)
    if rule == "cp-lrp":
        for site in sites:
            if site.pattern != "sdpa_call":
                result.detach += score_operands(site)
    detached = {(n, i) for n, i in result.detach}
    tainted = _taint(graph, sources, stops, detached, rule)
    live = _liveness(graph, tainted, stops, outputs)
    result.live = live
    result.norms = [n for n in norms if n.output in live]
    fused_norm_nodes = {n.output for n in result.norms if n.fused}
    roots: dict[Node, frozenset] = {}
    region_of: dict[frozenset, list[Node]] = {}
    operand_index: dict[Node, tuple[int, ...]] = {}
    for node in graph.nodes:
        if node not in live or node.op != "call_function" and node.op != "call_method":
            continue
        operands = [(i, a) for i, a in _node_args(node) if a in tainted and (node, i) not in detached]
        if _is_call(node, _DIVISIONS_FN, _DIVISIONS_METHODS) and any(i == 1 for i, _ in operands):
            result.detach.append((node, 1))                 # x / (a normaliser of activations): held constant
            operands = [(i, a) for i, a in operands if i != 1]
        operand_index[node] = tuple(i for i, _ in operands)
        if node in fused_norm_nodes or node in outputs_of_sites:
            continue
        if _is_call(node, _SDPA) or node.target is torch.ops.attnfx.attention.default:
            result.sdpa.append(node)
            if rule == "cp-lrp":
                result.detach += [(node, 0), (node, 1)]
            continue
        if _is_elementwise(node):
            _elementwise(node, operands, roots, region_of, result)
            continue
        if _is_call(node, _PRODUCTS_FN, _PRODUCTS_METHODS) or _is_grouped_mm(node):
            if len(operands) > 1:                       # else linear in its one activation operand
                result.products.append((node, tuple(i for i, _ in operands)))
        elif not (_is_call(node, _LINEAR_FN, _LINEAR_METHODS) or _is_view_like(node)):
            result.leaks.append(f"{node.name} ({_describe(node)})")
    _regions(result, region_of, operand_index)
    if rule == "direct":
        _not_linear_once_frozen(result)
    return result


def _not_linear_once_frozen(result: Plan) -> None:
    """Under "direct", what a relevance rule would rewrite on the live path makes it nonlinear:
    each is a leak, rewritten by nothing."""
    what = [f"{n.name} (attention, its q, k or v not cut)" for n in result.sdpa]
    what += [f"{n.name} ({_describe(n)}: a product of activations)" for n, _ in result.products]
    what += [f"{n.name} ({_describe(n)})" for n, _ in result.activations]
    what += [f"{out.name} ({_describe(out)})" for _, out in result.regions]
    result.leaks += what
    result.sdpa, result.products, result.activations, result.regions = [], [], [], []


def _elementwise(node: Node, operands, roots: dict, region_of: dict, result: Plan) -> None:
    """Group elementwise nodes by the activation(s) they are computed from (their roots). A
    product of activations with disjoint roots is a uniform-rule product; a mix of several roots
    (a + b) starts a root of its own, as does a product."""
    operand_roots = [roots.get(a, frozenset([a])) for _, a in operands]
    union = frozenset().union(*operand_roots)
    is_mul = _is_call(node, (operator.mul, operator.imul, torch.mul), ("mul", "mul_", "__mul__", "__rmul__", "__imul__"))
    if is_mul and len(operands) > 1 and all(r.isdisjoint(t) for k, r in enumerate(operand_roots)
                                            for t in operand_roots[k + 1:]):
        result.products.append((node, tuple(i for i, _ in operands)))
        roots[node] = frozenset([node])
    elif len(union) > 1:
        roots[node] = frozenset([node])
        if _is_nonlinear(node, tuple(i for i, _ in operands)):
            result.leaks.append(f"{node.name} ({_describe(node)}: a nonlinearity of several activations)")
    else:
        roots[node] = union
        region_of.setdefault(union, []).append(node)


def _regions(result: Plan, region_of: dict, operand_index: dict) -> None:
    """Single-root elementwise regions with a nonlinearity → identity rule on each region output."""
    for root_set, nodes in region_of.items():
        if len(root_set) != 1:
            continue
        members = set(nodes)
        if not any(_is_nonlinear(n, operand_index[n]) for n in nodes):
            continue
        (root,) = root_set
        # the rule covers the nonlinear core; linear ops after it (a soft-cap's · cap, an additive
        # mask of −inf or finfo.min, which would make f(x)/x non-finite) keep the plain gradient
        core: set[Node] = set()
        for node in reversed(nodes):
            if _is_nonlinear(node, operand_index[node]) or any(u in core for u in node.users):
                core.add(node)
        nodes = [n for n in nodes if n in core]
        outputs = [n for n in nodes if any(u not in core for u in n.users)]
        if len(nodes) == 1 and _named_kind(nodes[0]) is not None and nodes[0].args[0] is root:
            result.activations.append((nodes[0], _named_kind(nodes[0])))
        else:
            result.regions += [(root, out) for out in outputs]


def _describe(node: Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    stack = node.meta.get("nn_module_stack") or {}
    where = list(stack.values())[-1][0] if stack else "top level"
    where = re.sub(r"\[(\d+)\]", r".\1", where.split("__self__.")[-1].removeprefix("L['self']."))
    return f"{target} in {where}"


def _taint(graph: Graph, sources: set[Node], stops: set[Node], detached: set, rule: str) -> set[Node]:
    tainted = set()
    for node in graph.nodes:
        if node in sources:
            tainted.add(node)
            continue
        if node.op not in ("call_function", "call_method") or node in stops or not _is_float(node):
            continue
        if node.target in ("detach",) or node.target is torch.detach:
            continue
        operands = [(i, a) for i, a in _node_args(node) if a in tainted and (node, i) not in detached]
        if rule == "cp-lrp" and (_is_call(node, _SDPA) or node.target is torch.ops.attnfx.attention.default):
            operands = [(i, a) for i, a in operands if i not in (0, 1)]
        if operands:
            tainted.add(node)
    return tainted


def _liveness(graph: Graph, tainted: set[Node], stops: set[Node], outputs: list[Node] | None) -> set[Node]:
    """Activation nodes whose value reaches an output through activation nodes."""
    live = set()
    if outputs is None:
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        outputs = [a for _, a in _node_args(output)]
    frontier = [a for a in outputs if a in tainted]
    while frontier:
        node = frontier.pop()
        if node in live:
            continue
        live.add(node)
        frontier.extend(a for _, a in _node_args(node) if a in tainted and a not in stops)
    return live
