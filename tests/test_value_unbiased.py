"""on="value_unbiased" is TransformerLens' folded-bias value scaling (issue 12): it scales only the
part of v that depends on the normalised input. With the norm feeding v being y = x̂·γ + β and
v = y·W_V + b_V, the constant part is κ = β·W_V + b_V, and kv head g becomes α·(v − κ) + κ.

Each case is checked against a forward hook written here on the v projection, with κ computed by
hand from the parameters: GPT-2 (fused Conv1D qkv), GPT-NeoX (fused qkv interleaved per head),
BERT (post-norm), Llama (RMSNorm: no β, so κ = 0), Qwen2 (v bias, RMSNorm) and plain modules with LayerNorm-with-
bias and a separate v_proj (with and without a v bias, GQA)."""
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnfx
from _tol import TOL, assert_close
from models import FAMILIES, PlainTransformer, build, head_slice, output_tensor

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 2, 4, 2, 8


@dataclass(frozen=True)
class Case:
    """A model builder and, per layer, the v projection and the bias β of the norm feeding it."""

    name: str
    build: Callable                  # (impl, seed, heads, kv_heads, head_dim) -> model
    v_module: Callable               # (model, layer) -> module whose output holds v
    norm_bias: Callable              # (model, layer) -> β or None
    family: str                      # tests/models.py family: its head_slice layout
    impls: tuple
    layer_norm: bool                 # the norm feeding v has a bias β


def _family_builder(name):
    def make(impl, seed=0, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM):
        model = build(FAMILIES[name], layers=LAYERS, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                      impl=impl, seed=seed)
        return _randomise_biases(model)
    return make


def _plain_builder(bias):
    def make(impl, seed=0, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM):
        torch.manual_seed(seed)
        model = PlainTransformer(LAYERS, heads, kv_heads, head_dim, bias=bias,
                                 handwritten=impl == "handwritten",
                                 gqa_mode="repeat" if impl == "repeat" else "enable_gqa").eval()
        return _randomise_biases(model)
    return make


def _randomise_biases(model):
    """HF initialises every bias to 0 and LayerNorm to γ = 1, β = 0, where κ = b_V = 0 and any
    formula is right by accident: draw them instead."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(0.5 * torch.randn(param.shape, generator=gen))
            elif "norm" in name.lower() or ".ln" in name:
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
    return model


def _hf(name, v_module, norm_bias, layer_norm):
    family = FAMILIES[name]
    return Case(name, _family_builder(name), v_module, norm_bias, name, family.impls, layer_norm)


CASES = [
    _hf("gpt2", lambda m, l: m.transformer.h[l].attn.c_attn, lambda m, l: m.transformer.h[l].ln_1.bias, True),
    _hf("neox", lambda m, l: m.gpt_neox.layers[l].attention.query_key_value,
        lambda m, l: m.gpt_neox.layers[l].input_layernorm.bias, True),
    # post-norm: v reads the previous layer's output LayerNorm (layer 0: the embeddings' one, then
    # an eval-mode dropout, which is the identity)
    _hf("bert", lambda m, l: m.encoder.layer[l].attention.self.value,
        lambda m, l: (m.embeddings.LayerNorm if l == 0 else m.encoder.layer[l - 1].output.LayerNorm).bias, True),
    _hf("llama", lambda m, l: m.model.layers[l].self_attn.v_proj, lambda m, l: None, False),
    _hf("qwen2", lambda m, l: m.model.layers[l].self_attn.v_proj, lambda m, l: None, False),
    Case("plain_bias", _plain_builder(True), lambda m, l: m.blocks[l].attn.v_proj,
         lambda m, l: m.blocks[l].ln1.bias, "plain_sdpa", ("sdpa", "repeat", "handwritten"), True),
    Case("plain_no_v_bias", _plain_builder(False), lambda m, l: m.blocks[l].attn.v_proj,
         lambda m, l: m.blocks[l].ln1.bias, "plain_sdpa", ("sdpa", "handwritten"), True),
]
PARAMS = [(case, impl) for case in CASES for impl in case.impls]
IDS = [f"{case.name}-{impl}" for case, impl in PARAMS]
NORM_BIASED = [(c, i) for c, i in PARAMS if c.layer_norm]


def _columns(case, head, heads, head_dim) -> slice:
    return head_slice(FAMILIES[case.family], "v", head, heads, head_dim)


def kappa(case, model, layer, head, heads, head_dim, *, with_norm=True) -> torch.Tensor:
    """κ = β·W_V[:, cols] + b_V[cols] of one kv head, by hand from the parameters. with_norm=False
    gives the formula attnfx used before issue 12 (b_V only)."""
    module, beta = case.v_module(model, layer), case.norm_bias(model, layer)
    cols = _columns(case, head, heads, head_dim)
    weight = module.weight.detach()
    w_cols = weight[:, cols] if case.family == "gpt2" else weight[cols].T    # Conv1D is [in, out]
    out = torch.zeros(cols.stop - cols.start) if module.bias is None else module.bias.detach()[cols].clone()
    if with_norm and beta is not None:
        out += beta.detach() @ w_cols
    return out


def _value_hook(case, model, layer, head, alpha, k, heads, head_dim):
    """Forward hook on the v projection: v slice of kv head `head` ← α·(v − κ) + κ."""
    cols = _columns(case, head, heads, head_dim)

    def post(mod, args, out):
        out = out.clone()
        out[..., cols] = alpha * (out[..., cols] - k) + k
        return out
    return case.v_module(model, layer).register_forward_hook(post)


def _inputs(seed=0, batch=2, seq=9):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0                                          # left padding in one row
    return ids, mask


def _run(fn, ids, mask):
    with torch.no_grad():
        return output_tensor(fn(input_ids=ids, attention_mask=mask))


def _hooked(case, model, layer, head, alpha, k, ids, mask, heads=HEADS, head_dim=HEAD_DIM):
    handle = _value_hook(case, model, layer, head, alpha, k, heads, head_dim)
    try:
        return _run(model, ids, mask)
    finally:
        handle.remove()


def _instrument(model, ids, mask, **kwargs):
    """Instrument and run once: a plain module's sites (and state) appear on its first call."""
    im = attnfx.instrument(model, **kwargs)
    _run(im, ids, mask)
    return im


