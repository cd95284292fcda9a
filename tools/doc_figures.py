"""Figures in the docs that come from the committed benchmark JSON, never typed: each is written

    <!--fig:cpu-amd-epyc-2cores/ships:spearman/ablation_kl:.2f-->0.83<!--/fig-->

(the JSON file under bench/results/ without .json, the path of keys in it separated by "/" —
list indices as numbers; a key holding "/" itself is matched whole —, and a format spec), so the page reads as text on GitHub and in the
built site, and this tool rewrites the value between the comments from the JSON. A path
"a/b÷c/d" is the ratio of two values. tests/test_docs.py checks every figure is current.

    .venv/bin/python tools/doc_figures.py           list the stale figures (exit 1 if any)
    .venv/bin/python tools/doc_figures.py --write   rewrite them in README.md and docs/
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FIGURE = re.compile(r"<!--fig:(?P<source>[^:>]+):(?P<path>[^:>]+)(?::(?P<spec>[^>]*))?-->(?P<value>.*?)<!--/fig-->", re.S)
WRITE = ".venv/bin/python tools/doc_figures.py --write"


@lru_cache(maxsize=None)
def _results(source: str) -> dict:
    return json.loads((RESULTS / f"{source}.json").read_text(encoding="utf-8"))


def _value(source: str, path: str):
    if "÷" in path:
        top, bottom = path.split("÷")
        return _value(source, top) / _value(source, bottom)
    value, keys = _results(source), path.split("/")
    while keys:
        if isinstance(value, list):
            value, keys = value[int(keys[0])], keys[1:]
            continue
        # a key may hold "/" itself ("attnfx/plain"): the longest run of segments that is a key
        n = next((n for n in range(len(keys), 0, -1) if "/".join(keys[:n]) in value), None)
        if n is None:
            raise KeyError(f"{source}.json has no {'/'.join(keys)!r} (path {path!r})")
        value, keys = value["/".join(keys[:n])], keys[n:]
    return value


def rendered(match: re.Match) -> str:
    """The figure's text from the JSON (a KeyError or missing file names a figure that cannot be)."""
    value = _value(match["source"], match["path"])
    return format(value, match["spec"] or "")


def figures(text: str) -> list[re.Match]:
    return list(FIGURE.finditer(text))


def stale() -> list[str]:
    """'page: source:path is X in the JSON, Y on the page' for every figure that is not current."""
    out = []
    for page in PAGES:
        for match in figures(page.read_text(encoding="utf-8")):
            want = rendered(match)
            if match["value"] != want:
                out.append(f"{page.relative_to(ROOT)}: {match['source']}:{match['path']} is {want} in the JSON, "
                           f"{match['value']} on the page")
    return out


def write() -> None:
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        new = FIGURE.sub(lambda m: m.group(0)[:m.start("value") - m.start()] + rendered(m) + "<!--/fig-->", text)
        if new != text:
            page.write_text(new, encoding="utf-8")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite every figure from the JSON")
    if parser.parse_args().write:
        write()
    problems = stale()
    print("\n".join(problems) or "every figure is current")
    sys.exit(1 if problems else 0)
