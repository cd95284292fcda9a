"""Attention written with extra terms between q·kᵀ and the softmax is still one pattern (issue 13):
in-place scaling (Falcon `eager`: `scores /= √d`, multi-query), score soft-capping (Gemma-2:
cap·tanh(s/cap)), ALiBi added to the scores (Falcon with alibi=True; Bloom through baddbmm on
heads merged into the batch axis), disentangled position terms (DeBERTa-v2), attention sinks
joined before the softmax and dropped after (GPT-OSS). On each, on the eager
backend: the unsteered model is bit-exact, recorded z equals the output projection's input, and
ablating or scaling a head equals a pre-hook on that projection; steering changes compile nothing."""
import pytest
import torch
import transformers as T
from torch._dynamo.utils import counters

import attnfx
from _tol import assert_close

HEADS, HEAD_DIM, VOCAB = 4, 8, 64


def _gemma2():
    config = T.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=HEADS, num_key_value_heads=2, head_dim=HEAD_DIM,
                            attn_logit_softcapping=2.0, attn_implementation="eager")
    return T.Gemma2ForCausalLM(config), lambda m, l: m.model.layers[l].self_attn.o_proj


def _falcon(alibi: bool):
    def make():
        config = T.FalconConfig(vocab_size=VOCAB, hidden_size=HEADS * HEAD_DIM, num_hidden_layers=2,
                                num_attention_heads=HEADS, alibi=alibi, attn_implementation="eager")
        return T.FalconForCausalLM(config), lambda m, l: m.transformer.h[l].self_attention.dense
    return make


def _bloom():
    """ALiBi through baddbmm on heads merged into the batch axis: [b·H, T, d] products."""
    config = T.BloomConfig(vocab_size=VOCAB, hidden_size=HEADS * HEAD_DIM, n_layer=2, n_head=HEADS)
    return T.BloomForCausalLM(config), lambda m, l: m.transformer.h[l].self_attention.dense


def _gpt_oss():
    """Attention sinks: a per-head logit column joined to the scores before the softmax, dropped after."""
    config = T.GptOssConfig(vocab_size=VOCAB, hidden_size=HEADS * HEAD_DIM, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=HEADS, num_key_value_heads=2,
                            head_dim=HEAD_DIM, num_local_experts=2, num_experts_per_tok=1,
                            attn_implementation="eager")
    model = T.GptOssForCausalLM(config)
    with torch.no_grad():                   # HF initialises sinks to 0; make them matter
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_()
    return model, lambda m, l: m.model.layers[l].self_attn.o_proj


def _deberta_v2():
    """Disentangled attention: content-to-position and position-to-content terms added to q·kᵀ,
    on heads merged into the batch axis, with k divided by a tensor scale."""
    config = T.DebertaV2Config(vocab_size=VOCAB, hidden_size=HEADS * HEAD_DIM, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=HEADS, relative_attention=True,
                               pos_att_type=["p2c", "c2p"], position_buckets=16, max_relative_positions=32,
                               share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False)
    return T.DebertaV2ForMaskedLM(config), lambda m, l: m.deberta.encoder.layer[l].attention.output.dense


BUILDERS = {"gemma2-softcap": _gemma2, "falcon-mqa": _falcon(False), "falcon-alibi": _falcon(True),
            "bloom-alibi-baddbmm": _bloom, "gpt-oss-sinks": _gpt_oss, "deberta-v2-disentangled": _deberta_v2}


def _inputs():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                                           # left padding in one row
    return ids, mask


def _build(name):
    torch.manual_seed(0)
    model, out_proj = BUILDERS[name]()
    return model.eval(), out_proj


def _hooked(model, module, edit, ids, mask):
    """The model's logits with `edit(x)` applied to the output projection's input [b, t, H·d]."""
    handle = module.register_forward_pre_hook(lambda mod, args: (edit(args[0].clone()), *args[1:]))
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()


