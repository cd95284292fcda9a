"""The `attnfx` command.

    attnfx demo [--out DIR] [--seed N] [--device D] [--backend B]

`demo` runs the main example end to end: instrument a model, rank heads by direct logit
attribution, sweep the top head's value scale at runtime (no recompilation), and generate
with the head steered. Until attnfx ships its own trained model it runs on a small GPT-2
with seeded *random* weights, so the numbers show the mechanics, not interpretable heads.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

SWEEP_SCALES = (-2.0, -1.0, 0.0, 0.5, 1.0, 2.0, 4.0, 10.0)
GENERATE_SCALE = 10.0             # the sweep's largest factor: the clearest effect on the text
PROMPTS, PROMPT_LEN = 16, 24      # small enough for a 2-core CPU, large enough to average over
GEN_PROMPTS, GEN_TOKENS = 2, 8
TOP_K = 5
MODEL_CONFIG = dict(n_layer=4, n_head=8, n_embd=256, vocab_size=512, n_positions=128)


# ---- the demo's steps ---------------------------------------------------------------------
def _build_model(seed: int, device: str):
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(**MODEL_CONFIG, bos_token_id=None, eos_token_id=None,
                                     attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(config).to(device).eval()
    description = {
        "family": "GPT-2 (transformers.GPT2LMHeadModel)", **MODEL_CONFIG,
        "attn_implementation": "sdpa", "parameters": sum(p.numel() for p in model.parameters()),
        "weights": f"random initialisation (torch.manual_seed({seed})), untrained",
    }
    return model, description


def _prompts(seed: int, vocab: int, batch: int, length: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, vocab, (batch, length), generator=generator).to(device)


def _logit_diff(logits: torch.Tensor, target: int, foil: int) -> float:
    """Mean over the batch of logit[target] − logit[foil] at the last position."""
    last = logits[:, -1].float()
    return float((last[:, target] - last[:, foil]).mean())


def _pick_tokens(logits: torch.Tensor) -> tuple[int, int]:
    """Target / foil: the tokens with the highest and second highest mean last-position logit."""
    top = logits[:, -1].float().mean(dim=0).topk(2).indices.tolist()
    return int(top[0]), int(top[1])


def _top_heads(dla: torch.Tensor, k: int) -> list[dict]:
    heads = dla.shape[1]
    order = dla.abs().flatten().argsort(descending=True)[:k].tolist()
    return [{"rank": r + 1, "layer": i // heads, "head": i % heads, "dla": float(dla.flatten()[i])}
            for r, i in enumerate(order)]


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["attnfx"]["graphs_compiled"])


@torch.no_grad()
def _sweep(im, ids, layer: int, kv_head: int, target: int, foil: int, baseline: torch.Tensor) -> dict:
    """Runtime value-scale sweep of one kv head; counts the graphs compiled meanwhile."""
    from tqdm import tqdm

    points, before, began = [], _graphs_compiled(), time.perf_counter()
    identity_logits = None
    try:
        for scale in tqdm(SWEEP_SCALES, desc=f"value scale L{layer} kv{kv_head}", unit="scale"):
            start = time.perf_counter()
            im.steering.scale(layer, kv_head, scale, on="value_unbiased")
            logits = im(input_ids=ids).logits
            points.append({"scale": scale, "logit_diff": _logit_diff(logits, target, foil),
                           "seconds": time.perf_counter() - start})
            if scale == 1.0:
                identity_logits = logits
    finally:
        im.steering.reset()
    return {
        "layer": layer, "kv_head": kv_head, "on": "value_unbiased", "points": points,
        "recompiles": _graphs_compiled() - before, "seconds": round(time.perf_counter() - began, 3),
        "scale_1_bitwise_equal_to_baseline": bool(torch.equal(identity_logits, baseline)),
        "scale_1_max_abs_diff": float((identity_logits - baseline).abs().max()),
    }


@torch.no_grad()
def _generate(im, prompts: torch.Tensor, layer: int, kv_head: int) -> dict:
    """Greedy continuations, unsteered and with the head's value scaled by GENERATE_SCALE."""
    kwargs = dict(attention_mask=torch.ones_like(prompts), max_new_tokens=GEN_TOKENS,
                  do_sample=False, pad_token_id=0)
    im.steering.reset()
    plain = im.generate(prompts, **kwargs)[:, prompts.shape[1]:]
    im.steering.scale(layer, kv_head, GENERATE_SCALE, on="value_unbiased")
    try:
        steered = im.generate(prompts, **kwargs)[:, prompts.shape[1]:]
    finally:
        im.steering.reset()
    return {"layer": layer, "kv_head": kv_head, "on": "value_unbiased", "factor": GENERATE_SCALE,
            "max_new_tokens": GEN_TOKENS, "unsteered": plain.tolist(), "steered": steered.tolist(),
            "tokens_changed": int((plain != steered).sum())}


