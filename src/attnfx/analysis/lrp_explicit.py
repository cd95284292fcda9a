"""The explicit-rule reference of AttnLRP / CP-LRP: relevance propagated by each rule's own
formula (custom autograd functions whose backward carries relevance, not gradient), on the same
dynamo graph and the same `lrp_plan` as the efficient pass, but without any of its tricks. The
oracle `attnfx.relevance` is tested against (float64).

    R_x = x ⊙ Jᵀ(R_y / stab(y))          ε-rule: linear ops, norms with σ constant
    R_x = R_y                             identity rule: elementwise nonlinearities
    R_a = ½ a ⊙ J_aᵀ(R_y / y), same for b uniform rule: products of two activations
    R_x = x ⊙ (R_s − s Σ_j R_s,j)         softmax rule (−inf logits: 0)
    SDPA = uniform(q kᵀ·scale) → mask → softmax → uniform(A v)

Data-movement ops (views, slicing, concatenation, casts) pass relevance as autograd passes a
gradient, which is the ε-rule for them. Relevance starts at the output as y ⊙ ∂target/∂y.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F
from torch.fx import Interpreter, Node

from ..graph import lrp_plan
from ..graph.blocks import find_blocks
from ..graph.sites import _VIEW_FUNCTIONS, _VIEW_METHODS, find_sites
from ..graph.norms import PASS_METHODS
from ..passes.record import head_output
from ..graph.unembed import find_final_norm

EPS = 1e-12
_MOVE_FNS = _VIEW_FUNCTIONS | {operator.getitem, torch.cat, torch.concat, torch.stack, F.dropout, torch.clone,
                               torch.topk, torch.sort}
_MOVE_METHODS = _VIEW_METHODS | PASS_METHODS | {"expand_as", "repeat", "view_as", "reshape_as", "type_as", "t"}


def _stab(y):
    return y + EPS * torch.where(y >= 0, 1.0, -1.0).to(y.dtype)


class _Epsilon(torch.autograd.Function):
    """y = fn(*xs); backward: R_x = share · x ⊙ J_xᵀ (R_y / stab(y)) for every x that carries relevance."""

    @staticmethod
    def forward(ctx, fn, share, *xs):
        ctx.fn, ctx.share = fn, share
        ctx.save_for_backward(*xs)
        return fn(*xs)

    @staticmethod
    def backward(ctx, relevance):
        xs = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(ctx.needs_input_grad[2 + i]) for i, x in enumerate(xs)]
            y = ctx.fn(*leaves)
            wanted = [leaf for leaf in leaves if leaf.requires_grad]
            grads = iter(torch.autograd.grad(y, wanted, relevance / _stab(y), allow_unused=True))
        out = [ctx.share * leaf.detach() * _or_zero(next(grads), leaf) if leaf.requires_grad else None
               for leaf in leaves]
        return (None, None, *out)


def _or_zero(grad, like):
    return torch.zeros_like(like) if grad is None else grad


class _Identity(torch.autograd.Function):
    """y = f(x) elementwise (value given); backward R_x = R_y (summed over broadcast dims)."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.shape = x.shape
        return y.clone()

    @staticmethod
    def backward(ctx, relevance):
        return relevance.sum_to_size(ctx.shape), None


class _Softmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim):
        s = torch.softmax(x, dim)
        ctx.save_for_backward(x, s)
        ctx.dim = dim
        return s

    @staticmethod
    def backward(ctx, relevance):
        x, s = ctx.saved_tensors
        out = x * (relevance - s * relevance.sum(ctx.dim, keepdim=True))
        return torch.where(torch.isinf(x), 0.0, out), None


class _Tap(torch.autograd.Function):
    """Identity that stores the relevance arriving at a node."""

    @staticmethod
    def forward(ctx, x, store, key):
        ctx.store, ctx.key = store, key
        return x.clone()

    @staticmethod
    def backward(ctx, relevance):
        ctx.store[ctx.key] = relevance.detach()
        return relevance, None, None


_OUT_OF_PLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                 operator.itruediv: operator.truediv}


