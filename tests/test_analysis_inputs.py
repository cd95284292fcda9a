"""The analyses read their inputs one way (issue 12, HF parity): any Mapping of keyword inputs (a
tokenizer's BatchEncoding) as a dict; position=None as each row's last real token per the
attention mask; one convention for token targets (int, numpy integer, 0-d / 1-d integer tensor or
array, list of ints), with bad ones refused by typed errors before the model runs."""
import functools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import BatchEncoding

import attnfx
from _tol import assert_close
from attnfx import metrics, patching
from attnfx.graph import calls
from attnfx.errors import InvalidArgumentError, ShapeMismatchError
from models import FAMILIES, VOCAB, build

FAMS = ("gpt2", "llama")
SEQ = 6


@functools.lru_cache(maxsize=None)
def _model(family: str):
    """One instrumented tiny model per family, shared by the tests of this file (they leave it as
    they found it: that is one of the things checked)."""
    model = build(FAMILIES[family], layers=2, heads=2, kv_heads=1, head_dim=8, seed=1)
    return attnfx.instrument(model)


def _ids(batch=2, seq=SEQ, seed=0):
    return torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _padded(lengths, side: str, seq=SEQ, seed=0):
    """input_ids, attention_mask (and position_ids counting real tokens, so a left-padded row's
    real tokens sit where they would alone) for rows of the given real lengths."""
    ids = _ids(len(lengths), seq, seed)
    mask = torch.zeros(len(lengths), seq, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, seq - n:] = 1
    ids = ids.masked_fill(mask == 0, 0)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if side == "left":
        inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return inputs


def _row_alone(inputs, row):
    """The row's real tokens alone, unpadded (no mask)."""
    real = inputs["attention_mask"][row].bool()
    return {"input_ids": inputs["input_ids"][row][real][None]}


def _state(im):
    return {name: buf.clone() for name, buf in im.named_buffers()}


def _assert_unchanged(im, before):
    after = _state(im)
    assert after.keys() == before.keys()
    for name in before:
        assert torch.equal(after[name], before[name]), name


class _Runs:
    """Counts the instrumented model's forward calls."""

    def __init__(self, im):
        self.im, self.count = im, 0

    def __enter__(self):
        original = type(self.im)._call

        def counted(args, kwargs):
            self.count += 1
            return original(self.im, args, kwargs)
        self.im._call = counted
        return self

    def __exit__(self, *exc):
        del self.im._call


# ---- calls: as_call and last_positions -----------------------------------------------------------
def test_as_call_reads_any_mapping_as_keyword_arguments():
    ids = _ids()
    enc = BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    args, kwargs = calls.as_call(enc)
    assert args == () and type(kwargs) is dict and kwargs.keys() == {"input_ids", "attention_mask"}
    assert kwargs["input_ids"] is ids
    assert calls.batch_and_length(args, kwargs) == (2, SEQ)
    with pytest.raises(InvalidArgumentError, match="strings"):
        calls.as_call({0: ids})


def test_last_positions_right_left_and_no_mask():
    ids = _ids(3, 4)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    assert calls.last_positions((), {"input_ids": ids, "attention_mask": mask}).tolist() == [1, 3, 3]
    assert calls.last_positions((), {"input_ids": ids}).tolist() == [3, 3, 3]
    assert calls.last_positions((ids,), {}).tolist() == [3, 3, 3]
    bool_mask = mask.bool()
    assert calls.last_positions((), {"input_ids": ids, "attention_mask": bool_mask}).tolist() == [1, 3, 3]
    # a mask that also covers past tokens is read at its last seq columns
    past = torch.cat([torch.ones(3, 2, dtype=torch.long), mask], 1)
    assert calls.last_positions((), {"input_ids": ids, "attention_mask": past}).tolist() == [1, 3, 3]


def test_last_positions_finds_a_positional_mask_through_the_forward_signature():
    def forward(input_ids, attention_mask=None):
        return input_ids

    ids, mask = _ids(2, 4), torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert calls.last_positions((ids, mask), {}, forward).tolist() == [2, 0]
    assert calls.last_positions((ids, mask), {}).tolist() == [3, 3]      # no signature: no mask known


def test_last_positions_refuses_masks_it_cannot_read():
    ids = _ids(2, 4)
    with pytest.raises(ShapeMismatchError, match="position="):
        calls.last_positions((), {"input_ids": ids, "attention_mask": torch.ones(2, 1, 4, 4)})
    with pytest.raises(ShapeMismatchError):
        calls.last_positions((), {"input_ids": ids, "attention_mask": torch.ones(2, 3)})
    with pytest.raises(InvalidArgumentError, match=r"row\(s\) \[1\]"):
        calls.last_positions((), {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])})