def _columns(head):
    return slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)


@pytest.mark.parametrize("name", BUILDERS)
def test_extra_score_terms_are_found_steered_and_recorded(name):
    model, out_proj = _build(name)
    ids, mask = _inputs()
    valid = mask.bool()
    im = attnfx.instrument(model, backend="eager")
    assert len(im.sites) == 2 and im.sites[0].pattern == "matmul_softmax_matmul"
    with torch.no_grad():
        bare = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(im(input_ids=ids, attention_mask=mask).logits, bare)

        captured = []
        handle = out_proj(model, 1).register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
        with im.record("z") as rec:
            im(input_ids=ids, attention_mask=mask)
        handle.remove()
        assert_close(rec["z"][1].flatten(2)[valid], captured[0][valid])

        compiled = counters["attnfx"]["graphs_compiled"]
        im.steering.ablate(1, 2)
        ablated = im(input_ids=ids, attention_mask=mask).logits
        im.steering.reset()
        im.steering.scale(0, 1, 3.0, on="z")
        scaled = im(input_ids=ids, attention_mask=mask).logits
        im.steering.reset()
        assert counters["attnfx"]["graphs_compiled"] == compiled

    def zero(x):
        x[..., _columns(2)] = 0.0
        return x

    def triple(x):
        x[..., _columns(1)] *= 3.0
        return x

    assert_close(ablated[valid], _hooked(model, out_proj(model, 1), zero, ids, mask)[valid])
    assert_close(scaled[valid], _hooked(model, out_proj(model, 0), triple, ids, mask)[valid])
    assert not torch.allclose(ablated[valid], bare[valid])


def test_soft_capped_scores_report_no_single_scale():
    """cap·tanh(s/cap) is not s times a constant: the site says so instead of reporting the 1/√d
    of its first factor (the scale is what SDPA lowering and the AtP* QK fix would use)."""
    model, _ = _build("gemma2-softcap")
    im = attnfx.instrument(model)
    assert all(site.scale is None for site in im.sites)
    falcon = attnfx.instrument(_build("falcon-mqa")[0])
    assert all(site.scale == pytest.approx(HEAD_DIM ** -0.5) for site in falcon.sites)
    assert falcon.sites[0].num_kv_heads == 1
    bloom = attnfx.instrument(_build("bloom-alibi-baddbmm")[0])       # baddbmm's alpha is the scale
    assert all(site.scale == pytest.approx(HEAD_DIM ** -0.5) for site in bloom.sites)


@pytest.mark.parametrize("name", ["falcon-mqa", "falcon-alibi", "bloom-alibi-baddbmm", "gpt-oss-sinks"])
def test_dla_equals_explicit_contributions_on_extra_score_terms(name):
    from test_attribution import slow_dla
    model, _ = _build(name)
    ids = torch.randint(1, VOCAB, (3, 7), generator=torch.Generator().manual_seed(1))
    im = attnfx.instrument(model)
    targets, foils, positions = torch.tensor([3, 9, 11]), torch.tensor([5, 2, 40]), torch.tensor([6, 2, 4])
    dla = attnfx.head_attribution(im, {"input_ids": ids}, targets, foil=foils, position=positions, reduce="none")
    assert_close(dla, slow_dla(model, im, ids, targets, foils, positions))


def test_atp_star_qk_fix_refuses_soft_capped_scores_before_running():
    model, _ = _build("gemma2-softcap")
    im = attnfx.instrument(model)
    clean, corrupt = (torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(s)) for s in (0, 1))
    for components in ("queries", "keys"):
        with pytest.raises(attnfx.errors.UnsupportedModelError, match="soft-capped"):
            attnfx.patching.atp_star(im, {"input_ids": clean}, {"input_ids": corrupt},
                                     lambda logits: logits[:, -1, 3].sum(), components=components)
    result = attnfx.patching.atp_star(im, {"input_ids": clean}, {"input_ids": corrupt},
                                      lambda logits: logits[:, -1, 3].sum(), components="heads")
    assert result.scores.shape[-2:] == (2, HEADS)


