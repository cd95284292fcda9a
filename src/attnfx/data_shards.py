"""Where `data.reduce`'s per-batch parts travel and rest: across ranks, and across reruns.

A `_Part` is one batch's share of a reduction (its rows, or their fp64 sum). Under a
torch.distributed process group (`_ranks`) rank r owns batches r, r + N, r + 2N, ... (`_owned`);
the ranks' parts are packed as safetensors blobs (`_encoded` / `_decoded`: tensors and a JSON
header, never a pickle) and all-gathered as uint8 tensors (`_all_gathered`), so every rank can
add them in batch order. A `checkpoint=` folder (`_Checkpoint`) holds the same blobs, one file per
finished batch, stamped with the run's arguments and the batch's texts, so that a rerun reads
them back instead of recomputing them and refuses a folder written by another sweep.

Kept apart from data.py, which batches, reduces and saves, because none of this changes what a
sweep computes, only where its parts are computed and kept. The behaviour users see is described
in data.py's module docstring. This module imports nothing from data.py at run time.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InvalidArgumentError


# keys of the safetensors header of a checkpoint file or a gathered blob (data.py's own: labels, metadata)
_PARTS, _RUN, _TEXTS = "attnfx.parts", "attnfx.run", "attnfx.texts"


@dataclass(frozen=True)
class _Part:
    """One batch's share of the result, on the CPU: its rows ("none") or their sum ("mean", "sum":
    fp64, integers in int64); `dtypes` are the analysis's own."""
    rows: int
    tensors: dict
    dtypes: dict


# ---- which rank runs which batch, and the gather ----------------------------------------------
def _ranks(distributed) -> tuple[int, int]:
    """(this rank, how many share the batches): (0, 1) unless a process group is used."""
    if distributed not in (None, True, False):
        raise InvalidArgumentError(f"distributed must be None (automatic), True or False, got {distributed!r}")
    import torch.distributed as dist

    live = dist.is_available() and dist.is_initialized()
    if distributed and not live:
        raise InvalidArgumentError("distributed=True needs an initialised torch.distributed process group: run "
                                   "under torchrun and call torch.distributed.init_process_group() first")
    return (dist.get_rank(), dist.get_world_size()) if live and distributed is not False else (0, 1)


def _owned(rank: int, world: int, batches: int) -> range:
    """The batch numbers rank `rank` of `world` computes: rank, rank + world, rank + 2·world, ..."""
    return range(rank, batches, world)


def _wire_device(device: torch.device) -> torch.device:
    """Where the gathered bytes travel: the CPU for a backend that moves CPU tensors (gloo, MPI),
    else the model's device (NCCL: its GPU)."""
    import torch.distributed as dist

    backend = str(dist.get_backend()).lower()
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    if device.type == "cpu":
        raise InvalidArgumentError(f"the process group's backend {backend!r} moves no CPU tensors and the model is "
                                   "on the CPU: init_process_group('gloo') (or 'cpu:gloo,cuda:nccl')")
    return device


def _all_gathered(parts: dict, device: torch.device) -> dict:
    """Every rank's {batch number: _Part}, on every rank: each rank's parts as one safetensors blob
    (no pickle), gathered as uint8 tensors padded to the longest."""
    import torch.distributed as dist

    mine = torch.frombuffer(bytearray(_encoded(parts)), dtype=torch.uint8).to(device)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([mine.numel()], dtype=torch.int64, device=device))
    longest = max(int(size) for size in sizes)
    blobs = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in sizes]
    dist.all_gather(blobs, torch.nn.functional.pad(mine, (0, longest - mine.numel())))
    found = {}
    for blob, size in zip(blobs, sizes):
        found.update(_decoded(blob[:int(size)].cpu().numpy().tobytes())[0])
    return found


def _encoded(parts: dict, header: Mapping | None = None) -> bytes:
    """{batch number: _Part} as safetensors bytes: tensors "<number>/<name>", rows and dtypes in the header."""
    from safetensors.torch import save

    tensors = {f"{number}/{name}": value for number, part in parts.items() for name, value in part.tensors.items()}
    rows = {str(number): {"rows": part.rows, "dtypes": {name: str(d).removeprefix("torch.")
                                                        for name, d in part.dtypes.items()}}
            for number, part in parts.items()}
    return save(_savable(tensors), metadata={_PARTS: json.dumps(rows), **(header or {})})


