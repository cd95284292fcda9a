"""The logit lens (nostalgebraist 2020): the residual stream entering each layer, and the one
leaving the last, read through the model's own final norm and unembedding (FinalNormInfo):

    logits = post(((offset + γ) ⊙ norm(x) + β) W_Uᵀ) (+ b_U, logit scales, as the graph has them),
             then cap·tanh(·/cap) where the logits are soft-capped

so the last row is the model's logits. norm="live" normalises each stream by its own σ (the
usual lens); norm="frozen" by the final stream's σ at the same position, which makes the lens
linear in the stream (the lens of a sum of components is the sum of their lenses). Computed in
fp32 (fp64 for fp64 models), one forward that records the streams, never a forward per layer.
"""
from __future__ import annotations

import torch

from ..graph.calls import as_call
from ..errors import InvalidArgumentError, UnsupportedModelError

__all__ = ["logit_lens"]


def lens_layers(im) -> list[int]:
    """The sites whose entering stream the lens reads: the decoder's self-attention layers (an
    encoder's stream, and the encoder output a cross-attention reads, never reach the logits)."""
    return [s.layer for s in im.sites if s.attends == "self" and s.stack != "encoder"]


def unembed(im, x: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
    """The model's logits of a residual stream x [..., d_model], in fp32 (fp64 for fp64). sigma
    [...] replaces the final norm's own σ of x (a frozen norm)."""
    info = im.final_norm
    if info is None:
        raise UnsupportedModelError(f"{type(im.model).__name__}: no final norm → unembedding was found, so the "
                                    "residual stream has no logits to read")
    params = dict(im.model.named_parameters(remove_duplicate=False))
    params.update(im.model.named_buffers(remove_duplicate=False))
    wide = torch.promote_types(x.dtype, torch.float32)
    param = lambda name: params[name].detach().to(wide)          # noqa: E731
    x = x.to(wide)
    if info.kind != "identity":
        sigma = final_sigma(im, x) if sigma is None else sigma.to(wide)
        x = (x - x.mean(-1, keepdim=True) if info.kind == "layer_norm" else x) / sigma[..., None]
        x = x * (info.weight_offset + (param(info.weight) if info.weight is not None else 1.0))
        if info.bias is not None:
            x = x + param(info.bias)
    weight = param(info.unembed)
    logits = x @ (weight.T if info.unembed_layout == "out_in" else weight)
    for op, value in info.post:
        if op == "bias":
            logits = logits + param(value).reshape(-1)
        else:
            factor = param(value).reshape(()) if isinstance(value, str) else value
            logits = logits * factor if op == "scale" else logits / factor
    return info.softcap * torch.tanh(logits / info.softcap) if info.softcap is not None else logits


def final_sigma(im, x: torch.Tensor) -> torch.Tensor:
    """The final norm's σ of the final stream x [..., d] (ones without a norm)."""
    info = im.final_norm
    if info.kind == "identity":
        return torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device)
    centred = x - x.mean(-1, keepdim=True) if info.kind == "layer_norm" else x
    return torch.sqrt(centred.pow(2).mean(-1) + info.eps)


def logit_lens(im, inputs, positions=None, norm: str = "live") -> torch.Tensor:
    """[n + 1, b, P, vocab] fp32 (fp64 for an fp64 model): the logits of the stream [b, t, d_model]
    entering each of the n lens_layers and of the final stream (the model's logits), at the P
    `positions` (an index or a list of them; all t when None). inputs as the model's call takes
    them (a dict of keyword arguments, a tuple or a tensor; input_ids [b, t])."""
    if norm not in ("live", "frozen"):
        raise InvalidArgumentError(f"norm must be 'live' or 'frozen', got {norm!r}")
    if im.final_norm is None:
        unembed(im, torch.zeros(0))                              # raises the typed error
    args, kwargs = as_call(inputs)
    layers = lens_layers(im)
    with torch.no_grad(), im.record("resid_pre", "final_norm", layers=layers) as rec:
        im(*args, **kwargs)
    streams = [rec["resid_pre", layer] for layer in layers] + [rec["final_norm"]]
    if positions is not None:
        index = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
        streams = [s[:, index.to(s.device)] for s in streams]
    wide = torch.promote_types(streams[-1].dtype, torch.float32)
    sigma = final_sigma(im, streams[-1].to(wide)) if norm == "frozen" else None
    return torch.stack([unembed(im, s, sigma) for s in streams])
