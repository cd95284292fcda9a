"""Perturbation curves and the area between them (ABPC), the faithfulness test of token relevance
used by the AttnLRP paper (Achtibat et al. 2024, after Samek et al. 2017 and Blücher et al. 2024).

For a sentence with n removable tokens (real tokens that are not special: [CLS], [SEP] and padding
are never touched) and a relevance score per token, MoRF removes the k most relevant tokens first
and LeRF the k least relevant first, for k = round(φ·n) at each fraction φ of the sentence's own
length (so sentences of different lengths share the x-axis):

    MoRF(φ) = f(x with the round(φ·n) most relevant tokens removed)
    LeRF(φ) = f(x with the round(φ·n) least relevant tokens removed)
    ABPC    = mean over sentences of ∫₀¹ (LeRF − MoRF) dφ          (trapezoid over the fractions)

A faithful relevance makes MoRF fall fast and LeRF slowly: a large positive ABPC. Reversing the
relevance swaps the curves, so ABPC(−R) = −ABPC(R) (ties aside); random relevance gives ≈ 0.

"Removed" is mode="mask" (the token id becomes [MASK]) or mode="zero" (the scorer is asked to zero
that token's word embedding; the position and token-type embeddings stay). Ties in relevance are
broken by position (earlier first), so the curves are deterministic.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import InvalidArgumentError, ShapeMismatchError

DEFAULT_FRACTIONS = tuple(i / 10 for i in range(11))     # 0, 0.1, …, 1: 11 points per curve
MODES = ("mask", "zero")


@dataclass(frozen=True)
class Curves:
    """MoRF and LeRF curves of a batch of sentences: fractions [F], morf/lerf [b, F] (score after
    removing round(φ·n) tokens), removable [b] (n, the non-special real tokens of each sentence)."""

    fractions: torch.Tensor
    morf: torch.Tensor
    lerf: torch.Tensor
    removable: torch.Tensor

    def abpc(self) -> torch.Tensor:
        """Per-sentence area between LeRF and MoRF (trapezoid over the fraction axis): [b]."""
        return torch.trapezoid(self.lerf - self.morf, self.fractions, dim=-1)

    @staticmethod
    def cat(parts: Sequence[Curves]) -> Curves:
        """Joins the curves of several batches (same fractions) along the sentence axis."""
        if not parts:
            raise InvalidArgumentError("Curves.cat needs at least one Curves")
        for part in parts[1:]:
            if not torch.equal(part.fractions, parts[0].fractions):
                raise ShapeMismatchError("Curves.cat: every part must use the same fractions")
        return Curves(parts[0].fractions, torch.cat([p.morf for p in parts]),
                      torch.cat([p.lerf for p in parts]), torch.cat([p.removable for p in parts]))


def mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / √n) of a 1-d tensor."""
    values = values.double().flatten()
    n = values.numel()
    if n == 0:
        raise InvalidArgumentError("mean_and_stderr of an empty tensor")
    se = float(values.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    return float(values.mean()), se


def removable_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   special_ids: Sequence[int]) -> torch.Tensor:
    """[b, t] bool: real tokens (attention_mask = 1) whose id is not special."""
    special = torch.as_tensor(list(special_ids), dtype=input_ids.dtype, device=input_ids.device)
    return attention_mask.bool() & ~torch.isin(input_ids, special)


def removal_counts(removable: torch.Tensor, fractions: torch.Tensor) -> torch.Tensor:
    """[b, F] int: k = round(φ·n) (halves round up) for each sentence's n removable tokens."""
    n = removable.sum(-1, keepdim=True).double()
    return torch.floor(fractions.double()[None, :] * n + 0.5).long()


