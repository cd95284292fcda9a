"""`attnfx.relevance`: AttnLRP / CP-LRP relevance of tokens, heads, attention and MLP outputs and
the residual stream, from one forward and one backward of the instrumented graph (docs/design.md §3).

The probe pass multiplies every component by a gate of ones; the lrp pass gives the graph the
rules' local Jacobians; the gradient of the target at each gate is then Σ x ⊙ ∂f/∂x under those
rules — the component's relevance — for every component at once, in fp32.

    rel = attnfx.relevance(im, {"input_ids": ids}, target=42, foil=7)
    rel.tokens               [b, t]        relevance of each input token (summed over d_model)
    rel.heads                [b, L, H]     per head (summed over positions); heads_per_position [b, t, L, H]
    rel.attn, rel.mlp        [b, t, L]     attention / MLP output of each layer
    rel.residual             [b, t, L]     the residual stream entering each layer
    rel.target               [b]           the target's value

Positions are each layer's own: t spans the longest layer, and a layer's entries past its own
length are NaN. In an encoder–decoder the encoder layers' positions are the encoder's tokens and
the decoder layers' (self- and cross-attention alike: their queries) the decoder's; a
cross-attention layer's residual is what its keys and values read, the encoder's output. A
vision backbone's positions are its patches (and class token), whatever the pixels' shape; the
target's positions are the main output's (an encoder–decoder's decoder logits).
"""
from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..graph.calls import (INTEGER_FORMS, as_call, batch_and_length, check_vocab, find_main_output, is_integer_like,
                           main_output, output_last_positions, output_length, per_example, positions as _positions,
                           vocab_size)
from ..errors import AttnfxError, InvalidArgumentError, RelevanceLeakError, RelevanceLeakWarning, ShapeMismatchError
from ..state.indices import padded_stack
from ..state.probing import Lengths, Probing, relevance_dtype, remeasured, sequence_lengths, state_shape
from ..state.spec import DIRECT, RULES, Spec, gate_name
from ..tensor_parallel import refuse_sharded
from . import metrics

__all__ = ["Relevance", "relevance", "RULES", "COMPONENTS"]


@dataclass
class Relevance:
    """What attnfx.relevance returns, per example: each asked component's relevance for the target
    (None where not asked, or found in no graph: the tokens of a model whose embedding runs in a
    graph of its own, as accelerate's offload makes it — the first layer's `residual` holds it
    then, on a pre-norm model): tokens [b, t], heads_per_position [b, t, L, H] (`.heads`: [b, L, H]),
    attn / mlp / residual [b, t, L]; target [b] (the value the relevance distributes)."""
    tokens: torch.Tensor | None
    heads_per_position: torch.Tensor | None
    attn: torch.Tensor | None
    mlp: torch.Tensor | None
    residual: torch.Tensor | None
    target: torch.Tensor
    rule: str
    leaks: list[str] = field(default_factory=list)

    @property
    def heads(self) -> torch.Tensor | None:
        """[b, L, H]: each head's relevance summed over its layer's positions."""
        return None if self.heads_per_position is None else _sum_positions(self.heads_per_position)

    def conservation(self) -> dict[str, torch.Tensor]:
        """Σ relevance of each component set per example ([b], or [b, L] per layer, each layer over
        its own positions) beside the target: equal for a bias-free model of linear, norm and
        uniform-rule ops; biases absorb their share and the softmax rule is not conservative
        (docs/design.md §3)."""
        sums = {"target": self.target}
        for name in ("tokens", "residual", "attn", "mlp"):
            value = getattr(self, name)
            if value is not None:
                sums[name] = _sum_positions(value)
        if self.heads_per_position is not None:
            sums["heads"] = _sum_positions(self.heads_per_position).sum(-1)
        return sums


