"""How analyses read a model call: the inputs as (args, kwargs), the [batch, seq] they carry,
and the logits among the outputs."""
from __future__ import annotations

import torch

from .errors import InvalidArgumentError


def as_call(inputs) -> tuple[tuple, dict]:
    """A tensor, a tuple of arguments or a dict of keyword arguments → (args, kwargs)."""
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, tuple):
        return inputs, {}
    return (inputs,), {}


def batch_and_length(args, kwargs) -> tuple[int, int]:
    """[batch, seq] of the call: input_ids or inputs_embeds, else the first [b, t, ...] tensor."""
    for value in [kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args, *kwargs.values()]:
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[0]), int(value.shape[1])
    raise InvalidArgumentError("could not find a batched tensor input ([batch, seq, ...]) in inputs")


def logits_of(outputs) -> torch.Tensor:
    """The [batch, seq, vocab] logits: the output itself, or its .logits."""
    logits = outputs if isinstance(outputs, torch.Tensor) else getattr(outputs, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise InvalidArgumentError("expected [batch, seq, vocab] logits among the outputs (a tensor or .logits); "
                                   "pass a callable of the outputs for other models")
    return logits
