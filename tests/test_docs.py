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
