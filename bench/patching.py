"""Correlation study of issue 6: how well AtP, AtP* and RelP estimate exact activation patching,
and what each costs.

    python bench/patching.py [--quick] [--pairs N] [--qk-pairs N]

1. Correlation, on the embedded default model (4 layers × 8 heads, `attnfx.models.load_default`)
   and its three clean/corrupt tasks (bench/_patching_tasks.py: IOI with the S2 swap, IOI with
   the ABC corruption, capital recall; logit difference at the last position). For the residual
   stream entering each layer and the MLP output per (layer, position) and each head [L, H] (all
   positions at once) — plus, as extras, each layer's attention output per position and the
   queries / keys per (layer, head, position), where AtP*'s QK fix acts — it runs exact
   `activation_patching`, `attribution_patching` (AtP), `relp` (AttnLRP rules, attnfx's default,
   and CP-LRP) and `atp_star`, and reports the Pearson r of each estimate with the exact effects
   across components. AtP*'s `signed` (the QK-fixed AtP; plain AtP where there is no QK fix) is
   compared with the exact effects, its `scores` (GradDrop: mean over prompts of |estimate|) with
   |exact effect| (the mean over prompts, so for effects of mixed sign the two differ by design).
   Beside r over all components: r over the components whose activation differs between clean
   and corrupt runs (positions before the first changed token are exactly 0 for every method),
   r without the largest |exact| component, and the least-squares slope estimate ≈ slope · exact.
2. Cost, per method for all heads: forward/backward passes as each PatchingResult reports them,
   rows processed (forwards × batch rows) and median wall time (`_harness.bench`, 1 CPU thread),
   on the embedded model and on a larger random-weight GPT-2 (L × H heads), against the L·H/3
   speedup that RelP's 3 passes promise over one patched forward per head.

Results: bench/results/<device>/patching.json, patching_scatter.png (estimates vs exact),
patching_graddrop.png (AtP* scores vs |exact|), patching_cost.png (time and passes).
"""
from __future__ import annotations


import torch
from transformers import GPT2Config, GPT2LMHeadModel

import attnfx
import _harness as H
import _patching_tasks as tasks
from attnfx import metrics, patching
from attnfx.models import load_default
from attnfx.models.loader import load_prompts

COMPONENTS = {"resid": True, "heads": False, "mlp": True}     # the three: kind → per_position
EXTRAS = {"attn": True}                                         # each layer's attention output, per position
QK = {"queries": True, "keys": True}                            # per (layer, head, position), on fewer prompts
ESTIMATES = ("AtP", "AtP* signed", "RelP", "RelP (CP-LRP)")     # each vs the exact effect
GRADDROP = "AtP* GradDrop |·|"                                  # vs |exact effect|
# Rezaei Jafari et al. 2025 (RelP), GPT-2 small on IOI, Pearson r with activation patching.
REFERENCE = {"model": "GPT-2 small (12 layers × 12 heads), IOI", "source": "RelP paper (arXiv 2508.21258), table 1",
             "AtP": {"resid": 0.753, "attention": 0.979, "mlp": 0.195},
             "RelP": {"resid": 0.968, "attention": 0.962, "mlp": 0.992}}
PAPER_COLUMN = {"resid": "resid", "heads": "attention", "attn": "attention", "mlp": "mlp"}
# Timing models. 12 × 12 heads as GPT-2 small, head_dim 32 (d_model 384, not 768): exact patching
# of 144 heads takes ~25-30 s a call at d_model 384 on one shared core, ~70-100 s at 768 (measured).
BIG = dict(n_layer=12, n_head=12, n_embd=384, vocab_size=1000, n_positions=64)
QUICK_BIG = dict(n_layer=2, n_head=4, n_embd=32, vocab_size=100, n_positions=32)
BIG_SHAPE, QUICK_BIG_SHAPE = (8, 32), (2, 8)
EMBEDDED_TIMING_BATCH, QUICK_TIMING_BATCH = 32, 4
BIG_REPEATS, EMBEDDED_REPEATS, QUICK_REPEATS = 3, 7, 2   # exact patching of the big model is ~30 s a call
TARGET, FOIL = 5, 9                                       # the big model's logit difference (random weights)


# ---- statistics -----------------------------------------------------------------------------------
def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    if x.numel() < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


def compare(estimate: torch.Tensor, exact: torch.Tensor, differs: torch.Tensor) -> dict:
    """r over all components, over those whose activation differs, without the top |exact| one;
    the slope of estimate on exact (through 0)."""
    est, ex, mask = estimate.double().flatten(), exact.double().flatten(), differs.flatten()
    keep = torch.ones_like(mask)
    keep[ex.abs().argmax()] = False
    return {"r": pearson(est, ex), "r_differing": pearson(est[mask], ex[mask]),
            "r_without_top": pearson(est[keep], ex[keep]),
            "slope": float((est * ex).sum() / (ex * ex).sum().clamp_min(1e-30))}


