"""Information flow routes (Ferrando & Voita 2024) on the default model's IOI prompt: the graph
(JSON + drawing) and its cost against activation patching, side by side in one run.

Routes cost two forwards whatever the model. Patching one attention edge (source j → query i
through head h) costs one patched run per edge: L·H·t² runs; the nearest sweep attnfx runs,
per-position head patching (L·H·t runs, tiled into batched forwards), is timed as its lower bound.
"""
from __future__ import annotations

import random
import time

import torch

import _harness
import attnfx
from attnfx import metrics, patching
from attnfx.models.loader import load_default, load_prompts
from attnfx.recipes import flow


def _ioi_pair(tok, prompts):
    """The first held-out IOI prompt and its ABC corruption (three other names)."""
    item = prompts["ioi"][0]
    words, rng = item["prompt"].split(), random.Random(0)
    others = rng.sample([n for n in prompts["world"]["names"] if n not in (item["answer"], item["subject"])], 3)
    for slot, name in zip((1, 3, 9), others):
        words[slot] = name
    vocab = tok.get_vocab()
    return (tok(item["prompt"], return_tensors="pt"), tok(" ".join(words), return_tensors="pt"),
            vocab[item["answer"]], vocab[item["subject"]])


def main():
    parser = _harness.cli(__doc__.splitlines()[0])
    parser.add_argument("--threshold", type=float, default=0.04)
    args = _harness.parse_args(parser)
    model, tok = load_default()
    im = attnfx.instrument(model)
    clean, corrupt, io, s = _ioi_pair(tok, load_prompts())
    tokens = tok.convert_ids_to_tokens(clean["input_ids"][0])
    t, layers, heads = len(tokens), model.config.n_layer, model.config.n_head

    graph = flow.information_flow(im, clean, threshold=args.threshold)          # warm: compiles
    head_graph = flow.information_flow(im, clean, threshold=args.threshold, heads=True)
    metric = metrics.logit_diff(correct=torch.tensor([io]), incorrect=torch.tensor([s]))
    patching.activation_patching(im, clean, corrupt, metric, "heads", per_position=True, progress=False)
    repeats = 2 if args.quick else 5
    times = _harness.bench({
        "flow routes (2 forwards)": lambda: flow.information_flow(im, clean, threshold=args.threshold),
        f"head patching per position ({layers * heads * t} runs)":
            lambda: patching.activation_patching(im, clean, corrupt, metric, "heads", per_position=True,
                                                 progress=False)}, repeats=repeats)
    out = _harness.RESULTS / _harness.device_slug(_harness.device_name())
    out.mkdir(parents=True, exist_ok=True)
    graph.plot(out / "flow.png", tokens=tokens, title=f"default model, IOI: routes to '{tokens[-1]}' → "
               f"{tok.convert_ids_to_tokens([io])[0]} (τ = {args.threshold})")
    graph.to_json(out / "flow_graph.json")
    path = _harness.write_json("flow", {
        "prompt": tok.decode(clean["input_ids"][0]), "threshold": args.threshold, "tokens": t,
        "edges": len(graph.edges), "head_edges": len(head_graph.edges),
        "edges_into_last_position_by_source": _sources(graph, t - 1),
        "times_ms": times,
        "runs": {"flow routes": 2, "head patching per position": layers * heads * t,
                 "edge patching (every head, source, query)": layers * heads * t * t},
        "speedup_vs_head_patching": times[f"head patching per position ({layers * heads * t} runs)"]
        / times["flow routes (2 forwards)"]})
    print(path)
    for name, ms in times.items():
        print(f"{name:45s} {ms:9.1f} ms")


def _sources(graph, position: int) -> dict[str, float]:
    """Attention edges into the last position, summed per source position (which tokens feed it)."""
    totals: dict[str, float] = {}
    for source, target, weight, kind in graph.edges:
        if kind == "attention" and target[2] == position and source[2] != position:
            key = f"L{target[1]} from {source[2]}"
            totals[key] = round(totals.get(key, 0.0) + weight, 4)
    return totals


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"{time.perf_counter() - start:.0f} s")
