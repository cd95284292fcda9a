"""Figures in the docs that come from the committed benchmark JSON, never typed: each is written

    <!--fig:cpu-amd-epyc-2cores/ships:spearman/ablation_kl:.2f-->0.83<!--/fig-->

(the JSON file under bench/results/ without .json, the path of keys in it separated by "/" —
list indices as numbers; a key holding "/" itself is matched whole —, and a format spec), so the page reads as text on GitHub and in the
built site, and this tool rewrites the value between the comments from the JSON. A path
"a/b÷c/d" is the ratio of two values, "a/b−c/d" (U+2212) their difference; a plain number on
either side is that number ("times_ms/x÷1000" gives seconds). In a table cell, a key's "|" is
written "\\|". tests/test_docs.py checks every figure is current, and that no measurement is
typed outside a figure (`unmarked`).

    .venv/bin/python tools/doc_figures.py             list the stale figures (exit 1 if any)
    .venv/bin/python tools/doc_figures.py --write     rewrite them in README.md and docs/
    .venv/bin/python tools/doc_figures.py --unmarked  list measurements typed by hand (exit 1 if any)
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


def _operand(source: str, path: str):
    # a literal scales a value into the unit the page quotes (ms÷1000 → s)
    return float(path) if re.fullmatch(r"\d+(?:\.\d+)?", path) else _value(source, path)


def _value(source: str, path: str):
    if "÷" in path:
        top, bottom = path.split("÷")
        return _operand(source, top) / _operand(source, bottom)
    if "−" in path:
        left, right = path.split("−")
        return _operand(source, left) - _operand(source, right)
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
    # in a table cell a key's "|" is written "\\|", or Markdown splits the cell there
    value = _value(match["source"], match["path"].replace("\\|", "|"))
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


# A measurement as pages type it: a number with a unit of time, memory, throughput, or a ratio or
# percentage written against it ("4.5× faster", "54.6%"). "8 × 32" and "4×8" are shapes, not
# ratios: × followed by a number is left alone.
MEASUREMENT = re.compile(
    r"(?<![\w.])[−+-]?\d+(?:\.\d+)?"
    r"(?:[ \u00a0\u2009]?(?:ms|µs|s|min|minutes?|seconds?|hours?|KB|KiB|MB|MiB|GB|GiB|prompts/s|tokens/s)(?![\w/])"
    r"|%|[×x](?![\w(]))")
# Numbers with a unit that are not measurements of this project, each whole phrase as the page
# words it (kept short: anything measured belongs in a figure).
ALLOWED = [
    "the paper: 88%",            # Yu, Merullo & Pavlick's figure, quoted for comparison
    "within 227 KB",             # sm_90's shared memory per block, a hardware limit
    "about 5 GB",                # the size of a CUDA torch install, not a benchmark
    "under 20 MB",               # the default model's package size, a bound its packaging keeps
]
# What is not prose: fenced and inline code, figures, and the tables tools generate between
# <!-- NAME:start --> and <!-- NAME:end --> (each has its own staleness test), other comments.
_NOT_PROSE = [re.compile(r"^(```|~~~).*?^\1", re.S | re.M), FIGURE,
              re.compile(r"<!-- ([\w-]+):start -->.*?<!-- \1:end -->", re.S), re.compile(r"<!--.*?-->", re.S),
              re.compile(r"`[^`\n]+`")]


def unmarked(text: str) -> list[tuple[int, str]]:
    """(line, figure) for every measurement typed in the prose of a page rather than marked as a
    figure: outside code, figures and generated tables, less the ALLOWED phrases."""
    for pattern in [*_NOT_PROSE, *(re.compile(re.escape(phrase)) for phrase in ALLOWED)]:
        # blanked, not removed: line numbers stay those of the page
        text = pattern.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
    return [(text.count("\n", 0, m.start()) + 1, m.group(0)) for m in MEASUREMENT.finditer(text)]


def unmarked_pages() -> list[str]:
    """'page:line: figure' for every typed measurement of README.md and docs/."""
    return [f"{page.relative_to(ROOT)}:{line}: {figure}" for page in PAGES
            for line, figure in unmarked(page.read_text(encoding="utf-8"))]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite every figure from the JSON")
    parser.add_argument("--unmarked", action="store_true", help="list the measurements typed outside a figure")
    args = parser.parse_args()
    if args.unmarked:
        typed = unmarked_pages()
        print("\n".join(typed) or "no measurement is typed by hand")
        sys.exit(1 if typed else 0)
    if args.write:
        write()
    problems = stale()
    print("\n".join(problems) or "every figure is current")
    sys.exit(1 if problems else 0)
