"""Graph passes, one per file; `rewrite` orders them and lints/recompiles once."""
from __future__ import annotations

from torch.fx import GraphModule, Node

from ..sites import AttentionSite
from ..spec import Spec
from . import lower as lowering, record, steer


def rewrite(gm: GraphModule, sites: list[tuple[int, AttentionSite]], spec: Spec,
            state: dict[str, Node], final_norm_input: Node | None, *, lower: bool = False
            ) -> tuple[list[record.RecordKey], list[int], list[str]]:
    """Returns the record keys, the layers lowered onto attnfx::attention and notes on the rest."""
    steered = steer.apply(gm, sites, state)
    keys = record.apply(gm, sites, steered, spec, state, final_norm_input)
    lowered, notes = lowering.apply(gm, sites) if lower else ([], [])
    gm.graph.lint()
    gm.recompile()
    return keys, lowered, notes
