"""attnfx.relevance (docs/design.md §3): the rules' identities, the efficient pass against the explicit
rules on every family, conservation, head relevance, compiled == eager, leaks reported."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from hypothesis import given, settings, strategies as st
from torch._dynamo.utils import counters

import attnfx
from _tol import TOL
from attnfx.graph import lrp_plan
from attnfx.analysis.lrp_explicit import explicit_relevance
from attnfx.errors import InvalidArgumentError, RelevanceLeakError, RelevanceLeakWarning, ShapeMismatchError
from attnfx.passes import lrp
from models import FAMILIES, PlainTransformer, build, configs, output_tensor

RULES = ("attnlrp", "cp-lrp")


def _close(actual, expected, rel=1e-6):
    """|actual − expected| ≤ rel · max|expected| elementwise (relevance is a signed density)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=rel * scale + 1e-15)


def _lrp_on(fn, *inputs, rule="attnlrp"):
    """Compile fn with the lrp pass alone (its inputs are the activations); relevance x ⊙ grad."""
    def backend(gm, example_inputs):
        given = {id(x) for x in leaves}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        sources = {n for n, x in zip(placeholders, example_inputs) if id(x) in given}
        if rule != "gradient":
            lrp.apply(gm, lrp_plan.plan(gm.graph, sources, [], rule), rule)
        gm.recompile()
        return gm.forward

    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = torch.compile(fn, backend=backend, fullgraph=True)(*leaves)
    grads = torch.autograd.grad(out.sum(), leaves)
    return out, [x.detach() * g for x, g in zip(leaves, grads)]


# ---- rule identities ------------------------------------------------------------------------
def test_uniform_rule_halves_relevance_exactly():
    a, b = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    out, (r_a, r_b) = _lrp_on(lambda a, b: a * b, a, b)
    assert torch.equal(r_a, out.detach() / 2) and torch.equal(r_b, out.detach() / 2)


def test_uniform_rule_on_a_matmul_of_activations():
    a, b = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64)
    out, (r_a, r_b) = _lrp_on(lambda a, b: a @ b, a, b)
    total = out.detach().sum()
    torch.testing.assert_close(r_a.sum(), total / 2, rtol=1e-12, atol=0)
    torch.testing.assert_close(r_b.sum(), total / 2, rtol=1e-12, atol=0)


class _GatedMLP(nn.Module):
    """Bias-free RMSNorm → SiLU-gated MLP → hand-written RMSNorm: identity, uniform, ε rules."""

    def __init__(self, d=8):
        super().__init__()
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.gate, self.up, self.down = (nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False),
                                         nn.Linear(2 * d, d, bias=False))
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        h = self.norm(x)
        y = self.down(F.silu(self.gate(h)) * self.up(h))
        return self.weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_bias_free_mlp_and_rms_norms_conserve_relevance():
    torch.manual_seed(0)
    module = _GatedMLP().double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    out, (r_x,) = _lrp_on(module, x)
    torch.testing.assert_close(r_x.sum(), out.detach().sum(), rtol=1e-6, atol=0)     # ε of the identity rule
    _, (plain,) = _lrp_on(module, x, rule="gradient")
    assert not torch.allclose(plain, r_x, rtol=1e-3)                         # the rules did the work


def test_softmax_rule_exact_non_conservation():
    """Σ R_in = Σ x_i R_i − (Σ s_i x_i)(Σ R_j) with R_i = s_i c_i the output relevance."""
    x, c = torch.randn(4, 7, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64)
    _, (r_x,) = _lrp_on(lambda x: torch.softmax(x, -1) * c, x)
    s = torch.softmax(x, -1)
    r_out = s * c
    expected = (x * r_out).sum(-1) - (s * x).sum(-1) * r_out.sum(-1)
    torch.testing.assert_close(r_x.sum(-1), expected, rtol=1e-12, atol=1e-14)


def test_identity_rule_passes_relevance_through_a_handwritten_gelu():
    x = torch.randn(3, 9, dtype=torch.float64)
    gelu_new = lambda x: 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * torch.pow(x, 3.0))))  # noqa: E731
    out, (r_x,) = _lrp_on(gelu_new, x)
    torch.testing.assert_close(r_x, out.detach(), rtol=1e-6, atol=1e-12)     # ε of the identity rule