def _ranks(relevance: torch.Tensor, removable: torch.Tensor, most_first: bool) -> torch.Tensor:
    """[b, t]: each removable token's place in the removal order (0 = removed first); the
    non-removable ones get places after every removable one, so they are never reached."""
    fill = float("-inf") if most_first else float("inf")
    keyed = relevance.double().masked_fill(~removable, fill)
    order = torch.sort(keyed, dim=-1, descending=most_first, stable=True).indices
    positions = torch.arange(relevance.shape[-1], device=relevance.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def _check(input_ids, attention_mask, relevance, mode, mask_token_id, score, fractions):
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ShapeMismatchError(f"input_ids must be a non-empty [batch, seq], got shape {tuple(input_ids.shape)}")
    for name, t in (("attention_mask", attention_mask), ("relevance", relevance)):
        if tuple(t.shape) != tuple(input_ids.shape):
            raise ShapeMismatchError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                                     f"got {tuple(t.shape)}")
    if not bool(torch.isfinite(relevance).all()):
        raise InvalidArgumentError("relevance has NaN or infinite entries")
    if mode not in MODES:
        raise InvalidArgumentError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "mask" and mask_token_id is None:
        raise InvalidArgumentError("mode='mask' needs mask_token_id (e.g. tokenizer.mask_token_id)")
    if mode == "zero" and "zeroed" not in inspect.signature(score).parameters:
        raise InvalidArgumentError("mode='zero' needs a scorer score(input_ids, attention_mask, zeroed) that "
                                   "zeroes the word embeddings where zeroed [b, t] is True")
    if fractions.dim() != 1 or fractions.numel() < 2:
        raise ShapeMismatchError(f"fractions must be 1-d with ≥ 2 points, got shape {tuple(fractions.shape)}")
    if not bool((fractions >= 0).all() and (fractions <= 1).all() and (fractions.diff() > 0).all()):
        raise InvalidArgumentError(f"fractions must increase strictly within [0, 1], got {fractions.tolist()}")


def _score_chunk(score, ids, mask, removed, mode, mask_token_id) -> torch.Tensor:
    """Scores one chunk of perturbed copies, dropping the columns after every row's last real token."""
    width = int(mask.any(0).nonzero().max()) + 1 if bool(mask.any()) else ids.shape[1]
    ids, mask, removed = ids[:, :width], mask[:, :width], removed[:, :width]
    with torch.no_grad():
        if mode == "mask":
            out = score(ids.masked_fill(removed, mask_token_id), mask)
        else:
            out = score(ids, mask, zeroed=removed)
    if tuple(out.shape) != (ids.shape[0],):
        raise ShapeMismatchError(f"score must return one value per example [{ids.shape[0]}], got {tuple(out.shape)}")
    return out.detach().double().cpu()


def perturbation_curves(score: Callable[..., torch.Tensor], input_ids: torch.Tensor,
                        attention_mask: torch.Tensor, relevance: torch.Tensor, *,
                        special_ids: Sequence[int], mask_token_id: int | None = None, mode: str = "mask",
                        fractions: Sequence[float] | torch.Tensor = DEFAULT_FRACTIONS,
                        batch_size: int = 64, progress: bool | None = None) -> Curves:
    """MoRF and LeRF curves of `relevance` [b, t] under the scorer score(input_ids, attention_mask)
    -> [b] (mode="zero": score(input_ids, attention_mask, zeroed=[b, t] bool)). All b·F·2 perturbed
    copies are scored in chunks of batch_size (copies at k = 0 and k = n are scored once: they are
    the same for both curves); progress: a tqdm bar (None: only on a terminal)."""
    fractions = torch.as_tensor(fractions, dtype=torch.float64).cpu()
    _check(input_ids, attention_mask, relevance, mode, mask_token_id, score, fractions)
    if batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be ≥ 1, got {batch_size}")
    removable = removable_mask(input_ids, attention_mask, special_ids)
    counts = removal_counts(removable, fractions.to(input_ids.device))                  # [b, F]
    ranks = {most: _ranks(relevance, removable, most) for most in (True, False)}
    n = removable.sum(-1)
    # jobs: (sentence, fraction index, most_first); LeRF only where it differs from MoRF
    jobs = [(i, f, most) for i in range(input_ids.shape[0]) for f in range(fractions.numel())
            for most in (True, False) if most or 0 < int(counts[i, f]) < int(n[i])]
    scores = {}
    bar = tqdm(range(0, len(jobs), batch_size), desc=f"perturbation ({mode})", leave=False,
               disable=None if progress is None else not progress)
    for start in bar:
        chunk = jobs[start:start + batch_size]
        rows = torch.tensor([i for i, _, _ in chunk], device=input_ids.device)
        k = torch.tensor([int(counts[i, f]) for i, f, _ in chunk], device=input_ids.device)
        rank = torch.stack([ranks[most][i] for i, _, most in chunk])
        removed = rank < k[:, None]
        values = _score_chunk(score, input_ids[rows], attention_mask[rows], removed, mode, mask_token_id)
        scores.update(zip(chunk, values.tolist()))
    shape = (input_ids.shape[0], fractions.numel())
    morf = torch.tensor([[scores[(i, f, True)] for f in range(shape[1])] for i in range(shape[0])],
                        dtype=torch.float64)
    lerf = torch.tensor([[scores.get((i, f, False), scores[(i, f, True)]) for f in range(shape[1])]
                         for i in range(shape[0])], dtype=torch.float64)
    return Curves(fractions, morf, lerf, n.cpu())


