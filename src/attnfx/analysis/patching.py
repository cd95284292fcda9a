"""Patching on the instrumented graph: exact activation patching and its gradient-based
estimates — attribution patching (AtP), AtP* (Kramár et al. 2024: QK fix + GradDrop) and RelP
(Rezaei Jafari et al. 2025: AtP with LRP coefficients).

A component's effect is the change of the metric when its activation in the clean run is
replaced by the corrupt run's, averaged over the examples:

    c(n) = mean_b [ metric(clean | n ← n(corrupt)) − metric(clean) ]
    AtP:  c(n) ≈ (n(corrupt) − n(clean)) · ∂metric/∂n          at the clean run
    RelP: the same with the LRP coefficients of the lrp pass in place of ∂metric/∂n

Components: "heads" (z_h), "queries", "keys", "values" (as attention reads them), "attn" and
"mlp" (each layer's output), "resid" (the residual stream entering each layer); all positions
at once or, with per_position=True, one position at a time. Sources and patch weights are runtime
tensors of the graph (the probe pass), so every method runs compiled and never recompiles per
component; AtP and RelP take the gradient at the patch weights (w = 0): ∂metric/∂w = (source − x)·g.

Each layer's positions are its own (an encoder–decoder's encoder layers: the encoder's tokens;
decoder layers: the decoder's; a cross-attention's keys: the encoder's; a ViT's: its patches and
class token), read off the corrupt run's activations; per position, those a layer lacks are NaN.
The metric reads the main output (metrics.py: logits — an encoder–decoder's decoder logits — or a
backbone's last hidden state), or the whole outputs for a `metrics.of_outputs` metric.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..graph.calls import as_call as _call, batch_and_length, main_output
from ..errors import InvalidArgumentError, ShapeMismatchError, UnsupportedModelError
from ..state.indices import padded_stack
from ..state.probing import Probing, relevance_dtype, state_shape
from ..state.spec import HEAD_KINDS, Spec
from ..tensor_parallel import refuse_sharded
from . import qk_fix
from .metrics import OutputsMetric, wide

__all__ = ["PatchingResult", "capture", "activation_patching", "attribution_patching", "relp", "atp_star",
           "COMPONENTS"]

COMPONENTS = ("heads", "attn", "mlp", "resid", "queries", "keys", "values")


@dataclass
class PatchingResult:
    """scores: [L, H] ([L, H, T] per position) for head kinds, [L] ([L, T]) for the others; per
    position, T spans the longest layer and a layer's positions past its own length are NaN (for
    "keys" and "values", H counts the kv heads as the attention reads them). `dims` names the
    axes of scores; clean and corrupt [b]: the metric of each run per example; signed (AtP*) shaped
    as scores."""
    scores: torch.Tensor
    dims: tuple[str, ...]
    component: str
    method: str
    clean: torch.Tensor                     # metric of the clean run, per example
    corrupt: torch.Tensor                   # metric of the corrupt run, per example
    forwards: int
    backwards: int
    seconds: float
    signed: torch.Tensor | None = None      # AtP*: the QK-fixed AtP before GradDrop's |·| average
    notes: list[str] = field(default_factory=list)

    def plot(self, path, title: str | None = None):
        """Write the scores as a heatmap (PNG) to `path`."""
        from ..viz import patching_heatmap
        return patching_heatmap(self, path, title=title)


def _check(im, clean, corrupt, component: str):
    if component not in COMPONENTS:
        raise InvalidArgumentError(f"components must be one of {COMPONENTS}, got {component!r}")
    (args, kwargs), (cargs, ckwargs) = _call(clean), _call(corrupt)
    if im._sites is None:
        im._discover(args, kwargs)
    refuse_sharded(im, "patching")
    _check_same_shapes((args, kwargs), (cargs, ckwargs))
    return (args, kwargs), (cargs, ckwargs), batch_and_length(args, kwargs)[0]


def _check_same_shapes(clean: tuple, corrupt: tuple) -> None:
    """Sources are patched position by position: every tensor input the two calls share (token ids,
    masks, pixels, audio features) has one shape in both."""
    (args, kwargs), (cargs, ckwargs) = clean, corrupt
    pairs = [(f"argument {i}", a, b) for i, (a, b) in enumerate(zip(args, cargs))]
    pairs += [(name, kwargs[name], ckwargs[name]) for name in kwargs if name in ckwargs]
    for name, a, b in pairs:
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape != b.shape:
            raise ShapeMismatchError(f"clean and corrupt inputs must share their shapes ([batch, seq] and every "
                                     f"other axis); got {name} {list(a.shape)} and {list(b.shape)}")


def _captured(im, inputs, kinds: tuple[str, ...]) -> tuple[object, dict[str, list[torch.Tensor]]]:
    """One forward: its outputs and, per kind, each layer's activation at its own length
    ([b, t_l(, H), d]; scores [b, H, T, S])."""
    args, kwargs = _call(inputs)
    probing = Probing(im, Spec(captures=tuple(kinds)), {})
    with torch.no_grad(), probing:
        outputs = im(*args, **kwargs)
    out = {}
    for kind in kinds:
        per_layer = probing.captures.get(kind, {})
        missing = [layer for layer in range(len(im.sites)) if layer not in per_layer]
        if missing:
            raise InvalidArgumentError(f"no '{kind}' component was found in layer(s) {missing}")
        out[kind] = [per_layer[layer] for layer in range(len(im.sites))]
    return outputs, out


def capture(im, inputs, kinds: tuple[str, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward returning the main output (the logits [b, t, vocab]) and, per kind, the
    activations stacked over layers ([L, b, t(, H), d]: d the head's d_head for head kinds, d_model
    for the others; t the longest layer's, zeros past a layer's own length; scores
    [L, b, H, T, S])."""
    outputs, per_layer = _captured(im, inputs, kinds)
    return main_output(outputs), {kind: padded_stack(xs) for kind, xs in per_layer.items()}


