"""Attention that runs after a graph break (capture/resumed.py): dynamo compiles the rest of the
model as other frames, whose graphs do not hold attnfx's state. Each check compares against the
bare model: identity bit for bit, steering and recording against hooks on the output projection,
and no compiles across steering changes; a site that cannot be steered raises."""
from __future__ import annotations

import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import attnfx
from attnfx import api as _api
import zoo
from _tol import assert_close
from attnfx.errors import RelevanceLeakWarning, UninstrumentedExecutionError, UnsupportedModelError

VOCAB, HEADS, HEAD_DIM, LAYERS = 64, 4, 8, 3
BREAKS = ("before_layers", "between_layers", "after_attention", "before_sdpa")


class _Attention(nn.Module):
    def __init__(self, width, break_before_sdpa):
        super().__init__()
        self.qkv, self.o = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.break_before_sdpa = break_before_sdpa

    def forward(self, x):
        b, t, width = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, HEADS, width // HEADS).permute(2, 0, 3, 1, 4)
        if self.break_before_sdpa:
            torch._dynamo.graph_break()
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(z.transpose(1, 2).reshape(b, t, width))


class _Block(nn.Module):
    def __init__(self, width, where):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = _Attention(width, where == "before_sdpa")
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.break_after_attention = where == "after_attention"

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        if self.break_after_attention:
            torch._dynamo.graph_break()
        return x + self.mlp(self.ln2(x))


class _Breaking(nn.Module):
    """A small decoder with a graph break where `where` says: before the layers (as HF's flex mask
    builder), between them, inside each block, or inside attention between q/k/v and SDPA.
    shared=True applies one block LAYERS times (as ALBERT does)."""

    def __init__(self, where, head_dim=HEAD_DIM, shared=False):
        super().__init__()
        width = HEADS * head_dim
        self.where = where
        self.embed = nn.Embedding(VOCAB, width)
        self.blocks = nn.ModuleList(_Block(width, where) for _ in range(1 if shared else LAYERS))
        self.ln_f, self.unembed = nn.LayerNorm(width), nn.Linear(width, VOCAB, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        if self.where == "before_layers":
            torch._dynamo.graph_break()
        for layer in range(LAYERS):
            x = self.blocks[layer % len(self.blocks)](x)
            if self.where == "between_layers":
                torch._dynamo.graph_break()
        return self.unembed(self.ln_f(x))


def _build(where, **kw):
    torch.manual_seed(0)
    return _Breaking(where, **kw).eval()


# Break places where dynamo gives up the frame that runs the layer loop (a break inside the loop,
# directly or in a call from it, cannot be resumed there): that frame's own ops — the embedding,
# the final norm — run uncompiled.
SKIPS_THE_LOOP_FRAME = ("between_layers", "after_attention", "before_sdpa")


def _own_code(model):
    """The model with forward code objects of its own: dynamo's verdict on a frame (run it
    uncompiled) sticks to the code object for the process, so a model built after another one
    with a break in its loop would otherwise run its loop frame uncompiled too."""
    for module in model.modules():
        cls = type(module)
        if cls in (_Breaking, _Attention, _Block):
            f = cls.forward
            forward = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
            module.__class__ = type(cls.__name__, (cls,), {"forward": forward})
    return model


def _ids(batch=2, seq=6):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))


def _zeroed(model, module, call, head, nth=None):
    """The bare model's output with head `head`'s columns of `module`'s input zeroed (on its
    nth call only, when given)."""
    calls = []

    def pre(mod, args):
        calls.append(1)
        if nth is not None and len(calls) - 1 != nth:
            return None
        x = args[0].clone()
        x[..., head * HEAD_DIM:(head + 1) * HEAD_DIM] = 0.0
        return (x,)
    handle = module.register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            return call(model)
    finally:
        handle.remove()


