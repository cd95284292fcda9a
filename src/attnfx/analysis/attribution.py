"""Direct logit attribution per head (DESIGN §2).

For target t (and optional foil f) at position p, with the final norm linearised at this input
(its scale σ_p frozen from the same forward pass, its weight γ folded in, LayerNorm's centring
applied):

    r        = γ ⊙ (W_U[t] − W_U[f])            (centred for LayerNorm)
    DLA[l,h] = z_{l,h,p} · (W_O,hᵀ r) / σ_p

computed as a per-head readout in the graph (b·t·H·d_head work); the contributions
[b, t, H, d_model] are never formed. Σ_h DLA + (bias and other components) = the logit (diff).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..calls import as_call, batch_and_length
from ..errors import InvalidArgumentError, ShapeMismatchError, UnsupportedModelError


def _per_example(value, batch: int, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    elif not isinstance(value, Sequence):
        value = [value]
    value = [int(v) for v in value]
    if len(value) == 1:
        value = value * batch
    if len(value) != batch:
        raise ShapeMismatchError(f"{what} must be one index or one per example ({batch}), got {len(value)}")
    return torch.tensor(value)


def _unembed_rows(weight: torch.Tensor, layout: str, tokens: torch.Tensor) -> torch.Tensor:
    return weight[tokens] if layout == "out_in" else weight[:, tokens].T


def head_attribution(im, inputs, target, foil=None, position=-1, *, reduce: str = "mean") -> torch.Tensor:
    """Direct logit attribution of every head: [L, H] (reduce="mean" or "sum" over the batch) or
    [b, L, H] (reduce="none"). target/foil: a token id or one per example; position: an int or one
    per example (e.g. the last real token of each padded row)."""
    if reduce not in ("mean", "sum", "none"):
        raise InvalidArgumentError(f"reduce must be 'mean', 'sum' or 'none', got {reduce!r}")
    norm = im.final_norm
    if norm is None:
        raise UnsupportedModelError(
            f"{type(im.model).__name__}: no final LayerNorm/RMSNorm → linear unembedding was found, "
            "so logits cannot be attributed to heads directly")
    args, kwargs = as_call(inputs)
    batch = batch_and_length(args, kwargs)[0]
    targets = _per_example(target, batch, "target")
    foils = _per_example(foil, batch, "foil") if foil is not None else None
    positions = _per_example(position, batch, "position")

    params = dict(im.model.named_parameters(remove_duplicate=False))
    w_u = params[norm.unembed].detach().float()
    vocab = w_u.shape[0] if norm.unembed_layout == "out_in" else w_u.shape[1]
    for name, ids in (("target", targets), ("foil", foils)):
        if ids is not None and not bool(((ids >= 0) & (ids < vocab)).all()):
            raise InvalidArgumentError(f"{name} token ids must be in [0, {vocab}), got {ids.tolist()}")
    pairs = list(zip(targets.tolist(), foils.tolist() if foils is not None else [None] * batch))
    unique = list(dict.fromkeys(pairs))
    column = torch.tensor([unique.index(p) for p in pairs])
    tokens = torch.tensor([t for t, _ in unique])
    directions = _unembed_rows(w_u, norm.unembed_layout, tokens.to(w_u.device))
    if foils is not None:
        directions = directions - _unembed_rows(w_u, norm.unembed_layout,
                                                torch.tensor([f for _, f in unique], device=w_u.device))
    if norm.weight is not None:
        directions = directions * params[norm.weight].detach().float()
    if norm.kind == "layer_norm":
        directions = directions - directions.mean(dim=-1, keepdim=True)

    with torch.no_grad(), im.record("readout", "final_norm", directions=directions) as rec:
        im(*args, **kwargs)
    readout, resid = rec["readout"], rec["final_norm"].float()      # [b, t, L, H, K], [b, t, d]
    seq = readout.shape[1]
    if not bool(((positions >= -seq) & (positions < seq)).all()):
        raise InvalidArgumentError(f"position must be in [-{seq}, {seq}), got {positions.tolist()}")
    rows = torch.arange(batch)
    positions = positions % seq
    x = resid[rows, positions]                                        # [b, d]
    if norm.kind == "layer_norm":
        sigma = torch.sqrt(x.var(dim=-1, unbiased=False) + norm.eps)
    else:
        sigma = torch.sqrt(x.pow(2).mean(dim=-1) + norm.eps)
    dla = readout[rows, positions, :, :, column.to(readout.device)] / sigma[:, None, None]   # [b, L, H]
    if reduce == "mean":
        return dla.mean(dim=0)
    if reduce == "sum":
        return dla.sum(dim=0)
    return dla