def leave_one_out(score: Callable[..., torch.Tensor], input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                  special_ids: Sequence[int], mask_token_id: int, batch_size: int = 64,
                  progress: bool | None = None) -> torch.Tensor:
    """Exact single-token effects f(x) − f(x with token j replaced by [MASK]) for every removable
    token: [b, t] fp64, NaN where the token is not removable (the reference that per-token relevance
    is rank-correlated with, beside the curves)."""
    _check(input_ids, attention_mask, torch.zeros(input_ids.shape), "mask", mask_token_id, score,
           torch.tensor([0.0, 1.0]))
    removable = removable_mask(input_ids, attention_mask, special_ids)
    jobs = removable.nonzero().tolist()                                      # (sentence, position) pairs
    with torch.no_grad():
        full = _score_chunk(score, input_ids, attention_mask, torch.zeros_like(removable), "mask", mask_token_id)
    effects = torch.full(input_ids.shape, float("nan"), dtype=torch.float64)
    bar = tqdm(range(0, len(jobs), batch_size), desc="leave-one-out", leave=False,
               disable=None if progress is None else not progress)
    for start in bar:
        chunk = torch.tensor(jobs[start:start + batch_size], device=input_ids.device)   # [c, 2]
        removed = torch.zeros((len(chunk), input_ids.shape[1]), dtype=torch.bool, device=input_ids.device)
        removed[torch.arange(len(chunk)), chunk[:, 1]] = True
        values = _score_chunk(score, input_ids[chunk[:, 0]], attention_mask[chunk[:, 0]], removed,
                              "mask", mask_token_id)
        effects[chunk[:, 0].cpu(), chunk[:, 1].cpu()] = full[chunk[:, 0].cpu()] - values
    return effects


def rank_correlation(relevance: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Spearman correlation per sentence between relevance and reference [b, t] over the positions
    where reference is not NaN (ties ranked by position): [b] fp64, NaN with fewer than 2 positions."""
    if relevance.shape != reference.shape:
        raise ShapeMismatchError(f"relevance {tuple(relevance.shape)} and reference {tuple(reference.shape)} differ")
    out = torch.full((relevance.shape[0],), float("nan"), dtype=torch.float64)
    for i, (a, b) in enumerate(zip(relevance.double().cpu(), reference.double().cpu())):
        valid = ~torch.isnan(b)
        if int(valid.sum()) >= 2:
            ranks = torch.stack([v[valid].argsort(stable=True).argsort().double() for v in (a, b)])
            out[i] = torch.corrcoef(ranks)[0, 1]
    return out
