"""SHIPS (Zhou et al. 2025, "On the Role of Attention Heads in Large Language Model Safety", ICLR;
arXiv 2410.13708): a head's importance is how far the next-token distribution moves when the
head's query is scaled by a small ε, which flattens its attention towards uniform:

    ships(l, h) = mean over examples of KL(p ‖ p̃_lh),   p = softmax(z), p̃_lh with q_lh ← ε · q_lh

at each example's last real token. The paper runs one forward per head and prompt (batch 1,
hooks). Here the batch is tiled once per head, tile r scaling head r's query on its rows only
(per-row steering), rows_per_forward rows per compiled forward; the last chunk is padded with
unsteered tiles and every tile's row group is registered, so every forward has one shape and
the method compiles nothing after its first call.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..analysis.patching import _tile
from ..graph.calls import as_call, batch_and_length, last_positions, logits_of
from ..errors import InvalidArgumentError, SteeringValueError

__all__ = ["ShipsResult", "head_importance", "kl_last", "DEFAULT_EPS"]

DEFAULT_EPS = 1e-4      # the authors' code (lib/SHIPS/get_ships.py): mask_type "scale_mask", scale_factor 1e-4 on q


@dataclass
class ShipsResult:
    """SHIPS head importance: KL of the last token's distribution under query scaling by ε, per head:
    scores [L, H] fp32 on the CPU (the mean over examples; NaN where a layer lacks the head),
    per_example [b, L, H]."""
    scores: torch.Tensor        # [L, H] fp32 on the CPU: mean over examples of KL(p ‖ p̃); NaN where a layer lacks the head
    per_example: torch.Tensor   # [b, L, H]
    forwards: int               # instrumented forwards run: 1 base + the tiled chunks
    seconds: float


def kl_last(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(base) ‖ softmax(logits)) over the last axis, in nats (fp32): base_logits and logits
    [..., vocab] → [...]. The paper adds 1e-12 to both distributions before the log; this is the
    exact KL from log-softmaxes."""
    logp, logq = torch.log_softmax(base_logits.float(), -1), torch.log_softmax(logits.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


@torch.no_grad()
def head_importance(im, inputs, *, eps: float = DEFAULT_EPS, rows_per_forward: int = 256,
                    progress: bool = True) -> ShipsResult:
    """SHIPS scores of every head on a batch, a ShipsResult (scores [L, H], per_example [b, L, H]):
    inputs a dict / BatchEncoding (input_ids [b, t], attention_mask [b, t] for a padded batch,
    position_ids [b, t] for a left-padded one, as `data.batches` gives). Scored on the unsteered
    model (knobs set before are restored afterwards)."""
    start = time.perf_counter()
    _check_options(eps, rows_per_forward)
    args, kwargs = as_call(inputs)
    batch, _ = batch_and_length(args, kwargs)
    last = last_positions(args, kwargs)                                   # [n] each row's last real token
    if im._sites is None:
        im._discover(args, kwargs)
    counts = [site.num_heads for site in im.sites]
    pairs = [(l, h) for l, count in enumerate(counts) for h in range(count)]
    tiles = max(1, min(len(pairs), rows_per_forward // batch))
    tiled_args, tiled_kwargs = _tile(args, batch, tiles), _tile(kwargs, batch, tiles)
    rows = torch.arange(batch)
    kl = torch.full((batch, len(counts), max(counts)), float("nan"))
    chunks = range(0, len(pairs), tiles)
    with im.steering.restoring():
        im.steering.reset()
        base = _last_logits(im(*args, **kwargs), rows, last)              # [n, V]
        for first in tqdm(chunks, desc="SHIPS", disable=not progress, leave=False):
            chunk = pairs[first:first + tiles]
            im.steering.reset()
            for r in range(tiles):                  # every tile's group: one state layout per forward
                im.steering.positions.group(rows=range(r * batch, (r + 1) * batch))
            for r, (layer, head) in enumerate(chunk):
                im.steering.scale(layer, head, eps, on="query", rows=range(r * batch, (r + 1) * batch))
            out = im(*tiled_args, **tiled_kwargs)
            scaled = _last_logits(out, torch.arange(batch * tiles), last.repeat(tiles))
            scores = kl_last(base.repeat(tiles, 1), scaled).view(tiles, batch).cpu()
            for r, (layer, head) in enumerate(chunk):
                kl[:, layer, head] = scores[r]
    return ShipsResult(kl.mean(0), kl, forwards=1 + len(chunks), seconds=time.perf_counter() - start)


def _last_logits(outputs, rows: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    logits = logits_of(outputs)                                          # [rows, t, V]
    return logits[rows.to(logits.device), last.to(logits.device)]


def _check_options(eps, rows_per_forward) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise SteeringValueError(f"eps must be a finite number ≥ 0 (the query's scale), got {eps!r}")
    if isinstance(rows_per_forward, bool) or not isinstance(rows_per_forward, int) or rows_per_forward < 1:
        raise InvalidArgumentError(f"rows_per_forward must be a positive int, got {rows_per_forward!r}")
