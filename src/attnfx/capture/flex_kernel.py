"""Flex attention in the eager backend, as the bare model runs it.

Run eagerly, the flex attention op computes its dense reference. HF's flex interface never runs
it that way: `compile_friendly_flex_attention` calls flex attention through torch.compile
whenever the model itself is not being compiled, so the bare model's z comes from Inductor's
flex kernel, which differs from the dense reference at round-off (6e-8 on the zoo's Llama). The
eager backend therefore replays the flex outputs that were reached through such a caller (read
off the node's recorded stack) through Inductor: a graph of the one flex op, compiled per input
layout — the kernel the bare model runs, so identity holds bit for bit. A flex call the model
makes directly runs eagerly in the bare model too, and keeps the dense op.
"""
from __future__ import annotations

import functools
import operator
import re
import sys
from collections import OrderedDict

import torch
from torch.fx import Graph, GraphModule

from ..graph.flex import flex_output

_FLEX = torch.ops.higher_order.flex_attention
_MAX_KERNELS = 64          # compiled (layout → kernel) entries kept; one Inductor graph each


def _compiling_callers() -> tuple[re.Pattern, ...]:
    """Stack lines of the functions that run flex attention through torch.compile in eager mode
    (none until transformers' flex integration is imported: no graph can hold a call through it)."""
    module = sys.modules.get("transformers.integrations.flex_attention")
    caller = getattr(module, "compile_friendly_flex_attention", None)
    return () if caller is None else (_stack_line(caller.__code__),)


@functools.cache
def _stack_line(code) -> re.Pattern:
    return re.compile(rf'File "{re.escape(code.co_filename)}", line \d+, in {re.escape(code.co_name)}$', re.M)


def _runs_compiled(node) -> bool:
    trace = node.meta.get("stack_trace") or ""
    return any(pattern.search(trace) for pattern in _compiling_callers())


def replay_compiled_flex(gm: GraphModule) -> int:
    """Point the flex outputs the bare model computes with Inductor at `inductor_flex_output`;
    returns how many."""
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is flex_output and _runs_compiled(node):
            node.target = inductor_flex_output
            count += 1
    if count:
        gm.recompile()
    return count


def inductor_flex_output(query, *, key, value, score_mod, block_mask, scale, kernel_options,
                         score_mod_other_buffers=(), mask_mod_other_buffers=()):
    """graph/flex.flex_output, computed by Inductor's flex kernel: out [b, H, t, d]."""
    operands = (query, key, value, *block_mask[:-1], *score_mod_other_buffers, *mask_mod_other_buffers)
    tensors = [x for x in operands if isinstance(x, torch.Tensor)]
    layout = (id(score_mod), id(block_mask[-1]), scale, repr(kernel_options), torch.is_grad_enabled(),
              tuple(x if not isinstance(x, torch.Tensor) else
                    (x.shape, x.stride(), x.dtype, x.device, x.requires_grad) for x in operands))
    entry = _KERNELS.get(layout)
    if entry is None:
        entry = _KERNELS[layout] = (_compile(query, key, value, score_mod, block_mask, scale, kernel_options,
                                             score_mod_other_buffers, mask_mod_other_buffers, tensors),
                                    score_mod, block_mask[-1])      # kept alive: the key holds their ids
        while len(_KERNELS) > _MAX_KERNELS:
            _KERNELS.popitem(last=False)
    _KERNELS.move_to_end(layout)
    return entry[0](*tensors)[0]


_KERNELS: OrderedDict = OrderedDict()


def _compile(query, key, value, score_mod, block_mask, scale, kernel_options, score_buffers, mask_buffers,
             tensors):
    """Inductor's compilation of one flex op on these operands (tensors become the inputs, in
    operand order), as torch.compile(flex_attention) gives it: the graph dynamo records."""
    from torch._inductor.compile_fx import compile_fx

    graph, root, placeholders = Graph(), torch.nn.Module(), iter(range(len(tensors)))

    def operand(x):
        return graph.placeholder(f"operand_{next(placeholders)}") if isinstance(x, torch.Tensor) else x

    q, k, v = operand(query), operand(key), operand(value)
    mask = tuple(operand(x) for x in block_mask[:-1])
    buffers = tuple(operand(x) for x in score_buffers), tuple(operand(x) for x in mask_buffers)
    root.score_mod, root.mask_mod = score_mod, block_mask[-1]
    mask += (graph.get_attr("mask_mod"),)
    out = graph.call_function(_FLEX, (q, k, v, graph.get_attr("score_mod"), mask, scale, kernel_options, *buffers))
    graph.output((graph.call_function(operator.getitem, (out, 0)),))
    return compile_fx(GraphModule(root, graph), tensors)
