"""Activation checkpointing, as dynamo captures it: `torch.utils.checkpoint` (HF's gradient
checkpointing) becomes a `tag_activation_checkpoint` higher-order op whose body — the whole
decoder layer, attention included — is a subgraph that the site patterns cannot see or rewrite.

`inline_checkpoints` moves each body into the parent graph and tags its nodes as AOTAutograd's
own lowering of the op does (`recompute` = PREFER_RECOMPUTE, one `ac_graph_id` per region), so
AOTAutograd's partitioners (aot_eager, Inductor) still recompute the region in the backward
instead of saving its activations. The eager backend runs the inlined graph as it is: correct
values and gradients, with the region's activations saved.
"""
from __future__ import annotations

import contextlib
import itertools
import operator

import torch
from torch.fx import GraphModule, Node

_REGION_IDS = itertools.count(1 << 20)          # apart from the ids torch numbers its own regions with


def side_effects_not_replayed():
    """Context in which dynamo traces a checkpointed layer whose forward mutates state outside it
    (transformers ≥ 5.25 sets its output collector there) instead of breaking the graph at the
    checkpoint — a break that would run the layer, attention included, without attnfx's graph.
    The backward's recompute then does not replay that mutation (eager checkpointing does)."""
    config = torch._dynamo.config
    if not hasattr(config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        return contextlib.nullcontext()
    return config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True)


def _is_checkpoint(node: Node) -> bool:
    hop = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)
    return node.op == "call_function" and hop is not None and node.target is hop


def inline_checkpoints(gm: GraphModule) -> int:
    """Inline every checkpointed region (nested ones too); returns how many were inlined."""
    from torch.utils.checkpoint import CheckpointPolicy

    count = 0
    while True:
        hop = next((n for n in gm.graph.nodes if _is_checkpoint(n)), None)
        if hop is None:
            break
        body: GraphModule = getattr(gm, hop.args[0].target)
        region = next(_REGION_IDS)
        env = dict(zip((n for n in body.graph.nodes if n.op == "placeholder"), hop.args[1:]))
        result = None
        with gm.graph.inserting_before(hop):
            for node in body.graph.nodes:
                if node.op == "placeholder":
                    continue
                if node.op == "output":
                    result = node.args[0]
                    break
                copy = gm.graph.node_copy(node, lambda n: env[n])
                if copy.op == "get_attr":            # a nested region's body: give the parent the module
                    copy.target = _adopt(gm, body, node.target)
                copy.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
                copy.meta["ac_graph_id"] = region
                env[node] = copy
        outputs = torch.fx.node.map_arg(result, lambda n: env[n])
        for user in list(hop.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(outputs[user.args[1]])
                gm.graph.erase_node(user)
            else:
                user.replace_input_with(hop, outputs)
        body_node = hop.args[0]
        gm.graph.erase_node(hop)
        if not body_node.users:
            gm.graph.erase_node(body_node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _adopt(gm: GraphModule, body: GraphModule, target: str) -> str:
    name = f"_attnfx_inlined_{target}"
    while hasattr(gm, name):
        name += "_"
    gm.add_submodule(name, getattr(body, target))
    return name
