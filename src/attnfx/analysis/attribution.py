"""Direct logit attribution (docs/design.md §2) through every path that is linear once frozen.

The graph's residual stream, from the final norm's input back to its components, is a tree of
sums, constant scales and norms (attnfx.graph.unembed.FinalNormInfo.stream): pre-norm models' residual
adds, post-block norms (OLMo-2, Gemma-2/3), post-LN models' every norm (BART), residual
multipliers (Granite). With every norm's σ frozen from the same forward pass (each σ computed from
the components under it), the logit (difference) at position p is linear in each component:

    r_root   = a · P_f((o_f + γ_f) ⊙ (W_U[t] − W_U[f])) / σ_f     a: the logit scales after W_U
    norm     r ↦ P((o + γ) ⊙ r) / σ   (P: centring for LayerNorm; its β adds β · r)
    scale c  r ↦ c · r
    DLA[l,h] = z_{l,h,p} · (W_O,hᵀ r_l)                             r_l: the direction at site l
                                         (z ⊙ g where a gate g sits between z and W_O: Qwen3-Next)

and the components — heads, attention-output biases, MLP outputs, embeddings, norm biases, logit
biases — add up to the logit: pre-cap, cap·atanh(logit/cap), when the logits are soft-capped.
Sites off the path (an encoder's) have no direct effect: 0, and `direct` says which are on it.
Where the stream crosses graphs (accelerate's offload, graph breaks) a gradient along it gives the
same numbers, the biases on the path summed into `norm_bias` (analysis/direct_path.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..graph.blocks import leaves
from ..graph.calls import as_call, batch_and_length, last_positions, logits_of, positions as _positions, token_ids, vocab_size
from ..errors import InvalidArgumentError, UnsupportedModelError
from ..state.probing import Probing
from ..state.spec import Spec
from ..tensor_parallel import refuse_sharded
from .direct_path import attribution_across_graphs

__all__ = ["LogitAttribution", "head_attribution", "logit_attribution"]

_WIDE = torch.float64             # the frozen-linear algebra in fp64: the sum is exact to fp32 round-off


@dataclass
class LogitAttribution:
    """Additive decomposition of the logit (difference) at one position per example:
    heads.sum((1, 2)) + attn_bias.sum(1) + mlp.sum(1) + embed + norm_bias + logit_bias + const = total.

    heads [b, L, H] (0 off the direct path), attn_bias [b, L], mlp [b, L], embed / norm_bias /
    logit_bias / const / total [b]; direct [L] bool (the site is on the logits' direct path).
    Where the stream crosses graphs (offloaded blocks, graph breaks) norm_bias holds every bias and
    constant on the path, logit_bias and const 0: no gradient tells them apart."""
    heads: torch.Tensor           # [b, L, H] direct effect of each head (0 off the direct path)
    attn_bias: torch.Tensor       # [b, L] the output projection's bias b_O
    mlp: torch.Tensor             # [b, L] the branch the stream adds after site l's attention (its MLP)
    embed: torch.Tensor           # [b] the stream entering the first site on the path
    norm_bias: torch.Tensor       # [b] β of every norm on the path, the final one included
    logit_bias: torch.Tensor      # [b] b_U and bias vectors added to the logits (as scaled after)
    const: torch.Tensor           # [b] parameters added to the stream itself
    total: torch.Tensor           # [b] the logit (difference); the pre-cap logit when pre_softcap
    pre_softcap: bool             # the logits are cap·tanh(l/cap): everything here attributes l
    softcap: float | None
    direct: torch.Tensor          # [L] bool: the site is on the logits' direct path


def head_attribution(im, inputs, target, foil=None, position=None, *, reduce: str = "mean") -> torch.Tensor:
    """Direct logit attribution of every head: [L, H] (reduce="mean" or "sum" over the batch) or
    [b, L, H] (reduce="none"), fp32 (computed in fp64), through every norm, scale and bias on the
    path (see the module); soft-capped logits are attributed before the cap
    (logit_attribution(...).pre_softcap says so). inputs: a tensor, a tuple of arguments or a
    mapping of keyword arguments (a dict, a tokenizer's BatchEncoding; input_ids [b, t]).
    target/foil: a token id or one per example (an int or numpy integer, a 0-d or 1-d integer
    tensor [b] or array, or a list of ints). position: None (the default) reads each row's last
    real token per the call's attention_mask (the decoder's, for an encoder-decoder) — before the
    pads of a right-padded row, the last position of a left-padded one — and the last position
    when the call has no mask; an int or one per example reads those positions (−1 is the last
    position, pad or not)."""
    if reduce not in ("mean", "sum", "none"):
        raise InvalidArgumentError(f"reduce must be 'mean', 'sum' or 'none', got {reduce!r}")
    dla = logit_attribution(im, inputs, target, foil, position).heads
    if reduce == "mean":
        return dla.mean(dim=0)
    if reduce == "sum":
        return dla.sum(dim=0)
    return dla


def logit_attribution(im, inputs, target, foil=None, position=None) -> LogitAttribution:
    """The logit (target − foil) at `position` as a sum of independently computed components
    (LogitAttribution: heads [b, L, H], attn_bias and mlp [b, L], the rest [b]; total [b]), from one
    forward pass capturing each component's graph node. Arguments as head_attribution's."""
    args, kwargs = as_call(inputs)
    if im._sites is None:
        im._discover(args, kwargs)
    info = _checked_path(im)
    batch, seq, positions = _where(im, args, kwargs, position)
    vocab = vocab_size(im)
    targets = token_ids(target, batch, "target", vocab)
    foils = token_ids(foil, batch, "foil", vocab) if foil is not None else None
    if info is None:                                # the stream crosses graphs: a gradient follows it
        return LogitAttribution(**attribution_across_graphs(im, inputs, targets, foils, positions))
    kinds = {"attn": ("heads", "attn"), "mlp": ("mlp",), "embed": ("resid",)}
    wanted = tuple(dict.fromkeys(k for leaf in leaves(info.stream) for k in kinds.get(leaf[0], ())))
    layers = tuple(sorted({im._layer_of[leaf[1]] for leaf in leaves(info.stream) if leaf[0] in kinds}))
    # only the asked positions of the path's layers leave the graph: O(L·b·d), not O(L·b·T·d)
    probing = Probing(im, Spec(captures=wanted, capture_at=True, capture_layers=layers),
                      {"capture_at": positions.to(_device(im), torch.int64)})
    with torch.no_grad(), probing:
        logits = logits_of(im(*args, **kwargs))
    run = _Run(im, probing.captures, positions)
    w = _unembed_rows(run, info, targets) - (_unembed_rows(run, info, foils) if foils is not None else 0.0)
    scale, logit_bias = _post(run, info, targets, foils, batch)
    x = run.value(info.stream)                                              # [b, d] the final norm's input
    r, beta = _norm_direction(run, (info.kind, info.eps, info.weight, info.weight_offset, info.bias), x, w * scale)
    run.add("norm_bias", beta)
    run.propagate(info.stream, r)
    result = run.result(batch, logit_bias, info.softcap)
    _check_reproduces(result, logits, run, targets, foils)
    return result


def _check_reproduces(result, logits, run, targets, foils) -> None:
    """The components must give back this forward's logit (difference): a component taken from
    the wrong node would otherwise go unnoticed. Not a computation, a guard."""
    at = logits[run.rows.to(logits.device), run.positions.to(logits.device)].to(_WIDE)        # [b, vocab]
    tol = 1000 * torch.finfo(logits.dtype).eps * (1 + at.abs().amax(-1))
    if result.softcap is not None:              # pre-cap: atanh amplifies round-off by 1 / (1 − y²)
        y = (at / result.softcap).clamp(-1 + 1e-12, 1 - 1e-12)
        tol = tol / (1 - y.abs().amax(-1) ** 2)
        at = result.softcap * torch.atanh(y)
    rows = torch.arange(at.shape[0], device=at.device)
    want = at[rows, targets.to(at.device)] - (at[rows, foils.to(at.device)] if foils is not None else 0.0)
    off = (result.total.to(at.device, _WIDE) - want).abs()
    if not bool((off <= tol).all()):
        raise UnsupportedModelError(
            f"the logit decomposition does not reproduce this call's logits (off by {off.max().item():.3g}): a "
            "component was not found where the stream tree expects it")


def _checked_path(im):
    """The final norm's info when the stream from the heads to the logits lies in one graph; None
    when it crosses graphs (graph breaks, offloaded blocks: direct_path.py follows it then)."""
    info = im.final_norm
    name = type(im.model).__name__
    refuse_sharded(im, "direct logit attribution")     # W_O and W_U are DTensors the graph cannot name
    if info is None and im._graphs_per_call > 1 or info is not None and info.stream is None:
        return None         # the unembedding runs after the last graph holding attention
    if info is None:
        raise UnsupportedModelError(
            f"{name}: no unembedding was found (an output that is a linear map of the residual stream, through "
            "a final LayerNorm/RMSNorm or none, then constant scales, bias vectors and an optional soft-cap), "
            "so logits cannot be attributed to heads directly")
    if any(leaf[0] == "input" for leaf in leaves(info.stream)):
        return None         # a graph break cut the stream before the final norm
    no_w_o = [s.layer for s in im.sites if s.o_proj is None]
    if no_w_o:                  # checked first: the stream cannot be traced through an unknown attention output
        raise UnsupportedModelError(f"{name}: no output projection W_O was found for layer(s) {no_w_o} (the "
                                    "per-head output is not z_h W_O,hᵀ), so heads cannot be attributed")
    bad = [leaf for leaf in leaves(info.stream) if leaf[0] == "stop"]
    if bad:
        what = "; ".join(desc for _, desc in bad)
        raise UnsupportedModelError(f"{name}: the path from the residual stream to the unembedding is not linear once "
                                    f"its norms are frozen: it passes through {what}")
    mlps = [leaf[1] for leaf in leaves(info.stream) if leaf[0] == "mlp"]
    twice = sorted({key for key in mlps if mlps.count(key) > 1})
    if twice:
        raise UnsupportedModelError(f"{name}: more than one branch joins the stream after {twice}")
    return info


def _where(im, args, kwargs, position):
    """[batch, seq] of the logits and the position read per example: the decoder's for an
    encoder-decoder call (decoder_input_ids), else the call's."""
    decoder = kwargs.get("decoder_input_ids")
    if isinstance(decoder, torch.Tensor) and decoder.dim() == 2:
        mask = kwargs.get("decoder_attention_mask")
        args, kwargs = (), {"input_ids": decoder, **({"attention_mask": mask} if mask is not None else {})}
    batch, seq = batch_and_length(args, kwargs)
    positions = (last_positions(args, kwargs, None if decoder is not None else im.model.forward) if position is None
                 else _positions(position, batch, seq))
    return batch, seq, positions


def _device(im) -> torch.device:
    return next(iter(im.model.parameters())).device


def _unembed_rows(run, info, tokens) -> torch.Tensor:
    weight = run.param(info.unembed)
    tokens = tokens.to(weight.device)
    return weight[tokens] if info.unembed_layout == "out_in" else weight[:, tokens].T


def _post(run, info, targets, foils, batch):
    """The logit scale a ([b, 1]) and the bias added after W_U (b_U and logit biases, as scaled
    after them), at target − foil ([b])."""
    scale = torch.ones(batch, 1, dtype=_WIDE, device=run.device)
    bias = torch.zeros(batch, dtype=_WIDE, device=run.device)
    for op, value in info.post:
        if op == "bias":
            vector = run.param(value).reshape(-1)
            bias = bias + vector[targets.to(vector.device)] - (vector[foils.to(vector.device)] if foils is not None else 0)
            continue
        factor = run.param(value).reshape(()) if isinstance(value, str) else torch.tensor(value, dtype=_WIDE)
        factor = factor.to(run.device)
        scale, bias = (scale * factor, bias * factor) if op == "scale" else (scale / factor, bias / factor)
    return scale, bias


def _norm_direction(run, norm, x, r):
    """A norm frozen at input x [b, d]: the direction at its input for direction r at its output,
    and the logit of its β (LayerNorm: P centres; RMSNorm: no centring)."""
    kind, eps, weight, offset, bias = norm
    if kind == "identity":
        return r, torch.zeros(r.shape[0], dtype=_WIDE, device=r.device)
    if kind == "layer_norm":
        sigma = torch.sqrt(x.var(dim=-1, unbiased=False) + eps)
    else:
        sigma = torch.sqrt(x.pow(2).mean(dim=-1) + eps)
    gain = offset + (run.param(weight) if weight is not None else 1.0)
    inner = r * gain
    if kind == "layer_norm":
        inner = inner - inner.mean(dim=-1, keepdim=True)
    beta = (r * run.param(bias)).sum(-1) if bias is not None else torch.zeros(r.shape[0], dtype=_WIDE, device=r.device)
    return inner / sigma[:, None], beta


class _Run:
    """One forward's captured components at the chosen positions, and the components' logits."""

    def __init__(self, im, captures, positions):
        self.im, self.captures = im, captures
        self.params = dict(im.model.named_parameters(remove_duplicate=False))
        self.params.update(im.model.named_buffers(remove_duplicate=False))
        self.device = next(iter(self.params.values())).device
        self.positions = positions.to(self.device)
        self.rows = torch.arange(len(positions), device=self.device)
        self.sums: dict[str, torch.Tensor] = {}
        self.layers, self.heads = len(im.sites), max(site.num_heads for site in im.sites)
        self.head_dla = torch.zeros(len(positions), self.layers, self.heads, dtype=_WIDE, device=self.device)
        for layer, site in enumerate(im.sites):           # a head the layer lacks: NaN, not a zero effect
            self.head_dla[:, layer, site.num_heads:] = float("nan")
        self.per_layer = {k: torch.zeros(len(positions), self.layers, dtype=_WIDE, device=self.device)
                          for k in ("attn_bias", "mlp")}
        self.direct = torch.zeros(self.layers, dtype=torch.bool)
        self.norm_inputs: dict[int, torch.Tensor] = {}

    def param(self, name: str) -> torch.Tensor:
        return self.params[name].detach().to(_WIDE)

    def captured(self, kind: str, key) -> torch.Tensor:
        layer = self.im._layer_of[key]
        value = self.captures.get(kind, {}).get(layer)
        if value is None:
            raise UnsupportedModelError(f"the '{kind}' component of layer {layer} was found when the model was "
                                        "instrumented but not in the graph compiled for this call")
        return value.to(self.device, _WIDE)                     # at the positions: [b, d] (heads: [b, H, d])

    def value(self, tree) -> torch.Tensor:
        """The stream node's value [b, d] from its components; remembers each norm's input."""
        kind = tree[0]
        if kind == "sum":
            return sum(self.value(child) for child in tree[1])
        if kind in ("scale", "inverse"):
            factor = self.param(tree[1]).reshape(()) if isinstance(tree[1], str) else tree[1]
            child = self.value(tree[2])
            return child * factor if kind == "scale" else child / factor
        if kind == "norm":
            x = self.norm_inputs[id(tree)] = self.value(tree[2])
            n_kind, eps, weight, offset, bias = tree[1]
            centred = x - x.mean(-1, keepdim=True) if n_kind == "layer_norm" else x
            sigma = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
            out = centred / sigma * (offset + (self.param(weight) if weight is not None else 1.0))
            return out + self.param(bias) if bias is not None else out
        if kind == "attn":
            return self.captured("attn", tree[1])
        if kind == "mlp":
            return self.captured("mlp", tree[1])
        if kind == "embed":
            return self.captured("resid", tree[1])
        return self.param(tree[1]) if isinstance(tree[1], str) else torch.tensor(tree[1], dtype=_WIDE)

    def add(self, name: str, logit: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + logit

    def propagate(self, tree, r: torch.Tensor) -> None:
        """Hand direction r [b, d] (at the tree's output) down to every component."""
        kind = tree[0]
        if kind == "sum":
            for child in tree[1]:
                self.propagate(child, r)
        elif kind in ("scale", "inverse"):
            factor = self.param(tree[1]).reshape(()) if isinstance(tree[1], str) else tree[1]
            self.propagate(tree[2], r * factor if kind == "scale" else r / factor)
        elif kind == "norm":
            inner, beta = _norm_direction(self, tree[1], self.norm_inputs[id(tree)], r)
            self.add("norm_bias", beta)
            self.propagate(tree[2], inner)
        elif kind == "attn":
            self._heads(tree, r)
        elif kind == "mlp":
            self.per_layer["mlp"][:, self.im._layer_of[tree[1]]] += (self.captured("mlp", tree[1]) * r).sum(-1)
        elif kind == "embed":
            self.add("embed", (self.captured("resid", tree[1]) * r).sum(-1))
        else:
            self.add("const", (self.value(tree) * r).sum(-1))

    def _heads(self, tree, r) -> None:
        """z_h · (W_O,hᵀ r) per head, and b_O · r. On a gated site the captured "heads" are
        z_h ⊙ g_h, what W_O reads: the direct effect is (z_h ⊙ g_h) · (W_O,hᵀ r)."""
        layer = self.im._layer_of[tree[1]]
        weight_name, layout, bias_name, _ = tree[2]
        site = self.im.sites[layer]
        h, d = site.num_heads, site.head_dim
        z = self.captured("heads", tree[1])                                 # [b, H, d]
        weight = self.param(weight_name)
        u = (torch.einsum("mhd,bm->bhd", weight.view(-1, h, d), r) if layout == "out_in"
             else torch.einsum("hdm,bm->bhd", weight.view(h, d, -1), r))
        self.head_dla[:, layer, :h] = (z * u).sum(-1)
        if bias_name is not None:
            self.per_layer["attn_bias"][:, layer] = (self.param(bias_name) * r).sum(-1)
        self.direct[layer] = True

    def result(self, batch: int, logit_bias: torch.Tensor, softcap: float | None) -> LogitAttribution:
        zero = torch.zeros(batch, dtype=_WIDE, device=self.device)
        scalars = {k: (self.sums.get(k, zero) + zero) for k in ("embed", "norm_bias", "const")}
        total = (self.head_dla.nansum((1, 2)) + self.per_layer["attn_bias"].sum(1) + self.per_layer["mlp"].sum(1)
                 + sum(scalars.values()) + logit_bias)
        return LogitAttribution(self.head_dla.float(), self.per_layer["attn_bias"].float(),
                                self.per_layer["mlp"].float(), scalars["embed"].float(),
                                scalars["norm_bias"].float(), logit_bias.float(), scalars["const"].float(),
                                total.float(), softcap is not None, softcap, self.direct)
