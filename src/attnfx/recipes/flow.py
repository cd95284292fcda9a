"""Information flow routes (Ferrando & Voita 2024): the graph of the edges a prediction uses, from
one forward's per-component decomposition — no patching.

Every residual update is a sum, and each term gets the paper's proximity importance

    prox(c, y) = max(‖y‖₁ − ‖y − c‖₁, 0),   importance(c) = prox(c, y) / Σ_c' prox(c', y)

* attention of layer l at position i: y = x_mid_i (the stream after the attention) = x_i (the
  residual edge) + Σ_j c_j (an edge from position j: c_j = Σ_h A_h[i, j] · v_h[j] W_O^h, or per head
  with heads=True) + b_O (not an edge);
* the MLP: y = x_{l+1, i} = x_mid_i (residual) + m_i (the MLP node); a parallel block has one
  update: y = x_{l+1, i} = x_i + Σ_j c_j + m_i.

Edges at or above `threshold` are kept, walking down from the prediction's stream. The per-source
head writes v_h[j] W_O^h come from a second forward with every head's z patched to its own values
(z_h[j] ← v_h[j]) and its write recorded ("contrib"), so no family's W_O layout is needed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..graph.calls import as_call
from ..errors import InvalidArgumentError, UnsupportedModelError

__all__ = ["FlowGraph", "information_flow", "proximity_importance"]


def proximity_importance(components: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """components [n, ..., d] of total [..., d] → importance [n, ...] (each column sums to 1, or
    to 0 when no component is near)."""
    norm = total.abs().sum(-1)
    prox = (norm - (total - components).abs().sum(-1)).clamp(min=0)
    return prox / prox.sum(0).clamp(min=torch.finfo(prox.dtype).tiny)


@dataclass
class FlowGraph:
    """Nodes are ("resid", l, i) — the stream entering layer l at position i (l = L: the final
    stream) —, ("mid", l, i) — after layer l's attention — and ("mlp", l, i). Edges
    (source, target, importance, kind) with kind "residual", "attention" (per head: "head h"), "mlp"."""
    position: int
    threshold: float
    edges: list[tuple[tuple, tuple, float, str]] = field(default_factory=list)

    def to_json(self, path) -> Path:
        """Write the graph as JSON ({"position", "threshold", "edges": [{"source", "target",
        "importance", "kind"}, ...]}) to `path`; returns it."""
        path = Path(path)
        path.write_text(json.dumps({"position": self.position, "threshold": self.threshold,
                                    "edges": [{"source": list(s), "target": list(t), "importance": w, "kind": k}
                                              for s, t, w, k in self.edges]}, indent=1))
        return path

    def plot(self, path, *, tokens: list[str] | None = None, title: str | None = None) -> Path:
        """Positions across, layers up; an edge's width and opacity follow its importance."""
        from matplotlib.figure import Figure

        def xy(node):
            kind, layer, pos = node
            return pos + (0.25 if kind == "mlp" else 0.0), layer + {"resid": 0.0, "mid": 0.5, "mlp": 0.75}[kind]

        fig = Figure(figsize=(8, 6), dpi=120, layout="constrained")
        ax = fig.add_subplot()
        colours = {"residual": "#777777", "mlp": "#d95f02"}
        for source, target, weight, kind in self.edges:
            (x0, y0), (x1, y1) = xy(source), xy(target)
            ax.plot([x0, x1], [y0, y1], lw=0.5 + 4 * weight, alpha=0.3 + 0.7 * weight,
                    color=colours.get(kind, "#1b9e77"))
        if tokens is not None:
            ax.set_xticks(range(len(tokens)), tokens, rotation=60, fontsize=7)
        ax.set_xlabel("position")
        ax.set_ylabel("layer")
        ax.set_title(title or f"information flow routes to position {self.position} (τ = {self.threshold})")
        fig.savefig(path)
        return Path(path)


