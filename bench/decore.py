"""DeCoRe (Gema et al. 2024) on the default model's counterfactual prompts: the in-context answer
rate of greedy decoding, of DeCoRe masking the top-k retrieval heads (recipes.retrieval), and of
DeCoRe masking k random heads; and the cost of the batched recipe against the paper's loop (one
prompt at a time, two models' KV caches deep-copied), side by side in one run.
"""
from __future__ import annotations

import copy
import random
import time

import torch

import _harness
import attnfx
from attnfx.analysis import factual_recall
from attnfx.models.loader import load_default, load_prompts
from attnfx.recipes import decore, retrieval

KS = (2, 4, 8)
SEEDS = 5


def _rates(im, prompts, heads, batch_size: int) -> tuple[float, float]:
    """(in-context rate, memorised rate) of DeCoRe's first answer token."""
    ctx = mem = 0
    for batch, in_context, memorised in prompts.chunks(batch_size):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        first = decore.generate(im, inputs, heads, max_new_tokens=1).tokens[:, 0]
        ctx += int((first == in_context).sum())
        mem += int((first == memorised).sum())
    return ctx / len(prompts), mem / len(prompts)


def _paper_loop(model, ids, heads, steps):
    """The paper's code path: batch 1, a prefill then two models stepping on deep-copied caches."""
    width = model.config.n_embd // model.config.n_head

    def masking(on: bool):
        def pre(mod, args, layer):
            if not on:
                return None
            x = args[0].clone()
            for l, h in heads:
                if l == layer:
                    x[..., h * width:(h + 1) * width] = 0.0
            return (x,)
        return [block.attn.c_proj.register_forward_pre_hook(lambda m, a, l=l: pre(m, a, l))
                for l, block in enumerate(model.transformer.h)]

    name = decore.cache_argument(model)
    with torch.no_grad():
        prefill = model(input_ids=ids[:, :-1], use_cache=True)
        base_kv, masked_kv = copy.deepcopy(prefill[name]), copy.deepcopy(prefill[name])
        token, out = ids[:, -1:], []
        for _ in range(steps):
            base = model(input_ids=token, use_cache=True, **{name: base_kv})
            handles = masking(True)
            try:
                masked = model(input_ids=token, use_cache=True, **{name: masked_kv})
            finally:
                for handle in handles:
                    handle.remove()
            base_kv, masked_kv = base[name], masked[name]
            alpha = decore.entropy(base.logits[0, -1])
            token = ((1 + alpha) * base.logits[0, -1] - alpha * masked.logits[0, -1]).argmax().view(1, 1)
            out.append(int(token))
    return out


def main():
    parser = _harness.cli(__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    args = _harness.parse_args(parser)
    model, tok = load_default()
    im = attnfx.instrument(model)
    items = load_prompts()["counterfactual"][: 64 if args.quick else None]
    prompts = factual_recall.prepare(tok, items)
    base_rates = factual_recall.answer_rates(im, prompts)

    scores = retrieval.retrieval_scores(im, retrieval.copy_prompts(tok)).scores
    layers, heads = scores.shape
    every = [(l, h) for l in range(layers) for h in range(heads)]
    results = {"greedy": {"in_context": base_rates["in_context"], "memorised": base_rates["memorised"]}}
    for k in KS:
        top = retrieval.top_heads(scores, k)
        ctx, mem = _rates(im, prompts, top, args.batch_size)
        random_ctx = []
        for seed in range(SEEDS):
            ctx_r, _ = _rates(im, prompts, random.Random(seed).sample(every, k), args.batch_size)
            random_ctx.append(ctx_r)
        results[f"k={k}"] = {"heads": top, "in_context": ctx, "memorised": mem,
                             "random_in_context_mean": sum(random_ctx) / SEEDS,
                             "random_in_context": random_ctx}
        print(f"k={k}: retrieval heads {top} → in-context {ctx:.3f} (random heads {sum(random_ctx) / SEEDS:.3f})")

    # cost: the same prompts and heads, 8 tokens each, batched recipe vs the paper's per-prompt loop
    cost_items = prompts.texts[:8 if args.quick else 32]
    batch = tok(list(cost_items), return_tensors="pt", padding=True, padding_side="left")
    top = retrieval.top_heads(scores, 4)
    singles = [tok(t, return_tensors="pt")["input_ids"] for t in cost_items]
    decore.generate(im, batch, top, max_new_tokens=8)                                 # warm
    times = _harness.bench({
        f"attnfx recipe (batch {len(cost_items)})": lambda: decore.generate(im, batch, top, max_new_tokens=8),
        "paper's loop (batch 1, cache copies)": lambda: [_paper_loop(model, ids, top, 8) for ids in singles]},
        repeats=3)
    agree = sum(_paper_loop(model, ids, top, 8) == decore.generate(im, {"input_ids": ids}, top, max_new_tokens=8)
                .tokens[0].tolist() for ids in singles[:8])
    path = _harness.write_json("decore", {
        "prompts": len(prompts), "dropped": prompts.dropped, "retrieval_scores": scores.tolist(),
        "rates": results, "cost_prompts": len(cost_items), "cost_tokens": 8, "times_ms": times,
        "paper_loop_agrees_on_first_8": agree})
    _plot(path.with_suffix(".png"), results)
    print(path, times)


def _plot(path, results):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=120, layout="constrained")
    ax = fig.add_subplot()
    names = ["greedy"] + [f"k={k}" for k in KS]
    ax.bar([n + "\nretrieval" if n != "greedy" else n for n in names],
           [results[n]["in_context"] for n in names], color="C0", label="masking retrieval heads")
    ax.scatter([i for i in range(1, len(names))], [results[n]["random_in_context_mean"] for n in names[1:]],
               color="C1", zorder=3, label=f"masking k random heads (mean of {SEEDS})")
    ax.set_ylabel("in-context answer rate")
    ax.set_title("DeCoRe on the default model's counterfactual prompts")
    ax.legend()
    fig.savefig(path)


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"{time.perf_counter() - start:.0f} s")