def _sum_positions(value: torch.Tensor) -> torch.Tensor:
    """Σ over positions (dim 1), the NaN past a layer's length left out; a layer found nowhere
    (NaN throughout) stays NaN."""
    return value.nansum(1).masked_fill(value.isnan().all(1), float("nan"))


COMPONENTS = {"tokens": "tokens", "heads": "heads", "attn": "attn", "mlp": "mlp", "residual": "resid"}


def relevance(im, inputs, target, *, rule: str = "attnlrp", foil=None, position=None,
              components=tuple(COMPONENTS), check: bool = False) -> Relevance:
    """Relevance of every component for `target`, as a Relevance: tokens [b, t],
    heads_per_position [b, t, L, H] (`.heads` [b, L, H]), attn / mlp / residual [b, t, L],
    target [b]. The target is one of:

    * a token id or one per example (an int or numpy integer, a 0-d or 1-d integer tensor or
      array, or a list of ints — the convention of head_attribution): its logit at `position`,
      minus the `foil`'s (same forms) if given;
    * a {token: weight} dict: a weighted set of logits at `position`;
    * a list of (position, token) or (position, token, weight) tuples: several generated tokens at
      once (a list of tuples, where a list of ints is one token per example);
    * a callable outputs → [b]: any scalar function of the outputs per example (e.g. of
      outputs.logits [b, t, vocab]; the outputs as the model returns them).

    position (token and dict targets), a position of the main output (an encoder–decoder's decoder
    logits): None (the default) is each row's last real token per the call's attention_mask (an
    encoder–decoder's decoder_attention_mask) — before the pads of a right-padded row, the last
    position of a left-padded one — and the last position when the call has no mask; an int or one
    per example reads those positions (−1 is the last position, pad or not). inputs: a tensor, a tuple of
    arguments or a mapping of keyword arguments (a dict, a tokenizer's BatchEncoding).
    rule: "attnlrp", "cp-lrp" or "gradient" (plain gradient × input). Ops without a rule are
    reported in `.leaks` with a RelevanceLeakWarning; check=True raises RelevanceLeakError instead.
    `components` limits the work to some of "tokens", "heads", "attn", "mlp", "residual" (the
    others come back None): each gated component keeps its activation for the backward."""
    if rule not in RULES:
        raise InvalidArgumentError(f"rule must be one of {RULES}, got {rule!r}")
    result = gated_gradients(im, inputs, target, rule, foil, position, components)
    if result.leaks:
        message = (f"relevance leaks through ops with no {rule} rule (plain gradient used): "
                   + "; ".join(result.leaks))
        if check:
            raise RelevanceLeakError(message)
        warnings.warn(message, RelevanceLeakWarning, stacklevel=2)
    return result


def gated_gradients(im, inputs, target, rule: str, foil, position, components) -> Relevance:
    """relevance() under any rule the lrp pass knows (RULES, and DIRECT for analysis/direct_path.py),
    the ops it had no rule for in `.leaks`, for the caller to judge."""
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or not components:
        raise InvalidArgumentError(f"components must be among {tuple(COMPONENTS)}, got {tuple(components)}")
    kinds = tuple(kind for name, kind in COMPONENTS.items() if name in components)
    args, kwargs = as_call(inputs)
    refuse_sharded(im, "relevance")
    batch = batch_and_length(args, kwargs)[0]
    terms, lengths = _terms_and_lengths(im, args, kwargs, kinds, batch, target, foil, position)
    target_fn = _target_function(target, terms, batch, vocab_size(im))
    (outputs, gates, probing), lengths = _run_at_own_lengths(im, args, kwargs, kinds, rule, batch, lengths)
    value = target_fn(outputs)
    if value.dim() != 1 or value.shape[0] != batch:
        raise ShapeMismatchError(f"the target must be one scalar per example, shape [{batch}], got {list(value.shape)}")
    grads = dict(zip(kinds, torch.autograd.grad(value.sum(), list(gates.values()), allow_unused=True)))

    def component(kind):
        return _component(grads, gates, probing.touched.get(kind, set()), lengths.of(kind), kind)
    return Relevance(tokens=component("tokens"), heads_per_position=component("heads"), attn=component("attn"),
                     mlp=component("mlp"), residual=component("resid"), target=value.detach(), rule=rule,
                     leaks=probing.leaks + _unembedding_uncompiled(im, rule, probing, outputs))


