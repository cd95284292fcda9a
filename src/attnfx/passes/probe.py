"""Probe pass: give components of each layer runtime handles that attribution and patching need,
all as graph inputs (runtime state), all exact in the forward:

    x ← lerp(x, source, w)            patch   (w = 0: x; w = 1: source, bit for bit)
    x ← x + δ                         delta   (δ = 0 requiring grad: ∂f/∂δ = ∂f/∂x)
    record x                          capture (an extra graph output)
    x ← x · gate                      gate    (gate = 1 requiring grad: ∂f/∂gate = Σ_d x ⊙ ∂f/∂x,
                                               in fp32 — the relevance under the lrp pass's rules)
    x ← x̄ + keep_l · (x − x̄)          graddrop on attention / MLP outputs (x̄ = x.detach():
                                               keep_l = 0 stops the gradient through layer l)

Components: the token embedding, each layer's residual stream, attention output and MLP output
(state [L, b, t], sources [L, b, t, d]), head outputs z, queries and keys (state [L, b, t, H],
sources [L, b, t, H, d], as SDPA reads them: the steered z and q, the keys after any cache).

A state is sized for the longest component (encoder and decoder layers differ) and the widest
layer: each component reads exactly its first t positions (its own size at run time) and heads.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node

from ..graph.blocks import Blocks, is_flat_stream
from ..errors import UnsupportedModelError
from ..graph.sites import AttentionSite, _arg, example_value, value_operand
from ..state.spec import HEAD_KINDS, Spec, gate_name
from . import stats
from ._build import call, right_after
from .positions import stream_addition
from .record import RecordKey, head_output


def targets(sites, blocks: Blocks, steered: dict[int, Node]) -> dict[str, list[tuple[int, Node | None]]]:
    """Each kind's node per layer. "heads" is what a head adds to the stream before W_O: the
    steered z, or on a gated site z ⊙ g per head (made here, once: W_O then reads it), so that
    patching a head there patches what W_O reads, not z under a gate recomputed from the input."""
    layers = [layer for layer, _ in sites]
    return {"tokens": [(-1, blocks.tokens)], "resid": list(zip(layers, blocks.resid_pre)),
            "queries": [(layer, _arg(site.q_user, 0, "query")) for layer, site in sites],
            "keys": [(layer, site.k) for layer, site in sites],
            "values": [(layer, _value_operand(site)) for layer, site in sites],
            "heads": [(layer, head_output(site, steered.get(layer))) for layer, site in sites],
            "attn": list(zip(layers, blocks.attn_out)), "mlp": list(zip(layers, blocks.mlp_out)),
            "mlp_hidden": list(zip(layers, blocks.mlp_hidden or [])),
            "resid_mid": list(zip(layers, blocks.resid_mid or []))}


def apply(gm: GraphModule, sites: list[tuple[int, AttentionSite]], blocks: Blocks, steered: dict[int, Node],
          spec: Spec, state: dict[str, Node], final_norm_input: Node | None = None
          ) -> tuple[dict[str, list[int]], list[tuple[RecordKey, Node]]]:
    """Instrument every component the spec names; returns, per kind, the layers instrumented
    (-1: tokens), and the captured records. "final" (the final norm's input, one row 0) takes
    steering vectors only: the stream leaving a decoder's last block."""
    g, latest, touched, records = gm.graph, {}, {}, []
    wanted = set(spec.probes) | set(spec.patches) | set(spec.deltas) | set(spec.captures) | set(spec.vectors)
    if spec.graddrop:
        wanted |= {"attn", "mlp"}
    found_targets = targets(sites, blocks, steered)
    found_targets["final"] = [(0, final_norm_input)]
    for kind, found in found_targets.items():
        if kind not in wanted:
            continue
        touched[kind] = []
        captured_only = kind not in spec.probes + spec.patches + spec.deltas + spec.vectors and not (
            spec.graddrop and kind in ("attn", "mlp"))
        for layer, node in found:
            if not isinstance(node, Node):
                continue
            if captured_only and spec.capture_layers is not None and layer not in spec.capture_layers:
                continue                                # a capture of a layer nobody asked for
            while latest.get(node, node) is not node:   # probed before (tokens = resid 0); a capture
                node = latest[node]                     # alone leaves the node itself (cross-attention's
                                                        # resid: one encoder output for every layer)
            tokens = _tokens_shape(g, node, blocks) if kind not in HEAD_KINDS else None
            latest[node] = _instrument(g, node, kind, layer, spec, state, records, tokens)
            touched[kind].append(layer)
    asked = [(layer, site) for layer, site in sites if spec.capture_layers is None or layer in spec.capture_layers]
    if "scores" in spec.captures:
        _capture_scores(g, asked, records)
    if "stats" in spec.captures:
        stats.capture(g, asked, state["stats_spans"], records)
    return touched, records


def _tokens_shape(g, x: Node, blocks: Blocks) -> Node | None:
    """For a component computed with its tokens flattened ([b·t, d]: is_flat_stream), the [b, t]
    it views back to, read at run time off the last [b, t, d] component before it; else None."""
    d_model = example_value(x).shape[-1]
    if not is_flat_stream(x, d_model):
        return None
    before = set()
    for node in g.nodes:
        if node is x:
            break
        before.add(node)
    streams = [n for n in [blocks.tokens, *blocks.resid_pre, *blocks.attn_out, *blocks.mlp_out]
               if n in before and not is_flat_stream(n, d_model) and len(example_value(n).shape) == 3]
    if not streams:
        raise UnsupportedModelError(f"a [b·t, d] residual-stream component ({x.name}) with no [b, t, d] "
                                    "component before it to read b and t from")
    order = {node: i for i, node in enumerate(g.nodes)}
    return max(streams, key=order.__getitem__)


def _instrument(g, x: Node, kind: str, layer: int, spec: Spec, state, records, tokens: Node | None = None) -> Node:
    """Instrument x. `tokens`: a [b, t, d] node whose b and t a flattened x ([b·t, d]) is viewed
    back to, so that every kind's state and records keep their [b, t, ...] layout."""
    users = list(x.users)
    dtype = example_value(x).dtype
    heads = kind in HEAD_KINDS
    with g.inserting_before(right_after(x)):
        flat = x
        if tokens is not None:
            x = call(g, "view", flat, call(g, "size", tokens, 0), call(g, "size", tokens, 1), -1)
        y = x
        fit = _fit(g, x, heads) if kind in spec.patches + spec.deltas + spec.probes else None
        if kind in spec.patches:
            weight = _layout(g, _pick(g, state[f"patch_w_{kind}"], layer, fit, per_dim=False), heads, per_dim=False)
            source = _layout(g, _pick(g, state[f"patch_src_{kind}"], layer, fit, per_dim=True), heads, per_dim=True)
            y = call(g, torch.lerp, y, call(g, "to", source, dtype), call(g, "to", weight, dtype))
        if kind in spec.deltas:
            delta = _layout(g, _pick(g, state[f"delta_{kind}"], layer, fit, per_dim=True), heads, per_dim=True)
            y = call(g, operator.add, y, call(g, "to", delta, dtype))
        if kind in spec.vectors:                # steering vectors [G, d]: group 0 at every position
            vectors = call(g, operator.getitem, state[f"vector_{kind}"], layer)
            added = (stream_addition(g, state, vectors, y) if spec.positions
                     else call(g, operator.getitem, vectors, 0))
            y = call(g, operator.add, y, call(g, "to", added, dtype))
        if kind in spec.captures:
            kept = call(g, "transpose", y, 1, 2) if heads else y                # [b, t(, H), d]
            if spec.capture_at:                 # one position per row: O(b·d), not the whole sequence
                kept = _at_positions(g, kept, state["capture_at"], heads)
            elif _mutated_later(y, users):      # Falcon: mlp_output += attn
                kept = call(g, "clone", kept)
            records.append((RecordKey(f"capture:{kind}", layer), kept))
        if kind in spec.probes:
            gate = _layout(g, _pick(g, state[gate_name(kind)], layer, fit, per_dim=False), heads, per_dim=False)
            wide = call(g, "to", y, torch.promote_types(dtype, torch.float32))      # fp32, or fp64 for fp64
            y = call(g, "to", call(g, operator.mul, wide, gate), dtype)
        if spec.graddrop and kind in ("attn", "mlp"):
            frozen = call(g, "detach", y)
            keep = call(g, "to", _pick(g, state["grad_keep"], layer), dtype)
            y = call(g, operator.add, frozen, call(g, operator.mul, call(g, operator.sub, y, frozen), keep))
        if y is not x and flat is not x:
            y = call(g, "view", y, call(g, "size", flat, 0), -1)
    if y is x:
        return flat
    for user in users:
        user.replace_input_with(flat, y)
    y.meta.update(flat.meta)
    return y


_IN_PLACE = (operator.iadd, operator.isub, operator.imul, operator.itruediv)


def _mutated_later(y: Node, users) -> bool:
    """An in-place op (x += ...) reads the captured tensor: the record must be a copy."""
    return any(_is_in_place(u) for u in list(users) + list(y.users))


def _is_in_place(node: Node) -> bool:
    if node.op == "call_function":
        return node.target in _IN_PLACE
    return node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_") \
        and not node.target.startswith("_")


def _value_operand(site: AttentionSite) -> Node:
    return _arg(site.v_user, value_operand(site), "value")


def _capture_scores(g, sites, records) -> None:
    """Each layer's masked logits [b, H, T, S] in fp32: the softmax input of a hand-written
    attention, recomputed from the (steered) q and k for SDPA."""
    for layer, site in sites:
        if site.scores is not None:
            wide = torch.promote_types(example_value(site.scores).dtype, torch.float32)
            with g.inserting_before(site.scores.next):
                records.append((RecordKey("capture:scores", layer), call(g, "to", site.scores, wide)))
            continue
        node = site.attn
        with g.inserting_before(node):
            scores = call(g, sdpa_scores, _arg(node, 0, "query"), _arg(node, 1, "key"), _arg(node, 3, "attn_mask"),
                          bool(_arg(node, 5, "is_causal", False)), site.scale)
        records.append((RecordKey("capture:scores", layer), scores))


def sdpa_scores(q, k, attn_mask, is_causal: bool, scale: float):
    """SDPA's logits as it masks them: q kᵀ · scale + mask (bool: −inf where False; causal: top-left),
    in fp32 (fp64 for fp64 inputs)."""
    wide = torch.promote_types(q.dtype, torch.float32)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.to(wide) @ k.to(wide).transpose(-1, -2)).mul_(scale)     # in place: one t × s tensor
    if is_causal:
        scores.masked_fill_(torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).triu_(1),
                            float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores.masked_fill_(~attn_mask, float("-inf"))
        else:
            scores.add_(attn_mask.to(wide))
    return scores


