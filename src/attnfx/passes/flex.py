"""FlexAttention's output as one node: dynamo records flex attention as the higher-order op
``torch.ops.higher_order.flex_attention(q, k, v, score_mod, block_mask, scale, kernel_options,
...)`` returning a tuple (out, logsumexp, ...). A site needs one node that reads q, k, v and
produces z = out [b, H, t, d]; `graph.flex.flex_output` is that node, calling the same op with the same
score_mod and block_mask, so the steering and record passes treat it like an SDPA call. Where the
model also reads the log-sum-exp, the original op stays for it (attention then runs twice, and
the log-sum-exp does not see q steering)."""
from __future__ import annotations

import operator

from torch.fx import GraphModule

from ..graph.flex import FLEX, flex_output

_OPERANDS = ("query", "key", "value", "score_mod", "block_mask", "scale", "kernel_options",
             "score_mod_other_buffers", "mask_mod_other_buffers")


def split_flex(gm: GraphModule) -> int:
    """Replace each `getitem(flex_attention(...), 0)` by `flex_output(...)`; returns the count.
    Other outputs (logsumexp) keep reading the original op."""
    done = 0
    for node in list(gm.graph.nodes):
        if not (node.op == "call_function" and node.target is FLEX):
            continue
        operands = dict(zip(_OPERANDS, node.args), **node.kwargs)
        for user in list(node.users):
            if user.target is not operator.getitem or user.args[1] != 0:
                continue
            kwargs = {name: value for name, value in operands.items() if name != "query"}
            with gm.graph.inserting_before(user):
                out = gm.graph.call_function(flex_output, (operands["query"],), kwargs)
            out.meta.update(user.meta)
            user.replace_all_uses_with(out)
            gm.graph.erase_node(user)
            done += 1
        if not node.users:
            gm.graph.erase_node(node)
    return done
