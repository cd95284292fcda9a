"""A probing session: the state the probe pass reads (gates, patch weights and sources, deltas,
the GradDrop switch) as buffers of the wrapper for the duration of a `with` block, and what the
calls inside it report back (the layers each kind was found at, the captures, the ops the lrp
pass had no rule for). Relevance and patching are built on it; the wrapper treats it like an
active recording (it reads `.spec` and calls `._collect`)."""
from __future__ import annotations

import torch

from .errors import InvalidArgumentError
from .passes.probe import HEAD_KINDS
from .spec import STEERING_STATE, Spec


def state_shape(im, kind: str, batch: int, seq: int, *, per_dim: bool) -> tuple[int, ...]:
    """[L, b, t(, H)] for weights and gates, [..., d] for sources and deltas ([b, t(, d)] for tokens)."""
    sites = im.sites                    # sized for the widest layer (layers may differ in heads)
    heads = max(s.kv_heads_read if kind in ("keys", "values") else s.num_heads for s in sites)
    if kind == "tokens":
        shape = (batch, seq)
    elif kind in HEAD_KINDS:
        shape = (len(im.sites), batch, seq, heads)
    else:
        shape = (len(im.sites), batch, seq)
    if not per_dim:
        return shape
    width = max(s.head_dim for s in sites) if kind in HEAD_KINDS else sites[0].d_model
    if width is None:
        raise InvalidArgumentError(f"the width of '{kind}' components is unknown (no output projection found)")
    return shape + (width,)


def relevance_dtype(model) -> torch.dtype:
    """fp32, or fp64 for an fp64 model."""
    return torch.float64 if any(p.dtype == torch.float64 for p in model.parameters()) else torch.float32


class Probing:
    def __init__(self, im, spec: Spec, state: dict[str, torch.Tensor]):
        names = [n for n in spec.state_names() if n not in STEERING_STATE and n != "readout_directions"]
        missing = sorted(set(names) - set(state))
        if missing:
            raise InvalidArgumentError(f"probing state missing: {missing}")
        self._im, self.spec, self.state = im, spec, {name: state[name] for name in names}
        self.touched: dict[str, set[int]] = {}
        self.captures: dict[str, dict[int, torch.Tensor]] = {}
        self.leaks: list[str] = []

    def __enter__(self):
        im = self._im
        im._check_attached()
        if im._recording is not None:
            raise InvalidArgumentError("a recording or probing session is already active on this model; nest none")
        for name, tensor in self.state.items():
            im.register_buffer(name, tensor, persistent=False)
        im._recording = self
        return self

    def __exit__(self, *exc):
        im = self._im
        im._recording = None
        for name in self.state:
            delattr(im, name)
        return False

    def _collect(self, ctx) -> None:
        self.touched = {kind: set(layers) for kind, layers in ctx.probed.items()}
        self.leaks = list(dict.fromkeys(ctx.leaks))
        self.captures = {}
        for key, tensor in ctx.records:
            if key.kind.startswith("capture:"):
                self.captures.setdefault(key.kind.split(":", 1)[1], {})[key.layer] = tensor
