"""Each recipe's cost against the paper's way of doing it (issue 16): attention sinks, Lookback Lens
and retrieval heads, on the default model and the same prompts, side by side in one run.

    python bench/recipe_costs.py [--quick]

attnfx: the recipe on `attnfx.instrument(model)` (batched, attention statistics / argmax, no t × s
pattern). The paper's way: the bare HF model loaded with attn_implementation="eager", one prompt at a
time (batch 1), output_attentions=True, the numbers read off the returned [1, H, t, s] attentions:
* sinks (Xiao et al. 2024): one forward per prompt, mass on the first token(s) averaged over
  queries then prompts (recipes.sinks.sink_mass's definition); prompts as bench/sinks.py (all four
  held-out kinds, PER_KIND of each), the recipe at bench/sinks.py's batch size;
* Lookback Lens (Chuang et al. 2024): HF generate(output_attentions=True,
  return_dict_in_generate=True), LR_j = mean on the prompt / (that + mean on the j new tokens) at the
  last query of each decode step, averaged over steps; the recipe on left-padded batches of 64
  (bench/lookback.py), counterfactual prompts;
* retrieval heads (Wu et al. 2024's detection loop): greedy decoding step by step on the KV cache,
  per step and head the argmax key of the last attention row, a hit by recipes.retrieval.step_hits;
  the first RETRIEVAL_PROMPTS copy prompts.
Passes: model forward calls (prefill + decode steps). Time: `_harness.bench`, interleaved medians,
1 CPU thread. Max |difference|: the paper's numbers against the recipe's (NaN where both are NaN:
a Lookback row that ends at once has no ratio). Results: bench/results/<device>/recipe_costs.json, .png.
"""
from __future__ import annotations

import time

import torch

import _harness as H
import attnfx
from attnfx.analysis.factual_recall import encode
from attnfx.models.loader import load_default, load_prompts
from attnfx.recipes import decore, lookback, retrieval, sinks
from sinks import BATCH as SINK_BATCH, heldout_texts

PER_KIND, QUICK_PER_KIND = 32, 4                 # sinks: 4 kinds → 128 prompts
LOOKBACK_PROMPTS, QUICK_LOOKBACK_PROMPTS = 128, 16
LOOKBACK_BATCH, NEW_TOKENS = 64, 3               # bench/lookback.py's
RETRIEVAL_PROMPTS, QUICK_RETRIEVAL_PROMPTS = 100, 12   # bench/retrieval.py's held-out half is ~100
REPEATS, QUICK_REPEATS = H.CPU_REPEATS, 1         # a round of all six is ~2 s here: the harness default fits
FIRST = 1                                        # sink tokens


# ---- attention sinks --------------------------------------------------------------------------
@torch.no_grad()
def sinks_paper(model, tok, texts) -> tuple[torch.Tensor, int]:
    """[L, H] mean over prompts of the mean over queries of the mass on the first FIRST tokens."""
    total = 0
    for text in texts:
        ids = tok(text, return_tensors="pt")["input_ids"]
        attentions = model(input_ids=ids, output_attentions=True).attentions      # L × [1, H, t, t]
        total = total + torch.stack([a[0, :, :, :FIRST].sum(-1).mean(-1) for a in attentions]).double()
    return (total / len(texts)).float(), len(texts)


def sinks_attnfx(im, tok, texts) -> tuple[torch.Tensor, int]:
    found = sinks.sink_mass(im, texts, tok, first=FIRST, batch_size=SINK_BATCH, progress=False)
    return found, -(-len(texts) // SINK_BATCH)


# ---- Lookback Lens ----------------------------------------------------------------------------
@torch.no_grad()
def lookback_paper(model, tok, texts) -> tuple[torch.Tensor, int]:
    """[N, L, H] per prompt: the mean over decode steps of LR_j (generate stops at EOS, so every
    step it returns is one the recipe counts)."""
    rows, passes = [], 0
    for text in texts:
        ids = tok(text, return_tensors="pt")["input_ids"]
        width = ids.shape[1]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False, output_attentions=True, return_dict_in_generate=True,
                             pad_token_id=tok.pad_token_id)
        passes += len(out.attentions)
        steps = []
        for step in out.attentions[1:]:                                  # the prefill has no ratio
            last = torch.stack([a[0, :, -1] for a in step])              # [L, H, s]
            context, new = last[..., :width].mean(-1), last[..., width:].mean(-1)
            steps.append(context / (context + new))
        nan = torch.full((len(out.attentions[0]), model.config.n_head), float("nan"))
        rows.append(torch.stack(steps).mean(0) if steps else nan)
    return torch.stack(rows), passes


def lookback_attnfx(im, tok, texts) -> tuple[torch.Tensor, int]:
    rows, passes = [], 0
    for start in range(0, len(texts), LOOKBACK_BATCH):
        lens = lookback.lookback_ratios(im, encode(tok, texts[start:start + LOOKBACK_BATCH]),
                                        max_new_tokens=NEW_TOKENS)
        rows.append(lens.ratios)
        passes += lens.tokens.shape[1]                                   # prefill + decode steps
    return torch.cat(rows), passes


