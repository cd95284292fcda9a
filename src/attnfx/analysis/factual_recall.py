"""Yu, Merullo & Pavlick (2023), "Characterizing Mechanisms for Factual Recall in Language
Models", run with attnfx on any causal LM.

A counterfactual prompt puts a wrong answer in context ("the capital of X is Y . the capital of
X is"); the model's greedy answer is the in-context one (Y), the memorised one, or other.

1. `answer_rates`: the fractions of in-context / memorised / other greedy answers;
2. `rank_heads`: direct logit attribution of (in-context − memorised) per head, at the last
   position, averaged over prompts;
3. `value_sweep`: scale one head's bias-free value vectors (TransformerLens's `hook_v`, as in
   the paper) at runtime and re-measure the rates — one compiled graph for the whole sweep.

Prompts of a batch are left-padded and `position_ids` are passed explicitly (index among the
real tokens): transformers does not derive positions from the attention mask for every model,
and a left-padded row would otherwise see shifted positions.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import InvalidArgumentError

# The paper sweeps the value scale over roughly −2…10.
SWEEP_FACTORS = (-2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 10.0)
PROMPT_KEYS = ("prompt", "in_context", "memorised")


@dataclass(frozen=True)
class Prompts:
    """Counterfactual prompts ready to run: one left-padded batch and the two answer tokens."""

    texts: tuple[str, ...]
    batch: dict                     # input_ids, attention_mask, position_ids: [n, t]
    in_context: torch.Tensor        # [n] token id of the in-context answer
    memorised: torch.Tensor         # [n] token id of the memorised answer
    dropped: int                    # items whose two answers start with the same token

    def __len__(self) -> int:
        return len(self.texts)

    def chunks(self, size: int):
        """(batch, in_context, memorised) slices of at most `size` prompts."""
        for start in range(0, len(self), size):
            part = slice(start, start + size)
            yield ({k: v[part] for k, v in self.batch.items()}, self.in_context[part], self.memorised[part])


def load_prompt_file(path) -> list[dict]:
    """Counterfactual items from a JSON file: a list of {"prompt", "in_context", "memorised"}, or
    an object holding that list under "counterfactual" (the default model's prompts.json)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    try:
        items = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InvalidArgumentError(f"prompt file {path} is not valid JSON: {error}") from None
    if isinstance(items, dict):
        items = items.get("counterfactual")
    if not isinstance(items, list) or not items:
        raise InvalidArgumentError(
            f"prompt file {path}: expected a non-empty JSON list of {{\"prompt\", \"in_context\", "
            "\"memorised\"}} objects, or an object with such a list under \"counterfactual\"")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or any(not isinstance(item.get(k), str) for k in PROMPT_KEYS):
            raise InvalidArgumentError(f"prompt file {path}: item {i} must have string fields "
                                       f"{', '.join(PROMPT_KEYS)}; got {item!r}")
    return items


def answer_token(tokenizer, word: str) -> int:
    """The token a greedy answer starts with: the first token of " word" (no special tokens)."""
    ids = tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise InvalidArgumentError(f"answer {word!r} encodes to no tokens")
    return int(ids[0])


def encode(tokenizer, texts: Sequence[str], device="cpu") -> dict:
    """Left-padded batch; position -1 is every row's last real token."""
    rows = [tokenizer(t)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            "position_ids": positions.to(device)}


def prepare(tokenizer, items: Sequence[dict], device="cpu") -> Prompts:
    """Tokenise counterfactual items; drops (and counts) those whose answers share a first token."""
    kept, ctx, mem = [], [], []
    for item in items:
        a, b = answer_token(tokenizer, item["in_context"]), answer_token(tokenizer, item["memorised"])
        if a != b:
            kept.append(item["prompt"])
            ctx.append(a)
            mem.append(b)
    if not kept:
        raise InvalidArgumentError("no prompt has distinct in-context and memorised answer tokens")
    return Prompts(tuple(kept), encode(tokenizer, kept, device), torch.tensor(ctx, device=device),
                   torch.tensor(mem, device=device), len(items) - len(kept))


@torch.no_grad()
def answer_rates(model, prompts: Prompts, batch_size: int = 256) -> dict:
    """Fractions of greedy next tokens that are the in-context answer, the memorised one, other."""
    ctx = mem = 0
    for batch, in_context, memorised in prompts.chunks(batch_size):
        pred = model(**batch).logits[:, -1].argmax(-1)
        ctx += int((pred == in_context).sum())
        mem += int((pred == memorised).sum())
    n = len(prompts)
    return {"in_context": ctx / n, "memorised": mem / n, "other": (n - ctx - mem) / n}


def rank_heads(im, prompts: Prompts, batch_size: int = 256) -> torch.Tensor:
    """Mean direct logit attribution of logit[in-context] − logit[memorised] per head: [L, H]."""
    from .attribution import head_attribution

    total = None
    for batch, in_context, memorised in prompts.chunks(batch_size):
        part = head_attribution(im, batch, target=in_context, foil=memorised, position=-1, reduce="sum")
        total = part if total is None else total + part
    return total / len(prompts)


def kv_head_of(im, layer: int, head: int) -> int:
    """The kv head whose values a query head reads (value scaling acts on kv heads)."""
    site = im.sites[layer]
    return head // (site.num_heads // site.num_kv_heads)


def value_sweep(im, prompts: Prompts, layer: int, head: int, factors: Sequence[float] = SWEEP_FACTORS,
                *, batch_size: int = 256, progress: bool = False) -> dict:
    """Answer rates with the bias-free value vectors of (layer, kv head of `head`) scaled by each
    factor, changed at runtime. Counts the graphs compiled by the first factor (the first use of
    value_unbiased compiles κ into the graph once) and by all later ones (0: values never compile)."""
    from torch._dynamo.utils import counters
    from tqdm import tqdm

    kv_head = kv_head_of(im, layer, head)
    start, points, compiled = time.perf_counter(), [], []
    try:
        for factor in tqdm(factors, desc=f"value scale L{layer}H{head}", unit="scale", disable=not progress):
            before = counters["attnfx"]["graphs_compiled"]
            im.steering.reset()
            im.steering.scale(layer, kv_head, factor, on="value_unbiased")
            points.append({"factor": float(factor), **answer_rates(im, prompts, batch_size)})
            compiled.append(counters["attnfx"]["graphs_compiled"] - before)
    finally:
        im.steering.reset()
    return {"layer": layer, "head": head, "kv_head": kv_head, "on": "value_unbiased", "points": points,
            "graphs_compiled_first_factor": compiled[0] if compiled else 0,
            "graphs_compiled": sum(compiled[1:]), "seconds": round(time.perf_counter() - start, 3)}


def top_heads(dla: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
    """(layer, head) with the largest and the most negative mean DLA."""
    heads = dla.shape[1]
    return divmod(int(dla.argmax()), heads), divmod(int(dla.argmin()), heads)


def run(im, prompts: Prompts, factors: Sequence[float] = SWEEP_FACTORS, *, batch_size: int = 256,
        progress: bool = False) -> dict:
    """The whole experiment on an instrumented model: baseline rates, head ranking, and value
    sweeps of the top in-context and top memorised heads."""
    laps = {}
    start = time.perf_counter()
    baseline = answer_rates(im, prompts, batch_size)
    laps["baseline"] = time.perf_counter() - start
    dla = rank_heads(im, prompts, batch_size)
    laps["attribution"] = time.perf_counter() - start - laps["baseline"]
    top_in, top_mem = top_heads(dla)
    sweeps = {name: value_sweep(im, prompts, l, h, factors, batch_size=batch_size, progress=progress)
              for name, (l, h) in (("in_context_head", top_in), ("memorised_head", top_mem))}
    return {"prompts": len(prompts), "dropped_prompts": prompts.dropped, "baseline": baseline,
            "dla": dla.tolist(), "top_in_context_head": list(top_in), "top_memorised_head": list(top_mem),
            "sweeps": sweeps, "seconds": {k: round(v, 3) for k, v in laps.items()}}


def rate_at(result: dict, sweep: str, factor: float, answer: str = "in_context") -> float:
    """The `answer` rate of a sweep at one factor."""
    for point in result["sweeps"][sweep]["points"]:
        if point["factor"] == factor:
            return point[answer]
    raise KeyError(f"factor {factor} was not swept")
