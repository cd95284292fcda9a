"""Lookback Lens (Chuang et al. 2024) on the default model's counterfactual prompts ("the capital of
X is Y . the capital of X is"): does the greedy answer ignore the context? Label 1: the memorised
capital, 0: the in-context city Y (answers that are neither are dropped). Features per prompt: the
[L·H] lookback ratios of recipes.lookback (from attention_stats during generate), against a
baseline on the per-head attention entropy at the same steps (from explicit patterns recorded
during a second, identical generate, which also checks the ratios). Both detectors: logistic
regression in torch, held-out AUROC over SPLITS random 70/30 splits. The paper reports ~0.85.

    python bench/lookback.py [--quick] [--new-tokens 3]
"""
from __future__ import annotations

import statistics
import time

import torch

import attnfx
from _harness import cli, parse_args, write_json
from attnfx import recipes
from attnfx.analysis.factual_recall import answer_token, encode
from attnfx.models.loader import load_default, load_prompts

lookback = recipes.lookback
BATCH = 64                   # prompts per generate
NEW_TOKENS = 3               # "Y . <eos>": decode steps 1-2 carry ratios (the first token has none)
SPLITS = 10                  # random train/test splits (seeds 0 … 9)
TRAIN_FRACTION = 0.7
PAPER_AUROC = 0.85


def features(im, tok, items, new_tokens: int) -> dict:
    """Per prompt: lookback ratios [L, H], entropies [L, H], the first generated token; and the
    seconds of both generates over every batch but the first (which compiles both graphs)."""
    out = {"ratios": [], "entropy": [], "answer": [], "stats_s": 0.0, "pattern_s": 0.0, "max_abs_diff": 0.0}
    eos = im.model.generation_config.eos_token_id
    for start in range(0, len(items), BATCH):
        encoding = encode(tok, [item["prompt"] for item in items[start:start + BATCH]])
        begin = time.perf_counter()
        lens = lookback.lookback_ratios(im, encoding, max_new_tokens=new_tokens)
        out["stats_s"] += (time.perf_counter() - begin) * (start > 0)
        begin = time.perf_counter()
        with torch.no_grad(), im.record("pattern") as rec:
            generated = im.generate(input_ids=encoding["input_ids"], attention_mask=encoding["attention_mask"],
                                    max_new_tokens=new_tokens, do_sample=False)
        patterns = [call["pattern"] for call in rec.calls]
        reference = lookback.from_patterns(patterns, encoding["attention_mask"],
                                           generated[:, encoding["input_ids"].shape[1]:], eos)
        entropy = lookback.step_entropy(patterns, reference.valid)
        out["pattern_s"] += (time.perf_counter() - begin) * (start > 0)
        diff = (lens.ratios - reference.ratios).abs().nan_to_num(0).max()
        out["max_abs_diff"] = max(out["max_abs_diff"], float(diff))
        out["ratios"].append(lens.ratios)
        out["entropy"].append(entropy)
        out["answer"].append(lens.tokens[:, 0])
    return {k: torch.cat(v) if isinstance(v, list) else v for k, v in out.items()}


def splits(x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """Held-out AUROC of a detector fit on each random split; test scores kept for the ROC plot."""
    found = []
    for seed in range(SPLITS):
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        cut = int(TRAIN_FRACTION * len(y))
        train, test = order[:cut], order[cut:]
        detector = lookback.fit_logistic(x[train], y[train])
        scores = detector.score(x[test])
        found.append({"seed": seed, "auroc": lookback.auroc(scores, y[test]), "scores": scores, "labels": y[test]})
    return found


def _summary(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values), "per_split": values}


def plot(path, runs: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    for i, (name, found) in enumerate(runs.items()):
        scores, labels = torch.cat([f["scores"] for f in found]), torch.cat([f["labels"] for f in found])
        fpr, tpr = lookback.roc_curve(scores, labels)
        mean = statistics.mean(f["auroc"] for f in found)
        ax.plot(fpr, tpr, color=f"C{i}", label=f"{name} (held-out AUROC {mean:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"answer ignores the context: ROC, test rows of {SPLITS} splits pooled", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = cli(__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="max_new_tokens of generate")
    args = parse_args(parser)
    start = time.perf_counter()
    model, tok = load_default()
    im = attnfx.instrument(model)
    items = load_prompts()["counterfactual"][:BATCH * 2 if args.quick else None]
    found = features(im, tok, items, args.new_tokens)
    in_context = torch.tensor([answer_token(tok, item["in_context"]) for item in items])
    memorised = torch.tensor([answer_token(tok, item["memorised"]) for item in items])
    answered = (found["answer"] == in_context) | (found["answer"] == memorised)
    kept = answered & ~found["ratios"].isnan().flatten(1).any(1)          # a row ending at once has no ratio
    y = (found["answer"] == memorised)[kept].double()
    x = {"lookback ratio": found["ratios"][kept].flatten(1), "attention entropy": found["entropy"][kept].flatten(1)}
    runs = {name: splits(part, y) for name, part in x.items()}
    single = torch.tensor([lookback.auroc(column, y) for column in x["lookback ratio"].T])
    best = (single - 0.5).abs().topk(3).indices
    heads = model.config.n_head
    result = {
        "prompts": len(items), "kept": int(kept.sum()), "memorised": int(y.sum()), "in_context": int((1 - y).sum()),
        "new_tokens": args.new_tokens, "splits": SPLITS, "train_fraction": TRAIN_FRACTION, "paper_auroc": PAPER_AUROC,
        "auroc": {name: _summary([f["auroc"] for f in part]) for name, part in runs.items()},
        "best_single_heads": [{"layer": int(i) // heads, "head": int(i) % heads, "auroc": float(single[i])}
                              for i in best],
        "ratio_max_abs_diff_vs_pattern": found["max_abs_diff"],
        "warm_generate_s": {"attention_stats": found["stats_s"], "pattern": found["pattern_s"]},
    }
    result["wall_s"] = time.perf_counter() - start
    path = write_json("lookback" + ("_quick" if args.quick else ""), result, args.out)
    plot(path.with_suffix(".png"), runs)
    print(path)
    print({k: v for k, v in result.items() if k != "auroc"})
    print({name: (round(v["mean"], 3), round(v["std"], 3)) for name, v in result["auroc"].items()})


if __name__ == "__main__":
    main()
