"""Graph passes, one per file; `rewrite` orders them and lints/recompiles once."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch.fx import GraphModule, Node

from ..graph import lrp_plan
from ..graph.blocks import find_blocks
from ..graph.sites import AttentionSite
from ..state.spec import Spec
from . import lower as lowering, lrp, probe, record, steer


@dataclass
class Rewritten:
    record_keys: list = field(default_factory=list)
    lowered: list = field(default_factory=list)        # layers lowered onto attnfx::attention
    notes: list = field(default_factory=list)          # sites the lower pass kept, and why
    probed: dict = field(default_factory=dict)         # probe kind → layers gated (-1: tokens)
    leaks: list = field(default_factory=list)          # live ops the lrp pass has no rule for
    lrp_rewrites: int = 0


def rewrite(gm: GraphModule, sites: list[tuple[int, AttentionSite]], spec: Spec, state: dict[str, Node],
            final_norm_input: Node | None, user_inputs: set[Node], *, lower: bool = False,
            rule_ops: bool = True, cross: frozenset = frozenset(), resumed: bool = False) -> Rewritten:
    """steer → record → probe → lower → lrp, then one lint and recompile. resumed: a graph after a
    break, whose inputs are a frame's locals rather than the call's."""
    found = [site for _, site in sites]
    blocks = find_blocks(gm.graph, found, user_inputs, final_norm_input, embeds=not resumed) if spec.touches() else None
    steered = steer.apply(gm, sites, state, value_unbiased=spec.value_unbiased, positions=spec.positions,
                          cross=cross)
    out = Rewritten(record.apply(gm, sites, steered, spec, state, final_norm_input))
    if spec.touches():
        out.probed, captured = probe.apply(gm, sites, blocks, steered, spec, state, final_norm_input)
        out.record_keys += record.append_outputs(gm, captured)
    if lower:
        out.lowered, out.notes = lowering.apply(gm, sites)
    if spec.touches() and spec.rule != "gradient":
        output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        model_outputs = [a for a in output.args[0][:len(output.args[0]) - len(out.record_keys)] if isinstance(a, Node)]
        hidden = [node for node in blocks.mlp_hidden or () if node is not None]
        plan = lrp_plan.plan(gm.graph, lrp_plan.activation_sources(gm.graph, user_inputs), found, spec.rule,
                             model_outputs, branch_reads=hidden)
        out.lrp_rewrites = lrp.apply(gm, plan, spec.rule, rule_ops=rule_ops)
        out.leaks = plan.leaks
    gm.graph.lint()
    gm.recompile()
    return out

