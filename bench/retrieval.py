"""Retrieval heads (Wu et al. 2024) of the default model (issue 16): recipes.retrieval scores on half
of its held-out copy prompts ("w1 … wk |" → "w1 … wk"), then the paper's experiment on the other
half: zero-ablate the top-k retrieval heads vs k random other heads (SEEDS draws) and report copy
exact match for k in KS. Then the cost: attnfx (q/k records + attention_argmax) against reading the
argmax off explicit patterns (rec["pattern"]) on the same prompts, and the op alone against the
reference, which materialises the [b, H, T, S] scores, over S (T = S, causal; one head group of
GPT-2 small's shape).

Time: the harness timer (median). Peak: CPU — VmHWM − VmRSS around one call (reset through
/proc/self/clear_refs), glibc's mmap threshold pinned at 64 KiB from the start (bench/sinks.py's
method); CUDA — max_memory_allocated above the start.

    python bench/retrieval.py [--quick] [--backend eager]
"""
from __future__ import annotations

import os
import random
import statistics
import sys
from pathlib import Path

import torch

import attnfx
from _harness import bench, cli, parse_args, peak_mib, write_json
from attnfx.models.loader import load_default, load_prompts
from attnfx.ops import attention_argmax, reference
from attnfx.recipes import retrieval

KS = (0, 2, 4, 8)
SEEDS = 5                        # random-head draws per k
REPEATS = 3                      # each provider runs a whole prompt set: seconds per round
OP_LENGTHS, QUICK_OP_LENGTHS = (1024, 2048, 4096), (256, 512)
OP_SHAPE = dict(b=1, heads=12, d=64)                             # GPT-2 small's attention
PINNED_MMAP_THRESHOLD = "65536"


def ablation(im, prompts, top: list, k: int, seed: int | None) -> float:
    """Copy exact match with k heads zero-ablated: the top k (seed None) or k random non-top-k heads."""
    heads = top[:k]
    if seed is not None:
        pool = [(l, h) for l, site in enumerate(im.sites) for h in range(site.num_heads) if (l, h) not in heads]
        heads = random.Random(seed).sample(pool, k)
    with im.steering.restoring():
        for layer, head in heads:
            im.steering.ablate(layer, head)
        return retrieval.copy_accuracy(im, prompts)


def pattern_scores(im, prompts) -> torch.Tensor:
    """[N, L, H] hits / k from explicit patterns: the recipe's definition with the T × S matrix."""
    out = torch.zeros(len(prompts), len(im.sites), im.sites[0].num_heads)
    for rows in retrieval._batches(prompts, 64):
        p, ids = prompts[rows[0]], torch.stack([prompts[r].ids for r in rows])
        with torch.no_grad(), im.record("pattern") as rec:
            seq = retrieval._greedy(im, ids, p.end - p.start)
        for i, call in enumerate(rec.calls):
            token = seq[:, ids.shape[1] + i]
            for layer, pattern in enumerate(call["pattern"]):
                index = pattern[:, :, -1].argmax(-1)                   # [b, H]: the most attended key
                out[rows, layer] += retrieval.step_hits(index, seq, token, p.start, p.end).float()
        out[rows] /= p.end - p.start
    return out


def op_sweep(lengths) -> list[dict]:
    found = []
    for s in lengths:
        g = torch.Generator().manual_seed(s)
        q, k = (torch.randn(OP_SHAPE["b"], OP_SHAPE["heads"], s, OP_SHAPE["d"], generator=g) for _ in range(2))
        scale = OP_SHAPE["d"] ** -0.5
        fns = {"attention_argmax": lambda: torch.ops.attnfx.attention_argmax(q, k, None, True, scale),
               "reference (T×S)": lambda: reference.attention_argmax(q, k, causal=True, sm_scale=scale)}
        (i_op, p_op), (i_ref, p_ref) = fns["attention_argmax"](), fns["reference (T×S)"]()
        found.append({"S": s, "time_ms": bench(fns, repeats=REPEATS),
                      "peak_mib": {name: peak_mib(fn) for name, fn in fns.items()},
                      "index_agreement": float((i_op == i_ref).float().mean()),
                      "max_prob_max_abs_diff": float((p_op - p_ref).abs().max())})
    return found


