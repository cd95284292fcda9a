"""Which of the fused kernel's maskings an explicit boolean attention mask is, read off its
construction in the graph (a pure analysis; the lower pass uses it).

HF builds SDPA's mask as a conjunction of terms evaluated on position indices, e.g. for a padded
causal batch

    mask = ones & (kv_idx <= q_idx) & attention_mask.bool()[batch_idx, kv_idx]
    q_idx = (arange(T) + c_q)[None, None, :, None]     kv_idx = (arange(S) + c_k)[None, None, None, :]

The kernel takes `causal` (query t sees keys j ≤ t + S − T) and a key mask [b, S]. A causal
term matches when c_q − c_k = S − T holds for every shape (so q_idx read from a runtime
cache_position, whose values the graph does not fix, never matches); a padding term when it
reads a 2-d boolean tensor at (arange(b), kv_idx): its rows 0 … b and columns c_k … c_k + S; an
index compared with a constant it always exceeds (an encoder's q_idx ≥ 0) is neutral. Anything
else — sliding windows, chunked or bidirectional-block masks, additive float masks — is not
recognised, and the site keeps SDPA.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..graph.sites import example_value
from ._build import call

_AND_FN = (operator.and_, torch.logical_and, torch.bitwise_and)
_AND_METHODS = ("__and__", "logical_and", "bitwise_and")
_SAME_VALUE_METHODS = ("to", "expand", "contiguous", "bool")   # on a bool mask: a copy, a device move, a broadcast
_LE = {operator.le: False, torch.le: False, operator.ge: True, torch.ge: True}     # → operands swapped
_LE_METHODS = {"le": False, "__le__": False, "ge": True, "__ge__": True}


@dataclass(frozen=True)
class IndexVector:
    """(arange(n) + offset) laid out along `axis` of a 4-d [b, H, T, S] broadcast."""
    length: object           # n: an int or a SymInt
    length_arg: object       # arange's argument: an int or the graph node holding n
    offset: object           # c: an int or a SymInt (a past length: S − T)
    offset_arg: object       # c as the graph has it: an int or a node
    axis: int


@dataclass(frozen=True)
class MaskTerms:
    causal: bool
    key_mask: Node | None    # the 2-d bool tensor the padding term reads
    key_offset: object = 0   # its first column: an int or a node
    key_length_arg: object = None
    batch_arg: object = None

    def key_mask_node(self, g: Graph) -> Node:
        """The kernel's key mask [b, S]: what the padding term reads, rows 0 … b and columns
        offset … offset + S (a mask input is its own symbol: dynamo does not tie it to b or S)."""
        end = (self.key_length_arg if isinstance(self.key_offset, int) and self.key_offset == 0
               else call(g, operator.add, self.key_length_arg, self.key_offset))
        return call(g, operator.getitem, self.key_mask, (slice(None, self.batch_arg), slice(self.key_offset, end)))


def recognise(mask: Node, q_len, k_len) -> MaskTerms | None:
    """The mask as (causal, key mask), or None when some term is not one of the kernel's."""
    value = example_value(mask)
    if value is None or value.dtype != torch.bool:
        return None
    terms = _terms(mask)
    if terms is None:
        return None
    causal, key_masks = False, []
    for term in terms:
        if term[0] == "causal":
            q, kv = term[1], term[2]
            if not (_same(q.length, q_len) and _same(kv.length, k_len) and _same(q.offset - kv.offset, k_len - q_len)):
                return None
            causal = True
        else:
            _, source, batch, kv = term
            if not (_same(kv.length, k_len) and _same(batch.offset, 0)):
                return None
            key_masks.append((source, batch, kv))
    if len(key_masks) > 1:
        return None
    if not key_masks:
        return MaskTerms(causal, None)
    source, batch, kv = key_masks[0]
    return MaskTerms(causal, source, kv.offset_arg, kv.length_arg, batch.length_arg)


def _same(a, b) -> bool:
    return bool(statically_known_true(a == b))


