"""attnfx's internal import graph from the sources (ast, nothing imported): each module's imports of
other attnfx modules, at module level and inside functions (deferred), and the cycles among them.

    .venv/bin/python tools/import_graph.py            the graph, one module per line, and its cycles
    .venv/bin/python tools/import_graph.py --cycles   only the cycles (exit 1 if any)
    .venv/bin/python tools/import_graph.py --packages the graph between attnfx's folders and top-level modules

Between folders the graph must be acyclic too: the folder names read as the data flow
(capture → graph → passes → state → ops; analysis and recipes on top), so a folder importing one
that imports it back is an arrow pointing the wrong way, even where no two modules form a circle.
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "attnfx"


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _resolve(current: str, is_package: bool, node: ast.ImportFrom, known: set[str]) -> list[str]:
    if node.level:
        base = current.split(".") if is_package else current.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not target.startswith(PACKAGE):
        return []
    out = []
    for alias in node.names:                         # `from . import x` names a submodule
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in known else target)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    edges = {name: set() for name in known}
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(name, path.name == "__init__.py", node, set(known))
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith(PACKAGE)]
            else:
                continue
            for target in targets:
                while target not in known and "." in target:
                    target = target.rsplit(".", 1)[0]
                # a package's __init__ importing its own submodules is not a cycle of ideas
                if target in known and target != name and not target.startswith(name + "."):
                    edges[name].add(target)
    return edges


def packages(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph folded onto attnfx's first-level names (a folder, or a top-level module)."""
    def top(name: str) -> str:
        parts = name.split(".")
        return parts[1] if len(parts) > 1 else parts[0]
    folded = {top(name): set() for name in edges}
    for name, targets in edges.items():
        folded[top(name)] |= {top(t) for t in targets if top(t) not in (top(name), PACKAGE)}
    return folded


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), package __init__s excluded."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in edges:
        if v not in index:
            visit(v)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", action="store_true")
    parser.add_argument("--packages", action="store_true")
    args = parser.parse_args()
    edges = packages(graph()) if args.packages else graph()
    if not args.cycles:
        for name in sorted(edges):
            print(f"{name}: {', '.join(sorted(edges[name])) or '-'}")
    found = cycles(edges)
    for component in found:
        print("cycle:", " ↔ ".join(component))
    sys.exit(1 if found and args.cycles else 0)
