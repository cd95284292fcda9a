"""The shared dynamo backend. One instance per execution mode for the whole process: dynamo
guards on the backend, so a backend per model would recompile per model and, past dynamo's
recompile limit, silently run un-instrumented (docs/design.md §1). Per-model state never lives here:
it arrives as graph inputs (the marker; after a graph break, capture/resumed.py), and the owner
of a call is read from the call context."""
from __future__ import annotations

import warnings

import torch
from torch._dynamo.utils import counters
from torch.fx import GraphModule, Node

from .. import passes
from ..passes._build import fill_example_values
from ..passes import decompose
from ..errors import LoweringWarning, UninstrumentedExecutionError
from ..graph import lrp_plan
from ..graph.sites import find_sites
from ..graph.unembed import unembedding_width
from ..passes import lrp
from ..state.spec import Spec
from .checkpoint import inline_checkpoints
from .context import current
from .flex_kernel import replay_compiled_flex
from .marker import find_marker
from .resumed import ResumedGraph, activation_inputs, add_state_inputs
from .ruled import RuledGraph

MODES = ("eager", "aot_eager", "inductor")


class Runner:
    """Runs one compiled graph, peels the records off its outputs and reports them, with the
    sites it executed, to the current call context."""

    def __init__(self, fn, info, num_outputs, record_keys, probed=None, leaks=(), unembedding=None):
        self.fn, self.info, self.num_outputs, self.record_keys = fn, info, num_outputs, record_keys
        self.probed, self.leaks, self.unembedding = probed or {}, list(leaks), unembedding

    def __call__(self, *args):
        outs = self.fn(*args)
        ctx = current()
        if ctx is not None:
            ctx.graphs_run += 1
            ctx.sites_run.extend(self.info.sites)
            for site in self.info.sites:
                ctx.runs_of[site.module_path] = ctx.runs_of.get(site.module_path, 0) + 1
            ctx.notes.extend(self.info.notes)
            ctx.final_norm = ctx.final_norm or self.info.final_norm
            ctx.records.extend(zip(self.record_keys, outs[self.num_outputs:]))
            for kind, layers in self.probed.items():
                ctx.probed.setdefault(kind, []).extend(layers)
            ctx.leaks.extend(self.leaks)
            if self.unembedding is not None:
                ctx.unembeddings.append(self.unembedding)
        return outs[: self.num_outputs] if self.record_keys else outs


