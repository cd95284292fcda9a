"""Relevance and activation patching where layers see different lengths (issue 13): encoder–
decoders (BART, T5, Whisper: 7 or 8 encoder positions, 5 decoder positions), a vision backbone
(ViT: pixels in, patches and a class token through the layers), and a model whose attention sees
more positions than it has tokens (a prepended register). Each layer's result covers its own
positions, NaN past them; targets and metrics read the main output (decoder logits, a backbone's
hidden states). References are autograd and module hooks on the bare HF model."""
from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn

import attnfx
import zoo
from _tol import assert_close
from test_analysis_inputs import _Runs
from attnfx import metrics, patching
from attnfx.graph import calls
from attnfx.errors import InvalidArgumentError, ShapeMismatchError
from attnfx.state.indices import padded_stack
from models import VOCAB, PlainAttention

NAN = float("nan")


@functools.lru_cache(maxsize=None)
def _built(name: str, dtype=torch.float32):
    """(model, im, kwargs) of a zoo family, instrumented once per session (eager backend)."""
    family = zoo.BY_NAME[name]
    model = zoo.build(family, zoo.primary(family)).to(dtype)
    kw = {k: v.to(dtype) if v.is_floating_point() else v for k, v in zoo.inputs(family, model).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model, attnfx.instrument(model, backend="eager", example_inputs=kw), kw


def _o_proj(model, im, layer: int) -> nn.Module:
    return model.get_submodule(im.sites[layer].o_proj.rsplit(".", 1)[0])


def _hooked(modules, run):
    """run() with every module's input and output kept: (result, inputs, outputs)."""
    ins, outs = [None] * len(modules), [None] * len(modules)

    def keep(i):
        def hook(module, args, out):
            ins[i], outs[i] = args[0], out
        return hook
    hooks = [m.register_forward_hook(keep(i)) for i, m in enumerate(modules)]
    try:
        return run(), ins, outs
    finally:
        for h in hooks:
            h.remove()


def _main(out):
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _last_three(out):
    return _main(out)[:, -1, :3].sum(-1)


# ---- relevance ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, encoder, decoder", [("bart", 7, 5), ("t5", 7, 5), ("whisper", 8, 5)])
def test_relevance_of_each_layer_covers_its_own_positions(name, encoder, decoder):
    """Gradient × input per head and per attention output equals z ⊙ ∂f/∂z and o ⊙ ∂f/∂o by
    autograd on the bare model, each layer at its own length: NaN past it."""
    model, im, kw = _built(name)
    rel = attnfx.relevance(im, kw, _last_three, rule="gradient", components=("heads", "attn"))
    modules = [_o_proj(model, im, layer) for layer in range(len(im.sites))]
    value, z, o = _hooked(modules, lambda: _last_three(model(**kw)))
    grads = torch.autograd.grad(value.sum(), z + o)
    heads = [(zl * g).unflatten(-1, (s.num_heads, s.head_dim)).sum(-1) for zl, g, s in zip(z, grads, im.sites)]
    attn = [(ol * g).sum(-1) for ol, g in zip(o, grads[len(z):])]
    assert_close(rel.target, value.detach())
    assert_close(rel.heads_per_position, padded_stack(heads, dim=2, fill=NAN), equal_nan=True)   # [b, t, L, H]
    assert_close(rel.attn, padded_stack(attn, dim=2, fill=NAN), equal_nan=True)                 # [b, t, L]
    lengths = [encoder if site.stack == "encoder" else decoder for site in im.sites]
    assert [zl.shape[1] for zl in z] == lengths
    for layer, length in enumerate(lengths):
        assert not rel.attn[:, :length, layer].isnan().any()
        assert rel.attn[:, length:, layer].isnan().all()


def test_t5_head_relevance_sums_to_its_attention_output_at_every_length():
    """T5 has no biases: under AttnLRP Σ_h z_h ⊙ g_h = o ⊙ g per position and layer, encoder and
    decoder alike, and the per-layer sums of conservation() agree."""
    _, im, kw = _built("t5", torch.float64)
    rel = attnfx.relevance(im, kw, _last_three, rule="attnlrp", components=("heads", "attn"))
    heads = rel.heads_per_position.sum(-1)
    torch.testing.assert_close(heads, rel.attn, rtol=0, atol=1e-10 * rel.attn.nan_to_num().abs().max().item(),
                               equal_nan=True)
    sums = rel.conservation()
    assert not sums["attn"].isnan().any()
    torch.testing.assert_close(sums["heads"], sums["attn"], rtol=1e-9, atol=1e-12)


def test_token_targets_read_decoder_positions():
    """position=None is each row's last real decoder token per decoder_attention_mask (the last
    position without one); positions are checked against the decoder's length before any run."""
    _, im, kw = _built("bart")
    by_default = attnfx.relevance(im, kw, 5, foil=9, rule="gradient", components=("heads",))
    by_fn = attnfx.relevance(im, kw, lambda out: out.logits[:, -1, 5] - out.logits[:, -1, 9], rule="gradient",
                             components=("heads",))
    assert_close(by_default.target, by_fn.target)
    assert_close(by_default.heads_per_position, by_fn.heads_per_position, equal_nan=True)
    padded = dict(kw, decoder_attention_mask=torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]))
    last = attnfx.relevance(im, padded, 5, rule="gradient", components=("heads",))
    read = attnfx.relevance(im, padded, lambda out: out.logits[[0, 1], [4, 2], 5], rule="gradient",
                            components=("heads",))
    assert_close(last.target, read.target)
    with _Runs(im) as runs:
        with pytest.raises(InvalidArgumentError, match=r"\[-5, 5\)"):       # 7 encoder tokens, 5 decoder ones
            attnfx.relevance(im, kw, 5, position=5)
    assert runs.count == 0


