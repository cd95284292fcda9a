"""The main job (`attnfx demo`): Yu et al. (2023) single-head value scaling of factual recall,
on the embedded default model or any local HF causal LM, written up as a report folder.

    report.json        rates per scale, top heads, DLA, model id, seed, timing, checks
    dla_heatmap.png    mean DLA of (in-context − memorised) per layer × head
    value_sweep.png    in-context / memorised rates against the value scale of the two top heads
    report.html        one page embedding both
"""
from __future__ import annotations

import base64
import hashlib
import html
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .analysis import factual_recall as fr

DEFAULT_MODEL_ID = "attnfx-default"


def _weights_digest(folder: Path) -> str | None:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()[:12]


def load_model(model_dir: str | None, device: str):
    """(model, tokenizer, folder, model id). None → the embedded default model."""
    from .models import default_dir, load_default

    if model_dir is None:
        folder = default_dir()
        model, tokenizer = load_default(device)
        name = DEFAULT_MODEL_ID
    else:
        folder = Path(model_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"--model {folder}: no such directory (expected a local HF causal LM "
                                    "folder with config.json, weights and a tokenizer)")
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"--model {folder}: no config.json; expected a folder written by "
                                    "save_pretrained (config.json, weights, tokenizer)")
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = model.to(device).eval()
        name = folder.resolve().name
    digest = _weights_digest(folder)
    return model, tokenizer, folder, f"{name}@{digest}" if digest else name


def prompt_items(folder: Path, prompt_file: str | None, limit: int | None, seed: int) -> list[dict]:
    """Counterfactual items from --prompts, else the model folder's prompts.json; with `limit`, a
    seeded random subset of that size."""
    path = Path(prompt_file) if prompt_file else folder / "prompts.json"
    if prompt_file is None and not path.is_file():
        raise FileNotFoundError(f"{folder} has no prompts.json: pass --prompts FILE (a JSON list of "
                                "{\"prompt\", \"in_context\", \"memorised\"} objects)")
    items = fr.load_prompt_file(path)
    if limit is not None and limit < len(items):
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:limit]
        items = [items[i] for i in sorted(order.tolist())]
    return items


