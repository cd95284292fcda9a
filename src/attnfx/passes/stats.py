"""Attention statistics as records: at each asked SDPA site, attnfx::attention_stats on the q and
k the site reads, with its masking in the kernel's form (causal and/or a key mask, read off the
mask's construction as the lower pass reads it) — per head and query, the log-sum-exp and the
attention mass on the runtime key spans, never the T×S pattern: O(T) memory at any length.

Records: capture:stats_lse [b, H, T] and capture:stats_mass [b, T, H, n] (fp32) per layer."""
from __future__ import annotations

import math
import operator

import torch
from torch.fx import Graph, Node

from ..errors import UnsupportedModelError
from ..ops import attention_stats as _registers_the_op  # noqa: F401  (defines torch.ops.attnfx.attention_stats)
from ..graph.sites import AttentionSite, _arg, example_value
from ._build import call
from .lower import _mask_terms, _why_not
from .record import RecordKey


def capture(g: Graph, sites: list[tuple[int, AttentionSite]], spans: Node, records: list) -> None:
    """Append each site's (lse, mass) records; a site whose masking the kernel cannot take raises."""
    for layer, site in sites:
        reason = _why_not(site)
        if reason is not None:
            raise UnsupportedModelError(f"attention statistics of layer {layer}: its attention is not an SDPA call "
                                        f"the statistics kernel can take ({reason}); record 'pattern' instead")
        node = site.attn
        q, k = _arg(node, 0, "query"), _arg(node, 1, "key")
        scale = _arg(node, 6, "scale", None)
        scale = 1.0 / math.sqrt(example_value(site.q).shape[-1]) if scale is None else float(scale)
        causal, key_mask = bool(_arg(node, 5, "is_causal", False)), None
        with g.inserting_before(node):
            if _arg(node, 3, "attn_mask") is not None:
                terms = _mask_terms(site)
                causal = terms.causal
                key_mask = terms.key_mask_node(g) if terms.key_mask is not None else None
            stats = call(g, torch.ops.attnfx.attention_stats.default, q, k, key_mask, spans, causal, scale)
            records.append((RecordKey("capture:stats_lse", layer), call(g, operator.getitem, stats, 0)))
            records.append((RecordKey("capture:stats_mass", layer), call(g, operator.getitem, stats, 1)))
