"""DeCoRe (Gema et al. 2024): contrastive decoding against the same model with its retrieval heads
masked. At each step, with z the base logits and z̃ the masked model's,

    α = H(softmax(z))    (the base distribution's entropy; optionally / log V, optionally capped)
    next token = argmax (1 + α) · z − α · z̃

The paper's code runs one prompt at a time: a base prefill of the prompt without its last token,
whose KV cache it deep-copies into both streams, so the heads are masked from the prompt's last
token on. Here the base and the masked stream are two rows of one batch (per-row steering: the
heads are zero-ablated on the masked rows only — at each call's newest token by default, as the
paper's code does, or over the whole prompt with mask_prompt=True), every prompt of the batch at
once, with the KV cache, compiled: prefill and the decode step are one graph each, the steps
compile nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..graph.calls import as_call
from ..errors import InvalidArgumentError, SteeringValueError

__all__ = ["DecoreResult", "entropy", "generate"]


@dataclass
class DecoreResult:
    """DeCoRe decoding: the contrastive tokens [b, steps], each step's α [b, steps], and what the base
    stream alone would pick [b, steps] (steps = max_new_tokens)."""
    tokens: torch.Tensor        # [b, steps] the generated tokens
    alphas: torch.Tensor        # [b, steps] α of each step
    base_tokens: torch.Tensor   # [b, steps] what the base stream alone would pick at each step (argmax z)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(logits)) over the last axis, in nats (fp32): logits [..., vocab] → [...]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def generate(im, inputs, heads, *, max_new_tokens: int, alpha_cap: float | None = None,
             scale_alpha: bool = False, mask_prompt: bool = False) -> DecoreResult:
    """Greedy DeCoRe decoding of a batch of prompts (input_ids [b, t] with an attention_mask [b, t]
    for left-padded batches) into a DecoreResult (tokens, alphas, base_tokens [b, max_new_tokens]),
    contrasting the model with itself with `heads` ([(layer, head), ...])
    zero-ablated — from the prompt's last token on (the paper's code), or over the whole prompt
    (mask_prompt=True). Every prompt gets exactly max_new_tokens tokens (none stops early)."""
    args, kwargs = as_call(inputs)
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise InvalidArgumentError("inputs must hold input_ids [n, t]")
    if not heads:
        raise InvalidArgumentError("heads must name the (layer, head) pairs to mask")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidArgumentError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if alpha_cap is not None and not (isinstance(alpha_cap, (int, float)) and math.isfinite(alpha_cap) and alpha_cap >= 0):
        raise SteeringValueError(f"alpha_cap must be a finite number ≥ 0 or None, got {alpha_cap!r}")
    n = ids.shape[0]
    mask = kwargs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    step_ids, step_mask = ids.repeat(2, 1), mask.repeat(2, 1)
    positions = (step_mask.long().cumsum(-1) - 1).clamp(min=0)          # left padding: each row from 0
    tokens, alphas, base_tokens, cache = [], [], [], None
    cache_name = cache_argument(im.model)
    with im.steering.restoring():
        for layer, head in heads:
            im.steering.ablate(layer, head, rows=range(n, 2 * n), positions=None if mask_prompt else -1)
        for _ in range(max_new_tokens):
            out = im(input_ids=step_ids, attention_mask=step_mask, position_ids=positions, use_cache=True,
                     **{cache_name: cache})
            cache = out[cache_name]
            logits = out.logits[:, -1].float()
            base, masked = logits[:n], logits[n:]
            alpha = entropy(base)
            if scale_alpha:
                alpha = alpha / math.log(base.shape[-1])
            if alpha_cap is not None:
                alpha = alpha.clamp(max=alpha_cap)
            chosen = ((1 + alpha[:, None]) * base - alpha[:, None] * masked).argmax(-1)
            tokens.append(chosen)
            alphas.append(alpha)
            base_tokens.append(base.argmax(-1))
            step_ids = chosen.repeat(2)[:, None]
            step_mask = torch.cat([step_mask, step_mask.new_ones(2 * n, 1)], dim=1)
            positions = positions[:, -1:] + 1
    return DecoreResult(torch.stack(tokens, 1), torch.stack(alphas, 1), torch.stack(base_tokens, 1))


def cache_argument(model) -> str:
    """The KV cache's keyword of an HF model: "cache" from transformers 5.24 on, "past_key_values" before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
