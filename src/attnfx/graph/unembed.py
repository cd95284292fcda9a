"""Find the path from the residual stream to the logits in a graph, by pattern (docs/design.md §2):

    logits = post(x̂ W_Uᵀ + b_U),   x̂ = norm(x)

* norm: LayerNorm (F.layer_norm or written out), RMSNorm (F.rms_norm or HF's hand-written
  x · rsqrt(mean(x²) + ε) · γ, γ possibly written (1 + w)), or none at all (the identity);
  casts, views, inactive dropout and constant scales (T5's d_model^-½) may sit between it and W_U
* post: casts and any chain of multiplications / divisions by constants or scalar parameters
  (Cohere's logit_scale, Granite's logits_scaling) and additions of a bias vector (BART's
  final_logits_bias), then optionally a soft-cap cap·tanh(l / cap) (Gemma-2), whose input — the
  pre-cap logit — is what direct logit attribution attributes.

Linearised at an input with every norm's σ frozen, the path is linear; anything else on it is
left out of the path (no unembedding found) or, in the stream, left as a "stop" leaf, so that
attribution raises instead of guessing."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.fx import Graph, Node

from .blocks import _as_scale, _through, find_blocks
from .norms import Norm, as_norm
from .sites import _is_call, _shape


@dataclass
class FinalNorm:
    kind: str                 # "layer_norm" | "rms_norm" | "identity" (no norm before W_U)
    input: Node               # the residual stream entering the norm, [b, t, d_model]
    weight: Node | None       # γ (the w of a (1 + w) gain)
    eps: float
    unembed_weight: Node      # W_U
    unembed_layout: str       # "out_in" ([vocab, d_model]) or "in_out" ([d_model, vocab])
    bias: Node | None = None                       # β (LayerNorm)
    weight_offset: float = 0.0                     # gain = offset + γ
    unembed_bias: Node | None = None               # b_U of the linear
    post: list = field(default_factory=list)       # after x̂ W_Uᵀ, innermost first: ("scale" | "inverse",
                                                   # float | Node), ("bias", Node) (b_U included)
    softcap: float | None = None


def _softcap(node):
    """(cap, l) for cap · tanh(l / cap) (or l · (1/cap) inside), else None."""
    outer = _as_scale(node)
    if outer is None or outer[0] != "scale" or not isinstance(outer[1], float):
        return None
    tanh = _through(outer[2])
    if not _is_call(tanh, (torch.tanh, F.tanh), ("tanh",)):
        return None
    inner = _as_scale(_through(tanh.args[0]))
    if inner is None or not isinstance(inner[1], float):
        return None
    cap = inner[1] if inner[0] == "inverse" else 1.0 / inner[1]
    return (outer[1], inner[2]) if abs(cap - outer[1]) <= 1e-6 * abs(cap) else None


def _bias_add(node: Node):
    """(x, b) for x + b with b a [vocab] (or [1, vocab]) graph input (a parameter or buffer)."""
    if not _is_call(node, (operator.add, torch.add), ("add", "__add__")) or len(node.args) != 2:
        return None
    for x, b in (node.args, node.args[::-1]):
        b_ = _through(b)
        if isinstance(b_, Node) and b_.op == "placeholder" and isinstance(x, Node):
            shape = _shape(b_)
            if shape is not None and len(shape) >= 1 and all(s == 1 for s in shape[:-1]):
                return x, b_
    return None


def _logit_path(out: Node):
    """Walk back from a graph output to the unembedding: (linear node, post ops outermost first,
    softcap) or None."""
    post, cap = [], None
    capped = _softcap(_through(out))
    if capped is not None:
        cap, out = capped
    node = _through(out)
    for _ in range(16):
        if _is_call(node, (F.linear, torch._C._nn.linear), ()) or _is_call(node, (torch.matmul, operator.matmul),
                                                                           ("matmul",)):
            return node, post[::-1], cap
        scale, bias = _as_scale(node), _bias_add(node)
        if scale is not None:
            post.append((scale[0], scale[1]))
            node = _through(scale[2])
        elif bias is not None:
            post.append(("bias", bias[1]))
            node = _through(bias[0])
        else:
            return None
    return None


def _unembedding(graph: Graph):
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    for out in output.args[0]:
        found = _logit_path(out) if isinstance(out, Node) else None
        if found is None:
            continue
        linear, post, cap = found
        w = linear.args[1]
        if not isinstance(_through(w), Node) or _through(w).op != "placeholder" or len(_shape(w) or ()) != 2:
            continue
        layout = "out_in" if _is_call(linear, (F.linear, torch._C._nn.linear)) else "in_out"
        bias = linear.args[2] if layout == "out_in" and len(linear.args) > 2 else linear.kwargs.get("bias")
        return linear.args[0], _through(w), layout, bias, post, cap
    return None


def find_final_norm(graph: Graph) -> FinalNorm | None:
    """The final norm → unembedding path of the graph, or None when no output is a linear map of a
    [.., d_model] tensor (plus the post ops above)."""
    found = _unembedding(graph)
    if found is None:
        return None
    normed, w_u, layout, b_u, post, cap = found
    pre, node = [], _through(normed)
    while (scale := _as_scale(node)) is not None:     # x̂ · c before W_U (T5) = (x̂ W_Uᵀ) · c
        pre.append((scale[0], scale[1]))
        node = _through(scale[2])
    # Everything after x̂ W_Uᵀ, innermost first: scales before W_U commute with it; b_U comes next.
    post = pre + ([("bias", b_u)] if isinstance(b_u, Node) else []) + post
    norm: Norm | None = as_norm(node)
    if norm is None:                                  # whatever feeds W_U is the stream; stream_tree judges it
        return FinalNorm("identity", node, None, 0.0, w_u, layout, unembed_bias=b_u, post=post, softcap=cap)
    return FinalNorm(norm.kind, norm.input, norm.weight, norm.eps, w_u, layout, norm.bias, norm.weight_offset,
                     b_u, post, cap)


def unembedding_width(graph: Graph) -> int | None:
    """How many logits the graph's unembedding makes (W_U's vocabulary side), None without one."""
    norm = find_final_norm(graph)
    shape = _shape(norm.unembed_weight) if norm is not None else None
    if shape is None:
        return None
    return int(shape[0] if norm.unembed_layout == "out_in" else shape[-1])


def final_norm_info(graph: Graph, sites, names: dict, keys: list):
    """FinalNormInfo of the graph (None without an unembedding): nodes named by `names`
    (placeholder → parameter name), sites by `keys` ((module path, occurrence), per site)."""
    from .siteinfo import FinalNormInfo
    norm = find_final_norm(graph)
    if norm is None:
        return None
    name = lambda node: names.get(_through(node)) if isinstance(node, Node) else None  # noqa: E731
    post = tuple((op, name(v) if isinstance(v, Node) else v) for op, v in norm.post)
    stream = find_blocks(graph, sites, set(), norm.input).stream if sites else None
    return FinalNormInfo(norm.kind, norm.eps, name(norm.weight), name(norm.unembed_weight), norm.unembed_layout,
                         name(norm.bias), norm.weight_offset, name(norm.unembed_bias), post, norm.softcap,
                         None if stream is None else _describe(stream, sites, name, keys))


def _describe(tree, sites, name, keys) -> tuple:
    """A stream tree (blocks.stream_tree) with names for nodes:
    ("sum", children) ("scale"/"inverse", float | name, child)
    ("norm", (kind, eps, weight, offset, bias), child)
    ("attn", key, (W_O, layout, b_O, gated)) ("mlp", key) ("embed", key) ("const", float | name)
    ("input", what) ("stop", what): not decomposable, `what` says why."""
    kind = tree[0]
    if kind == "sum":
        return ("sum", tuple(_describe(c, sites, name, keys) for c in tree[1]))
    if kind in ("scale", "inverse"):
        factor = tree[1] if not isinstance(tree[1], Node) else name(tree[1])
        return (kind, factor, _describe(tree[2], sites, name, keys))
    if kind == "norm":
        n = tree[1]
        return ("norm", (n.kind, n.eps, name(n.weight), n.weight_offset, name(n.bias)),
                _describe(tree[2], sites, name, keys))
    if kind == "attn":
        site = sites[tree[1]]
        return ("attn", keys[tree[1]], (name(site.o_weight), site.o_layout, name(site.o_bias),
                                        getattr(site, "gate", None) is not None))
    if kind in ("mlp", "embed"):
        return (kind, keys[tree[1]])
    node = tree[1]
    if kind == "const" or (kind == "input" and name(node) is not None):
        return ("const", name(node) if isinstance(node, Node) else node)
    what = f"{node.op} {node.target if isinstance(node.target, str) else getattr(node.target, '__name__', node.target)}" \
        f" ({node.name})"
    return (kind, what)
