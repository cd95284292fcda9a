"""The state marker: a no-op custom op declared as mutating its tensors.

Dynamo drops buffers that the traced code does not compute with; a mutating op is kept, so
calling it on the wrapper's state buffers makes dynamo lift them as graph inputs (exactly as
parameters are lifted). The backend reads the state placeholders from this node's arguments,
reads the Spec from its string argument, and erases it (docs/design.md §1)."""
from __future__ import annotations

import torch
from torch.fx import Node


@torch.library.custom_op("attnfx::declare_state", mutates_args=("state",))
def declare_state(state: list[torch.Tensor], spec: str) -> None:
    return None


@declare_state.register_fake
def _(state, spec):
    return None


def is_marker(node: Node) -> bool:
    return node.op == "call_function" and node.target in (
        torch.ops.attnfx.declare_state, torch.ops.attnfx.declare_state.default)


def find_marker(graph) -> Node | None:
    return next((n for n in graph.nodes if is_marker(n)), None)
