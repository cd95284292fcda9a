"""Information flow routes (Ferrando & Voita 2024) on the default model's IOI prompt: the graph
(JSON + drawing) and its cost against activation patching of the same edges, side by side in one run.

Routes cost two forwards whatever the model. Patching the same edges the paper's way (the bare
eager model, batch 1, one forward per edge: bench/_edge_patching.py) costs one run per causal
edge: L·t(t+1)/2 token edges (source j → query i at layer l, all heads) and H times that per
head. Both sweeps run in full, timed against the recipe, and the recipe's importance of every
candidate edge is ranked against its patching effect (Spearman; overlap of the graph's edges
with the top edges by patching). Per-position head patching (L·H·t runs, tiled into batched
forwards by attnfx) stays as the nearest sweep attnfx itself runs.
"""
from __future__ import annotations

import random
import time

import torch

import _edge_patching
import _harness
import attnfx
from attnfx import metrics, patching
from attnfx.graph.calls import as_call
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
    bare, _ = load_default(attn_implementation="eager")                  # the paper's baseline: not instrumented
    im = attnfx.instrument(model)
    clean, corrupt, io, s = _ioi_pair(tok, load_prompts())
    tokens = tok.convert_ids_to_tokens(clean["input_ids"][0])
    t, layers, heads = len(tokens), model.config.n_layer, model.config.n_head

    graphs = {g: flow.information_flow(im, clean, threshold=args.threshold, heads=g == "head")   # warm: compiles
              for g in ("token", "head")}
    conservation = _edge_patching.conservation_check(bare, clean)
    effects = {g: _edge_patching.patch_edges(bare, clean, per_head=g == "head") for g in graphs}
    agreement = {g: _agreement(_recipe_importances(im, clean, g == "head"), effects[g], graphs[g]) for g in graphs}
    runs = {g: len(effects[g]) + 1 for g in graphs}                      # + the clean run that records A, v
    metric = metrics.logit_diff(correct=torch.tensor([io]), incorrect=torch.tensor([s]))
    patching.activation_patching(im, clean, corrupt, metric, "heads", per_position=True, progress=False)
    names = {"token": "flow routes (2 forwards)", "head": "flow routes per head (2 forwards)",
             "token patching": f"edge patching, token edges ({runs['token']} runs)",
             "head patching": f"edge patching, head edges ({runs['head']} runs)",
             "per position": f"head patching per position ({layers * heads * t} runs)"}
    times = _harness.bench({
        names["token"]: lambda: flow.information_flow(im, clean, threshold=args.threshold),
        names["head"]: lambda: flow.information_flow(im, clean, threshold=args.threshold, heads=True),
        names["token patching"]: lambda: _edge_patching.patch_edges(bare, clean),
        names["head patching"]: lambda: _edge_patching.patch_edges(bare, clean, per_head=True),
        names["per position"]: lambda: patching.activation_patching(im, clean, corrupt, metric, "heads",
                                                                    per_position=True, progress=False)},
        repeats=2 if args.quick else 5)
    out = _harness.RESULTS / _harness.device_slug(_harness.device_name())
    out.mkdir(parents=True, exist_ok=True)
    graphs["token"].plot(out / "flow.png", tokens=tokens, title=f"default model, IOI: routes to '{tokens[-1]}' → "
                         f"{tok.convert_ids_to_tokens([io])[0]} (τ = {args.threshold})")
    graphs["token"].to_json(out / "flow_graph.json")
    _scatter(out / "flow_vs_patching.png", agreement, args.threshold)
    for g in graphs:
        agreement[g].pop("points")
    path = _harness.write_json("flow", {
        "prompt": tok.decode(clean["input_ids"][0]), "threshold": args.threshold, "tokens": t,
        "edges": len(graphs["token"].edges), "head_edges": len(graphs["head"].edges),
        "edges_into_last_position_by_source": _sources(graphs["token"], t - 1),
        "times_ms": times,
        "runs": {"flow routes": 2, "edge patching, token edges (1 clean + 1 per edge)": runs["token"],
                 "edge patching, head edges (1 clean + 1 per edge)": runs["head"],
                 "head patching per position": layers * heads * t},
        "speedup_vs_edge_patching": {g: times[names[f"{g} patching"]] / times[names[g]] for g in graphs},
        "speedup_vs_head_patching": times[names["per position"]] / times[names["token"]],
        "edge_patching": {"method": "bare eager GPT-2, batch 1, one forward per edge; pre-hook on attn.c_proj: "
                                    "z[0, i, h] -= A_h[i, j] v_h[j] (clean A, v)",
                          "effect": "‖y − y'‖₁ / ‖y‖₁, y = final stream (ln_f input) at the last position; "
                                    "also the drop of the predicted token's logit",
                          "conservation": conservation, **agreement}})
    print(path)
    for name, ms in times.items():
        print(f"{name:45s} {ms:9.1f} ms")
    for g in graphs:
        print(g, {k: v for k, v in agreement[g].items() if k != "points"})