def test_measured_lengths_are_kept_per_call_shapes():
    """An encoder–decoder's lengths are measured by one capturing run, once per call shapes."""
    _, im, kw = _built("bart")
    shorter = dict(kw, decoder_input_ids=kw["decoder_input_ids"][:, :4])
    with _Runs(im) as runs:
        first = attnfx.relevance(im, shorter, 5, rule="gradient", components=("heads",))
    assert runs.count == 2                                  # measure, then the gated forward
    with _Runs(im) as runs:
        again = attnfx.relevance(im, shorter, 5, rule="gradient", components=("heads",))
    assert runs.count == 1
    torch.testing.assert_close(again.heads_per_position, first.heads_per_position, rtol=0, atol=0, equal_nan=True)
    assert first.heads_per_position.shape[1] == 7 and first.heads_per_position[:, 4:, 2:].isnan().all()


# ---- activation patching and AtP -------------------------------------------------------------------
def _z_runs(model, im, inputs):
    modules = [_o_proj(model, im, layer) for layer in range(len(im.sites))]
    with torch.no_grad():
        return _hooked(modules, lambda: model(**inputs))[1]


def _patched_metric(model, module, kw, source, head: int, d: int, position: int, metric):
    def patch(mod, args):
        x = args[0].clone()
        x[:, position, head * d:(head + 1) * d] = source[:, position, head * d:(head + 1) * d]
        return (x, *args[1:])
    handle = module.register_forward_pre_hook(patch)
    try:
        with torch.no_grad():
            return metric(_main(model(**kw)))
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ["bart", "whisper"])
def test_per_position_patching_patches_each_layers_own_positions(name):
    model, im, kw = _built(name)
    corrupt = dict(kw, **{k: torch.randn(v.shape, generator=torch.Generator().manual_seed(1))
                          for k, v in kw.items() if v.is_floating_point()})
    if "input_ids" in kw:
        corrupt["input_ids"] = kw["input_ids"].roll(1, dims=1)
    metric = metrics.logit_diff(5, 9)
    exact = patching.activation_patching(im, kw, corrupt, metric, "heads", per_position=True, progress=False)
    atp = patching.attribution_patching(im, kw, corrupt, metric, "heads", per_position=True)
    lengths = [z.shape[1] for z in _z_runs(model, im, kw)]
    longest, d = max(lengths), im.sites[0].head_dim
    assert exact.scores.shape == atp.scores.shape == (len(im.sites), im.sites[0].num_heads, longest)
    for layer, length in enumerate(lengths):
        for scores in (exact.scores, atp.scores):
            assert not scores[layer, :, :length].isnan().any() and scores[layer, :, length:].isnan().all()
    sources = _z_runs(model, im, corrupt)
    with torch.no_grad():
        clean = metric(_main(model(**kw)))
    encoder = next(layer for layer, s in enumerate(im.sites) if s.stack == "encoder")
    cross = next(layer for layer, s in enumerate(im.sites) if s.attends == "cross")
    for layer, head, position in ((encoder, 2, longest - 1), (cross, 1, lengths[cross] - 1), (cross + 1, 0, 0)):
        patched = _patched_metric(model, _o_proj(model, im, layer), kw, sources[layer], head, d, position, metric)
        assert_close(exact.scores[layer, head, position], (patched - clean).mean())
    # AtP: (z_corrupt − z_clean) · ∂metric/∂z at the clean run, per head and position
    modules = [_o_proj(model, im, layer) for layer in range(len(im.sites))]
    value, z, _ = _hooked(modules, lambda: metric(_main(model(**kw))))
    grads = torch.autograd.grad(value.sum(), z)
    want = [((s - zl) * g).unflatten(-1, (im.sites[0].num_heads, d)).sum(-1).mean(0).T
            for s, zl, g in zip(sources, z, grads)]                                       # [H, t_l]
    assert_close(atp.scores, padded_stack(want, fill=NAN), equal_nan=True)


