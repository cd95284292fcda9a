"""Analyses over a dataset, in padded batches (issue 14):

    from attnfx import data
    means = data.reduce(im, prompts, tok, data.last_token(("resid_pre", "z")), reduce="mean")
    data.save("means.safetensors", means, labels=prompts, metadata={"model": "default"})

`batches` (attnfx.batching) tokenizes a list of texts, a list of dicts or a HF `datasets.Dataset`
column, batch by batch, padded on the tokenizer's side or the one asked for; a left-padded batch
carries position_ids, so a row's result does not depend on the rows it is batched with (without
them the default GPT-2's last-token stream moves by up to 9). `reduce` runs an analysis
`(im, batch) -> {name: [b, ...]}` on each batch and keeps a running sum ("mean", "sum": one
result's memory, never every activation) or the rows on the CPU ("none"). Results are saved as
safetensors with labels and metadata as JSON in its header, never pickled.

Under torchrun (`torchrun --nproc-per-node N sweep.py`, the script calling
torch.distributed.init_process_group() first) the same call shares the work: rank r runs batches
r, r + N, r + 2N, ... of the very batching one process would do (same rows, same padding), the
ranks all-gather every batch's rows or partial sum (tensor collectives: gloo on the CPU, NCCL on
the model's GPU; the bytes are safetensors, not pickles) and every rank adds them in batch order,
as one process does: every rank returns the one-process result, bit for bit where the analysis
computes a batch alike in every process (same device kind, same thread count). Each rank holds
its batches' parts until the gather. Only rank 0 shows a bar (over its share), and `save`
writes on rank 0 only. A rank that dies makes the others raise at the gather instead of waiting
forever: gloo as soon as its connection closes, NCCL after the process group's timeout
(init_process_group(timeout=)); an error on one rank ends that rank, and the others raise alike.

checkpoint=FOLDER makes a sweep resumable: each finished batch is written there (safetensors named
by batch number, written whole: a temporary file, then os.replace) and a rerun, on any number of
ranks, reads those instead of recomputing them. A folder written for other texts, batch size,
reduction, padding or max_length is refused (InvalidArgumentError), and so is an analysis
returning other names than the stored batches (seen once a batch is computed). A folder per node
works too: a batch whose file a rank cannot see is computed again.

Ready analyses of the heads (DLA, relevance, activation patching per example): attnfx.sweeps.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
from collections.abc import Mapping

import torch

from .batching import Batch, _iterate, _plan, batches
from .data_shards import _all_gathered, _Checkpoint, _owned, _Part, _ranks, _savable, _wire_device
from .errors import InvalidArgumentError, ShapeMismatchError
from .state.indices import as_indices, padded_stack

__all__ = ["Batch", "batches", "reduce", "last_token", "token_loss", "save", "load", "REDUCTIONS"]

REDUCTIONS = ("mean", "sum", "none")
# the per-layer records whose layout is [b, t, ...] (recording.py): what last_token reads
TOKEN_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_hidden", "q", "k", "v", "z")
_IGNORED = -100                             # HF's ignore_index
_LABELS, _METADATA = "attnfx.labels", "attnfx.metadata"      # keys of the safetensors header


# ---- reducing an analysis over the batches ----------------------------------------------------
def reduce(im, source, tokenizer, analysis, *, reduce: str = "mean", batch_size: int = 8,
           padding_side: str | None = None, column: str = "text", max_length: int | None = None,
           position_ids: bool | None = None, progress: bool | None = True, distributed: bool | None = None,
           checkpoint=None) -> dict[str, torch.Tensor]:
    """analysis(im, batch) -> {name: [b, ...]} on every batch of `source` (see `batches`), reduced
    over the examples, on the CPU: "mean" and "sum" keep a running fp64 sum (floating results come
    back in at least fp32; a mean of integers in fp32) and need one shape per example throughout;
    "none" keeps every row, in source order, and pads an axis that differs between batches
    with NaN at its end (floating results only; a per-token result keeps each batch's pad
    positions as the model computed them). position_ids=None: left-padded batches get them when
    the model's forward takes position_ids.
    distributed: None shares the batches among the ranks when a torch.distributed process group
    of more than one rank is initialised (torchrun), True requires one, False runs them all here.
    checkpoint: a folder where each finished batch is written; a rerun skips those (see the module)."""
    if reduce not in REDUCTIONS:
        raise InvalidArgumentError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    if not callable(analysis):
        raise InvalidArgumentError(f"analysis must be a callable (im, batch) -> dict of tensors, got {analysis!r}")
    rank, world = _ranks(distributed)
    device = _device(im)
    wire = _wire_device(device) if world > 1 else None
    if position_ids is None and not _takes(im, "position_ids"):
        position_ids = False
    plan = _plan(source, tokenizer, batch_size, padding_side, column, max_length, position_ids, device)
    store = _Checkpoint(checkpoint, plan, reduce) if checkpoint is not None else None
    parts = _parts(im, analysis, plan, _owned(rank, world, plan.batches), reduce, store,
                   progress if rank == 0 else False)
    total = _Rows() if reduce == "none" else _Running(mean=reduce == "mean")
    with contextlib.closing(parts):          # an analysis that raises closes the bar now, not when collected
        if world > 1:           # every rank adds every batch's part in batch order: the one-process sums, exactly
            parts = sorted(_all_gathered(dict(parts), wire).items())
        for _, part in parts:   # one process: a batch at a time, one result's memory ("mean", "sum")
            total.add(part)
    return total.result()


def _parts(im, analysis, plan: _Plan, numbers: range, reduce: str, store, progress):
    """(number, _Part) of each batch of `numbers`, in order: read from the checkpoint where stored,
    else computed (and stored)."""
    stored = {n for n in numbers if store is not None and store.has(n)}
    fresh = [n for n in numbers if n not in stored]
    stream = _iterate(plan, fresh, progress)
    with contextlib.closing(stream):
        for number in numbers:
            if number in stored:
                yield number, store.load(number)
                continue
            batch = next(stream)
            part = _part(_checked_result(analysis(im, batch), len(batch)), reduce)
            if store is not None:
                store.save(number, part)
            yield number, part
        next(stream, None)                   # the bar counts the last batch


def _takes(im, name: str) -> bool:
    forward = getattr(getattr(im, "model", im), "forward", None)
    try:
        return name in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def _device(im) -> torch.device:
    first = next(iter(im.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _checked_result(out, batch: int) -> dict[str, torch.Tensor]:
    if not isinstance(out, Mapping) or not out:
        raise InvalidArgumentError(f"an analysis returns a non-empty dict of tensors, got {type(out).__name__}")
    for name, value in out.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise InvalidArgumentError(f"an analysis returns {{str: tensor}}, got {name!r}: {type(value).__name__}")
        if value.dim() == 0 or value.shape[0] != batch:
            raise ShapeMismatchError(f"analysis result {name!r} must be [batch={batch}, ...] (one row per example), "
                                     f"got {list(value.shape)}")
    return {name: value.detach() for name, value in out.items()}


def _same_names(have, out) -> None:
    if have is not None and set(have) != set(out):
        raise InvalidArgumentError(f"the analysis returned {sorted(out)} after {sorted(have)}: "
                                   "return the same names for every batch")


def _part(out: dict, reduce: str) -> _Part:
    dtypes = {name: value.dtype for name, value in out.items()}
    if reduce == "none":
        return _Part(len(next(iter(out.values()))), {name: value.cpu() for name, value in out.items()}, dtypes)
    sums = {}
    for name, value in out.items():
        wide = torch.float64 if value.is_floating_point() or value.is_complex() else torch.int64
        if value.device.type == "mps":           # no fp64 there
            value = value.cpu()
        sums[name] = value.sum(0, dtype=wide).cpu()     # one example's size, on the CPU
    return _Part(len(next(iter(out.values()))), sums, dtypes)


class _Running:
    """The sum over examples so far, in fp64 (integers in int64), and how many: what "mean" and "sum" keep."""

    def __init__(self, mean: bool):
        self.mean, self.count, self.sums, self.dtypes = mean, 0, None, {}

    def add(self, part: _Part) -> None:
        _same_names(self.sums, part.tensors)
        sums = self.sums or {}
        for name, value in part.tensors.items():
            if name in sums and sums[name].shape != value.shape:
                raise ShapeMismatchError(
                    f"reduce='mean'/'sum' needs one shape per example, but {name!r} was {list(sums[name].shape)} and "
                    f"is now {list(value.shape)}: read fixed positions (data.last_token) or use reduce='none'")
            sums[name] = sums[name] + value if name in sums else value
        self.sums, self.count = sums, self.count + part.rows
        self.dtypes.update(part.dtypes)

    def result(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, total in self.sums.items():
            dtype = self.dtypes[name]
            floating = dtype.is_floating_point or dtype.is_complex
            if self.mean:
                total = total / self.count
            out[name] = total.to(torch.promote_types(dtype, torch.float32) if floating or self.mean else total.dtype)
        return out


class _Rows:
    """Every example's rows, on the CPU: what "none" keeps."""

    def __init__(self):
        self.parts = None

    def add(self, part: _Part) -> None:
        _same_names(self.parts, part.tensors)
        parts = self.parts or {name: [] for name in part.tensors}
        for name, value in part.tensors.items():
            parts[name].append(value)
        self.parts = parts

    def result(self) -> dict[str, torch.Tensor]:
        return {name: _cat_padded(name, parts) for name, parts in self.parts.items()}


