"""recipes.lookback: lookback ratios from attention_stats during generate equal the ones read off
explicit patterns recorded the same way (default GPT-2 and a GQA Llama, left-padded, rows ending
at EOS); the logistic detector and AUROC on separable data and against hand-computed values."""
import pytest
import torch

import attnfx
import models
from _tol import assert_close
from attnfx import recipes
from attnfx.analysis.factual_recall import encode
from attnfx.errors import InvalidArgumentError
from attnfx.models.loader import load_default, load_prompts

lookback = recipes.lookback


def _pattern_reference(im, encoding, max_new_tokens, eos):
    with torch.no_grad(), im.record("pattern") as rec:
        out = im.generate(input_ids=encoding["input_ids"], attention_mask=encoding["attention_mask"],
                          max_new_tokens=max_new_tokens, do_sample=False)
    patterns = [call["pattern"] for call in rec.calls]
    tokens = out[:, encoding["input_ids"].shape[1]:]
    return lookback.from_patterns(patterns, encoding["attention_mask"], tokens, eos), patterns


def _assert_same(got, want):
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.valid, want.valid)
    assert_close(got.steps, want.steps, equal_nan=True)
    assert_close(got.ratios, want.ratios, equal_nan=True)


def test_default_model_matches_patterns():
    model, tok = load_default()
    items = load_prompts()["counterfactual"]
    texts = [items[i]["prompt"] for i in (0, 100, 250, 479)] + [load_prompts()["facts"][7]["prompt"]]
    encoding = encode(tok, texts)                                   # left-padded: lengths differ
    assert not encoding["attention_mask"].bool().all()
    im = attnfx.instrument(model)
    got = lookback.lookback_ratios(im, encoding, max_new_tokens=4)
    want, patterns = _pattern_reference(im, encoding, 4, model.generation_config.eos_token_id)
    _assert_same(got, want)
    assert got.ratios.shape == (5, 4, 8) and bool(((got.ratios > 0) & (got.ratios <= 1)).all())
    entropy = lookback.step_entropy(patterns, got.valid)
    assert entropy.shape == (5, 4, 8) and bool((entropy >= 0).all())


def test_llama_gqa_matches_patterns():
    model = models.build(models.FAMILIES["llama"], layers=2, heads=4, kv_heads=2, impl="sdpa")
    im = attnfx.instrument(model)
    ids = torch.randint(1, models.VOCAB, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :5] = 0
    encoding = {"input_ids": ids, "attention_mask": mask}
    got = lookback.lookback_ratios(im, encoding, max_new_tokens=5)
    want, _ = _pattern_reference(im, encoding, 5, model.generation_config.eos_token_id)
    _assert_same(got, want)


def test_steps_after_eos_do_not_count():
    tokens = torch.tensor([[5, 2, 7, 7], [5, 6, 7, 2], [2, 9, 9, 9]])
    valid = lookback._valid_steps(tokens, eos=2)
    assert valid.tolist() == [[True, False, False], [True, True, True], [False, False, False]]


def test_separable_data_gives_auroc_one():
    g = torch.Generator().manual_seed(0)
    y = (torch.arange(200) % 2).double()
    x = torch.randn(200, 6, generator=g)
    x[:, 2] += 4 * (2 * y - 1)                                       # one informative feature, margin 8σ
    train, test = torch.arange(140), torch.arange(140, 200)        # labels alternate: both classes in each
    detector = lookback.fit_logistic(x[train], y[train])
    assert lookback.auroc(detector.score(x[test]), y[test]) == 1.0
    assert detector.weight.abs().argmax() == 2


def test_auroc_against_hand_computed_values():
    assert lookback.auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.75
    # ties count one half: positives {0.5, 0.9} vs negatives {0.5, 0.2}: (0.5 + 1 + 1 + 1) / 4
    assert lookback.auroc(torch.tensor([0.5, 0.5, 0.2, 0.9]), torch.tensor([1, 0, 0, 1])) == 0.875
    assert lookback.auroc(-torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == 0.25


def test_roc_curve_area_is_the_auroc():
    g = torch.Generator().manual_seed(1)
    scores, labels = torch.randint(0, 12, (80,), generator=g).double(), torch.randint(0, 2, (80,), generator=g)
    fpr, tpr = lookback.roc_curve(scores, labels)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    area = float(torch.trapezoid(tpr, fpr))                          # the trapezoid rule counts ties one half
    assert area == pytest.approx(lookback.auroc(scores, labels), abs=1e-12)


def test_typed_errors():
    with pytest.raises(InvalidArgumentError, match="left-padded"):
        lookback.lookback_ratios(None, {"input_ids": torch.ones(2, 3, dtype=torch.long),
                                        "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}, max_new_tokens=2)
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        lookback.lookback_ratios(None, {"input_ids": torch.ones(1, 3, dtype=torch.long)}, max_new_tokens=1)
    with pytest.raises(InvalidArgumentError, match="both classes"):
        lookback.fit_logistic(torch.randn(4, 2), torch.ones(4))
    with pytest.raises(InvalidArgumentError, match="NaN"):
        lookback.auroc(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]))
