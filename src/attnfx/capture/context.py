"""The per-call context: which InstrumentedModel is running, which sites its compiled graphs
actually executed, and the records they returned. Set by the wrapper around every call, read
by the shared backend (at compile time) and by its runners (at run time) — so the backend never
closes over per-model state."""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any

_CURRENT: contextvars.ContextVar["CallContext | None"] = contextvars.ContextVar(
    "attnfx_call", default=None)


@dataclass
class CallContext:
    owner: Any                                   # the InstrumentedModel being called
    sites_run: list = field(default_factory=list)     # SiteInfo of every executed site
    records: list = field(default_factory=list)       # (RecordKey, tensor) pairs
    notes: list = field(default_factory=list)         # near-misses of the site patterns
    final_norm: Any = None                            # FinalNormInfo of the graph that has it
    unembeddings: list = field(default_factory=list)  # widths of the unembeddings compiled graphs ran
    graphs_run: int = 0
    probed: dict = field(default_factory=dict)        # probe kind → layers gated
    leaks: list = field(default_factory=list)         # ops the lrp pass had no rule for
    runs_of: dict = field(default_factory=dict)       # module path → its sites run so far (occurrences)
    output: Any = None                                # the call's output and labels, for the per-token
    labels: Any = None                                # loss a recording computes after the call


def current() -> CallContext | None:
    return _CURRENT.get()


@contextlib.contextmanager
def calling(owner):
    ctx = CallContext(owner)
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)