def _inputs_of(modules, call):
    """call() with each module's first input recorded (every call of a module, in order)."""
    seen = []
    handles = [m.register_forward_pre_hook(lambda mod, args: seen.append(args[0])) for m in modules]
    try:
        with torch.no_grad():
            call()
        return seen
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("where", BREAKS)
def test_sites_after_a_graph_break_are_steered_recorded_and_exact(where):
    model, ids = _build(where), _ids()
    im = attnfx.instrument(model, backend="eager", example_inputs=ids)
    assert [(s.layer, s.module_path, s.o_proj) for s in im.sites] == [
        (n, f"blocks.{n}.attn", f"blocks.{n}.attn.o.weight") for n in range(LAYERS)]
    with torch.no_grad():
        bare = model(ids)
        assert torch.equal(im(ids), bare)
        for layer in range(LAYERS):               # one graph may serve every layer: each is told apart
            with im.steering.ablated(layer, 1):
                ablated = im(ids)
            assert_close(ablated, _zeroed(model, model.blocks[layer].attn.o, lambda m: m(ids), 1))
            assert not torch.equal(ablated, bare)
        with im.record("z") as rec:
            im(ids)
    z = _inputs_of([b.attn.o for b in model.blocks], lambda: model(ids))
    for recorded, expected in zip(rec["z"], z, strict=True):
        assert torch.equal(recorded.flatten(2), expected)
    compiled, graphs = counters["attnfx"]["graphs_compiled"], counters["stats"]["unique_graphs"]
    with torch.no_grad():
        for i in range(10):
            im.steering.scale(i % LAYERS, i % HEADS, 1 + i / 10)
            im(ids)
    im.steering.reset()
    assert (counters["attnfx"]["graphs_compiled"], counters["stats"]["unique_graphs"]) == (compiled, graphs)


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("where", BREAKS)
def test_relevance_rules_hold_across_a_graph_break(where, rule):
    """The rules reach the graphs without attention a break leaves (the MLP after an in-block
    break, the final norm after the last layer's: capture/ruled.py) and read the stream entering
    a resumed graph as the stream, not as inputs_embeds: every component found equals the same
    weights' relevance without a break. Where dynamo runs the layer loop's frame uncompiled, its
    own ops (the final norm) take the plain gradient: that is reported as a leak, and is one."""
    ids = _ids()
    whole = attnfx.relevance(attnfx.instrument(_own_code(_build(None)), backend="eager"), ids, 5, foil=9, rule=rule)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        broken = attnfx.relevance(attnfx.instrument(_own_code(_build(where)), backend="eager"), ids, 5, foil=9,
                                  rule=rule)
    assert broken.heads_per_position is not None and broken.attn is not None and whole.heads.abs().amax() > 0
    assert whole.leaks == []
    warned = any(issubclass(w.category, RelevanceLeakWarning) for w in caught)
    assert warned == bool(broken.leaks) == (where in SKIPS_THE_LOOP_FRAME)
    if where in SKIPS_THE_LOOP_FRAME:
        assert "ran in no compiled graph" in broken.leaks[-1]
        assert not torch.allclose(broken.heads_per_position, whole.heads_per_position)
        return
    assert broken.leaks == []
    for name in ("tokens", "heads_per_position", "attn", "mlp", "residual"):
        if getattr(broken, name) is not None:   # None: its pattern is in no graph (a stream split from its site)
            assert_close(getattr(broken, name), getattr(whole, name))


@pytest.mark.parametrize("where", BREAKS)
def test_direct_logit_attribution_across_a_graph_break(where):
    """Where the stream crosses graphs DLA follows it by a gradient along it (analysis/
    direct_path.py) and equals the unbroken model's walk of one graph; where part of the path runs
    uncompiled (the final norm in a loop frame dynamo gave up) or through a branch whose hidden
    activation is not found, it is refused, named, never approximated."""
    ids = _ids()
    whole = attnfx.logit_attribution(attnfx.instrument(_own_code(_build(None)), backend="eager"), ids, 5, foil=9)
    broken = attnfx.instrument(_own_code(_build(where)), backend="eager")
    if where in SKIPS_THE_LOOP_FRAME:
        with pytest.raises(UnsupportedModelError, match="not linear once its norms are frozen"):
            attnfx.logit_attribution(broken, ids, 5, foil=9)
        return
    got = attnfx.logit_attribution(broken, ids, 5, foil=9)
    for name in ("heads", "attn_bias", "mlp", "embed", "total"):
        assert_close(getattr(got, name), getattr(whole, name))
    assert_close(got.norm_bias + got.logit_bias + got.const, whole.norm_bias + whole.logit_bias + whole.const)
    assert got.heads.abs().amin() > 0


def test_new_lengths_after_a_graph_break_stay_exact():
    model = _build("between_layers")
    im = attnfx.instrument(model, backend="eager", example_inputs=_ids())
    for batch, seq in ((2, 9), (3, 5)):
        ids = _ids(batch, seq)
        with torch.no_grad():
            assert torch.equal(im(ids), model(ids))
            with im.steering.ablated(2, 3):
                ablated = im(ids)
        assert_close(ablated, _zeroed(model, model.blocks[2].attn.o, lambda m: m(ids), 3))


def test_one_module_applied_at_every_depth_counts_as_one_site_per_application():
    model, ids = _build("between_layers", shared=True), _ids()
    im = attnfx.instrument(model, backend="eager", example_inputs=ids)
    assert [(s.module_path, s.occurrence) for s in im.sites] == [("blocks.0.attn", n) for n in range(LAYERS)]
    o = model.blocks[0].attn.o
    with torch.no_grad():
        assert torch.equal(im(ids), model(ids))
        for layer in range(LAYERS):
            with im.steering.ablated(layer, 2):
                ablated = im(ids)
            assert_close(ablated, _zeroed(model, o, lambda m: m(ids), 2, nth=layer))


def test_aot_eager_after_a_graph_break_steers_and_passes_gradients():
    model, ids = _build("between_layers"), _ids()
    im = attnfx.instrument(model, backend="aot_eager", example_inputs=ids)
    with torch.no_grad():
        assert_close(im(ids), model(ids))
        with im.steering.ablated(1, 0):
            ablated = im(ids)
    assert_close(ablated, _zeroed(model, model.blocks[1].attn.o, lambda m: m(ids), 0))
    im(ids).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.skipif(not _api._ISOLATES_RECOMPILES,
                    reason="dynamo regions with their own recompile budget need torch >= 2.13")
