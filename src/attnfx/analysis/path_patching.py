"""Path patching (Wang et al. 2022, the IOI circuit): the effect of sender heads on a metric
through one path only — their direct writes into the residual stream, as read by the receiver
heads' queries, keys or values — with every other component frozen at the clean run.

With everything but the senders frozen, the stream a receiver layer r reads is the clean one plus
the senders' direct changes, Δ_r = Σ_{sender (l, h), l < r} (c_lh(corrupt) − c_lh(clean)), c_lh
the head's write into the stream (z_h through W_O; attnfx's "contrib" record). So, for many sender
groups at once, each a tile of the clean batch:

  1. one recording call on [clean; corrupt]: the senders' writes and the receiver layers' clean streams;
  2. one call with each receiver layer's stream patched to clean + Δ_r (its tile's senders), capturing
     the receivers' q / k / v as the attention reads them (nothing later matters here);
  3. one clean call with only the receivers' q / k / v patched from 2: the metric.

Three compiled calls whatever the number of sender groups (split into forwards of at most
rows_per_forward rows, the last padded with unpatched tiles so no shape changes).
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ..errors import InvalidArgumentError, SiteIndexError, UnsupportedModelError
from ..state.indices import as_index
from ..state.probing import Probing, state_shape
from ..state.spec import Spec
from .patching import PatchingResult, _check, _metric, _tile

__all__ = ["path_patching", "INPUTS"]

INPUTS = {"q": "queries", "k": "keys", "v": "values"}


def _heads(im, pairs, what: str) -> list[tuple[int, int]]:
    sites = im.sites
    try:
        items = [(as_index(l, len(sites), "layer"), h) for l, h in pairs]
    except (TypeError, ValueError):
        raise SiteIndexError(f"{what} must be (layer, head) pairs, got {pairs!r}") from None
    return [(l, as_index(h, sites[l].num_heads, "head")) for l, h in items]


def _groups(im, senders) -> tuple[list[list[tuple[int, int]]], bool]:
    """Sender groups, and whether they are every head alone (scores then come as [L, H])."""
    if senders is None:
        return [[(l, h)] for l, site in enumerate(im.sites) for h in range(site.num_heads)], True
    groups = [[item] if isinstance(item[0], int) or hasattr(item[0], "__index__") else list(item) for item in senders]
    if not groups or any(not g for g in groups):
        raise InvalidArgumentError("senders must be None (every head alone) or a non-empty list of (layer, head) "
                                   "pairs or of lists of them (patched together)")
    return [_heads(im, g, "senders") for g in groups], False


def path_patching(im, clean, corrupt, metric: Callable, *, receivers, receiver_input="q", senders=None,
                  rows_per_forward: int = 256, progress: bool = True) -> PatchingResult:
    """The mean change of `metric` when the sender heads' direct paths into the receivers'
    `receiver_input` ("q", "k", "v" or several) carry the corrupt run's values, everything else at
    the clean run. senders=None: every head alone → scores [L, H] (NaN where a head has no later
    receiver to reach); a list of (layer, head) pairs or of lists of pairs → scores [G], one per
    group. A receiver's k / v is its kv head's, as the attention reads it (with grouped-query
    attention read as [b, H_kv, ...], patching it reaches every query head of the group).
    clean, corrupt: inputs as the model takes them, of one shape (input_ids [b, t], ...); metric:
    the main output (logits [b, t, vocab]) → [b] (attnfx.metrics); receivers: (layer, head) pairs."""
    start = time.perf_counter()
    (args, kwargs), (cargs, ckwargs), batch = _check(im, clean, corrupt, "heads")
    kinds = tuple(dict.fromkeys(INPUTS[k] for k in ((receiver_input,) if isinstance(receiver_input, str)
                                                    else receiver_input) if k in INPUTS))
    if not kinds or (not isinstance(receiver_input, str) and len(kinds) != len(receiver_input)) or (
            isinstance(receiver_input, str) and receiver_input not in INPUTS):
        raise InvalidArgumentError(f"receiver_input must be 'q', 'k', 'v' or several of them, got {receiver_input!r}")
    receivers = _heads(im, receivers, "receivers")
    if not receivers:
        raise InvalidArgumentError("receivers must name at least one (layer, head)")
    if any(site.stack is not None or site.attends != "self" for site in im.sites):
        raise UnsupportedModelError("path patching follows one residual stream: encoder–decoder models are not "
                                    "supported")
    groups, every_head = _groups(im, senders)
    layers = sorted({l for l, _ in receivers})
    reach = [any(l < max(layers) for l, _ in g) for g in groups]          # a sender before some receiver

    clean_resid, writes = _clean_streams_and_writes(im, (args, kwargs), (cargs, ckwargs), layers,
                                                    sorted({p for g in groups for p in g}), batch)
    with torch.no_grad():
        base = _metric(metric, im(*args, **kwargs))
    todo = [i for i, ok in enumerate(reach) if ok]
    tiles = max(1, min(len(todo), rows_per_forward // batch))
    tiled_args, tiled_kwargs = _tile(args, batch, tiles), _tile(kwargs, batch, tiles)
    effects = torch.full((len(groups),), float("nan"), dtype=base.dtype, device=base.device)
    chunks = range(0, len(todo), tiles)
    for offset in tqdm(chunks, desc="path patching", disable=not progress, leave=False):
        chunk = [groups[i] for i in todo[offset:offset + tiles]]
        streams = _patched_streams(im, clean_resid, writes, chunk, layers, tiles, batch)
        inputs = _receiver_inputs(im, tiled_args, tiled_kwargs, streams, layers, kinds)
        outputs = _patched_run(im, tiled_args, tiled_kwargs, inputs, receivers, kinds, tiles * batch)
        for i, flat in enumerate(todo[offset:offset + tiles]):
            patched = _metric(metric, outputs, slice(i * batch, (i + 1) * batch), batch * tiles)
            effects[flat] = (patched - base).mean()
    if every_head:
        scores, dims = effects.reshape(len(im.sites), -1), ("layer", "head")
    else:
        scores, dims = effects, ("group",)
    with torch.no_grad():
        corrupt_metric = _metric(metric, im(*cargs, **ckwargs))
    return PatchingResult(scores, dims, "path:" + "+".join(kinds), "path", base, corrupt_metric,
                          forwards=3 + 2 * len(chunks), backwards=0, seconds=time.perf_counter() - start)


def _clean_streams_and_writes(im, clean, corrupt, layers, heads, batch):
    """One call on [clean; corrupt]: each receiver layer's clean stream [b, t, d], and each sender
    head's write c(corrupt) − c(clean) [b, t, d]."""
    (args, kwargs), (cargs, ckwargs) = clean, corrupt
    both_args = tuple(torch.cat([a, c]) if isinstance(a, torch.Tensor) else a for a, c in zip(args, cargs))
    both_kwargs = {k: torch.cat([v, ckwargs[k]]) if isinstance(v, torch.Tensor) and v.dim() >= 1 else v
                   for k, v in kwargs.items()}
    with torch.no_grad(), im.record("resid_pre", "contrib", heads=heads, layers=layers) as rec:
        im(*both_args, **both_kwargs)
    resid = {l: rec["resid_pre", l][:batch] for l in layers}
    writes = {pair: (c[batch:] - c[:batch]).float() for pair, c in rec["contrib"].items()}
    return resid, writes