def _call(node: Node, args, kwargs):
    """The node's op, out of place (relevance must not be written into a tensor autograd saved)."""
    if node.op == "call_method":
        name = node.target[:-1] if node.target.endswith("_") and not node.target.startswith("__") else node.target
        return getattr(args[0], name)(*args[1:], **kwargs)
    return _OUT_OF_PLACE.get(node.target, node.target)(*args, **kwargs)


def _tensor_slots(args, kwargs):
    """Flatten the tensors of (args, kwargs) and a function rebuilding the call from new tensors."""
    tensors = []

    def strip(value):
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            return _Slot(len(tensors) - 1)
        if isinstance(value, (list, tuple)):
            return type(value)(strip(v) for v in value)
        return value

    template = (strip(list(args)), {k: strip(v) for k, v in kwargs.items()})

    def fill(new):
        def put(value):
            if isinstance(value, _Slot):
                return new[value.index]
            if isinstance(value, (list, tuple)):
                return type(value)(put(v) for v in value)
            return value
        return put(template[0]), {k: put(v) for k, v in template[1].items()}
    return tensors, fill


class _Slot:
    def __init__(self, index):
        self.index = index


class _ExplicitRun(Interpreter):
    def __init__(self, gm, plan: lrp_plan.Plan, sources, taps: dict, store: dict, rule: str):
        super().__init__(gm)
        self.plan, self.sources, self.taps, self.store, self.rule = plan, sources, taps, store, rule
        self.products = dict(plan.products)
        self.activations = {node for node, _ in plan.activations}
        self.region_out = {out: root for root, out in plan.regions}
        self.detached = set(plan.detach)
        self.norms = {n.output: n for n in plan.norms if n.fused}
        self.stops = {n.scale for n in plan.norms if n.scale is not None}
        self.roots = {root: None for root, _ in plan.regions} | {n.args[0]: None for n, _ in plan.activations}

    def run_node(self, node):
        if node.op == "placeholder":
            return _detach(super().run_node(node))
        if node.op == "output":
            return super().run_node(node)
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        args = tuple(_detach(a) if (node, i) in self.detached else a for i, a in enumerate(args))
        value = self._rule(node, args, kwargs)
        if node in self.sources:
            value = value.detach().requires_grad_()
        for key in self.taps.get(node, ()):
            value = _Tap.apply(value, self.store, key)
        if node in self.roots:
            self.roots[node] = value            # the interpreter frees env entries after their last use
        return value

    def _rule(self, node, args, kwargs):
        live = node in self.plan.live
        if not live or node in self.stops:
            with torch.no_grad():
                return _detach(_call(node, _detach(args), _detach(kwargs)))
        if node in self.norms:
            norm = self.norms[node]
            return _Epsilon.apply(lambda x: _frozen_sigma_norm(x, norm, args, kwargs), 1.0, args[0])
        if node in self.plan.sdpa:
            return _sdpa(args, kwargs, self.rule)
        if node in self.activations or node in self.region_out:
            root = self.roots[node.args[0] if node in self.activations else self.region_out[node]]
            with torch.no_grad():
                y = _call(node, _detach(args), _detach(kwargs))
            return _Identity.apply(root, y)
        if _is_softmax(node):
            return _Softmax.apply(args[0], kwargs.get("dim", args[1] if len(args) > 1 else -1))
        if _is_move(node):
            return _call(node, args, kwargs)
        share = 0.5 if node in self.products else 1.0
        tensors, fill = _tensor_slots(args, kwargs)
        return _Epsilon.apply(lambda *ts: _call(node, *fill(ts)), share, *tensors)


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value


def _is_softmax(node):
    return node.target in (torch.softmax, F.softmax) or (node.op == "call_method" and node.target == "softmax")


def _is_move(node):
    if node.op == "call_method":
        return node.target in _MOVE_METHODS
    return node.target in _MOVE_FNS


def _frozen_sigma_norm(x, norm, args, kwargs):
    """The norm with σ from a detached x (identity rule on the normaliser)."""
    weight = args[2] if norm.kind == "layer_norm" and len(args) > 2 else kwargs.get("weight")
    if norm.kind == "rms_norm":
        weight = args[2] if len(args) > 2 else kwargs.get("weight")
        sigma = torch.sqrt(x.detach().pow(2).mean(-1, keepdim=True) + norm.eps)
        return x / sigma * (weight if weight is not None else 1.0)
    bias = args[3] if len(args) > 3 else kwargs.get("bias")
    sigma = torch.sqrt(x.detach().var(-1, unbiased=False, keepdim=True) + norm.eps)
    y = (x - x.mean(-1, keepdim=True)) / sigma
    y = y * weight if weight is not None else y
    return y + bias if bias is not None else y


