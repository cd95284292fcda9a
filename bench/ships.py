"""SHIPS (Zhou et al. 2025; issue 16) on the default model: how well the query-scaling score ranks
heads by their exact zero-ablation effect, and what it costs against the paper's loop.

    python bench/ships.py [--quick] [--prompts N]

Prompts: the first N fact prompts of `load_prompts()` ("the capital of X is" → capital(X); the
model gets all right), one batch (`data.batches`, left padding; these share one length; the
counterfactual prompts were dropped: the model answers them with the memorised capital, not the
in-context one, so their "correct answer" is moot). Per head [4 × 8]:
* SHIPS = mean KL(p ‖ p̃), p̃ with the head's query × ε (`recipes.ships.head_importance`), for
  ε = the paper's 1e-4 and a few others;
* exact zero ablation, tiled the same way (each tile ablates one head on its rows, `rows=`): the
  mean KL(p ‖ p_ablated) and the mean drop of the correct answer's log-probability.
Spearman ρ of SHIPS with each (and with |drop|: SHIPS is unsigned). Cost, median wall time (`_harness.bench`, 1 CPU thread): SHIPS tiled
(`rows_per_forward`=256, attnfx's default backend) vs the paper's way (bare HF model, eager, one
prompt a forward, a forward hook scaling the head's query columns of c_attn: n · (1 + L·H) forwards).
Results: bench/results/<device>/ships.json, ships.png (scatter + cost bars).
"""
from __future__ import annotations

import time

import torch

import _harness as H
import attnfx
from attnfx import data
from attnfx.models.loader import load_default, load_prompts
from attnfx.recipes import ships

PROMPTS, QUICK_PROMPTS = 32, 4
EPSILONS = (0.0, ships.DEFAULT_EPS, 1e-2, 0.1, 0.5)     # the paper's 1e-4 first in the report
REPEATS, QUICK_REPEATS = 7, 1                          # the paper's loop is 3-5 s a call on one shared core
ROWS = 256                                             # head_importance's default rows_per_forward


def batch_and_answers(tok, n: int):
    prompts = load_prompts()
    rows = prompts["facts"][:n]
    texts = [r["prompt"] for r in rows]
    vocab = tok.get_vocab()
    answers = torch.tensor([vocab[r["answer"]] for r in rows])
    batch = next(iter(data.batches(texts, tok, batch_size=n, padding_side="left", progress=False)))
    return dict(batch.encoding), answers, texts


@torch.no_grad()
def ablation_effects(im, batch: dict, answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([L, H] mean KL(p ‖ p_ablated), [L, H] mean drop of log p(answer)): each head zero-ablated on
    its own tile, as head_importance tiles its query scales."""
    n = answers.shape[0]
    last = data.Batch(batch, torch.arange(n), ("",) * n, "left").last_positions
    pairs = [(l, h) for l in range(len(im.sites)) for h in range(im.sites[l].num_heads)]
    tiles = max(1, min(len(pairs), ROWS // n))
    tiled = {k: v.repeat(tiles, *([1] * (v.dim() - 1))) for k, v in batch.items()}
    base = im(**batch).logits[torch.arange(n), last]
    kl, drop = torch.zeros(len(im.sites), im.sites[0].num_heads), torch.zeros(len(im.sites), im.sites[0].num_heads)
    for first in range(0, len(pairs), tiles):
        chunk = pairs[first:first + tiles]
        with im.steering.restoring():
            for r in range(tiles):
                im.steering.positions.group(rows=range(r * n, (r + 1) * n))
            for r, (l, h) in enumerate(chunk):
                im.steering.ablate(l, h, rows=range(r * n, (r + 1) * n))
            out = im(**tiled).logits[torch.arange(n * tiles), last.repeat(tiles)].view(tiles, n, -1)
        for r, (l, h) in enumerate(chunk):
            kl[l, h] = ships.kl_last(base, out[r]).mean()
            lp_base, lp = base.log_softmax(-1), out[r].float().log_softmax(-1)
            drop[l, h] = (lp_base.gather(1, answers[:, None]) - lp.gather(1, answers[:, None])).mean()
    return kl, drop


@torch.no_grad()
def paper_loop(model, tok, texts, eps: float) -> torch.Tensor:
    """The paper's way: bare model, eager, batch 1 per prompt, one hooked forward per head."""
    cfg = model.config
    width = cfg.n_embd // cfg.n_head
    out = torch.zeros(len(texts), cfg.n_layer, cfg.n_head)
    for i, text in enumerate(texts):
        ids = tok(text, return_tensors="pt")["input_ids"]
        base = model(input_ids=ids).logits[0, -1]
        for l in range(cfg.n_layer):
            for h in range(cfg.n_head):
                def hook(mod, args, output, h=h):
                    output = output.clone()
                    output[..., h * width:(h + 1) * width] *= eps      # q: c_attn's first n_embd columns
                    return output
                handle = model.transformer.h[l].attn.c_attn.register_forward_hook(hook)
                out[i, l, h] = ships.kl_last(base, model(input_ids=ids).logits[0, -1])
                handle.remove()
    return out.mean(0)


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rank = lambda v: v.flatten().double().argsort().argsort().double()       # noqa: E731  (no ties here)
    return float(torch.corrcoef(torch.stack([rank(x), rank(y)]))[0, 1])


def plot(path, scores, kl, drop, rho: dict, costs: dict) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8), dpi=110, layout="constrained")
    ax_kl, ax_drop, ax_cost = fig.subplots(1, 3)
    for ax, y, label, key in ((ax_kl, kl, "zero-ablation KL(p ‖ p_abl)", "ablation_kl"),
                              (ax_drop, drop.abs(), "|drop of log p(answer)| when ablated", "ablation_abs_logprob_drop")):
        ax.scatter(scores.flatten(), y.flatten(), s=14, alpha=0.7)
        ax.set(xscale="log", yscale="log", xlabel=f"SHIPS (ε = {ships.DEFAULT_EPS:g})", ylabel=label)
        ax.set_title(f"Spearman ρ = {rho[key]:.3f} ({scores.numel()} heads)", fontsize=9)
    names = list(costs)
    bars = ax_cost.bar(names, [c["ms"] for c in costs.values()], color=["C0", "C1", "C2"][:len(names)])
    ax_cost.bar_label(bars, [f"{c['ms']:.0f} ms\n{c['forwards']} fwd" for c in costs.values()], padding=3, fontsize=8)
    ax_cost.set(ylabel="time (ms, median)", ylim=(0, max(c["ms"] for c in costs.values()) * 1.25))
    ax_cost.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"SHIPS on attnfx's default model (4 × 8 heads): rank agreement with ablation, cost; {H.device_name()}",
                 fontsize=9)
    fig.savefig(path)