def _components(im, args, kwargs):
    """One clean forward's streams, MLP outputs, patterns and values; a second forward with every
    head's z ← its own values, recording each head's write: u_h[j] = v_h[j] W_O^h."""
    sites = im.sites
    if any(s.stack is not None or s.attends != "self" for s in sites):
        raise UnsupportedModelError("information flow routes follow one residual stream: encoder–decoder models "
                                    "are not supported")
    if any(s.gated for s in sites):
        raise UnsupportedModelError("gated heads (z ⊙ g before W_O): a head's write is not linear in its values")
    with torch.no_grad(), im.steering.restoring():
        im.steering.reset()
        with im.record("resid_pre", "resid_mid", "resid_post", "mlp_out", "pattern", "v") as rec:
            im(*args, **kwargs)
        for layer, site in enumerate(sites):
            group = site.num_heads // rec["v", layer].shape[2]
            im.steering.patch(layer, list(range(site.num_heads)), rec["v", layer].repeat_interleave(group, dim=2))
        heads = [(l, h) for l, s in enumerate(sites) for h in range(s.num_heads)]
        with im.record("contrib", heads=heads) as writes:
            im(*args, **kwargs)
    return rec, writes["contrib"]


def information_flow(im, inputs, *, position: int = -1, threshold: float = 0.04, heads: bool = False,
                     example: int = 0) -> FlowGraph:
    """The routes to the prediction at `position` of row `example` of `inputs` (as the model takes
    them: input_ids [b, t], ...): every edge whose importance is ≥ threshold, reached from the
    final stream at that position, from the records resid_pre [b, t, d_model], pattern
    [b, H, t, s] and each head's write [b, t, d_model] per layer."""
    if not 0.0 < threshold < 1.0:
        raise InvalidArgumentError(f"threshold must be in (0, 1), got {threshold!r}")
    args, kwargs = as_call(inputs)
    rec, writes = _components(im, args, kwargs)
    layers = len(im.sites)
    t = rec["resid_pre", 0].shape[1]
    if not -t <= position < t:
        raise InvalidArgumentError(f"position {position} out of range for {t} tokens")
    position %= t
    graph = FlowGraph(position, threshold)
    todo, seen = [("resid", layers, position)], set()
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        for source, weight, kind in _incoming(im, rec, writes, node, example, heads):
            if weight >= threshold:
                graph.edges.append((source, node, weight, kind))
                todo.append(source)
    return graph


def _incoming(im, rec, writes, node, b: int, heads: bool):
    """The edges into a node, with their importances (the node's update decomposed)."""
    kind, layer, i = node
    if kind == "mlp":                                           # the MLP reads its block's stream
        return [(("mid" if rec["resid_mid", layer] is not None else "resid", layer, i), 1.0, "mlp")]
    if kind == "resid" and layer == 0:
        return []                                               # the embeddings
    if kind == "resid":                                         # y = x_{l+1}: after layer l's MLP
        l = layer - 1
        mid = rec["resid_mid", l]
        if mid is None:                                          # parallel block: one update
            return _attention(im, rec, writes, l, i, b, heads, extra=rec["mlp_out", l][b, i])
        y = rec["resid_post", l][b, i]
        weights = proximity_importance(torch.stack([mid[b, i], rec["mlp_out", l][b, i]]), y)
        return [(("mid", l, i), float(weights[0]), "residual"), (("mlp", l, i), float(weights[1]), "mlp")]
    return _attention(im, rec, writes, layer, i, b, heads)     # "mid": y = x_mid after the attention


def _attention(im, rec, writes, l: int, i: int, b: int, heads: bool, extra=None):
    """x_i + Σ_{h, j} A_h[i, j] u_h[j] (+ the MLP's m_i in a parallel block), importance per source."""
    pattern = rec["pattern", l][b, :, i]                        # [H, s]
    site = im.sites[l]
    u = torch.stack([writes[(l, h)][b] for h in range(site.num_heads)])      # [H, s, d]
    per_head = pattern[..., None] * u.float()                   # [H, s, d]
    x = rec["resid_pre", l][b, i].float()
    y = (rec["resid_mid", l] if extra is None else rec["resid_post", l])[b, i].float()
    terms = per_head.flatten(0, 1) if heads else per_head.sum(0)             # [H·s, d] or [s, d]
    parts = [x[None], terms] + ([extra.float()[None]] if extra is not None else [])
    weights = proximity_importance(torch.cat(parts), y)
    out = [(("resid", l, i), float(weights[0]), "residual")]
    s = pattern.shape[-1]
    for k, w in enumerate(weights[1:1 + terms.shape[0]].tolist()):
        source = k % s if heads else k
        out.append((("resid", l, source), w, f"head {k // s}" if heads else "attention"))
    if extra is not None:
        out.append((("mlp", l, i), float(weights[-1]), "mlp"))
    return out