def test_models_sharing_a_breaking_frame_keep_their_own_recompile_budget():
    """Nine models of one class but other widths: dynamo compiles the frame after the break once
    per width. Counted together they pass its recompile limit (8), past which dynamo would run
    that frame plain for good: attention uninstrumented. Each instrumented call keeps its own."""
    ids = _ids()
    for head_dim in range(4, 13):
        model = _build("after_attention", head_dim=head_dim)
        im = attnfx.instrument(model, backend="eager", example_inputs=ids)
        assert len(im.sites) == LAYERS
        with torch.no_grad():
            assert torch.equal(im(ids), model(ids))


class _Unparameterised(nn.Module):
    """q, k and v computed before a graph break, the output projection after the attention
    module returns: the graph holding SDPA reads no parameter that tells which layer runs it."""

    def __init__(self):
        super().__init__()
        width = HEADS * HEAD_DIM
        self.qkv, self.o = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        b, t, width = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        torch._dynamo.graph_break()
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_attention_whose_layer_cannot_be_told_raises_instead_of_running_plain():
    model = _Unparameterised()
    with pytest.raises(UninstrumentedExecutionError, match="cannot tell which layer"):
        attnfx.instrument(model, backend="eager", example_inputs=torch.randn(2, 5, HEADS * HEAD_DIM))


# ---- HF: DBRX's experts break the graph inside every decoder layer -----------------------------
def test_dbrx_without_cache_one_layer_graph_serves_both_layers():
    """Without a KV cache nothing tells DBRX's layers apart to dynamo's guards: the block's frame
    after the embedding is compiled once and called with each layer's parameters."""
    family = zoo.BY_NAME["dbrx"]
    model = zoo.build(family, "sdpa")
    kw = dict(zoo.inputs(family, model), use_cache=False)
    im = _instrumented_quietly(model, kw)
    assert [s.module_path for s in im.sites] == [f"transformer.blocks.{n}.norm_attn_norm.attn" for n in range(2)]
    projections = [model.get_submodule(s.o_proj.rsplit(".", 1)[0]) for s in im.sites]
    with torch.no_grad():
        assert torch.equal(im(**kw).logits, model(**kw).logits)
        for layer, projection in enumerate(projections):
            with im.steering.ablated(layer, 1):
                ablated = im(**kw).logits
            assert_close(ablated, _zeroed(model, projection, lambda m: m(**kw).logits, 1))
        with im.record("z") as rec:
            im(**kw)
    z = _inputs_of(projections, lambda: model(**kw))
    for recorded, expected in zip(rec["z"], z, strict=True):
        assert torch.equal(recorded.flatten(2), expected)


def test_dbrx_dla_names_the_graph_break_that_hides_the_unembedding():
    """zoo.GAPS' dbrx/dla: the typed error says why — the experts' activations, in graphs of their
    own, are not held constant — not that the model has no unembedding."""
    family = zoo.BY_NAME["dbrx"]
    model = zoo.build(family, "sdpa")
    kw = zoo.inputs(family, model)
    im = _instrumented_quietly(model, kw)
    with pytest.raises(UnsupportedModelError, match=r"not linear once its norms are frozen.*silu in activation_fn"):
        attnfx.head_attribution(im, kw, torch.tensor([5, 9]))


def _instrumented_quietly(model, kw):
    """HF warns about its own graph breaks and flex on CPU; the tests check outputs, not those."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return attnfx.instrument(model, backend="eager", example_inputs=kw)


# ---- HF: the flex interface builds its padding mask with a data-dependent branch -----------------
@pytest.mark.skipif(not _api._ISOLATES_RECOMPILES, reason="known gap: HF flex_attention on torch 2.11 finds a third "
                    "site frame (issue 13 closing note); supported from torch 2.13")
def test_llama_flex_attention_after_the_mask_break_is_exact_recorded_and_compiles_once():
    """Both layers run in the graph resumed after the mask; the bare model runs flex attention
    through torch.compile, which the eager backend replays (capture/flex_kernel.py): bit for bit."""
    family = zoo.BY_NAME["llama"]
    model = zoo.build(family, "flex_attention")
    kw = zoo.inputs(family, model)
    im = _instrumented_quietly(model, kw)
    assert [s.module_path for s in im.sites] == [f"model.layers.{n}.self_attn" for n in range(2)]
    projections = [model.get_submodule(s.o_proj.rsplit(".", 1)[0]) for s in im.sites]
    with torch.no_grad():
        assert torch.equal(im(**kw).logits, model(**kw).logits)
        with im.record("z") as rec:
            im(**kw)
    z = _inputs_of(projections, lambda: model(**kw))
    for recorded, expected in zip(rec["z"], z, strict=True):
        assert torch.equal(recorded.flatten(2), expected)
    compiled = counters["attnfx"]["graphs_compiled"]
    with torch.no_grad():
        for i in range(4):
            im.steering.scale(i % 2, i // 2, 0.5, on="value")         # 2 layers, 2 kv heads
            im(**kw)
    im.steering.reset()
    assert counters["attnfx"]["graphs_compiled"] == compiled
