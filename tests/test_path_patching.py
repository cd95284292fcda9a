"""Path patching (Wang et al. 2022; issue 14): attnfx.patching.path_patching equals the two-pass
hook implementation of the paper (pass 1: the clean run with the senders' head outputs from the
corrupt run and every other head and MLP frozen at the clean run, the receivers' q / k / v saved;
pass 2: the clean run with only those receivers' inputs patched) on the default model's IOI task
with the ABC corruption — for every sender head alone, and for sender groups into several inputs."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import attnfx
from _tol import assert_close
from attnfx.analysis.path_patching import path_patching
from attnfx.errors import InvalidArgumentError, SiteIndexError
from attnfx.models.loader import load_default, load_prompts

EXAMPLES = 6


@pytest.fixture(scope="module")
def ioi():
    """Clean IOI prompts, their ABC corruption (the three names replaced by three others), the
    metric logit[IO] − logit[S] at the last position, the bare model and the instrumented one."""
    model, tok = load_default()
    prompts = load_prompts()
    names, rng = prompts["world"]["names"], random.Random(0)
    clean, corrupt, io, s = [], [], [], []
    for item in prompts["ioi"]:
        words = item["prompt"].split()
        renamed = list(words)
        for slot, name in zip((1, 3, 9), rng.sample([n for n in names if n not in (item["answer"], item["subject"])], 3)):
            renamed[slot] = name
        a, b = tok(item["prompt"])["input_ids"], tok(" ".join(renamed))["input_ids"]
        if len(a) == len(b) and (not clean or len(a) == len(clean[0])):
            clean.append(a), corrupt.append(b), io.append(tok.get_vocab()[item["answer"]])
            s.append(tok.get_vocab()[item["subject"]])
        if len(clean) == EXAMPLES:
            break
    io, s = torch.tensor(io), torch.tensor(s)

    def metric(logits):
        last = logits[:, -1]
        return last.gather(1, io[:, None])[:, 0] - last.gather(1, s[:, None])[:, 0]

    im = attnfx.instrument(model, backend="eager")
    return model, im, {"input_ids": torch.tensor(clean)}, {"input_ids": torch.tensor(corrupt)}, metric


def _hooked_path_patching(model, clean, corrupt, metric, senders, receivers, inputs):
    """Wang et al.'s two passes with forward hooks and an SDPA spy on the bare GPT-2."""
    blocks = model.transformer.h
    d = model.config.n_embd
    width = d // model.config.n_head

    def run(ids, edit_z=None, edit_mlp=None, spy=None):
        z, mlp, handles = {}, {}, []
        for l, block in enumerate(blocks):
            def pre(mod, args, l=l):
                z[l] = args[0].detach().clone()
                return (edit_z(l, args[0]),) if edit_z else None
            def post(mod, args, out, l=l):
                mlp[l] = out.detach().clone()
                return edit_mlp(l, out) if edit_mlp else None
            handles += [block.attn.c_proj.register_forward_pre_hook(pre), block.mlp.register_forward_hook(post)]
        real, calls = F.scaled_dot_product_attention, []

        def sdpa(q, k, v, *args, **kwargs):
            layer = len(calls)
            calls.append(layer)
            if spy is not None:
                q, k, v = spy(layer, q, k, v)
            return real(q, k, v, *args, **kwargs)

        F.scaled_dot_product_attention = sdpa
        try:
            with torch.no_grad():
                logits = model(**ids).logits
        finally:
            F.scaled_dot_product_attention = real
            for handle in handles:
                handle.remove()
        return logits, z, mlp

    base, clean_z, clean_mlp = run(clean)
    _, corrupt_z, _ = run(corrupt)

    def frozen_z(l, x):                                    # pass 1: senders corrupt, other heads clean
        x = clean_z[l].clone()
        for sl, h in senders:
            if sl == l:
                x[..., h * width:(h + 1) * width] = corrupt_z[l][..., h * width:(h + 1) * width]
        return x

    saved = {}

    def save(layer, q, k, v):
        saved[layer] = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
        return q, k, v

    run(clean, edit_z=frozen_z, edit_mlp=lambda l, out: clean_mlp[l], spy=save)

    def patch(layer, q, k, v):                             # pass 2: only the receivers' inputs
        x = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
        for rl, h in receivers:
            if rl == layer:
                for name in inputs:
                    x[name][:, h] = saved[layer][name][:, h]
        return x["q"], x["k"], x["v"]

    patched, _, _ = run(clean, spy=patch)
    return (metric(patched) - metric(base)).mean()


def test_every_sender_head_equals_the_two_pass_hook_implementation(ioi):
    model, im, clean, corrupt, metric = ioi
    receivers = [(2, 1), (3, 0), (3, 5)]
    result = path_patching(im, clean, corrupt, metric, receivers=receivers, receiver_input="q", progress=False)
    layers, heads = model.config.n_layer, model.config.n_head
    assert result.scores.shape == (layers, heads) and result.dims == ("layer", "head")
    want = torch.full((layers, heads), float("nan"))
    for l in range(layers - 1):                            # the last layer reaches no receiver
        for h in range(heads):
            want[l, h] = _hooked_path_patching(model, clean, corrupt, metric, [(l, h)], receivers, ("q",))
    assert torch.isnan(result.scores[-1]).all()
    assert_close(result.scores[:-1], want[:-1])
    assert want[:-1].abs().max() > 1e-2                    # the paths carry a measurable effect
    assert result.forwards == 5                            # 3 calls + 2 per chunk: one chunk of 24 tiles


def test_sender_groups_into_keys_and_values_equal_the_hook_implementation(ioi):
    model, im, clean, corrupt, metric = ioi
    receivers = [(3, 2), (3, 7)]
    groups = [[(0, 1), (1, 4), (2, 2)], [(1, 0)], [(2, 6), (3, 1)]]     # (3, 1): no path to layer 3
    result = path_patching(im, clean, corrupt, metric, receivers=receivers, receiver_input=("k", "v"),
                           senders=groups, progress=False, rows_per_forward=2 * EXAMPLES)
    want = torch.stack([_hooked_path_patching(model, clean, corrupt, metric, g, receivers, ("k", "v"))
                        for g in groups])
    assert result.dims == ("group",)
    assert_close(result.scores, want)
    assert result.forwards == 3 + 2 * 2                    # two forwards of two tiles


def test_bad_arguments_raise(ioi):
    model, im, clean, corrupt, metric = ioi
    with pytest.raises(InvalidArgumentError, match="receiver_input"):
        path_patching(im, clean, corrupt, metric, receivers=[(3, 0)], receiver_input="o")
    with pytest.raises(SiteIndexError):
        path_patching(im, clean, corrupt, metric, receivers=[(9, 0)])
    with pytest.raises(SiteIndexError):
        path_patching(im, clean, corrupt, metric, receivers=[(3, 0)], senders=[(0, 99)])
    with pytest.raises(InvalidArgumentError, match="senders"):
        path_patching(im, clean, corrupt, metric, receivers=[(3, 0)], senders=[])
