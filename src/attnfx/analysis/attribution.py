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

import torch

from ..calls import as_call, batch_and_length, last_positions, positions as _positions, token_ids, vocab_size
from ..errors import InvalidArgumentError, UnsupportedModelError


def _unembed_rows(weight: torch.Tensor, layout: str, tokens: torch.Tensor) -> torch.Tensor:
    return weight[tokens] if layout == "out_in" else weight[:, tokens].T


def head_attribution(im, inputs, target, foil=None, position=None, *, reduce: str = "mean") -> torch.Tensor:
    """Direct logit attribution of every head: [L, H] (reduce="mean" or "sum" over the batch) or
    [b, L, H] (reduce="none"). inputs: a tensor, a tuple of arguments or a mapping of keyword
    arguments (a dict, a tokenizer's BatchEncoding). target/foil: a token id or one per example (an
    int or numpy integer, a 0-d or 1-d integer tensor or array, or a list of ints). position: None
    (the default) reads each row's last real token per the call's attention_mask — before the pads
    of a right-padded row, the last position of a left-padded one — and the last position when the
    call has no mask; an int or one per example reads those positions (−1 is the last position,
    pad or not)."""
    if reduce not in ("mean", "sum", "none"):
        raise InvalidArgumentError(f"reduce must be 'mean', 'sum' or 'none', got {reduce!r}")
    norm = im.final_norm
    if norm is None:
        raise UnsupportedModelError(
            f"{type(im.model).__name__}: no final LayerNorm/RMSNorm → linear unembedding was found, "
            "so logits cannot be attributed to heads directly")
    args, kwargs = as_call(inputs)
    batch, seq = batch_and_length(args, kwargs)
    vocab = vocab_size(im)
    targets = token_ids(target, batch, "target", vocab)
    foils = token_ids(foil, batch, "foil", vocab) if foil is not None else None
    positions = (last_positions(args, kwargs, im.model.forward) if position is None
                 else _positions(position, batch, seq))

    params = dict(im.model.named_parameters(remove_duplicate=False))
    w_u = params[norm.unembed].detach().float()
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
    rows, positions = torch.arange(batch, device=resid.device), positions.to(resid.device)
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