def _lengths(per_layer: list[torch.Tensor]) -> list[int]:
    """Each layer's length, [b, t_l, ...] activations: an encoder layer's is the encoder's."""
    return [int(x.shape[1]) for x in per_layer]


def _metric(metric, outputs, rows: slice | None = None, total: int | None = None) -> torch.Tensor:
    """The metric per example of a run's outputs — of the main output, or of the whole outputs for
    an `of_outputs` metric — restricted to the examples `rows` of a run of `total` rows if given."""
    if isinstance(metric, OutputsMetric):
        return wide(metric(outputs if rows is None else _rows(outputs, rows, total)))
    main = main_output(outputs)
    return wide(metric(main if rows is None else main[rows]))


def _rows(value, rows: slice, total: int):
    """The examples `rows` of a tiled run's outputs: each tensor whose first axis is the run's
    `total` rows, sliced; containers (a ModelOutput, a dict, a tuple) rebuilt around them."""
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() > 0 and value.shape[0] == total else value
    if isinstance(value, Mapping):
        return type(value)(**{k: _rows(v, rows, total) for k, v in value.items()})
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, rows, total) for v in value)
    return value


def _per_example(kind: str, estimates: torch.Tensor, per_position: bool) -> tuple[torch.Tensor, tuple]:
    """[L, b, t(, H)] estimates → [L, b, H(, T)] / [L, b(, T)] (positions summed unless per_position)."""
    if kind in HEAD_KINDS:
        estimates = estimates.transpose(2, 3)                      # [L, b, H, t]
        dims = ("layer", "head", "position") if per_position else ("layer", "head")
    else:
        dims = ("layer", "position") if per_position else ("layer",)
    return (estimates if per_position else estimates.sum(-1)), dims


def _layout(kind: str, estimates: torch.Tensor, per_position: bool) -> tuple[torch.Tensor, tuple]:
    """[L, b, t(, H)] estimates → mean over examples → [L, H(, T)] / [L(, T)]."""
    per_example, dims = _per_example(kind, estimates, per_position)
    return per_example.mean(1), dims


def _past_lengths(scores: torch.Tensor, lengths: list[int], per_position: bool) -> torch.Tensor:
    """Per-position scores [L(, H), T] with NaN past each layer's own length (the estimates there
    are zeros of state no component read); summed scores as they are."""
    if not per_position:
        return scores
    scores = scores.clone()
    for layer, length in enumerate(lengths):
        scores[layer, ..., length:] = float("nan")
    return scores


