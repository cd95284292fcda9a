"""Lowering pass: put attnfx's fused attention op (`attnfx::attention`, the Triton kernel on CUDA)
in place of each lowerable `F.scaled_dot_product_attention` call.

Runs last, on the already steered and recorded graph: the SDPA node's operands are the steered
q and v, and every user of its output (the z steering, the records) now reads the op's z. A
site is lowerable when its masking is fully described by is_causal (no explicit attn_mask) and
it has no dropout and a constant scale, and — when causal — its query and key lengths are the
same symbol: SDPA aligns is_causal top-left and the kernel bottom-right (the KV-cache
convention), which agree only for T == S. GQA through enable_gqa maps onto the kernel's kv
heads directly. Sites that are not lowered keep SDPA and are named in the returned notes, which
the backend raises as a warning — never silently.

An explicit boolean attn_mask is lowered too when its construction is a conjunction of terms
the kernel has (attnfx.passes.mask_terms): a causal comparison of key and query positions
aligned as the kernel aligns them, and a key-padding lookup — what HF builds for a padded batch,
and for every batch where dynamo folds torch.compiler.is_exporting() to True (torch < 2.13).
"""
from __future__ import annotations

import math
import operator

import torch
from torch.fx import GraphModule
from torch.fx.experimental.symbolic_shapes import statically_known_true

from ..ops import attention as _registers_the_op  # noqa: F401  (defines torch.ops.attnfx.attention)
from ..graph.sites import AttentionSite, _arg, example_value
from ._build import call
from .mask_terms import MaskTerms, recognise


def _mask_terms(site: AttentionSite) -> MaskTerms | None:
    """The kernel's form of the site's explicit mask, or None when it has none it can take."""
    mask = _arg(site.attn, 3, "attn_mask")
    q, k = example_value(site.q), example_value(site.k)
    return recognise(mask, q.shape[2], k.shape[2]) if mask is not None and q is not None and k is not None else None


def _why_not(site: AttentionSite) -> str | None:
    if site.pattern != "sdpa_call":
        return f"{site.pattern} (only SDPA calls are lowered)"
    node = site.attn
    mask = _arg(node, 3, "attn_mask")
    if mask is not None and _arg(node, 5, "is_causal", False):
        return "explicit attn_mask with is_causal"
    if mask is not None and _mask_terms(site) is None:
        return "explicit attn_mask that is not a causal and/or key-padding mask"
    if _arg(node, 4, "dropout_p", 0.0) not in (0, 0.0):
        return "dropout"
    scale = _arg(node, 6, "scale", None)
    if scale is not None and not isinstance(scale, (int, float)):
        return "scale is not a constant"
    q, k = example_value(site.q), example_value(site.k)
    if q is None or k is None or q.dim() != 4 or q.shape[1] % k.shape[1]:
        return "q/k are not [b, heads, t, d] with heads a multiple of kv heads"
    if mask is None and _arg(node, 5, "is_causal", False) and not statically_known_true(q.shape[2] == k.shape[2]):
        return "is_causal with query and key lengths that may differ (SDPA aligns top-left)"
    return None


def apply(gm: GraphModule, sites: list[tuple[int, AttentionSite]]) -> tuple[list[int], list[str]]:
    """Lower every lowerable site; returns (lowered layers, notes on the others)."""
    g, lowered, notes = gm.graph, [], []
    for layer, site in sites:
        reason = _why_not(site)
        if reason is not None:
            notes.append(f"layer {layer}: kept SDPA ({reason})")
            continue
        node = site.attn
        q, k, v = _arg(node, 0, "query"), _arg(node, 1, "key"), _arg(node, 2, "value")
        scale = _arg(node, 6, "scale", None)
        if scale is None:
            scale = 1.0 / math.sqrt(example_value(site.q).shape[-1])
        causal, key_mask = bool(_arg(node, 5, "is_causal", False)), None
        if _arg(node, 3, "attn_mask") is not None:
            terms = _mask_terms(site)
            causal = terms.causal
            with g.inserting_before(node):
                key_mask = terms.key_mask_node(g) if terms.key_mask is not None else None
        with g.inserting_before(node):
            fused = call(g, torch.ops.attnfx.attention.default, q, k, v, key_mask, None, None, None,
                         causal, float(scale), False)
            z = call(g, operator.getitem, fused, 0)
        z.meta.update(node.meta)
        node.replace_all_uses_with(z)
        g.erase_node(node)
        lowered.append(layer)
    return lowered, notes
