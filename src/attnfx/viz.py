"""Plots for reports: a layer × head heatmap and a steering sweep curve.

Figures are built with `matplotlib.figure.Figure` and written through its own Agg canvas, so
nothing here touches pyplot's global state or the process-wide matplotlib backend.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["head_heatmap", "sweep_curve"]


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


def sweep_curve(scales: Sequence[float], values: Sequence[float], path: str | Path, *, title: str,
                xlabel: str, ylabel: str, baseline: float | None = None) -> Path:
    """Write a metric against a steering factor; `baseline` is drawn as a dashed line."""
    fig = _figure(5.0, 3.4)
    ax = fig.add_subplot()
    ax.plot(list(scales), list(values), marker="o")
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="gray", lw=1, label="unsteered")
        ax.legend(fontsize=8)
    ax.axvline(1.0, ls=":", color="gray", lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
