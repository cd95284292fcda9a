"""Direct logit attribution through every path that is linear once frozen (issue 13): (1 + w)
RMSNorm gains, written-out LayerNorm, logit scales and divisors, logit biases, tied embeddings
rescaled by d_model^-½, soft-capped logits (attributed before the cap), post-block norms,
post-LN models, encoder-decoders (decoder logits; encoder heads have no direct effect), heads
gated before W_O (Qwen3-Next: the direct effect of z ⊙ g), multi-head latent attention
(DeepSeek-V3: v from a normed, cached low-rank latent; v_head_dim ≠ the q/k head dim too).

(a) logit_attribution's components add up to the bare model's logit difference (pre-cap when
    soft-capped); (b) per-head DLA equals an explicit reference from module hooks; (c) a path
    that is not linear once frozen raises UnsupportedModelError naming the op."""
import dataclasses
import re

import pytest
import torch
from torch import nn

import attnfx
from _tol import assert_close
from zoo import BY_NAME, build, inputs

TARGETS, FOILS = torch.tensor([3, 5]), torch.tensor([7, 9])
# family → (implementation, final norm module, kind, gain offset, norms after each attention)
PATHS = {
    "gpt2": ("sdpa", "transformer.ln_f", "ln", 0.0, ()),
    "llama": ("sdpa", "model.norm", "rms", 0.0, ()),
    "gemma": ("sdpa", "model.norm", "rms", 1.0, ()),
    "gemma2": ("eager", "model.norm", "rms", 1.0, ("post_attention_layernorm",)),
    "gemma3_text": ("sdpa", "model.norm", "rms", 1.0, ("post_attention_layernorm",)),
    "cohere": ("sdpa", "model.norm", "ln", 0.0, ()),
    "granite": ("sdpa", "model.norm", "rms", 0.0, ()),
    "olmo2": ("sdpa", "model.norm", "rms", 0.0, ("post_attention_layernorm",)),
    "bart": ("sdpa", None, "ln", 0.0, ()),
    "t5": ("sdpa", "decoder.final_layer_norm", "rms", 0.0, ()),
    "whisper": ("sdpa", "model.decoder.layer_norm", "ln", 0.0, ()),
    "qwen3_next": ("sdpa", "model.norm", "rms", 1.0, ()),
    "deepseek_v3": ("sdpa", "model.norm", "rms", 0.0, ()),
    "deepseek_v3-narrow_v": ("eager", "model.norm", "rms", 0.0, ()),
}
# variants of a zoo family: name-variant → config overrides
VARIANTS = {"deepseek_v3-narrow_v": dict(v_head_dim=6)}          # q/k heads are 4 + 4 wide
_CACHE = {}
FAMILIES = list(PATHS)


def _family(name):
    family = BY_NAME[name.split("-")[0]]
    return dataclasses.replace(family, kwargs={**family.kwargs, **VARIANTS.get(name, {})})


def _instrumented(name):
    if name not in _CACHE:
        family = _family(name)
        model = build(family, PATHS[name][0])
        kwargs = inputs(family, model)
        _CACHE[name] = model, kwargs, attnfx.instrument(model, example_inputs=kwargs)
    return _CACHE[name]


def _encoder(module_name: str) -> bool:
    return module_name.startswith("encoder.") or ".encoder." in module_name


def _pre_cap(logits, info):
    logits = logits.double()
    return info.softcap * torch.atanh(logits / info.softcap) if info.softcap is not None else logits


@pytest.mark.parametrize("name", FAMILIES)
def test_components_add_up_to_the_bare_logit_difference(name):
    model, kwargs, im = _instrumented(name)
    result = attnfx.logit_attribution(im, kwargs, TARGETS, foil=FOILS)
    with torch.no_grad():
        logits = _pre_cap(model(**kwargs).logits[:, -1], im.final_norm)
    rows = torch.arange(2)
    want = (logits[rows, TARGETS] - logits[rows, FOILS]).float()
    got = (result.heads.sum((1, 2)) + result.attn_bias.sum(1) + result.mlp.sum(1) + result.embed + result.norm_bias
           + result.logit_bias + result.const)
    assert_close(result.total, want)
    assert_close(got, want)
    assert result.pre_softcap == (name == "gemma2")
    assert torch.equal(result.heads, attnfx.head_attribution(im, kwargs, TARGETS, foil=FOILS, reduce="none"))
    assert result.heads.abs().sum() > 0 and result.mlp.abs().sum() > 0


def test_the_path_is_described():
    assert _instrumented("gemma2")[2].final_norm.softcap == 30.0
    assert _instrumented("gemma")[2].final_norm.weight_offset == 1.0
    assert _instrumented("cohere")[2].final_norm.post == (("scale", 0.0625),)
    assert _instrumented("bart")[2].final_norm.post == (("bias", "final_logits_bias"),)
    assert _instrumented("t5")[2].final_norm.post == (("scale", pytest.approx(32 ** -0.5)),)


