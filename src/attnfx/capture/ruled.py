"""Graphs without attention that run inside an instrumented call: what a graph break or an
offloaded block leaves between and after the graphs holding attention (a block's frame after its
hook, the final norm and unembedding in a graph of their own). They hold no head to steer or
record, but relevance passes through them: under AttnLRP or CP-LRP their norms and nonlinear ops
need the same rules as the attention graphs' (docs/design.md §3), or the relevance comes back
off by the plain gradient's error there.

A `RuledGraph` runs the graph as compiled for the plain gradient, and, when the call's spec asks
for another rule, a variant rewritten by the lrp pass for that rule (built once per rule; the
relevance enters as the float inputs that require grad, the stream from the gated graph before).
"""
from __future__ import annotations

from torch.fx import GraphModule

from ..graph.unembed import unembedding_width
from .context import current
from .resumed import copy_graph_module


class RuledGraph:
    """The callable the backend returns for a graph without attention compiled inside an
    instrumented call. `build(gm, compile_inputs, rule)` compiles one variant and returns
    (callable, leaks): the ops of the graph the rule has no rule for."""

    def __init__(self, gm: GraphModule, example_inputs, build):
        self._template, self._build = copy_graph_module(gm), build
        self._fakes = [node.meta.get("example_value") for node in gm.graph.find_nodes(op="placeholder")]
        self._variants = {"gradient": build(gm, list(example_inputs), "gradient")}
        self._unembedding = unembedding_width(gm.graph)

    def __call__(self, *args):
        ctx = current()
        rule = ctx.owner._spec.rule if ctx is not None else "gradient"
        variant = self._variants.get(rule)
        if variant is None:
            variant = self._variants[rule] = self._build(copy_graph_module(self._template), self._fakes, rule)
        fn, leaks = variant
        if ctx is not None:
            ctx.leaks.extend(leaks)
            if self._unembedding is not None:
                ctx.unembeddings.append(self._unembedding)
        return fn(*args)
