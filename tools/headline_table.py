"""README's headline benchmark table, rendered from the committed benchmark JSON (never typed):
the literature's head-level methods run as attnfx recipes against the paper's way of running
them (eager, batch 1, one forward per head or per edge), side by side in one run each.

    .venv/bin/python tools/headline_table.py           print the table
    .venv/bin/python tools/headline_table.py --write   replace it in README.md
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from marked_blocks import between, replace_between

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "bench" / "results" / "cpu-amd-epyc-2cores"
START, END = "<!-- headline-table:start -->", "<!-- headline-table:end -->"
WRITE = ".venv/bin/python tools/headline_table.py --write"


def _read(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def rows() -> list[tuple]:
    """(method, attnfx passes, paper passes, attnfx ms, paper ms, source) per recipe."""
    ships, costs, decore, flow = _read("ships"), _read("recipe_costs"), _read("decore"), _read("flow")
    out = [("SHIPS head importance", ships["cost"]["attnfx tiled"]["forwards"], ships["cost"]["paper loop"]["forwards"],
            ships["cost"]["attnfx tiled"]["ms"], ships["cost"]["paper loop"]["ms"], "ships.json")]
    for name, recipe in costs["recipes"].items():
        out.append((name[0].upper() + name[1:], recipe["attnfx"]["passes"], recipe["paper's way"]["passes"],
                    recipe["attnfx"]["ms"], recipe["paper's way"]["ms"], "recipe_costs.json"))
    times = decore["times_ms"]
    ours, theirs = (next(v for k, v in times.items() if k.startswith(p)) for p in ("attnfx", "paper"))
    out.append((f"DeCoRe, {decore['cost_prompts']} prompts × {decore['cost_tokens']} tokens", "1 batch", "2 per prompt",
                ours, theirs, "decore.json"))
    runs, ms = flow["runs"], flow["times_ms"]
    token = next(k for k in ms if k.startswith("edge patching, token edges"))
    out.append(("Information flow routes vs edge patching", runs["flow routes"],
                runs["edge patching, token edges (1 clean + 1 per edge)"], ms["flow routes (2 forwards)"], ms[token],
                "flow.json"))
    return out


def render() -> str:
    lines = ["| method | passes: attnfx | paper's way | ms: attnfx | paper's way | speedup |",
             "| --- | --- | --- | --- | --- | --- |"]
    for method, ours, theirs, ours_ms, theirs_ms, _ in rows():
        lines.append(f"| {method} | {ours} | {theirs} | {ours_ms:.0f} | {theirs_ms:.0f} | {theirs_ms / ours_ms:.1f}× |")
    lines.append("")
    lines.append("The default model, one CPU thread of a 2-core AMD EPYC, medians. Each result equals the paper's "
                 "way's (within 1e-5; DeCoRe: the same tokens), except flow routes, a two-pass estimate of what "
                 "patching each edge measures (Spearman " + f"{_read('flow')['edge_patching']['token']['spearman_l1']:.2f}" + " with it: "
                 "docs/guides/recipes.md). From "
                 "`bench/results/cpu-amd-epyc-2cores/` (" + ", ".join(sorted({r[-1] for r in rows()})) + f"), by `{WRITE}`.")
    return "\n".join(lines)


def in_readme(text: str) -> str:
    return between(text, START, END)


def write() -> None:
    replace_between(README, START, END, render())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the table in README.md")
    if parser.parse_args().write:
        write()
    else:
        print(render())