def _unembedding_uncompiled(im, rule: str, probing: Probing, outputs) -> list[str]:
    """Where a call runs in several graphs, logits that no compiled graph's unembedding made (a
    graph break inside the layer loop makes dynamo give that frame up and run it plain, the final
    norm with it) took the plain gradient through the final norm: a leak of every rule."""
    if rule == "gradient" or (rule != DIRECT and probing.graphs_run <= 1):
        return []
    main = find_main_output(outputs)
    streams = {site.d_model for site in im.sites}
    if main is None or main.dim() < 2 or main.shape[-1] in streams or main.shape[-1] in probing.unembeddings:
        return []
    return ["the final norm and unembedding, which ran in no compiled graph (dynamo gave up the frame that "
            "runs them, as it does a layer loop with a graph break inside)"]


def _run_at_own_lengths(im, args, kwargs, kinds, rule: str, batch: int, lengths: Lengths):
    """`_gated_run` at `lengths`; when they were read off the tokens and a component read more
    positions (its state's narrow failed), at the measured lengths — if they indeed differ."""
    try:
        return _gated_run(im, args, kwargs, kinds, rule, batch, lengths), lengths
    except RuntimeError as error:
        measured = None if not lengths.inferred or isinstance(error, AttnfxError) else \
            remeasured(im, args, kwargs, kinds, lengths)
        if measured is None:
            raise
    return _gated_run(im, args, kwargs, kinds, rule, batch, measured), measured


def _gated_run(im, args, kwargs, kinds, rule: str, batch: int, lengths: Lengths):
    """One forward with a gate of ones (requiring grad) on every component of `kinds`, sized for
    the longest: (outputs, gates by state name, the probing session)."""
    dtype = relevance_dtype(im.model)
    gates = {gate_name(kind): torch.ones(state_shape(im, kind, batch, lengths.longest(kind), per_dim=False),
                                         dtype=dtype, device=im.z_scale.device, requires_grad=True)
             for kind in kinds}
    probing = Probing(im, Spec(probes=kinds, rule=rule), gates)
    with torch.enable_grad(), probing:
        outputs = im(*args, **kwargs)
    return outputs, gates, probing


def _terms_and_lengths(im, args, kwargs, kinds, batch: int, target, foil, position) -> tuple[list | None, Lengths]:
    """The target's terms and the lengths the components of `kinds` see. The terms are checked
    before any run where the inputs give the main output's positions (token inputs), else once
    the run that measures the lengths has read them (pixels, audio features)."""
    def terms_at(seq: int) -> list | None:
        return _target_terms(target, foil, position, batch, seq,
                             last=lambda: output_last_positions(args, kwargs, seq, im.model.forward))
    seq = output_length(args, kwargs)
    terms = terms_at(seq) if seq is not None else None
    if im._sites is None:
        im._discover(args, kwargs)
    lengths = sequence_lengths(im, args, kwargs, kinds)
    if seq is not None:
        return terms, lengths
    if lengths.output is None and not callable(target):
        raise InvalidArgumentError("a token target reads the main output ([batch, seq, n]: the output, its .logits "
                                   "or .last_hidden_state) and these outputs hold none; pass a callable target")
    return terms_at(lengths.output or 1), lengths


