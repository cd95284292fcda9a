"""Patching metrics: functions of the logits [b, t, vocab] → one value per example [b].

Token ids and positions are one per example (or one for all); a position of −1 is the last
token, and padded batches pass each row's last real position.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError, ShapeMismatchError

Metric = Callable[[torch.Tensor], torch.Tensor]


def wide(x: torch.Tensor) -> torch.Tensor:
    """fp32, or fp64 for fp64 values: metrics never lose the model's precision."""
    return x if x.dtype == torch.float64 else x.float()


def _per_example(value, batch: int, device, what: str) -> torch.Tensor:
    value = torch.as_tensor(value, device=device).reshape(-1)
    if value.numel() == 1:
        value = value.expand(batch)
    if value.numel() != batch:
        raise ShapeMismatchError(f"{what} must be one value or one per example ({batch}), got {value.numel()}")
    return value.long()


def _at(logits: torch.Tensor, position) -> torch.Tensor:
    """[b, vocab] fp32 logits at each example's position."""
    if logits.dim() != 3:
        raise InvalidArgumentError(f"metrics take logits [batch, seq, vocab], got shape {list(logits.shape)}")
    b, t, _ = logits.shape
    rows = torch.arange(b, device=logits.device)
    return wide(logits[rows, _per_example(position, b, logits.device, "position") % t])


def _pick(logits_at: torch.Tensor, tokens, what: str) -> torch.Tensor:
    b, vocab = logits_at.shape
    ids = _per_example(tokens, b, logits_at.device, what)
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise InvalidArgumentError(f"{what} token ids must be in [0, {vocab})")
    return logits_at[torch.arange(b, device=logits_at.device), ids]


def logit(token, position=-1) -> Metric:
    """logit[token] at `position`."""
    return lambda logits: _pick(_at(logits, position), token, "target")


def logit_diff(correct, incorrect, position=-1) -> Metric:
    """logit[correct] − logit[incorrect] at `position`."""
    def metric(logits):
        at = _at(logits, position)
        return _pick(at, correct, "correct") - _pick(at, incorrect, "incorrect")
    return metric


def normalized_logit_diff(correct, incorrect, clean_logits, corrupt_logits, position=-1) -> Metric:
    """(LD − LD_corrupt) / (LD_clean − LD_corrupt): 1 at the clean run, 0 at the corrupt run."""
    raw = logit_diff(correct, incorrect, position)
    clean, corrupt = raw(clean_logits).detach(), raw(corrupt_logits).detach()
    span = clean - corrupt
    if bool((span.abs() < 1e-12).any()):
        raise InvalidArgumentError("the clean and corrupt logit differences coincide for some example; "
                                   "the normalised logit difference is undefined there")
    return lambda logits: (raw(logits) - corrupt) / span


def kl_to_clean(clean_logits, position=-1) -> Metric:
    """KL(p_clean ‖ p) of the next-token distributions at `position` (0 at the clean run)."""
    clean = F.log_softmax(_at(clean_logits, position), -1).detach()

    def metric(logits):
        log_p = F.log_softmax(_at(logits, position), -1)
        return (clean.exp() * (clean - log_p)).sum(-1)
    return metric


def target_prob(tokens, position=-1) -> Metric:
    """p(token) at `position`."""
    return lambda logits: _pick(F.softmax(_at(logits, position), -1), tokens, "target")
