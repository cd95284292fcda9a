"""Attention outside HF (issue 13): torch.nn.MultiheadAttention, nn.TransformerEncoder (its fused
fast path included) and FlexAttention are sites like any other. On the eager backend: one site
per attention layer, W_O named, the unsteered model exact, recorded z and ablating or scaling a
head equal to a plain-torch reference, steering changes compile nothing.

nn.MultiheadAttention applies out_proj with F.linear inside F.multi_head_attention_forward, so a
hook on out_proj never fires: the reference replaces the attention module's output by a plain
re-implementation of it (`_manual_attention`) in which z can be edited. Under dynamo the module
never takes its fused fast path (it is blocked while tracing), so the graph holds the Python
function: the instrumented model equals the bare model run on that path (grad enabled)."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import attnfx
from _tol import assert_close
from attnfx.passes import decompose

HEADS, HEAD_DIM, VOCAB = 4, 8, 64
KV_HEADS = 2                      # the flex attention model's grouped-query heads
D = HEADS * HEAD_DIM
BATCH, SEQ = 2, 6


def _manual_attention(mha: nn.MultiheadAttention, x, key_padding_mask=None, attn_mask=None, edit=None):
    """Self-attention of `mha` on x written out: z = softmax(q kᵀ/√d + masks) v, [b, H, t, d],
    passed through `edit`, then out_proj. Masks are boolean (True = not attended)."""
    x = x if mha.batch_first else x.transpose(0, 1)                     # [b, t, E]
    b, t, _ = x.shape
    q, k, v = (y.view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
               for y in F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1))
    scores = q @ k.transpose(-2, -1) / HEAD_DIM ** 0.5
    if attn_mask is not None:
        scores = scores.masked_fill(attn_mask, float("-inf"))
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    z = edit(scores.softmax(-1) @ v)
    out = F.linear(z.transpose(1, 2).reshape(b, t, D), mha.out_proj.weight, mha.out_proj.bias)
    return out if mha.batch_first else out.transpose(0, 1)


def _replaced(model, modules, edits, call):
    """call() with each attention module's output replaced by `_manual_attention` (grad enabled,
    so nn modules take their Python path and the hooks run)."""
    def hook(edit):
        def replace(mod, args, kwargs, out):
            masks = {name: kwargs.get(name) for name in ("key_padding_mask", "attn_mask")}
            masks = {name: m if m is None or m.dtype == torch.bool else m.isinf() for name, m in masks.items()}
            return _manual_attention(mod, args[0], edit=edit, **masks), None
        return replace
    handles = [m.register_forward_hook(hook(e), with_kwargs=True) for m, e in zip(modules, edits)]
    try:
        with torch.enable_grad():
            return call().detach()
    finally:
        for h in handles:
            h.remove()


def _head(z, head, factor):
    z = z.clone()
    z[:, head] *= factor
    return z


def _masks(kind):
    """Right padding (left would mask every key of a causal first row) and a causal mask."""
    if kind == "none":
        return {}
    padding = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    padding[0, -2:] = True
    masks = {"key_padding_mask": padding}
    if kind == "padding+causal":
        masks["attn_mask"] = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)
    return masks


class _SelfAttention(nn.Module):
    def __init__(self, batch_first, need_weights):
        super().__init__()
        self.attn = nn.MultiheadAttention(D, HEADS, batch_first=batch_first)
        self.need_weights = need_weights

    def forward(self, x, **masks):
        return self.attn(x, x, x, need_weights=self.need_weights, **masks)


def _steering_checks(im, call, reference, modules_of, out_weights):
    """Recorded z and readouts (z_h · W_O,hᵀ r: the site names W_O), ablation and ×3 scaling
    against the reference; 10 steering changes compile nothing."""
    layers = len(modules_of)
    directions = torch.randn(3, D)
    with torch.no_grad():
        captured = []
        with im.record("z", "readout", directions=directions) as rec:
            call(im)
        reference(modules_of, [lambda z: captured.append(z) or z] * layers)
        for layer, (z, weight) in enumerate(zip(captured, out_weights)):
            assert_close(rec["z"][layer], z.transpose(1, 2))
            u = weight.detach().view(D, HEADS, HEAD_DIM).permute(1, 2, 0) @ directions.T     # [H, d, K]
            assert_close(rec["readout"][:, :, layer], torch.einsum("bhtd,hdk->bthk", z, u))
        compiled = counters["attnfx"]["graphs_compiled"]
        im.steering.ablate(layers - 1, 2)
        ablated = call(im)
        im.steering.reset()
        im.steering.scale(0, 1, 3.0, on="z")
        scaled = call(im)
        for value in torch.linspace(0.5, 2.0, 8).tolist():
            im.steering.scale(0, 3, value, on="z")
            call(im)
        im.steering.reset()
        assert counters["attnfx"]["graphs_compiled"] == compiled
    keep = [lambda z: z] * layers
    assert_close(ablated, reference(modules_of, keep[:-1] + [lambda z: _head(z, 2, 0.0)]))
    assert_close(scaled, reference(modules_of, [lambda z: _head(z, 1, 3.0)] + keep[1:]))
    return ablated


@pytest.mark.parametrize("batch_first, need_weights, masks", [
    (True, False, "none"), (True, True, "padding"), (False, True, "padding+causal"), (False, False, "padding+causal")])
def test_multihead_attention_is_one_site(batch_first, need_weights, masks):
    model = _SelfAttention(batch_first, need_weights).eval()
    x = torch.randn((BATCH, SEQ, D) if batch_first else (SEQ, BATCH, D))
    masks = _masks(masks)
    im = attnfx.instrument(model, backend="eager")
    with torch.no_grad():
        out, weights = im(x, **masks)
    assert len(im.sites) == 1 and im.sites[0].o_proj == "attn.out_proj.weight"
    assert im.sites[0].pattern == ("matmul_softmax_matmul" if need_weights else "sdpa_call")
    bare, bare_weights = model(x, **masks)                   # grad enabled: the Python path dynamo traced
    assert torch.equal(out, bare.detach())
    assert (weights is None) == (not need_weights)
    if need_weights:
        assert torch.equal(weights, bare_weights.detach())
    with torch.no_grad():                                    # the fused fast path, where it applies
        assert_close(out, model(x, **masks)[0])

    def reference(modules, edits):
        return _replaced(model, modules, edits, lambda: model(x, **masks)[0])

    ablated = _steering_checks(im, lambda m: m(x, **masks)[0], reference, [model.attn],
                               [model.attn.out_proj.weight])
    assert not torch.allclose(ablated, bare)
    # bias-free value scaling keeps κ = b_V: z_h ← α z_h + (1 − α) b_V,h (rows of A sum to 1)
    assert im.sites[0].value_bias == "attn.in_proj_bias"
    b_v = model.attn.in_proj_bias.detach()[2 * D:].view(HEADS, HEAD_DIM)
    with torch.no_grad():
        im.steering.scale(0, 3, 0.5, on="value_unbiased")
        unbiased = im(x, **masks)[0]
        im.steering.reset()

    def keep_bias(z):
        z = z.clone()
        z[:, 3] = 0.5 * z[:, 3] + 0.5 * b_v[3]
        return z

    assert_close(unbiased, reference([model.attn], [keep_bias]))


class _CrossAttention(nn.Module):
    def __init__(self, kdim):
        super().__init__()
        self.attn = nn.MultiheadAttention(D, HEADS, kdim=kdim, vdim=kdim)

    def forward(self, x, memory):
        return self.attn(x, memory, memory, need_weights=False)[0]


@pytest.mark.parametrize("kdim", [None, 24])
def test_cross_and_unbatched_multihead_attention(kdim):
    """The other in-projections of the Python path: key is value (packed weight split in two),
    separate q/k/v_proj_weight (kdim ≠ embed_dim); unbatched [t, E] inputs."""
    model = _CrossAttention(kdim).eval()
    x, memory = torch.randn(SEQ, D), torch.randn(SEQ + 3, kdim or D)       # unbatched
    im = attnfx.instrument(model, backend="eager")
    with torch.no_grad():
        out = im(x, memory)
        im.steering.ablate(0, 1)
        ablated = im(x, memory)
    assert len(im.sites) == 1 and im.sites[0].o_proj == "attn.out_proj.weight"
    assert torch.equal(out, model(x, memory).detach())
    mha = model.attn
    weights = (mha.in_proj_weight.chunk(3) if kdim is None
               else (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight))
    q, k, v = (F.linear(y, w, b).view(len(y), HEADS, HEAD_DIM).transpose(0, 1)
               for y, w, b in zip((x, memory, memory), weights, mha.in_proj_bias.chunk(3)))
    z = (q @ k.transpose(-2, -1) / HEAD_DIM ** 0.5).softmax(-1) @ v                  # [H, t, d]
    expected = F.linear(_head(z[None], 1, 0.0)[0].transpose(0, 1).reshape(SEQ, D), mha.out_proj.weight,
                        mha.out_proj.bias)
    assert_close(ablated, expected.detach())


_ENCODERS = {(True, False): 48, (True, True): 56, (False, True): 64}


def _encoder(batch_first, norm_first):
    # FFN widths differ per config: attnfx shares compiled frames between models of equal
    # parameter shapes, and these configs differ only in attributes (dynamo's recompile limit)
    layer = nn.TransformerEncoderLayer(D, HEADS, _ENCODERS[batch_first, norm_first], dropout=0.0,
                                       batch_first=batch_first, norm_first=norm_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()


@pytest.mark.parametrize("batch_first, norm_first", [(True, False), (True, True), (False, True)])
def test_transformer_encoder_fast_path_is_two_sites(batch_first, norm_first):
    """Eval mode under no_grad runs the fused torch._transformer_encoder_layer_fwd (batch_first) or
    the Python path; either way 2 sites, named like the Python path's, exact to the bare model."""
    model = _encoder(batch_first, norm_first)
    x = torch.randn((BATCH, SEQ, D) if batch_first else (SEQ, BATCH, D))
    padding = _masks("padding")["key_padding_mask"]
    valid = ~padding if batch_first else ~padding.T
    im = attnfx.instrument(model, backend="eager")
    with torch.no_grad():
        plain, bare = im(x), model(x)
        masked, bare_masked = im(x, src_key_padding_mask=padding), model(x, src_key_padding_mask=padding)
    assert [s.module_path for s in im.sites] == ["layers.0.self_attn", "layers.1.self_attn"]
    assert im.sites[1].o_proj == "layers.1.self_attn.out_proj.weight"
    assert im.sites[1].value_bias == "layers.1.self_attn.in_proj_bias"
    assert torch.equal(plain, bare)
    # the fused kernel's masked softmax is its own kernel: equal at round-off only
    assert_close(masked[valid], bare_masked[valid])
    # grad enabled: the Python path, traced anew under the sites found by discovery
    assert torch.equal(im(x, src_key_padding_mask=padding).detach(),
                       model(x, src_key_padding_mask=padding).detach())

    def reference(modules, edits):
        return _replaced(model, modules, edits, lambda: model(x, src_key_padding_mask=padding))[valid]

    modules = [layer.self_attn for layer in model.layers]
    _steering_checks(im, lambda m: m(x, src_key_padding_mask=padding)[valid], reference, modules,
                     [m.out_proj.weight for m in modules])


