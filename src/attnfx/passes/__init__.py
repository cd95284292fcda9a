"""Graph passes, one per file; `rewrite` orders them and lints/recompiles once."""
from __future__ import annotations

from torch.fx import GraphModule, Node

from ..sites import AttentionSite
from ..spec import Spec
from . import record, steer


def rewrite(gm: GraphModule, sites: list[tuple[int, AttentionSite]], spec: Spec,
            state: dict[str, Node], final_norm_input: Node | None) -> list[record.RecordKey]:
    steered = steer.apply(gm, sites, state)
    keys = record.apply(gm, sites, steered, spec, state, final_norm_input)
    gm.graph.lint()
    gm.recompile()
    return keys