def plot(path: Path, result: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    scores = torch.tensor(result["scores"])
    image = axes[0].imshow(scores, cmap="viridis", vmin=0)
    axes[0].set(xlabel="head", ylabel="layer", title=f"retrieval score ({result['detect_prompts']} copy prompts)")
    fig.colorbar(image, ax=axes[0])
    acc = result["ablation"]
    axes[1].plot(KS, [acc["top"][str(k)] for k in KS], "o-", color="C3", label="top-k retrieval heads ablated")
    rand = [acc["random"][str(k)] for k in KS]
    axes[1].errorbar(KS, [r["mean"] for r in rand], [r["std"] for r in rand], fmt="s--", color="C0", capsize=3,
                     label=f"k random other heads ({SEEDS} draws, ±sd)")
    axes[1].set(xlabel="heads ablated (k)", ylabel="copy exact match", ylim=(0, 1), xticks=list(KS),
                title=f"{result['eval_prompts']} held-out copy prompts")
    axes[1].legend(fontsize=8)
    sweep = result["cost"]["op_sweep"]
    for i, name in enumerate(sweep[0]["peak_mib"]):
        axes[2].plot([r["S"] for r in sweep], [r["peak_mib"][name] for r in sweep], "o-", color=f"C{i}",
                     label=f"{name}: peak")
    axes[2].set(xscale="log", yscale="log", xlabel="T = S", ylabel="peak MiB",
                title=f"argmax of every query, b·H = {OP_SHAPE['b'] * OP_SHAPE['heads']}, d = {OP_SHAPE['d']}")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    if not torch.cuda.is_available() and os.environ.get("MALLOC_MMAP_THRESHOLD_") != PINNED_MMAP_THRESHOLD:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": PINNED_MMAP_THRESHOLD}     # from the start: see above
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    parser = cli(__doc__.splitlines()[0])
    parser.add_argument("--backend", default="eager", help="attnfx.instrument backend (eager: no Inductor compile "
                        "per prompt shape on CPU)")
    args = parse_args(parser)
    model, tok = load_default("cuda" if torch.cuda.is_available() else "cpu")
    im = attnfx.instrument(model, backend=args.backend)
    prompts = retrieval.copy_prompts(tok)
    detect, held_out = prompts[:len(prompts) // 2], prompts[len(prompts) // 2:]
    if args.quick:
        detect, held_out = detect[:24], held_out[:24]
    found = retrieval.retrieval_scores(im, detect)
    top = retrieval.top_heads(found.scores, max(KS))
    random_acc = {k: [ablation(im, held_out, top, k, seed) for seed in range(SEEDS)] for k in KS}
    result = {
        "backend": args.backend, "detect_prompts": len(detect), "eval_prompts": len(held_out),
        "scores": found.scores.tolist(), "top_heads": [list(h) for h in top],
        "detect_copy_exact_match": float(found.copied.float().mean()),
        "ablation": {"top": {str(k): ablation(im, held_out, top, k, None) for k in KS},
                     "random": {str(k): {"mean": statistics.mean(v), "std": statistics.pstdev(v), "per_seed": v}
                                for k, v in random_acc.items()}},
    }
    fns = {"attnfx (q, k + attention_argmax)": lambda: retrieval.retrieval_scores(im, held_out),
           "explicit patterns": lambda: pattern_scores(im, held_out)}
    ours, theirs = fns["attnfx (q, k + attention_argmax)"]().per_prompt, fns["explicit patterns"]()
    with torch.no_grad():
        result["cost"] = {"copy_set": {"prompts": len(held_out), "scores_equal": bool(torch.equal(ours, theirs)),
                                       "time_ms": bench(fns, repeats=1 if args.quick else REPEATS),
                                       "peak_mib": {name: peak_mib(fn) for name, fn in fns.items()}},
                          "op_sweep": op_sweep(QUICK_OP_LENGTHS if args.quick else OP_LENGTHS)}
    path = write_json("retrieval" + ("_quick" if args.quick else ""), result, args.out)
    plot(path.with_suffix(".png"), result)
    print(path)
    print({k: v for k, v in result.items() if k not in ("scores",)})


if __name__ == "__main__":
    main()