def test_identity_rule_stops_before_an_additive_mask():
    """A soft-cap then a mask (Gemma-2 eager: cap·tanh(s/cap) + m, m = −inf or finfo.min): the
    rule covers the tanh only; f(x)/x taken over the mask add was −inf/x and made the forward NaN."""
    x, c = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    for fill in (float("-inf"), torch.finfo(torch.float64).min):
        mask = torch.zeros(3, 6, dtype=torch.float64).masked_fill(torch.rand(3, 6) < 0.4, fill)
        mask[:, 0] = 0
        out, (r_x,) = _lrp_on(lambda s: torch.softmax(5.0 * torch.tanh(s / 5.0) + mask, -1) * c, x)
        torch.testing.assert_close(out, torch.softmax(5.0 * torch.tanh(x / 5.0) + mask, -1) * c, rtol=0, atol=0)
        assert torch.isfinite(r_x).all() and (r_x[mask != 0] == 0).all()
        # softmax rule at the capped logits u, then the identity rule: R_x = R_u
        u = 5.0 * torch.tanh(x / 5.0) + mask
        s, r_out = torch.softmax(u, -1), torch.softmax(u, -1) * c
        r_u = torch.where(mask == 0, (u - mask) * (r_out - s * r_out.sum(-1, keepdim=True)), 0.0)
        torch.testing.assert_close(r_x, r_u, rtol=1e-6, atol=1e-12)      # ε of the identity rule


# ---- the efficient pass against the explicit rules ------------------------------------------
def _target(family):
    if family == "bert":
        return lambda out: output_tensor(out)[:, 0, :3].sum(-1)
    return lambda out: output_tensor(out)[:, -1, 5] - output_tensor(out)[:, -1, 9]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_efficient_pass_equals_the_explicit_rules(family, rule):
    model = build(FAMILIES[family], layers=2, heads=4, kv_heads=2, head_dim=8).double()
    ids = torch.randint(1, 60, (2, 7), generator=torch.Generator().manual_seed(1))
    want = explicit_relevance(model, {"input_ids": ids}, _target(family), rule)
    im = attnfx.instrument(model)
    got = attnfx.relevance(im, {"input_ids": ids}, _target(family), rule=rule)
    im.uninstrument()
    assert got.leaks == []
    torch.testing.assert_close(got.target, want["target"], rtol=1e-12, atol=0)
    pairs = {"tokens": got.tokens, "heads": got.heads_per_position, "attn": got.attn, "mlp": got.mlp,
             "resid": got.residual}
    for name, value in pairs.items():
        assert value is not None and want[name] is not None, name
        _close(value, want[name])


def test_head_relevance_sums_to_the_attention_output_without_o_bias():
    """Σ_h z_h ⊙ g_h = (Σ_h W_O,h z_h) · g = attn_out · g when o_proj has no bias."""
    model = build(FAMILIES["llama"], layers=2, heads=4, kv_heads=2, head_dim=8).double()
    im = attnfx.instrument(model)
    before = dict(counters["attnfx"])
    rel = attnfx.relevance(im, {"input_ids": torch.randint(1, 60, (2, 6))}, 3)
    # one graph: 5 component kinds gated (tokens once, 4 per layer); rules: 5 RMSNorms, 2 SDPA, 2 SiLU, 2 gate·up
    assert counters["attnfx"]["components_probed"] - before.get("components_probed", 0) == 1 + 4 * 2
    assert counters["attnfx"]["lrp_rewrites"] - before.get("lrp_rewrites", 0) == 5 + 2 + 2 + 2
    _close(rel.heads_per_position.sum(-1), rel.attn, rel=1e-10)


def test_cp_lrp_conserves_relevance_through_a_bias_free_model():
    model = build(FAMILIES["llama"], layers=3, heads=4, kv_heads=2, head_dim=8).double()
    im = attnfx.instrument(model)
    rel = attnfx.relevance(im, {"input_ids": torch.randint(1, 60, (2, 6))}, 3, rule="cp-lrp")
    sums = rel.conservation()
    for name in ("tokens", "residual"):
        value = sums[name] if sums[name].dim() == 1 else sums[name].T
        torch.testing.assert_close(value, sums["target"].expand_as(value), rtol=1e-6, atol=1e-9)


# ---- runs, dtypes, targets --------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.inductor)])
def test_compiled_equals_eager(backend):
    model = build(FAMILIES["gpt2"], layers=2, heads=4, head_dim=8)
    ids = torch.randint(1, 60, (2, 6))
    results = []
    for mode in ("eager", backend):
        im = attnfx.instrument(model, backend=mode)
        results.append(attnfx.relevance(im, {"input_ids": ids}, 4, foil=8))
        im.uninstrument()
    for name in ("tokens", "heads_per_position", "attn", "mlp", "residual", "target"):
        _close(getattr(results[1], name), getattr(results[0], name), rel=TOL[torch.float32])


def test_lowered_attention_uses_the_kernels_lrp_mode():
    """lower=True: attnfx::attention with lrp=True gives the same relevance as the SDPA rewrite."""
    model = build(FAMILIES["llama"], layers=2, heads=4, kv_heads=2, head_dim=8).double()
    ids = torch.randint(1, 60, (1, 9))
    results = []
    for lower in (False, True):
        im = attnfx.instrument(model, lower=lower)
        results.append(attnfx.relevance(im, {"input_ids": ids}, 7))
        im.uninstrument()
    _close(results[1].tokens, results[0].tokens, rel=1e-10)
    _close(results[1].heads_per_position, results[0].heads_per_position, rel=1e-10)


