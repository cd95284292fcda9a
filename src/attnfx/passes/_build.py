"""Small helpers to insert nodes and rewire one operand."""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx import Graph, Node
from torch.fx.node import map_arg


def call(graph: Graph, target, *args, **kwargs) -> Node:
    if isinstance(target, str):
        return graph.call_method(target, args, kwargs)
    return graph.call_function(target, args, kwargs)


def right_after(node: Node) -> Node:
    """The node to insert before to act on `node`'s value first: its next one, or, when `node` is
    a graph input (a block compiled alone reads the stream as one: offloaded layers, graph
    breaks), the first node after every input, so that the state inputs are defined by then."""
    after = node.next
    while after.op == "placeholder":
        after = after.next
    return after


def replace_operand(user: Node, old: Node, new: Node, index: int, name: str) -> None:
    """Make `user` read `new` where it read `old` at positional `index` or keyword `name`."""
    if len(user.args) > index and user.args[index] is old:
        user.update_arg(index, new)
    elif user.kwargs.get(name) is old:
        user.update_kwarg(name, new)
    else:
        raise RuntimeError(f"{user.name} does not read {old.name} as operand {index}/{name}")


def fill_example_values(gm) -> None:
    """Give the nodes the passes inserted the `example_value` dynamo gives its own, by running
    each on its inputs' fake values. AOT autograd's on-disk cache only keys graphs whose method
    calls act on tensors it can see as such; without this every rewritten graph bypassed it."""
    # the mode of dynamo's own example values (the backend's tracing context may hold another)
    fake_mode = next((value.fake_mode for node in gm.graph.nodes if node.op == "placeholder"
                      for value in [node.meta.get("example_value")] if isinstance(value, FakeTensor)), None)
    if fake_mode is None:
        return

    def fake(value):
        if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
            return fake_mode.from_tensor(value, static_shapes=True)
        return value

    missing = object()
    with fake_mode:
        for node in gm.graph.nodes:
            if "example_value" in node.meta:
                continue
            if node.op == "get_attr":
                node.meta["example_value"] = fake(getattr(gm, node.target))
                continue
            if node.op not in ("call_function", "call_method"):
                continue
            args, kwargs = map_arg((node.args, node.kwargs),
                                   lambda n: n.meta.get("example_value", n.meta.get("val", missing)))
            if any(value is missing for value in torch.utils._pytree.tree_leaves((args, kwargs))):
                continue
            try:
                node.meta["example_value"] = (node.target(*args, **kwargs) if node.op == "call_function"
                                              else getattr(args[0], node.target)(*args[1:], **kwargs))
            except Exception:       # metadata only: without it this graph just bypasses the cache
                continue