def test_transformer_encoder_decoder_has_every_attention():
    """nn.Transformer: fused encoder layers, then decoder self-attention (causal) and cross-attention
    through the Python path: 2 + 2·2 sites, exact to the bare model under no_grad."""
    model = nn.Transformer(D, HEADS, 2, 2, 40, dropout=0.0, batch_first=True).eval()
    src, tgt = torch.randn(BATCH, SEQ + 2, D), torch.randn(BATCH, SEQ, D)
    causal = nn.Transformer.generate_square_subsequent_mask(SEQ)
    im = attnfx.instrument(model, backend="eager")
    with torch.no_grad():
        out = im(src, tgt, tgt_mask=causal, tgt_is_causal=True)
        assert torch.equal(out, model(src, tgt, tgt_mask=causal, tgt_is_causal=True))
    assert [s.module_path for s in im.sites] == [
        "encoder.layers.0.self_attn", "encoder.layers.1.self_attn", "decoder.layers.0.self_attn",
        "decoder.layers.0.multihead_attn", "decoder.layers.1.self_attn", "decoder.layers.1.multihead_attn"]
    assert all(s.o_proj == s.module_path + ".out_proj.weight" for s in im.sites)


def test_decompose_counts_fused_ops_and_leaves_other_graphs():
    """The pass rewrites each fused op (2 encoder layers; one direct native MHA call) and nothing
    in a graph without one; without a mask the composition replays the kernels bit for bit."""
    counts = []

    def backend(gm, example_inputs):
        counts.append(decompose.apply(gm))
        fused = (torch._transformer_encoder_layer_fwd, torch._native_multi_head_attention,
                 F.multi_head_attention_forward)
        assert not any(n.target in fused for n in gm.graph.nodes)
        return gm.forward

    model = _encoder(True, False)
    mha = model.layers[0].self_attn

    def native(y):
        return torch._native_multi_head_attention(y, y, y, D, HEADS, mha.in_proj_weight, mha.in_proj_bias,
                                                  mha.out_proj.weight, mha.out_proj.bias, None, True, True)

    x = torch.randn(BATCH, SEQ, D)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
        out_native, weights = torch.compile(native, backend=backend)(x)
        torch.compile(lambda y: F.softmax(y @ y.mT, -1) @ y, backend=backend)(x)
        assert counts == [2, 1, 0]
        assert torch.equal(out, model(x))
        bare_native, bare_weights = native(x)
        assert torch.equal(out_native, bare_native) and torch.equal(weights, bare_weights)


