"""Ready analyses of the heads for `data.reduce` (issue 17): per example, each head's direct logit
attribution, relevance and activation-patching effect for the example's own answer token at its
last real token — [b, L, H] rows that "mean" averages over a dataset and "none" keeps.

    rows = load_prompts()["facts"]
    prompts = [row["prompt"] for row in rows]
    answers = tokenizer.convert_tokens_to_ids([row["answer"] for row in rows])
    per_head = data.reduce(im, prompts, tokenizer, sweeps.combined(sweeps.head_dla(answers),
                                                                   sweeps.head_relevance(answers)))

Token ids come one per example of the source, in its order (a list of ints, a 1-d integer tensor
or array): a batch reads its rows' (batch.indices). Unlike attnfx.head_attribution's "mean" and
activation_patching's scores, which average a batch, these keep each example's row, so a sweep's
mean weighs every example alike whatever its batch.
"""
from __future__ import annotations

import torch

from .errors import InvalidArgumentError, ShapeMismatchError

__all__ = ["head_dla", "head_relevance", "head_patching", "combined"]


def head_dla(targets, foils=None):
    """Analysis: {"dla": [b, L, H]} each head's direct logit attribution (attnfx.head_attribution)
    to the logit of the example's target (minus its foil's) at its last real token."""
    targets, foils = _ids(targets, "targets"), _ids(foils, "foils")

    def analysis(im, batch) -> dict[str, torch.Tensor]:
        from .analysis.attribution import head_attribution
        dla = head_attribution(im, batch.encoding, _of(targets, batch, "targets"), _of(foils, batch, "foils"),
                               reduce="none")
        return {"dla": dla}

    return analysis


def head_relevance(targets, foils=None, *, rule: str = "attnlrp"):
    """Analysis: {"relevance": [b, L, H]} each head's relevance (attnfx.relevance, `rule`, summed
    over positions) for the logit of the example's target (minus its foil's) at its last real token."""
    targets, foils = _ids(targets, "targets"), _ids(foils, "foils")

    def analysis(im, batch) -> dict[str, torch.Tensor]:
        from .analysis.relevance import relevance
        found = relevance(im, batch.encoding, _of(targets, batch, "targets"), foil=_of(foils, batch, "foils"),
                          rule=rule, components=("heads",))
        return {"relevance": found.heads}

    return analysis


def head_patching(corrupt, tokenizer, targets, foils=None, *, rows_per_forward: int = 256):
    """Analysis: {"patching": [b, L, H]} each head's exact activation-patching effect per example
    (attnfx.patching.activation_patching, run example by example): metric(clean | head ← corrupt)
    − metric(clean), metric = logit[target] − logit[foil] (logit[target] without foils) at the
    example's last real token. corrupt: one text per example of the source, batched as its clean
    batch (same padding side and position ids); each must have as many tokens as its clean text."""
    if isinstance(corrupt, str) or not hasattr(corrupt, "__getitem__"):
        raise InvalidArgumentError(f"corrupt must be a list of texts, one per example, got {type(corrupt).__name__}")
    targets, foils = _ids(targets, "targets"), _ids(foils, "foils")

    def analysis(im, batch) -> dict[str, torch.Tensor]:
        from . import data
        from .analysis import metrics
        from .analysis.patching import activation_patching

        clean, other = batch.encoding, _corrupt_batch(data, batch, corrupt, tokenizer).encoding
        wanted, unwanted = _of(targets, batch, "targets"), _of(foils, batch, "foils")
        rows = []
        for j, position in enumerate(batch.last_positions.tolist()):
            metric = (metrics.logit(int(wanted[j]), position) if unwanted is None
                      else metrics.logit_diff(int(wanted[j]), int(unwanted[j]), position))
            row = lambda encoding: {key: value[j:j + 1] for key, value in encoding.items()}     # noqa: E731
            rows.append(activation_patching(im, row(clean), row(other), metric, "heads",
                                            rows_per_forward=rows_per_forward, progress=False).scores)
        return {"patching": torch.stack(rows)}

    return analysis


def _corrupt_batch(data, batch, corrupt, tokenizer):
    """The corrupt texts of the batch's examples, padded as the batch; each row's tokens where its clean row's are."""
    indices = batch.indices.tolist()
    if indices[-1] >= len(corrupt):
        raise InvalidArgumentError(f"corrupt holds {len(corrupt)} texts, one per example of the source, but the "
                                   f"source has example {indices[-1]}")
    mask = batch.encoding["attention_mask"]
    (other,) = data.batches([corrupt[i] for i in indices], tokenizer, batch_size=len(batch),
                            padding_side=batch.padding_side, position_ids="position_ids" in batch.encoding,
                            device=mask.device, progress=False)
    if other.encoding["attention_mask"].shape != mask.shape or not torch.equal(other.encoding["attention_mask"], mask):
        lengths = zip(indices, mask.sum(-1).tolist(), other.encoding["attention_mask"].sum(-1).tolist())
        bad = next(((i, a, b) for i, a, b in lengths if a != b), (indices[0], mask.shape[1], None))
        raise ShapeMismatchError(f"example {bad[0]} has {bad[1]} tokens clean and {bad[2]} corrupt (in a batch "
                                 "of the same padding): activation patching replaces heads position by position")
    return other


def combined(*analyses):
    """Analysis: every analysis's results on each batch, in one dict {name: [b, ...]} (e.g. "dla"
    and "relevance", each [b, L, H]; their names must differ)."""
    if not analyses or not all(map(callable, analyses)):
        raise InvalidArgumentError("combined takes one or more analyses (im, batch) -> dict of tensors")

    def analysis(im, batch) -> dict[str, torch.Tensor]:
        out = {}
        for each in analyses:
            found = each(im, batch)
            twice = sorted(set(out) & set(found))
            if twice:
                raise InvalidArgumentError(f"two combined analyses return {twice}: names must differ")
            out.update(found)
        return out

    return analysis


def _ids(values, what: str) -> torch.Tensor | None:
    """One token id per example of the source, as a 1-d int64 tensor on the CPU (None stays None)."""
    if values is None:
        return None
    try:
        ids = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError):
        ids = None
    if ids is None or ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise InvalidArgumentError(f"{what} must be one integer token id per example of the source (a list of ints "
                                   f"or a 1-d integer tensor), got {values!r:.80}")
    return ids.long().cpu()


def _of(ids: torch.Tensor | None, batch, what: str) -> torch.Tensor | None:
    """The ids of the batch's examples."""
    if ids is None:
        return None
    if int(batch.indices[-1]) >= len(ids):
        raise InvalidArgumentError(f"{what} holds {len(ids)} ids, one per example of the source, but the source "
                                   f"has example {int(batch.indices[-1])}")
    return ids[batch.indices]
