"""Position-selective steering: which token positions a knob acts on, read at run time.

State (Spec.positions; written by steering.Positions, never recompiling within its capacity):

    where_index  [G, B, K] int64   group g's positions, per row (B = 1: the same for every row),
                                   padded with spec.NONE; a negative index counts from the end of the
                                   sequence so far (−1: each call's newest token, also in generate)
    where_all    [G, B] fp32       1 where group g is every position of row b (group 0: every row)
    where_offset [1] int64         the call's first absolute position (the KV cache's length)
    at_<knob>    [L, H] int64      each head knob's group per (layer, head)

Positions are absolute: a query (or stream) row i of a call sits at offset + i; a self-attention's
S keys are the last S of the offset + t so far (bottom-right, as with a sliding-window cache); a
cross-attention's keys are the encoder's positions 0 … S − 1.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import Node

from ._build import call



def _masks(g, index: Node, every: Node, end: Node, length: Node) -> Node:
    """[X, B, n] fp32 for groups' indices [X, B, K] and per-row all-position flags [X, B]: 1 where
    a group covers the axis positions end − n … end − 1 (end: int64 [1], the length so far; n:
    the axis' size at run time)."""
    ones = call(g, "new_ones", end, (length,))
    positions = call(g, operator.add, call(g, operator.sub, end, length),
                     call(g, operator.sub, call(g, "cumsum", ones, 0), 1))             # [n]
    resolved = call(g, torch.where, call(g, operator.lt, index, 0), call(g, operator.add, index, end), index)
    hit = call(g, "any", call(g, operator.eq, call(g, "unsqueeze", resolved, -1), positions), 2)   # [X, B, n]
    return call(g, torch.maximum, call(g, "to", hit, torch.float32), call(g, "unsqueeze", every, -1))


def head_mask(g, state: dict[str, Node], groups: Node, end: Node, length: Node, repeat: int = 1) -> Node:
    """Each head's mask [B, H, n, 1] fp32 from its group ([H] int64; a kv head's group repeated for
    the `repeat` heads that read it), gathered per head: the cost does not grow with the groups."""
    if repeat > 1:
        groups = call(g, "repeat_interleave", groups, repeat)
    index = call(g, operator.getitem, state["where_index"], groups)                  # [H, B, K]
    every = call(g, operator.getitem, state["where_all"], groups)                    # [H, B]
    per_head = _masks(g, index, every, end, length)                                  # [H, B, n]
    return call(g, "unsqueeze", call(g, "permute", per_head, 1, 0, 2), -1)


def stream_addition(g, state: dict[str, Node], vectors: Node, x: Node) -> Node:
    """Σ_g m_g · v_g for a stream x [b, t, d] and a layer's vectors [G_v, d] (the first G_v groups):
    [B, t, d] fp32."""
    t = call(g, "size", x, 1)
    count = call(g, "size", vectors, 0)
    index = call(g, torch.narrow, state["where_index"], 0, 0, count)
    every = call(g, torch.narrow, state["where_all"], 0, 0, count)
    masks = _masks(g, index, every, call(g, operator.add, state["where_offset"], t), t)   # [G_v, B, t]
    return call(g, torch.einsum, "gbt,gd->btd", masks, call(g, "to", vectors, torch.float32))


def at_positions(g, coef: Node, mask: Node, identity: float) -> Node:
    """A per-head coefficient [1, H, 1, 1] (fp32) acting only where mask is 1: identity + (coef −
    identity) · mask, [B, H, n, 1]."""
    if identity == 0.0:
        return call(g, operator.mul, coef, mask)
    return call(g, operator.add, identity, call(g, operator.mul, call(g, operator.sub, coef, identity), mask))
