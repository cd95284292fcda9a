"""recipes.retrieval (Wu et al. 2024) on the default model: retrieval scores from the
attention_argmax op on recorded q and k equal those from explicit patterns (`im.record("pattern")`,
argmax here), per prompt; copy accuracy is the plain model's greedy exact match; helpers and
typed errors."""
import pytest
import torch

import attnfx
from attnfx.errors import InvalidArgumentError
from attnfx.models import load_default, load_prompts
from attnfx.recipes import retrieval

LENGTHS = (4, 8, 11)         # copy lengths tested: each batch shape compiles once per record spec
PER_LENGTH = 4


def _items():
    """PER_LENGTH held-out copy prompts of each length in LENGTHS, grouped by length."""
    items = load_prompts()["copy"]
    return [it for n in LENGTHS for it in [x for x in items if len(x["first"].split()) == n][:PER_LENGTH]]


@pytest.fixture(scope="module")
def setup():
    model, tok = load_default()
    im = attnfx.instrument(model, backend="eager")
    prompts = retrieval.copy_prompts(tok, _items())
    yield model, im, prompts, retrieval.retrieval_scores(im, prompts)
    im.uninstrument()


def _pattern_hits(im, group) -> torch.Tensor:
    """[b, L, H] hits / k of prompts of one shape from the explicit [b, H, t, s] patterns of every
    decode step."""
    ids, start, end = torch.stack([p.ids for p in group]), group[0].start, group[0].end
    with torch.no_grad(), im.record("pattern") as rec:
        out = im.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=end - start,
                          min_new_tokens=end - start, pad_token_id=0)
    hits = torch.zeros(len(group), len(im.sites), im.sites[0].num_heads)
    for i, call in enumerate(rec.calls):
        token = out[:, ids.shape[1] + i, None]                       # [b, 1]
        for layer, pattern in enumerate(call["pattern"]):
            j = pattern[:, :, -1].argmax(-1)                         # [b, H]: the most attended key
            hits[:, layer] += ((j >= start) & (j < end) & (out.gather(1, j) == token)).float()
    return hits / (end - start)


def test_scores_equal_those_from_explicit_patterns(setup):
    _, im, prompts, result = setup
    n = len(prompts)
    assert result.per_prompt.shape == (n, 4, 8) and result.scores.shape == (4, 8)
    for i in range(0, n, PER_LENGTH):
        want = _pattern_hits(im, prompts[i:i + PER_LENGTH])
        torch.testing.assert_close(result.per_prompt[i:i + PER_LENGTH], want, atol=0, rtol=0)
    torch.testing.assert_close(result.scores, result.per_prompt.mean(0))
    assert result.scores.max() > 0.3                                 # the default model has retrieval heads


def test_copied_is_the_plain_models_exact_match(setup):
    model, im, prompts, result = setup
    wanted = []
    for p in prompts:
        k = p.end - p.start
        out = model.generate(p.ids[None], attention_mask=torch.ones(1, len(p.ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=k, min_new_tokens=k, pad_token_id=0)
        wanted.append(bool(torch.equal(out[0, len(p.ids):], p.ids[p.start:p.end])))
    assert result.copied.tolist() == wanted
    first = prompts[:PER_LENGTH]                                     # one shape: one compile
    assert retrieval.copy_accuracy(im, first) == sum(wanted[:PER_LENGTH]) / PER_LENGTH


def test_copy_prompts_layout(setup):
    model, _, prompts, _ = setup
    tok = load_default()[1]
    p = prompts[0]
    assert tok.decode(p.ids[p.start:p.end]) == _items()[0]["first"]
    assert tok.convert_ids_to_tokens(int(p.ids[-1])) == retrieval.SEPARATOR and p.ids[0] == tok.bos_token_id


def test_step_hits_and_top_heads():
    index = torch.tensor([[1, 3, 4, -1]])                            # [b=1, H=4]
    seq = torch.tensor([[9, 5, 6, 5, 7]])
    hits = retrieval.step_hits(index, seq, torch.tensor([5]), 1, 4)
    assert hits.tolist() == [[True, True, False, False]]            # key 4 is outside the source
    scores = torch.tensor([[0.1, 0.9], [float("nan"), 0.5]])
    assert retrieval.top_heads(scores, 3) == [(0, 1), (1, 1), (0, 0)]


def test_typed_errors(setup):
    _, im, prompts, _ = setup
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        retrieval.retrieval_scores(im, prompts, batch_size=0)
    with pytest.raises(InvalidArgumentError, match="at least one"):
        retrieval.copy_accuracy(im, [])
    with pytest.raises(InvalidArgumentError, match="start < end"):
        retrieval.retrieval_scores(im, [retrieval.CopyPrompt(torch.arange(4), 3, 3)])
