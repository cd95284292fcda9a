"""Per-layer component records (issue 14): `im.record("resid_pre", "attn_out", "mlp_out", "q", "k",
"v", "pattern")` equals the same tensors taken the slow way on the bare model — HF's own
output_hidden_states / output_attentions, forward hooks on the output projections, the q/k/v
SDPA is called with — on GPT-2, Llama with GQA, BERT and the default model, padded batches."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import attnfx
import models
from _tol import assert_close
from attnfx.errors import InvalidArgumentError, SiteIndexError
from attnfx.models.loader import load_default

KINDS = ("resid_pre", "attn_out", "mlp_out", "q", "k", "v")
# family → (model → per layer (attention output projection, MLP output projection))
PROJECTIONS = {
    "gpt2": lambda m, l: (m.transformer.h[l].attn.c_proj, m.transformer.h[l].mlp.c_proj),
    "llama": lambda m, l: (m.model.layers[l].self_attn.o_proj, m.model.layers[l].mlp.down_proj),
    "bert": lambda m, l: (m.encoder.layer[l].attention.output.dense, m.encoder.layer[l].output.dense),
}


def _inputs(causal: bool):
    ids = torch.randint(1, models.VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 7, dtype=torch.long)
    if causal:
        mask[1, :2] = 0         # left padding
    else:
        mask[1, 5:] = 0         # right padding
    return {"input_ids": ids, "attention_mask": mask}


def _slow(model, kw, projections):
    """hidden states, attention/MLP projection outputs and SDPA's q, k, v from the bare model."""
    outputs, sdpa_args = {}, []
    hooks = [module.register_forward_hook(lambda mod, args, out, key=key: outputs.__setitem__(key, out.detach()))
             for key, module in projections.items()]
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        sdpa_args.append((q.detach(), k.detach(), v.detach()))
        return real(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            hidden = model(**kw, output_hidden_states=True).hidden_states
    finally:
        F.scaled_dot_product_attention = real
        for hook in hooks:
            hook.remove()
    return hidden, outputs, sdpa_args


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_components_equal_hf_outputs_hooks_and_sdpa_inputs(name):
    family = models.FAMILIES[name]
    model = models.build(family, layers=2, heads=4, kv_heads=2, impl="sdpa")
    kw = _inputs(family.causal)
    layers = 2
    projections = {(kind, l): PROJECTIONS[name](model, l)[i] for l in range(layers) for i, kind in
                   enumerate(("attn_out", "mlp_out"))}
    hidden, outputs, sdpa_args = _slow(model, kw, projections)
    im = attnfx.instrument(model, backend="eager")
    with torch.no_grad(), im.record(*KINDS) as rec:
        im(**kw)
    for layer in range(layers):
        assert_close(rec["resid_pre", layer], hidden[layer])
        for kind in ("attn_out", "mlp_out"):
            assert_close(rec[kind, layer], outputs[kind, layer].view_as(rec[kind, layer]))
        q, k, v = (x.transpose(1, 2) for x in sdpa_args[layer])           # [b, t, H, d] as SDPA got them
        assert_close(rec["q", layer], q)
        assert rec["k", layer].shape[2] == rec["v", layer].shape[2] == im.sites[layer].num_kv_heads
        for got, want in ((rec["k", layer], k), (rec["v", layer], v)):    # query head h reads kv head h // rep
            assert_close(got.repeat_interleave(want.shape[2] // got.shape[2], dim=2), want)
    if name == "llama":
        assert rec["k", 0].shape[2] == 2 and rec["q", 0].shape[2] == 4


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_pattern_equals_output_attentions(name):
    """pattern on the sdpa build (recomputed from q and k in the graph) and on the eager build
    (the model's own softmax input) both equal the eager model's output_attentions."""
    family = models.FAMILIES[name]
    kw = _inputs(family.causal)
    eager = models.build(family, layers=2, heads=4, kv_heads=2, impl="eager")
    with torch.no_grad():
        want = eager(**kw, output_attentions=True).attentions
    for impl in ("eager", "sdpa"):
        model = models.build(family, layers=2, heads=4, kv_heads=2, impl=impl)
        im = attnfx.instrument(model, backend="eager")
        with torch.no_grad(), im.record("pattern") as rec:
            im(**kw)
        for layer, expected in enumerate(want):
            keep = kw["attention_mask"].bool()[:, None, :, None]          # rows of padded queries: HF's own
            got = rec["pattern", layer]
            assert_close(torch.where(keep, got, 0.0), torch.where(keep, expected, 0.0))
            rows = keep[..., 0].expand(-1, got.shape[1], -1)
            assert_close(got.sum(-1)[rows], torch.ones(int(rows.sum())))
        im.uninstrument()


def test_pattern_positions_and_layers_select_what_leaves_the_graph():
    family = models.FAMILIES["llama"]
    model = models.build(family, layers=3, heads=4, kv_heads=2, impl="sdpa")
    kw = _inputs(True)
    im = attnfx.instrument(model, backend="eager")
    with torch.no_grad(), im.record("pattern", "resid_pre") as full:
        im(**kw)
    with torch.no_grad(), im.record("pattern", "resid_pre", layers=[2, 0], positions=[-1, 3]) as some:
        im(**kw)
    assert some["pattern"][1] is None and some["resid_pre"][1] is None
    for layer in (0, 2):
        assert torch.equal(some["pattern", layer], full["pattern", layer][:, :, [-1, 3]])
        assert torch.equal(some["resid_pre", layer], full["resid_pre", layer])
    with pytest.raises(KeyError, match="layer 1 was not recorded"):
        some["pattern", 1]


def test_one_record_of_every_kind_compiles_once_and_generate_keeps_each_step():
    family = models.FAMILIES["llama"]
    model = models.build(family, layers=2, heads=4, kv_heads=2, impl="sdpa")
    kw = _inputs(True)
    im = attnfx.instrument(model, backend="eager")
    kinds = KINDS + ("pattern", "z")
    with torch.no_grad(), im.record(*kinds):
        im(**kw)
    before = counters["attnfx"]["graphs_compiled"]
    with torch.no_grad(), im.record(*kinds) as rec:
        im(**kw)
        im(**{k: v[:, 1:].contiguous() for k, v in kw.items()})                      # a new length: no recompile
    assert counters["attnfx"]["graphs_compiled"] == before
    assert len(rec.calls) == 2 and rec["q", 0].shape[1] == 6
    with torch.no_grad(), im.record("k", "pattern") as rec:
        out = im.generate(**kw, max_new_tokens=3, do_sample=False, pad_token_id=0)
    steps = [call["k"][0].shape[1] for call in rec.calls]
    assert steps == [7, 8, 9] and out.shape[1] == 10                      # the cache grows by one per step
    assert rec.calls[-1]["pattern"][0].shape[-2:] == (1, 9)


def test_default_model_resid_pre_equals_hidden_states():
    model, _ = load_default()
    tokens = torch.randint(5, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = model(input_ids=tokens, output_hidden_states=True).hidden_states
    im = attnfx.instrument(model, backend="eager")
    with torch.no_grad(), im.record("resid_pre", "pattern") as rec:
        im(input_ids=tokens)
    for layer in range(len(im.sites)):
        assert_close(rec["resid_pre", layer], hidden[layer])
        assert rec["pattern", layer].shape == (2, im.sites[layer].num_heads, 9, 9)


def test_bad_record_requests_raise_before_anything_runs():
    model = models.build(models.FAMILIES["gpt2"], layers=2)
    im = attnfx.instrument(model, backend="eager")
    with pytest.raises(InvalidArgumentError, match="record kinds must be among"):
        im.record("residual")
    with pytest.raises(InvalidArgumentError, match="layers=\\[\\] records nothing"):
        im.record("q", layers=[])
    with pytest.raises(SiteIndexError):
        im.record("q", layers=[2])
    with pytest.raises(InvalidArgumentError, match="layers= selects"):
        im.record("z", layers=[0])


# ---- the logit lens ------------------------------------------------------------------------------
def _explicit_lens(model, final_norm, unembedding, hidden, frozen_from=None):
    """lm_head(final_norm(x)) on the model's own modules; frozen: the final stream's σ."""
    if frozen_from is None:
        return unembedding(final_norm(hidden))
    sigma = torch.sqrt(frozen_from.var(-1, unbiased=False, keepdim=True) + final_norm.eps)
    return unembedding((hidden - hidden.mean(-1, keepdim=True)) / sigma * final_norm.weight + final_norm.bias)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_logit_lens_is_the_final_norm_and_unembedding_of_each_layer(name):
    """Row l: lm_head(final_norm(hidden_states[l])) with the model's own modules; the last row: the
    model's logits; GPT-2's frozen lens uses the final stream's σ."""
    family = models.FAMILIES[name]
    model = models.build(family, layers=3, heads=4, kv_heads=2, impl="sdpa")
    kw = _inputs(True)
    final_norm = model.transformer.ln_f if name == "gpt2" else model.model.norm
    streams = {}
    hook = final_norm.register_forward_hook(lambda mod, args, out: streams.__setitem__("final", args[0].detach()))
    with torch.no_grad():
        out = model(**kw, output_hidden_states=True)
    hook.remove()
    im = attnfx.instrument(model, backend="eager")
    lens = attnfx.logit_lens(im, kw)
    assert lens.shape == (4, 2, 7, models.VOCAB)
    with torch.no_grad():
        for layer in range(3):
            assert_close(lens[layer], _explicit_lens(model, final_norm, model.lm_head, out.hidden_states[layer]))
        assert_close(lens[3], out.logits)
        if name == "gpt2":
            frozen = attnfx.logit_lens(im, kw, positions=[-1, 2], norm="frozen")
            for layer in range(3):
                want = _explicit_lens(model, final_norm, model.lm_head, out.hidden_states[layer], streams["final"])
                assert_close(frozen[layer], want[:, [-1, 2]])
            assert_close(frozen[3], out.logits[:, [-1, 2]])


@pytest.mark.parametrize("name", ["cohere", "gemma2", "granite"])
def test_logit_lens_last_row_is_the_logits_through_every_logit_path(name):
    """Logit scales (Cohere), final soft-capping and (1 + w) norms (Gemma-2), logits scaling
    (Granite): the lens applies the path the graph has, so its last row is the model's logits."""
    import zoo

    family = zoo.BY_NAME[name]
    model = zoo.build(family, "eager")
    kw = zoo.inputs(family, model)
    with torch.no_grad():
        want = model(**kw).logits
    im = attnfx.instrument(model, backend="eager")
    assert_close(attnfx.logit_lens(im, kw)[-1], want)


def test_logit_lens_raises_without_an_unembedding():
    from attnfx.errors import UnsupportedModelError

    im = attnfx.instrument(models.build(models.FAMILIES["bert"], layers=2), backend="eager")
    with pytest.raises(UnsupportedModelError, match="no final norm"):
        attnfx.logit_lens(im, _inputs(False))
    with pytest.raises(InvalidArgumentError, match="norm must be"):
        attnfx.logit_lens(im, _inputs(False), norm="dead")


# ---- per-token loss -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "bert", "t5"])
def test_token_loss_averages_to_the_models_loss(name):
    """Causal LM (shifted), masked LM and encoder–decoder (not shifted), labels ignored at −100:
    each token's loss equals an explicit cross-entropy and their nanmean is HF's loss."""
    import zoo

    family = zoo.BY_NAME[name]
    model = zoo.build(family, "eager")
    kw = dict(zoo.inputs(family, model))
    labels = (kw.get("decoder_input_ids", kw["input_ids"])).clone()
    labels[0, :2] = -100
    kw = {k: v for k, v in kw.items() if not k.startswith("decoder_")}
    with torch.no_grad():
        out = model(**kw, labels=labels)
    im = attnfx.instrument(model, backend="eager")
    with torch.no_grad(), im.record("loss") as rec:
        im(**kw, labels=labels)
    logits, target = (out.logits[:, :-1], labels[:, 1:]) if name == "gpt2" else (out.logits, labels)
    want = F.cross_entropy(logits.flatten(0, 1), target.flatten().clamp(min=0), reduction="none").view(target.shape)
    assert torch.isnan(rec["loss"]).equal(target == -100)
    assert_close(rec["loss"].nan_to_num(), want.masked_fill(target == -100, 0.0))
    assert_close(rec["loss"].nanmean(), out.loss)
    with pytest.raises(InvalidArgumentError, match="needs the call's labels"), torch.no_grad(), im.record("loss"):
        im(**zoo.inputs(family, model))


# ---- attention statistics ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_attention_stats_equal_the_explicit_pattern(name):
    """lse = logsumexp of the masked scores (from the recorded q and k), mass = the pattern summed
    over each key span, on every query row that sees a key; new spans compile nothing."""
    family = models.FAMILIES[name]
    model = models.build(family, layers=2, heads=4, kv_heads=2, impl="sdpa")
    kw = _inputs(family.causal)
    im = attnfx.instrument(model, backend="eager")
    spans = [[0, 2], [3, 7], [5, 5]]
    with torch.no_grad(), im.record("attention_stats", "pattern", "q", "k", spans=spans) as rec:
        im(**kw)
    keys = kw["attention_mask"].bool()                                     # [b, S]
    visible = keys[:, None, None, :].expand(-1, 4, 7, -1)
    if family.causal:
        visible = visible & torch.ones(7, 7, dtype=torch.bool).tril()
    rows = visible.any(-1)                                                 # [b, H, T]: a query that sees a key
    for layer in range(2):
        q, k = rec["q", layer].transpose(1, 2), rec["k", layer].transpose(1, 2)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(~visible, float("-inf"))
        assert_close(rec["lse"][layer][rows], torch.logsumexp(scores, -1)[rows])
        pattern = rec["pattern", layer]
        for i, (start, end) in enumerate(spans):
            mass = rec["mass"][layer][..., i].transpose(1, 2)                   # [b, H, T]
            assert_close(mass[rows], pattern[..., start:end].sum(-1)[rows])
    before = counters["attnfx"]["graphs_compiled"]
    with torch.no_grad(), im.record("attention_stats", "pattern", "q", "k", spans=[[1, 3], [0, 7], [2, 6]]) as again:
        im(**kw)
    assert counters["attnfx"]["graphs_compiled"] == before
    assert_close(again["mass"][0][..., 1].transpose(1, 2)[rows], torch.ones(int(rows.sum())))


def test_attention_stats_record_is_the_same_by_cpp_and_by_triton():
    """The record path's op dispatches per call: the default model's statistics by the C++ kernel
    equal those by the Triton kernel (in its interpreter here), on a left-padded batch."""
    from _ops import run_with

    model, tok = load_default()
    im = attnfx.instrument(model, backend="eager")
    batch = tok(["the capital of teifiistan is", "when a and b went to the"], return_tensors="pt", padding=True)
    spans = [[0, 3], [2, 6]]

    def stats():
        with torch.no_grad(), im.record("attention_stats", spans=spans, layers=[1, 3]) as rec:
            im(**batch)
        return rec["lse"], rec["mass"]

    by_cpp, by_triton = run_with("cpp", stats), run_with("triton", stats)
    for layer in (1, 3):
        rows = torch.isfinite(by_cpp[0][layer])
        assert rows.sum() > 0 and torch.equal(rows, torch.isfinite(by_triton[0][layer]))
        assert_close(by_triton[0][layer][rows], by_cpp[0][layer][rows])
        assert_close(by_triton[1][layer], by_cpp[1][layer])


def test_attention_stats_refuse_what_the_kernel_cannot_take():
    model = models.build(models.FAMILIES["gpt2"], layers=2, impl="eager")
    im = attnfx.instrument(model, backend="eager")
    from attnfx.errors import ShapeMismatchError, UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="record 'pattern' instead"), im.record("attention_stats"):
        im(**_inputs(True))
    with pytest.raises(ShapeMismatchError, match="spans must be integer"):
        im.record("attention_stats", spans=[[0.5, 2.0]])
    with pytest.raises(InvalidArgumentError, match="start ≤ end"):
        im.record("attention_stats", spans=[[3, 1]])
    with pytest.raises(InvalidArgumentError, match="which was not asked for"):
        im.record("q", spans=[[0, 1]])


# ---- the MLP's hidden activation and the stream it reads ----------------------------------------
MLP_MODULES = {    # family → (model, layer) → (module whose INPUT is resid_mid or None, module whose input is mlp_hidden)
    "gpt2": lambda m, l: (m.transformer.h[l].ln_2, m.transformer.h[l].mlp.c_proj),
    "llama": lambda m, l: (m.model.layers[l].post_attention_layernorm, m.model.layers[l].mlp.down_proj),
    "bert": lambda m, l: (m.encoder.layer[l].intermediate.dense, m.encoder.layer[l].output.dense),
    "neox": lambda m, l: (None, m.gpt_neox.layers[l].mlp.dense_4h_to_h),
}


@pytest.mark.parametrize("name", list(MLP_MODULES))
def test_resid_mid_and_mlp_hidden_equal_the_mlp_inputs(name):
    """resid_mid: what the MLP (or its norm) reads — None for GPT-NeoX's parallel block, whose MLP
    reads the layer's input; mlp_hidden: what the MLP's output projection reads."""
    family = models.FAMILIES[name]
    model = models.build(family, layers=2, heads=4, kv_heads=2, impl="sdpa")
    kw = _inputs(family.causal)
    inputs = {}
    hooks = [module.register_forward_pre_hook(lambda mod, args, key=(kind, l): inputs.__setitem__(key, args[0]))
             for l in range(2) for kind, module in zip(("resid_mid", "mlp_hidden"), MLP_MODULES[name](model, l))
             if module is not None]
    with torch.no_grad():
        model(**kw)
    for hook in hooks:
        hook.remove()
    im = attnfx.instrument(model, backend="eager")
    with torch.no_grad(), im.record("resid_mid", "mlp_hidden") as rec:
        im(**kw)
    for layer in range(2):
        if name == "neox":
            assert rec["resid_mid"][layer] is None
            with pytest.raises(KeyError, match="its pattern is absent there"):
                rec["resid_mid", layer]
        else:
            assert_close(rec["resid_mid", layer], inputs["resid_mid", layer])
        assert_close(rec["mlp_hidden", layer], inputs["mlp_hidden", layer].view_as(rec["mlp_hidden", layer]))


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_resid_post_is_the_stream_leaving_each_block(name):
    """hidden_states[l + 1]; after a decoder's last layer the final norm's input (HF's last hidden
    state is after the final norm); after an encoder's last layer there is no later stream: None."""
    family = models.FAMILIES[name]
    model = models.build(family, layers=3, heads=4, kv_heads=2, impl="sdpa")
    kw = _inputs(family.causal)
    final = {}
    if name != "bert":
        norm = model.transformer.ln_f if name == "gpt2" else model.model.norm
        hook = norm.register_forward_hook(lambda mod, args, out: final.__setitem__("x", args[0].detach()))
    with torch.no_grad():
        hidden = model(**kw, output_hidden_states=True).hidden_states
    if name != "bert":
        hook.remove()
    im = attnfx.instrument(model, backend="eager")
    with torch.no_grad(), im.record("resid_post") as rec:
        im(**kw)
    for layer in range(2):
        assert_close(rec["resid_post", layer], hidden[layer + 1])
    if name == "bert":
        assert rec["resid_post"][2] is None
    else:
        assert_close(rec["resid_post", 2], final["x"])
    with torch.no_grad(), im.record("resid_post", "resid_pre", layers=[1]) as one:
        im(**kw)
    assert one["resid_pre"][2] is None and one["resid_post"][0] is None
    assert torch.equal(one["resid_post", 1], rec["resid_post", 1])
