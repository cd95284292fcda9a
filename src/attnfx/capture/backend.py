"""The shared dynamo backend. One instance per execution mode for the whole process: dynamo
guards on the backend, so a backend per model would recompile per model and, past dynamo's
recompile limit, silently run un-instrumented (DESIGN §1). Per-model state never lives here:
it arrives as graph inputs (the marker), and the owner of a call is read from the call
context."""
from __future__ import annotations

import warnings

from torch._dynamo.utils import counters
from torch.fx import GraphModule

from .. import passes
from ..passes._build import fill_example_values
from ..passes import decompose
from ..errors import LoweringWarning, UninstrumentedExecutionError
from ..sites import find_sites
from ..spec import Spec
from .checkpoint import inline_checkpoints
from .context import current
from .marker import find_marker

MODES = ("eager", "aot_eager", "inductor")


class Runner:
    """Runs one compiled graph, peels the records off its outputs and reports them, with the
    sites it executed, to the current call context."""

    def __init__(self, fn, info, num_outputs, record_keys, probed=None, leaks=()):
        self.fn, self.info, self.num_outputs, self.record_keys = fn, info, num_outputs, record_keys
        self.probed, self.leaks = probed or {}, list(leaks)

    def __call__(self, *args):
        outs = self.fn(*args)
        ctx = current()
        if ctx is not None:
            ctx.graphs_run += 1
            ctx.sites_run.extend(self.info.sites)
            ctx.notes.extend(self.info.notes)
            ctx.final_norm = ctx.final_norm or self.info.final_norm
            ctx.records.extend(zip(self.record_keys, outs[self.num_outputs:]))
            for kind, layers in self.probed.items():
                ctx.probed.setdefault(kind, []).extend(layers)
            ctx.leaks.extend(self.leaks)
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
            if sites:
                raise UninstrumentedExecutionError(
                    f"a graph with {len(sites)} attention site(s) was captured without attnfx's state "
                    "(a graph break between the instrumented call and the attention); attnfx cannot "
                    "steer or record it, so it refuses to run it plain")
            return self._compile(gm, example_inputs)
        spec = Spec.parse(marker.args[1])
        state = dict(zip(spec.state_names(), marker.args[0]))
        gm.graph.erase_node(marker)
        found, notes = find_sites(gm.graph)
        info = ctx.owner._describe_graph(gm, example_inputs, found, notes)
        num_outputs = len(next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0])
        if spec.discover:
            gm.recompile()
            return Runner(gm.forward, info, num_outputs, [])
        layered = [(site_info.layer, site) for site_info, site in zip(info.sites, found)]
        user_inputs = ctx.owner._user_inputs(gm, example_inputs, set(state.values()))
        done = passes.rewrite(gm, layered, spec, state, ctx.owner._final_norm_input(gm), user_inputs,
                              lower=ctx.owner._lower or _relevance_on_cuda(spec, example_inputs),
                              rule_ops=self.mode != "inductor")
        if done.notes:
            warnings.warn("attnfx lower=True: " + "; ".join(done.notes), LoweringWarning, stacklevel=2)
        counters["attnfx"]["graphs_compiled"] += 1
        counters["attnfx"]["sites_rewritten"] += len(found)
        counters["attnfx"]["sites_lowered"] += len(done.lowered)
        counters["attnfx"]["components_probed"] += sum(len(layers) for layers in done.probed.values())
        counters["attnfx"]["lrp_rewrites"] += done.lrp_rewrites
        return Runner(self._compile(gm, example_inputs), info, num_outputs, done.record_keys, done.probed,
                      done.leaks)

    def _compile(self, gm, example_inputs):
        if self.mode == "eager":
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
