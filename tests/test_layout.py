"""The package's shape (issue 18): no two attnfx modules import each other, directly or round a
circle, at module level or inside a function (tools/import_graph.py reads the sources); and every
public name of `attnfx` resolves and has a docstring."""
from __future__ import annotations

import sys
from pathlib import Path

import attnfx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
try:
    import import_graph
finally:
    sys.path.remove(str(ROOT / "tools"))


def test_the_cycle_finder_finds_a_cycle():
    assert import_graph.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    edges = import_graph.graph()
    assert "attnfx.api" in edges and edges["attnfx.api"], "the graph was read"
    assert import_graph.cycles(edges) == []


def test_every_public_name_resolves_and_says_what_it_is():
    missing = [name for name in attnfx.__all__ if not (getattr(attnfx, name).__doc__ or "").strip()]
    assert missing == []
