"""LRP pass: AttnLRP / CP-LRP as modified local Jacobians, so that relevance is gradient × input
under the rewritten backward and every fused kernel is kept (docs/design.md §3; the LXT "efficient"
formulation, Achtibat et al. 2024). Applies a `lrp_plan.Plan`; the forward stays exact:

* norm          → attnfx::lrp_layer_norm / lrp_rms_norm (σ constant in the backward), or the
                  hand-written RMSNorm's 1/σ detached
* SDPA          → q, k, v replaced by x.detach() + c·(x − x.detach()) with c = ¼, ¼, ½ (value
                  x, gradient c·grad); attnfx::attention gets lrp=True (the kernel's LRP mode);
                  CP-LRP: q and k detached
* product a·b   → each activation operand's gradient halved the same way (uniform rule)
* f(x)          → attnfx::lrp_act(x, kind, ε) for GELU/SiLU/tanh/ReLU; a hand-written region
                  y = f(x) → y.detach() + (x·c − (x·c).detach()), c = (y / stab(x)).detach()
                  (identity rule: ∂y/∂x := f(x)/x, sign-aware ε)
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from ..graph.lrp_plan import Plan
from ..ops import lrp_rules
from ..graph.sites import _is_call, example_value
from ._build import call, right_after

LRP_EPS = 1e-10          # sign-aware stabiliser of f(x)/x: relevance error ≈ ε·|grad|, negligible in fp32
ATTENTION_GRAD = (0.25, 0.25, 0.5)      # q, k, v: uniform rule on QKᵀ (½) and on A·V (½)
_QKV = ("query", "key", "value")


def apply(gm: GraphModule, plan: Plan, rule: str, *, rule_ops: bool = True) -> int:
    """Rewrite the graph per the plan; returns the number of rewrites. rule_ops=False writes the
    activation and norm rules as plain torch ops instead of attnfx's rule ops, so that Inductor
    can fuse them and recompute them in the backward rather than save what an opaque op returns."""
    g = gm.graph
    for node in plan.cuts:                          # "direct": a branch reads the stream held constant
        with g.inserting_before(right_after(node)):
            frozen = call(g, "detach", node)
        node.replace_all_uses_with(frozen, delete_user_cb=lambda user: user is not frozen)
    for norm in plan.norms:
        _norm(g, norm, rule_ops)
    for node in plan.sdpa:
        _attention(g, node, rule)
    for node, index in plan.detach:                 # CP-LRP's q, k of hand-written attention; divisors
        if node not in plan.sdpa:
            _replace_operand(g, node, index, lambda x: call(g, "detach", x))
    for node, indices in plan.products:
        for index in indices:
            _replace_operand(g, node, index, lambda x: _scaled_grad(g, x, 0.5))
    act = torch.ops.attnfx.lrp_act.default if rule_ops else identity_rule
    for node, kind in plan.activations:
        with g.inserting_before(node):
            new = call(g, act, node.args[0], kind, LRP_EPS)
        _swap(g, node, new)
    for root, out in plan.regions:
        _identity_region(g, root, out)
    return (len(plan.cuts) + len(plan.norms) + len(plan.sdpa) + len(plan.products) + len(plan.activations)
            + len(plan.regions))


# Under Inductor the rules are autograd functions over plain torch ops (the ops' references):
# traced into the graph, their backwards recompute from x alone what the plain backward keeps too,
# so the partitioner saves nothing more than it would for the model (an opaque op's output must be
# saved; detached ratios made it save one [b, t, d_ff] per layer).
class _IdentityRule(torch.autograd.Function):
    """f(x); backward grad · f(x) / stab(x)."""

    @staticmethod
    def forward(ctx, x, kind: str, eps: float):
        ctx.save_for_backward(x)
        ctx.kind, ctx.eps = kind, eps
        return lrp_rules.ACTIVATIONS[kind](x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return lrp_rules.act_backward_reference(grad, x, ctx.kind, ctx.eps), None, None


def identity_rule(x, kind: str, eps: float):
    return _IdentityRule.apply(x, kind, eps)


class _FrozenSigmaNorm(torch.autograd.Function):
    """The fused norm; backward with σ held constant."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, kind: str):
        ctx.save_for_backward(x, weight)
        ctx.eps, ctx.kind = eps, kind
        if kind == "layer_norm":
            return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x, grad_w, grad_b = lrp_rules.norm_backward_reference(grad, x, weight, ctx.eps, ctx.kind)
        grad_w = grad_w if weight is not None else None
        return grad_x, grad_w, (grad_b if ctx.kind == "layer_norm" else None), None, None


