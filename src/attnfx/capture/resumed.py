"""Graphs dynamo compiles for frames that do not hold attnfx's state.

The state marker runs once, in the traced top frame. After a graph break dynamo compiles the
rest of the model as other frames: the frame resumed after the break, or an inner frame it
compiles on its own because the outer graph stopped at the call that breaks (HF's flex
attention builds its padding mask with a data-dependent branch; DBRX's experts loop over a
data-dependent tensor). Their graphs hold attention but no state inputs, and dynamo caches them
per code object, for every model and every spec.

The backend hands such a graph to a `ResumedGraph`, which at each call:

* reads the calling InstrumentedModel from the call context (no model's state is closed over);
* tells which module each site belongs to from the parameter tensors passed in: dynamo calls one
  graph with each layer's parameters when a layer's frame guards the same for every layer, and
  the graph's own module paths are relative to its frame (`L['self'].attn`);
* runs the variant rewritten for that (model structure, spec, sites' modules and occurrences,
  state layout), with the model's current state tensors appended as the extra inputs the
  variant declares.

Variants are built once each: steering is an in-place write on the state tensors, so repeated
calls compile nothing. The first variant is built inside dynamo's compile call (its shape guards
then cover it); later ones (another spec, another layer) when first called.
"""
from __future__ import annotations

import re
import weakref
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx import GraphModule

from ..errors import UninstrumentedExecutionError
from ..graph.sites import find_sites
from .context import current

_SUBMODULE = re.compile(r"\._(?:modules|parameters|buffers)\['([^']*)'\]")
_INDEX = re.compile(r"\[(\d+)\]")
_BOUND_SELF = re.compile(r"\.\w+\.__self__")     # `m.forward.__self__` is `m` (accelerate calls `m._old_forward`)


def dotted(path: str) -> str:
    """dynamo's "L['self']._modules['layers']._modules['0']" or "L['self'].layers[0]" →
    "L['self'].layers.0": sources and module stacks spelled alike."""
    return _BOUND_SELF.sub("", _INDEX.sub(r".\1", _SUBMODULE.sub(r".\1", path)))


@dataclass(frozen=True)
class Anchor:
    """Where a site's module is read from at run time: `index` is a placeholder holding a
    parameter (or buffer) of a module around the site, `suffix` that tensor's name below that
    module (".out_proj.weight"), `below` the site's module below it (".attn", or "")."""
    index: int
    suffix: str
    below: str


def anchors(gm: GraphModule, sites, example_inputs, owner) -> tuple[Anchor, ...]:
    """One anchor per site; raises when a site's module cannot be told from the inputs (no
    parameter of a module around it enters the graph), since the site could then be steered as
    the wrong layer."""
    names = owner._placeholder_names(gm, example_inputs)
    tensors = [(i, dotted(_source_name(node))) for i, node in enumerate(gm.graph.find_nodes(op="placeholder"))
               if names.get(node) is not None and _source_name(node)]
    return tuple(_anchor(site, tensors) for site in sites)


def activation_inputs(gm: GraphModule) -> set:
    """The float inputs of a graph after a break that carry a gradient in from the graph before
    (the stream, under relevance): requiring grad and not a parameter or buffer of the model."""
    found = set()
    for node in gm.graph.find_nodes(op="placeholder"):
        value, source = node.meta.get("example_value"), _source_name(node)
        if (isinstance(value, torch.Tensor) and value.is_floating_point() and value.requires_grad
                and not isinstance(value, torch.nn.Parameter) and "._parameters[" not in source
                and "._buffers[" not in source):
            found.add(node)
    return found


def _source_name(node) -> str:
    source = getattr(node, "_dynamo_source", None)
    name = getattr(source, "name", None)
    return (name() if callable(name) else name) or ""


_FRAME_SELF = "L['self']"      # a method frame's module: the stack names only modules below it


def _anchor(site, tensors) -> Anchor:
    stack = [_FRAME_SELF] + [dotted(path) for path, _ in (site.attn.meta.get("nn_module_stack") or {}).values()]
    for module in reversed(stack):                      # the innermost module with a tensor of its own
        for index, source in tensors:
            if source.startswith(module + "."):
                return Anchor(index, source[len(module):], stack[-1][len(module):])
    raise UninstrumentedExecutionError(
        f"attention in a graph dynamo compiled after a graph break (module {site.module_stack_path!r}) reads no "
        "parameter of a module around it, so attnfx cannot tell which layer runs it; refusing to run it plain")


def locate(anchor: Anchor, args, owner) -> str:
    """The site's module path in the owner's model, for this call's inputs."""
    tensor = args[anchor.index]
    name = _tensor_names(owner).name(tensor)
    full = "." + name if name else None
    if full is None or not full.endswith(anchor.suffix):
        raise UninstrumentedExecutionError(
            f"a graph dynamo compiled after a graph break was called with a tensor that is not "
            f"{type(owner.model).__name__}'s parameter '*{anchor.suffix}' (got {name!r}); attnfx cannot tell which "
            "layer runs its attention, so it refuses to run it")
    return (full[:len(full) - len(anchor.suffix)] + anchor.below).removeprefix(".")


