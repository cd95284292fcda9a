"""How analyses read a model call: the inputs as (args, kwargs), the [batch, seq] they carry, each
row's last real token, the logits among the outputs and the vocabulary they span, the main output
metrics read (and its positions: an encoder–decoder's are the decoder's); and the one convention
for token ids and positions given per example (`per_example`, `token_ids`, `positions`)."""
from __future__ import annotations

import inspect
import numbers
from collections.abc import Mapping, Sequence

import torch

from ..errors import InvalidArgumentError, ShapeMismatchError


def as_call(inputs) -> tuple[tuple, dict]:
    """A tensor, a tuple of arguments or a mapping of keyword arguments (a dict, or any Mapping such
    as a tokenizer's BatchEncoding) → (args, kwargs), kwargs a plain dict."""
    if isinstance(inputs, Mapping):
        kwargs = dict(inputs)
        bad = [k for k in kwargs if not isinstance(k, str)]
        if bad:
            raise InvalidArgumentError(f"keyword inputs must be named by strings, got keys {bad!r}")
        return (), kwargs
    if isinstance(inputs, tuple):
        return inputs, {}
    return (inputs,), {}


def batch_and_length(args, kwargs) -> tuple[int, int]:
    """[batch, seq] of the call: input_ids or inputs_embeds, else the first [b, t, ...] tensor."""
    for value in [kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args, *kwargs.values()]:
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[0]), int(value.shape[1])
    raise InvalidArgumentError("could not find a batched tensor input ([batch, seq, ...]) in inputs")


def attention_mask_of(args, kwargs, forward=None) -> torch.Tensor | None:
    """The call's attention_mask: the keyword, else (given the model's `forward`) the positional
    argument bound to a parameter of that name; None when the call has none."""
    mask = kwargs.get("attention_mask")
    if mask is None and args and forward is not None:
        try:
            mask = inspect.signature(forward).bind_partial(*args, **kwargs).arguments.get("attention_mask")
        except (TypeError, ValueError):
            mask = None
    return mask if isinstance(mask, torch.Tensor) else None


def last_positions(args, kwargs, forward=None) -> torch.Tensor:
    """Each row's last real token, a LongTensor [b] on the CPU: the last position where the
    [batch, seq] attention_mask is non-zero — before the pads of a right-padded row, the last
    position of a left-padded one (mask [0, 0, 1, 1] → 3) — or seq − 1 for every row when the call
    has no attention mask. A mask longer than seq (past tokens first) is read at its last seq
    columns. Pass the model's `forward` to find a mask given positionally."""
    batch, seq = batch_and_length(args, kwargs)
    return _last_real(attention_mask_of(args, kwargs, forward), batch, seq)


def _last_real(mask: torch.Tensor | None, batch: int, seq: int, what: str = "attention_mask") -> torch.Tensor:
    """Each row's last non-zero position of a [batch, ≥ seq] mask read at its last seq columns
    (seq − 1 for every row without a mask), a LongTensor [b] on the CPU."""
    if mask is None:
        return torch.full((batch,), seq - 1, dtype=torch.long)
    if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < seq:
        raise ShapeMismatchError(
            f"the last real token is read from a [batch, seq] = [{batch}, {seq}] {what}, got shape "
            f"{list(mask.shape)}; pass position= explicitly (-1 is the last position)")
    real = mask[:, mask.shape[1] - seq:] != 0
    empty = (~real.any(-1)).nonzero().flatten().tolist()
    if empty:
        raise InvalidArgumentError(f"{what} row(s) {empty} have no real token in the input; "
                                   "pass position= explicitly")
    index = torch.arange(seq, device=mask.device).expand(batch, seq)
    return torch.where(real, index, -1).amax(-1).cpu()


# ---- the outputs' positions -----------------------------------------------------------------------
DECODER_INPUTS = ("decoder_input_ids", "decoder_inputs_embeds")
_TOKEN_INPUTS = ("input_ids", "inputs_embeds")


