"""Attention sinks (Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks"):
each head's attention mass on a sequence's first token(s), over a dataset, from the attention
statistics — the fused kernel's per-span mass, never a head's t × s pattern (issue 16).

    from attnfx import recipes
    sinks = recipes.sinks.sink_mass(im, prompts, tok, first=1)      # [L, H]

sink[l, h] = mean over examples of (mean over the example's real query positions i of
Σ_{j < first} p_lh(i, f + j)), where f is the example's first real token's column. Every example
weighs the same, whatever its length. Right padding puts every row's first real token at column 0;
left padding shifts it per row, and the batch then records one key span per distinct pad offset
(at most batch_size spans), each row reading its own: exact on either side.
"""
from __future__ import annotations

import torch

from .. import data
from ..errors import InvalidArgumentError
from ..state.indices import padded_stack

__all__ = ["sink_mass", "batch_sink_mass", "from_patterns"]


def sink_mass(im, source, tokenizer, *, first: int = 1, batch_size: int = 8, padding_side: str = "right",
              column: str = "text", max_length: int | None = None, progress: bool | None = True) -> torch.Tensor:
    """[L, H] fp32: each head's mean attention mass on the first `first` real tokens of each
    example of `source` (texts, dicts or a datasets.Dataset; see `data.batches`), on the CPU.
    Layers with fewer heads read NaN at the missing ones."""
    _check_first(first)
    analysis = lambda im, batch: {"sink": batch_sink_mass(im, batch, first)}      # noqa: E731
    return data.reduce(im, source, tokenizer, analysis, reduce="mean", batch_size=batch_size,
                       padding_side=padding_side, column=column, max_length=max_length,
                       progress=progress)["sink"]


def batch_sink_mass(im, batch, first: int = 1) -> torch.Tensor:
    """[b, L, H]: each row's mean over its real queries of the mass on its first `first` real
    tokens, in one instrumented call recording "attention_stats". batch: a `data.Batch` or its
    encoding (input_ids, attention_mask [b, t], ...)."""
    _check_first(first)
    encoding = getattr(batch, "encoding", batch)
    mask = encoding["attention_mask"].bool()                          # [b, t]
    starts = _first_columns(mask)
    offsets, which = torch.unique(starts, return_inverse=True)
    spans = torch.stack([offsets, offsets + first], -1).cpu()         # [n, 2]: one span per pad offset
    with torch.no_grad(), im.record("attention_stats", spans=spans) as rec:
        im(**encoding)
    mass = padded_stack(rec["mass"], dim=1, fill=float("nan"))        # [b, L, t, H, n]
    index = which.to(mass.device).view(-1, 1, 1, 1, 1).expand(*mass.shape[:-1], 1)
    own = mass.gather(-1, index).squeeze(-1)                          # [b, L, t, H]: each row's own span
    return _mean_over_queries(own, mask.to(own.device))


def from_patterns(patterns, attention_mask: torch.Tensor, first: int = 1) -> torch.Tensor:
    """Reference in plain torch: [b, L, H] from explicit patterns (a list over layers of
    [b, H, t, s], as rec["pattern"] gives) and the batch's attention_mask [b, t] — what
    `batch_sink_mass` computes without them."""
    _check_first(first)
    mask = attention_mask.bool()
    starts = _first_columns(mask)
    rows = []
    for r, start in enumerate(starts.tolist()):
        per_layer = [p[r, :, :, start:start + first].sum(-1) for p in patterns]   # each [H, t]
        rows.append(padded_stack(per_layer, fill=float("nan")).transpose(1, 2))   # [L, t, H]
    own = torch.stack(rows)                                                       # [b, L, t, H]
    return _mean_over_queries(own, mask.to(own.device))


def _first_columns(mask: torch.Tensor) -> torch.Tensor:
    """[b] long: each row's first real column (argmax finds the first True)."""
    if not bool(mask.any(-1).all()):
        raise InvalidArgumentError("every row needs at least one real token (attention_mask all 0 in a row)")
    return mask.long().argmax(-1)


def _mean_over_queries(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values [b, L, t, H] → [b, L, H]: the mean over each row's real query positions."""
    keep = mask.view(mask.shape[0], 1, -1, 1)
    total = values.masked_fill(~keep, 0).sum(2)
    return total / mask.sum(-1).view(-1, 1, 1)


def _check_first(first) -> None:
    if isinstance(first, bool) or not isinstance(first, int) or first < 1:
        raise InvalidArgumentError(f"first must be a positive int (how many leading tokens are sinks), got {first!r}")