def test_bf16_model_relevance_is_fp32_and_close_to_fp32():
    model = build(FAMILIES["llama"], layers=2, heads=4, kv_heads=2, head_dim=8)
    ids = torch.randint(1, 60, (2, 7))
    im = attnfx.instrument(model)
    want = attnfx.relevance(im, {"input_ids": ids}, 5)
    im.uninstrument()
    im = attnfx.instrument(model.bfloat16())
    got = attnfx.relevance(im, {"input_ids": ids}, 5)
    assert got.tokens.dtype == torch.float32 and got.heads_per_position.dtype == torch.float32
    _close(got.tokens, want.tokens, rel=TOL[torch.bfloat16])


def test_target_forms_agree():
    """A token with a foil, a weighted dict, a (position, token, weight) list and a callable."""
    model = build(FAMILIES["qwen2"], layers=1, heads=2, kv_heads=1, head_dim=8)
    im = attnfx.instrument(model)
    inputs = {"input_ids": torch.randint(1, 60, (2, 5))}
    by_foil = attnfx.relevance(im, inputs, 4, foil=6)
    by_dict = attnfx.relevance(im, inputs, {4: 1.0, 6: -1.0})
    by_list = attnfx.relevance(im, inputs, [(-1, 4, 1.0), (4, 6, -1.0)])
    by_fn = attnfx.relevance(im, inputs, lambda out: out.logits[:, -1, 4] - out.logits[:, -1, 6])
    for other in (by_dict, by_list, by_fn):
        _close(other.tokens, by_foil.tokens, rel=1e-6)
        _close(other.target, by_foil.target, rel=1e-6)


def test_bad_arguments_raise_typed_errors():
    model = build(FAMILIES["llama"], layers=1, heads=2, kv_heads=1, head_dim=8)
    im = attnfx.instrument(model)
    inputs = {"input_ids": torch.randint(1, 60, (2, 5))}
    with pytest.raises(InvalidArgumentError, match="rule"):
        attnfx.relevance(im, inputs, 3, rule="lrp")
    with pytest.raises(InvalidArgumentError, match="token ids"):
        attnfx.relevance(im, inputs, 10_000)
    with pytest.raises(InvalidArgumentError, match="target must be"):
        attnfx.relevance(im, inputs, "cat")
    with pytest.raises(ShapeMismatchError, match="one scalar per example"):
        attnfx.relevance(im, inputs, lambda out: out.logits[:, :, 3])
    assert not any(name.startswith("gate_") for name, _ in im.named_buffers())   # nothing left behind


# ---- leaks --------------------------------------------------------------------------------------
class _SineBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up, self.down = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return x + self.down(torch.sin(self.up(x)))      # sin: an op no rule covers


def test_a_planted_op_without_a_rule_is_reported():
    model = PlainTransformer(layers=1, heads=2, kv_heads=2, head_dim=8)
    model.blocks[0].mlp = _SineBlock(16)
    ids = torch.randint(1, 60, (1, 6))
    im = attnfx.instrument(model, example_inputs=(ids,))
    with pytest.raises(RelevanceLeakError, match=r"sin in blocks\.0\.mlp"):
        attnfx.relevance(im, (ids,), 3, check=True)
    with pytest.warns(RelevanceLeakWarning, match="sin"):
        rel = attnfx.relevance(im, (ids,), 3)
    assert rel.leaks and "sin" in rel.leaks[0]


def test_components_limit_the_work():
    model = build(FAMILIES["llama"], layers=2, heads=4, kv_heads=2, head_dim=8)
    im = attnfx.instrument(model)
    inputs = {"input_ids": torch.randint(1, 60, (2, 5))}
    full = attnfx.relevance(im, inputs, 3)
    some = attnfx.relevance(im, inputs, 3, components=("tokens", "heads"))
    assert some.attn is None and some.mlp is None and some.residual is None
    torch.testing.assert_close(some.tokens, full.tokens, rtol=0, atol=0)
    torch.testing.assert_close(some.heads_per_position, full.heads_per_position, rtol=0, atol=0)
    with pytest.raises(InvalidArgumentError, match="components"):
        attnfx.relevance(im, inputs, 3, components=("neurons",))


