"""Perturbation curves and ABPC (attnfx.analysis.perturbation) on additive scoring functions, where
the exact effect of removing each token is known: f(x) = Σ_j w[x_j] over real tokens, w[MASK] = 0,
so removing token j changes f by exactly −w[x_j], and that oracle relevance is the best possible
order (the k largest weights are the k-subset of largest sum)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from _tol import assert_close
from attnfx.analysis.perturbation import (Curves, leave_one_out, mean_and_stderr, perturbation_curves,
                                          rank_correlation, removable_mask, removal_counts)
from attnfx.errors import AttnfxError, InvalidArgumentError, ShapeMismatchError

PAD, CLS, SEP, MASK = 0, 1, 2, 3
SPECIAL = (PAD, CLS, SEP, MASK)
VOCAB = 40


def _batch(lengths, seed=0):
    """Right-padded [CLS] w… [SEP] rows with `lengths` non-special tokens each."""
    g = torch.Generator().manual_seed(seed)
    t = max(lengths) + 2
    ids, mask = torch.full((len(lengths), t), PAD), torch.zeros(len(lengths), t, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, 0], ids[i, n + 1] = CLS, SEP
        ids[i, 1:n + 1] = torch.randint(len(SPECIAL), VOCAB, (n,), generator=g)
        mask[i, :n + 2] = 1
    return ids, mask


def _additive(weights, calls=None):
    """score(ids, mask) = Σ_j w[ids_j] over real tokens (w[MASK] forced to 0); records its inputs."""
    weights = weights.clone().double()
    weights[MASK] = 0.0

    def score(input_ids, attention_mask):
        if calls is not None:
            calls.append((input_ids.clone(), attention_mask.clone()))
        return (weights[input_ids] * attention_mask).sum(-1)
    return score, weights


def _curves(score, ids, mask, relevance, **kwargs):
    return perturbation_curves(score, ids, mask, relevance, special_ids=SPECIAL, mask_token_id=MASK,
                               progress=False, **kwargs)


@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=5), seed=st.integers(0, 2**16))
def test_oracle_beats_random_and_reversal_negates(lengths, seed):
    ids, mask = _batch(lengths, seed)
    score, w = _additive(torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)))
    oracle = w[ids] + 1e-9 * torch.arange(ids.shape[1])          # exact leave-one-out effects, ties broken
    rand = torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed + 1)).double()
    best = _curves(score, ids, mask, oracle).abpc()
    assert bool((best >= _curves(score, ids, mask, rand).abpc() - 1e-9).all())
    assert_close(_curves(score, ids, mask, -oracle).abpc(), -best, dtype=torch.float64)
    assert bool((best >= 0).all())


def test_curves_start_at_f_and_end_with_everything_removed():
    ids, mask = _batch([5, 9, 3])
    score, w = _additive(torch.randn(VOCAB))
    curves = _curves(score, ids, mask, torch.randn(ids.shape))
    full = score(ids, mask)
    nothing = score(ids.masked_fill(removable_mask(ids, mask, SPECIAL), MASK), mask)
    for curve in (curves.morf, curves.lerf):
        assert_close(curve[:, 0], full, dtype=torch.float64)
        assert_close(curve[:, -1], nothing, dtype=torch.float64)
    assert curves.removable.tolist() == [5, 9, 3]


def test_morf_removes_exactly_the_top_k_of_each_sentence_at_its_own_fractions():
    ids, mask = _batch([10, 4])
    score, w = _additive(torch.randn(VOCAB))
    relevance = torch.randn(ids.shape).double()
    fractions = (0.0, 0.25, 0.5, 1.0)
    curves = _curves(score, ids, mask, relevance, fractions=fractions)
    for i, n in enumerate((10, 4)):
        order = torch.argsort(relevance[i, 1:n + 1], descending=True) + 1
        for f, phi in enumerate(fractions):
            k = int(phi * n + 0.5)
            expected = w[ids[i]][mask[i].bool()].sum() - w[ids[i, order[:k]]].sum()
            assert_close(curves.morf[i, f], expected, dtype=torch.float64)
    assert removal_counts(mask.bool(), torch.tensor(fractions)).tolist() == [[0, 3, 6, 12], [0, 2, 3, 6]]


def test_special_tokens_and_padding_are_never_masked():
    lengths = (6, 2, 11)                       # distinct lengths: a row's mask tells its sentence
    ids, mask = _batch(lengths)
    calls = []
    score, _ = _additive(torch.randn(VOCAB), calls)
    relevance = torch.randn(ids.shape)
    relevance[torch.isin(ids, torch.tensor([PAD, CLS, SEP]))] = 1e3     # the most relevant by far
    _curves(score, ids, mask, relevance, batch_size=7)
    seen = 0
    for chunk_ids, chunk_mask in calls:
        for row, row_mask in zip(chunk_ids, chunk_mask):
            source = lengths.index(int(row_mask.sum()) - 2)
            original, width = ids[source], row.numel()
            assert torch.equal(row_mask, mask[source, :width])
            kept = row != MASK
            assert torch.equal(row[kept], original[:width][kept])
            assert not bool(torch.isin(original[:width][~kept], torch.tensor([PAD, CLS, SEP])).any())
            seen += 1
    lerf_only = sum(1 for n in lengths for phi in range(11) if 0 < int(phi / 10 * n + 0.5) < n)
    assert seen == 11 * len(lengths) + lerf_only            # MoRF at every point, LeRF where it differs


def test_zero_mode_passes_the_removed_positions_and_matches_mask_mode_on_an_additive_scorer():
    lengths = (7, 3)
    ids, mask = _batch(lengths)
    _, w = _additive(torch.randn(VOCAB))
    allowed = removable_mask(ids, mask, SPECIAL)

    def zero_score(input_ids, attention_mask, zeroed=None):
        for row_mask, row_zeroed in zip(attention_mask, zeroed):
            source = lengths.index(int(row_mask.sum()) - 2)
            assert not bool((row_zeroed & ~allowed[source, :row_zeroed.numel()]).any())
        return (w[input_ids] * attention_mask * ~zeroed).sum(-1)
    relevance = torch.randn(ids.shape)
    zero = perturbation_curves(zero_score, ids, mask, relevance, special_ids=SPECIAL, mode="zero", progress=False)
    masked = _curves(_additive(w)[0], ids, mask, relevance)
    assert_close(zero.morf, masked.morf, dtype=torch.float64)
    assert_close(zero.lerf, masked.lerf, dtype=torch.float64)


def test_abpc_is_the_trapezoid_per_sentence_and_cat_joins_batches():
    fractions = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    curves = Curves(fractions, torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64),
                    torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]], dtype=torch.float64), torch.tensor([4, 2]))
    assert curves.abpc().tolist() == [0.5, 0.0]
    both = Curves.cat([curves, curves])
    assert both.morf.shape == (4, 3) and both.abpc().tolist() == [0.5, 0.0, 0.5, 0.0]
    mean, se = mean_and_stderr(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean == 2.5 and se == pytest.approx((5 / 3) ** 0.5 / 2)


def test_bad_input_raises_typed_errors():
    ids, mask = _batch([4, 2])
    score, _ = _additive(torch.randn(VOCAB))
    rel = torch.randn(ids.shape)
    cases = [
        (ShapeMismatchError, dict(relevance=rel[:, :-1])),
        (ShapeMismatchError, dict(attention_mask=mask[:1])),
        (ShapeMismatchError, dict(input_ids=ids[0], attention_mask=mask[0], relevance=rel[0])),
        (InvalidArgumentError, dict(relevance=rel.masked_fill(mask == 0, float("nan")))),
        (InvalidArgumentError, dict(mode="delete")),
        (InvalidArgumentError, dict(mask_token_id=None)),
        (InvalidArgumentError, dict(mode="zero")),                           # score takes no `zeroed`
        (InvalidArgumentError, dict(fractions=(0.0, 0.6, 0.5, 1.0))),
        (InvalidArgumentError, dict(fractions=(0.0, 1.5))),
        (ShapeMismatchError, dict(score=lambda i, m: score(i, m)[:1])),
        (InvalidArgumentError, dict(batch_size=0)),
    ]
    for error, change in cases:
        args = dict(score=score, input_ids=ids, attention_mask=mask, relevance=rel, special_ids=SPECIAL,
                    mask_token_id=MASK, progress=False) | change
        with pytest.raises(error) as info:
            perturbation_curves(args.pop("score"), args.pop("input_ids"), args.pop("attention_mask"),
                                args.pop("relevance"), **args)
        assert isinstance(info.value, AttnfxError)
    with pytest.raises(ShapeMismatchError):
        Curves.cat([Curves(torch.tensor([0.0, 1.0]), *[torch.zeros(1, 2)] * 2, torch.ones(1)),
                    Curves(torch.tensor([0.0, 0.5, 1.0]), *[torch.zeros(1, 3)] * 2, torch.ones(1))])


def test_leave_one_out_is_the_exact_single_token_effect_and_ranks_correlate():
    ids, mask = _batch([5, 8, 1])
    score, w = _additive(torch.randn(VOCAB))
    effects = leave_one_out(score, ids, mask, special_ids=SPECIAL, mask_token_id=MASK, batch_size=3, progress=False)
    removable = removable_mask(ids, mask, SPECIAL)
    assert_close(effects[removable], w[ids][removable], dtype=torch.float64)
    assert bool(torch.isnan(effects[~removable]).all())
    rho = rank_correlation(w[ids], effects)
    assert rho[:2].tolist() == pytest.approx([1.0, 1.0]) and torch.isnan(rho[2])      # 1 token: undefined
    assert rank_correlation(-w[ids], effects)[:2].tolist() == pytest.approx([-1.0, -1.0])
    with pytest.raises(ShapeMismatchError):
        rank_correlation(w[ids][:, :-1], effects)
