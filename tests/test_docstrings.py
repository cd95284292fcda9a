"""Every public callable that takes or gives tensors says their shapes (issue: "every public
function has a docstring that says what it computes, with shapes").

The public surface is test_layout.PUBLIC's modules' `__all__`. For each name there: a function; a
class and, of a class, every method and property it defines itself whose name is public (no
leading underscore) or is `__call__` / `__getitem__` (how `metric(out)` and `rec["z"]` are
reached). The rule, read off the signatures (annotations as written), never off the docstrings:

* a callable involves tensors when a parameter's or its return annotation names `Tensor`, or its
  return annotation is a class or alias that carries tensors;
* a class carries tensors when it is a dataclass or NamedTuple with a field annotated `Tensor`
  (a result object: LogitAttribution, PatchingResult, ...), or an alias whose value names
  `Tensor` (metrics.Metric: logits → [b]);
* each such callable's own docstring (not an inherited one), and each tensor-carrying class's
  own docstring, holds a shape in the project's bracket notation (docs/design.md §2): square
  brackets around a list whose entries include one of the axis names below, e.g. `[b, t, H,
  d_head]`, `[L, H]`, `[b]`, `[..., vocab]`.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import re

import pytest

from test_layout import PUBLIC, _own_doc

# axis names: b batch, t / T query positions, s / S key positions, L layers, H heads (H_kv kv heads),
# d / d_head head width, d_model / D the stream's width, d_mlp, V / vocab the vocabulary, n items
# (examples of a detector, a direction's width), f features
SHAPE = re.compile(r"\[[^\[\]]*\b(b|t|s|T|S|L|H|H_kv|d|d_head|d_model|D|d_mlp|V|vocab|n|f)\b[^\[\]]*\]")

# Public names that involve tensors and still state no shape; each entry must still fail the
# rule (a fixed one is removed from here). Empty: every one states its shapes.
LACKING_SHAPES: set[str] = set()


def _doc(value) -> str:
    """The docstring written for it: a function's own __doc__ (inspect.getdoc would fall back to
    an overridden method's), a class's as test_layout reads it."""
    if inspect.isclass(value):
        return _own_doc(value)
    return inspect.cleandoc(getattr(value, "__doc__", None) or "")


def _annotation_text(annotation) -> str:
    if annotation is inspect.Parameter.empty:
        return ""
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def _carries_tensors(value) -> bool:
    """A dataclass or NamedTuple with a Tensor field, or an alias that names Tensor."""
    if inspect.isclass(value):
        if dataclasses.is_dataclass(value):
            return any("Tensor" in _annotation_text(f.type) for f in dataclasses.fields(value))
        if issubclass(value, tuple) and hasattr(value, "_fields"):
            return any("Tensor" in _annotation_text(a) for a in getattr(value, "__annotations__", {}).values())
        return False
    return "Tensor" in repr(value)


def _resolve(text: str, namespace: dict):
    try:
        return eval(text.strip("'\""), dict(namespace))      # noqa: S307 (an annotation of our own source)
    except Exception:
        return None


def involves_tensors(fn) -> bool:
    signature = inspect.signature(fn)
    texts = [_annotation_text(p.annotation) for p in signature.parameters.values()]
    returns = _annotation_text(signature.return_annotation)
    if any("Tensor" in text for text in texts + [returns]):
        return True
    # the module's names, past any decorator (torch.no_grad's wrapper lives in torch)
    namespace = getattr(inspect.unwrap(fn), "__globals__", {})
    return bool(returns) and _carries_tensors(_resolve(returns, namespace))


def _members(cls):
    """(name, function) of the methods and properties the class defines itself."""
    for name, value in vars(cls).items():
        if name.startswith("_") and name not in ("__call__", "__getitem__"):
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        elif isinstance(value, property):
            value = value.fget
        if inspect.isfunction(value):
            yield name, value


def public_callables():
    """(qualified name, object, needs a shape) for every public function, class and method, once."""
    seen = {}
    for module_name in PUBLIC:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            value = getattr(module, name)
            if not (inspect.isfunction(value) or inspect.isclass(value)):
                continue
            qualified = f"{value.__module__}.{value.__qualname__}"
            if qualified in seen:
                continue
            if inspect.isfunction(value):
                seen[qualified] = (value, involves_tensors(value))
                continue
            seen[qualified] = (value, _carries_tensors(value))
            for member, fn in _members(value):
                seen[f"{qualified}.{member}"] = (fn, involves_tensors(fn))
    return seen


def lacks_shape(value) -> bool:
    return not SHAPE.search(_doc(value))


def test_the_shape_pattern_reads_the_notation():
    for text in ("[b, t, H, d_head]", "[L, H]", "[b]", "[..., vocab]", "[L, b, t(, H), d]", "[n + 1, b, P, vocab]",
                 "[b, s, H_kv, d]", "[n, f]"):
        assert SHAPE.search(text), text
    for text in ("[(layer, head), ...]", "[start, end)", "[0, 1]", "(b, t)", "[batch, seq]", "[groups]", "b, t"):
        assert not SHAPE.search(text), text


@dataclasses.dataclass
class _Result:                          # a result object, as the rule reads one (module level: resolvable)
    scores: "torch.Tensor"


def test_the_rule_reads_signatures():
    import torch

    def takes(x: torch.Tensor) -> None:
        """Nothing."""

    def gives() -> "torch.Tensor":
        """Nothing."""

    def neither(x: int) -> str:
        """Nothing."""

    def result() -> _Result:
        """Nothing."""

    assert involves_tensors(takes) and involves_tensors(gives) and involves_tensors(result)
    assert not involves_tensors(neither)
    assert _carries_tensors(_Result) and not _carries_tensors(dataclasses.make_dataclass("Plain", [("n", int)]))
    assert lacks_shape(takes)
    takes.__doc__ = "x [b, t, d_model] → nothing."
    assert not lacks_shape(takes)


def test_the_rule_covers_the_surface():
    """The rule sees the signatures it is about: a sample of what must and must not need shapes."""
    found = public_callables()
    must = ["attnfx.analysis.attribution.head_attribution", "attnfx.analysis.attribution.LogitAttribution",
            "attnfx.analysis.relevance.relevance", "attnfx.analysis.relevance.Relevance.heads",
            "attnfx.analysis.patching.activation_patching", "attnfx.analysis.metrics.logit_diff",
            "attnfx.analysis.metrics.OutputsMetric.__call__", "attnfx.state.steering.Steering.patch",
            "attnfx.state.steering.Steering.mean_z", "attnfx.recipes.lookback.Detector.score",
            "attnfx.recipes.retrieval.CopyPrompt", "attnfx.analysis.lens.logit_lens"]
    assert [name for name in must if not found[name][1]] == []
    assert not found["attnfx.api.instrument"][1] and not found["attnfx.models.loader.default_dir"][1]


def test_every_public_callable_with_tensors_states_their_shapes():
    found = public_callables()
    missing = sorted(name for name, (value, needs) in found.items()
                     if needs and lacks_shape(value) and name not in LACKING_SHAPES)
    assert missing == [], (f"{missing}: these take or give tensors and their docstrings state no shape "
                           f"in bracket notation (e.g. [b, t, H, d_head], [L, H])")


def test_the_allow_list_is_what_is_left():
    found = public_callables()
    stale = sorted(name for name in LACKING_SHAPES if name not in found or not found[name][1]
                   or not lacks_shape(found[name][0]))
    assert stale == [], f"{stale}: now state their shapes (or are gone): remove them from LACKING_SHAPES"


@pytest.mark.parametrize("module_name", PUBLIC)
def test_public_methods_have_docstrings_of_their_own(module_name):
    """Beyond test_layout's names: each public method or property of a public class says what it is."""
    module = importlib.import_module(module_name)
    bare = [f"{value.__qualname__}.{member}" for value in (getattr(module, n) for n in module.__all__)
            if inspect.isclass(value) and value.__module__ == module_name
            for member, fn in _members(value) if not _doc(fn)]
    assert bare == [], f"{module_name}: {bare} have no docstring of their own"