def differing(im, task, kind: str, per_position: bool) -> torch.Tensor:
    """Components whose activation differs between the clean and the corrupt run for some prompt,
    laid out as the scores: [L, H] / [L, H, T] / [L] / [L, T]."""
    clean = patching.capture(im, task.clean, (kind,))[1][kind]             # [L, b, t(, H), d]
    corrupt = patching.capture(im, task.corrupt, (kind,))[1][kind]
    diff = (clean != corrupt).flatten(-1).any(-1).any(1)                    # [L, t(, H)]
    if kind in ("heads", "queries", "keys", "values"):
        return diff.transpose(1, 2) if per_position else diff.any(1)
    return diff if per_position else diff.any(1)


# ---- the correlation study --------------------------------------------------------------------------
def study(im, task, kind: str, per_position: bool) -> dict:
    metric = metrics.logit_diff(task.correct, task.incorrect)
    args = (im, task.clean, task.corrupt, metric, kind)
    exact = patching.activation_patching(*args, per_position=per_position, progress=False)
    star = patching.atp_star(*args, per_position=per_position)
    results = {"AtP": patching.attribution_patching(*args, per_position=per_position),
               "RelP": patching.relp(*args, per_position=per_position)}
    if kind not in QK:                              # CP-LRP detaches q and k: no coefficient there
        results["RelP (CP-LRP)"] = patching.relp(*args, per_position=per_position, rule="cp-lrp")
    estimates = {"AtP": results["AtP"].scores, "AtP* signed": star.signed,
                 **{name: r.scores for name, r in results.items() if name != "AtP"}}
    differs = differing(im, task, kind, per_position)
    stats = {name: compare(value, exact.scores, differs) for name, value in estimates.items()}
    stats[GRADDROP] = compare(star.scores, exact.scores.abs(), differs)
    passes = {name: (r.forwards, r.backwards) for name, r in [("exact", exact), ("AtP*", star), *results.items()]}
    return {"kind": kind, "per_position": per_position, "dims": exact.dims, "shape": list(exact.scores.shape),
            "n_components": exact.scores.numel(), "n_differing": int(differs.sum()), "passes": passes,
            "stats": stats, "exact": exact.scores.tolist(), "differs": differs.tolist(),
            "estimates": {name: value.tolist() for name, value in estimates.items()},
            GRADDROP: star.scores.tolist()}


def describe(im, task) -> dict:
    metric = metrics.logit_diff(task.correct, task.incorrect)
    with torch.no_grad():
        clean, corrupt = metric(im(**task.clean).logits), metric(im(**task.corrupt).logits)
    return {"clean_template": task.clean_template, "corrupt_template": task.corrupt_template,
            "metric": "logit[correct] − logit[incorrect] at the last position", "pairs": len(task),
            "dropped_for_length": task.dropped, "seq_len": task.clean["input_ids"].shape[1],
            "example": list(task.examples), "clean_metric_mean": float(clean.mean()),
            "corrupt_metric_mean": float(corrupt.mean()), "clean_correct_fraction": float((clean > 0).float().mean())}


def run_study(im, all_tasks, components: dict, qk_pairs: int) -> dict:
    out = {}
    for task in all_tasks:
        print(f"{task.name}: {len(task)} pairs", flush=True)
        rows = {kind: study(im, task, kind, pp) for kind, pp in components.items()}
        if qk_pairs:
            small = tasks.subset(task, qk_pairs)
            rows.update({kind: {**study(im, small, kind, pp), "pairs": len(small)} for kind, pp in QK.items()})
        out[task.name] = {**describe(im, task), "components": rows}
        print_rows(task.name, rows)
    return out


def print_rows(task: str, rows: dict) -> None:
    names = (*ESTIMATES, GRADDROP)
    print(f"\n{task}: Pearson r with exact activation patching — all components / differing only / "
          f"without the top one, and slope", flush=True)
    print(f"  {'component':<10} {'n (diff)':>9}  " + "  ".join(f"{n:>24}" for n in names))
    for kind, row in rows.items():
        cells = ["{r:+.3f} {r_differing:+.3f} {r_without_top:+.3f} {slope:4.2f}".format(**row["stats"][n])
                 if n in row["stats"] else "n/a" for n in names]
        print(f"  {kind:<10} {row['n_components']:>4} ({row['n_differing']:>3})  " + "  ".join(f"{c:>24}" for c in cells))


