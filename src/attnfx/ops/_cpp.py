"""The C++/CUDA extension `attnfx._C` (csrc/), loaded on first use.

Importing attnfx never needs it: when it is missing, `missing()` names what is missing and how to
build it, and attnfx.ops.backends runs every op on another implementation (or raises, when "cpp" was
forced). Its raw ops live in `torch.ops.attnfx_C`; their fakes are registered here once the
library is loaded (torch.library refuses fakes for an op that does not exist yet).
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch

REBUILD = "rebuild with `pip install --no-build-isolation -e .`"
_DISPATCH_KEYS = {"cpu": ("CPU",), "cuda": ("CUDA",)}
_fakes: dict[str, Callable] = {}
_registered: set[str] = set()
_state: tuple[object | None, str | None] | None = None      # (module, None) or (None, why missing)


def _load() -> tuple[object | None, str | None]:
    global _state
    if _state is None:
        try:
            module = importlib.import_module("attnfx._C")
        except ImportError as e:
            _state = (None, f"attnfx._C not built: {e}; {REBUILD}")
        else:
            _state = (module, None)
            for name in _fakes:
                _register(name)
    return _state


def _register(name: str) -> None:
    if name not in _registered:
        torch.library.register_fake(f"attnfx_C::{name}", _fakes[name])
        _registered.add(name)


def available() -> bool:
    return _load()[0] is not None


def missing() -> str | None:
    """Why the extension cannot be used, or None when it can."""
    return _load()[1]


def has_kernels(names, device_type: str) -> bool:
    """Whether every raw op in `names` runs on this device type (CUDA kernels exist only when the
    extension was built with a CUDA toolkit and a CUDA build of torch)."""
    if not available():
        return False
    keys = _DISPATCH_KEYS.get(device_type, ()) + ("CompositeExplicitAutograd",)
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return all(any(has(f"attnfx_C::{name}", key) for key in keys) for name in names)


def ops():
    """torch.ops.attnfx_C, loading the extension first."""
    _load()
    return torch.ops.attnfx_C


def register_fake(name: str, fn: Callable) -> None:
    """The fake of raw op attnfx_C::<name>, registered when (or as soon as) the library is loaded."""
    _fakes[name] = fn
    if _state is not None and _state[0] is not None:
        _register(name)