def test_atp_star_qk_fix_refuses_gated_heads_before_running():
    """The QK fix needs ∂metric/∂z; on a gated site the head's gradient is taken at z ⊙ g (what W_O
    reads), which differs from it by the gate of this input: refused, not silently off by g."""
    from zoo import BY_NAME, build, inputs
    family = BY_NAME["qwen3_next"]
    model = build(family, "sdpa")
    clean = inputs(family, model)
    corrupt = {**clean, "input_ids": clean["input_ids"].roll(1, dims=1)}
    im = attnfx.instrument(model, example_inputs=clean)
    with pytest.raises(attnfx.errors.UnsupportedModelError, match="gated before W_O"):
        attnfx.patching.atp_star(im, clean, corrupt, lambda logits: logits[:, -1, 3].sum(), components="queries")


def test_gated_head_output_is_the_direct_effect():
    """Qwen3-Next multiplies z by σ(gate) before o_proj: W_O is still found, ablation is still a
    zero o_proj input column, and a head's recorded contribution is (z_h ⊙ g_h) W_O,hᵀ — what the
    o_proj input holds — not z_h W_O,hᵀ."""
    from zoo import BY_NAME, build, inputs
    family = BY_NAME["qwen3_next"]
    model = build(family, "eager")
    kw = inputs(family, model)
    im = attnfx.instrument(model, backend="eager")
    layer, heads = 1, (0, 3)
    assert im.sites[layer].o_proj == f"model.layers.{layer}.self_attn.o_proj.weight"
    o_proj = model.model.layers[layer].self_attn.o_proj
    with torch.no_grad(), im.record("contrib", "z", heads=[(layer, h) for h in heads]) as rec:
        im(**kw)
    captured = []                             # from the bare model: a hook would add a user to the path
    handle = o_proj.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
    with torch.no_grad():
        model(**kw)
    handle.remove()
    gated = captured[0].unflatten(-1, (HEADS, HEAD_DIM))                        # [b, t, H, d]
    for h in heads:
        assert_close(rec["contrib"][(layer, h)], gated[:, :, h] @ o_proj.weight[:, _columns(h)].T)
    assert not torch.allclose(rec["z"][layer], gated)                            # the gate is not 1


def test_gated_heads_are_captured_and_patched_where_w_o_reads_them():
    """A gated head's output is z ⊙ g (what it adds to the stream through W_O): captured "heads"
    equal o_proj's input per head; patching a head writes the corrupt run's z ⊙ g there (the
    clean gate is not recomputed over the corrupt z), as a pre-hook on o_proj does; the
    per-head product W_O then reads changes no value (a zero patch weight is the bare model bit
    for bit); steering still acts on z, which scales z ⊙ g alike."""
    from attnfx import metrics, patching
    from attnfx.state.probing import Probing, state_shape
    from attnfx.state.spec import Spec
    from zoo import BY_NAME, build, inputs
    family = BY_NAME["qwen3_next"]
    model = build(family, "eager")
    kw = inputs(family, model)
    ids, mask = kw["input_ids"], kw["attention_mask"]
    corrupt = dict(kw, input_ids=ids.roll(1, dims=1))
    im = attnfx.instrument(model, backend="eager")
    o_projs = [layer.self_attn.o_proj for layer in model.model.layers]
    with torch.no_grad():
        bare = model(**kw).logits
        _, (source,) = _o_proj_inputs(model, [o_projs[1]], corrupt)
        _, clean = _o_proj_inputs(model, o_projs, kw)
    _, captured = patching.capture(im, kw, ("heads",))
    for layer, x in enumerate(clean):
        assert_close(captured["heads"][layer], x.unflatten(-1, (HEADS, HEAD_DIM)))
    batch, seq = ids.shape
    state = {"patch_w_heads": torch.zeros(state_shape(im, "heads", batch, seq, per_dim=False)),
             "patch_src_heads": torch.zeros(state_shape(im, "heads", batch, seq, per_dim=True))}
    with torch.no_grad(), Probing(im, Spec(patches=("heads",)), state):
        assert torch.equal(im(**kw).logits, bare)

    metric = metrics.logit_diff(5, 9)
    result = patching.activation_patching(im, kw, corrupt, metric, "heads", progress=False)
    for head in range(HEADS):
        def patch(x, head=head):
            x[..., _columns(head)] = source[..., _columns(head)]
            return x
        want = (metric(_hooked(model, o_projs[1], patch, ids, mask)) - metric(bare)).mean()
        assert_close(result.scores[1, head], want)
    im.steering.scale(1, 2, 3.0, on="z")
    with torch.no_grad():
        scaled = im(**kw).logits
    im.steering.reset()

    def triple(x):
        x[..., _columns(2)] *= 3.0
        return x
    assert_close(scaled, _hooked(model, o_projs[1], triple, ids, mask))


