"""DeCoRe (issue 16): recipes.decore.generate — the base and the head-masked stream as two rows of
one batch with the KV cache, every prompt at once — equals the paper's loops written in the test,
one prompt at a time on the bare model with the heads' columns of c_proj's input zeroed (α = the
base distribution's entropy, argmax (1 + α) z − α z̃): its code's (a base prefill of the prompt but
its last token, the KV cache deep-copied into both streams: heads masked from the last prompt
token on) and, with mask_prompt=True, one without a cache masking the whole sequence; its decode
steps compile nothing."""
from __future__ import annotations

import copy

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


def _masked_hooks(model, heads):
    width = model.config.n_embd // model.config.n_head

    def masked_hook(layer):
        def pre(mod, args):
            x = args[0].clone()
            for l, h in heads:
                if l == layer:
                    x[..., h * width:(h + 1) * width] = 0.0
            return (x,)
        return model.transformer.h[layer].attn.c_proj.register_forward_pre_hook(pre)

    return [masked_hook(l) for l in {l for l, _ in heads}]


def _choose(base, masked, alpha_cap):
    p = torch.softmax(base, -1)
    alpha = -(p * torch.log(p)).sum()
    if alpha_cap is not None:
        alpha = alpha.clamp(max=alpha_cap)
    return ((1 + alpha) * base - alpha * masked).argmax(), alpha


def _codes_loop(model, ids, heads, steps, alpha_cap=None):
    """The paper's code: a base prefill of ids[:, :-1], its cache deep-copied into both streams."""
    name = decore.cache_argument(model)
    tokens, alphas = [], []
    with torch.no_grad():
        prefill = model(input_ids=ids[:, :-1], use_cache=True)
        caches = {"base": copy.deepcopy(prefill[name]), "masked": copy.deepcopy(prefill[name])}
        token = ids[:, -1:]
        for _ in range(steps):
            base = model(input_ids=token, use_cache=True, **{name: caches["base"]})
            handles = _masked_hooks(model, heads)
            try:
                masked = model(input_ids=token, use_cache=True, **{name: caches["masked"]})
            finally:
                for handle in handles:
                    handle.remove()
            caches = {"base": base[name], "masked": masked[name]}
            chosen, alpha = _choose(base.logits[0, -1], masked.logits[0, -1], alpha_cap)
            tokens.append(int(chosen))
            alphas.append(alpha)
            token = chosen.view(1, 1)
    return torch.tensor(tokens), torch.stack(alphas)


def _whole_sequence_loop(model, ids, heads, steps, alpha_cap=None):
    """One prompt, no cache: the full sequence through the base and the masked model each step."""
    tokens, alphas = [], []
    for _ in range(steps):
        with torch.no_grad():
            base = model(input_ids=ids).logits[0, -1]
            handles = _masked_hooks(model, heads)
            try:
                masked = model(input_ids=ids).logits[0, -1]
            finally:
                for handle in handles:
                    handle.remove()
        chosen, alpha = _choose(base, masked, alpha_cap)
        tokens.append(int(chosen))
        alphas.append(alpha)
        ids = torch.cat([ids, chosen.view(1, 1)], dim=1)
    return torch.tensor(tokens), torch.stack(alphas)


@pytest.mark.parametrize("mask_prompt, alpha_cap", [(False, None), (True, None), (True, 0.5)])
def test_batched_decore_equals_the_papers_loop_per_prompt(setup, mask_prompt, alpha_cap):
    model, tok, prompts, im = setup
    batch = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    result = decore.generate(im, batch, HEADS, max_new_tokens=STEPS, alpha_cap=alpha_cap, mask_prompt=mask_prompt)
    assert result.tokens.shape == (len(prompts), STEPS)
    loop = _whole_sequence_loop if mask_prompt else _codes_loop
    for i, prompt in enumerate(prompts):
        want_tokens, want_alphas = loop(model, tok(prompt, return_tensors="pt")["input_ids"], HEADS, STEPS, alpha_cap)
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
