"""`im.steering`: set per-head knobs by writing the state buffers in place. The graph reads them
as inputs, so no change here ever recompiles (except the first switch to a per-position patch
source, whose shape follows the input's). Every method validates all of its arguments before
writing anything: a rejected call leaves the state as it was."""
from __future__ import annotations

import contextlib
import math

import torch

from ..errors import (DeviceMismatchError, DTypeMismatchError, InvalidArgumentError,
                     ShapeMismatchError, SiteIndexError, SteeringValueError)
from ..graph.calls import as_call
from .indices import as_indices, padded_stack
from .positions import VECTOR_GROUPS, Positions
from .spec import STEERING_STATE

__all__ = ["Steering", "ABLATIONS", "SCALE_TARGETS", "VECTOR_SITES"]

SCALE_TARGETS = {"z": "z_scale", "value": "v_scale", "value_unbiased": "v_scale_unbiased",
                 "query": "q_scale"}
ABLATIONS = ("zero", "mean", "resample")
VECTOR_SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out")
PROBE_KIND = {"resid_pre": "resid", "attn_out": "attn", "mlp_out": "mlp"}   # at= → the probe pass's kind


class Steering:
    """`im.steering`: the per-head knobs (scale, ablate, patch, steering vectors) written into the
    state tensors the compiled graph reads, so setting one never recompiles: scales and replace flags
    [L, H] ([L, H_kv] for the values), patch sources [L, b, t, H, d_head] (b = t = 1 until a
    per-position patch), steering vectors [L, groups, d_model]; `positions=` (an index, a list, a bool
    mask [t] or [b, t], an int tensor [b, k]) / `rows=` (indices or a bool mask [b]) narrow any knob
    to query (or key) positions and batch rows; `reset()` and the scoped forms undo."""
    def __init__(self, im):
        self._im = im
        self._means: torch.Tensor | None = None     # [L, H, d] mean head output of a reference batch
        # (buffer, version) of v_scale_unbiased when it was last known to be all ones. Any write
        # since bumps the version counter: a host-side check, where reading the values would sync.
        self._unbiased_identity: tuple | None = None
        self._vectors: set[str] = set()             # component kinds given a steering vector
        self.positions = Positions(im)              # position groups of positions= (runtime state)

    @property
    def value_unbiased_in_use(self) -> bool:
        """Whether on="value_unbiased" may be off identity since the last reset: the graph then
        also computes κ = β·W_V + b_V (one compile the first time)."""
        buffer = getattr(self._im, "v_scale_unbiased", None)
        if buffer is None:
            return False
        if buffer.is_inference():                 # no version counter: assume written
            return True
        return (id(buffer), buffer._version) != self._unbiased_identity

    def _mark_unbiased_identity(self) -> None:
        buffer = self._im.v_scale_unbiased
        self._unbiased_identity = None if buffer.is_inference() else (id(buffer), buffer._version)

    # ---- validation ------------------------------------------------------------------------
    def _pairs(self, layer, head, kv: bool = False) -> tuple[list[int], list[int]]:
        """Validated (layers, heads); a head must exist in every layer named (layers may differ
        in their numbers of heads)."""
        self._im._check_attached()
        sites = self._im.sites
        layers = as_indices(layer, len(sites), "layer")
        count = min(sites[l].num_kv_heads if kv else sites[l].num_heads for l in layers)
        return layers, as_indices(head, count, "kv head" if kv else "head")

    @staticmethod
    def _factor(factor) -> float:
        if hasattr(factor, "item") and not isinstance(factor, (int, float)):   # a tensor, array or numpy scalar
            count = factor.numel() if isinstance(factor, torch.Tensor) else factor.size
            if count != 1:
                raise SteeringValueError(f"factor must be a scalar, got a tensor of shape {tuple(factor.shape)}")
            factor = factor.item()
        if isinstance(factor, bool) or not isinstance(factor, (int, float)):
            raise SteeringValueError(f"factor must be a real number, got {type(factor).__name__}")
        if not math.isfinite(factor):
            raise SteeringValueError(f"factor must be finite, got {factor}")
        return float(factor)

    def _source_tensor(self, z_source, n_heads: int, layer: int) -> torch.Tensor:
        head_dim = self._im.sites[layer].head_dim
        if not isinstance(z_source, torch.Tensor):
            raise SteeringValueError(f"z_source must be a tensor, got {type(z_source).__name__}")
        if not z_source.is_floating_point():
            raise DTypeMismatchError(f"z_source must be floating point, got {z_source.dtype}")
        device = self._im.z_source.device
        if z_source.device != device:
            raise DeviceMismatchError(f"z_source on {z_source.device}, model state on {device}")
        expected = "[batch, seq, head_dim]" if n_heads == 1 else f"[batch, seq, {n_heads}, head_dim]"
        if n_heads == 1 and z_source.dim() == 3:
            z_source = z_source.unsqueeze(2)
        if z_source.dim() != 4 or z_source.shape[2] != n_heads or z_source.shape[3] != head_dim:
            raise ShapeMismatchError(f"z_source must be {expected} with head_dim {head_dim}, "
                                     f"got {tuple(z_source.shape)}")
        if not torch.isfinite(z_source).all():
            raise SteeringValueError("z_source holds NaN or inf")
        return z_source

    # ---- knobs -----------------------------------------------------------------------------
    def scale(self, layer, head, factor, *, on: str = "z", positions=None, rows=None) -> None:
        """Multiply head(s) by `factor`, a scalar written into the [L, H] scale state ([L, H_kv] for
        the values) (at `positions` only: query positions for z and query, key positions for the
        values; on batch `rows` only; see attnfx.state.positions). on="z": the head output z_h
        [b, t, d_head] (query head); "value": the value vectors [b, s, d_head] of kv head(s) with
        their bias (= z of every query head of the group);
        "value_unbiased": only the input-dependent part of v, keeping κ = β·W_V + b_V constant
        (β: the bias of the norm feeding v; TransformerLens' folded biases, Yu et al. 2023; its
        first use compiles once, as κ then joins the graph); "query": the query (SHIPS; scaling
        before RoPE, which is linear in q)."""
        if on not in SCALE_TARGETS:
            raise InvalidArgumentError(f"on must be one of {sorted(SCALE_TARGETS)}, got {on!r}")
        layers, heads = self._pairs(layer, head, kv=on.startswith("value"))
        value = self._factor(factor)
        group = self.positions.group(positions, rows)
        buffer = getattr(self._im, SCALE_TARGETS[on])
        for l in layers:
            buffer[l, heads] = value
        self.positions.assign(SCALE_TARGETS[on], layers, heads, group)

    def ablate(self, layer, head, how: str = "zero", *, reference=None, generator=None, positions=None,
               rows=None) -> None:
        """Replace z_h [b, t, d_head] by zeros, by its mean [d_head] over a reference batch (all valid
        positions; `mean_z`), or (resample) by its value on another example of the reference batch:
        example i reads example π(i) ≠ i, π a random derangement (`generator` seeds it); the calls
        that follow must then have the reference's [b, t]. reference: inputs as the model takes them
        (input_ids [b, t], with an attention_mask [b, t] whose zeros the mean skips). `positions`,
        `rows`: at those query positions and batch rows only."""
        if how not in ABLATIONS:
            raise InvalidArgumentError(f"how must be one of {ABLATIONS}, got {how!r}")
        layers, heads = self._pairs(layer, head)
        if how == "resample":
            if reference is None:
                raise SteeringValueError("resample ablation needs reference=inputs (the batch to resample from)")
            z = self._reference_z(reference)
            if z[0].shape[0] < 2:
                raise SteeringValueError("resample ablation needs a reference batch of at least 2 examples")
            order = derangement(z[0].shape[0], generator).to(z[0].device)
            self.positions.group(positions, rows)            # validated before any patch is written
            for l in layers:
                self.patch(l, heads, z[l][order][:, :, heads], positions=positions, rows=rows)
            return
        if how == "mean":
            if reference is not None:
                self._means = self.mean_z(reference)
            if self._means is None:
                raise SteeringValueError("mean ablation needs reference=inputs once (the batch to average over)")
        group = self.positions.group(positions, rows)
        im = self._im
        for l in layers:
            for h in heads:
                im.z_source[l, :, :, h] = 0.0 if how == "zero" else self._means[l, h]     # [d_max], zero-padded
            im.z_replace[l, heads] = 1.0
        self.positions.assign("z_replace", layers, heads, group)

    def patch(self, layer: int, head, z_source: torch.Tensor, *, positions=None, rows=None) -> None:
        """Replace z_h by a recorded head output, e.g. `rec["z"][layer][:, :, head]` of another
        input: z_source is [b, t, d_head] (one head) or [b, t, n, d_head] for the n heads named, in
        their order; the calls that follow must have its [b, t]. `positions`, `rows`: at those query
        positions and batch rows only."""
        layers, heads = self._pairs(layer, head)
        if len(layers) != 1:
            raise SiteIndexError("patch takes one layer at a time")
        source = self._source_tensor(z_source, len(heads), layers[0])
        group = self.positions.group(positions, rows)
        im = self._im
        current = im.z_source
        if current.shape[1:3] != source.shape[:2]:
            if current.shape[1:3] != (1, 1) and bool(im.z_replace.any()):
                raise ShapeMismatchError(
                    f"patch sources of this model are [batch={current.shape[1]}, seq={current.shape[2]}], "
                    f"got [batch={source.shape[0]}, seq={source.shape[1]}]; call steering.reset() first")
            full = current.expand(-1, source.shape[0], source.shape[1], -1, -1).clone()
            im.z_source = full               # new shape: the next call compiles once for it
        im.z_source[layers[0], :, :, heads, :source.shape[-1]] = source.to(im.z_source.dtype)
        im.z_replace[layers[0], heads] = 1.0
        self.positions.assign("z_replace", layers, heads, group)

    def add(self, layer, vector: torch.Tensor, *, at: str = "resid_pre", scale: float = 1.0,
            positions=None, rows=None) -> None:
        """Activation addition: x ← x + scale · vector (vector [d_model], added to x [b, t, d_model])
        at every position (or at `positions`, on `rows`) of `at` ("resid_pre", the stream entering the layer; "resid_post", the stream leaving its
        block; "attn_out" / "mlp_out", what its attention / MLP writes) of each layer named. Adds
        to what is there (contrastive pairs: add(l, a), add(l, b, scale=-1)); reset() clears.
        The first vector at a kind compiles once; later ones compile nothing."""
        if at not in VECTOR_SITES:
            raise InvalidArgumentError(f"at must be one of {VECTOR_SITES}, got {at!r}")
        self._im._check_attached()
        sites = self._im.sites
        layers = as_indices(layer, len(sites), "layer")
        targets = self._vector_targets(layers, at)
        factor = self._factor(scale)
        d_model = sites[layers[0]].d_model
        if not isinstance(vector, torch.Tensor):
            raise SteeringValueError(f"vector must be a tensor, got {type(vector).__name__}")
        if not vector.is_floating_point():
            raise DTypeMismatchError(f"vector must be floating point, got {vector.dtype}")
        if vector.shape != (d_model,):
            raise ShapeMismatchError(f"vector must be [{d_model}] (d_model), got {list(vector.shape)}")
        device = self._im.z_scale.device
        if vector.device != device:
            raise DeviceMismatchError(f"vector on {vector.device}, model state on {device}")
        if not bool(torch.isfinite(vector).all()):
            raise SteeringValueError("vector holds NaN or inf")
        group = self.positions.group(positions, rows, limit=VECTOR_GROUPS)
        for kind, places in targets.items():
            name = f"vector_{kind}"
            if getattr(self._im, name, None) is None:
                count = 1 if kind == "final" else len(sites)
                self._im.register_buffer(name, torch.zeros(count, VECTOR_GROUPS, d_model, device=device),
                                         persistent=False)
            getattr(self._im, name)[places, group] += factor * vector.float()
            self._vectors.add(kind)

    def _vector_targets(self, layers: list[int], at: str) -> dict[str, list[int]]:
        """The probe pass's kind and rows a vector at `at` of these layers is added to: the stream
        leaving layer l's block is the next layer's resid_pre, or after a decoder's last layer the
        final norm's input ("final")."""
        if at != "resid_post":
            return {PROBE_KIND[at]: layers}
        from .recording import _next_stream
        targets: dict[str, list[int]] = {}
        for l in layers:
            following = _next_stream(self._im, l)
            if following is None:
                raise SiteIndexError(f"no stream leaves layer {l}'s block to steer (an encoder's last layer or a "
                                     "cross-attention site); steer the next block's resid_pre or its output")
            kind, row = ("final", 0) if following == "final" else ("resid", following)
            targets.setdefault(kind, []).append(row)
        return targets

    @property
    def vector_kinds(self) -> tuple[str, ...]:
        """The kinds a steering vector was added to since the last reset (the graph adds them)."""
        return tuple(sorted(self._vectors))

    def reset(self) -> None:
        """Every knob back to identity."""
        im = self._im
        im._check_attached()
        for kind in self._vectors:
            getattr(im, f"vector_{kind}").zero_()
        self._vectors = set()
        self.positions.reset()
        for name in ("q_scale", "v_scale", "v_scale_unbiased", "z_scale"):
            getattr(im, name).fill_(1.0)
        im.z_replace.zero_()
        self._mark_unbiased_identity()
        if im.z_source.shape[1:3] != (1, 1):
            im.z_source = im.z_source.new_zeros(im.z_source.shape[0], 1, 1, *im.z_source.shape[3:])
        else:
            im.z_source.zero_()

    # ---- scoped knobs: restored on exit, also when the body raises --------------------------
    @contextlib.contextmanager
    def restoring(self):
        """`with im.steering.restoring(): ...`: every knob as it was on entry, restored on exit."""
        im = self._im
        im._check_attached()
        saved = {name: getattr(im, name).clone() for name in STEERING_STATE}
        saved.update({f"vector_{kind}": getattr(im, f"vector_{kind}").clone() for kind in self._vectors})
        was_identity, kinds = not self.value_unbiased_in_use, set(self._vectors)
        positions = self.positions.saved()
        try:
            yield self
        finally:
            self.positions.restore(positions)
            for kind in self._vectors - kinds:                # vectors added inside: gone again
                getattr(im, f"vector_{kind}").zero_()
            self._vectors = kinds
            for name, value in saved.items():
                current = getattr(im, name)
                if current.shape == value.shape:
                    current.copy_(value)              # in place: the graph keeps reading the same buffer
                else:
                    setattr(im, name, value)          # a per-position patch source changed its shape
            if was_identity:
                self._mark_unbiased_identity()        # restored to all ones: κ may leave the graph

    def scaled(self, layer, head, factor, *, on: str = "z", positions=None, rows=None):
        """`with im.steering.scaled(l, h, 3.0, on="value_unbiased"):` — scale() for the block only."""
        return self._scoped(self.scale, layer, head, factor, on=on, positions=positions, rows=rows)

    def added(self, layer, vector, *, at: str = "resid_pre", scale: float = 1.0, positions=None, rows=None):
        """`with im.steering.added(l, v, at="resid_pre"):` — add() (v [d_model]) for the block only."""
        return self._scoped(self.add, layer, vector, at=at, scale=scale, positions=positions, rows=rows)

    def ablated(self, layer, head, how: str = "zero", *, reference=None, generator=None, positions=None,
                rows=None):
        """ablate() for the duration of a `with` block (z_h [b, t, d_head] replaced)."""
        return self._scoped(self.ablate, layer, head, how, reference=reference, generator=generator,
                            positions=positions, rows=rows)

    def patched(self, layer: int, head, z_source: torch.Tensor, *, positions=None, rows=None):
        """patch() for the duration of a `with` block: z_source [b, t, d_head] (one head) or
        [b, t, n, d_head] (n heads)."""
        return self._scoped(self.patch, layer, head, z_source, positions=positions, rows=rows)

    @contextlib.contextmanager
    def _scoped(self, knob, *args, **kwargs):
        with self.restoring():
            knob(*args, **kwargs)
            yield self

    def active(self) -> list[tuple[str, int, int, float]]:
        """Non-identity knobs as (kind, layer, head, value); ablations and patches have value 1."""
        im = self._im
        out = []
        for on, name in SCALE_TARGETS.items():
            for l, h in (getattr(im, name) != 1.0).nonzero().tolist():
                out.append((on, l, h, float(getattr(im, name)[l, h])))
        for l, h in im.z_replace.nonzero().tolist():
            out.append(("replace", l, h, float(im.z_replace[l, h])))
        return out

    def __repr__(self):
        knobs = self.active() if self._im._sites is not None else []
        return "Steering(" + (", ".join(f"{k}[{l},{h}]={v:g}" for k, l, h, v in knobs) or "identity") + ")"

    # ---- helpers ---------------------------------------------------------------------------
    @torch.no_grad()
    def mean_z(self, reference) -> torch.Tensor:
        """Mean head output [L, H, d_head] fp32 over the reference batch's valid positions (inputs
        as the model takes them, e.g. input_ids and attention_mask [b, t]), unsteered (heads and
        dims a layer lacks are 0)."""
        z = padded_stack(self._reference_z(reference)).float()      # [L, b, t, H, d] (widest layer)
        mask = as_call(reference)[1].get("attention_mask")
        if mask is None:
            return z.mean(dim=(1, 2))
        weights = mask.to(z.dtype)[None, :, :, None, None]
        return (z * weights).sum(dim=(1, 2)) / weights.sum(dim=(1, 2))

    def _reference_z(self, reference) -> list[torch.Tensor]:
        """Each layer's unsteered head outputs [b, t, H, d] on the reference batch."""
        im = self._im
        args, kwargs = as_call(reference)
        with self.restoring(), torch.no_grad():
            self.reset()
            with im.record("z") as rec:
                im(*args, **kwargs)
        return rec["z"]

    def _check_call(self, args, kwargs) -> None:
        """A per-position patch source must match the call's [batch, seq]."""
        im = self._im
        if im._sites is None:
            return
        first = next((v for v in list(args) + [kwargs.get("input_ids"), kwargs.get("inputs_embeds")]
                      if isinstance(v, torch.Tensor) and v.dim() >= 2), None)
        if im.z_source.shape[1:3] == (1, 1):
            return
        if first is not None and tuple(first.shape[:2]) != tuple(im.z_source.shape[1:3]):
            raise ShapeMismatchError(
                f"patch source is for [batch, seq] = {tuple(im.z_source.shape[1:3])}, "
                f"this call has {tuple(first.shape[:2])}; steering.reset() or patch again")


def derangement(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniformly random permutation of range(n) with no fixed point (n ≥ 2), by rejection:
    about e tries."""
    while True:
        order = torch.randperm(n, generator=generator)
        if not bool((order == torch.arange(n)).any()):
            return order
