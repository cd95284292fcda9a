"""The documentation runs (issue 18): every ```python block of README.md and docs/ executes, a
page's blocks in order in one fresh interpreter (a page's examples continue from its first
block), in a scratch directory; a quick start that stops working fails here. README's headline
table and every figure marked in the docs are the committed benchmark JSON's (tools/headline_table.py,
tools/doc_figures.py)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def python_blocks(text: str) -> list[str]:
    return [m.group(1) for m in _BLOCK.finditer(text)]


def test_blocks_are_found_as_written():
    text = "x\n```python\na = 1\n```\n```sh\nnot python\n```\n```python\nb = a + 1\n```\n"
    assert python_blocks(text) == ["a = 1\n", "b = a + 1\n"]


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p.read_text(encoding="utf-8"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_of_the_page_runs(page, tmp_path):
    blocks = python_blocks(page.read_text(encoding="utf-8"))
    # each block marked with its number, so a failure names the block that raised
    script = "\n".join(f"# --- block {n + 1} of {page.name}\n{block}" for n, block in enumerate(blocks))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"{page.relative_to(ROOT)}: a python block failed:\n{run.stderr[-4000:]}"


def test_readme_headline_table_is_the_benchmark_json():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import headline_table
    finally:
        sys.path.remove(str(ROOT / "tools"))
    assert headline_table.in_readme(headline_table.README.read_text()) == headline_table.render(), (
        f"README.md's headline table is stale: run `{headline_table.WRITE}`")


def _tool(name: str):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "tools"))


def test_figures_marked_in_the_docs_are_the_benchmark_json():
    doc_figures = _tool("doc_figures")
    assert sum(len(doc_figures.figures(p.read_text(encoding="utf-8"))) for p in doc_figures.PAGES) > 30
    assert doc_figures.stale() == [], f"stale figures: run `{doc_figures.WRITE}`"


def test_a_figure_that_disagrees_with_its_json_is_stale():
    doc_figures = _tool("doc_figures")
    page = doc_figures.FIGURE.search("<!--fig:cpu-amd-epyc-2cores/ships:speedup:.1f-->9.9<!--/fig-->")
    assert doc_figures.rendered(page) != "9.9"


def test_no_measurement_is_typed_by_hand():
    # a measurement quoted in prose is a figure of the benchmark JSON, or it goes stale unseen
    doc_figures = _tool("doc_figures")
    assert doc_figures.unmarked_pages() == [], (
        "measurements typed by hand: mark each as <!--fig:SOURCE:PATH:FORMAT-->value<!--/fig--> "
        "(tools/doc_figures.py), or reword; `.venv/bin/python tools/doc_figures.py --unmarked` lists them")


def test_a_typed_measurement_is_found_and_a_marked_one_is_not():
    doc_figures = _tool("doc_figures")
    marked = "<!--fig:cpu-amd-epyc-2cores/ships:speedup:.1f-->4.5<!--/fig-->"
    assert doc_figures.unmarked("intro\nit is 3.2× faster\n") == [(2, "3.2×")]
    assert doc_figures.unmarked("87 ms, 1.5 MiB, 54.6% and 20 s") == [(1, "87 ms"), (1, "1.5 MiB"), (1, "54.6%"),
                                                                      (1, "20 s")]
    assert doc_figures.unmarked(f"it is {marked}× faster") == []
    assert doc_figures.unmarked("```sh\nit is 3.2× faster\n```\nand `3.2×` inline\n") == []
    assert doc_figures.unmarked("<!-- t:start -->\n| 3.2× |\n<!-- t:end -->\n") == []
    # shapes and counts are not measurements
    assert doc_figures.unmarked("batch 8 × 32, 4×8 heads, 4 spans, the paper: 88%") == []


def test_a_figure_can_be_a_difference_or_a_value_in_other_units():
    doc_figures = _tool("doc_figures")
    rows = "lengths/rows/5/memory/{}/peak_mib"
    stats, plain = (doc_figures._value("cpu-amd-epyc-2cores/records", rows.format(k)) for k in ("stats", "plain"))
    figure = "<!--fig:cpu-amd-epyc-2cores/records:{}:.4f-->?<!--/fig-->"
    assert doc_figures.rendered(doc_figures.FIGURE.search(
        figure.format(f"{rows.format('stats')}−{rows.format('plain')}"))) == f"{stats - plain:.4f}"
    assert doc_figures.rendered(doc_figures.FIGURE.search(figure.format(f"{rows.format('stats')}÷1000"))) == \
        f"{stats / 1000:.4f}"


def test_figures_in_table_rows_escape_their_pipes():
    # an unescaped "|" in a figure's path splits the table cell there, in mkdocs and on GitHub
    doc_figures = _tool("doc_figures")
    bad = [f"{page.relative_to(ROOT)}: {m['path']}" for page in doc_figures.PAGES
           for line in page.read_text(encoding="utf-8").splitlines() if line.startswith("|")
           for m in doc_figures.figures(line) if re.search(r"(?<!\\)\|", m["path"])]
    assert bad == [], "write a key's | as \\| in a table row"