def _decoder_input(kwargs) -> torch.Tensor | None:
    return next((kwargs[name] for name in DECODER_INPUTS
                 if isinstance(kwargs.get(name), torch.Tensor) and kwargs[name].dim() >= 2), None)


def output_length(args, kwargs) -> int | None:
    """The positions of the main output as the inputs give them, before any run: an encoder–decoder
    call's decoder input length (its logits are the decoder's), else the token length of
    input_ids / inputs_embeds or of a first positional argument holding token ids ([b, t]
    integers) or embeddings ([b, t, d]); None otherwise — pixel values or audio features, whose
    positions are what the model's layers make of them (read them off a run)."""
    decoder = _decoder_input(kwargs)
    if decoder is not None:
        return int(decoder.shape[1])
    named = next((kwargs[n] for n in _TOKEN_INPUTS if isinstance(kwargs.get(n), torch.Tensor)), None)
    first = args[0] if args and isinstance(args[0], torch.Tensor) else None
    for value in (named, first):
        if value is not None and (value.dim() == 2 and not value.is_floating_point() or value.dim() == 3):
            return int(value.shape[1])
    return None


def output_last_positions(args, kwargs, length: int, forward=None) -> torch.Tensor:
    """Each row's last real position of the main output (`length` positions), a LongTensor [b] on
    the CPU: for an encoder–decoder call the decoder's — per decoder_attention_mask, or the last
    position without one (the encoder's attention_mask is not the outputs') — else per the
    call's attention_mask as `last_positions` reads it, the last position without one."""
    batch = batch_and_length(args, kwargs)[0]
    if _decoder_input(kwargs) is None:
        return _last_real(attention_mask_of(args, kwargs, forward), batch, length)
    mask = kwargs.get("decoder_attention_mask")
    return _last_real(mask if isinstance(mask, torch.Tensor) else None, batch, length, "decoder_attention_mask")


def find_main_output(outputs) -> torch.Tensor | None:
    """The [batch, seq, n] tensor metrics read, or None: the output itself when a tensor, its
    .logits (a language model's, [b, t, vocab]; an encoder–decoder's are the decoder's), else a
    backbone's .last_hidden_state ([b, t, d_model])."""
    for value in (outputs, getattr(outputs, "logits", None), getattr(outputs, "last_hidden_state", None)):
        if isinstance(value, torch.Tensor):
            return value if value.dim() == 3 else None
    return None


def main_output(outputs) -> torch.Tensor:
    """`find_main_output`, or an InvalidArgumentError saying what the outputs held."""
    main = find_main_output(outputs)
    if main is None:
        fields = list(outputs.keys()) if hasattr(outputs, "keys") else type(outputs).__name__
        raise InvalidArgumentError(
            f"metrics read the model's main output, a [batch, seq, n] tensor: the output itself, its .logits or "
            f"a backbone's .last_hidden_state; got {fields}. Wrap a function of the whole outputs with "
            "attnfx.metrics.of_outputs(fn) (e.g. a pooled output), or pass a callable target to relevance")
    return main