def frozen_sigma_norm(x, weight, bias, eps: float, kind: str):
    return _FrozenSigmaNorm.apply(x, weight, bias, eps, kind)


def _swap(g, old: Node, new: Node) -> None:
    new.meta.update(old.meta)
    old.replace_all_uses_with(new)
    g.erase_node(old)


def _scaled_grad(g, x: Node, factor: float) -> Node:
    """x in the forward (x.detach() + 0 exactly), factor · grad in the backward."""
    frozen = call(g, "detach", x)
    return call(g, operator.add, frozen, call(g, operator.mul, call(g, operator.sub, x, frozen), factor))


def _replace_operand(g, node: Node, index: int, make) -> None:
    """Replace the activation operand at positional `index` (or its keyword) of node by make(x)."""
    if index < len(node.args) and isinstance(node.args[index], Node):
        with g.inserting_before(node):
            node.update_arg(index, make(node.args[index]))
        return
    names = ("input", "batch1", "batch2") if _is_call(node, (torch.baddbmm,), ("baddbmm",)) else _QKV
    name = names[index] if index < 3 else None
    if name is not None and isinstance(node.kwargs.get(name), Node):
        with g.inserting_before(node):
            node.update_kwarg(name, make(node.kwargs[name]))


def _norm(g, norm, rule_ops: bool) -> None:
    if not norm.fused:
        scale = norm.scale
        users = list(scale.users)
        with g.inserting_before(scale.next):
            frozen = call(g, "detach", scale)
        for user in users:
            user.replace_input_with(scale, frozen)
        return
    with g.inserting_before(norm.output):
        if not rule_ops:
            new = call(g, frozen_sigma_norm, norm.input, norm.weight, norm.bias, norm.eps, norm.kind)
        elif norm.kind == "layer_norm":
            new = call(g, torch.ops.attnfx.lrp_layer_norm.default, norm.input, norm.weight, norm.bias, norm.eps)
        else:
            new = call(g, torch.ops.attnfx.lrp_rms_norm.default, norm.input, norm.weight, norm.eps)
    _swap(g, norm.output, new)


def _attention(g, node: Node, rule: str) -> None:
    if node.target is torch.ops.attnfx.attention.default:
        if rule == "attnlrp":
            node.update_arg(9, True)                     # the kernel's LRP mode: grad q, k ¼, v ½
        else:
            for index in (0, 1):
                _replace_operand(g, node, index, lambda x: call(g, "detach", x))
        return
    if rule == "cp-lrp":
        for index in (0, 1):
            _replace_operand(g, node, index, lambda x: call(g, "detach", x))
        return
    for index, factor in enumerate(ATTENTION_GRAD):
        _replace_operand(g, node, index, lambda x, f=factor: _scaled_grad(g, x, f))


def _identity_region(g, root: Node, out: Node) -> None:
    """out = f(root) elementwise: keep its value, give it the gradient f(x)/stab(x) w.r.t. root."""
    users = list(out.users)
    dtype = example_value(out).dtype if example_value(out) is not None else None
    with g.inserting_before(out.next):
        x = call(g, "float", root)
        sign = call(g, torch.where, call(g, operator.ge, x, 0), 1.0, -1.0)
        stab = call(g, operator.add, x, call(g, operator.mul, sign, LRP_EPS))
        ratio = call(g, "detach", call(g, operator.truediv, call(g, "float", out), stab))
        through = call(g, operator.mul, x, ratio)
        delta = call(g, operator.sub, through, call(g, "detach", through))
        new = call(g, operator.add, call(g, "detach", out), call(g, "to", delta, dtype) if dtype else delta)
    for user in users:
        user.replace_input_with(out, new)
    new.meta.update(out.meta)
