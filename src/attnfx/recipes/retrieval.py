"""Retrieval heads (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context
Factuality"): per-head retrieval scores from copy-paste decoding, by the attention_argmax op on the
recorded q and k of every decode step (the t × s pattern is never formed).

    prompts = recipes.retrieval.copy_prompts(tok)            # the default model's held-out copy set
    result = recipes.retrieval.retrieval_scores(im, prompts)  # result.scores [L, H]
    top = recipes.retrieval.top_heads(result.scores, 4)       # [(layer, head), ...]
    recipes.retrieval.copy_accuracy(im, prompts)              # exact match, e.g. under ablation

A copy prompt is `<bos> w1 … wk |` and the model should continue `w1 … wk`. Greedy decoding runs k
steps; at step i, head (l, h) copy-pastes when its most attended key j (the argmax of the query
that predicts token i) lies inside the source w1 … wk and holds the token just generated. A head's
retrieval score on a prompt is its hits / k (the paper's |g_h ∩ k| / |k|, counted per step);
`scores` is the mean over prompts. Prompts are batched by shape, so no row is padded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from ..errors import InvalidArgumentError
from ..ops import attention_argmax  # noqa: F401  (registers torch.ops.attnfx.attention_argmax)

__all__ = ["CopyPrompt", "Retrieval", "copy_prompts", "retrieval_scores", "copy_accuracy", "top_heads",
           "step_hits"]

SEPARATOR = "|"              # the default model's copy documents: "w1 … wk | w1 … wk ."


class CopyPrompt(NamedTuple):
    """A copy-paste prompt: token ids [t] int64 with the source span ids[start:end] the model should
    copy."""
    ids: torch.Tensor        # [t] int64: the prompt
    start: int               # the source to copy is ids[start:end]
    end: int


@dataclass(frozen=True)
class Retrieval:
    """Retrieval scores of copy-paste decoding: per head, how often its most attended key was the
    source token being copied (scores [L, H] fp32, the mean over prompts); per prompt (per_prompt
    [N, L, H], N prompts), and whether the copy was exact (copied [N] bool)."""
    scores: torch.Tensor       # [L, H] fp32: mean over prompts of hits / k
    per_prompt: torch.Tensor   # [N, L, H] fp32: hits / k, in the prompts' order
    copied: torch.Tensor       # [N] bool: the k greedy tokens equal the source (exact match)


def copy_prompts(tokenizer, items: Sequence[dict] | None = None) -> list[CopyPrompt]:
    """A CopyPrompt (ids [t], the source ids[start:end] = w1 … wk) of `<bos> w1 … wk |` for each
    item {"first": "w1 … wk"} (default: the default model's held-out copy prompts,
    attnfx.models.load_prompts()["copy"])."""
    if items is None:
        from ..models.loader import load_prompts

        items = load_prompts()["copy"]
    prompts = []
    for item in items:
        ids = tokenizer(item["first"] + " " + SEPARATOR, return_tensors="pt")["input_ids"][0]
        k = len(tokenizer(item["first"], add_special_tokens=False)["input_ids"])
        start = len(ids) - 1 - k
        prompts.append(CopyPrompt(ids, start, start + k))
    return prompts


def step_hits(index: torch.Tensor, seq: torch.Tensor, token: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """index [b, ...] the argmax key of each head (e.g. [b, H]), seq [b, s] the tokens at the keys,
    token [b] the token generated → bool [b, ...], shaped as index: a hit where
    start ≤ index < end and seq[index] = token."""
    flat = index.reshape(index.shape[0], -1)
    at = seq.gather(1, flat.clamp(min=0)).view_as(index)
    inside = (index >= start) & (index < end)
    return inside & (at == token.view(-1, *[1] * (index.dim() - 1)))


def retrieval_scores(im, prompts: Sequence[CopyPrompt], *, batch_size: int = 64) -> Retrieval:
    """Greedy copy decoding with q [b, t, H, d_head] and k [b, s, H_kv, d_head] recorded at every
    step; per step and layer one attention_argmax call on the query that predicts the next token
    (KV cache: t = 1 after the prefill), with the layer's softmax scale. A Retrieval: scores
    [L, H], per_prompt [N, L, H], copied [N] for the N prompts."""
    _check(im, prompts, batch_size)
    L, H = len(im.sites), max(site.num_heads for site in im.sites)
    per_prompt = torch.full((len(prompts), L, H), float("nan"))
    copied = torch.zeros(len(prompts), dtype=torch.bool)
    for rows in _batches(prompts, batch_size):
        p = prompts[rows[0]]
        ids = torch.stack([prompts[r].ids for r in rows]).to(_device(im))
        k = p.end - p.start
        with torch.no_grad(), im.record("q", "k") as rec:
            out = _greedy(im, ids, k)
        hits = torch.zeros(len(rows), L, H)
        for i, call in enumerate(rec.calls):                     # step i predicts out[:, P + i]
            seq, token = out[:, :ids.shape[1] + i], out[:, ids.shape[1] + i]
            for layer in range(L):
                index = _argmax(im, layer, call["q"][layer], call["k"][layer])        # [b, H_l]
                hits[:, layer, :index.shape[1]] += step_hits(index, seq, token, p.start, p.end).cpu()
        per_prompt[rows] = hits / k
        copied[rows] = (out[:, ids.shape[1]:] == ids[:, p.start:p.end]).all(1).cpu()
    return Retrieval(per_prompt.nanmean(0), per_prompt, copied)


def copy_accuracy(im, prompts: Sequence[CopyPrompt], *, batch_size: int = 64) -> float:
    """Fraction of prompts whose k greedy tokens equal the source (exact match), under whatever
    steering is active on `im` (e.g. im.steering.ablate on some heads)."""
    _check(im, prompts, batch_size)
    hits = 0
    for rows in _batches(prompts, batch_size):
        p = prompts[rows[0]]
        ids = torch.stack([prompts[r].ids for r in rows]).to(_device(im))
        with torch.no_grad():
            out = _greedy(im, ids, p.end - p.start)
        hits += int((out[:, ids.shape[1]:] == ids[:, p.start:p.end]).all(1).sum())
    return hits / len(prompts)


def top_heads(scores: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The k (layer, head) pairs of highest score in scores [L, H] (NaN — a head a layer lacks —
    never chosen)."""
    flat = scores.nan_to_num(float("-inf")).flatten()
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    return [(int(i) // scores.shape[1], int(i) % scores.shape[1]) for i in order]


def _argmax(im, layer: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q [b, t, H, d], k [b, s, Hkv, d] as recorded → the argmax key of the last query, [b, H]."""
    scale = im.sites[layer].scale
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    q = q[:, -1:].transpose(1, 2)                                  # [b, H, 1, d]
    index, _ = torch.ops.attnfx.attention_argmax(q, k.transpose(1, 2), None, True, float(scale))
    return index[:, :, 0]


def _greedy(im, ids: torch.Tensor, steps: int) -> torch.Tensor:
    mask = torch.ones_like(ids)
    return im.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=steps,
                       min_new_tokens=steps, pad_token_id=_pad(im))


def _batches(prompts: Sequence[CopyPrompt], batch_size: int) -> list[list[int]]:
    """Row indices grouped by (length, source span), in chunks of batch_size: no padding."""
    groups: dict[tuple, list[int]] = {}
    for r, p in enumerate(prompts):
        groups.setdefault((len(p.ids), p.start, p.end), []).append(r)
    return [rows[i:i + batch_size] for _, rows in sorted(groups.items()) for i in range(0, len(rows), batch_size)]


def _pad(im) -> int:
    config = getattr(im.model, "config", None)
    pad = getattr(config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def _device(im) -> torch.device:
    return next(im.model.parameters()).device


def _check(im, prompts, batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(f"batch_size must be a positive int, got {batch_size!r}")
    if not prompts:
        raise InvalidArgumentError("expected at least one CopyPrompt (recipes.retrieval.copy_prompts builds them)")
    for p in prompts:
        if not isinstance(p, CopyPrompt) or p.ids.dim() != 1 or not 0 <= p.start < p.end <= len(p.ids):
            raise InvalidArgumentError(f"expected CopyPrompt(ids [P], start, end) with 0 ≤ start < end ≤ P, "
                                       f"got {p!r}")
