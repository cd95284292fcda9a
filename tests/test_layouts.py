"""Layers that differ in their numbers of heads or head widths (pruned heads, hand-built models)
are supported (issue 13): state is sized for the widest layer and each layer's graph reads its own
heads. On a Llama with layer 0 pruned to 2 query heads / 1 kv head, and on a plain model whose
layers have (4 heads × 8) and (2 heads × 16): bit-exact identity, steering equal to o_proj hooks,
records of each layer's own shape, DLA with NaN where a layer has no such head."""
import pytest
import torch
import torch.nn.functional as F
import transformers as T
from torch import nn
from torch._dynamo.utils import counters

import attnfx
from _tol import assert_close

VOCAB, D = 64, 32


def _pruned_llama():
    """Llama (4 heads, 2 kv heads, d 8) with heads 2, 3 (kv head 1) of layer 0 removed, the way
    head pruning shrinks the projections: HF infers the head count from their widths."""
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = T.LlamaForCausalLM(config).eval()
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        for name, rows in (("q_proj", 16), ("k_proj", 8), ("v_proj", 8)):
            old = getattr(attn, name)
            new = nn.Linear(D, rows, bias=False)
            new.weight.copy_(old.weight[:rows])
            setattr(attn, name, new)
        o_new = nn.Linear(16, D, bias=False)
        o_new.weight.copy_(attn.o_proj.weight[:, :16])
        attn.o_proj = o_new
    return model, [(2, 1, 8), (4, 2, 8)], lambda l: model.model.layers[l].self_attn.o_proj


class _Attention(nn.Module):
    def __init__(self, heads, head_dim):
        super().__init__()
        self.heads, self.d = heads, head_dim
        self.qkv = nn.Linear(D, 3 * heads * head_dim)
        self.o_proj = nn.Linear(heads * head_dim, D)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.d).permute(2, 0, 3, 1, 4)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(z.transpose(1, 2).reshape(b, t, -1))


class _Model(nn.Module):
    """Embedding, two pre-norm attention blocks of different head layouts, final norm, unembedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.norms = nn.ModuleList([nn.LayerNorm(D), nn.LayerNorm(D)])
        self.attns = nn.ModuleList([_Attention(4, 8), _Attention(2, 16)])
        self.final = nn.LayerNorm(D)
        self.unembed = nn.Linear(D, VOCAB, bias=False)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for norm, attn in zip(self.norms, self.attns):
            x = x + attn(norm(x))
        return self.unembed(self.final(x))


def _plain():
    torch.manual_seed(0)
    model = _Model().eval()
    return model, [(4, 4, 8), (2, 2, 16)], lambda l: model.attns[l].o_proj


BUILDERS = {"llama-pruned-heads": _pruned_llama, "plain-head-widths": _plain}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _hooked(model, module, columns, ids, factor=0.0):
    def pre(mod, args):
        x = args[0].clone()
        x[..., columns] *= factor
        return (x, *args[1:])
    handle = module.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            return _logits(model(input_ids=ids))
    finally:
        handle.remove()


@pytest.mark.parametrize("name", BUILDERS)
def test_layers_with_different_head_layouts_steer_and_record(name):
    model, layouts, o_proj = BUILDERS[name]()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    im = attnfx.instrument(model, backend="eager", example_inputs={"input_ids": ids})
    assert [(s.num_heads, s.num_kv_heads, s.head_dim) for s in im.sites] == layouts
    with torch.no_grad():
        bare = _logits(model(input_ids=ids))
        assert torch.equal(_logits(im(input_ids=ids)), bare)
        with im.record("z") as rec:
            im(input_ids=ids)
    assert [tuple(z.shape[2:]) for z in rec["z"]] == [(h, d) for h, _, d in layouts]

    compiled = counters["attnfx"]["graphs_compiled"]
    for layer, (heads, kv_heads, d) in enumerate(layouts):
        last = heads - 1
        with im.steering.ablated(layer, last), torch.no_grad():
            ablated = _logits(im(input_ids=ids))
        assert_close(ablated, _hooked(model, o_proj(layer), slice(last * d, heads * d), ids))
        with im.steering.scaled(layer, 0, 3.0), torch.no_grad():
            scaled = _logits(im(input_ids=ids))
        assert_close(scaled, _hooked(model, o_proj(layer), slice(0, d), ids, 3.0))
        group = heads // kv_heads
        with im.steering.scaled(layer, kv_heads - 1, 0.0, on="value"), torch.no_grad():
            value_ablated = _logits(im(input_ids=ids))
        assert_close(value_ablated, _hooked(model, o_proj(layer), slice((heads - group) * d, heads * d), ids))
        source = torch.randn(2, 9, d)
        with im.steering.patched(layer, last, source), torch.no_grad():
            patched = _logits(im(input_ids=ids))

        def put(mod, args, d=d, last=last, source=source):
            x = args[0].clone()
            x[..., last * d:(last + 1) * d] = source
            return (x, *args[1:])
        handle = o_proj(layer).register_forward_pre_hook(put)
        with torch.no_grad():
            assert_close(patched, _logits(model(input_ids=ids)))
        handle.remove()
    assert counters["attnfx"]["graphs_compiled"] - compiled <= 1          # the per-position patch source: once

    narrow = min(range(len(layouts)), key=lambda l: layouts[l][0])
    with pytest.raises(attnfx.errors.SiteIndexError):
        im.steering.ablate(narrow, layouts[narrow][0])                      # a head that layer lacks
    with pytest.raises(attnfx.errors.SiteIndexError):
        im.steering.scale([0, 1], max(h for h, _, _ in layouts) - 1, 2.0)   # not in every layer named
    assert im.steering.active() == []                                       # nothing half-written


@pytest.mark.parametrize("name", BUILDERS)
def test_dla_reads_nan_where_a_layer_has_no_such_head(name):
    model, layouts, o_proj = BUILDERS[name]()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    im = attnfx.instrument(model, backend="eager", example_inputs={"input_ids": ids})
    dla = attnfx.head_attribution(im, {"input_ids": ids}, target=5, foil=7, reduce="none")   # [b, L, H_max]
    widest = max(h for h, _, _ in layouts)
    assert dla.shape == (2, len(layouts), widest)
    # the slow way: each head's columns of the o_proj input through W_O, the frozen final norm, W_U
    z, resid = {}, {}
    final = model.model.norm if hasattr(model, "model") else model.final
    handles = [o_proj(l).register_forward_pre_hook(lambda m, a, l=l: z.__setitem__(l, a[0])) for l in range(2)]
    handles.append(final.register_forward_pre_hook(lambda m, a: resid.__setitem__("x", a[0])))
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    w_u = (model.lm_head if hasattr(model, "lm_head") else model.unembed).weight
    direction = (w_u[5] - w_u[7]) * final.weight
    x = resid["x"][:, -1]
    if isinstance(final, nn.LayerNorm):
        sigma = torch.sqrt(x.var(-1, unbiased=False) + final.eps)
        direction = direction - direction.mean()
    else:
        sigma = torch.sqrt(x.pow(2).mean(-1) + final.variance_epsilon)
    for l, (heads, _, d) in enumerate(layouts):
        w_o = o_proj(l).weight
        for h in range(heads):
            c = z[l][:, -1, h * d:(h + 1) * d] @ w_o[:, h * d:(h + 1) * d].T
            assert_close(dla[:, l, h], (c @ direction) / sigma)
        assert torch.isnan(dla[:, l, heads:]).all()