@given(rows=st.lists(st.tuples(st.integers(1, 12), st.integers(0, 12), st.sampled_from(["left", "right"])),
                     min_size=1, max_size=5))
def test_last_positions_over_pad_lengths(rows):
    seq = max(n + pad for n, pad, _ in rows)
    mask = torch.zeros(len(rows), seq, dtype=torch.long)
    want = []
    for r, (n, pad, side) in enumerate(rows):
        start = seq - n if side == "left" else 0
        mask[r, start:start + n] = 1
        want.append(start + n - 1)
    got = calls.last_positions((), {"input_ids": torch.zeros(len(rows), seq, dtype=torch.long),
                                    "attention_mask": mask})
    assert got.tolist() == want


# ---- the per-example integer convention ---------------------------------------------------------------
ONE_PER_EXAMPLE = [3, np.int64(3), np.int32(3), torch.tensor(3), torch.tensor([3]), torch.tensor([3, 3]),
                   np.array(3), np.array([3, 3]), [3, 3], (3, 3), [np.int64(3), torch.tensor(3)]]


@pytest.mark.parametrize("value", ONE_PER_EXAMPLE, ids=repr)
def test_per_example_reads_every_integer_form(value):
    got = calls.per_example(value, 2, "target")
    assert got.dtype == torch.long and got.tolist() == [3, 3]


@pytest.mark.parametrize("value, error, match", [
    (True, InvalidArgumentError, "target must be"),
    (np.bool_(True), InvalidArgumentError, "target must be"),
    (torch.tensor([True, False]), InvalidArgumentError, "integers"),
    (3.5, InvalidArgumentError, "target must be"),
    (np.float64(3.0), InvalidArgumentError, "target must be"),
    (torch.tensor([3.0, 4.0]), InvalidArgumentError, "integers"),
    (np.array([3.0, 4.0]), InvalidArgumentError, "integers"),
    ([3, 4.0], InvalidArgumentError, "float"),
    ([3, True], InvalidArgumentError, "bool"),
    ("3", InvalidArgumentError, "target must be"),
    (None, InvalidArgumentError, "target must be"),
    ([3, 4, 5], ShapeMismatchError, r"one per example \(2\), got 3"),
    ([], ShapeMismatchError, r"one per example \(2\), got 0"),
    (torch.tensor([[3, 4]]), ShapeMismatchError, r"shape \[1, 2\]"),
], ids=repr)
def test_per_example_refuses_bools_floats_and_wrong_lengths(value, error, match):
    with pytest.raises(error, match=match):
        calls.per_example(value, 2, "target")


def test_positions_range_and_none():
    assert calls.positions(-1, 2, 5).tolist() == [4, 4]
    assert calls.positions([0, -5], 2, 5).tolist() == [0, 0]
    with pytest.raises(InvalidArgumentError, match=r"\[-5, 5\)"):
        calls.positions(5, 2, 5)
    with pytest.raises(InvalidArgumentError, match="last_positions"):
        calls.positions(None, 2, 5)


def test_metrics_share_the_convention():
    logits = torch.randn(2, 5, VOCAB)
    want = logits[:, -1, 3]
    for value in (3, np.int64(3), torch.tensor(3), np.array([3, 3]), [3, 3]):
        torch.testing.assert_close(metrics.logit(value)(logits), want, rtol=0, atol=0)
    torch.testing.assert_close(metrics.logit([3, 5], position=[1, 2])(logits),
                               torch.stack([logits[0, 1, 3], logits[1, 2, 5]]), rtol=0, atol=0)
    for bad in (True, 3.5, torch.tensor([3.0])):          # refused when the metric is made
        with pytest.raises(InvalidArgumentError):
            metrics.logit(bad)
    with pytest.raises(InvalidArgumentError, match="last_positions"):
        metrics.logit_diff(3, 4, position=None)
    with pytest.raises(InvalidArgumentError, match=r"\[-5, 5\)"):      # no longer wraps around
        metrics.logit(3, position=5)(logits)
    with pytest.raises(ShapeMismatchError):
        metrics.logit([1, 2, 3])(logits)