# ---- (b) the explicit reference -----------------------------------------------------------------
def _norm(module, x, kind, offset):
    """The norm at input x [b, d] with σ frozen, as a linear map of a contribution c [b, d]."""
    eps = next(getattr(module, a) for a in ("eps", "variance_epsilon", "epsilon") if hasattr(module, a))
    centre = (lambda v: v - v.mean(-1, keepdim=True)) if kind == "ln" else (lambda v: v)
    sigma = torch.sqrt(centre(x).pow(2).mean(-1, keepdim=True) + eps)
    return lambda c: centre(c) / sigma * (offset + module.weight.detach())


def _chain(name, model, o_proj: str) -> list[str]:
    """Names of the norms a head's output goes through to the logits, in order."""
    final, post = PATHS[name][1], PATHS[name][4]
    layer = o_proj.rsplit(".", 1)[0]                                   # ...layers.l.self_attn
    if name != "bart":
        return [layer.rsplit(".", 1)[0] + "." + p for p in post] + [final]
    prefix, index, kind = re.match(r"(.*\.layers)\.(\d+)\.(\w+)$", layer).groups()
    per_layer = ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"]
    chain = [f"{prefix}.{index}.{n}" for n in per_layer[(0 if kind == "self_attn" else 1):]]
    for later in range(int(index) + 1, len(model.model.decoder.layers)):
        chain += [f"{prefix}.{later}.{n}" for n in per_layer]
    return chain


def _logit_factor(name, model):
    config = model.config
    factors = {"cohere": lambda: config.logit_scale, "granite": lambda: 1 / config.logits_scaling,
               "t5": lambda: config.d_model ** -0.5}
    return factors[name]() if name in factors else 1.0


def reference_dla(name, model, kwargs, im):
    """Per head: z_h (o_proj pre-hook) · W_O,hᵀ → every norm after it frozen at its hooked input
    (σ, γ, centring) → residual multiplier → · (W_U[t] − W_U[f]) · logit scale, at the last position."""
    _, _, kind, offset, _ = PATHS[name]
    inputs_of, modules = {}, dict(model.named_modules())
    o_names = [site.o_proj.rsplit(".", 1)[0] for site in im.sites]
    norm_names = {n for o in o_names for n in _chain(name, model, o) if n in modules}
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: inputs_of.__setitem__(n, a[0].detach()))
               for n in set(o_names) | norm_names]
    with torch.no_grad():
        model(**kwargs)
    for handle in handles:
        handle.remove()
    w_u = model.get_output_embeddings().weight.detach()
    direction = (w_u[TARGETS] - w_u[FOILS]) * _logit_factor(name, model)          # [b, d]
    heads, d = im.sites[0].num_heads, im.sites[0].head_dim
    out = torch.zeros(2, len(o_names), heads)
    for layer, o in enumerate(o_names):
        if o not in inputs_of or not all(n in inputs_of for n in _chain(name, model, o)) or _encoder(o):
            continue                                                             # encoder heads: no direct effect
        weight = modules[o].weight.detach()
        weight = weight if isinstance(modules[o], nn.Linear) else weight.T       # GPT-2's Conv1D is [in, out]
        z = inputs_of[o][:, -1].view(2, heads, d)
        for h in range(heads):
            c = z[:, h] @ weight[:, h * d:(h + 1) * d].T * getattr(model.config, "residual_multiplier", 1.0)
            for n in _chain(name, model, o):
                c = _norm(modules[n], inputs_of[n][:, -1], kind, offset)(c)
            out[:, layer, h] = (c * direction).sum(-1)
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_head_dla_equals_the_explicit_reference(name):
    model, kwargs, im = _instrumented(name)
    dla = attnfx.head_attribution(im, kwargs, TARGETS, foil=FOILS, position=-1, reduce="none")
    assert_close(dla, reference_dla(name, model, kwargs, im))
    encoder = torch.tensor([_encoder(s.o_proj) for s in im.sites])
    assert not dla[:, encoder].any()
    assert torch.equal(attnfx.logit_attribution(im, kwargs, 3, position=-1).direct, ~encoder)


# ---- (c) paths that are not linear once frozen ----------------------------------------------------
def _llama_with_head(head):
    model = build(BY_NAME["llama"], "sdpa")
    model.lm_head = head(model.lm_head)
    return model


def test_a_nonlinear_op_between_the_norm_and_the_unembedding_is_named():
    model = _llama_with_head(lambda linear: nn.Sequential(nn.GELU(), linear))
    im = attnfx.instrument(model)
    with pytest.raises(attnfx.errors.UnsupportedModelError, match=r"not linear.*gelu"):
        attnfx.head_attribution(im, {"input_ids": torch.randint(3, 64, (2, 5))}, 3)


