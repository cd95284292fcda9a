"""Direct logit attribution where the residual stream crosses graphs (docs/design.md §2).

attribution.py walks the stream from the unembedding back to the heads within one graph. When the
forward runs in several — accelerate's offload compiles each block on its own, graph breaks cut
the stream — the same numbers come from one backward instead: under the "direct" rule (graph/
lrp_plan.py) every branch reads the stream held constant (each site's q, k, v and gate, each
MLP's hidden activation) and every norm's σ is frozen, so the gradient of the logit reaches each
component along the residual stream alone, through the graphs autograd links, and

    DLA[l,h] = (z_{l,h} W_O,hᵀ) · r_l          the gradient × input at the heads' gate
    attn_bias[l] = b_O · r_l                   the attention output's minus its heads'
    mlp[l], embed                              the gradient × input at the MLP output and at the
                                               stream entering the first layer

are those of the single-graph algebra (the same frozen σ, the same direction r_l). The biases and
constants on the path (norms' β, b_U) reach no gate: together they are the logit less the
components, reported as `norm_bias` (logit_bias and const 0). A path that is not linear once
frozen — a soft-cap, an MoE branch whose hidden activation is not found, a final norm that ran in
no compiled graph — is refused, named, as the single-graph walk refuses it.
"""
from __future__ import annotations

import torch

from ..errors import UnsupportedModelError
from ..state.spec import DIRECT
from .relevance import gated_gradients

__all__: list[str] = []

_COMPONENTS = ("heads", "attn", "mlp", "residual")


def attribution_across_graphs(im, inputs, targets: torch.Tensor, foils: torch.Tensor | None,
                              positions: torch.Tensor) -> dict:
    """The fields of a LogitAttribution of the logit (targets − foils) [b] at positions [b], by the
    direct-path gradient: heads [b, L, H], attn_bias and mlp [b, L], the rest [b] (see the module)."""
    name = type(im.model).__name__
    found = gated_gradients(im, inputs, targets, DIRECT, foils, positions, _COMPONENTS)
    if found.leaks:
        raise UnsupportedModelError(
            f"{name}: the path from the residual stream to the logits is not linear once its norms are frozen "
            f"(it crosses graphs, so attnfx followed it by a gradient): it passes through " + "; ".join(found.leaks))
    if found.heads_per_position is None or found.residual is None:
        raise UnsupportedModelError(f"{name}: the heads or the stream entering the first layer were found in no "
                                    "graph, so logits cannot be attributed to them directly")
    wide = torch.float64
    heads = _summed(found.heads_per_position).to(wide)                      # [b, L, H]
    for layer, site in enumerate(im.sites):            # a head the layer lacks: NaN, not a zero effect
        heads[:, layer, site.num_heads:] = float("nan")
    attn = _summed(found.attn).to(wide) if found.attn is not None else heads.nansum(-1)
    mlp = _summed(found.mlp).to(wide) if found.mlp is not None else torch.zeros_like(attn)
    attn_bias = attn - heads.nansum(-1)
    first = min(layer for layer, site in enumerate(im.sites) if site.stack != "encoder")
    embed = _summed(found.residual)[:, first].to(wide)
    total = found.target.to(wide)
    biases = total - heads.nansum((1, 2)) - attn_bias.sum(1) - mlp.sum(1) - embed
    zero = torch.zeros_like(total)
    direct = torch.tensor([site.stack != "encoder" for site in im.sites])
    return dict(heads=heads.float(), attn_bias=attn_bias.float(), mlp=mlp.float(), embed=embed.float(),
                norm_bias=biases.float(), logit_bias=zero.float(), const=zero.float(), total=total.float(),
                pre_softcap=False, softcap=None, direct=direct)


def _summed(per_position: torch.Tensor) -> torch.Tensor:
    """Σ over positions (dim 1; only the attributed one carries a gradient), NaN past a layer's
    length left out, a layer found nowhere 0: no component there, so no direct effect."""
    return per_position.nansum(1)