# ---- the report --------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def summary_table(result: dict) -> str:
    """Rates per value scale for both swept heads, as aligned text."""
    (li, hi), (lm, hm) = result["top_in_context_head"], result["top_memorised_head"]
    header = ("scale", f"L{li}H{hi} in-ctx", f"L{li}H{hi} memor.", f"L{lm}H{hm} in-ctx", f"L{lm}H{hm} memor.")
    rows = [header]
    for a, b in zip(result["sweeps"]["in_context_head"]["points"], result["sweeps"]["memorised_head"]["points"]):
        rows.append((f"{a['factor']:g}", _pct(a["in_context"]), _pct(a["memorised"]),
                     _pct(b["in_context"]), _pct(b["memorised"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join("  " + line for line in lines)


def checks(result: dict) -> dict:
    """Properties the run must have whatever the model (docs/design.md §6), and the paper's three
    observations (reported, not enforced: they hold for a model with competing mechanisms)."""
    rates, base = result["baseline"], result["baseline"]["in_context"]
    up = max(p["in_context"] for p in result["sweeps"]["in_context_head"]["points"] if p["factor"] > 1)
    return {
        "no_graph_compiled_during_sweeps": all(s["graphs_compiled"] == 0 for s in result["sweeps"].values()),
        "scale_1_reproduces_baseline": all(
            {k: p[k] for k in rates} == rates for s in result["sweeps"].values()
            for p in s["points"] if p["factor"] == 1.0),
        "paper": {
            "baseline_in_context_between_20_and_80": 0.2 <= base <= 0.8,
            "top_in_context_head_scaled_up_reaches_85": up >= 0.85,
            "top_in_context_head_scaled_to_0_lowers_rate": fr.rate_at(result, "in_context_head", 0.0) < base,
            "top_memorised_head_scaled_up_lowers_rate": min(
                p["in_context"] for p in result["sweeps"]["memorised_head"]["points"] if p["factor"] > 1) < base,
        },
    }


def write_plots(out: Path, result: dict, model_id: str) -> list[str]:
    from . import viz

    (li, hi), (lm, hm) = result["top_in_context_head"], result["top_memorised_head"]
    heat = viz.head_heatmap(torch.tensor(result["dla"]), out / "dla_heatmap.png", mark=(li, hi),
                            title=f"{model_id}: direct logit attribution\nlogit[in-context] − logit[memorised], "
                                  f"last position, mean over {result['prompts']} prompts",
                            label="mean DLA")
    curves = viz.rate_curves({f"L{li}H{hi} (top in-context)": result["sweeps"]["in_context_head"],
                              f"L{lm}H{hm} (top memorised)": result["sweeps"]["memorised_head"]},
                             out / "value_sweep.png", baseline=result["baseline"]["in_context"],
                             title=f"{model_id}: scaling one head's value vectors")
    return [heat.name, curves.name]


def write_html(out: Path, report: dict) -> Path:
    def image(name: str) -> str:
        data = base64.b64encode((out / name).read_bytes()).decode()
        return f'<img alt="{name}" src="data:image/png;base64,{data}">'

    r = report["result"]
    (li, hi), (lm, hm) = r["top_in_context_head"], r["top_memorised_head"]
    paper = "".join(f"<li>{html.escape(k.replace('_', ' '))}: <b>{'yes' if v else 'no'}</b></li>"
                    for k, v in report["checks"]["paper"].items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>attnfx demo — {html.escape(report['model']['id'])}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}pre{{background:#f4f4f4;padding:1em}}img{{max-width:48%}}</style></head><body>
<h1>Single-head value scaling of factual recall</h1>
<p>Model <code>{html.escape(report['model']['id'])}</code>, {r['prompts']} held-out counterfactual prompts,
attnfx backend <code>{html.escape(report['backend'])}</code>, seed {report['seed']}.
Unsteered greedy answers: in-context {_pct(r['baseline']['in_context'])}, memorised {_pct(r['baseline']['memorised'])},
other {_pct(r['baseline']['other'])}. Top in-context head L{li}H{hi}, top memorised head L{lm}H{hm}
(direct logit attribution of logit[in-context] − logit[memorised]).</p>
<p>{image('dla_heatmap.png')} {image('value_sweep.png')}</p>
<pre>{html.escape(summary_table(r))}</pre>
<p>Observations of Yu et al. (2023):</p><ul>{paper}</ul>
<p>Graphs compiled during the sweeps: {sum(s['graphs_compiled_first_factor'] for s in r['sweeps'].values())}
at the first factor (the first value_unbiased use puts κ in the graph),
{sum(s['graphs_compiled'] for s in r['sweeps'].values())} at the other factors.
Total time {report['timing_s']['total']:.1f} s.</p></body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    return path


def run_demo(*, model_dir: str | None = None, prompt_file: str | None = None, out: str | Path = "demo-out",
             backend: str | None = None, device: str = "cpu", limit: int | None = None, seed: int = 0,
             batch_size: int = 256, progress: bool = True, echo=print) -> dict:
    """Load, instrument, run the experiment, write the report folder; returns the report."""
    import transformers

    import attnfx

    out, start = Path(out), time.perf_counter()
    timing = {}
    model, tokenizer, folder, model_id = load_model(model_dir, device)
    items = prompt_items(folder, prompt_file, limit, seed)
    prompts = fr.prepare(tokenizer, items, device)
    timing["load"] = time.perf_counter() - start
    im = attnfx.instrument(model, backend=backend)
    echo(f"{model_id}: {len(prompts)} counterfactual prompts" +
         (f" ({prompts.dropped} dropped: answers share a first token)" if prompts.dropped else ""))
    echo(str(im))
    try:
        result = fr.run(im, prompts, batch_size=batch_size, progress=progress)
        sites = [asdict(s) for s in im.sites]
        backend_used = im.backend
    finally:
        im.uninstrument()
    timing["experiment"] = time.perf_counter() - start - timing["load"]
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(out, result, model_id)
    timing["total"] = time.perf_counter() - start
    report = {"attnfx": attnfx.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
              "python": platform.python_version(), "device": device, "backend": backend_used, "seed": seed,
              "model": {"id": model_id, "folder": str(folder), "class": type(model).__name__,
                        "layers": len(sites), "heads": sites[0]["num_heads"] if sites else None},
              "sites": sites, "result": result, "checks": checks(result), "plots": plots,
              "timing_s": {k: round(v, 3) for k, v in timing.items()}}
    write_html(out, report)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (li, hi), (lm, hm) = result["top_in_context_head"], result["top_memorised_head"]
    base = result["baseline"]
    echo(f"\nUnsteered: in-context {_pct(base['in_context'])}, memorised {_pct(base['memorised'])}, "
         f"other {_pct(base['other'])}")
    echo(f"Top in-context head L{li}H{hi} (DLA {result['dla'][li][hi]:+.3f}); top memorised head "
         f"L{lm}H{hm} (DLA {result['dla'][lm][hm]:+.3f}). Greedy answers vs value scale:")
    echo(summary_table(result))
    echo("Observations of Yu et al. (2023) on these prompts: " + "; ".join(
        f"{name.replace('_', ' ')}: {'yes' if ok else 'no'}" for name, ok in report["checks"]["paper"].items()))
    echo(f"\nWrote {out}/report.json, report.html, {', '.join(plots)} ({timing['total']:.1f} s)")
    return report