def _recipe_importances(im, batch, heads: bool) -> dict[tuple, float]:
    """The recipe's importance of every causal attention edge (l, i, j[, h]) — the decomposition
    of every ("mid", l, i) node, not only those the walk from the prediction reaches."""
    rec, writes = flow._components(im, *as_call(batch))
    t = rec["resid_pre", 0].shape[1]
    found = {}
    for l in range(len(im.sites)):
        for i in range(t):
            for source, weight, kind in flow._incoming(im, rec, writes, ("mid", l, i), 0, heads):
                if kind != "residual" and source[2] <= i:
                    found[(l, i, source[2], *([int(kind.split()[1])] if heads else []))] = weight
    return found


def _key(source, target, kind) -> tuple:
    return (target[1], target[2], source[2], *([int(kind.split()[1])] if kind.startswith("head") else []))


def _agreement(importance: dict, effects: dict, graph) -> dict:
    """Spearman of recipe importance with the patching effects over all candidate edges (and over
    the edges into the predicted position), and how many of the graph's attention edges are among
    the top-|graph| edges by patching (chance: |graph|² / candidates)."""
    keys = sorted(effects)
    imp = torch.tensor([importance[k] for k in keys])
    l1, drop = (torch.tensor([effects[k][m] for k in keys]) for m in (0, 1))
    last = torch.tensor([k[1] == keys[-1][1] for k in keys])
    in_graph = {_key(s, t, k) for s, t, _, k in graph.edges if k not in ("residual", "mlp")}
    top = {keys[n] for n in l1.argsort(descending=True)[:len(in_graph)].tolist()}
    return {"candidates": len(keys), "graph_edges": len(in_graph),
            "spearman_l1": _spearman(imp, l1), "spearman_abs_logit_drop": _spearman(imp, drop.abs()),
            "spearman_l1_into_last_position": _spearman(imp[last], l1[last]),
            "graph_edges_in_top_by_patching": len(in_graph & top),
            "top_by_patching_with_importance_0": sum(importance[k] == 0.0 for k in top),   # prox clamped at 0
            "expected_by_chance": round(len(in_graph) ** 2 / len(keys), 2),
            "points": (imp, l1, torch.tensor([k in in_graph for k in keys]))}


def _spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson r of average ranks (ties are common: effects that cannot reach the prediction are 0)."""
    def rank(v):
        _, inverse, counts = torch.unique(v, return_inverse=True, return_counts=True)
        ends = counts.cumsum(0).double()
        return (ends - (counts - 1) / 2)[inverse]
    return float(torch.corrcoef(torch.stack([rank(x), rank(y)]))[0, 1])


def _scatter(path, agreement: dict, threshold: float) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), dpi=120, layout="constrained")
    for ax, (g, found) in zip(fig.subplots(1, 2), agreement.items()):
        imp, l1, in_graph = found["points"]
        ax.scatter(imp[~in_graph], l1[~in_graph], s=6, alpha=0.4, color="#777777", label="other candidates")
        ax.scatter(imp[in_graph], l1[in_graph], s=12, color="#1b9e77", label=f"in the graph (≥ τ = {threshold})")
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.set_xlabel("flow-routes importance (2 forwards)")
        ax.set_ylabel("patching effect ‖y − y′‖₁ / ‖y‖₁")
        ax.set_title(f"{g} edges: {found['candidates']} patched runs, Spearman {found['spearman_l1']:.2f}")
        ax.legend(fontsize=7)
    fig.savefig(path)


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
