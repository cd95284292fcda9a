"""`with im.record(...) as rec:` — records come back as extra graph outputs (docs/design.md §1); this
object sorts them per call:

    rec["z"]          list over layers of [b, t, H, d_head] (the steered head outputs)
    rec["readout"]    [b, t, L, H, K] fp32: z_h · u_h, u_h = W_O[:, h]ᵀ r_k for directions r [K, d_model]
    rec["contrib"]    {(layer, head): [b, P, d_model]} for the selected heads and positions
    rec["final_norm"] [b, t, d_model]: the residual entering the final norm

Components, found by the patterns of blocks.py and sites.py (so on every family), each a list
over layers (None at a layer not asked for with layers=[...]; rec[kind, layer] for one):

    rec["resid_pre"]  [b, t, d_model]  the residual stream entering the layer (HF hidden_states[l])
    rec["attn_out"]   [b, t, d_model]  the attention's output projection, bias included
    rec["mlp_out"]    [b, t, d_model]  the MLP's output (a whole MoE layer's)
    rec["resid_post"] [b, t, d_model]  the stream leaving the layer's block: the next layer's
                                       resid_pre, the final norm's input after the last (None after
                                       an encoder's last layer and at cross-attention sites)
    rec["resid_mid"]  [b, t, d_model]  the stream the MLP reads (before its norm), where that is not
                                       resid_pre (None for parallel attention + MLP blocks)
    rec["mlp_hidden"] [b, t, d_mlp]    what the MLP's output projection reads (after the activation
                                       and any gate; None for a MoE layer)
    rec["q"]          [b, t, H, d]     queries as the attention reads them (after RoPE, steered)
    rec["k"], ["v"]   [b, s, H_kv, d]  keys and values per kv head (query head h reads kv head
                                       h // (H / H_kv)), after any KV cache: s counts past tokens
    rec["pattern"]    [b, H, t, s] fp32 the attention probabilities (HF's output_attentions);
                                       positions=[...] keeps those query rows. The graph computes
                                       the layer's whole t × s scores: ask for the layers you need.

    rec["lse"]        [b, H, t] fp32   with "attention_stats": each query's log-sum-exp of its scores,
    rec["mass"]       [b, t, H, n] fp32 and its attention on the key spans=[(start, end), ...], by the
                                       attention_stats op (C++ / Triton), never the t × s pattern
    rec["loss"]       [b, t] fp32 (t − 1 for a causal LM, whose logits at t predict token t + 1):
                                       each token's cross-entropy with the call's labels, NaN where
                                       a label is ignored (−100); its nanmean is HF's loss

`rec[...]` is the most recent call's; `rec.calls` keeps every call (e.g. each generate step).
"""
from __future__ import annotations

import torch

from ..errors import (DeviceMismatchError, DTypeMismatchError, InvalidArgumentError,
                     ShapeMismatchError, SteeringValueError, UnsupportedModelError)
from .indices import as_index, padded_stack
from .spec import RECORD_KINDS, Spec
from ..tensor_parallel import gather_heads

__all__ = ["Recording", "KINDS"]


def _next_stream(im, layer: int):
    """Where the stream leaving a self-attention layer's block is read: the next self-attention
    layer of its stack (its resid_pre), "final" (the final norm's input) after a decoder's last,
    None otherwise (an encoder's last layer, a cross-attention site: not a block boundary)."""
    sites = im.sites
    site = sites[layer]
    if site.attends != "self":
        return None
    later = [s.layer for s in sites[layer + 1:] if s.stack == site.stack and s.attends == "self"]
    if later:
        return later[0]
    return "final" if site.stack != "encoder" and im.final_norm is not None else None


# public record name → the probe pass's component kind it captures
COMPONENTS = {"resid_pre": "resid", "attn_out": "attn", "mlp_out": "mlp", "q": "queries", "k": "keys",
              "v": "values", "pattern": "scores", "attention_stats": "stats", "resid_mid": "resid_mid",
              "mlp_hidden": "mlp_hidden"}
KINDS = RECORD_KINDS + tuple(COMPONENTS) + ("resid_post", "loss")
_IGNORED = -100                     # HF's ignore_index