class Backend:
    def __init__(self, mode: str):
        self.mode = mode
        self.__name__ = f"attnfx_{mode}"

    def __repr__(self):
        return f"attnfx.Backend({self.mode!r})"

    def __call__(self, gm: GraphModule, example_inputs):
        ctx = current()
        inline_checkpoints(gm)                   # checkpointed layers hide their attention in a subgraph
        decompose.apply(gm)                      # opaque attention calls (nn.MultiheadAttention, flex) made explicit
        marker = find_marker(gm.graph)
        if marker is None or ctx is None:
            sites, _ = find_sites(gm.graph)
            if not sites and ctx is not None:          # between or after the attention graphs: relevance
                return RuledGraph(gm, example_inputs, self._ruled_variant)      # passes through (ruled.py)
            if not sites:
                return self._compile(gm, example_inputs)
            if ctx is None:
                raise UninstrumentedExecutionError(
                    f"a graph with {len(sites)} attention site(s) was captured outside an instrumented call; "
                    "attnfx cannot steer or record it, so it refuses to run it plain")
            # a frame after a graph break: the state comes in at each call (capture/resumed.py)
            return ResumedGraph(gm, example_inputs, ctx, self._resumed_variant)
        spec = Spec.parse(marker.args[1])
        state = dict(zip(spec.state_names(), marker.args[0]))
        gm.graph.erase_node(marker)
        return self._instrument(gm, example_inputs, example_inputs, ctx.owner, spec, state)

    def _resumed_variant(self, gm, named_inputs, compile_inputs, owner, keys, state_tensors):
        """One variant of a resumed graph: the owner's state as placeholders after its inputs."""
        state = add_state_inputs(gm, owner._state_names, state_tensors)
        fakes = [node.meta.get("example_value", tensor) for node, tensor in zip(state.values(), state_tensors)]
        return self._instrument(gm, named_inputs, [*compile_inputs, *fakes], owner, owner._spec, state, keys)

    def _ruled_variant(self, gm, compile_inputs, rule: str):
        """A graph without attention compiled for `rule`: as it is for the plain gradient, else with
        the lrp pass's rules, relevance entering at its activation inputs. (callable, leaks)."""
        if rule == "gradient":
            return self._compile(gm, compile_inputs), []
        output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        outputs = [a for a in torch.utils._pytree.tree_leaves(output.args[0]) if isinstance(a, Node)]
        plan = lrp_plan.plan(gm.graph, lrp_plan.activation_sources(gm.graph, activation_inputs(gm)), [], rule,
                             outputs)
        counters["attnfx"]["lrp_rewrites"] += lrp.apply(gm, plan, rule, rule_ops=self.mode != "inductor")
        gm.graph.lint()
        gm.recompile()
        return self._compile(gm, compile_inputs), list(plan.leaks)

    def _instrument(self, gm, named_inputs, compile_inputs, owner, spec: Spec, state: dict, keys=None) -> Runner:
        """Find the sites, rewrite them for `spec` with `state` (name → placeholder) and compile.
        named_inputs are the real tensors the placeholders are named by (parameters by identity);
        keys, when given, are the sites' (module path, occurrence) (a resumed graph's own paths are
        relative to its frame)."""
        found, notes = find_sites(gm.graph)
        info = owner._describe_graph(gm, named_inputs, found, notes, keys)
        width = unembedding_width(gm.graph)
        num_outputs = len(next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0])
        if spec.discover:
            gm.recompile()
            return Runner(gm.forward, info, num_outputs, [])
        layered = [(site_info.layer, site) for site_info, site in zip(info.sites, found)]
        user_inputs = owner._user_inputs(gm, named_inputs, set(state.values()))
        done = passes.rewrite(gm, layered, spec, state, owner._final_norm_input(gm), user_inputs,
                              lower=owner._lower or _relevance_on_cuda(spec, compile_inputs),
                              rule_ops=self.mode != "inductor",
                              cross=frozenset(i.layer for i in info.sites if i.attends == "cross"),
                              resumed=keys is not None)
        if done.notes:
            warnings.warn("attnfx lower=True: " + "; ".join(done.notes), LoweringWarning, stacklevel=2)
        counters["attnfx"]["graphs_compiled"] += 1
        counters["attnfx"]["sites_rewritten"] += len(found)
        counters["attnfx"]["sites_lowered"] += len(done.lowered)
        counters["attnfx"]["components_probed"] += sum(len(layers) for layers in done.probed.values())
        counters["attnfx"]["lrp_rewrites"] += done.lrp_rewrites
        return Runner(self._compile(gm, compile_inputs), info, num_outputs, done.record_keys, done.probed,
                      done.leaks, width)

    def _compile(self, gm, example_inputs):
        if self.mode == "eager":
            replay_compiled_flex(gm)             # flex attention as the bare model runs it (flex_kernel.py)
            return gm.forward
        fill_example_values(gm)
        if self.mode == "aot_eager":
            from torch._dynamo.backends.debugging import aot_eager
            return aot_eager(gm, example_inputs)
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs)


def _relevance_on_cuda(spec: Spec, example_inputs) -> bool:
    """Relevance graphs on CUDA run attention on the fused kernel in its AttnLRP mode (sites it
    cannot take keep SDPA with the rule applied around it, named in a LoweringWarning)."""
    on_cuda = any(getattr(x, "is_cuda", False) for x in example_inputs)
    return spec.touches() and spec.rule == "attnlrp" and on_cuda


BACKENDS = {mode: Backend(mode) for mode in MODES}