@pytest.mark.parametrize("rule", RULES)
def test_moe_routing_gets_the_uniform_rule_and_a_constant_normaliser(rule):
    """Mixtral: router softmax → top-k renormalised (the divisor held constant) → per-expert
    grouped matmuls → routing weight × expert output (uniform rule); no op without a rule."""
    import transformers as T

    config = T.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                             num_experts_per_tok=2, max_position_embeddings=64, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = T.MixtralForCausalLM(config).eval().double()
    ids = torch.randint(1, 60, (2, 6), generator=torch.Generator().manual_seed(1))
    want = explicit_relevance(model, {"input_ids": ids}, _target("mixtral"), rule)
    im = attnfx.instrument(model)
    got = attnfx.relevance(im, {"input_ids": ids}, _target("mixtral"), rule=rule, check=True)
    for name, value in (("tokens", got.tokens), ("heads", got.heads_per_position), ("resid", got.residual)):
        _close(value, want[name])


def test_repeated_relevance_compiles_once():
    model = build(FAMILIES["qwen2"], layers=2, heads=4, kv_heads=2, head_dim=8)
    im = attnfx.instrument(model, backend="aot_eager")
    inputs = [{"input_ids": torch.randint(1, 60, (2, 7))} for _ in range(3)]
    attnfx.relevance(im, inputs[0], 3)
    before = counters["attnfx"]["graphs_compiled"]
    for x in inputs[1:]:
        attnfx.relevance(im, x, 5, rule="attnlrp")
    assert counters["attnfx"]["graphs_compiled"] == before


@settings(max_examples=4)
@given(data=st.data())
@pytest.mark.parametrize("family", ["llama", "gpt2", "plain_handwritten"])
def test_efficient_pass_equals_the_explicit_rules_over_configs(family, data):
    """Hypothesis over layers, heads, kv heads, head dims and attention implementations."""
    config = data.draw(configs(FAMILIES[family]))
    seq = data.draw(st.integers(1, 12))
    model = build(FAMILIES[family], **config).double()
    ids = torch.randint(1, 60, (2, seq), generator=torch.Generator().manual_seed(seq))
    want = explicit_relevance(model, {"input_ids": ids}, _target(family))
    im = attnfx.instrument(model, example_inputs={"input_ids": ids} if family.startswith("plain") else None)
    got = attnfx.relevance(im, {"input_ids": ids}, _target(family), check=True)
    im.uninstrument()
    for name, value in (("tokens", got.tokens), ("heads", got.heads_per_position), ("resid", got.residual)):
        _close(value, want[name])


def test_relevance_through_soft_caps():
    """Gemma-2 soft-caps the attention logits and the final logits (cap·tanh(x/cap)): under CP-LRP
    (q, k detached) relevance is conserved to the capped target logit; under both rules the
    efficient pass equals the explicit rules and reports no leak."""
    from zoo import BY_NAME, build as build_family, inputs
    family = BY_NAME["gemma2"]
    model = build_family(family, "eager").double()
    ids = {"input_ids": inputs(family, model)["input_ids"]}
    assert model.config.final_logit_softcapping and model.config.attn_logit_softcapping
    im = attnfx.instrument(model, example_inputs=ids)
    for rule in RULES:
        got = attnfx.relevance(im, ids, 3, rule=rule)
        want = explicit_relevance(model, ids, lambda out: out.logits[:, -1, 3], rule)
        assert got.leaks == []
        with torch.no_grad():
            torch.testing.assert_close(got.target, model(**ids).logits[:, -1, 3], rtol=1e-12, atol=0)
        for name, value in {"tokens": got.tokens, "heads": got.heads_per_position, "resid": got.residual}.items():
            _close(value, want[name])
        if rule == "cp-lrp":
            sums = got.conservation()
            atol = 1e-6 * sums["target"].abs().max().item()              # ε of the identity rule
            torch.testing.assert_close(sums["tokens"], sums["target"], rtol=0, atol=atol)
            torch.testing.assert_close(sums["residual"].T, sums["target"].expand(2, -1), rtol=0, atol=atol)
    im.uninstrument()


def test_relevance_of_gated_heads():
    """Qwen3-Next gates each head (z ⊙ σ(g)) before W_O: a head's relevance is that of what W_O
    reads, so the heads add up to the attention output (o_proj has no bias), and the efficient pass
    equals the explicit rules under both rules, with no leak."""
    from zoo import BY_NAME, build as build_family, inputs
    family = BY_NAME["qwen3_next"]
    model = build_family(family, "sdpa").double()
    ids = {"input_ids": inputs(family, model)["input_ids"]}
    im = attnfx.instrument(model, example_inputs=ids)
    assert all(info.gated for info in im.sites)
    for rule in RULES:
        got = attnfx.relevance(im, ids, 3, rule=rule)
        want = explicit_relevance(model, ids, lambda out: out.logits[:, -1, 3], rule)
        assert got.leaks == []
        for name, value in {"tokens": got.tokens, "heads": got.heads_per_position, "attn": got.attn}.items():
            _close(value, want[name])
        layers = [info.layer for info in im.sites]
        _close(got.heads_per_position.sum(-1), got.attn[:, :, layers], rel=1e-10)
    im.uninstrument()
