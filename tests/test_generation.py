"""im.generate: compiled, KV cache on, steering active in prefill and every decode step."""
import pytest
import torch

import attnfx
from _tol import assert_close
from models import FAMILIES, build

GREEDY = dict(do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)


@pytest.mark.parametrize("family", ["gpt2", "llama", "neox", "qwen2"])
def test_greedy_generation_with_identity_steering_equals_the_model(family):
    model = build(FAMILIES[family], layers=2, heads=4, kv_heads=2)
    im = attnfx.instrument(model)
    ids = torch.randint(1, 64, (2, 5))
    expected = model.generate(ids, **GREEDY)
    assert torch.equal(im.generate(ids, **GREEDY), expected)
    assert "forward" not in model.__dict__               # generate restored the model


def test_steering_acts_in_prefill_and_every_decode_step():
    model = build(FAMILIES["gpt2"], layers=2, heads=8, head_dim=4)     # discovery sees 4 tokens < 8 heads
    im = attnfx.instrument(model)
    ids = torch.randint(1, 64, (3, 6))
    im.steering.scale(1, 3, 4.0, on="value_unbiased")
    im.steering.scale(0, 5, 0.0, on="z")
    with im.record("z") as rec:
        steered = im.generate(ids, output_scores=True, return_dict_in_generate=True, **GREEDY)

    d, heads = 4, 8
    c_attn, c_proj = model.transformer.h[1].attn.c_attn, model.transformer.h[0].attn.c_proj
    cols = slice(2 * heads * d + 3 * d, 2 * heads * d + 4 * d)

    def value_hook(mod, args, out):
        out = out.clone()
        out[..., cols] = (out[..., cols] - mod.bias[cols]) * 4.0 + mod.bias[cols]
        return out

    def zero_hook(mod, args):
        x = args[0].clone()
        x[..., 5 * d:6 * d] = 0
        return (x,)

    handles = [c_attn.register_forward_hook(value_hook), c_proj.register_forward_pre_hook(zero_hook)]
    try:
        expected = model.generate(ids, output_scores=True, return_dict_in_generate=True, **GREEDY)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(steered.sequences, expected.sequences)
    for ours, theirs in zip(steered.scores, expected.scores):
        assert_close(ours, theirs)
    assert len(rec.calls) == GREEDY["max_new_tokens"]
    assert [c["z"][0].shape[1] for c in rec.calls] == [6] + [1] * 7       # prefill, then one token a step
    assert all((c["z"][0][:, :, 5] == 0).all() for c in rec.calls)