def _strip(node: Node) -> Node:
    while (isinstance(node, Node) and node.op == "call_method" and node.target in _SAME_VALUE_METHODS
           and _is_bool(node) and _is_bool(node.args[0])):
        node = node.args[0]
    return node


def _is_bool(node) -> bool:
    value = example_value(node) if isinstance(node, Node) else None
    return value is not None and value.dtype == torch.bool


def _terms(node: Node) -> list[tuple] | None:
    node = _strip(node)
    if not isinstance(node, Node) or node.op not in ("call_function", "call_method"):
        return None
    if node.target in _AND_FN or node.target in _AND_METHODS:
        parts = [_terms(a) for a in node.args[:2]]
        return None if any(p is None for p in parts) else parts[0] + parts[1]
    if _always_true(node):
        return []
    swapped = _LE.get(node.target) if node.op == "call_function" else _LE_METHODS.get(node.target)
    if swapped is not None and len(node.args) == 2:
        smaller, larger = (node.args[1], node.args[0]) if swapped else node.args
        if isinstance(smaller, int):                       # idx ≥ c: HF's bidirectional term (q_idx ≥ 0)
            index = _index(larger)
            always = index is not None and isinstance(index.offset, int) and index.offset >= smaller
            return [] if always else None
        kv, q = smaller, larger
        kv, q = _index(kv), _index(q)
        return [("causal", q, kv)] if kv is not None and q is not None and kv.axis == 3 and q.axis == 2 else None
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], tuple):
        return _padding(node)
    return None


def _always_true(node: Node) -> bool:
    """ones(..., dtype=bool) / x.new_ones(..., dtype=bool): the neutral element of the conjunction."""
    is_ones = (node.op == "call_method" and node.target == "new_ones") or (
        node.op == "call_function" and node.target is torch.ones)
    return is_ones and _is_bool(node)


def _padding(node: Node) -> list[tuple] | None:
    source, index = node.args
    source = _strip(source)
    value = example_value(source) if isinstance(source, Node) else None
    if value is None or value.dtype != torch.bool or value.dim() != 2 or len(index) != 2:
        return None
    batch, kv = _index(index[0]), _index(index[1])
    if batch is None or kv is None or batch.axis != 0 or kv.axis != 3:
        return None
    return [("padding", source, batch, kv)]


def _index(node) -> IndexVector | None:
    """arange(n) (+ c) viewed as [..., n, ...] with 4 dims by None/slice indexing."""
    if not (isinstance(node, Node) and node.op == "call_function" and node.target is operator.getitem):
        return None
    base, layout = node.args
    if not isinstance(layout, tuple) or len(layout) != 4:
        return None
    axes = [i for i, entry in enumerate(layout) if isinstance(entry, slice)]
    if len(axes) != 1 or layout[axes[0]] != slice(None) or any(e is not None for i, e in enumerate(layout) if i != axes[0]):
        return None
    offset_arg = 0
    base = _strip_to(base)
    if isinstance(base, Node) and base.op == "call_function" and base.target in (operator.add, torch.add):
        a, b = base.args[:2]
        base, offset_arg = (a, b) if _scalar(b) is not None else (b, a) if _scalar(a) is not None else (None, 0)
        base = _strip_to(base)
    if not (isinstance(base, Node) and base.op == "call_function" and base.target is torch.arange
            and len(base.args) == 1):
        return None
    value = example_value(base)
    return IndexVector(value.shape[0], base.args[0], _scalar(offset_arg), offset_arg, axes[0]) if value is not None else None


def _scalar(arg):
    """An integer operand's value: an int, or a node's SymInt (a size read off a tensor)."""
    if isinstance(arg, int):
        return arg
    value = arg.meta.get("example_value", arg.meta.get("val")) if isinstance(arg, Node) else None
    return value if isinstance(value, (int, torch.SymInt)) else None


def _strip_to(node):
    """Device moves of an index vector (x.to(device))."""
    while isinstance(node, Node) and node.op == "call_method" and node.target == "to" and all(
            not isinstance(a, torch.dtype) for a in node.args[1:]) and "dtype" not in node.kwargs:
        node = node.args[0]
    return node