class _TensorNames:
    """Parameter and buffer names of a model by tensor identity, rebuilt when a tensor is new."""

    def __init__(self, model):
        self._model = weakref.ref(model)
        self._build()

    def _build(self):
        model = self._model()
        self._by_id = {}
        if model is not None:               # a tensor under two names (tied) keeps its first, as named_parameters()
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                self._by_id.setdefault(id(tensor), (name, tensor))

    def name(self, tensor) -> str | None:
        entry = self._by_id.get(id(tensor))
        if entry is None or entry[1] is not tensor:     # replaced since (or an id reused): look again
            self._build()
            entry = self._by_id.get(id(tensor))
        return entry[0] if entry is not None and entry[1] is tensor else None


_NAMES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _tensor_names(owner) -> _TensorNames:
    names = _NAMES.get(owner.model)
    if names is None:
        names = _NAMES[owner.model] = _TensorNames(owner.model)
    return names


def copy_graph_module(gm: GraphModule) -> GraphModule:
    """A graph module with its own graph (nodes, their meta and dynamo's input sources) that
    shares gm's submodules and constants: each variant rewrites its own copy."""
    graph = torch.fx.Graph()
    graph._codegen = gm.graph._codegen
    graph.output(graph.graph_copy(gm.graph, {}))
    copy = GraphModule(gm, graph)
    copy.meta = dict(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copy._param_name_to_source = gm._param_name_to_source
    for old, new in zip(gm.graph.find_nodes(op="placeholder"), graph.find_nodes(op="placeholder")):
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    return copy


def add_state_inputs(gm: GraphModule, names, tensors) -> dict:
    """Placeholders for the state, after the graph's own inputs; returns name → node. Their
    example values are static fakes in the mode of dynamo's own, so the compilers trace them."""
    fake_mode = next((v.fake_mode for node in gm.graph.find_nodes(op="placeholder")
                      for v in [node.meta.get("example_value")] if isinstance(v, FakeTensor)), None)
    nodes = {}
    with gm.graph.inserting_before(next(n for n in gm.graph.nodes if n.op != "placeholder")):
        for name, tensor in zip(names, tensors):
            node = nodes[name] = gm.graph.placeholder(f"attnfx_state_{name}")
            node._dynamo_source = None                  # AOTAutograd reads a source per input; None: no guard
            if fake_mode is not None:
                node.meta["example_value"] = fake_mode.from_tensor(tensor, static_shapes=True)
    return nodes


def state_layout(tensors) -> tuple:
    """What a compiled variant specialises its state inputs on (dynamo would guard on it)."""
    return tuple((tuple(t.shape), t.dtype, t.device, t.requires_grad) for t in tensors)


class ResumedGraph:
    """The callable the backend returns for a graph without the state marker (see the module
    docstring). `build(gm, named_inputs, compile_inputs, owner, keys, state)` makes one variant:
    a Runner taking the graph's inputs followed by the owner's state tensors."""

    def __init__(self, gm: GraphModule, example_inputs, ctx, build):
        self._template = gm
        self._build = build
        found, _ = find_sites(gm.graph)
        self._anchors = anchors(gm, found, example_inputs, ctx.owner)
        self._fakes = [node.meta.get("example_value") for node in gm.graph.find_nodes(op="placeholder")]
        self._variants: dict[tuple, object] = {}
        self._variant(ctx, example_inputs, in_dynamo=True)

    def __call__(self, *args):
        ctx = current()
        if ctx is None:
            raise UninstrumentedExecutionError(
                "a graph attnfx compiled after a graph break ran outside an instrumented call; it cannot read any "
                "model's steering state, so it refuses to run")
        runner, state = self._variant(ctx, args, in_dynamo=False)
        return runner(*args, *state)

    def _variant(self, ctx, args, in_dynamo: bool):
        owner = ctx.owner
        keys = self._site_keys(ctx, args)
        state = [getattr(owner, name) for name in owner._state_names]
        key = (owner._structure, owner._spec_key, keys, state_layout(state))
        runner = self._variants.get(key)
        if runner is None:
            compile_inputs = list(args) if in_dynamo else self._fakes
            runner = self._variants[key] = self._build(copy_graph_module(self._template), list(args),
                                                       compile_inputs, owner, keys, state)
        return runner, state

    def _site_keys(self, ctx, args) -> tuple:
        """(module path, occurrence) of each site in this call: a module whose attention runs again
        (one layer module applied at every depth) counts on from the sites already run."""
        keys, seen = [], {}
        for anchor in self._anchors:
            path = locate(anchor, args, ctx.owner)
            keys.append((path, ctx.runs_of.get(path, 0) + seen.get(path, 0)))
            seen[path] = seen.get(path, 0) + 1
        return tuple(keys)
