"""DeCoRe (issue 16): recipes.decore.generate — the base and the head-masked stream as two rows of
one batch with the KV cache, every prompt at once — equals the paper's loop written in the test
(one prompt at a time, no cache: the bare model, and the bare model with the heads' columns of
c_proj's input zeroed, α = the base distribution's entropy, argmax (1 + α) z − α z̃), and its
decode steps compile nothing."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import attnfx
from _tol import assert_close
from attnfx.errors import InvalidArgumentError, SteeringValueError
from attnfx.models.loader import load_default, load_prompts
from attnfx.recipes import decore

HEADS = [(1, 3), (2, 0), (3, 5)]
STEPS = 4


@pytest.fixture(scope="module")
def setup():
    model, tok = load_default()
    prompts = [row["prompt"] for row in load_prompts()["counterfactual"][:3]]
    return model, tok, prompts, attnfx.instrument(model, backend="eager")


def _paper_loop(model, ids, heads, steps, alpha_cap=None):
    """One prompt, no cache: the full sequence through the base and the masked model each step."""
    width = model.config.n_embd // model.config.n_head

    def masked_hook(layer):
        def pre(mod, args):
            x = args[0].clone()
            for l, h in heads:
                if l == layer:
                    x[..., h * width:(h + 1) * width] = 0.0
            return (x,)
        return model.transformer.h[layer].attn.c_proj.register_forward_pre_hook(pre)

    tokens, alphas = [], []
    for _ in range(steps):
        with torch.no_grad():
            base = model(input_ids=ids).logits[0, -1]
            handles = [masked_hook(l) for l in {l for l, _ in heads}]
            try:
                masked = model(input_ids=ids).logits[0, -1]
            finally:
                for handle in handles:
                    handle.remove()
        p = torch.softmax(base, -1)
        alpha = -(p * torch.log(p)).sum()
        if alpha_cap is not None:
            alpha = alpha.clamp(max=alpha_cap)
        chosen = ((1 + alpha) * base - alpha * masked).argmax()
        tokens.append(int(chosen))
        alphas.append(alpha)
        ids = torch.cat([ids, chosen.view(1, 1)], dim=1)
    return torch.tensor(tokens), torch.stack(alphas)


@pytest.mark.parametrize("alpha_cap", [None, 0.5])
def test_batched_decore_equals_the_papers_loop_per_prompt(setup, alpha_cap):
    model, tok, prompts, im = setup
    batch = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    result = decore.generate(im, batch, HEADS, max_new_tokens=STEPS, alpha_cap=alpha_cap)
    assert result.tokens.shape == (len(prompts), STEPS)
    for i, prompt in enumerate(prompts):
        want_tokens, want_alphas = _paper_loop(model, tok(prompt, return_tensors="pt")["input_ids"], HEADS, STEPS,
                                               alpha_cap)
        assert torch.equal(result.tokens[i], want_tokens)
        assert_close(result.alphas[i], want_alphas)


def test_decode_steps_compile_nothing_and_knobs_are_restored(setup):
    model, tok, prompts, im = setup
    batch = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    decore.generate(im, batch, HEADS, max_new_tokens=2)
    before = counters["attnfx"]["graphs_compiled"]
    decore.generate(im, batch, [(0, 1)], max_new_tokens=6)            # other heads, more steps
    assert counters["attnfx"]["graphs_compiled"] == before
    assert im.steering.active() == [] and not im.steering.positions.in_use


def test_bad_arguments_raise(setup):
    model, tok, prompts, im = setup
    batch = tok(prompts[:1], return_tensors="pt")
    with pytest.raises(InvalidArgumentError, match="heads"):
        decore.generate(im, batch, [], max_new_tokens=2)
    with pytest.raises(InvalidArgumentError, match="max_new_tokens"):
        decore.generate(im, batch, HEADS, max_new_tokens=0)
    with pytest.raises(SteeringValueError, match="alpha_cap"):
        decore.generate(im, batch, HEADS, max_new_tokens=2, alpha_cap=float("nan"))