def _steered(im, layer, head, alpha, ids, mask):
    im.steering.scale(layer, head, alpha, on="value_unbiased")
    try:
        return _run(im, ids, mask)
    finally:
        im.steering.reset()


@pytest.mark.parametrize("case,impl", PARAMS, ids=IDS)
def test_value_unbiased_equals_the_folded_bias_hook(case, impl):
    model = case.build(impl)
    ids, mask = _inputs()
    im = _instrument(model, ids, mask)
    valid = mask.bool()
    worst = 0.0
    for layer in range(LAYERS):
        for head in range(KV_HEADS if FAMILIES[case.family].gqa else HEADS):
            k = kappa(case, model, layer, head, HEADS, HEAD_DIM)
            for alpha in (0.0, 3.0):
                ours = _steered(im, layer, head, alpha, ids, mask)[valid]
                expected = _hooked(case, model, layer, head, alpha, k, ids, mask)[valid]
                assert_close(ours, expected)
                worst = max(worst, float((ours - expected).abs().max()))
    print(f"{case.name}-{impl}: max |Δ| {worst:.2e}")


@pytest.mark.parametrize("case,impl", NORM_BIASED, ids=[f"{c.name}-{i}" for c, i in NORM_BIASED])
def test_the_bias_only_formula_is_measurably_different(case, impl):
    """The hook above can tell the two forms apart: where the norm has a bias, holding only b_V
    constant (attnfx before issue 12) misses by more than 10× the tolerance (the new form is
    within 1e-6; a random GPT-2, whose weights have std 0.02, misses by 5e-4, the plain models by
    0.08–0.26)."""
    model = case.build(impl)
    ids, mask = _inputs()
    im = _instrument(model, ids, mask)
    valid = mask.bool()
    for alpha in (0.0, 3.0):
        ours = _steered(im, 1, 0, alpha, ids, mask)[valid]
        old = _hooked(case, model, 1, 0, alpha, kappa(case, model, 1, 0, HEADS, HEAD_DIM, with_norm=False),
                      ids, mask)[valid]
        gap = float((ours - old).abs().max())
        print(f"{case.name}-{impl} α={alpha}: bias-only form off by {gap:.2e}")
        assert gap > 10 * TOL[torch.float32]


def test_rms_norm_models_keep_the_bias_only_form():
    """No β (RMSNorm): κ is b_V alone, as before issue 12 — Qwen2 has a v bias, Llama none."""
    for name in ("qwen2", "llama"):
        case = next(c for c in CASES if c.name == name)
        model = case.build("sdpa", seed=3)
        ids, mask = _inputs(seed=3)
        im = _instrument(model, ids, mask)
        expected = _hooked(case, model, 0, 1, 3.0, kappa(case, model, 0, 1, HEADS, HEAD_DIM, with_norm=False),
                           ids, mask)
        assert_close(_steered(im, 0, 1, 3.0, ids, mask)[mask.bool()], expected[mask.bool()])


