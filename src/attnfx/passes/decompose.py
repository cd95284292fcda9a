"""Decompose pass: attention that dynamo keeps as one opaque call becomes its explicit
composition, op for op, before sites are found.

* ``F.multi_head_attention_forward`` (dynamo keeps the function whole; nn.MultiheadAttention
  always reaches it under dynamo, which blocks the module's fused fast path while tracing) →
  the Python function's own ops: in_proj linear → [b, H, t, d] views → SDPA
  (need_weights=False) or q·kᵀ → softmax → ·v (need_weights=True) → out_proj linear.
* ``torch._native_multi_head_attention`` and ``torch._transformer_encoder_layer_fwd`` (the fast
  path nn.TransformerEncoderLayer takes in eval mode under no_grad) → the CPU kernel's steps:
  x·W_inᵀ, + b_in, q·d^-½, q·kᵀ, softmax, ·v, out_proj; and for the layer its norms, residual
  adds and MLP (addmm, relu/gelu, addmm) in the kernel's order.

Each composition replays the same kernels on the same layouts, so its output is the op's output
bit for bit, except where the fused kernel applies a mask (its masked softmax is a different
kernel from softmax on masked scores: equal at round-off, ~1e-7 in fp32). Sites are then found
by the ordinary patterns (sdpa_call, matmul_softmax_matmul).

Why rewrite rather than make dynamo trace the Python path: dynamo keeps the function whole by
its trace rules, and the encoder layer picks its fused op from grad mode and module flags;
changing either takes process-wide switches (dynamo's rules, torch.backends.mha) that attnfx
must not touch, and the bare model under no_grad runs the fused kernel itself, so replaying that
kernel is what is exact to it."""
from __future__ import annotations

import operator
import re

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.fx import GraphModule, Node
from torch.fx.proxy import GraphAppendingTracer, Proxy

from ..errors import UnsupportedModelError
from ..graph.sites import example_value
from ._build import fill_example_values
from ._mha_function import dim, mha_forward
from .flex import split_flex

_MHA = F.multi_head_attention_forward
_NATIVE_MHA = torch._native_multi_head_attention
_ENCODER_LAYER = torch._transformer_encoder_layer_fwd
_ENCODER_ARGS = ("src", "embed_dim", "num_heads", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias",
                 "use_gelu", "norm_first", "eps", "norm_weight_1", "norm_bias_1", "norm_weight_2",
                 "norm_bias_2", "ffn_weight_1", "ffn_bias_1", "ffn_weight_2", "ffn_bias_2", "mask", "mask_type")
_NATIVE_ARGS = ("query", "key", "value", "embed_dim", "num_heads", "qkv_weight", "qkv_bias", "proj_weight",
                "proj_bias", "mask", "need_weights", "average_attn_weights", "mask_type")
_NATIVE_DEFAULTS = dict(mask=None, need_weights=True, average_attn_weights=True, mask_type=None)


