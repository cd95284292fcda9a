"""Which stream each attention site reads, by dataflow (never by module names): self- or
cross-attention, and in an encoder–decoder graph, encoder or decoder.

A stream source is a token-embedding lookup of a user input or a float [b, t, d] user input
(inputs_embeds, encoder_hidden_states). A site attends to itself when its queries and keys
descend from the same sources, across when they do not (the keys come from another stream: the
encoder's output). Sites whose output feeds a cross-attention's keys are the encoder; in a
graph with cross-attention every other site is the decoder. Pure analysis: no edits.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch.fx import Graph, Node

from .sites import AttentionSite, _is_call, example_value


def _is_stream_source(node: Node, user_inputs: set[Node]) -> bool:
    if _is_call(node, (F.embedding,)):
        ids = example_value(node.args[0]) if isinstance(node.args[0], Node) else None
        return ids is not None and not ids.is_floating_point()
    value = example_value(node)
    return (node in user_inputs and value is not None and value.is_floating_point() and value.dim() == 3)


def _sources(graph: Graph, user_inputs: set[Node]) -> dict[Node, frozenset]:
    """For every node, the stream sources it descends from (graph order: inputs come first)."""
    sources: dict[Node, frozenset] = {}
    for node in graph.nodes:
        if _is_stream_source(node, user_inputs):
            sources[node] = frozenset((node,))
        else:
            sources[node] = frozenset().union(*(sources.get(a, frozenset()) for a in node.all_input_nodes))
    return sources


def site_roles(graph: Graph, sites: list[AttentionSite], user_inputs: set[Node]) -> list[tuple[str | None, str]]:
    """(stack, attends) per site: stack "encoder" | "decoder" | None (no cross-attention in the
    graph: a decoder-only or encoder-only model), attends "self" | "cross"."""
    sources = _sources(graph, user_inputs)
    attends = ["self" if sources[s.q] == sources[s.k] or not sources[s.k] else "cross" for s in sites]
    if "cross" not in attends:
        return [(None, a) for a in attends]
    encoder_streams = {sources[s.k] for s, a in zip(sites, attends) if a == "cross"}
    # an encoder site reads only what the cross-attention keys read, and feeds those keys
    stacks = ["encoder" if a == "self" and sources[s.attn] in encoder_streams else "decoder"
              for s, a in zip(sites, attends)]
    return list(zip(stacks, attends))
