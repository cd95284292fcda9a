"""`positions=` and `rows=` of the steering knobs: where a knob acts, kept as groups the graph reads
at run time (passes/positions.py), so that changing them recompiles nothing while the state keeps
its shape.

A user names positions as an index or a list of them (absolute token positions along the input's
columns, counting a KV cache's past tokens; negative from the end of the sequence so far, so −1
is each call's newest token, in generate every new token), as a bool mask [t] over positions,
or per row: a bool mask [b, t] or an int tensor [b, k]. rows= names batch rows (indices or a bool
mask [b]): per-row steering, so that many interventions run as tiles of one batch.

The groups are kept as what the user said and laid out for each call's batch just before it runs
(a new batch size or more groups than the state holds: one compile for the new shape).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ShapeMismatchError, SteeringValueError
from .spec import NONE

MIN_GROUPS = 16             # the state's groups (group 0: everywhere); grows by doubling
VECTOR_GROUPS = 16          # steering vectors use the first 16 groups (state vector_{kind} [L, 16, d])
MIN_WIDTH = 8               # indices per row; grows by doubling
KNOBS = ("q_scale", "v_scale", "v_scale_unbiased", "z_scale", "z_replace")


@dataclass(frozen=True)
class Where:
    rows: tuple[int, ...] | None                      # batch rows (None: every row)
    positions: tuple[tuple[int, ...], ...] | None     # one index row for every batch row, or one per row


def as_positions(positions) -> tuple[tuple[int, ...], ...]:
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
    if all(not row for row in rows):                 # per row, some rows may name none
        raise SteeringValueError(f"positions name no position: {positions!r}")
    if any(abs(p) >= -NONE // 2 for row in rows for p in row):
        raise SteeringValueError("a position index is out of range")
    return rows


def as_batch_rows(rows) -> tuple[int, ...]:
    """rows= → sorted distinct batch row indices (≥ 0)."""
    if isinstance(rows, torch.Tensor) and rows.dtype == torch.bool:
        if rows.dim() != 1:
            raise ShapeMismatchError(f"a rows mask must be [batch], got {list(rows.shape)}")
        items = rows.nonzero().flatten().tolist()
    elif isinstance(rows, torch.Tensor) and not rows.is_floating_point():
        items = rows.reshape(-1).tolist()
    elif isinstance(rows, (list, tuple, range)):
        items = list(rows)
    else:
        items = [rows]
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in items):
        raise SteeringValueError(f"rows must be batch row indices ≥ 0 or a bool mask [batch], got {rows!r}")
    if not items:
        raise SteeringValueError("rows names no batch row")
    return tuple(sorted(set(items)))


class Positions:
    """The groups of one instrumented model, and each knob's group per (layer, head)."""

    def __init__(self, im):
        self._im = im
        self.groups: dict[Where, int] = {}          # → group 1, 2, …
        self._laid_out: tuple | None = None         # (batch, groups) the state was last laid out for

    @property
    def in_use(self) -> bool:
        return bool(self.groups)

    def group(self, positions=None, rows=None, *, limit: int | None = None) -> int:
        """The group of (positions, rows) (0: everywhere), registered if new. Raises before
        registering anything; `limit`: the group must be below it (steering vectors')."""
        if positions is None and rows is None:
            return 0
        where = Where(None if rows is None else as_batch_rows(rows),
                      None if positions is None else as_positions(positions))
        if where.positions is not None and len(where.positions) > 1 and where.rows is not None \
                and where.rows[-1] >= len(where.positions):
            raise ShapeMismatchError(f"rows= names row {where.rows[-1]}, per-row positions have "
                                     f"{len(where.positions)} rows")
        if where in self.groups:
            return self.groups[where]
        if limit is not None and len(self.groups) + 1 >= limit:
            raise SteeringValueError(f"steering vectors take at most {limit - 1} distinct positions / rows sets "
                                     "in all (counting the head knobs'); steering.reset() first")
        self.groups[where] = len(self.groups) + 1
        return self.groups[where]

    def assign(self, knob: str, layers: list[int], heads: list[int], group: int) -> None:
        """Knob (a STEERING_STATE scale or replacement) acts at `group` on these heads."""
        if getattr(self._im, f"at_{knob}", None) is None:
            if group == 0:
                return
            self._allocate_knob_groups()
        at = getattr(self._im, f"at_{knob}")
        for l in layers:
            at[l, heads] = group

    # ---- laid out for a call -------------------------------------------------------------------
    def prepare(self, batch: int, kwargs) -> None:
        """Lay the groups out for this call's batch (when it or the groups changed) and set the
        call's first absolute position. Raises, changing nothing, when a group does not fit."""
        per_row = any(w.rows is not None or (w.positions is not None and len(w.positions) > 1) for w in self.groups)
        rows = batch if per_row else 1
        key = (rows, tuple(self.groups))
        if key != self._laid_out:
            index, every = self._layout(rows)
            self._store("where_index", index)
            self._store("where_all", every)
            self._laid_out = key
        if getattr(self._im, "where_offset", None) is None:
            self._im.register_buffer("where_offset", torch.zeros(1, dtype=torch.long, device=self._im.z_scale.device),
                                     persistent=False)
        self._set_offset(kwargs)
        self._allocate_knob_groups()

    def _allocate_knob_groups(self) -> None:
        """at_<knob> [L, H] int64, zeros (everywhere): the graph reads them once positions are in use."""
        im = self._im
        if getattr(im, "at_z_scale", None) is None:
            for name in KNOBS:
                im.register_buffer(f"at_{name}", torch.zeros(getattr(im, name).shape[:2], dtype=torch.long,
                                                             device=im.z_scale.device), persistent=False)

    def _layout(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        count = max(MIN_GROUPS, 1 << len(self.groups).bit_length())
        widest = max((len(r) for w in self.groups if w.positions for r in w.positions), default=1)
        index = torch.full((count, rows, max(MIN_WIDTH, 1 << (widest - 1).bit_length())), NONE, dtype=torch.long)
        every = torch.zeros(count, rows)
        every[0] = 1.0
        for where, g in self.groups.items():
            selected = range(rows) if where.rows is None else where.rows
            if where.rows is not None and where.rows[-1] >= rows:
                raise ShapeMismatchError(f"rows= names row {where.rows[-1]}, this call has batch {rows}; "
                                         "steering.reset() or steer this batch's rows")
            if where.positions is None:
                every[g, list(selected)] = 1.0
                continue
            if len(where.positions) > 1 and len(where.positions) != rows:
                raise ShapeMismatchError(f"per-row positions are for batch {len(where.positions)}, this call has "
                                         f"batch {rows}; steering.reset() or give positions for this batch")
            for r in selected:
                row = where.positions[r if len(where.positions) > 1 else 0]
                index[g, r, :len(row)] = torch.tensor(row, dtype=torch.long)
        return index, every

    def _store(self, name: str, value: torch.Tensor) -> None:
        im = self._im
        value = value.to(im.z_scale.device)
        current = getattr(im, name, None)
        if current is None:
            im.register_buffer(name, value, persistent=False)
        elif current.shape == value.shape:
            current.copy_(value)                    # in place: the graph keeps reading the same buffer
        else:
            setattr(im, name, value)                # a new shape: the next call compiles once

    def _set_offset(self, kwargs) -> None:
        """The call's first absolute position: the KV cache's length before it."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))     # transformers ≥ 5.24 names it cache
        past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        position = kwargs.get("cache_position")
        if past == 0 and isinstance(position, torch.Tensor) and position.numel():
            self._im.where_offset.copy_(position.reshape(-1)[:1])     # on the device: no sync
        else:
            self._im.where_offset.fill_(int(past))

    # ---- reset and restore ------------------------------------------------------------------------
    def reset(self) -> None:
        self.groups = {}
        self._laid_out = None
        for knob in KNOBS:
            at = getattr(self._im, f"at_{knob}", None)
            if at is not None:
                at.zero_()

    def saved(self) -> dict:
        im = self._im
        return {"groups": dict(self.groups),
                **{f"at_{knob}": getattr(im, f"at_{knob}").clone() for knob in KNOBS
                   if getattr(im, f"at_{knob}", None) is not None}}

    def restore(self, saved: dict) -> None:
        self.groups = saved["groups"]
        self._laid_out = None
        for knob in KNOBS:
            at = getattr(self._im, f"at_{knob}", None)
            if at is not None:
                at.copy_(saved[f"at_{knob}"]) if f"at_{knob}" in saved else at.zero_()

