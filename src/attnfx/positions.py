"""`positions=` of the steering knobs: token positions named by the user, kept as position groups
in runtime state that the graph reads (passes/positions.py), so that changing them recompiles
nothing while they fit the state's capacity.

A user names positions as an index or a list of them (absolute token positions along the input's
columns, counting a KV cache's past tokens; negative from the end of the sequence so far, so −1
is each call's newest token, in generate every new token), as a bool mask [t] over positions,
or per row: a bool mask [b, t] or an int tensor [b, k].
"""
from __future__ import annotations

import torch

from .errors import ShapeMismatchError, SteeringValueError
from .passes.positions import NONE
from .spec import POSITION_STATE

CAPACITY = 16               # groups, group 0 being every position
MIN_WIDTH = 8               # indices per row; grows by doubling (one compile each time)
KNOBS = ("q_scale", "v_scale", "v_scale_unbiased", "z_scale", "z_replace")


def as_rows(positions) -> tuple[tuple[int, ...], ...]:
    """positions → one row of indices (every example) or one per example."""
    if isinstance(positions, torch.Tensor):
        if positions.dtype == torch.bool:
            if positions.dim() not in (1, 2):
                raise ShapeMismatchError(f"a positions mask must be [t] or [batch, t], got {list(positions.shape)}")
            mask = positions.reshape(-1, positions.shape[-1]).cpu()
            rows = tuple(tuple(row.nonzero().flatten().tolist()) for row in mask)
        elif not positions.is_floating_point() and not positions.is_complex():
            if positions.dim() > 2:
                raise ShapeMismatchError(f"position indices must be [k] or [batch, k], got {list(positions.shape)}")
            rows = tuple(tuple(row) for row in positions.reshape(-1, max(positions.shape[-1:] or [1])).tolist())
        else:
            raise SteeringValueError(f"positions must be integer indices or a bool mask, got {positions.dtype}")
    else:
        items = list(positions) if isinstance(positions, (list, tuple, range)) else [positions]
        if any(isinstance(p, bool) or not isinstance(p, int) for p in items):
            raise SteeringValueError(f"positions must be ints, a list of ints or a tensor, got {positions!r}")
        rows = (tuple(items),)
    if not rows or any(not row for row in rows):
        raise SteeringValueError(f"positions name no position (in some row): {positions!r}")
    if any(abs(p) >= -NONE // 2 for row in rows for p in row):
        raise SteeringValueError("a position index is out of range")
    return rows


class Positions:
    """The position groups of one instrumented model, and each knob's group per (layer, head)."""

    def __init__(self, im):
        self._im = im
        self.groups: dict[tuple, int] = {}      # rows → group (1 … CAPACITY − 1)

    @property
    def in_use(self) -> bool:
        return bool(self.groups)

    def group(self, positions) -> int:
        """The group of `positions` (0: None, every position), registered if new. Raises before
        writing anything."""
        if positions is None:
            return 0
        rows = as_rows(positions)
        if rows in self.groups:
            return self.groups[rows]
        if len(self.groups) + 1 >= CAPACITY:
            raise SteeringValueError(f"at most {CAPACITY - 1} distinct position sets at once; steering.reset() first")
        self._allocate()
        index = self._im.where_index
        batch = max(index.shape[1], len(rows))
        if index.shape[1] > 1 and len(rows) > 1 and len(rows) != index.shape[1]:
            raise ShapeMismatchError(f"per-row positions are for batch {index.shape[1]}, got {len(rows)} rows; "
                                     "steering.reset() first")
        width = max(index.shape[2], *(len(row) for row in rows))
        if (batch, width) != tuple(index.shape[1:]):              # grow: the next call compiles once
            grown = index.new_full((CAPACITY, batch, 1 << (width - 1).bit_length()), NONE)
            grown[:, :, :index.shape[2]] = index
            self._im.where_index = grown
        g = len(self.groups) + 1
        for b in range(batch):
            row = rows[b if len(rows) > 1 else 0]
            self._im.where_index[g, b, :len(row)] = torch.tensor(row)
        self.groups[rows] = g
        return g

    def assign(self, knob: str, layers: list[int], heads: list[int], group: int) -> None:
        """Knob (a STEERING_STATE scale or replacement) acts at `group` on these heads."""
        if group == 0 and not hasattr(self._im, "where_index"):
            return
        self._allocate()
        at = getattr(self._im, f"at_{knob}")
        for l in layers:
            at[l, heads] = group

    def _allocate(self) -> None:
        im = self._im
        if getattr(im, "where_index", None) is not None:
            return
        device = im.z_scale.device
        im.register_buffer("where_index", torch.full((CAPACITY, 1, MIN_WIDTH), NONE, dtype=torch.long, device=device),
                           persistent=False)
        im.register_buffer("where_all", torch.zeros(CAPACITY, device=device), persistent=False)
        im.where_all[0] = 1.0
        im.register_buffer("where_offset", torch.zeros(1, dtype=torch.long, device=device), persistent=False)
        for knob in KNOBS:
            im.register_buffer(f"at_{knob}", torch.zeros(getattr(im, knob).shape[:2], dtype=torch.long, device=device),
                               persistent=False)

    def reset(self) -> None:
        self.groups = {}
        im = self._im
        if getattr(im, "where_index", None) is None:
            return
        if tuple(im.where_index.shape[1:]) == (1, MIN_WIDTH):
            im.where_index.fill_(NONE)
        else:
            im.where_index = im.where_index.new_full((CAPACITY, 1, MIN_WIDTH), NONE)
        for knob in KNOBS:
            getattr(im, f"at_{knob}").zero_()

    def saved(self) -> dict:
        """The state to restore (restoring()): the buffers and the registry."""
        im = self._im
        if getattr(im, "where_index", None) is None:
            return {"groups": dict(self.groups)}
        return {"groups": dict(self.groups), **{name: getattr(im, name).clone() for name in POSITION_STATE}}

    def restore(self, saved: dict) -> None:
        im = self._im
        self.groups = saved["groups"]
        for name in POSITION_STATE:
            if name not in saved:
                if getattr(im, "where_index", None) is not None:
                    self.reset()
                return
            current, value = getattr(im, name), saved[name]
            if current.shape == value.shape:
                current.copy_(value)
            else:
                setattr(im, name, value)

    def set_offset(self, kwargs) -> None:
        """The call's first absolute position: the KV cache's length before it."""
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        position = kwargs.get("cache_position")
        if past == 0 and isinstance(position, torch.Tensor) and position.numel():
            self._im.where_offset.copy_(position.reshape(-1)[:1])     # on the device: no sync
        else:
            self._im.where_offset.fill_(int(past))

    def check_batch(self, batch: int) -> None:
        rows = self._im.where_index.shape[1] if self.in_use else 1
        if rows > 1 and batch != rows:
            raise ShapeMismatchError(f"per-row positions are for batch {rows}, this call has batch {batch}; "
                                     "steering.reset() or give positions for this batch")

