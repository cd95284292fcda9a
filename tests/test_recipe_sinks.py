"""recipes.sinks: the mass on the first tokens from attention_stats equals the one read off explicit
patterns (rec["pattern"]), on the default GPT-2 and on a GQA Llama, right- and left-padded."""
import pytest
import torch

import attnfx
import models
from _tol import assert_close
from attnfx import data, recipes
from attnfx.errors import InvalidArgumentError
from attnfx.models.loader import load_default, load_prompts

TEXTS = 10                           # prompts of mixed kinds and lengths: padding in every batch


@pytest.fixture(scope="module")
def default():
    model, tok = load_default()
    prompts = load_prompts()
    texts = [p["prompt"] for p in prompts["facts"][:3] + prompts["counterfactual"][:3] + prompts["ioi"][:2]]
    texts += [p["first"] + " | " + p["first"] for p in prompts["copy"][:TEXTS - len(texts)]]
    return attnfx.instrument(model), tok, texts


def _from_patterns(im, encoding, first):
    with torch.no_grad(), im.record("pattern") as rec:
        im(**encoding)
    return recipes.sinks.from_patterns(rec["pattern"], encoding["attention_mask"], first)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("first", [1, 3])
def test_default_model_matches_patterns(default, side, first):
    im, tok, texts = default
    want = []
    for batch in data.batches(texts, tok, batch_size=4, padding_side=side, progress=False):
        got = recipes.sinks.batch_sink_mass(im, batch, first)
        ref = _from_patterns(im, batch.encoding, first)
        assert_close(got, ref)
        want.append(ref)
    total = recipes.sinks.sink_mass(im, texts, tok, first=first, batch_size=4, padding_side=side, progress=False)
    assert total.shape == (4, 8)
    assert_close(total, torch.cat(want).mean(0))


def test_padding_side_does_not_change_the_result(default):
    im, tok, texts = default
    right = recipes.sinks.sink_mass(im, texts, tok, batch_size=4, padding_side="right", progress=False)
    left = recipes.sinks.sink_mass(im, texts, tok, batch_size=4, padding_side="left", progress=False)
    alone = recipes.sinks.sink_mass(im, texts, tok, batch_size=1, progress=False)
    assert_close(right, alone)
    assert_close(left, alone)


@pytest.mark.parametrize("side", ["right", "left"])
def test_llama_gqa_matches_patterns(side):
    model = models.build(models.FAMILIES["llama"], layers=2, heads=4, kv_heads=2, impl="sdpa")
    im = attnfx.instrument(model)
    lengths = torch.tensor([9, 4, 7])
    real = torch.arange(9) < lengths[:, None]                        # right-padded mask [3, 9]
    mask = real if side == "right" else real.flip(-1)
    ids = torch.randint(1, models.VOCAB, (3, 9))
    encoding = {"input_ids": ids, "attention_mask": mask.long()}
    if side == "left":
        encoding["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
    got = recipes.sinks.batch_sink_mass(im, encoding, first=2)
    assert got.shape == (3, 2, 4)
    assert_close(got, _from_patterns(im, encoding, 2))


def test_typed_errors(default):
    im, tok, texts = default
    with pytest.raises(InvalidArgumentError, match="first must be a positive int"):
        recipes.sinks.sink_mass(im, texts, tok, first=0)
    encoding = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1], [0, 0, 0]])}
    with pytest.raises(InvalidArgumentError, match="at least one real token"):
        recipes.sinks.batch_sink_mass(im, encoding)