def _cat_padded(name: str, parts: list) -> torch.Tensor:
    """torch.cat over rows; an axis that differs between parts is NaN-filled at its end."""
    if any(p.dim() != parts[0].dim() or p.dtype != parts[0].dtype for p in parts):
        raise ShapeMismatchError(f"analysis result {name!r} changes its number of axes or dtype between batches")
    widest = [max(p.shape[axis] for p in parts) for axis in range(1, parts[0].dim())]
    ragged = [p for p in parts if list(p.shape[1:]) != widest]
    if ragged and not parts[0].is_floating_point():
        raise ShapeMismatchError(f"analysis result {name!r} ({parts[0].dtype}) changes shape between batches: "
                                 "only floating results are NaN-padded")
    grown = []
    for p in parts:
        if list(p.shape[1:]) != widest:
            full = p.new_full([p.shape[0], *widest], float("nan"))
            full[tuple(slice(0, n) for n in p.shape)] = p
            p = full
        grown.append(p)
    return torch.cat(grown)


# ---- ready analyses ---------------------------------------------------------------------------
def last_token(kinds=("resid_pre",), layers=None):
    """Analysis: each example's per-layer records at its last real token (the last non-pad
    position of its row, whichever side the padding is on): {kind: [b, L, ...]} over `layers` in
    the order given (all when None), e.g. resid_pre [b, L, d_model], z [b, L, H, d_head] (layers
    with fewer heads padded with NaN). kinds: among TOKEN_KINDS."""
    kinds = (kinds,) if isinstance(kinds, str) else tuple(dict.fromkeys(kinds))
    bad = [k for k in kinds if k not in TOKEN_KINDS]
    if not kinds or bad:
        raise InvalidArgumentError(f"last_token reads per-token layer records {TOKEN_KINDS}, got {kinds!r}")

    def analysis(im, batch: Batch) -> dict[str, torch.Tensor]:
        chosen = as_indices(range(im.num_layers) if layers is None else layers, im.num_layers, "layer")
        narrowed = chosen if any(k != "z" for k in kinds) else None   # record's layers= covers no "z"
        with torch.no_grad(), im.record(*kinds, layers=narrowed) as rec:
            im(**batch.encoding)
        rows, last = torch.arange(len(batch)), batch.last_positions
        return {kind: padded_stack([_at(rec[kind, layer], rows, last) for layer in chosen], dim=1, fill=float("nan"))
                for kind in kinds}

    return analysis


