"""Token-attribution baselines for HuggingFace encoders (BERT-like: `get_input_embeddings()` and an
`inputs_embeds=` argument), in plain torch on the unmodified model — the methods AttnLRP is
compared with in the faithfulness benchmark. Each returns a relevance per input token [b, t] for a
scalar-per-example target

    target(outputs, attention_mask) -> [b]

(e.g. cosine similarity of the mean-pooled sentence embedding to a reference). The target sees the
attention mask of the batch it is given because integrated gradients runs it on batches of
interpolated inputs, whose rows are not the caller's rows.

Token relevance is always taken at the word-embedding output e_j (before position and token-type
embeddings are added), summed over d_model — the quantity attnfx.relevance calls `tokens`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import InvalidArgumentError, ShapeMismatchError, UnsupportedModelError

Target = Callable[..., torch.Tensor]
IG_BASELINES = ("pad", "zero")
ROLLOUT_ROWS = ("mean", "cls")


def _unpack(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(input_ids, attention_mask, other kwargs) with shapes checked; the model must be in eval mode."""
    if model.training:
        raise InvalidArgumentError("the model is in training mode (dropout would make attributions random): "
                                   "call model.eval() first")
    if "input_ids" not in inputs:
        raise InvalidArgumentError(f"inputs must hold input_ids (and attention_mask), got keys {sorted(inputs)}")
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    if ids.dim() != 2 or tuple(mask.shape) != tuple(ids.shape):
        raise ShapeMismatchError(f"input_ids and attention_mask must both be [batch, seq], got "
                                 f"{tuple(ids.shape)} and {tuple(mask.shape)}")
    rest = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    return ids, mask, rest


def _score(model, target: Target, embeds, mask, rest) -> torch.Tensor:
    out = target(model(inputs_embeds=embeds, attention_mask=mask, **rest), mask)
    if tuple(out.shape) != (embeds.shape[0],):
        raise ShapeMismatchError(f"target must return one value per example [{embeds.shape[0]}], "
                                 f"got {tuple(out.shape)}")
    return out


def scorer(model, target: Target) -> Callable[..., torch.Tensor]:
    """score(input_ids, attention_mask, zeroed=None) -> [b] without gradients, the scorer that
    perturbation_curves expects; zeroed [b, t] bool zeroes those tokens' word embeddings."""
    embed = model.get_input_embeddings()

    def score(input_ids, attention_mask, zeroed=None):
        with torch.no_grad():
            embeds = embed(input_ids)
            if zeroed is not None:
                embeds = embeds.masked_fill(zeroed.unsqueeze(-1), 0.0)
            return _score(model, target, embeds, attention_mask, {})
    return score


def gradient_x_input(model, inputs: dict, target: Target, *, layer: torch.nn.Module | None = None) -> torch.Tensor:
    """Gradient × Input: R_j = Σ_d a_jd · ∂f/∂a_jd with a = the word embeddings (layer=None) or the
    output [b, t, d] of `layer` (e.g. model.embeddings: the first block's input). [b, t] fp32.

    In BERT-style models the word embedding e_j enters a LayerNorm with the position and type
    embeddings, s_j = e_j + p_j + t_j; LayerNorm is invariant to scaling s_j, so s_j·∂f/∂s_j = 0 and
    the word-embedding form equals −(p_j + t_j)·∂f/∂e_j: a poor token relevance there."""
    ids, mask, rest = _unpack(model, inputs)
    if layer is None:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(_score(model, target, embeds, mask, rest).sum(), embeds)
        return (embeds * grad).sum(-1).detach().float()
    captured = []

    def hook(module, args, output):
        if not isinstance(output, torch.Tensor) or output.shape[:2] != ids.shape:
            raise ShapeMismatchError(f"layer must output a [batch, seq, d] tensor {tuple(ids.shape)}, got "
                                     f"{type(output).__name__} {tuple(getattr(output, 'shape', ()))}")
        captured.append(output.detach().requires_grad_(True))
        return captured[-1]
    handle = layer.register_forward_hook(hook)
    try:
        f = _score(model, target, model.get_input_embeddings()(ids), mask, rest)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(f.sum(), captured[0])
    return (captured[0] * grad).sum(-1).detach().float()


@dataclass(frozen=True)
class IntegratedGradients:
    """tokens [b, t]: Σ_d (e − e′)_jd · mean over the path of ∂f/∂e_jd; f_input, f_baseline [b];
    completeness_gap [b] = Σ_j tokens_j − (f(x) − f(x′)), the quadrature error (→ 0 as steps grow)."""

    tokens: torch.Tensor
    f_input: torch.Tensor
    f_baseline: torch.Tensor
    completeness_gap: torch.Tensor