def test_atp_star_keys_of_cross_attention_span_the_encoder():
    """The QK fix runs layer by layer at each layer's lengths: a cross-attention's keys are the
    encoder's 7 positions, a decoder self-attention's keys its 5."""
    _, im, kw = _built("bart")
    corrupt = dict(kw, input_ids=kw["input_ids"].roll(1, dims=1), decoder_input_ids=kw["decoder_input_ids"].flip(1))
    result = patching.atp_star(im, kw, corrupt, metrics.logit_diff(5, 9), "keys", per_position=True, graddrop=False)
    assert result.scores.shape[-1] == 7
    for layer, site in enumerate(im.sites):
        length = 5 if site.stack == "decoder" and site.attends == "self" else 7
        assert result.scores[layer, :, :length].isfinite().all() and result.scores[layer, :, length:].isnan().all()


# ---- a vision backbone ----------------------------------------------------------------------------
def test_vit_relevance_spans_its_patches_and_class_token():
    model, im, kw = _built("vit")
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2))

    def cls_along(out):
        return out.last_hidden_state[:, 0] @ direction
    rel = attnfx.relevance(im, kw, cls_along, rule="gradient")
    assert rel.tokens is None                                        # pixels: no token embedding
    modules = [_o_proj(model, im, layer) for layer in range(len(im.sites))]
    value, z, _ = _hooked(modules, lambda: cls_along(model(**kw)))
    grads = torch.autograd.grad(value.sum(), z)
    heads = [(zl * g).unflatten(-1, (s.num_heads, s.head_dim)).sum(-1) for zl, g, s in zip(z, grads, im.sites)]
    assert rel.heads_per_position.shape[1] == 5                      # 2 × 2 patches + the class token
    assert_close(rel.heads_per_position, torch.stack(heads, 2))


@pytest.mark.parametrize("reads", ["class token", "pooled output"])
def test_vit_patching_metrics_of_the_class_token_and_the_pooled_output(reads):
    model, im, kw = _built("vit")
    direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    corrupt = {"pixel_values": torch.randn(kw["pixel_values"].shape, generator=torch.Generator().manual_seed(4))}
    if reads == "class token":
        metric = metrics.projection(direction, position=0)

        def reference(out):
            return out.last_hidden_state[:, 0] @ direction
    else:
        def reference(out):
            return out.pooler_output @ direction
        metric = metrics.of_outputs(reference)         # tiles of the patched runs: its rows sliced out
    result = patching.activation_patching(im, kw, corrupt, metric, "heads", progress=False)
    layer, head, d = 1, 2, im.sites[1].head_dim
    source = _z_runs(model, im, corrupt)[layer]

    def patch(mod, args):
        x = args[0].clone()
        x[..., head * d:(head + 1) * d] = source[..., head * d:(head + 1) * d]
        return (x, *args[1:])
    handle = _o_proj(model, im, layer).register_forward_pre_hook(patch)
    try:
        with torch.no_grad():
            patched = reference(model(**kw))
    finally:
        handle.remove()
    with torch.no_grad():
        clean = reference(model(**kw))
    assert_close(result.scores[layer, head], (patched - clean).mean())
    assert_close(result.clean, clean)


def test_backbone_metric_errors_are_typed():
    model, im, kw = _built("vit")
    corrupt = {"pixel_values": kw["pixel_values"].flip(0)}
    with pytest.raises(InvalidArgumentError, match="main output"):
        patching.attribution_patching(im, dict(kw, return_dict=False), dict(corrupt, return_dict=False),
                                      metrics.logit(3))
    with pytest.raises(ShapeMismatchError, match="direction"):
        patching.attribution_patching(im, kw, corrupt, metrics.projection(torch.ones(7)))
    with pytest.raises(InvalidArgumentError, match="direction"):
        metrics.projection(torch.ones(7, dtype=torch.long))
    with pytest.raises(ShapeMismatchError, match="pixel_values"):
        patching.attribution_patching(im, kw, {"pixel_values": kw["pixel_values"][:1]}, metrics.logit(3))