def main() -> None:
    parser = H.cli(__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=None, help=f"prompts (default {PROMPTS}; quick {QUICK_PROMPTS})")
    args = H.parse_args(parser)
    n = args.prompts or (QUICK_PROMPTS if args.quick else PROMPTS)
    model, tok = load_default()
    batch, answers, texts = batch_and_answers(tok, n)
    im = attnfx.instrument(model)
    with torch.no_grad():
        base = im(**batch).logits[torch.arange(n), (batch["attention_mask"].shape[1] - 1)]
    accuracy = float((base.argmax(-1) == answers).float().mean())
    kl, drop = ablation_effects(im, batch, answers)
    by_eps = {eps: ships.head_importance(im, batch, eps=eps, rows_per_forward=ROWS, progress=False) for eps in EPSILONS}
    main_result = by_eps[ships.DEFAULT_EPS]
    rho = {"ablation_kl": spearman(main_result.scores, kl), "ablation_logprob_drop": spearman(main_result.scores, drop),
           "ablation_abs_logprob_drop": spearman(main_result.scores, drop.abs())}
    sweep = {f"{eps:g}": {"ablation_kl": spearman(r.scores, kl), "ablation_logprob_drop": spearman(r.scores, drop),
                          "ablation_abs_logprob_drop": spearman(r.scores, drop.abs())} for eps, r in by_eps.items()}
    start = time.perf_counter()
    reference = paper_loop(model, tok, texts, ships.DEFAULT_EPS)
    paper_once_s = time.perf_counter() - start
    agreement = float((reference - main_result.scores).abs().max())

    last = {}
    calls = {"attnfx tiled": lambda: last.__setitem__("tiled", ships.head_importance(
                 im, batch, rows_per_forward=ROWS, progress=False)),
             "paper loop": lambda: paper_loop(model, tok, texts, ships.DEFAULT_EPS)}
    ms = H.bench(calls, repeats=QUICK_REPEATS if args.quick else REPEATS)
    heads = sum(site.num_heads for site in im.sites)
    tiles = max(1, min(heads, ROWS // n))
    costs = {"attnfx tiled": {"ms": ms["attnfx tiled"], "forwards": last["tiled"].forwards,
                              "rows": n + (last["tiled"].forwards - 1) * tiles * n},     # padding tiles count
             "paper loop": {"ms": ms["paper loop"], "forwards": n * (1 + heads), "rows": n * (1 + heads)}}
    print(f"{n} prompts, {heads} heads; base accuracy {accuracy:.2f}")
    print(f"Spearman ρ(SHIPS ε={ships.DEFAULT_EPS:g}, ablation KL) = {rho['ablation_kl']:+.3f}, "
          f"(…, drop of log p(answer)) = {rho['ablation_logprob_drop']:+.3f}, (…, |drop|) = "
          f"{rho['ablation_abs_logprob_drop']:+.3f}")
    for eps, row in sweep.items():
        print(f"  ε = {eps:<6} ρ KL {row['ablation_kl']:+.3f}   ρ drop {row['ablation_logprob_drop']:+.3f}   "
              f"ρ |drop| {row['ablation_abs_logprob_drop']:+.3f}")
    print(f"max |attnfx − paper loop| = {agreement:.2e}")
    for name, c in costs.items():
        print(f"  {name:<13} {c['ms']:9.1f} ms  {c['forwards']:>5} forwards  {c['rows']:>5} rows")
    print(f"  speedup {ms['paper loop'] / ms['attnfx tiled']:.1f}×")

    path = H.write_json("ships", {
        "quick": args.quick, "model": "attnfx default model (GPT2LMHeadModel, 4 layers × 8 heads)",
        "backend": im.backend, "prompts": n, "prompt_set": "facts",
        "padded_length": batch["input_ids"].shape[1], "base_accuracy": accuracy, "eps": ships.DEFAULT_EPS,
        "spearman": rho, "spearman_by_eps": sweep, "max_abs_diff_vs_paper_loop": agreement,
        "paper_loop_first_call_s": paper_once_s, "cost": costs, "speedup": ms["paper loop"] / ms["attnfx tiled"],
        "ships": main_result.scores.tolist(), "ablation_kl": kl.tolist(), "ablation_logprob_drop": drop.tolist(),
    }, args.out)
    plot(path.with_name("ships.png"), main_result.scores, kl, drop, rho, costs)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
