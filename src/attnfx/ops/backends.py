"""Which implementation each attnfx op runs (docs/design.md §4): the C++/CUDA extension attnfx._C
("cpp"), a Triton kernel ("triton") or the plain-torch reference ("reference").

Default order, chosen per call from the device of the op's input:

    CUDA tensors:  triton > cpp > reference
    CPU tensors:   cpp > reference

Triton runs on CPU only when forced, and only under TRITON_INTERPRET=1 (Triton's interpreter).
The default order skips what an op does not implement or what cannot run here: attnfx._C not
built, built without CUDA, or triton not installed. `report()` says which implementation each op
uses and why.

`set_backend(name, op=None)` forces one implementation, for every op or for one op (a per-op
setting wins over the global one; `set_backend(None)` restores the default order). A forced
implementation is never replaced by another: an op that lacks it, or cannot run it on the
tensors' device, raises BackendUnavailableError naming the op, the backend, why, and what is
available. Ops declare their implementations with `register(op, {...})` and ask
`choose(op, device)` on every call.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from ..errors import BackendUnavailableError, InvalidArgumentError

BACKENDS = ("cpp", "triton", "reference")
DEFAULT_ORDER = {"cuda": ("triton", "cpp", "reference"), "cpu": ("cpp", "reference")}

_impls: dict[str, frozenset[str]] = {}
_cpp_ops: dict[str, tuple[str, ...]] = {}      # the attnfx_C ops an op's "cpp" implementation calls
_forced_all: str | None = None
_forced: dict[str, str] = {}


def register(op: str, impls, *, cpp_ops=None) -> None:
    """Declares op's implementations; `cpp_ops` are the raw attnfx_C ops it calls (default: op),
    a backward op included, so "cpp" counts as available on a device only if all have kernels."""
    unknown = set(impls) - set(BACKENDS)
    if unknown or "reference" not in impls:
        raise InvalidArgumentError(f"implementations of {op} must include 'reference' and be among {BACKENDS}, "
                                   f"got {sorted(impls)}")
    _impls[op] = frozenset(impls)
    _cpp_ops[op] = tuple(cpp_ops or (op,))


def set_backend(name: str | None, op: str | None = None) -> None:
    """Forces implementation `name` for `op` (None: every op); name None restores the default order."""
    global _forced_all
    if name is not None and name not in BACKENDS:
        raise InvalidArgumentError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    if op is not None and op not in _impls:
        raise InvalidArgumentError(f"unknown op {op!r}; ops with backends: {sorted(_impls)}")
    if op is not None and name is not None and name not in _impls[op]:
        raise BackendUnavailableError(f"{op} has no {name!r} implementation; it has {sorted(_impls[op])}")
    if name == "cpp":
        from . import _cpp

        if not _cpp.available():
            raise BackendUnavailableError(f"cannot force 'cpp'{'' if op is None else ' for ' + op}: {_cpp.missing()}")
    if op is None:
        _forced_all = name
        _forced.clear()
    elif name is None:
        _forced.pop(op, None)
    else:
        _forced[op] = name


def _why_not(op: str, name: str, device: torch.device) -> str | None:
    """Why `name` cannot run `op` on `device`, or None when it can."""
    if name not in _impls[op]:
        return f"{op} has no {name} implementation"
    if name == "cpp":
        from . import _cpp

        if not _cpp.available():
            return _cpp.missing()
        if not _cpp.has_kernels(_cpp_ops[op], device.type):
            return f"attnfx._C has no {device.type} kernel for {op} (CUDA kernels need a CUDA build of torch and nvcc)"
    if name == "triton":
        if device.type not in ("cuda", "cpu"):
            return f"Triton does not run on {device.type}"
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton on CPU needs TRITON_INTERPRET=1 set before triton is imported"
    return None


def explain(op: str, device) -> tuple[str | None, str]:
    """(implementation, why) for op on device; implementation None when a forced one cannot run."""
    if op not in _impls:
        raise InvalidArgumentError(f"unknown op {op!r}; ops with backends: {sorted(_impls)}")
    device = torch.device(device)
    forced = _forced.get(op, _forced_all)
    if forced is not None:
        scope = f"set_backend({forced!r}, op={op!r})" if op in _forced else f"set_backend({forced!r})"
        why = _why_not(op, forced, device)
        return (None, f"forced by {scope}, but {why}") if why else (forced, f"forced by {scope}")
    order = [name for name in DEFAULT_ORDER.get(device.type, ("reference",)) if name in _impls[op]]
    skipped = []
    for name in order:
        why = _why_not(op, name, device)
        if why is None:
            return name, "default order " + " > ".join(order) + "".join(f"; skipped {s}" for s in skipped)
        skipped.append(f"{name}: {why}")
    raise AssertionError("unreachable: the reference runs everywhere")


def available(op: str, device) -> list[str]:
    """The implementations of op that can run on device."""
    return [name for name in BACKENDS if name in _impls[op] and _why_not(op, name, torch.device(device)) is None]


def choose(op: str, device) -> str:
    """The implementation op runs on device, or BackendUnavailableError for a forced one that cannot."""
    name, why = explain(op, device)
    if name is None:
        raise BackendUnavailableError(f"{op} on {torch.device(device).type}: {why}; "
                                      f"available there: {available(op, device)}")
    return name


def report(devices=None) -> str:
    """One line per op and device: the implementation it runs and why (ops are imported first)."""
    import attnfx.ops  # noqa: F401  (registers every op)

    devices = devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    lines = []
    for op in sorted(_impls):
        for device in devices:
            name, why = explain(op, device)
            lines.append(f"{op:<16} {device:<5} {name or 'UNAVAILABLE':<10} {why}")
    return "\n".join(lines)