def logits_of(outputs) -> torch.Tensor:
    """The [batch, seq, vocab] logits: the output itself, or its .logits."""
    logits = outputs if isinstance(outputs, torch.Tensor) else getattr(outputs, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise InvalidArgumentError("expected [batch, seq, vocab] logits among the outputs (a tensor or .logits); "
                                   "pass a callable of the outputs for other models")
    return logits


def vocab_size(im) -> int | None:
    """The logits' vocabulary size, read from the unembedding the final-norm analysis found (None
    when none was found: a token id's range is then checked on the logits, after the run)."""
    norm = im.final_norm
    if norm is None:
        return None
    weight = dict(im.model.named_parameters(remove_duplicate=False))[norm.unembed]
    return int(weight.shape[0] if norm.unembed_layout == "out_in" else weight.shape[1])


# ---- one integer per example -------------------------------------------------------------------
INTEGER_FORMS = ("an int, a numpy integer, a 0-d or 1-d integer tensor or array, or a list of ints")


def is_integer_like(value) -> bool:
    """Whether `value` is of a kind `per_example` reads (its values and length are checked there)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (numbers.Integral, torch.Tensor)):
        return True
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return True
    return hasattr(value, "__array__") and hasattr(value, "dtype")          # a numpy array or scalar


def _integer_dtype(dtype: torch.dtype) -> bool:
    return dtype != torch.bool and not dtype.is_floating_point and not dtype.is_complex


def per_example(value, batch: int | None, what: str, *, device=None) -> torch.Tensor:
    """One integer per example as a LongTensor [batch]: `value` is an int (or numpy integer), a 0-d
    or 1-d integer tensor or array, or a sequence of ints — one value (shared by every example) or
    `batch` of them. Bools and floats raise InvalidArgumentError, other lengths ShapeMismatchError
    (batch=None checks the kind only, before the batch is known, and returns the values as given).
    On `device` if given, else where the tensor is (the CPU for Python values)."""
    if not is_integer_like(value):
        raise InvalidArgumentError(f"{what} must be {INTEGER_FORMS} (one, or one per example), "
                                   f"got {type(value).__name__}")
    if isinstance(value, numbers.Integral):
        ids = torch.tensor([int(value)])
    elif isinstance(value, torch.Tensor):
        ids = value
    elif isinstance(value, Sequence):
        items = []
        for item in value:
            if isinstance(item, torch.Tensor) and item.dim() == 0 and _integer_dtype(item.dtype):
                item = int(item)
            if isinstance(item, bool) or not isinstance(item, numbers.Integral):
                raise InvalidArgumentError(f"{what} must be {INTEGER_FORMS}; got a sequence holding "
                                           f"{type(item).__name__} {item!r}")
            items.append(int(item))
        ids = torch.tensor(items, dtype=torch.long)
    else:
        try:
            ids = torch.as_tensor(value)
        except (TypeError, RuntimeError, ValueError) as err:
            raise InvalidArgumentError(f"{what} must be {INTEGER_FORMS}; could not read "
                                       f"{type(value).__name__}: {err}") from None
    if not _integer_dtype(ids.dtype):
        raise InvalidArgumentError(f"{what} must be integers ({INTEGER_FORMS}), got dtype {ids.dtype}")
    if ids.dim() > 1:
        raise ShapeMismatchError(f"{what} must be one value or one per example: a scalar or shape [{batch}], "
                                 f"got shape {list(ids.shape)}")
    ids = ids.reshape(-1)
    if batch is None:
        return ids.to(device=device if device is not None else ids.device, dtype=torch.long)
    if ids.numel() == 1:
        ids = ids.repeat(batch)
    if ids.numel() != batch:
        raise ShapeMismatchError(f"{what} must be one value or one per example ({batch}), got {ids.numel()}")
    return ids.to(device=device if device is not None else ids.device, dtype=torch.long)


def token_ids(value, batch: int | None, what: str = "target", vocab: int | None = None, *, device=None) -> torch.Tensor:
    """`per_example` token ids, LongTensor [batch], each in [0, vocab) when vocab is given."""
    ids = per_example(value, batch, what, device=device)
    if vocab is not None:
        check_vocab(ids, vocab, what)
    return ids


def check_vocab(ids: torch.Tensor, vocab: int, what: str = "target") -> None:
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise InvalidArgumentError(f"{what} token ids must be in [0, {vocab}), got {ids.tolist()}")


def positions(value, batch: int, seq: int, what: str = "position", *, device=None) -> torch.Tensor:
    """`per_example` positions in [-seq, seq) (−1 is the last position), as indices in [0, seq)."""
    if value is None:
        raise InvalidArgumentError(
            f"{what}=None (each row's last real token) is read from a call's attention mask, which is not "
            "at hand here: pass the positions, e.g. calls.last_positions(*calls.as_call(inputs))")
    pos = per_example(value, batch, what, device=device)
    if bool(((pos < -seq) | (pos >= seq)).any()):
        raise InvalidArgumentError(f"{what} must be in [-{seq}, {seq}), got {pos.tolist()}")
    return pos % seq