def print_reference(correlation: dict) -> None:
    """Our r (all components) beside the RelP paper's, which is another model (GPT-2 small)."""
    print(f"\nPearson r, ours (attnfx default model) vs {REFERENCE['model']} ({REFERENCE['source']}):")
    for task, result in correlation.items():
        for kind, row in result["components"].items():
            paper = PAPER_COLUMN.get(kind)
            ref = lambda m: f"{REFERENCE[m][paper]:.3f}" if paper and task == "ioi" else "  -  "   # noqa: E731
            print(f"  {task:<8} {kind:<8} AtP {row['stats']['AtP']['r']:+.3f} (paper {ref('AtP')})   "
                  f"RelP {row['stats']['RelP']['r']:+.3f} (paper {ref('RelP')})")


# ---- cost -----------------------------------------------------------------------------------------
BATCHED_ROWS = 256          # activation_patching's default rows_per_forward
SHORT = {"exact 1/fwd": "exact activation patching, one head per forward (rows_per_forward = batch)",
         "exact batched": f"exact activation patching, heads tiled into forwards of {BATCHED_ROWS} rows (the default)",
         "AtP": "attribution_patching", "RelP": "relp (AttnLRP)", "AtP*": "atp_star (GradDrop on)"}


def cost(im, clean: dict, corrupt: dict, metric, repeats: int) -> dict:
    """Median time, passes and rows of every method over all heads of `im` ([L, H], all positions)."""
    batch = clean["input_ids"].shape[0]
    heads = im.num_layers * im.sites[0].num_heads
    args = (im, clean, corrupt, metric, "heads")
    calls = {"exact 1/fwd": lambda: patching.activation_patching(*args, rows_per_forward=batch, progress=False),
             "exact batched": lambda: patching.activation_patching(*args, rows_per_forward=BATCHED_ROWS,
                                                                   progress=False),
             "AtP": lambda: patching.attribution_patching(*args), "RelP": lambda: patching.relp(*args),
             "AtP*": lambda: patching.atp_star(*args)}
    last = {}
    ms = H.bench({name: (lambda name=name, fn=fn: last.__setitem__(name, fn())) for name, fn in calls.items()},
                 repeats=repeats)
    tiles = {"exact 1/fwd": 1, "exact batched": max(1, min(heads, BATCHED_ROWS // batch))}
    methods = {}
    for name, result in last.items():
        # exact: 2 unpatched forwards of the batch, then each forward tiles the batch per head
        rows = batch * (2 + (result.forwards - 2) * tiles[name]) if name in tiles else batch * result.forwards
        methods[name] = {"what": SHORT[name], "ms": ms[name], "forwards": result.forwards,
                         "backwards": result.backwards, "forward_rows": rows,
                         "backward_rows": batch * result.backwards}
    relp = methods["RelP"]
    return {"layers": im.num_layers, "heads": im.sites[0].num_heads, "batch": batch,
            "seq": clean["input_ids"].shape[1], "repeats": repeats, "methods": methods,
            "expected_speedup_LH_over_3": heads / 3,
            "row_ratio": {name: methods[name]["forward_rows"] / (relp["forward_rows"] + relp["backward_rows"])
                          for name in tiles},
            "speedup_relp": {name: methods[name]["ms"] / relp["ms"] for name in tiles}}


def print_cost(label: str, result: dict) -> None:
    heads = result["layers"] * result["heads"]
    print(f"\ncost, {label}: {result['layers']} × {result['heads']} = {heads} heads, batch {result['batch']} × "
          f"{result['seq']} tokens, median of {result['repeats']}", flush=True)
    for name, m in result["methods"].items():
        print(f"  {name:<14} {m['ms']:10.1f} ms   {m['forwards']:>4} fwd ({m['forward_rows']:>5} rows)  "
              f"{m['backwards']:>3} bwd ({m['backward_rows']:>4} rows)")
    for name, speedup in result["speedup_relp"].items():
        print(f"  RelP speedup over {name}: {speedup:.1f}× (rows: exact forwards / RelP passes {result['row_ratio'][name]:.1f}×; "
              f"L·H/3 = {result['expected_speedup_LH_over_3']:.1f})")


def big_model(config: dict, shape: tuple[int, int]):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**config, bos_token_id=0, eos_token_id=0)).eval()
    clean, corrupt = torch.randint(0, config["vocab_size"], (2, *shape))
    return model, {"input_ids": clean}, {"input_ids": corrupt}


# ---- plots ----------------------------------------------------------------------------------------
def _panels(path, correlation: dict, title: str, axis_labels: tuple[str, str], draw) -> None:
    """One panel per task × component: draw(ax, component) scatters and returns the x values; a
    dashed y = x beside them."""
    from matplotlib.figure import Figure

    kinds = list(next(iter(correlation.values()))["components"])
    fig = Figure(figsize=(3.0 * len(kinds), 2.9 * len(correlation)), dpi=110, layout="constrained")
    axes = fig.subplots(len(correlation), len(kinds), squeeze=False)
    for row, (task, result) in zip(axes, correlation.items()):
        for ax, kind in zip(row, kinds):
            comp = result["components"][kind]
            x = draw(ax, comp)
            lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
            ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8, ls="--")
            ax.set_title(f"{task}: {kind} ({comp['n_components']})", fontsize=8)
            ax.legend(fontsize=5.5, loc="upper left")
            ax.set_xlabel(axis_labels[0], fontsize=7)
            ax.tick_params(labelsize=6)
    axes[0][0].set_ylabel(axis_labels[1], fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path)


