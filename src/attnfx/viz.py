"""Plots for reports: a layer × head heatmap and answer rates against a steering factor.

Figures are built with `matplotlib.figure.Figure` and written through its own Agg canvas, so
nothing here touches pyplot's global state or the process-wide matplotlib backend.
"""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["head_heatmap", "rate_curves", "patching_heatmap"]


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def head_heatmap(values: torch.Tensor, path: str | Path, *, title: str, label: str,
                 mark: tuple[int, int] | None = None) -> Path:
    """Write a [layers, heads] tensor as a heatmap centred at 0; `mark` outlines one (layer, head)."""
    from matplotlib.patches import Rectangle

    grid = values.detach().float().cpu()                          # [L, H]
    layers, heads = grid.shape
    limit = float(grid.abs().max()) or 1.0
    fig = _figure(1.2 + 0.6 * heads, 1.2 + 0.5 * layers)
    ax = fig.add_subplot()
    image = ax.imshow(grid.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    for (l, h), v in zip(((l, h) for l in range(layers) for h in range(heads)), grid.flatten().tolist()):
        ax.text(h, l, f"{v:.2f}", ha="center", va="center", fontsize=7,
                color="white" if abs(v) > 0.6 * limit else "black")
    if mark is not None:
        ax.add_patch(Rectangle((mark[1] - 0.5, mark[0] - 0.5), 1, 1, fill=False, lw=2, ec="black"))
    ax.set_xticks(range(heads))
    ax.set_yticks(range(layers))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label=label)
    return _save(fig, path)


def rate_curves(sweeps: dict[str, dict], path: str | Path, *, title: str, baseline: float | None = None) -> Path:
    """Answer rates against a steering factor, one colour per swept head: the in-context rate
    solid, the memorised rate dashed. `sweeps`: label → {"points": [{"factor", "in_context",
    "memorised"}, ...]}."""
    fig = _figure(7.6, 3.8)
    ax = fig.add_subplot()
    for (label, sweep), colour in zip(sweeps.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        factors = [p["factor"] for p in sweep["points"]]
        ax.plot(factors, [100 * p["in_context"] for p in sweep["points"]], marker="o", color=colour,
                label=f"{label}: in-context")
        ax.plot(factors, [100 * p["memorised"] for p in sweep["points"]], marker="x", ls="--",
                color=colour, label=f"{label}: memorised")
    if baseline is not None:
        ax.axhline(100 * baseline, ls=":", color="gray", lw=1, label="in-context, unsteered")
    ax.axvline(1.0, ls=":", color="gray", lw=1)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("value scale α (bias-free values)")
    ax.set_ylabel("greedy answers (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # outside: the curves fill the axes
    ax.grid(alpha=0.3)
    return _save(fig, path)


def patching_heatmap(result, path: str | Path, *, title: str | None = None) -> Path:
    """A PatchingResult as a heatmap: layer × head, layer × position, or (head kinds per position)
    one row per (layer, head) against position."""
    grid = result.scores.detach().float().cpu()
    if grid.dim() == 1:
        grid, columns, rows = grid[:, None], [""], [f"L{l}" for l in range(grid.shape[0])]
    elif grid.dim() == 2:
        rows = [f"L{l}" for l in range(grid.shape[0])]
        columns = [str(i) for i in range(grid.shape[1])]
    else:
        layers, heads, seq = grid.shape
        rows = [f"L{l}H{h}" for l in range(layers) for h in range(heads)]
        grid, columns = grid.reshape(layers * heads, seq), [str(t) for t in range(seq)]
    limit = float(grid.abs().max()) or 1.0
    fig = _figure(1.6 + 0.45 * len(columns), 1.2 + 0.3 * len(rows))
    ax = fig.add_subplot()
    image = ax.imshow(grid.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel(result.dims[-1] if len(result.dims) > 1 else "")
    ax.set_title(title or f"{result.method}: {result.component} ({' × '.join(result.dims)})", fontsize=9)
    fig.colorbar(image, ax=ax, label="metric change")
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