@given(case=st.sampled_from([c for c in CASES if c.name in ("gpt2", "neox", "plain_bias", "plain_no_v_bias")]),
       heads_kv=st.sampled_from([(1, 1), (2, 1), (4, 2), (4, 4)]), head_dim=st.sampled_from([4, 8]),
       alpha=st.sampled_from([0.0, 3.0, -1.5]), seed=st.integers(0, 2**10), data=st.data())
def test_value_unbiased_over_layouts(case, heads_kv, head_dim, alpha, seed, data):
    heads, kv_heads = heads_kv
    if not FAMILIES[case.family].gqa:
        kv_heads = heads
    impl = data.draw(st.sampled_from(case.impls))
    model = case.build(impl, seed=seed, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    ids, mask = _inputs(seed)
    im = _instrument(model, ids, mask)
    layer, head = data.draw(st.integers(0, LAYERS - 1)), data.draw(st.integers(0, kv_heads - 1))
    k = kappa(case, model, layer, head, heads, head_dim)
    expected = _hooked(case, model, layer, head, alpha, k, ids, mask, heads=heads, head_dim=head_dim)
    assert_close(_steered(im, layer, head, alpha, ids, mask)[mask.bool()], expected[mask.bool()])


@pytest.mark.parametrize("case,impl", NORM_BIASED, ids=[f"{c.name}-{i}" for c, i in NORM_BIASED])
def test_identity_is_bit_exact_on_eager(case, impl):
    """The κ term is inserted wherever the norm has a bias; at identity it adds κ·0 exactly."""
    model = case.build(impl)
    ids, mask = _inputs()
    im = _instrument(model, ids, mask, backend="eager")
    bare = _run(model, ids, mask)
    assert torch.equal(_run(im, ids, mask), bare)
    _steered(im, 1, 0, 3.0, ids, mask)                       # steer, then back to identity
    assert torch.equal(_run(im, ids, mask), bare)


def _compiles():
    from torch._dynamo.utils import counters
    return counters["attnfx"]["graphs_compiled"]


@pytest.mark.parametrize("name", ["gpt2", "plain_bias"])
def test_kappa_joins_the_graph_only_while_value_unbiased_is_used(name):
    """κ costs a vector-matrix product per layer per call, so the graph holds it only once
    on="value_unbiased" has been set (one compile), and drops it after reset() (no compile: that
    graph is cached). With κ in the graph and every unbiased factor at 1, every other knob gives
    bit-identical logits to the κ-free graph: κ's term is a·(1 − c)·κ = 0 exactly."""
    torch._dynamo.reset()          # graphs are shared by structure: earlier tests may hold these
    case = next(c for c in CASES if c.name == name)
    model = case.build("sdpa")
    ids, mask = _inputs()
    im = _instrument(model, ids, mask, backend="eager")
    assert not im.steering.value_unbiased_in_use

    def knobs():
        im.steering.scale(0, 1, -2.0, on="z")
        im.steering.scale(1, 0, 0.5, on="value")
        im.steering.scale(0, 2, 1.5, on="query")

    knobs()
    without = _run(im, ids, mask)
    before = _compiles()
    im.steering.scale(1, 1, 1.0, on="value_unbiased")        # in use, still identity
    assert im.steering.value_unbiased_in_use
    with_kappa = _run(im, ids, mask)
    assert _compiles() - before == 1                           # κ joined the graph once
    assert torch.equal(with_kappa, without)
    _run(im, ids, mask)
    im.steering.reset()
    assert not im.steering.value_unbiased_in_use
    knobs()
    assert torch.equal(_run(im, ids, mask), without)
    assert _compiles() - before == 1                           # both graphs cached from here on


def test_value_unbiased_is_seen_however_the_factor_is_written():
    """Scoped scaling, and a write straight into the buffer (the graph's input), both steer:
    the check is the buffer's version counter, so no device sync per call."""
    case = next(c for c in CASES if c.name == "gpt2")
    model = case.build("sdpa")
    ids, mask = _inputs()
    im = _instrument(model, ids, mask)
    k = kappa(case, model, 1, 0, HEADS, HEAD_DIM)
    expected = _hooked(case, model, 1, 0, 3.0, k, ids, mask)
    with im.steering.scaled(1, 0, 3.0, on="value_unbiased"):
        assert_close(_run(im, ids, mask), expected)
    assert not im.steering.value_unbiased_in_use              # restored to identity on exit
    im.v_scale_unbiased[1, 0] = 3.0
    assert im.steering.value_unbiased_in_use
    assert_close(_run(im, ids, mask), expected)
    with im.steering.restoring():                             # entered off identity: stays in use
        im.steering.reset()
    assert im.steering.value_unbiased_in_use
    assert_close(_run(im, ids, mask), expected)