def _decoded(raw: bytes) -> tuple[dict, dict]:
    """({batch number: _Part}, the rest of the header) of `_encoded` bytes."""
    from safetensors.torch import load

    (size,) = struct.unpack("<Q", raw[:8])              # safetensors: u64 header size, JSON header, raw data
    header = json.loads(raw[8:8 + size]).get("__metadata__", {})
    tensors, parts = load(raw), {}
    for number, info in json.loads(header.pop(_PARTS)).items():
        names = info["dtypes"]
        parts[int(number)] = _Part(info["rows"], {name: tensors[f"{number}/{name}"] for name in names},
                                   {name: getattr(torch, dtype) for name, dtype in names.items()})
    return parts, header


# ---- across reruns ----------------------------------------------------------------------------
class _Checkpoint:
    """A folder of finished batches, one safetensors file each, named by batch number: written
    whole (to a temporary name, then os.replace), each stamped with the run's arguments and its
    batch's texts so that a rerun of another sweep is refused instead of mixed in."""

    def __init__(self, folder, plan, reduce: str):       # plan: batching._Plan
        self.folder, self.plan, self.names = Path(folder), plan, None
        self.run = json.dumps({"examples": plan.count, "batch_size": plan.size, "reduce": reduce,
                               "padding_side": plan.side, "position_ids": plan.positions,
                               "max_length": plan.max_length}, sort_keys=True)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, number: int) -> Path:
        return self.folder / f"batch-{number:08d}.safetensors"

    def _texts(self, number: int) -> str:
        span = self.plan.span(number)
        return hashlib.sha256(json.dumps(list(self.plan.read(span.start, span.stop))).encode()).hexdigest()

    def has(self, number: int) -> bool:
        return self._path(number).is_file()

    def save(self, number: int, part: _Part) -> None:
        self._check_names(number, part, "returns")
        raw = _encoded({number: part}, {_RUN: self.run, _TEXTS: self._texts(number)})
        path = self._path(number)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        temporary.write_bytes(raw)
        os.replace(temporary, path)          # atomic: a crash leaves the whole file or none

    def load(self, number: int) -> _Part:
        path = self._path(number)
        parts, header = _decoded(path.read_bytes())
        if header.get(_RUN) != self.run:
            raise InvalidArgumentError(f"checkpoint {path} was written by a sweep with {header.get(_RUN)}, this one "
                                       f"has {self.run}: pass another checkpoint folder, or the same arguments")
        if header.get(_TEXTS) != self._texts(number) or set(parts) != {number}:
            raise InvalidArgumentError(f"checkpoint {path} holds other texts than batch {number} of this source: "
                                       "pass another checkpoint folder for another source")
        self._check_names(number, parts[number], "holds")
        return parts[number]

    def _check_names(self, number: int, part: _Part, verb: str) -> None:
        names = sorted(part.tensors)
        if self.names is not None and names != self.names:
            raise InvalidArgumentError(f"batch {number} {verb} {names} but the checkpoint's other batches "
                                       f"{self.names}: pass another checkpoint folder for another analysis")
        self.names = names


def _savable(tensors) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; a tensor sharing memory with an earlier one is copied
    (safetensors refuses shared storage). Here rather than in data.py: `_encoded` needs it too,
    and data.save imports it from here (no import cycle)."""
    if not isinstance(tensors, Mapping):
        raise InvalidArgumentError(f"tensors must be a dict {{name: tensor}}, got {type(tensors).__name__}")
    out, seen = {}, set()
    for name, value in tensors.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise InvalidArgumentError(f"tensors must be {{str: tensor}}, got {name!r}: {type(value).__name__}")
        value = value.detach().cpu().contiguous()
        storage = value.untyped_storage().data_ptr()
        out[name] = value.clone() if storage in seen and value.numel() else value
        seen.add(storage)
    return out