def _at(x: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return x[rows.to(x.device), positions.to(x.device)]         # [b, t, ...] → [b, ...]


def token_loss():
    """Analysis for a causal LM: {"loss": [b] each example's mean next-token cross-entropy over its
    own tokens (NaN where none is scored), "tokens": [b] how many were scored}. Neither a pad nor a
    row's first token is scored (a left-padded row's first token would be predicted from a pad), so
    a row scores what it scores alone. The token-weighted mean over a dataset: the sum of
    loss · tokens over the sum of tokens."""
    def analysis(im, batch: Batch) -> dict[str, torch.Tensor]:
        ids, mask = batch.encoding["input_ids"], batch.encoding["attention_mask"]
        first = (mask.long().cumsum(-1) == 1) & (mask != 0)
        labels = ids.masked_fill((mask == 0) | first, _IGNORED)
        with torch.no_grad(), im.record("loss") as rec:
            im(**batch.encoding, labels=labels)
        loss = rec["loss"]                                     # [b, t − 1], NaN where not scored
        tokens = (~loss.isnan()).sum(-1)
        return {"loss": loss.nansum(-1) / tokens, "tokens": tokens}

    return analysis


# ---- results on disk --------------------------------------------------------------------------
def save(path, tensors: Mapping, *, labels=None, metadata: Mapping | None = None,
         distributed: bool | None = None) -> None:
    """Write `tensors` ({name: tensor}, any shapes: `reduce`'s [L, H] means, [N, ...] rows) to a
    safetensors file, with `labels` (a list, e.g. one text or class per example, or a dict of such lists) and `metadata` ({str: value}) as JSON in
    its header. Both must be JSON that reads back equal (str, numbers, bools, None, lists, dicts
    with str keys; no NaN); a tuple of labels is saved as a list. Never pickles.
    distributed (as reduce's): under a process group of more than one rank only rank 0 writes; the
    others check the arguments and return at once (no barrier: dist.barrier() before another rank
    reads the file). False: every process writes."""
    from safetensors.torch import save_file

    header = {}
    if labels is not None:
        if not isinstance(labels, (list, tuple, Mapping)):
            raise InvalidArgumentError(f"labels must be a list or a dict of lists, got {type(labels).__name__}")
        header[_LABELS] = _json(list(labels) if isinstance(labels, tuple) else labels, "labels")
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise InvalidArgumentError(f"metadata must be a dict, got {type(metadata).__name__}")
        header[_METADATA] = _json(dict(metadata), "metadata")
    tensors = _savable(tensors)
    if _ranks(distributed)[0] == 0:
        save_file(tensors, os.fspath(path), metadata=header)


def load(path) -> tuple[dict[str, torch.Tensor], object, dict | None]:
    """(tensors on the CPU, labels, metadata) of a file written by `save` (None where absent): the
    tensors {name: tensor} with the shapes they were saved with, e.g. `reduce`'s results ([L, H]
    means, or [N, ...] rows under "none")."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = os.fspath(path)
    with safe_open(path, framework="pt") as f:
        header = f.metadata() or {}
    decode = lambda key: json.loads(header[key]) if key in header else None     # noqa: E731
    return load_file(path), decode(_LABELS), decode(_METADATA)


def _json(value, what: str) -> str:
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"{what} must be JSON (str, numbers, bools, None, lists, dicts with str keys): "
                                   f"{e}") from None
    if json.loads(text) != value:
        raise InvalidArgumentError(f"{what} would not read back equal from JSON (a tuple reads back as a list, a "
                                   "non-str key as a str): pass lists and str keys")
    return text