class _TinyLM(nn.Module):
    """Embedding → pre-norm nn.TransformerEncoder (its fused fast path in eval) → LayerNorm → unembedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        layer = nn.TransformerEncoderLayer(D, HEADS, 80, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm, self.unembed = nn.LayerNorm(D), nn.Linear(D, VOCAB, bias=False)

    def forward(self, input_ids):
        return self.unembed(self.norm(self.encoder(self.embed(input_ids))))


def test_head_attribution_through_fused_encoder_layers():
    """DLA per head at the last position: (z_h W_O,hᵀ centred) · γ/σ · (W_U[target] − W_U[foil])."""
    model = _TinyLM().eval()
    ids = torch.randint(0, VOCAB, (3, SEQ))
    targets, foils = torch.tensor([3, 9, 11]), torch.tensor([5, 2, 40])
    im = attnfx.instrument(model, backend="eager")
    with torch.no_grad():
        im(ids)
    dla = attnfx.head_attribution(im, {"input_ids": ids}, targets, foil=foils, reduce="none")      # [b, L, H]
    captured, resid = [], []
    modules = [layer.self_attn for layer in model.encoder.layers]
    handle = model.norm.register_forward_pre_hook(lambda mod, args: resid.append(args[0].detach()))
    _replaced(model, modules, [lambda z: captured.append(z.detach()) or z] * 2, lambda: model(ids))
    handle.remove()
    x = resid[0][:, -1]
    sigma = torch.sqrt(x.var(-1, unbiased=False) + model.norm.eps)[:, None]
    direction = model.norm.weight.detach() * (model.unembed.weight[targets] - model.unembed.weight[foils]).detach()
    expected = torch.zeros(3, 2, HEADS)
    for layer, (z, mha) in enumerate(zip(captured, modules)):
        for h in range(HEADS):
            c = z[:, h, -1] @ mha.out_proj.weight.detach()[:, h * HEAD_DIM:(h + 1) * HEAD_DIM].T
            expected[:, layer, h] = ((c - c.mean(-1, keepdim=True)) / sigma * direction).sum(-1)
    assert_close(dla, expected)


def _alibi_like(score, b, h, q_idx, kv_idx):
    return score + (kv_idx - q_idx) * (h + 1) * 0.05


class _FlexBlock(nn.Module):
    """Grouped-query attention through flex_attention(enable_gqa=True), as HF's flex interface calls it."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(D, D + 2 * KV_HEADS * HEAD_DIM), nn.Linear(D, D)

    def forward(self, x, block_mask):
        b, t, _ = x.shape
        q, kv = self.qkv(x).split([D, 2 * KV_HEADS * HEAD_DIM], -1)
        q = q.view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
        k, v = kv.view(b, t, 2, KV_HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        z = flex_attention(q, k, v, score_mod=_alibi_like, block_mask=block_mask, enable_gqa=True)
        return x + self.o(z.transpose(1, 2).reshape(b, t, D))


class _FlexModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_FlexBlock(), _FlexBlock()])

    def forward(self, x, block_mask):
        for block in self.blocks:
            x = block(x, block_mask)
        return x


