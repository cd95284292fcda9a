"""`attnfx.relevance`: AttnLRP / CP-LRP relevance of tokens, heads, attention and MLP outputs and
the residual stream, from one forward and one backward of the instrumented graph (DESIGN §3).

The probe pass multiplies every component by a gate of ones; the lrp pass gives the graph the
rules' local Jacobians; the gradient of the target at each gate is then Σ x ⊙ ∂f/∂x under those
rules — the component's relevance — for every component at once, in fp32.

    rel = attnfx.relevance(im, {"input_ids": ids}, target=42, foil=7)
    rel.tokens               [b, t]        relevance of each input token (summed over d_model)
    rel.heads                [b, L, H]     per head (summed over positions); heads_per_position [b, t, L, H]
    rel.attn, rel.mlp        [b, t, L]     attention / MLP output of each layer
    rel.residual             [b, t, L]     the residual stream entering each layer
    rel.target               [b]           the target's value
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..calls import as_call, batch_and_length, logits_of
from ..errors import InvalidArgumentError, RelevanceLeakError, RelevanceLeakWarning, ShapeMismatchError
from ..probing import Probing, relevance_dtype, state_shape
from ..spec import RULES, Spec, gate_name
from . import metrics


@dataclass
class Relevance:
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
        """[b, L, H]: each head's relevance summed over positions."""
        return None if self.heads_per_position is None else self.heads_per_position.sum(1)

    def conservation(self) -> dict[str, torch.Tensor]:
        """Σ relevance of each component set per example ([b], or [b, L] per layer) beside the
        target: equal for a bias-free model of linear, norm and uniform-rule ops; biases absorb
        their share and the softmax rule is not conservative (DESIGN §3)."""
        sums = {"target": self.target}
        for name in ("tokens", "residual", "attn", "mlp"):
            value = getattr(self, name)
            if value is not None:
                sums[name] = value.sum(1)
        if self.heads_per_position is not None:
            sums["heads"] = self.heads_per_position.sum((1, 3))
        return sums


COMPONENTS = {"tokens": "tokens", "heads": "heads", "attn": "attn", "mlp": "mlp", "residual": "resid"}


def relevance(im, inputs, target, *, rule: str = "attnlrp", foil=None, position=-1,
              components=tuple(COMPONENTS), check: bool = False) -> Relevance:
    """Relevance of every component for `target`: a token id (its logit at `position`, minus the
    `foil`'s if given), a {token: weight} dict (a weighted set of logits at `position`), a list of
    (position, token) or (position, token, weight) (several generated tokens at once), or a
    callable outputs → [b] (any scalar function of the outputs per example). rule: "attnlrp",
    "cp-lrp" or "gradient" (plain gradient × input). Ops without a rule are reported in
    `.leaks` with a RelevanceLeakWarning; check=True raises RelevanceLeakError instead.
    `components` limits the work to some of "tokens", "heads", "attn", "mlp", "residual" (the
    others come back None): each gated component keeps its activation for the backward."""
    if rule not in RULES:
        raise InvalidArgumentError(f"rule must be one of {RULES}, got {rule!r}")
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or not components:
        raise InvalidArgumentError(f"components must be among {tuple(COMPONENTS)}, got {tuple(components)}")
    kinds = tuple(kind for name, kind in COMPONENTS.items() if name in components)
    args, kwargs = as_call(inputs)
    if im._sites is None:
        im._discover(args, kwargs)
    batch, seq = batch_and_length(args, kwargs)
    target_fn = _target_function(target, foil, position, batch)
    dtype = relevance_dtype(im.model)
    gates = {gate_name(kind): torch.ones(state_shape(im, kind, batch, seq, per_dim=False), dtype=dtype,
                                         device=im.z_scale.device, requires_grad=True) for kind in kinds}
    probing = Probing(im, Spec(probes=kinds, rule=rule), gates)
    with torch.enable_grad(), probing:
        outputs = im(*args, **kwargs)
    value = target_fn(outputs)
    if value.dim() != 1 or value.shape[0] != batch:
        raise ShapeMismatchError(f"the target must be one scalar per example, shape [{batch}], got {list(value.shape)}")
    grads = dict(zip(kinds, torch.autograd.grad(value.sum(), list(gates.values()), allow_unused=True)))
    if probing.leaks:
        message = (f"relevance leaks through ops with no {rule} rule (plain gradient used): "
                   + "; ".join(probing.leaks))
        if check:
            raise RelevanceLeakError(message)
        warnings.warn(message, RelevanceLeakWarning, stacklevel=2)
    return Relevance(tokens=_component(grads, gates, probing, "tokens"),
                     heads_per_position=_component(grads, gates, probing, "heads"),
                     attn=_component(grads, gates, probing, "attn"), mlp=_component(grads, gates, probing, "mlp"),
                     residual=_component(grads, gates, probing, "resid"), target=value.detach(), rule=rule,
                     leaks=probing.leaks)


def _component(grads, gates, probing: Probing, kind: str) -> torch.Tensor | None:
    """The gate gradient laid out [b, t] / [b, t, L] / [b, t, L, H]; NaN for layers where the
    component's pattern was not found; None when it was found nowhere or not asked for."""
    found = probing.touched.get(kind, set())
    if not found or kind not in grads:
        return None
    grad = grads[kind]
    grad = torch.zeros_like(gates[gate_name(kind)]) if grad is None else grad.detach().clone()
    if kind == "tokens":
        return grad
    missing = [layer for layer in range(grad.shape[0]) if layer not in found]
    grad[missing] = float("nan")
    return grad.permute(1, 2, 0, 3) if kind == "heads" else grad.permute(1, 2, 0)


def _target_function(target, foil, position, batch: int) -> Callable:
    """outputs → [b]: a callable as given, else a weighted sum of logits (metrics.logit)."""
    if callable(target):
        return lambda out: _as_batch(target(out), batch)
    if isinstance(target, dict):
        terms = [(metrics.logit(int(t), position), float(w)) for t, w in target.items()]
    elif isinstance(target, Sequence) and not isinstance(target, str) and target and \
            isinstance(target[0], Sequence):
        terms = [(metrics.logit(int(t), int(p)), float(rest[0]) if rest else 1.0) for p, t, *rest in target]
    elif isinstance(target, int) and not isinstance(target, bool):
        terms = [(metrics.logit(target, position), 1.0)] + ([(metrics.logit(int(foil), position), -1.0)]
                                                             if foil is not None else [])
    else:
        raise InvalidArgumentError(f"target must be a token id, a {{token: weight}} dict, a list of "
                                   f"(position, token[, weight]) or a callable; got {type(target).__name__}")
    return lambda out: sum(weight * metric(logits_of(out)) for metric, weight in terms)


def _as_batch(value, batch: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise InvalidArgumentError(f"target(outputs) must return a tensor, got {type(value).__name__}")
    value = metrics.wide(value)
    return value.reshape(batch) if value.numel() == batch else value
