"""The node a FlexAttention output becomes (passes/flex.py makes it, sites.py recognises it):
one call that reads q, k, v and returns out [b, H, t, d], with flex attention's own score_mod and
block_mask. It lives with the graph's vocabulary, not with the pass, so that reading a graph never
imports a pass."""
from __future__ import annotations

import torch

FLEX = torch.ops.higher_order.flex_attention


def flex_output(query, *, key, value, score_mod, block_mask, scale, kernel_options,
                score_mod_other_buffers=(), mask_mod_other_buffers=()):
    """out [b, H, t, d] of flex attention. key and value are keywords so that a steering pass
    replacing `value` never touches key (they may be the same node)."""
    return FLEX(query, key, value, score_mod, block_mask, scale, kernel_options,
                 score_mod_other_buffers, mask_mod_other_buffers)[0]