def _pre_hooked(model, modules, edits, call):
    """call() with edit(z) [b, H, t, d] applied to the input of each output projection."""
    def hook(edit):
        def pre(mod, args):
            b, t, _ = args[0].shape
            z = args[0].view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
            return (edit(z).transpose(1, 2).reshape(b, t, -1),)
        return pre
    handles = [m.register_forward_pre_hook(hook(e)) for m, e in zip(modules, edits)]
    try:
        with torch.no_grad():
            return call()
    finally:
        for h in handles:
            h.remove()


def test_flex_attention_keeps_score_mod_and_block_mask():
    """FlexAttention has no CPU backward: everything runs under no_grad."""
    model = _FlexModel().eval()
    x = torch.randn(BATCH, SEQ, D)
    causal = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, SEQ, SEQ, device="cpu")
    im = attnfx.instrument(model, backend="eager")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")                     # flex attention's "called without compile"
        out, bare = im(x, causal), model(x, causal)
        assert torch.equal(out, bare)
        assert [s.pattern for s in im.sites] == ["flex_attention"] * 2
        assert (im.sites[0].num_heads, im.sites[0].num_kv_heads) == (HEADS, KV_HEADS)
        assert im.sites[1].o_proj == "blocks.1.o.weight"

        def reference(modules, edits):
            return _pre_hooked(model, modules, edits, lambda: model(x, causal))

        projections = [b.o for b in model.blocks]
        _steering_checks(im, lambda m: m(x, causal), reference, projections, [o.weight for o in projections])
        # scaling kv head 1's values (with bias) scales z of its query heads 2 and 3
        im.steering.scale(1, 1, 2.0, on="value")
        scaled = im(x, causal)
        im.steering.reset()
    grouped = reference(projections, [lambda z: z, lambda z: _head(_head(z, 2, 2.0), 3, 2.0)])
    assert_close(scaled, grouped)