class Recording:
    """`with im.record(*kinds) as rec:` — the records of every call made inside, from the graph's
    extra outputs: `rec[kind]` the last call's (a list over layers for per-layer kinds, `rec[kind, l]`
    one layer), `rec.calls` every call's (a list of {kind: record} dicts); shapes per kind in the
    module docstring, e.g. z [b, t, H, d_head] per layer, readout [b, t, L, H, K], resid_pre
    [b, t, d_model] per layer, pattern [b, H, t, s] per layer."""
    def __init__(self, im, kinds, *, directions=None, heads=None, positions=None, layers=None, spans=None):
        kinds = tuple(dict.fromkeys(kinds))
        bad = [k for k in kinds if k not in KINDS]
        if not kinds or bad:
            raise InvalidArgumentError(f"record kinds must be among {KINDS}, got {kinds!r}")
        self._im = im
        self.calls: list[dict] = []
        sites = im.sites
        components = tuple(COMPONENTS[k] for k in kinds if k in COMPONENTS)
        self._asked = kinds
        if layers is not None and not components and "resid_post" not in kinds:
            raise InvalidArgumentError(f"layers= selects the layers of {tuple(COMPONENTS)}; none was asked for")
        self._layers = tuple(sorted({as_index(layer, len(sites), "layer") for layer in layers})) \
            if layers is not None else None
        if self._layers == ():
            raise InvalidArgumentError("layers=[] records nothing: name at least one layer")
        self._pattern_rows = None
        if "pattern" in kinds and positions is not None:
            self._pattern_rows = torch.as_tensor([int(p) for p in positions], dtype=torch.long)
        if ("readout" in kinds or "contrib" in kinds) and any(s.shard is not None for s in sites):
            raise UnsupportedModelError("'readout' and 'contrib' project heads through W_O, which tensor parallelism "
                                        "splits across processes; record 'z' (gathered to every head) instead")
        if "mlp_hidden" in kinds and any(s.shard is not None for s in sites):
            raise UnsupportedModelError("'mlp_hidden' is split across processes with the MLP under tensor parallelism, "
                                        "and attnfx gathers heads only; record 'mlp_out' (the MLP's whole output)")
        self._directions = self._check_directions(directions, sites) if "readout" in kinds else None
        contrib = self._check_heads(heads, sites) if "contrib" in kinds else ()
        if "contrib" in kinds and positions is not None:
            positions = tuple(int(p) for p in positions)
        if "final_norm" in kinds and im.final_norm is None:
            raise InvalidArgumentError("no final norm → unembedding was found in this model; cannot record 'final_norm'")
        if "readout" in kinds or "contrib" in kinds:
            missing = [s.layer for s in sites if s.o_proj is None and s.d_model is None]
            if missing:
                raise InvalidArgumentError(f"no output projection found for layers {missing}; readouts need W_O")
        self._loss = "loss" in kinds
        self._spans = self._check_spans(spans) if "attention_stats" in kinds else None
        if spans is not None and self._spans is None:
            raise InvalidArgumentError("spans= are the key spans of 'attention_stats', which was not asked for")
        records = tuple(k for k in kinds if k in RECORD_KINDS)
        capture_layers = self._layers
        self._post_of = {}
        if "resid_post" in kinds:
            self._post_of = {layer: _next_stream(im, layer) for layer in (self._layers or range(len(sites)))}
            if "final" in self._post_of.values() and "final_norm" not in records:
                records += ("final_norm",)
            if capture_layers is not None:
                capture_layers = tuple(sorted(set(capture_layers) | {n for n in self._post_of.values()
                                                                     if isinstance(n, int)}))
            components = tuple(dict.fromkeys(components + ("resid",)))
        self.spec = Spec(records=records, contrib_heads=contrib,
                         contrib_positions=positions if "contrib" in kinds else None, captures=components,
                         capture_layers=capture_layers if components else None)

    @staticmethod
    def _check_directions(directions, sites) -> torch.Tensor:
        layers, d_model = len(sites), sites[0].d_model
        if not isinstance(directions, torch.Tensor):
            raise InvalidArgumentError("recording 'readout' needs directions=tensor [K, d_model] or [L, K, d_model]")
        if not directions.is_floating_point():
            raise DTypeMismatchError(f"directions must be floating point, got {directions.dtype}")
        if directions.dim() == 2:
            directions = directions.unsqueeze(0).expand(layers, -1, -1)
        if directions.dim() != 3 or directions.shape[0] != layers or directions.shape[2] != d_model:
            raise ShapeMismatchError(f"directions must be [K, {d_model}] or [{layers}, K, {d_model}], "
                                     f"got {tuple(directions.shape)}")
        if not torch.isfinite(directions).all():
            raise SteeringValueError("directions hold NaN or inf")
        return directions

    @staticmethod
    def _check_spans(spans) -> torch.Tensor:
        spans = torch.zeros(0, 2, dtype=torch.long) if spans is None else torch.as_tensor(spans)
        if spans.is_floating_point() or spans.dtype == torch.bool or spans.dim() != 2 or spans.shape[1] != 2:
            raise ShapeMismatchError(f"spans must be integer [n, 2] (start, end) key ranges, got {spans.dtype} "
                                     f"{list(spans.shape)}")
        if bool((spans < 0).any()) or bool((spans[:, 1] < spans[:, 0]).any()):
            raise InvalidArgumentError(f"spans must be 0 ≤ start ≤ end, got {spans.tolist()}")
        return spans.long().contiguous()

    @staticmethod
    def _check_heads(heads, sites) -> tuple[tuple[int, int], ...]:
        if not heads:
            raise InvalidArgumentError("recording 'contrib' needs heads=[(layer, head), ...]")
        layers = [as_index(layer, len(sites), "layer") for layer, _ in heads]
        pairs = [(l, as_index(head, sites[l].num_heads, "head")) for l, (_, head) in zip(layers, heads)]
        return tuple(sorted(set(pairs)))

    # ---- context manager -------------------------------------------------------------------
    def __enter__(self):
        im = self._im
        im._check_attached()
        if im._recording is not None:
            raise InvalidArgumentError("a recording is already active on this model; nest none")
        if self._directions is not None:
            device = im.z_scale.device
            if self._directions.device != device:
                raise DeviceMismatchError(f"directions on {self._directions.device}, model on {device}")
            im.register_buffer("readout_directions", self._directions.float().contiguous(), persistent=False)
        if self._spans is not None:
            im.register_buffer("stats_spans", self._spans.to(im.z_scale.device), persistent=False)
        im._recording = self
        return self

    def __exit__(self, *exc):
        im = self._im
        im._recording = None
        if self._directions is not None:
            delattr(im, "readout_directions")       # the directions belong to this recording only
        if self._spans is not None:
            delattr(im, "stats_spans")
        return False

    def __getitem__(self, kind):
        """rec[kind], the last call's record: a list over layers for a per-layer kind (z, q, k, v,
        pattern, lse, mass, resid_pre, ...: e.g. z [b, t, H, d_head] at each layer), one tensor for
        the others (readout [b, t, L, H, K], final_norm [b, t, d_model], loss [b, t]), a dict
        {(layer, head): [b, P, d_model]} for contrib; rec[kind, layer] one layer's tensor of a
        per-layer kind."""
        if not self.calls:
            raise KeyError("nothing recorded yet: call the model inside the `with` block")
        if isinstance(kind, tuple):
            kind, layer = kind
            if kind == "attention_stats":
                raise KeyError("'attention_stats' records rec['lse'] and rec['mass']")
            value = self.calls[-1][kind][as_index(layer, len(self._im.sites), "layer")]
            if value is None:
                why = f"layers={list(self._layers)}" if self._layers is not None and layer not in self._layers \
                    else "its pattern is absent there"
                raise KeyError(f"{kind!r} of layer {layer} was not recorded ({why})")
            return value
        return self.calls[-1][kind]

    def __contains__(self, kind):
        return bool(self.calls) and kind in self.calls[-1]

    # ---- sorting the graph's extra outputs -------------------------------------------------
    def _collect(self, ctx) -> None:
        layers = len(self._im.sites)
        per_kind: dict[str, dict] = {}
        for key, tensor in ctx.records:
            per_kind.setdefault(key.kind, {})[(key.layer, key.heads)] = tensor
        call = {}
        if "z" in per_kind:
            z = {layer: t for (layer, _), t in per_kind["z"].items()}
            call["z"] = [self._full_heads(layer, z[layer], 2) for layer in range(layers)]
        if "readout" in per_kind:
            r = {layer: t for (layer, _), t in per_kind["readout"].items()}
            # heads a layer lacks (layers differing in heads) read NaN: not a head, not a zero effect
            call["readout"] = padded_stack([r[layer] for layer in range(layers)], dim=2, fill=float("nan"))
        if "contrib" in per_kind:
            call["contrib"] = {(layer, h): t[:, :, i] for (layer, heads), t in per_kind["contrib"].items()
                               for i, h in enumerate(heads)}
        if "final_norm" in per_kind:
            call["final_norm"] = next(iter(per_kind["final_norm"].values()))
        for name, kind in (("lse", "stats_lse"), ("mass", "stats_mass")):
            if f"capture:{kind}" in per_kind:
                found = {layer: t for (layer, _), t in per_kind[f"capture:{kind}"].items()}
                call[name] = [None if layer not in found else self._full_heads(layer, found[layer], 1 if name == "lse" else 2)
                              for layer in range(layers)]
        if self._post_of:
            resid = {layer: t for (layer, _), t in per_kind.get("capture:resid", {}).items()}
            final = next(iter(per_kind.get("final_norm", {}).values()), None)
            call["resid_post"] = [resid.get(n) if isinstance(n, int) else final if n == "final" else None
                                  for n in (self._post_of.get(layer) for layer in range(layers))]
        if "final_norm" in call and "final_norm" not in self._asked:
            del call["final_norm"]                     # taken for resid_post only
        for name, kind in COMPONENTS.items():
            if name in self._asked and name != "attention_stats":     # None where the pattern is absent
                found = {layer: t for (layer, _), t in per_kind.get(f"capture:{kind}", {}).items()
                         if self._layers is None or layer in self._layers}
                convert = {"pattern": self._pattern, "k": self._per_kv_head, "v": self._per_kv_head,
                           "q": lambda layer, t: self._full_heads(layer, t, 2)}.get(name, lambda layer, t: t)
                call[name] = [convert(layer, found[layer]) if layer in found else None for layer in range(layers)]
        if self._loss:
            call["loss"] = self._token_loss(ctx.output, ctx.labels)
        self.calls.append(call)

    def _token_loss(self, output, labels) -> torch.Tensor:
        """Per-token cross-entropy, shifted as HF shifts it (a causal LM's logits at t score token
        t + 1; masked-LM and encoder–decoder logits score their own position), checked against the
        model's own loss when it returns one."""
        if labels is None:
            raise InvalidArgumentError("recording 'loss' needs the call's labels=[b, t] (−100: ignored)")
        logits = getattr(output, "logits", None)
        if logits is None:
            raise InvalidArgumentError("recording 'loss' needs an output with .logits")
        config = self._im.model.config
        if not getattr(config, "is_encoder_decoder", False) and getattr(self._im.model, "loss_type", None) != "ForMaskedLM":
            logits, labels = logits[:, :-1], labels[:, 1:]
        labels = labels.to(logits.device)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, -2), labels.flatten().clamp(min=0),
                                                 reduction="none").view(labels.shape)
        loss = loss.masked_fill(labels == _IGNORED, float("nan"))
        model_loss = getattr(output, "loss", None)
        if model_loss is not None and not torch.allclose(loss.nanmean(), model_loss.float(), rtol=1e-4,
                                                         atol=1e-5, equal_nan=True):   # no label scored: both NaN
            raise UnsupportedModelError(f"per-token losses average to {loss.nanmean().item():.6g}, the model's loss is "
                                        f"{model_loss.item():.6g}: this model scores its labels another way")
        return loss

    def _per_kv_head(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """k or v [b, s, H_read, d] as the attention read them → one per kv head: a model that
        repeats kv heads before the attention (HF's repeat_kv: head h reads kv head h // rep)
        holds rep copies of each."""
        site = self._im.sites[layer]
        x = self._full_heads(layer, x, 2)
        rep = x.shape[2] // site.num_kv_heads
        return x[:, :, ::rep].clone() if rep > 1 else x

    def _pattern(self, layer: int, scores: torch.Tensor) -> torch.Tensor:
        """The softmax of the layer's masked logits [b, H, T, S] (or [b·H, T, S]: heads merged into
        the batch), without score columns the model joins before its softmax and drops after."""
        site = self._im.sites[layer]
        if site.pattern != "matmul_softmax_matmul" and not scores.requires_grad:
            # logits computed for this record alone: softmax in place, one t × s tensor at the peak
            probs = scores.sub_(scores.amax(-1, keepdim=True)).exp_()
            probs = probs.div_(probs.sum(-1, keepdim=True))
        else:                                                 # a hand-written attention's own logits
            probs = torch.softmax(scores, dim=-1)
        probs = probs.reshape(-1, site.shard.heads if site.shard is not None else site.num_heads, *probs.shape[-2:])
        dropped = site.extra_columns
        if dropped:
            probs = probs[..., :probs.shape[-1] - dropped]
        if self._pattern_rows is not None:
            probs = probs[:, :, self._pattern_rows.to(probs.device)]
        return self._full_heads(layer, probs, 1)

    def _full_heads(self, layer: int, x: torch.Tensor, dim: int) -> torch.Tensor:
        """A record's heads from every process of a tensor-parallel layer (its own heads otherwise)."""
        shard = self._im.sites[layer].shard
        return x if shard is None else gather_heads(x, dim, shard)