# ---- retrieval heads --------------------------------------------------------------------------
@torch.no_grad()
def retrieval_paper(model, prompts) -> tuple[torch.Tensor, int]:
    """[N, L, H] hits / k, Wu et al.'s loop: batch 1, greedy on the KV cache, the argmax of each head's
    last attention row. EOS is barred for the k steps, as the recipe's min_new_tokens=k does."""
    eos = model.generation_config.eos_token_id
    cache = decore.cache_argument(model)                                 # "cache" or "past_key_values"
    rows, passes = [], 0
    for p in prompts:
        k = p.end - p.start
        seq, past, feed = p.ids[None], None, p.ids[None]
        hits = torch.zeros(model.config.n_layer, model.config.n_head)
        for _ in range(k):
            out = model(input_ids=feed, use_cache=True, output_attentions=True, **{cache: past})
            passes += 1
            logits = out.logits[0, -1].clone()
            if eos is not None:
                logits[eos] = float("-inf")
            token = logits.argmax().view(1)
            index = torch.stack([a[0, :, -1].argmax(-1) for a in out.attentions])[None]   # [1, L, H]
            hits += retrieval.step_hits(index, seq, token, p.start, p.end)[0].float()
            seq, past, feed = torch.cat([seq, token[None]], 1), out[cache], token[None]
        rows.append(hits / k)
    return torch.stack(rows), passes


def retrieval_attnfx(im, prompts) -> tuple[torch.Tensor, int]:
    found = retrieval.retrieval_scores(im, prompts)
    passes = sum(prompts[rows[0]].end - prompts[rows[0]].start for rows in retrieval._batches(prompts, 64))
    return found.per_prompt, passes


# ---- the run ----------------------------------------------------------------------------------
def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b|, NaN only where both are NaN (inf where exactly one is)."""
    both = a.isnan() & b.isnan()
    if bool((a.isnan() ^ b.isnan()).any()):
        return float("inf")
    return float((a - b).abs().masked_fill(both, 0).max())


def measure(name: str, ours, theirs, repeats: int) -> dict:
    """One recipe: both ways once for the numbers and passes (also a warm-up), then timed together."""
    (mine, my_passes), (paper, paper_passes) = ours(), theirs()
    ms = H.bench({"attnfx": ours, "paper's way": theirs}, repeats=repeats)
    row = {"attnfx": {"passes": my_passes, "ms": ms["attnfx"]},
           "paper's way": {"passes": paper_passes, "ms": ms["paper's way"]},
           "speedup": ms["paper's way"] / ms["attnfx"], "max_abs_diff": max_diff(mine.float(), paper.float())}
    mine_ms, paper_ms = ms["attnfx"], ms["paper's way"]
    print(f"{name:<16} attnfx {my_passes:>4} passes {mine_ms:8.1f} ms | paper's way {paper_passes:>4} passes "
          f"{paper_ms:8.1f} ms | {row['speedup']:5.1f}× | max diff {row['max_abs_diff']:.1e}")
    return row


def main() -> None:
    args = H.parse_args(H.cli(__doc__.splitlines()[0]))
    begin = time.perf_counter()
    model, tok = load_default()
    paper_model, _ = load_default(attn_implementation="eager")
    im = attnfx.instrument(model)
    prompts = load_prompts()
    per_kind = QUICK_PER_KIND if args.quick else PER_KIND
    sink_texts = [t for texts in heldout_texts(prompts).values() for t in texts[:per_kind]]
    lookback_texts = [p["prompt"] for p in prompts["counterfactual"]][
        :QUICK_LOOKBACK_PROMPTS if args.quick else LOOKBACK_PROMPTS]
    copies = retrieval.copy_prompts(tok)[:QUICK_RETRIEVAL_PROMPTS if args.quick else RETRIEVAL_PROMPTS]
    repeats = QUICK_REPEATS if args.quick else REPEATS
    recipes = {
        "attention sinks": (len(sink_texts), lambda: sinks_attnfx(im, tok, sink_texts),
                            lambda: sinks_paper(paper_model, tok, sink_texts)),
        "Lookback Lens": (len(lookback_texts), lambda: lookback_attnfx(im, tok, lookback_texts),
                          lambda: lookback_paper(paper_model, tok, lookback_texts)),
        "retrieval heads": (len(copies), lambda: retrieval_attnfx(im, copies),
                            lambda: retrieval_paper(paper_model, copies)),
    }
    rows = {name: {"prompts": n, **measure(name, ours, theirs, repeats)} for name, (n, ours, theirs) in recipes.items()}
    wall = time.perf_counter() - begin
    path = H.write_json("recipe_costs" + ("_quick" if args.quick else ""), {
        "quick": args.quick, "model": "attnfx default model (GPT2LMHeadModel, 4 layers × 8 heads)",
        "backend": im.backend, "repeats": repeats, "paper_way": "bare HF model, attn_implementation='eager', batch 1, "
        "output_attentions=True", "settings": {"sinks_first": FIRST, "sinks_batch": SINK_BATCH,
                                               "lookback_batch": LOOKBACK_BATCH, "lookback_new_tokens": NEW_TOKENS},
        "recipes": rows, "wall_s": wall}, args.out)
    H.bar_plot(path.with_suffix(".png"), f"attnfx recipes vs the paper's way (eager, batch 1): {H.device_name()}",
               {f"{name} ({row['prompts']} prompts)": {way: row[way]["ms"] for way in ("attnfx", "paper's way")}
                for name, row in rows.items()},
               {f"{name} ({row['prompts']} prompts)": {way: f"{row[way]['passes']} passes\n{row[way]['ms']:.0f} ms"
                                                       for way in ("attnfx", "paper's way")}
                for name, row in rows.items()})
    print(f"wrote {path} ({wall:.0f} s)")


if __name__ == "__main__":
    main()