def _ig_baseline(model, ids, embeds, baseline: str, keep) -> torch.Tensor:
    if baseline == "pad":
        pad = model.config.pad_token_id
        if pad is None:
            raise InvalidArgumentError("baseline='pad' needs model.config.pad_token_id; use baseline='zero'")
        reference = model.get_input_embeddings()(torch.full_like(ids, pad)).detach()
    else:
        reference = torch.zeros_like(embeds)
    if keep is not None:
        if tuple(keep.shape) != tuple(ids.shape):
            raise ShapeMismatchError(f"keep must be [batch, seq] {tuple(ids.shape)}, got {tuple(keep.shape)}")
        reference = torch.where(keep.bool().unsqueeze(-1), embeds, reference)
    return reference


def integrated_gradients(model, inputs: dict, target: Target, *, baseline: str = "pad", steps: int = 32,
                         keep: torch.Tensor | None = None, batch_size: int = 256) -> IntegratedGradients:
    """Integrated Gradients (Sundararajan et al. 2017) at the word embeddings, from the baseline e′ =
    the [PAD] embedding (baseline="pad") or 0 (baseline="zero") at every position, except where
    keep [b, t] is True (those positions keep their own embedding, e.g. [CLS]/[SEP], and get 0).
    The path integral uses the midpoint rule over `steps` points α = (i + ½)/steps (error O(1/steps²)),
    evaluated batch_size rows at a time (steps × b rows in all)."""
    ids, mask, rest = _unpack(model, inputs)
    if baseline not in IG_BASELINES:
        raise InvalidArgumentError(f"baseline must be one of {IG_BASELINES}, got {baseline!r}")
    if steps < 1:
        raise InvalidArgumentError(f"steps must be ≥ 1, got {steps}")
    embeds = model.get_input_embeddings()(ids).detach()                          # [b, t, d]
    reference = _ig_baseline(model, ids, embeds, baseline, keep)
    b = ids.shape[0]
    alphas = (torch.arange(steps, dtype=embeds.dtype, device=embeds.device) + 0.5) / steps
    per_chunk = max(1, batch_size // b)
    grad_sum = torch.zeros_like(embeds)
    for chunk in alphas.split(per_chunk):
        a = chunk[:, None, None, None]                                           # [s, 1, 1, 1]
        path = (reference + a * (embeds - reference)).flatten(0, 1).requires_grad_(True)   # [s·b, t, d]
        repeat = {k: v.repeat(len(chunk), *([1] * (v.dim() - 1))) for k, v in rest.items()}
        f = _score(model, target, path, mask.repeat(len(chunk), 1), repeat)
        (grad,) = torch.autograd.grad(f.sum(), path)
        grad_sum += grad.unflatten(0, (len(chunk), b)).sum(0)
    tokens = ((embeds - reference) * grad_sum / steps).sum(-1)
    with torch.no_grad():
        f_input = _score(model, target, embeds, mask, rest)
        f_base = _score(model, target, reference, mask, rest)
    gap = tokens.sum(-1) - (f_input - f_base)
    return IntegratedGradients(tokens.float(), f_input.float(), f_base.float(), gap.float())


def rollout_matrix(attentions, attention_mask: torch.Tensor) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): per layer Â = (mean over heads of A + I), rows
    renormalised; rollout = Â_L ⋯ Â_1. attentions: L tensors [b, H, t, t]. Returns [b, t, t] (row i:
    how much of token i's final state flows from each input token); every row sums to 1."""
    eye = torch.eye(attention_mask.shape[-1], dtype=torch.float64, device=attention_mask.device)
    rollout = eye.expand(attention_mask.shape[0], -1, -1)
    for a in attentions:
        a_hat = a.double().mean(1) + eye
        rollout = (a_hat / a_hat.sum(-1, keepdim=True)) @ rollout
    return rollout


def attention_rollout(model, inputs: dict, *, row: str = "mean") -> torch.Tensor:
    """Token relevance from attention rollout: rollout[CLS, j] (row="cls") or the mean of rollout[i, j]
    over the real query rows i, [CLS] and [SEP] included (row="mean": the rows a mean-pooled sentence
    embedding averages). Target-independent by construction. Needs attention probabilities, so
    the model must run HF's eager attention (attn_implementation="eager"). [b, t] fp32, 0 at padding."""
    ids, mask, rest = _unpack(model, inputs)
    if row not in ROLLOUT_ROWS:
        raise InvalidArgumentError(f"row must be one of {ROLLOUT_ROWS}, got {row!r}")
    if getattr(model.config, "_attn_implementation", "eager") != "eager":
        raise UnsupportedModelError(f"attention rollout needs the attention probabilities, which "
                                    f"attn_implementation={model.config._attn_implementation!r} does not return: "
                                    "load the model with attn_implementation='eager'")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True, **rest)
    rollout = rollout_matrix(out.attentions, mask)
    real = mask.double()
    if row == "cls":
        relevance = rollout[:, 0]
    else:
        relevance = (rollout * real[:, :, None]).sum(1) / real.sum(1, keepdim=True)
    return (relevance * real).float()


def random_relevance(inputs: dict, *, seed: int = 0) -> torch.Tensor:
    """Uniform random relevance in [0, 1) from a seeded generator: [b, t] fp32, the chance baseline."""
    ids = inputs["input_ids"]
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(ids.shape, generator=generator).to(ids.device)