# ---- printing -----------------------------------------------------------------------------
def _table(header: tuple, rows: list[tuple]) -> str:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join("  " + line for line in lines)


def _print_heads(top: list[dict]) -> None:
    print(_table(("rank", "layer", "head", "DLA"),
                 [(t["rank"], t["layer"], t["head"], f"{t['dla']:+.4f}") for t in top]))


def _print_sweep(sweep: dict, baseline: float) -> None:
    rows = [(f"{p['scale']:g}", f"{p['logit_diff']:+.4f}", f"{p['logit_diff'] - baseline:+.4f}",
             f"{1000 * p['seconds']:.0f}") for p in sweep["points"]]
    print(_table(("scale", "logit diff", "Δ vs unsteered", "ms"), rows))


def _print_generation(gen: dict) -> None:
    for i, (a, b) in enumerate(zip(gen["unsteered"], gen["steered"])):
        print(f"  prompt {i}  unsteered: {' '.join(map(str, a))}")
        print(f"  prompt {i}  steered:   {' '.join(map(str, b))}")
    print(f"  {gen['tokens_changed']} of {len(gen['unsteered']) * gen['max_new_tokens']} "
          "generated tokens changed")


def _demo_plots(out: Path, dla, top: dict, sweep: dict, baseline: float, tokens: tuple) -> list[str]:
    from . import viz

    what = f"logit[{tokens[0]}] − logit[{tokens[1]}] at the last position"
    heat = viz.head_heatmap(dla, out / "dla_heatmap.png", mark=(top["layer"], top["head"]),
                            title=f"Direct logit attribution, random-weight GPT-2 (untrained)\n{what}",
                            label="DLA (mean over prompts)")
    curve = viz.sweep_curve([p["scale"] for p in sweep["points"]],
                            [p["logit_diff"] for p in sweep["points"]], out / "value_sweep.png",
                            title=f"Value scale (bias-free) of L{sweep['layer']} kv head {sweep['kv_head']}, "
                                  "random-weight GPT-2", xlabel="value scale α",
                            ylabel=f"mean logit[{tokens[0]}] − logit[{tokens[1]}]", baseline=baseline)
    return [heat.name, curve.name]


# ---- the command --------------------------------------------------------------------------
class _Laps:
    """Wall-clock seconds of each phase of the demo."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.last, 3)
        self.last = now

    def total(self) -> float:
        self.seconds["total"] = round(time.perf_counter() - self.start, 3)
        return self.seconds["total"]


def _attribute(im, ids, seed: int) -> dict:
    """Baseline logits, target / foil tokens, and the DLA ranking of every head."""
    import attnfx

    with torch.no_grad():
        logits = im(input_ids=ids).logits
    target, foil = _pick_tokens(logits)
    baseline = _logit_diff(logits, target, foil)
    print(f"Prompts: {ids.shape[0]} × {ids.shape[1]} uniformly random token ids (seed {seed}).")
    print(f"Target token {target} / foil token {foil}: highest / second highest mean logit at the last "
          f"position.\nUnsteered mean logit difference: {baseline:+.4f}\n")
    dla = attnfx.head_attribution(im, {"input_ids": ids}, target=target, foil=foil, position=-1, reduce="mean")
    top = _top_heads(dla, TOP_K)
    print(f"Heads ranked by |direct logit attribution| of logit[{target}] − logit[{foil}] (sum over all "
          f"heads {float(dla.sum()):+.4f}; the rest comes from embeddings, MLPs and biases):")
    _print_heads(top)
    return {"logits": logits, "target": target, "foil": foil, "baseline": baseline, "dla": dla, "top": top}


def _steer(im, ids, attr: dict) -> tuple[dict, dict]:
    """Sweep the top head's value scale, then generate with it steered."""
    site = im.sites[attr["top"][0]["layer"]]
    head = attr["top"][0]["head"]
    kv_head = head // (site.num_heads // site.num_kv_heads)
    print(f"\nSweeping the value scale of layer {site.layer} kv head {kv_head} (query head {head}), "
          "bias-free form α·A·x·W_V + b_V, at runtime:")
    sweep = _sweep(im, ids, site.layer, kv_head, attr["target"], attr["foil"], attr["logits"])
    _print_sweep(sweep, attr["baseline"])
    print(f"  graphs compiled during the sweep: {sweep['recompiles']}   scale 1 bit-identical to unsteered: "
          f"{sweep['scale_1_bitwise_equal_to_baseline']} (max |Δ logit| {sweep['scale_1_max_abs_diff']:.1e})\n")
    print(f"Greedy generation, {GEN_TOKENS} new tokens, value scale {GENERATE_SCALE:g} vs unsteered "
          "(random weights: expect repetitive token ids):")
    gen = _generate(im, ids[:GEN_PROMPTS], site.layer, kv_head)
    _print_generation(gen)
    return sweep, gen