# ---- more positions than tokens --------------------------------------------------------------------
class Registered(nn.Module):
    """embed → a learned register token prepended → attention → the register dropped → unembed:
    the attention sees t + 1 positions of t tokens."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.register = nn.Parameter(torch.randn(1, 1, d))
        self.attn = PlainAttention(d, heads, heads, bias=False, causal=True, handwritten=False,
                                   gqa_mode="enable_gqa")
        self.unembed = nn.Linear(d, VOCAB, bias=False)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        x = torch.cat([self.register.expand(x.shape[0], -1, -1), x], 1)
        x = x + self.attn(x, torch.ones(x.shape[:2], device=x.device))
        return self.unembed(x[:, 1:])


@pytest.mark.parametrize("seq", [1, 6])
def test_a_layer_longer_than_the_tokens_is_measured_not_broadcast(seq):
    """Read off the tokens, the lengths are one short: the state's narrow refuses the graph (a
    length of 1 is not broadcast), the lengths are measured — from then on for this model — and
    the run is exact."""
    torch.manual_seed(0)
    model = Registered()
    ids = torch.randint(1, VOCAB, (2, seq), generator=torch.Generator().manual_seed(seq))
    im = attnfx.instrument(model, example_inputs={"input_ids": ids})
    rel = attnfx.relevance(im, {"input_ids": ids}, 3, rule="gradient", components=("tokens", "heads"))
    with _Runs(im) as runs:
        again = attnfx.relevance(im, {"input_ids": ids}, 3, rule="gradient", components=("tokens", "heads"))
    assert runs.count == 1
    torch.testing.assert_close(again.heads_per_position, rel.heads_per_position, rtol=0, atol=0)
    value, (_, z), (embedded, _) = _hooked([model.embed, model.attn.o_proj], lambda: model(ids)[:, -1, 3])
    g_embedded, g_z = torch.autograd.grad(value.sum(), [embedded, z])
    assert rel.tokens.shape == (2, seq)
    assert_close(rel.tokens, (embedded * g_embedded).sum(-1))
    assert rel.heads_per_position.shape == (2, seq + 1, 1, 4)
    assert_close(rel.heads_per_position[:, :, 0], (z * g_z).unflatten(-1, (4, 8)).sum(-1))


# ---- calls ----------------------------------------------------------------------------------------
def test_output_positions_of_a_call():
    ids, pixels = torch.zeros(2, 7, dtype=torch.long), torch.zeros(2, 3, 16, 16)
    assert calls.output_length((), {"input_ids": ids, "decoder_input_ids": ids[:, :5]}) == 5
    assert calls.output_length((), {"input_ids": ids}) == calls.output_length((ids,), {}) == 7
    assert calls.output_length((), {"pixel_values": pixels}) is None
    assert calls.batch_and_length((), {"input_ids": ids, "decoder_input_ids": ids[:, :5]}) == (2, 7)  # unchanged
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1] * 7])
    encoder_decoder = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids[:, :5]}
    assert calls.output_last_positions((), encoder_decoder, 5).tolist() == [4, 4]     # not the encoder's mask
    decoder_mask = torch.tensor([[1, 1, 0, 0, 0], [1] * 5])
    assert calls.output_last_positions((), dict(encoder_decoder, decoder_attention_mask=decoder_mask),
                                       5).tolist() == [1, 4]
    assert calls.output_last_positions((), {"input_ids": ids, "attention_mask": mask}, 7).tolist() == \
        calls.last_positions((), {"input_ids": ids, "attention_mask": mask}).tolist() == [2, 6]
    with pytest.raises(ShapeMismatchError, match="decoder_attention_mask"):
        calls.output_last_positions((), dict(encoder_decoder, decoder_attention_mask=mask[:, :3]), 5)


def test_main_output_of_language_models_and_backbones():
    from transformers.modeling_outputs import BaseModelOutputWithPooling, Seq2SeqLMOutput
    logits, hidden = torch.randn(2, 5, 64), torch.randn(2, 7, 32)
    assert calls.main_output(Seq2SeqLMOutput(logits=logits, encoder_last_hidden_state=hidden)) is logits
    assert calls.main_output(BaseModelOutputWithPooling(last_hidden_state=hidden)) is hidden
    assert calls.main_output(hidden) is hidden
    for bad in ((hidden,), BaseModelOutputWithPooling(pooler_output=hidden[:, 0]), hidden[:, 0]):
        with pytest.raises(InvalidArgumentError, match="of_outputs"):
            calls.main_output(bad)