# ---- BatchEncoding is a dict to every analysis ----------------------------------------------------------
@pytest.mark.parametrize("family", FAMS)
def test_batch_encoding_equals_dict(family):
    im = _model(family)
    clean = _padded([SEQ, 4], "right", seed=1)
    corrupt = _padded([SEQ, 4], "right", seed=2)
    enc, enc_corrupt = BatchEncoding(clean), BatchEncoding(corrupt)

    assert torch.equal(attnfx.head_attribution(im, enc, 3, foil=5, reduce="none"),
                       attnfx.head_attribution(im, clean, 3, foil=5, reduce="none"))
    by_enc, by_dict = attnfx.relevance(im, enc, 3), attnfx.relevance(im, clean, 3)
    for name in ("tokens", "heads_per_position", "attn", "mlp", "residual", "target"):
        assert torch.equal(getattr(by_enc, name), getattr(by_dict, name)), name
    at = calls.last_positions(*calls.as_call(clean))
    metric = metrics.logit_diff(3, 5, position=at)
    for method in (patching.attribution_patching, patching.relp):
        assert torch.equal(method(im, enc, enc_corrupt, metric).scores, method(im, clean, corrupt, metric).scores)
    exact_enc = patching.activation_patching(im, enc, enc_corrupt, metric, progress=False)
    exact_dict = patching.activation_patching(im, clean, corrupt, metric, progress=False)
    assert torch.equal(exact_enc.scores, exact_dict.scores)
    assert torch.equal(im.steering.mean_z(enc), im.steering.mean_z(clean))


# ---- position=None: each row's last real token ------------------------------------------------------------
@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_head_attribution_default_reads_each_rows_last_real_token(family, side):
    im = _model(family)
    inputs = _padded([SEQ, 3], side)
    default = attnfx.head_attribution(im, inputs, 3, foil=5, reduce="none")
    last = attnfx.head_attribution(im, inputs, 3, foil=5, position=-1, reduce="none")
    for row in range(2):
        alone = attnfx.head_attribution(im, _row_alone(inputs, row), 3, foil=5, reduce="none")[0]
        assert_close(default[row], alone)
    if side == "right":       # -1 is the pad position of the padded row
        assert (last[1] - default[1]).abs().max() > 100 * 1e-5
        assert torch.equal(last[0], default[0])
    else:                     # left padding: the last real token is the last position
        assert torch.equal(last, default)
    assert_close(attnfx.head_attribution(im, inputs, 3, foil=5), default.mean(0))


@pytest.mark.parametrize("family", FAMS)
@given(lengths=st.lists(st.integers(1, SEQ), min_size=2, max_size=3), side=st.sampled_from(["right", "left"]))
def test_head_attribution_default_over_pad_lengths(family, lengths, side):
    im = _model(family)
    inputs = _padded(lengths, side, seed=sum(lengths))
    default = attnfx.head_attribution(im, inputs, [3, 5, 7][:len(lengths)], reduce="none")
    explicit = attnfx.head_attribution(im, inputs, [3, 5, 7][:len(lengths)], reduce="none",
                                       position=[n - 1 if side == "right" else SEQ - 1 for n in lengths])
    assert torch.equal(default, explicit)


@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("side", ["right", "left"])
def test_relevance_default_reads_each_rows_last_real_token(family, side):
    im = _model(family)
    inputs = _padded([SEQ, 3], side)
    padded = attnfx.relevance(im, inputs, 3, foil=5)
    for row in range(2):
        alone = attnfx.relevance(im, _row_alone(inputs, row), 3, foil=5)
        real = inputs["attention_mask"][row].bool()
        assert_close(padded.target[row:row + 1], alone.target)
        # the residual stream and heads, not .tokens: the tiny GPT-2's position table is larger than its
        # vocabulary, so with position_ids given the "tokens" gate sits on the position embedding
        assert_close(padded.residual[row, real][None], alone.residual)
        assert_close(padded.heads_per_position[row, real][None], alone.heads_per_position)
    last = attnfx.relevance(im, inputs, 3, foil=5, position=-1)
    if side == "right":
        assert (last.target[1] - padded.target[1]).abs() > 100 * 1e-5
    else:
        assert torch.equal(last.target, padded.target)


# ---- one target convention -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMS)
def test_target_forms_agree_for_relevance_and_head_attribution(family):
    im = _model(family)
    inputs = _padded([SEQ, 4], "right")
    ref_rel = attnfx.relevance(im, inputs, 3)
    ref_dla = attnfx.head_attribution(im, inputs, 3, reduce="none")
    for target in ONE_PER_EXAMPLE:
        rel = attnfx.relevance(im, inputs, target)
        assert torch.equal(rel.tokens, ref_rel.tokens) and torch.equal(rel.target, ref_rel.target), repr(target)
        assert torch.equal(attnfx.head_attribution(im, inputs, target, reduce="none"), ref_dla), repr(target)
    by_foil = attnfx.relevance(im, inputs, [3, 3], foil=np.array([5, 5]))
    by_dict = attnfx.relevance(im, inputs, {np.int64(3): 1.0, 5: -1.0})
    assert_close(by_dict.target, by_foil.target)
    assert_close(by_dict.tokens, by_foil.tokens)


