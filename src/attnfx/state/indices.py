"""How a user names layers and heads: Python ints, numpy integers or integer tensors with one
element (an `argmax`), alone or in a list / 1-d tensor / array; a negative index counts from the
end, as in Python."""
from __future__ import annotations

import operator

import torch

from ..errors import SiteIndexError


def as_index(value, size: int, what: str) -> int:
    """One index in [-size, size) → [0, size)."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise SiteIndexError(f"{what} index must be an integer, got {value!r}")
    try:
        index = operator.index(value.reshape(()) if isinstance(value, torch.Tensor) and value.numel() == 1 else value)
    except (TypeError, RuntimeError):
        raise SiteIndexError(f"{what} index must be an integer, got {value!r}") from None
    if not -size <= index < size:
        raise SiteIndexError(f"{what} {index} out of range: valid {what}s are 0..{size - 1} (or -{size}..-1)")
    return index % size


def as_indices(value, size: int, what: str) -> list[int]:
    """One index or several (list, tuple, 1-d tensor or array) → a non-empty list in [0, size)."""
    if isinstance(value, (list, tuple, range)):
        items = list(value)
    elif getattr(value, "ndim", 0) >= 1 and not isinstance(value, str):
        if value.ndim != 1:
            raise SiteIndexError(f"{what} indices must be one index or a 1-d list, got shape {tuple(value.shape)}")
        items = list(value)
    else:
        items = [value]
    if not items:
        raise SiteIndexError(f"empty {what} list")
    return [as_index(item, size, what) for item in items]


def padded_stack(tensors: list, dim: int = 0, fill: float = 0.0):
    """torch.stack of per-layer tensors whose head (and head-dim) axes may differ between layers:
    each is padded at the end of every axis with `fill` to the widest (a pruned or hybrid model)."""
    widest = [max(t.shape[axis] for t in tensors) for axis in range(tensors[0].dim())]
    padded = []
    for t in tensors:
        if list(t.shape) != widest:
            grown = t.new_full(widest, fill)
            grown[tuple(slice(0, n) for n in t.shape)] = t
            t = grown
        padded.append(t)
    return torch.stack(padded, dim=dim)