def apply(gm: GraphModule) -> int:
    """Rewrite every opaque attention call of gm (and flex attention's tuple output, see
    passes/flex.py); returns the number of rewrites."""
    done = split_flex(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is _MHA:
            done += _rewrite(gm, node, mha_forward)
        elif node.target is _NATIVE_MHA:
            done += _rewrite(gm, node, _native_mha)
        elif node.target is _ENCODER_LAYER:
            done += _rewrite(gm, node, _encoder_layer)
    if done:
        counters["attnfx"]["attention_calls_decomposed"] += done
        fill_example_values(gm)
        gm.graph.lint()
        gm.recompile()
    return done


class _Builder:
    """Emits torch calls on Proxies into the graph before `node`, tagging each new node with the
    module stack it belongs to (sites read the attention's module path from it)."""

    def __init__(self, gm: GraphModule, node: Node):
        self.graph, self.tracer = gm.graph, GraphAppendingTracer(gm.graph)
        self.stack = dict(node.meta.get("nn_module_stack") or {})
        self.proxies: dict[Node, Proxy] = {}

    def __call__(self, value):
        """A Proxy for a node (the same Proxy each time: Python's `is` checks must hold), the value
        itself otherwise."""
        if not isinstance(value, Node):
            return value
        if value not in self.proxies:
            self.proxies[value] = Proxy(value, self.tracer)
        return self.proxies[value]

    def tag(self, before: set[Node], stack: dict) -> None:
        for new in self.graph.nodes:
            if new not in before and new.op in ("call_function", "call_method"):
                new.meta.setdefault("nn_module_stack", dict(stack))


def _rewrite(gm: GraphModule, node: Node, compose) -> int:
    build = _Builder(gm, node)
    before = set(gm.graph.nodes)
    with gm.graph.inserting_before(node):
        outputs = compose(build, node)
    if outputs is None:
        for new in reversed([n for n in gm.graph.nodes if n not in before]):
            gm.graph.erase_node(new)
        return 0
    build.tag(before, build.stack)
    if isinstance(outputs, tuple):                         # users read the tuple with getitem
        for user in list(node.users):
            if user.target is not operator.getitem or outputs[user.args[1]] is None:
                raise RuntimeError(f"attnfx decompose: unexpected use {user.format_node()} of {node.name}")
            _take_over(user, outputs[user.args[1]].node)
        gm.graph.erase_node(node)
    else:
        _take_over(node, outputs.node)
    return 1


def _take_over(old: Node, new: Node) -> None:
    """new replaces old; it has old's value, so a later rewrite reading it finds its shape."""
    if "example_value" in old.meta:
        new.meta.setdefault("example_value", old.meta["example_value"])
    old.replace_all_uses_with(new)
    old.graph.erase_node(old)


def _named(node: Node, names: tuple, defaults: dict) -> dict:
    a = dict(defaults, **dict(zip(names, node.args)))
    a.update(node.kwargs)
    return a


def _native_mha(p: _Builder, node: Node):
    """torch._native_multi_head_attention on self-attention (query is key is value, as the
    nn.MultiheadAttention fast path calls it); other calls raise UnsupportedModelError."""
    a = _named(node, _NATIVE_ARGS, _NATIVE_DEFAULTS)
    if not (a["query"] is a["key"] is a["value"]):
        raise UnsupportedModelError("torch._native_multi_head_attention with distinct query, key and value: "
                                    "attnfx replays it for self-attention only (as nn modules call it)")
    return _native_attention(p, p(a["query"]), example_value(a["query"]), a)


def _native_attention(p: _Builder, x: Proxy, val: torch.Tensor, a: dict):
    """The CPU kernel's steps on x [b, t, E]: qkv = x·W_inᵀ (its gemm) + b_in, q·d^-½ (its
    transform_bias_rescale_qkv), softmax(q·kᵀ) over the unmasked keys, ·v, and out_proj on
    [b, t, H·d] (its transform0213_gemm_nt_bias). Returns (out, averaged or per-head weights)."""
    heads = a["num_heads"]
    bsz, t, embed = dim(x, val, 0), dim(x, val, 1), int(val.shape[2])
    head_dim = embed // heads
    # the kernel computes d^-½ in the activation dtype: 1 / sqrt(d) rounded to it
    inv_sqrt = float(1.0 / torch.tensor(float(head_dim), dtype=val.dtype).sqrt())
    qkv = torch.matmul(x, p(a["qkv_weight"]).t()) + p(a["qkv_bias"])   # F.linear without bias is this matmul
    parts = qkv.chunk(3, -1)
    # the kernel writes q, k, v into one contiguous [3, b, H, t, d] buffer: GEMMs on strided
    # operands can take another path (seen at t = 9)
    q, k, v = ((parts[i] * inv_sqrt if i == 0 else parts[i]).view(bsz, t, heads, head_dim).transpose(1, 2)
               .contiguous() for i in range(3))
    scores = torch.matmul(q, k.transpose(-2, -1))
    mask = p(a["mask"])
    if mask is not None:                   # the kernel reads any mask as boolean: nonzero = masked out
        if example_value(a["mask"]).dtype != torch.bool:
            mask = mask.to(torch.bool)
        if a["mask_type"] == 1:            # key padding [b, s]
            mask = mask.view(bsz, 1, 1, -1)
        scores = scores.masked_fill(mask, float("-inf"))
    weights = torch.softmax(scores, -1)
    z = torch.matmul(weights, v)
    out = F.linear(z.transpose(1, 2).reshape(bsz, t, embed), p(a["proj_weight"]), p(a["proj_bias"]))
    if not a["need_weights"]:
        return out, None
    return out, (weights.sum(1) / heads if a["average_attn_weights"] else weights)


def _encoder_layer(p: _Builder, node: Node):
    """torch._transformer_encoder_layer_fwd: (norm →) self-attention → + src (→ norm), then
    (norm →) linear → relu/gelu → linear → + residual (→ norm), in the kernel's order."""
    a = _named(node, _ENCODER_ARGS, dict(mask=None, mask_type=None))
    src = p(a["src"])
    embed, eps = a["embed_dim"], a["eps"]

    def norm(x, i):
        return F.layer_norm(x, (embed,), p(a[f"norm_weight_{i}"]), p(a[f"norm_bias_{i}"]), eps)

    x = norm(src, 1) if a["norm_first"] else src
    before = set(p.graph.nodes)
    attn, _ = _native_attention(p, x, example_value(a["src"]), dict(a, need_weights=False))
    p.tag(before, _owner_stack(a["qkv_weight"], p.stack))
    x = attn + src
    if not a["norm_first"]:
        x = norm(x, 1)
    residual = x
    if a["norm_first"]:
        x = norm(x, 2)
    hidden = F.linear(x, p(a["ffn_weight_1"]), p(a["ffn_bias_1"]))
    hidden = F.gelu(hidden) if a["use_gelu"] else F.relu(hidden)
    x = F.linear(hidden, p(a["ffn_weight_2"]), p(a["ffn_bias_2"])) + residual
    return norm(x, 2) if not a["norm_first"] else x


_SUBMODULE = re.compile(r"\._modules\['([^']*)'\]")


def _owner_stack(weight: Node, stack: dict) -> dict:
    """The module stack of the module owning `weight` (dynamo's source of the parameter, e.g.
    L['fn']._modules['layers']._modules['0']._modules['self_attn']._parameters['in_proj_weight']):
    the attention then has the module path it has when dynamo traces the Python path."""
    source = getattr(getattr(weight.meta.get("grapharg"), "source", None), "name", None)
    if not isinstance(source, str) or "._parameters[" not in source:
        return stack
    path = _SUBMODULE.sub(r".\1", source.split("._parameters[")[0])
    return dict(stack, **{f"attnfx:{path}": (path, torch.nn.Module)})
