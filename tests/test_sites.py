"""Site discovery by pattern on every family, and what `im.sites` / `print(im)` report."""
import pytest
import torch

import attnfx
from models import FAMILIES, PlainTransformer, build

EXPECTED_PATTERN = {"sdpa": "sdpa_call", "eager": "matmul_softmax_matmul", "repeat": "sdpa_call",
                    "handwritten": "matmul_softmax_matmul"}
O_PROJ = {"gpt2": "transformer.h.{}.attn.c_proj.weight", "llama": "model.layers.{}.self_attn.o_proj.weight",
          "mistral": "model.layers.{}.self_attn.o_proj.weight", "qwen2": "model.layers.{}.self_attn.o_proj.weight",
          "neox": "gpt_neox.layers.{}.attention.dense.weight", "bert": "encoder.layer.{}.attention.output.dense.weight",
          "plain_sdpa": "blocks.{}.attn.o_proj.weight", "plain_handwritten": "blocks.{}.attn.o_proj.weight"}
V_BIAS = {"gpt2": "transformer.h.{}.attn.c_attn.bias", "qwen2": "model.layers.{}.self_attn.v_proj.bias",
          "neox": "gpt_neox.layers.{}.attention.query_key_value.bias",
          "bert": "encoder.layer.{}.attention.self.value.bias", "plain_sdpa": "blocks.{}.attn.v_proj.bias",
          "plain_handwritten": "blocks.{}.attn.v_proj.bias"}

CASES = [(name, impl) for name, fam in FAMILIES.items() for impl in fam.impls]


@pytest.mark.parametrize("name, impl", CASES)
def test_every_family_is_found_by_pattern(name, impl):
    fam = FAMILIES[name]
    model = build(fam, layers=3, heads=4, kv_heads=2, head_dim=8, impl=impl)
    im = attnfx.instrument(model, example_inputs={"input_ids": torch.randint(1, 64, (1, 5))})
    sites = im.sites
    assert [s.layer for s in sites] == [0, 1, 2]
    kv = 2 if fam.gqa else 4
    for s in sites:
        assert (s.pattern, s.num_heads, s.num_kv_heads, s.head_dim, s.d_model) == (EXPECTED_PATTERN[impl], 4, kv, 8, 32)
        assert s.o_proj == O_PROJ[name].format(s.layer)
        assert s.value_bias == (V_BIAS[name].format(s.layer) if name in V_BIAS else None)
        assert model.get_submodule(s.module_path) is not None and s.module_path
    table = str(im)
    assert table.count("\n") == 2 + len(sites) and O_PROJ[name].format(2) in table


def test_sdpa_and_handwritten_sites_agree_on_layout():
    sdpa = attnfx.instrument(PlainTransformer(heads=4, kv_heads=1), example_inputs=torch.ones(1, 3, dtype=torch.long))
    hand = attnfx.instrument(PlainTransformer(heads=4, kv_heads=1, handwritten=True),
                             example_inputs=torch.ones(1, 3, dtype=torch.long))
    strip = lambda s: (s.layer, s.num_heads, s.num_kv_heads, s.head_dim, s.o_proj, s.value_bias)
    assert [strip(s) for s in sdpa.sites] == [strip(s) for s in hand.sites]


def test_a_bidirectional_model_without_mask_is_reported_non_causal():
    model = PlainTransformer(layers=1, heads=2, kv_heads=2, causal=False)
    im = attnfx.instrument(model, example_inputs=torch.ones(1, 3, dtype=torch.long))
    assert im.sites[0].masked and im.sites[0].causal is None          # padding mask is explicit


def test_sites_are_found_lazily_on_the_first_call_for_plain_modules():
    model = PlainTransformer(layers=2, heads=2, kv_heads=1)
    im = attnfx.instrument(model)
    assert "not yet found" in repr(im)
    with pytest.raises(attnfx.NotDiscoveredError):
        im.sites
    ids = torch.randint(1, 64, (2, 4))
    torch.testing.assert_close(im(ids), model(ids), atol=0, rtol=0)
    assert len(im.sites) == 2 and im.sites[0].num_kv_heads == 1


def test_instrumenting_one_model_leaves_another_alone():
    a, b = build(FAMILIES["llama"], seed=1), build(FAMILIES["llama"], seed=1)
    im = attnfx.instrument(a)
    im.steering.scale(0, 0, 0.0)
    ids = torch.randint(1, 64, (1, 5))
    with torch.no_grad():
        assert not torch.equal(im(input_ids=ids).logits, b(input_ids=ids).logits)
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