def _component(grads, gates, found: set[int], lengths: dict[int, int], kind: str) -> torch.Tensor | None:
    """The gate gradient laid out [b, t] / [b, t, L] / [b, t, L, H], each layer over its own
    positions and NaN past them (t: the longest layer); NaN throughout for layers where the
    component's pattern was not found; None when it was found nowhere or not asked for."""
    if not found or kind not in grads:
        return None
    grad = grads[kind]
    grad = torch.zeros_like(gates[gate_name(kind)]) if grad is None else grad.detach()
    if kind == "tokens":
        return grad.clone()
    own = [grad[layer, :, :lengths[layer] if layer in found else 0] for layer in range(grad.shape[0])]
    stacked = padded_stack(own, fill=float("nan"))                                  # [L, b, t(, H)]
    return stacked.permute(1, 2, 0, 3) if kind == "heads" else stacked.permute(1, 2, 0)


_TARGET_FORMS = (f"a token id or one per example ({INTEGER_FORMS}), a {{token: weight}} dict, a list of "
                 "(position, token[, weight]) tuples or a callable of the outputs")


def _target_terms(target, foil, position, batch: int, seq: int, last) -> list | None:
    """The target as (name, token ids [b], positions [b], weight) terms of a weighted sum of logits,
    all checked before any run (token ids against the vocabulary later, once it is known); None for
    a callable. `last()` gives each row's last real token, read only when a term needs it."""
    token_form = not callable(target) and (isinstance(target, Mapping) or not _is_position_list(target))
    if foil is not None and (not token_form or isinstance(target, Mapping)):
        raise InvalidArgumentError("foil= goes with a token target; a dict, a (position, token) list or a "
                                   "callable carries its own negative terms")
    if position is not None and not token_form:
        raise InvalidArgumentError("position= goes with a token or {token: weight} target; a (position, "
                                   "token) list carries its positions and a callable reads its own")
    if callable(target):
        return None
    if not token_form:
        terms = []
        for item in target:
            if len(item) not in (2, 3):
                raise InvalidArgumentError(f"a (position, token[, weight]) target needs 2 or 3 entries, "
                                           f"got {item!r}")
            terms.append(("target", per_example(item[1], batch, "target"), _positions(item[0], batch, seq),
                          _weight(item[2]) if len(item) == 3 else 1.0))
        return terms
    if not (isinstance(target, Mapping) or is_integer_like(target)):
        raise InvalidArgumentError(f"target must be {_TARGET_FORMS}; got {type(target).__name__}")
    at = last() if position is None else _positions(position, batch, seq)
    if isinstance(target, Mapping):
        if not target:
            raise InvalidArgumentError("a {token: weight} target needs at least one token")
        return [("target", per_example(t, batch, "target"), at, _weight(w)) for t, w in target.items()]
    terms = [("target", per_example(target, batch, "target"), at, 1.0)]
    if foil is not None:
        terms.append(("foil", per_example(foil, batch, "foil"), at, -1.0))
    return terms


def _is_position_list(target) -> bool:
    """A non-empty sequence of (position, token[, weight]) sequences (a list of ints is one token
    per example)."""
    return (isinstance(target, Sequence) and not isinstance(target, (str, bytes)) and len(target) > 0
            and all(isinstance(item, Sequence) and not isinstance(item, (str, bytes)) for item in target))


def _weight(value) -> float:
    if isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype.is_floating_point:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(f"a target weight must be a real number, got {type(value).__name__}")
    return float(value)


def _target_function(target, terms, batch: int, vocab: int | None) -> Callable:
    """outputs → [b]: a callable as given, else the weighted sum of logits (metrics.logit)."""
    if terms is None:
        return lambda out: _as_batch(target(out), batch)
    if vocab is not None:
        for what, ids, _, _ in terms:
            check_vocab(ids, vocab, what)
    metrics_ = [(metrics.logit(ids, at), weight) for _, ids, at, weight in terms]
    return lambda out: sum(weight * metric(main_output(out)) for metric, weight in metrics_)


def _as_batch(value, batch: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise InvalidArgumentError(f"target(outputs) must return a tensor, got {type(value).__name__}")
    value = metrics.wide(value)
    return value.reshape(batch) if value.numel() == batch else value