# ---- exact activation patching -------------------------------------------------------------------
def activation_patching(im, clean, corrupt, metric: Callable, components: str = "heads", *,
                        per_position: bool = False, rows_per_forward: int = 256,
                        progress: bool = True) -> PatchingResult:
    """Exact: one patched run per component, many runs batched into one forward (the clean
    batch tiled, each tile patching one component); the last chunk is padded with unpatched
    tiles so every forward has one shape (no recompilation). Per position, each layer's own
    positions are patched (an encoder layer's: the encoder's tokens) and the rest are NaN.

    clean, corrupt: inputs as the model takes them, of one shape (input_ids [b, t], ...); metric:
    the main output (logits [b, t, vocab]) → [b] (attnfx.metrics). Scores [L, H] per head
    (components "heads", "queries", "keys", "values"), [L] per layer ("attn", "mlp", "resid");
    [L, H, T] / [L, T] per_position."""
    start = time.perf_counter()
    (args, kwargs), _, batch = _check(im, clean, corrupt, components)
    corrupt_outputs, captured = _captured(im, corrupt, (components,))
    lengths = _lengths(captured[components])
    with torch.no_grad():
        base = _metric(metric, im(*args, **kwargs))
    grid = _enumerate(im, components, max(lengths), per_position)
    todo = [i for i, index in enumerate(grid) if (index[1].start or 0) < lengths[index[0]]]
    tiles = max(1, min(len(todo), rows_per_forward // batch))
    shape = state_shape(im, components, batch * tiles, max(lengths), per_dim=False)
    source = padded_stack(captured[components])                      # [L, b, t(, H), d]
    source = source.repeat(1, tiles, *([1] * (source.dim() - 2)))
    tiled_args, tiled_kwargs = _tile(args, batch, tiles), _tile(kwargs, batch, tiles)
    effects = torch.full((len(grid),), float("nan"), device=base.device, dtype=base.dtype)
    chunks = range(0, len(todo), tiles)
    for first in tqdm(chunks, desc=f"activation patching ({components})", disable=not progress, leave=False):
        weight = torch.zeros(shape, device=base.device)
        chunk = todo[first:first + tiles]
        for i, flat in enumerate(chunk):
            index = grid[flat]
            weight[(index[0], slice(i * batch, (i + 1) * batch)) + index[1:]] = 1.0
        state = {f"patch_w_{components}": weight, f"patch_src_{components}": source}
        with torch.no_grad(), Probing(im, Spec(patches=(components,)), state):
            outputs = im(*tiled_args, **tiled_kwargs)
        for i, flat in enumerate(chunk):
            patched = _metric(metric, outputs, slice(i * batch, (i + 1) * batch), batch * tiles)
            effects[flat] = (patched - base).mean()
    scores, dims = _unflatten(im, components, max(lengths), per_position, effects)
    return PatchingResult(scores, dims, components, "activation", base, _metric(metric, corrupt_outputs),
                          forwards=2 + len(chunks), backwards=0, seconds=time.perf_counter() - start)


def _enumerate(im, kind: str, seq: int, per_position: bool) -> list[tuple]:
    """Indices into the patch weight [L, rows, t(, H)] after the row slice: (layer, t-slice(, head))."""
    layers = range(len(im.sites))
    positions = [slice(t, t + 1) for t in range(seq)] if per_position else [slice(None)]
    if kind in HEAD_KINDS:
        heads = state_shape(im, kind, 1, 1, per_dim=False)[-1]
        return [(layer, pos, head) for layer in layers for head in range(heads) for pos in positions]
    return [(layer, pos) for layer in layers for pos in positions]


def _unflatten(im, kind, seq, per_position, effects):
    layers = len(im.sites)
    if kind in HEAD_KINDS:
        heads = state_shape(im, kind, 1, 1, per_dim=False)[-1]
        if per_position:
            return effects.reshape(layers, heads, seq), ("layer", "head", "position")
        return effects.reshape(layers, heads), ("layer", "head")
    return (effects.reshape(layers, seq), ("layer", "position")) if per_position else (effects, ("layer",))


def _tile(value, batch: int, tiles: int):
    """Every [batch, ...] tensor repeated `tiles` times along the batch."""
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
        return value.repeat(tiles, *([1] * (value.dim() - 1)))
    if isinstance(value, dict):
        return {k: _tile(v, batch, tiles) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_tile(v, batch, tiles) for v in value)
    return value


# ---- gradient estimates ----------------------------------------------------------------------------
def _estimate(im, args, kwargs, metric, kind, source, rule: str, keep=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One clean forward + backward: ∂metric/∂w at w = 0, i.e. (source − x) · g per example,
    position (and head) — [L, b, t(, H)], zeros past a layer's own length — and the clean metric.
    source: [L, b, t(, H), d]."""
    weight = torch.zeros(state_shape(im, kind, source.shape[1], source.shape[2], per_dim=False),
                         device=source.device, dtype=relevance_dtype(im.model), requires_grad=True)
    state = {f"patch_w_{kind}": weight, f"patch_src_{kind}": source}
    if keep is not None:
        state["grad_keep"] = keep
    with torch.enable_grad(), Probing(im, Spec(patches=(kind,), rule=rule, graddrop=keep is not None), state):
        value = _metric(metric, im(*args, **kwargs))
    (grad,) = torch.autograd.grad(value.sum(), [weight])
    return grad, value.detach()


def attribution_patching(im, clean, corrupt, metric: Callable, components: str = "heads", *,
                         per_position: bool = False) -> PatchingResult:
    """AtP: 2 forwards + 1 backward for every component at once. Arguments as
    activation_patching's (clean, corrupt: input_ids [b, t], ...; metric → [b]); scores [L, H] per
    head, [L] per layer ([L, H, T] / [L, T] per_position)."""
    return _gradient_method(im, clean, corrupt, metric, components, per_position, "gradient", "atp")


def relp(im, clean, corrupt, metric: Callable, components: str = "heads", *, per_position: bool = False,
         rule: str = "attnlrp") -> PatchingResult:
    """RelP: AtP with the LRP coefficients of the lrp pass (AttnLRP rules by default); 2 forwards
    + 1 backward. Scores [L, H] per head, [L] per layer ([L, H, T] / [L, T] per_position), as
    activation_patching's."""
    if rule not in ("attnlrp", "cp-lrp"):
        raise InvalidArgumentError(f"RelP's rule must be 'attnlrp' or 'cp-lrp', got {rule!r}")
    if rule == "cp-lrp" and components in ("queries", "keys"):
        raise InvalidArgumentError(f"CP-LRP detaches queries and keys (attention as constant routing), so "
                                   f"'{components}' have no relevance coefficient; use rule='attnlrp', or "
                                   "atp_star's QK fix")
    return _gradient_method(im, clean, corrupt, metric, components, per_position, rule, "relp")


def _gradient_method(im, clean, corrupt, metric, kind, per_position, rule, name) -> PatchingResult:
    start = time.perf_counter()
    (args, kwargs), _, _ = _check(im, clean, corrupt, kind)
    corrupt_outputs, captured = _captured(im, corrupt, (kind,))
    grad, base = _estimate(im, args, kwargs, metric, kind, padded_stack(captured[kind]), rule)
    scores, dims = _layout(kind, grad, per_position)
    return PatchingResult(_past_lengths(scores, _lengths(captured[kind]), per_position), dims, kind, name, base,
                          _metric(metric, corrupt_outputs), forwards=2, backwards=1,
                          seconds=time.perf_counter() - start)


def atp_star(im, clean, corrupt, metric: Callable, components: str = "heads", *, per_position: bool = False,
             graddrop: bool = True) -> PatchingResult:
    """AtP*: queries and keys get the QK fix (the attention softmax recomputed exactly for the
    patched query or key, linear from the probabilities on); every component gets GradDrop (the
    gradient through layer ℓ's attention and MLP outputs zeroed, for each ℓ in turn; the score is
    the mean over examples and over the ℓ other than the component's own layer of |estimate|,
    an upper-bound-like magnitude that cancellation cannot hide). `signed` keeps the
    QK-fixed AtP without GradDrop. Passes: 2 + L forwards, 1 + L backwards (GradDrop off: 2, 1).
    Scores [L, H] per head, [L] per layer ([L, H, T] / [L, T] per_position), as
    activation_patching's."""
    start = time.perf_counter()
    (args, kwargs), _, _ = _check(im, clean, corrupt, components)
    layers = len(im.sites)
    qk = components in ("queries", "keys")
    unscaled = [site.layer for site in im.sites if site.scale is None]
    if qk and unscaled:
        raise UnsupportedModelError(
            f"AtP*'s QK fix recomputes the logits q·kᵀ·scale, but the scores of layer(s) {unscaled} are not "
            "q·kᵀ times a constant (soft-capped, say); use components='heads' or attribution_patching")
    gated = [site.layer for site in im.sites if site.gated]
    if qk and gated:            # its gradient is taken at the head output z ⊙ g; the fix needs it at z
        raise UnsupportedModelError(
            f"AtP*'s QK fix needs the gradient at z, but the heads of layer(s) {gated} are gated before W_O "
            "(z ⊙ g) and the gate of this input is not captured; use components='heads' or attribution_patching")
    kinds = ("queries", "keys", "values", "scores") if qk else (components,)
    corrupt_outputs, corrupt_acts = _captured(im, corrupt, kinds[:2] if qk else kinds)
    clean_acts = _captured(im, clean, kinds)[1] if qk else None
    lengths = _lengths(corrupt_acts[components])

    def estimate(keep):
        if not qk:
            return _estimate(im, args, kwargs, metric, components, padded_stack(corrupt_acts[components]),
                             "gradient", keep)
        grad_z, value = _grad_at_heads(im, args, kwargs, metric, clean_acts["queries"], keep)
        return _qk_fixed(components, clean_acts, corrupt_acts, grad_z, [s.scale for s in im.sites]), value

    signed, base = estimate(None)
    runs = []
    if graddrop:
        for dropped in range(layers):
            keep = torch.ones(layers, device=signed.device)
            keep[dropped] = 0.0
            runs.append(_per_example(components, estimate(keep)[0], per_position)[0].abs().mean(1))
    signed_scores, dims = _layout(components, signed, per_position)
    if runs:
        stacked = torch.stack(runs)                                                         # [ℓ, L, ...]
        own = torch.eye(layers, dtype=torch.bool, device=stacked.device)
        own = own.reshape(layers, layers, *([1] * (stacked.dim() - 2)))
        scores = stacked.masked_fill(own, 0.0).sum(0) / max(layers - 1, 1)
    else:
        scores = signed_scores
    return PatchingResult(_past_lengths(scores, lengths, per_position), dims, components, "atp*", base,
                          _metric(metric, corrupt_outputs), forwards=2 + int(qk) + len(runs),
                          backwards=1 + len(runs), seconds=time.perf_counter() - start,
                          signed=_past_lengths(signed_scores, lengths, per_position))


def _qk_fixed(kind: str, clean: dict, corrupt: dict, grad_z: torch.Tensor, scales: list) -> torch.Tensor:
    """The QK fix layer by layer, each at its own lengths (an encoder–decoder's cross-attention
    reads decoder queries and encoder keys): [L, b, t(or S), H(k)], zeros past a layer's length."""
    per_layer = []
    for layer, scale in enumerate(scales):
        queries = clean["queries"][layer].shape[1]
        own = {name: [clean[name][layer]] for name in ("queries", "keys", "values", "scores")}
        per_layer.append(qk_fix.estimate(kind, own, {kind: [corrupt[kind][layer]]},
                                         grad_z[layer:layer + 1, :, :queries], [scale])[0])
    return padded_stack(per_layer)


def _grad_at_heads(im, args, kwargs, metric, queries: list[torch.Tensor], keep) -> torch.Tensor:
    """∂metric/∂z at every head output, [L, b, t, H, d] (t: the longest layer's queries, zeros past
    a layer's own), from one clean forward + backward."""
    batch, longest = queries[0].shape[0], max(_lengths(queries))
    delta = torch.zeros(state_shape(im, "heads", batch, longest, per_dim=True), device=im.z_scale.device,
                        dtype=relevance_dtype(im.model), requires_grad=True)
    state = {"delta_heads": delta}
    if keep is not None:
        state["grad_keep"] = keep
    with torch.enable_grad(), Probing(im, Spec(deltas=("heads",), graddrop=keep is not None), state):
        value = _metric(metric, im(*args, **kwargs))
    (grad,) = torch.autograd.grad(value.sum(), [delta])
    return grad, value.detach()