def _sdpa(args, kwargs, rule):
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    call = dict(zip(names, args), **kwargs)
    q, k, v = call["query"], call["key"], call["value"]
    if rule == "cp-lrp":
        q, k = q.detach(), k.detach()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = call.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    share = 1.0 if rule == "cp-lrp" else 0.5
    scores = _Epsilon.apply(lambda a, b: (a @ b.transpose(-1, -2)) * scale, share, q, k)
    T, S = q.shape[2], k.shape[2]
    mask = call.get("attn_mask")
    if call.get("is_causal"):
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        fill = mask if mask.dtype != torch.bool else torch.where(mask, 0.0, float("-inf")).to(scores.dtype)
        scores = _Epsilon.apply(lambda s: s + fill, 1.0, scores)
    probs = _Softmax.apply(scores, -1)
    return _Epsilon.apply(lambda a, b: a @ b, share, probs, v)


def explicit_relevance(model, inputs: dict, target_fn, rule: str = "attnlrp") -> dict[str, torch.Tensor]:
    """Relevance by the explicit rules on an un-instrumented model: {"tokens": [b, t],
    "heads": [b, t, L, H], "attn" / "mlp" / "resid": [b, t, L]} and "target" [b]."""
    store, outputs = {}, {}
    params = {id(t) for t in list(model.parameters()) + list(model.buffers())}

    def backend(gm, example_inputs):
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        user = {n for n, v in zip(placeholders, example_inputs) if id(v) not in params}
        sites, _ = find_sites(gm.graph)
        heads = [head_output(s, s.attn) for s in sites]       # z, or z ⊙ g per head on a gated site
        final = find_final_norm(gm.graph)
        blocks = find_blocks(gm.graph, sites, user, final.input if final is not None else None)
        sources = lrp_plan.activation_sources(gm.graph, user)
        plan = lrp_plan.plan(gm.graph, sources, sites, rule)
        taps: dict[Node, list] = {}
        for key, node in [("tokens", blocks.tokens)] + [
                ((kind, layer), node) for kind, nodes in (("resid", blocks.resid_pre), ("attn", blocks.attn_out),
                                                          ("mlp", blocks.mlp_out), ("heads", heads))
                for layer, node in enumerate(nodes)]:
            if node is not None:
                taps.setdefault(node, []).append(key)
        outputs["layers"], outputs["leaks"] = len(sites), plan.leaks
        return lambda *a: _ExplicitRun(gm, plan, sources, taps, store, rule).run(*a)

    torch._dynamo.reset()
    out = torch.compile(model, backend=backend)(**inputs)
    torch._dynamo.reset()
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if logits is None:
        logits = out.last_hidden_state
    probe = logits.detach().requires_grad_()
    target = target_fn(probe if isinstance(out, torch.Tensor) else _replace_main(out, probe))
    (grad,) = torch.autograd.grad(target.sum(), probe)
    torch.autograd.backward(logits, probe.detach() * grad)
    return _layout(store, outputs["layers"], target.detach())


def _replace_main(out, tensor):
    name = "logits" if getattr(out, "logits", None) is not None else "last_hidden_state"
    return type(out)(**{**out, name: tensor})


def _layout(store: dict, layers: int, target) -> dict[str, torch.Tensor]:
    result = {"target": target, "tokens": store["tokens"].sum(-1) if "tokens" in store else None}
    for kind in ("resid", "attn", "mlp"):
        per_layer = [store[(kind, l)].sum(-1) for l in range(layers) if (kind, l) in store]
        result[kind] = torch.stack(per_layer, -1) if len(per_layer) == layers else None
    heads = [store[("heads", l)].sum(-1).transpose(1, 2) for l in range(layers) if ("heads", l) in store]
    result["heads"] = torch.stack(heads, 2) if len(heads) == layers else None     # [b, t, L, H]
    result["leaks"] = []
    return result