def _o_proj_inputs(model, modules, kw):
    """The bare model's logits and each module's first input."""
    seen = [None] * len(modules)
    handles = [m.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0]))
               for i, m in enumerate(modules)]
    try:
        return model(**kw).logits, seen
    finally:
        for handle in handles:
            handle.remove()


def test_encoder_decoder_is_instrumented_without_example_inputs():
    """T5 does not derive decoder inputs from input_ids: the default example gives both, so the
    six sites (encoder self, decoder self and cross) are found at instrument time."""
    from zoo import BY_NAME, build, inputs
    family = BY_NAME["t5"]
    model = build(family, "eager")
    im = attnfx.instrument(model, backend="eager")
    assert len(im.sites) == 6
    kw = inputs(family, model)
    with torch.no_grad():
        assert torch.equal(im(**kw).logits, model(**kw).logits)


@pytest.mark.parametrize("name, impl", [("t5", "eager"), ("bart", "sdpa"), ("whisper", "sdpa"), ("gpt2", "sdpa"),
                                        ("deepseek_v3", "eager"), ("bert", "sdpa")])
def test_sites_are_labelled_encoder_decoder_self_cross_by_dataflow(name, impl):
    """Cross-attention reads keys from another stream; the encoder is what feeds those keys. A
    decoder-only or encoder-only model has no stack label (DeepSeek's low-rank q and kv paths are
    still self-attention)."""
    from zoo import BY_NAME, build, inputs
    family = BY_NAME[name]
    model = build(family, impl)
    im = attnfx.instrument(model, backend="eager", example_inputs=inputs(family, model))
    labels = [(s.stack, s.attends) for s in im.sites]
    if family.head in ("seq2seq", "speech2seq"):
        assert labels == [("encoder", "self")] * 2 + [("decoder", "self"), ("decoder", "cross")] * 2
        assert all((".encoder." in "." + s.module_path) == (s.stack == "encoder") for s in im.sites)
        assert "decoder cross" in repr(im)
    else:
        assert labels == [(None, "self")] * 2


def test_a_model_without_attention_keeps_the_typed_error():
    model = T.MambaForCausalLM(T.MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                             state_size=4, expand=2)).eval()
    with pytest.raises(attnfx.errors.NoAttentionFoundError, match="no attention found in MambaForCausalLM"):
        attnfx.instrument(model, backend="eager")