def test_a_nonlinear_op_after_the_unembedding_is_not_a_logit_path():
    model = _llama_with_head(lambda linear: nn.Sequential(linear, nn.ReLU()))
    im = attnfx.instrument(model)
    assert im.final_norm is None
    with pytest.raises(attnfx.errors.UnsupportedModelError, match="no unembedding was found"):
        attnfx.logit_attribution(im, {"input_ids": torch.randint(3, 64, (2, 5))}, 3)


def test_gated_heads_are_attributed_with_the_gate_of_this_input():
    """Qwen3-Next multiplies z by σ(gate) before o_proj: a head's direct effect is (z ⊙ g)_h ·
    (W_O,hᵀ r) with g of this input (the reference reads z ⊙ g off o_proj's input), which the
    pre-gate z (recorded) through the same frozen path does not give."""
    model, kwargs, im = _instrumented("qwen3_next")
    assert all(site.gated for site in im.sites)
    dla = attnfx.head_attribution(im, kwargs, TARGETS, foil=FOILS, position=-1, reduce="none")
    assert_close(dla, reference_dla("qwen3_next", model, kwargs, im))
    x = {}
    handle = model.model.norm.register_forward_pre_hook(lambda m, a: x.__setitem__("final", a[0][:, -1].detach()))
    with torch.no_grad(), im.record("z") as rec:
        model(**kwargs)
        im(**kwargs)
    handle.remove()
    frozen, heads, d = _norm(model.model.norm, x["final"], "rms", 1.0), im.sites[0].num_heads, im.sites[0].head_dim
    w_u = model.get_output_embeddings().weight.detach()
    pre_gate = torch.zeros_like(dla)
    for layer, z in enumerate(rec["z"]):                                          # [b, t, H, d], pre-gate
        w_o = model.model.layers[layer].self_attn.o_proj.weight.detach()
        for h in range(heads):
            c = frozen(z[:, -1, h] @ w_o[:, h * d:(h + 1) * d].T)
            pre_gate[:, layer, h] = (c * (w_u[TARGETS] - w_u[FOILS])).sum(-1)
    assert not torch.allclose(dla, pre_gate, rtol=1e-2, atol=1e-4)


def test_latent_attention_reads_the_stream_before_its_low_rank_projections():
    """DeepSeek-V3's v comes from kv_b_proj(norm(latent)), the latent cut from kv_a_proj(x̂) and
    held by the KV cache: the layer's residual stream ("resid", and the embeddings DLA starts
    from) is the decoder layer's input, not the latent. Captured "resid" equals a pre-hook on
    each decoder layer."""
    from attnfx import patching
    for name in ("deepseek_v3", "deepseek_v3-narrow_v"):
        model, kwargs, im = _instrumented(name)
        assert im.sites[0].head_dim == model.config.v_head_dim
        seen = {}
        handles = [layer.register_forward_pre_hook(
            lambda m, a, kw, l=l: seen.__setitem__(l, (a[0] if a else kw["hidden_states"]).detach()), with_kwargs=True)
            for l, layer in enumerate(model.model.layers)]
        with torch.no_grad():
            model(**kwargs)
        for handle in handles:
            handle.remove()
        _, captured = patching.capture(im, kwargs, ("resid",))
        for layer in range(len(im.sites)):
            assert_close(captured["resid"][layer], seen[layer])


@pytest.mark.parametrize("name", ["llama", "whisper"])
def test_only_the_asked_positions_leave_the_graph(name, monkeypatch):
    """DLA captures each component at one position per row inside the graph ([b, d], not
    [b, T, d]: at T = 8k on a 7B model every layer's stream at every position is ~13 GB), and
    those equal the full-sequence captures at the positions."""
    from attnfx.analysis import attribution
    from attnfx.state.probing import Probing
    from attnfx.state.spec import Spec
    model, kwargs, im = _instrumented(name)
    sessions = []

    class Kept(Probing):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            sessions.append(self)

    monkeypatch.setattr(attribution, "Probing", Kept)
    positions = torch.tensor([1, 0])
    attnfx.logit_attribution(im, kwargs, TARGETS, foil=FOILS, position=positions)
    (at,) = sessions
    full = Probing(im, Spec(captures=at.spec.captures), {})
    with torch.no_grad(), full:
        im(**kwargs)
    assert at.captures and set(at.captures) == set(full.captures)
    rows = torch.arange(2)
    for kind, layers in at.captures.items():
        assert set(layers) <= set(full.captures[kind])
        for layer, value in layers.items():
            assert value.shape[0] == 2 and value.dim() == full.captures[kind][layer].dim() - 1
            assert torch.equal(value, full.captures[kind][layer][rows, positions])
