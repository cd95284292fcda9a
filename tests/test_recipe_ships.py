"""SHIPS (issue 16): recipes.ships.head_importance — every head's query scaled by ε on its own tile
of one batch — equals the paper's loop written here (one prompt at a time, batch 1, no padding:
the bare HF model with a forward hook scaling the head's columns of the query projection, KL of
the last token's next-token distributions), on the default GPT-2 with a left-padded batch and
on a Llama with GQA with a right-padded one; a second call compiles nothing."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import attnfx
import models
from _tol import assert_close
from attnfx.errors import InvalidArgumentError, SteeringValueError
from attnfx.models.loader import load_default, load_prompts
from attnfx.recipes import ships

EPS = ships.DEFAULT_EPS
WIDE_INIT = 0.3          # the random Llama's weight std: next-token distributions far from uniform


@pytest.fixture(scope="module")
def default():
    model, tok = load_default()
    prompts = [row["prompt"] for row in load_prompts()["counterfactual"][:2] + load_prompts()["facts"][:2]]
    return model, tok, prompts, attnfx.instrument(model)


def _left_padded(tok, prompts):
    batch = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    batch["position_ids"] = (batch["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    return dict(batch)


def _paper_loop(model, examples, query_proj, head_dim, eps):
    """[n, L, H]: for each prompt ([1, t] ids) and head, one forward with the head's query columns
    of query_proj(layer) scaled by eps; KL(p ‖ p̃) at the last token."""
    config = model.config
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    out = torch.zeros(len(examples), layers, heads)
    for i, ids in enumerate(examples):
        with torch.no_grad():
            base = model(input_ids=ids).logits[0, -1]
        for layer in range(layers):
            for head in range(heads):
                def hook(mod, args, output, head=head):
                    output = output.clone()
                    output[..., head * head_dim:(head + 1) * head_dim] *= eps
                    return output
                handle = query_proj(model, layer).register_forward_hook(hook)
                try:
                    with torch.no_grad():
                        scaled = model(input_ids=ids).logits[0, -1]
                finally:
                    handle.remove()
                p, logq = torch.softmax(base, -1), torch.log_softmax(scaled, -1)
                out[i, layer, head] = (p * (torch.log(p) - logq)).sum()
    return out


def test_gpt2_left_padded_equals_the_papers_loop(default):
    model, tok, prompts, im = default
    result = ships.head_importance(im, _left_padded(tok, prompts), rows_per_forward=3 * len(prompts), progress=False)
    examples = [tok(p, return_tensors="pt")["input_ids"] for p in prompts]
    c_attn = lambda m, l: m.transformer.h[l].attn.c_attn                          # noqa: E731  q: first d_model columns
    want = _paper_loop(model, examples, c_attn, model.config.n_embd // model.config.n_head, EPS)
    assert_close(result.per_example, want)
    assert_close(result.scores, want.mean(0))
    assert result.forwards == 1 + 11                   # 32 heads, 3 a forward
    assert im.steering.active() == [] and not im.steering.positions.in_use


@pytest.mark.parametrize("eps", [0.0, 0.5])
def test_llama_gqa_right_padded_equals_the_papers_loop(eps):
    model = models.build(models.FAMILIES["llama"], layers=2, heads=4, kv_heads=2, impl="sdpa")
    torch.manual_seed(1)
    with torch.no_grad():                               # HF's init (std 0.02) leaves p̃ ≈ p ≈ uniform: KL ~1e-8
        for weight in (p for p in model.parameters() if p.dim() == 2):
            weight.normal_(std=WIDE_INIT)
    lengths = [7, 5, 3]
    ids = torch.randint(1, models.VOCAB, (len(lengths), max(lengths)))
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
    result = ships.head_importance(attnfx.instrument(model), {"input_ids": ids, "attention_mask": mask}, eps=eps,
                                   progress=False)
    q_proj = lambda m, l: m.model.layers[l].self_attn.q_proj                       # noqa: E731
    want = _paper_loop(model, [ids[i:i + 1, :n] for i, n in enumerate(lengths)], q_proj, model.config.head_dim, eps)
    assert_close(result.per_example, want)
    assert result.forwards == 2                         # 8 heads × 3 rows fit one forward
    assert float(result.scores.max()) > 1e-3


def test_chunks_compile_nothing_after_the_first_call(default):
    model, tok, prompts, im = default
    first, second = _left_padded(tok, prompts), _left_padded(tok, prompts[::-1])
    ships.head_importance(im, first, rows_per_forward=5 * len(prompts), progress=False)   # 7 chunks, last padded
    before = counters["attnfx"]["graphs_compiled"]
    result = ships.head_importance(im, second, eps=0.25, rows_per_forward=5 * len(prompts), progress=False)
    assert counters["attnfx"]["graphs_compiled"] == before
    assert result.forwards == 1 + 7


def test_knobs_set_before_are_restored(default):
    model, tok, prompts, im = default
    im.steering.scale(1, 2, 3.0)
    try:
        ships.head_importance(im, _left_padded(tok, prompts[:1]), rows_per_forward=8, progress=False)
        assert im.steering.active() == [("z", 1, 2, 3.0)]
    finally:
        im.steering.reset()


def test_bad_arguments_raise(default):
    model, tok, prompts, im = default
    batch = _left_padded(tok, prompts[:2])
    for eps in (float("nan"), -0.1, True, "0.1"):
        with pytest.raises(SteeringValueError, match="eps"):
            ships.head_importance(im, batch, eps=eps, progress=False)
    with pytest.raises(InvalidArgumentError, match="rows_per_forward"):
        ships.head_importance(im, batch, rows_per_forward=0, progress=False)
    with pytest.raises(InvalidArgumentError, match="batched tensor"):
        ships.head_importance(im, {"input_ids": torch.tensor([1, 2, 3])}, progress=False)
    with pytest.raises(InvalidArgumentError, match="no real token"):
        ships.head_importance(im, {**batch, "attention_mask": torch.zeros_like(batch["attention_mask"])},
                              progress=False)