@pytest.mark.parametrize("name, impl", [("bart", "sdpa"), ("t5", "eager"), ("whisper", "sdpa")])
def test_encoder_decoder_generate_steers_the_encoder_too(name, impl):
    """HF's generate runs the encoder itself, outside forward: im.generate runs it through the
    instrumented graph, so the tokens equal the bare model's, and an ablated encoder head equals an
    o_proj hook on the bare model's generate; decode steps (encoder output given) are verified
    against the decoder's sites only."""
    from zoo import BY_NAME, build, inputs
    family = BY_NAME[name]
    model = build(family, impl)
    kw = {k: v for k, v in inputs(family, model).items() if k != "decoder_input_ids"}
    im = attnfx.instrument(model, backend="eager")
    settings = dict(max_new_tokens=4, do_sample=False, num_beams=1)
    with torch.no_grad():
        plain = im.generate(**kw, **settings, output_scores=True, return_dict_in_generate=True)
        bare = model.generate(**kw, **settings, output_scores=True, return_dict_in_generate=True)
        assert torch.equal(plain.sequences, bare.sequences)
    encoder = [s for s in im.sites if s.stack == "encoder"]
    site = encoder[-1]
    o_proj = model.get_submodule(site.o_proj.rsplit(".", 1)[0])
    im.steering.ablate(site.layer, 1)
    with torch.no_grad():
        steered = im.generate(**kw, **settings, output_scores=True, return_dict_in_generate=True)
    im.steering.reset()

    def zero(mod, args):
        x = args[0].clone()
        x[..., _columns(1)] = 0.0
        return (x, *args[1:])
    handle = o_proj.register_forward_pre_hook(zero)
    with torch.no_grad():
        hooked = model.generate(**kw, **settings, output_scores=True, return_dict_in_generate=True)
    handle.remove()
    assert torch.equal(steered.sequences, hooked.sequences)
    assert_close(torch.stack(steered.scores), torch.stack(hooked.scores))
    assert not torch.allclose(torch.stack(steered.scores), torch.stack(plain.scores))    # the ablation acts


def test_a_block_that_flattens_its_tokens_is_captured_and_patched_as_b_t_d():
    """OPT runs its MLP on [b·t, d]: the MLP output and the next layer's residual stream are such
    nodes. Captured, they equal hooks (viewed as [b, t, d]); patching the MLP of one layer with the
    corrupt run's equals a hook writing the corrupt fc2 output in."""
    config = T.OPTConfig(vocab_size=VOCAB, hidden_size=HEADS * HEAD_DIM, num_hidden_layers=2, ffn_dim=64,
                         num_attention_heads=HEADS, word_embed_proj_dim=HEADS * HEAD_DIM, pad_token_id=1)
    model = T.OPTForCausalLM(config).eval()
    clean, corrupt = torch.randint(2, VOCAB, (2, 6)), torch.randint(2, VOCAB, (2, 6))
    fc2 = [layer.fc2 for layer in model.model.decoder.layers]

    def outputs_of(ids):
        seen = []
        handles = [m.register_forward_hook(lambda mod, args, out: seen.append(out.detach())) for m in fc2]
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        for handle in handles:
            handle.remove()
        return logits, [out.view(2, 6, -1) for out in seen]

    im = attnfx.instrument(model, backend="eager")
    logits, captured = attnfx.patching.capture(im, {"input_ids": clean}, ("mlp", "resid"))
    want_logits, want_mlp = outputs_of(clean)
    assert torch.equal(logits, want_logits)
    assert torch.equal(captured["mlp"], torch.stack(want_mlp))
    assert captured["resid"].shape == (2, 2, 6, HEADS * HEAD_DIM)

    _, corrupt_mlp = outputs_of(corrupt)
    handle = fc2[1].register_forward_hook(lambda mod, args, out: corrupt_mlp[1].reshape_as(out))
    with torch.no_grad():
        want = model(input_ids=clean).logits[:, -1, 5]
    handle.remove()
    result = attnfx.patching.activation_patching(im, {"input_ids": clean}, {"input_ids": corrupt},
                                                 lambda logits: logits[:, -1, 5], components="mlp", progress=False)
    assert result.scores.shape == (2,)
    assert_close(result.scores[1], (want - want_logits[:, -1, 5]).mean())
