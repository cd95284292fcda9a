"""Small helpers to insert nodes and rewire one operand."""
from __future__ import annotations

from torch.fx import Graph, Node


def call(graph: Graph, target, *args, **kwargs) -> Node:
    if isinstance(target, str):
        return graph.call_method(target, args, kwargs)
    return graph.call_function(target, args, kwargs)


def replace_operand(user: Node, old: Node, new: Node, index: int, name: str) -> None:
    """Make `user` read `new` where it read `old` at positional `index` or keyword `name`."""
    if len(user.args) > index and user.args[index] is old:
        user.update_arg(index, new)
    elif user.kwargs.get(name) is old:
        user.update_kwarg(name, new)
    else:
        raise RuntimeError(f"{user.name} does not read {old.name} as operand {index}/{name}")
