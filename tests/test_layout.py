"""The package's shape (issue 18): no two attnfx modules import each other, directly or round a
circle, at module level or inside a function, nor two folders (tools/import_graph.py reads the sources); and every
public name of `attnfx` resolves and has a docstring."""
from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

import pytest

import attnfx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
try:
    import import_graph
finally:
    sys.path.remove(str(ROOT / "tools"))


def test_the_cycle_finder_finds_a_cycle():
    assert import_graph.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def root_imports(root: Path) -> list[str]:
    """What `import X` finds at the repository's root (a regular package or a module), setup.py
    aside: Python puts the working directory first on sys.path."""
    return sorted(p.name for p in root.iterdir()
                  if (p.is_dir() and (p / "__init__.py").is_file())
                  or (p.suffix == ".py" and p.name != "setup.py"))


def test_the_checkout_root_shadows_no_installed_package(tmp_path):
    """Packages live under src/ only: a top-level kernels/ was imported as HF's `kernels` (a
    transformers ≥ 5.25 dependency) by any Python started in the checkout, and broke
    `transformers.LlamaConfig` there (CI, stop 27). The finder itself finds such a package."""
    assert root_imports(ROOT) == []
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "setup.py").write_text("")
    assert root_imports(tmp_path) == ["kernels"]


def test_no_import_cycles():
    edges = import_graph.graph()
    assert "attnfx.api" in edges and edges["attnfx.api"], "the graph was read"
    assert import_graph.cycles(edges) == []


def test_folders_import_one_way():
    """Folded onto folders (graph, passes, state, ...) the graph has no cycle either: reading a
    graph never imports a pass, runtime state never imports a pass."""
    folded = import_graph.packages(import_graph.graph())
    assert {"graph", "passes", "state", "ops", "capture"} <= set(folded) and folded["passes"] >= {"graph", "state"}
    assert import_graph.cycles(folded) == []
    assert import_graph.cycles(import_graph.packages({"attnfx.graph.sites": {"attnfx.passes.flex"},
                                                      "attnfx.passes.flex": {"attnfx.graph.flex"},
                                                      "attnfx.graph.flex": set()})) == [["graph", "passes"]]


# the modules a user imports names from (docs/api.md documents the same)
PUBLIC = ["attnfx", "attnfx.data", "attnfx.sweeps", "attnfx.views", "attnfx.tensor_parallel", "attnfx.errors",
          "attnfx.analysis.patching", "attnfx.analysis.metrics", "attnfx.analysis.path_patching",
          "attnfx.analysis.lens", "attnfx.analysis.relevance", "attnfx.analysis.attribution", "attnfx.models.loader",
          "attnfx.state.steering", "attnfx.state.recording", "attnfx.recipes.ships", "attnfx.recipes.sinks",
          "attnfx.recipes.lookback", "attnfx.recipes.retrieval", "attnfx.recipes.decore", "attnfx.recipes.flow"]


def _own_doc(value) -> str:
    """A docstring written for it: not a dataclass's generated signature, not inherited."""
    doc = inspect.getdoc(value) if (inspect.isfunction(value) or inspect.isclass(value) or inspect.ismodule(value)) \
        else "constant"
    if inspect.isclass(value) and (doc or "").startswith(value.__name__ + "("):
        return ""
    if inspect.isclass(value) and "__doc__" not in vars(value):
        return ""
    return (doc or "").strip()


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_is_declared_resolves_and_says_what_it_is(name):
    module = importlib.import_module(name)
    assert isinstance(getattr(module, "__all__", None), list) and module.__all__, f"{name} declares no __all__"
    undocumented = [n for n in module.__all__ if not _own_doc(getattr(module, n))]
    assert undocumented == [], f"{name}: {undocumented} have no docstring of their own"