def scatter(path, correlation: dict, title: str) -> None:
    """Each estimate against the exact effect, with r."""
    markers = dict(zip(ESTIMATES, ("o", "x", "s", "^")))

    def draw(ax, comp):
        exact = torch.tensor(comp["exact"]).flatten()
        for name in (n for n in ESTIMATES if n in comp["estimates"]):
            ax.scatter(exact, torch.tensor(comp["estimates"][name]).flatten(), s=12, marker=markers[name],
                       alpha=0.6, label=f"{name} r={comp['stats'][name]['r']:.3f}")
        return exact
    _panels(path, correlation, title, ("exact effect", "estimate"), draw)


def graddrop_scatter(path, correlation: dict, title: str) -> None:
    """AtP*'s GradDrop scores (mean over prompts of |estimate|) against |exact effect|."""
    def draw(ax, comp):
        exact = torch.tensor(comp["exact"]).flatten().abs()
        ax.scatter(exact, torch.tensor(comp[GRADDROP]).flatten(), s=12, alpha=0.6, color="C4",
                   label=f"r={comp['stats'][GRADDROP]['r']:.3f}")
        return exact
    _panels(path, correlation, title, ("|exact effect|", "AtP* GradDrop score"), draw)


def cost_plot(path, costs: dict) -> None:
    short = lambda name: name.replace(" ", "\n")                                  # noqa: E731  (tick labels)
    times = {label: {short(n): m["ms"] for n, m in c["methods"].items()} for label, c in costs.items()}
    notes = {label: {short(n): f"{m['ms']:.0f} ms\n{m['forwards']}F {m['backwards']}B"
                     for n, m in c["methods"].items()} for label, c in costs.items()}
    H.bar_plot(path, f"patching all heads: median time, forward (F) / backward (B) passes; {H.device_name()}",
               times, notes)


# ---- main -----------------------------------------------------------------------------------------
def main() -> None:
    parser = H.cli(__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=None, help="prompt pairs per task (default 400; quick 8)")
    parser.add_argument("--qk-pairs", type=int, default=None,
                        help="pairs for the queries/keys extra (default 100; quick 0 = skip)")
    args = H.parse_args(parser)
    pairs = args.pairs or (8 if args.quick else 400)
    qk_pairs = args.qk_pairs if args.qk_pairs is not None else (0 if args.quick else 100)
    model, tok = load_default()
    prompts = load_prompts()
    all_tasks = [*tasks.ioi_tasks(tok, prompts, pairs), tasks.factual_task(tok, prompts, pairs)]
    im = attnfx.instrument(model)
    correlation = run_study(im, all_tasks, COMPONENTS if args.quick else {**COMPONENTS, **EXTRAS}, qk_pairs)
    print_reference(correlation)

    ioi = all_tasks[0]
    timing = tasks.subset(ioi, QUICK_TIMING_BATCH if args.quick else EMBEDDED_TIMING_BATCH)
    costs = {"embedded 4×8": cost(im, timing.clean, timing.corrupt,
                                  metrics.logit_diff(timing.correct, timing.incorrect),
                                  QUICK_REPEATS if args.quick else EMBEDDED_REPEATS)}
    config = QUICK_BIG if args.quick else BIG
    big, clean, corrupt = big_model(config, QUICK_BIG_SHAPE if args.quick else BIG_SHAPE)
    label = f"random {config['n_layer']}×{config['n_head']}"
    costs[label] = cost(attnfx.instrument(big), clean, corrupt, metrics.logit_diff(TARGET, FOIL),
                        QUICK_REPEATS if args.quick else BIG_REPEATS)
    for name, result in costs.items():
        print_cost(name, result)

    embedded = {"name": "attnfx default model (GPT2LMHeadModel, 4 layers × 8 heads, d_model 128, "
                        "trained on attnfx's synthetic world)", "backend": im.backend}
    path = H.write_json("patching", {
        "quick": args.quick, "model": embedded, "reference": REFERENCE, "correlation": correlation,
        "cost": {name: {**c, "model": (config if name == label else "embedded")} for name, c in costs.items()},
    }, args.out)
    title = f"attnfx default model (4 × 8 heads): estimates vs exact activation patching, {H.device_name()}"
    scatter(path.with_name("patching_scatter.png"), correlation, title)
    graddrop_scatter(path.with_name("patching_graddrop.png"), correlation, title)
    cost_plot(path.with_name("patching_cost.png"), costs)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
