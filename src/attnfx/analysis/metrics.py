"""Patching metrics: functions of the model's main output [b, t, n] → one value per example [b].

The main output (`calls.main_output`) is a language model's logits [b, t, vocab] — an
encoder–decoder's decoder logits, so positions are decoder positions — or a backbone's last
hidden state [b, t, d_model] (a ViT: its class token at position 0, then its patches). On a
backbone the token-id metrics read hidden features (logit(5): feature 5); `projection` reads the
output along a direction (a probe's, a class's), and `of_outputs(fn)` wraps any function of the
outputs as the model returns them (a pooled output). Outputs holding no main output raise
InvalidArgumentError, saying so.

Token ids and positions are one per example (or one for all), read by the one convention of
`calls.per_example` (an int or numpy integer, a 0-d or 1-d integer tensor or array, or a list of
ints; bools, floats and other lengths raise). A position of −1 is the last position: a metric sees
only the main output, not the attention mask, so its default cannot be each row's last real token the
way head_attribution's and relevance's `position=None` is. For a right-padded batch pass those
positions, `calls.last_positions(*calls.as_call(inputs))` (a left-padded batch's last real token
is the last position).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..graph.calls import check_vocab, per_example, positions
from ..errors import InvalidArgumentError, ShapeMismatchError

__all__ = ["OutputsMetric", "of_outputs", "logit", "logit_diff", "normalized_logit_diff", "kl_to_clean",
           "target_prob", "projection"]

Metric = Callable[[torch.Tensor], torch.Tensor]


class OutputsMetric:
    """A metric of the model's whole outputs (made by `of_outputs`): patching hands it the outputs
    as the model returns them, not the main output [b, t, vocab]; it returns one value per example
    [b]."""

    def __init__(self, fn: Callable):
        if not callable(fn):
            raise InvalidArgumentError(f"of_outputs takes a callable outputs → [b], got {type(fn).__name__}")
        self.fn = fn

    def __call__(self, outputs) -> torch.Tensor:
        """fn(outputs): the metric of the outputs as the model returns them, [b]."""
        return self.fn(outputs)


def of_outputs(fn: Callable) -> OutputsMetric:
    """A metric of the outputs as the model returns them (a ModelOutput, say) → [b]: for what the
    main output does not hold, e.g. a backbone's pooled output, `of_outputs(lambda out:
    out.pooler_output @ direction)`."""
    return OutputsMetric(fn)


def wide(x: torch.Tensor) -> torch.Tensor:
    """fp32, or fp64 for fp64 values: metrics never lose the model's precision."""
    return x if x.dtype == torch.float64 else x.float()


def _at(logits: torch.Tensor, position) -> torch.Tensor:
    """[b, vocab] fp32 logits at each example's position."""
    if logits.dim() != 3:
        raise InvalidArgumentError(f"metrics take the main output [batch, seq, n] (logits, or a backbone's hidden "
                                   f"states), got shape {list(logits.shape)}")
    b, t, _ = logits.shape
    rows = torch.arange(b, device=logits.device)
    return wide(logits[rows, positions(position, b, t, device=logits.device)])


def _pick(logits_at: torch.Tensor, tokens, what: str) -> torch.Tensor:
    b, vocab = logits_at.shape
    ids = per_example(tokens, b, what, device=logits_at.device)
    check_vocab(ids, vocab, what)
    return logits_at[torch.arange(b, device=logits_at.device), ids]


def _check_kinds(**values) -> None:
    """Token ids and positions checked for their kind when the metric is made (before any run);
    their length and range are checked on the logits."""
    for what, value in values.items():
        if what == "position" and value is None:
            positions(None, 1, 1)                       # raises, saying what to pass instead
        per_example(value, None, what)


def logit(token, position=-1) -> Metric:
    """logit[token] at `position`: a metric logits [b, t, vocab] → [b] (fp32; fp64 for fp64).
    token, position: one for all or one per example ([b])."""
    _check_kinds(target=token, position=position)
    return lambda logits: _pick(_at(logits, position), token, "target")


def logit_diff(correct, incorrect, position=-1) -> Metric:
    """logit[correct] − logit[incorrect] at `position`: a metric logits [b, t, vocab] → [b]
    (fp32; fp64 for fp64). correct, incorrect, position: one for all or one per example ([b])."""
    _check_kinds(correct=correct, incorrect=incorrect, position=position)

    def metric(logits):
        at = _at(logits, position)
        return _pick(at, correct, "correct") - _pick(at, incorrect, "incorrect")
    return metric


def normalized_logit_diff(correct, incorrect, clean_logits, corrupt_logits, position=-1) -> Metric:
    """(LD − LD_corrupt) / (LD_clean − LD_corrupt): 1 at the clean run, 0 at the corrupt run; a
    metric logits [b, t, vocab] → [b], LD the logit_diff. clean_logits, corrupt_logits: the two
    runs' logits [b, t, vocab]."""
    raw = logit_diff(correct, incorrect, position)
    clean, corrupt = raw(clean_logits).detach(), raw(corrupt_logits).detach()
    span = clean - corrupt
    if bool((span.abs() < 1e-12).any()):
        raise InvalidArgumentError("the clean and corrupt logit differences coincide for some example; "
                                   "the normalised logit difference is undefined there")
    return lambda logits: (raw(logits) - corrupt) / span


def kl_to_clean(clean_logits, position=-1) -> Metric:
    """KL(p_clean ‖ p) of the next-token distributions at `position` (0 at the clean run): a
    metric logits [b, t, vocab] → [b]; clean_logits [b, t, vocab] the clean run's."""
    _check_kinds(position=position)
    clean = F.log_softmax(_at(clean_logits, position), -1).detach()

    def metric(logits):
        log_p = F.log_softmax(_at(logits, position), -1)
        return (clean.exp() * (clean - log_p)).sum(-1)
    return metric


def target_prob(tokens, position=-1) -> Metric:
    """p(token) at `position`: a metric logits [b, t, vocab] → [b]. tokens, position: one for all
    or one per example ([b])."""
    _check_kinds(target=tokens, position=position)
    return lambda logits: _pick(F.softmax(_at(logits, position), -1), tokens, "target")


def projection(direction, position=-1) -> Metric:
    """⟨output[position], direction⟩: a metric main output [b, t, n] → [b], the output at
    `position` along a direction [n], or one per example [b, n] — a backbone's hidden state along a probe's direction (position 0: a ViT's
    class token), or a weighted set of a language model's logits."""
    _check_kinds(position=position)
    direction = torch.as_tensor(direction)
    if not direction.is_floating_point() or direction.dim() not in (1, 2):
        raise InvalidArgumentError(f"a projection direction is a float tensor [n] or [batch, n], got "
                                   f"{direction.dtype} of shape {list(direction.shape)}")

    def metric(output):
        at = _at(output, position)                                           # [b, n]
        if direction.shape[-1] != at.shape[-1] or (direction.dim() == 2 and direction.shape[0] != at.shape[0]):
            raise ShapeMismatchError(f"the direction's shape {list(direction.shape)} does not fit the output "
                                     f"at one position, [{at.shape[0]}, {at.shape[1]}]")
        return (at * direction.to(at)).sum(-1)
    return metric