def _patched_streams(im, clean_resid, writes, chunk, layers, tiles, batch) -> torch.Tensor:
    """Sources [L, tiles·b, t, d] of the resid patch: tile i's receiver layer r reads clean + Δ_r."""
    some = next(iter(clean_resid.values()))
    source = torch.zeros(state_shape(im, "resid", tiles * batch, some.shape[1], per_dim=True),
                         device=some.device, dtype=torch.float32)
    for r in layers:
        source[r] = clean_resid[r].float().repeat(tiles, 1, 1)
        for i, group in enumerate(chunk):
            for l, h in group:
                if l < r:
                    source[r, i * batch:(i + 1) * batch] += writes[(l, h)]
    return source


def _receiver_inputs(im, args, kwargs, streams, layers, kinds) -> dict[str, torch.Tensor]:
    """Call 2: the receiver layers' q / k / v with their streams patched (later layers don't matter)."""
    weight = torch.zeros(streams.shape[:3], device=streams.device)
    weight[layers] = 1.0
    spec = Spec(patches=("resid",), captures=kinds, capture_layers=tuple(layers))
    with torch.no_grad(), Probing(im, spec, {"patch_w_resid": weight, "patch_src_resid": streams}) as probing:
        im(*args, **kwargs)
    return {kind: probing.captures[kind] for kind in kinds}


def _patched_run(im, args, kwargs, inputs, receivers, kinds, rows):
    """Call 3: the clean run with only the receivers' q / k / v from call 2."""
    state = {}
    length = max(x.shape[1] for per_layer in inputs.values() for x in per_layer.values())
    for kind in kinds:
        weight = torch.zeros(state_shape(im, kind, rows, length, per_dim=False))
        source = torch.zeros(state_shape(im, kind, rows, length, per_dim=True))
        for l, h in receivers:
            x = inputs[kind][l]                                              # [rows, t, H_read, d]
            site = im.sites[l]
            read = x.shape[2]
            head = h if read == site.num_heads else h // (site.num_heads // read)
            weight[l, :, :x.shape[1], head] = 1.0
            source[l, :, :x.shape[1], :read, :x.shape[3]] = x.float()
        state[f"patch_w_{kind}"], state[f"patch_src_{kind}"] = weight.to(x.device), source.to(x.device)
    with torch.no_grad(), Probing(im, Spec(patches=kinds), state):
        return im(*args, **kwargs)
