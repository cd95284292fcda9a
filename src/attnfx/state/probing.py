"""A probing session: the state the probe pass reads (gates, patch weights and sources, deltas,
the GradDrop switch) as buffers of the wrapper for the duration of a `with` block, and what the
calls inside it report back (the layers each kind was found at, the captures, the ops the lrp
pass had no rule for). Relevance and patching are built on it; the wrapper treats it like an
active recording (it reads `.spec` and calls `._collect`)."""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..graph.calls import find_main_output, output_length
from ..errors import InvalidArgumentError
from .spec import HEAD_KINDS, STEERING_STATE, Spec


def state_shape(im, kind: str, batch: int, seq: int, *, per_dim: bool) -> tuple[int, ...]:
    """[L, b, t(, H)] for weights and gates, [..., d] for sources and deltas ([b, t(, d)] for tokens);
    t the longest component of the kind (each component reads its own first positions)."""
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


@dataclass(frozen=True)
class Lengths:
    """The positions one call's components see: per kind, each layer's length (tokens: layer −1;
    a layer where the kind was not found is absent) — an encoder layer the encoder's tokens, a
    decoder layer the decoder's, a cross-attention's keys the encoder's — and the length of the
    main output (what metrics and token targets index; None when the outputs hold none)."""
    components: dict[str, dict[int, int]]
    output: int | None
    inferred: bool = False              # read off the call's tokens, not measured

    def longest(self, kind: str) -> int:
        """The sequence axis of the kind's state: its longest component (1 when found nowhere)."""
        return max(self.components.get(kind, {}).values(), default=1)

    def of(self, kind: str) -> dict[int, int]:
        return self.components.get(kind, {})


def sequence_lengths(im, args, kwargs, kinds: tuple[str, ...]) -> Lengths:
    """The lengths the components of `kinds` see: a single-stream call's token length (token
    inputs, no cross-attention: every component reads the call's positions — where one reads more,
    the probe pass's narrow fails loudly and the caller measures them instead), else measured."""
    length = output_length(args, kwargs)
    if length is None or im in _BEYOND_TOKENS or any(site.stack is not None for site in im.sites):
        return measured_lengths(im, args, kwargs, kinds)
    layers = {kind: [-1] if kind == "tokens" else range(len(im.sites)) for kind in kinds}
    return Lengths({kind: dict.fromkeys(layers[kind], length) for kind in kinds}, length, inferred=True)


def remeasured(im, args, kwargs, kinds: tuple[str, ...], inferred: Lengths) -> Lengths | None:
    """After a run at lengths read off the tokens failed: the measured lengths if they differ from
    those (the model's lengths are then always measured), else None."""
    measured = measured_lengths(im, args, kwargs, kinds)
    if measured.components == inferred.components:
        return None
    _BEYOND_TOKENS.add(im)
    return measured


# Models whose components were found to read more positions than the call's tokens.
_BEYOND_TOKENS: "weakref.WeakSet" = weakref.WeakSet()
# Measured lengths per model and call shapes; bounded so a long session of ever-new lengths stays small.
_MEASURED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_CALLS_KEPT = 256


def measured_lengths(im, args, kwargs, kinds: tuple[str, ...]) -> Lengths:
    """The lengths the components of `kinds` see in this call, read off one no-grad forward that
    captures them (the layers' own sizes: pixels or audio frames give no token count to read),
    kept per model and call shapes so a call of known shapes runs nothing."""
    key = _shape_signature(args, kwargs)
    known = _MEASURED.setdefault(im, {}).get(key, {}) if key is not None else {}
    missing = tuple(kind for kind in kinds if kind not in known)
    if missing or "output" not in known:
        known = {**known, **_measure(im, args, kwargs, missing)}
        if key is not None:
            _remember(im, key, known)
    return Lengths({kind: known[kind] for kind in kinds}, known["output"])


def _measure(im, args, kwargs, kinds: tuple[str, ...]) -> dict:
    probing = Probing(im, Spec(captures=kinds), {})
    with torch.no_grad(), probing:
        outputs = im(*args, **kwargs)
    main = find_main_output(outputs)
    found = {kind: {layer: int(x.shape[1]) for layer, x in probing.captures.get(kind, {}).items()} for kind in kinds}
    return {**found, "output": int(main.shape[1]) if main is not None else None}


def _remember(im, key: tuple, known: dict) -> None:
    calls = _MEASURED[im]
    calls.pop(key, None)
    calls[key] = known
    while len(calls) > _CALLS_KEPT:
        calls.pop(next(iter(calls)))


def _shape_signature(args, kwargs) -> tuple | None:
    """What the lengths can depend on: the inputs' shapes and plain values. None (not kept) for a
    call holding anything else, such as a KV cache."""
    items = [(i, value) for i, value in enumerate(args)] + sorted(kwargs.items())
    signature = []
    for name, value in items:
        if isinstance(value, torch.Tensor):
            signature.append((name, tuple(value.shape)))
        elif value is None or isinstance(value, (bool, int, float, str)):
            signature.append((name, value))
        else:
            return None
    return tuple(signature)


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
        self.graphs_run, self.unembeddings = 0, set()     # graphs with attention run; unembedding widths

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
        self.graphs_run, self.unembeddings = ctx.graphs_run, set(ctx.unembeddings)
        self.captures = {}
        for key, tensor in ctx.records:
            if key.kind.startswith("capture:"):
                self.captures.setdefault(key.kind.split(":", 1)[1], {})[key.layer] = tensor