def _at_positions(g, x: Node, positions: Node, heads: bool) -> Node:
    """x [b, t(, H), d] at one position per row ([b] int64) → [b(, H), d]; a gather, so a copy."""
    index = call(g, "view", positions, -1, 1, 1, 1) if heads else call(g, "view", positions, -1, 1, 1)
    return call(g, "squeeze", call(g, torch.take_along_dim, x, index, 1), 1)


def _fit(g, x: Node, heads: bool) -> tuple:
    """The component's length (its size at run time: dynamic shapes) and, for head kinds, (H, d).
    The size is read off a detached x, or the lrp plan would see the gate as a second activation."""
    frozen = call(g, "detach", x)
    if not heads:                                                            # x: [b, t, d]
        return (call(g, "size", frozen, 1),)
    shape = example_value(x).shape                                           # x: [b, H, t, d]
    return call(g, "size", frozen, 2), shape[1], shape[3]


def _pick(g, state: Node, layer: int, fit: tuple | None = None, *, per_dim: bool = False) -> Node:
    """The layer's slice of a state [L, b, t(, H)(, d)] ([b, t(, d)] for tokens, layer −1) cut to
    `fit`: exactly its first t positions (narrow: a shorter state fails, never broadcasts a length
    of 1) and for head kinds its first H heads (and d dims). No fit: the layer's entry alone."""
    if fit is None:
        return call(g, operator.getitem, state, layer)
    length, *widths = fit
    if layer >= 0:                                                      # tokens: no layer, no heads
        heads = (slice(None, widths[0]),) + ((slice(None, widths[1]),) if per_dim else ()) if widths else ()
        state = call(g, operator.getitem, state, (layer, slice(None), slice(None)) + heads)
    return call(g, torch.narrow, state, 1, 0, length)


def _layout(g, value: Node, heads: bool, per_dim: bool) -> Node:
    """State [b, t(, H)] / sources [b, t(, H), d] → broadcastable against the component:
    [b, t, 1] / [b, t, d], or for head kinds [b, H, t, 1] / [b, H, t, d]."""
    if heads:
        if per_dim:
            return call(g, "permute", value, 0, 2, 1, 3)
        return call(g, "unsqueeze", call(g, "permute", value, 0, 2, 1), -1)
    return value if per_dim else call(g, "unsqueeze", value, -1)
