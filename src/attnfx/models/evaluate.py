"""Held-out metrics of the default model: fact recall per frequency tier, IOI, copying, and the
Yu et al. (2023) value-scaling experiment (`attnfx.factual_recall`) run with attnfx."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..analysis import factual_recall as fr

EVAL_BATCH = 256


@torch.no_grad()
def next_token(model, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Greedy next-token id after each prompt: [n]."""
    out = []
    for start in range(0, len(prompts), EVAL_BATCH):
        batch = fr.encode(tokenizer, prompts[start:start + EVAL_BATCH])
        out.append(model(**batch).logits[:, -1].argmax(-1))
    return torch.cat(out)


def _ids(tokenizer, words: Sequence[str]) -> torch.Tensor:
    return torch.tensor([fr.answer_token(tokenizer, w) for w in words])


def accuracy(model, tokenizer, items: Sequence[dict], answer_key: str = "answer") -> float:
    pred = next_token(model, tokenizer, [it["prompt"] for it in items])
    return float((pred == _ids(tokenizer, [it[answer_key] for it in items])).float().mean())


def fact_recall(model, tokenizer, facts: Sequence[dict], tiers: int = 3) -> dict:
    """Accuracy of "the R of X is" → answer, overall, per relation and per frequency tier."""
    pred = next_token(model, tokenizer, [f["prompt"] for f in facts])
    hit = (pred == _ids(tokenizer, [f["answer"] for f in facts])).float()
    n = max(f["country"] for f in facts) + 1
    out = {"all": float(hit.mean())}
    for relation in sorted({f["relation"] for f in facts}):
        out[relation] = float(hit[torch.tensor([f["relation"] == relation for f in facts])].mean())
    for t in range(tiers):
        lo, hi = t * n // tiers, (t + 1) * n // tiers
        out[f"rank_{lo}_{hi - 1}"] = float(hit[torch.tensor([lo <= f["country"] < hi for f in facts])].mean())
    return out


@torch.no_grad()
def copy_accuracy(model, tokenizer, items: Sequence[dict]) -> float:
    """Teacher-forced next-token accuracy on the repeated half of "w1…wk | w1…wk"."""
    texts = [it["first"] + " | " + it["first"] for it in items]
    batch = fr.encode(tokenizer, texts)
    pred = model(**batch).logits[:, :-1].argmax(-1)
    hits = total = 0
    for row, it in enumerate(items):
        k = len(it["first"].split())
        hits += int((pred[row, -k:] == batch["input_ids"][row, -k:]).sum())
        total += k
    return hits / total


def evaluate(model, tokenizer, prompts: dict, *, backends: Sequence[str] = ("eager",)) -> dict:
    import attnfx

    model.eval()
    counterfactual = fr.prepare(tokenizer, prompts["counterfactual"])
    metrics = {"fact_recall": fact_recall(model, tokenizer, prompts["facts"]),
               "ioi_accuracy": accuracy(model, tokenizer, prompts["ioi"]),
               "copy_accuracy": copy_accuracy(model, tokenizer, prompts["copy"]),
               "counterfactual": fr.answer_rates(model, counterfactual)}
    for backend in backends:
        im = attnfx.instrument(model, backend=backend)
        try:
            metrics[f"value_scaling_{backend}"] = fr.run(im, counterfactual)
        finally:
            im.uninstrument()
    return metrics