def _report(args, im, description: dict, attr: dict, sweep: dict, gen: dict, laps: _Laps, plots) -> dict:
    import transformers

    import attnfx

    return {
        "attnfx": attnfx.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "device": args.device,
        "backend": args.backend or ("inductor" if args.device.startswith("cuda") else "eager"),
        "seed": args.seed, "model": description, "sites": [asdict(s) for s in im.sites],
        "prompts": {"batch": PROMPTS, "length": PROMPT_LEN, "tokens": "uniform random ids"},
        "target": {"token": attr["target"], "rule": "highest mean logit at the last position"},
        "foil": {"token": attr["foil"], "rule": "second highest mean logit at the last position"},
        "baseline_logit_diff": attr["baseline"], "dla": attr["dla"].tolist(), "top_heads": attr["top"],
        "sweep": sweep, "recompiles_during_sweep": sweep["recompiles"], "generation": gen,
        "timing_s": laps.seconds, "plots": plots,
    }


def demo(args) -> int:
    import attnfx

    out, laps = Path(args.out), _Laps()
    print("attnfx demo — NOTE: the model has random (seeded) weights; attnfx's trained model comes "
          "in a later release.\nThe numbers below show the mechanics (attribution, runtime steering, "
          "no recompiles), not interpretable heads.\n")
    model, description = _build_model(args.seed, args.device)
    ids = _prompts(args.seed, model.config.vocab_size, PROMPTS, PROMPT_LEN, args.device)
    laps("build_model")
    im = attnfx.instrument(model, backend=args.backend)
    laps("instrument")
    print(f"Model: {description['family']}, {MODEL_CONFIG['n_layer']} layers × {MODEL_CONFIG['n_head']} "
          f"heads, d_model {MODEL_CONFIG['n_embd']}, {description['parameters']:,} parameters, random weights")
    print(f"{im}\n")
    attr = _attribute(im, ids, args.seed)
    laps("attribution")
    sweep, gen = _steer(im, ids, attr)
    laps("sweep_and_generate")
    out.mkdir(parents=True, exist_ok=True)
    plots = _demo_plots(out, attr["dla"], attr["top"][0], sweep, attr["baseline"], (attr["target"], attr["foil"]))
    laps("plots")
    laps.total()
    report = _report(args, im, description, attr, sweep, gen, laps, plots)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nWrote {out / 'report.json'}, {', '.join(str(out / p) for p in plots)}  "
          f"({laps.seconds['total']:.1f} s in all)")
    return _check(sweep)


def _check(sweep: dict) -> int:
    """The demo doubles as a smoke test of two invariants (DESIGN §6)."""
    problems = []
    if sweep["recompiles"] != 0:
        problems.append(f"{sweep['recompiles']} graph(s) compiled while only steering values changed")
    if not sweep["scale_1_bitwise_equal_to_baseline"]:
        problems.append("scale 1 did not reproduce the unsteered logits exactly")
    for problem in problems:
        print(f"attnfx demo: FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnfx", description="Record, attribute and steer attention heads inside torch.compile graphs.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo_cmd = commands.add_parser(
        "demo", help="run the main example (attribution, runtime steering sweep, generation)",
        description="Instrument a small GPT-2 (random seeded weights, for now), rank heads by direct "
                    "logit attribution, sweep the top head's value scale without recompiling, and "
                    "generate with it steered. Writes report.json and two PNG plots.")
    demo_cmd.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    demo_cmd.add_argument("--seed", type=int, default=0, help="seed of weights and prompts (default: 0)")
    demo_cmd.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    demo_cmd.add_argument("--backend", choices=("eager", "aot_eager", "inductor"), default=None,
                          help="attnfx backend (default: inductor on CUDA, eager on CPU)")
    demo_cmd.set_defaults(run=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import AttnfxError

    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except AttnfxError as error:
        print(f"attnfx {args.command}: {type(error).__name__}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
