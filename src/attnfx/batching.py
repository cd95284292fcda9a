"""Padded batches of a dataset (issue 14): a list of texts, a list of dicts or a HF
`datasets.Dataset` column, tokenized batch by batch, padded on the tokenizer's side or the one
asked for (the tokenizer is never changed: the side is a call argument). A left-padded batch
carries position_ids counting each row's real tokens from 0, as HF's generate does: without them
a model with absolute or rotary positions sees a left-padded row shifted, and a row's result
would depend on the rows it is batched with. A `_Plan` says how a source is cut, so a sweep
(attnfx.data.reduce) can run any subset of the batches, in any process, identically.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import InvalidArgumentError
from .graph.calls import last_positions

__all__ = ["Batch", "batches", "SIDES"]

SIDES = ("left", "right")


@dataclass(frozen=True)
class Batch:
    """One padded batch of b examples: `im(**batch.encoding)` runs it (input_ids, attention_mask
    [b, t], and position_ids [b, t] when added); `indices` [b] are the rows' places in the source;
    `batch.last_positions` [b] their last real tokens."""
    encoding: Mapping           # the tokenizer's BatchEncoding: input_ids, attention_mask [b, t] (+ position_ids)
    indices: torch.Tensor       # [b] long: each row's index in the source
    texts: tuple[str, ...]
    padding_side: str

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def last_positions(self) -> torch.Tensor:
        """[b] long, on the CPU: each row's last real token (t − 1 for every left-padded row)."""
        return last_positions((), dict(self.encoding))


def batches(source, tokenizer, *, batch_size: int = 8, padding_side: str | None = None, column: str = "text",
            max_length: int | None = None, position_ids: bool | None = None, device=None,
            progress: bool | None = True):
    """An iterator of `Batch`es over `source`, in order, each example once (each encoding's
    tensors [b, t], b ≤ batch_size, t the batch's longest example). source: a list of
    texts, a list of dicts or a `datasets.Dataset` (read `column`, a slice at a time).
    padding_side: None uses the tokenizer's. max_length truncates (on the tokenizer's side).
    position_ids: None adds them to left-padded batches only, True to every batch, False never (a
    model whose forward takes none). device: where the tensors go (None: the CPU). progress: a
    tqdm bar over examples (None: on a terminal only).
    Arguments are checked here, before the first batch is asked for."""
    plan = _plan(source, tokenizer, batch_size, padding_side, column, max_length, position_ids, device)
    return _iterate(plan, range(plan.batches), progress)


@dataclass(frozen=True)
class _Plan:
    """How a source is cut into batches: batch `number` holds examples [number · size, …) of `count`."""
    count: int
    size: int
    side: str
    read: Callable              # read(start, stop) -> texts
    encode: Callable            # encode(texts) -> BatchEncoding
    positions: bool             # position_ids added
    max_length: int | None

    @property
    def batches(self) -> int:
        return -(-self.count // self.size)

    def span(self, number: int) -> range:
        return range(number * self.size, min((number + 1) * self.size, self.count))


def _plan(source, tokenizer, batch_size, padding_side, column, max_length, position_ids, device) -> _Plan:
    count, read = _reader(source, column)
    side = _checked_options(tokenizer, batch_size, padding_side, max_length)
    add_positions = side == "left" if position_ids is None else bool(position_ids)

    def encode(texts):
        encoding = tokenizer(texts, padding=len(texts) > 1, padding_side=side, truncation=max_length is not None,
                             max_length=max_length, return_tensors="pt")
        if add_positions:       # pads read position 0; the mask keeps them out of every real row
            encoding["position_ids"] = (encoding["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        return encoding.to(device) if device is not None else encoding

    return _Plan(count, batch_size, side, read, encode, add_positions, max_length)


def _iterate(plan: _Plan, numbers, progress):
    """The batches `numbers` (in that order) of `plan`; the others are neither read nor tokenized."""
    from tqdm.auto import tqdm

    spans = [plan.span(number) for number in numbers]
    with tqdm(total=sum(map(len, spans)), unit="example", disable=None if progress is None else not progress) as bar:
        for span in spans:
            texts = tuple(plan.read(span.start, span.stop))
            yield Batch(plan.encode(list(texts)), torch.arange(span.start, span.stop), texts, plan.side)
            bar.update(len(span))


def _reader(source, column: str):
    """(number of examples, read(start, stop) -> their texts), after checking what can be checked."""
    names = getattr(source, "column_names", None)
    if isinstance(names, Mapping):
        raise InvalidArgumentError(f"source is a DatasetDict of splits {list(names)}: pass one, e.g. source['train']")
    if isinstance(source, (str, bytes, Mapping)):
        hint = " (one text: wrap it in a list)" if isinstance(source, str) else ""
        raise InvalidArgumentError(f"source must be a list of texts, a list of dicts or a datasets.Dataset, got "
                                   f"{type(source).__name__}{hint}")
    if not hasattr(source, "__len__") or not hasattr(source, "__getitem__"):
        raise InvalidArgumentError(f"source must have a length and be indexable (a list or a datasets.Dataset), got "
                                   f"{type(source).__name__}: an iterable dataset can be made a list first")
    if len(source) == 0:
        raise InvalidArgumentError("source is empty: there is nothing to batch")
    if names is not None:                   # a datasets.Dataset: a slice is {column: [values]}
        if column not in names:
            raise InvalidArgumentError(f"column {column!r} is not among the dataset's columns {list(names)}: "
                                       "pass column=")
        return len(source), lambda start, stop: _texts(source[start:stop][column], start, column)
    if not isinstance(source, Sequence):
        raise InvalidArgumentError(f"source must be a list of texts or dicts, got {type(source).__name__}")
    rows = [_text_of(row, i, column) for i, row in enumerate(source)]
    return len(rows), lambda start, stop: rows[start:stop]


def _text_of(row, index: int, column: str) -> str:
    if isinstance(row, Mapping):
        if column not in row:
            raise InvalidArgumentError(f"example {index} has no {column!r} (its keys: {list(row)}): pass column=")
        row = row[column]
    return _texts([row], index, column)[0]


def _texts(values, start: int, column: str) -> list[str]:
    values = list(values)
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise InvalidArgumentError(f"example {start + i} ({column!r}) is a {type(value).__name__}, expected a str")
    return values


def _checked_options(tokenizer, batch_size, padding_side, max_length) -> str:
    for name, value in (("batch_size", batch_size), ("max_length", 1 if max_length is None else max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"{name} must be a positive int, got {value!r}")
    side = getattr(tokenizer, "padding_side", None) if padding_side is None else padding_side
    if side not in SIDES:
        raise InvalidArgumentError(f"padding_side must be one of {SIDES} (or None: the tokenizer's), got {side!r}")
    if batch_size > 1 and getattr(tokenizer, "pad_token", None) is None:
        raise InvalidArgumentError(
            f"{type(tokenizer).__name__} has no pad token, which batches of {batch_size} need: set one, e.g. "
            "tokenizer.pad_token = tokenizer.eos_token (the attention mask keeps pads out), or pass batch_size=1")
    return side