@pytest.mark.parametrize("family", FAMS)
def test_per_example_targets_equal_each_row_alone(family):
    im = _model(family)
    inputs = _padded([SEQ, 4], "right")
    for target, foil in (([3, 5], None), (torch.tensor([3, 5]), np.array([7, 9]))):
        both = attnfx.relevance(im, inputs, target, foil=foil)
        dla = attnfx.head_attribution(im, inputs, target, foil=foil, reduce="none")
        for row in range(2):
            one = {k: v[row:row + 1] for k, v in inputs.items()}
            t = int(target[row])
            f = None if foil is None else int(foil[row])
            alone = attnfx.relevance(im, one, t, foil=f)
            assert_close(both.tokens[row:row + 1], alone.tokens)
            assert_close(both.target[row:row + 1], alone.target)
            assert_close(dla[row:row + 1], attnfx.head_attribution(im, one, t, foil=f, reduce="none"))
    # the (position, token[, weight]) list form is told apart from a list of ints by its elements
    tuples = attnfx.relevance(im, inputs, [(3, 3), (-1, 5, -1.0)])
    by_fn = attnfx.relevance(im, inputs, lambda out: out.logits[:, 3, 3] - out.logits[:, -1, 5])
    assert_close(tuples.target, by_fn.target)


@pytest.mark.parametrize("family", FAMS)
@pytest.mark.parametrize("bad, error, match", [
    (True, InvalidArgumentError, "target must be"),
    (3.5, InvalidArgumentError, "target must be"),
    (torch.tensor([3.0, 4.0]), InvalidArgumentError, "integers"),
    (np.array([3, 4, 5]), ShapeMismatchError, r"one per example \(2\), got 3"),
    ([3, 4, 5], ShapeMismatchError, r"one per example \(2\), got 3"),
    (VOCAB, InvalidArgumentError, rf"token ids must be in \[0, {VOCAB}\)"),
    ([3, -1], InvalidArgumentError, "token ids"),
    ({VOCAB + 1: 1.0}, InvalidArgumentError, "token ids"),
    ([(0, 3), 4], InvalidArgumentError, "tuple"),
])
def test_bad_targets_raise_typed_errors_before_running(family, bad, error, match):
    im = _model(family)
    inputs = _padded([SEQ, 4], "right")
    before = _state(im)
    with _Runs(im) as runs:
        with pytest.raises(error, match=match):
            attnfx.relevance(im, inputs, bad)
        if not isinstance(bad, dict):
            with pytest.raises(error, match=match):
                attnfx.head_attribution(im, inputs, bad)
            with pytest.raises(error):
                attnfx.relevance(im, inputs, 3, foil=bad)
            with pytest.raises(error):
                attnfx.head_attribution(im, inputs, 3, foil=bad)
    assert runs.count == 0
    _assert_unchanged(im, before)


@pytest.mark.parametrize("family", FAMS)
def test_bad_positions_and_mixed_forms_raise_before_running(family):
    im = _model(family)
    inputs = _padded([SEQ, 4], "right")
    before = _state(im)
    with _Runs(im) as runs:
        for analysis in (attnfx.relevance, attnfx.head_attribution):
            with pytest.raises(InvalidArgumentError, match=r"\[-6, 6\)"):
                analysis(im, inputs, 3, position=SEQ)
            with pytest.raises(InvalidArgumentError):
                analysis(im, inputs, 3, position=1.0)
            with pytest.raises(ShapeMismatchError):
                analysis(im, inputs, 3, position=[1, 2, 3])
            with pytest.raises(ShapeMismatchError, match="position="):
                analysis(im, {**inputs, "attention_mask": torch.ones(2, 1, SEQ, SEQ)}, 3)
        with pytest.raises(InvalidArgumentError, match="foil"):
            attnfx.relevance(im, inputs, {3: 1.0}, foil=5)
        with pytest.raises(InvalidArgumentError, match="at least one token"):
            attnfx.relevance(im, inputs, {})
        with pytest.raises(InvalidArgumentError, match="weight"):
            attnfx.relevance(im, inputs, {3: "heavy"})
        with pytest.raises(InvalidArgumentError, match="position"):
            attnfx.relevance(im, inputs, lambda out: out.logits[:, -1, 3], position=2)
        with pytest.raises(InvalidArgumentError, match="position"):
            attnfx.relevance(im, inputs, [(1, 3)], position=2)
    assert runs.count == 0
    _assert_unchanged(im, before)
