"""The HF zoo matrix of issue 13: every (family, implementation) of tests/zoo.py, each capability
checked against a plain-torch reference written here from the model's own modules (hooks on the
output projection, the final norm, the unembedding):

* sites       one site per attention computation;
* identity    the unsteered instrumented model (eager backend) is bit-exact to the bare one;
* recording   recorded z equals the output projection's input;
* steering    zero-ablating a head and value-ablating a kv head equal a pre-hook zeroing that
              head's / group's columns of the output projection's input;
* recompiles  10 steering changes compile no graph;
* generate    greedy im.generate equals model.generate token for token (left-padded batch);
* dla         head_attribution equals per-head contributions through every norm on the direct
              path (post-block norms, the final norm), frozen at this input, and the logit scale;
* relevance   per-head relevance (rule "gradient") equals z_h · ∂target/∂z_h by autograd;
* patching    activation patching of one head equals a pre-hook patching the corrupt z in.

Which capability runs where is zoo.checked (sites, identity and steering under every
implementation; the rest under the primary one, the analyses for zoo.ANALYSED). Each (family,
implementation) is built and instrumented once per session; known gaps are zoo.GAPS, applied as
strict xfails. README's support table is rendered from the same data (tests/support_table.py)."""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch._dynamo.utils import counters
from transformers.pytorch_utils import Conv1D

import attnfx
import support_table
from attnfx.analysis.direct_path import attribution_across_graphs
from attnfx.errors import UnsupportedModelError
from attnfx.graph.calls import as_call, last_positions
from attnfx.state.indices import padded_stack
import zoo
from _tol import assert_close
from attnfx import metrics, patching

TARGETS, FOILS = torch.tensor([5, 9]), torch.tensor([11, 3])


def _main(out) -> torch.Tensor:
    """The model's main output: logits, or the last hidden state of a backbone."""
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


@dataclass
class Built:
    family: zoo.Family
    model: torch.nn.Module
    im: object
    kw: dict
    bare: torch.Tensor                     # the bare model's main output
    z: list                                # per site: the output projection's input [b, t, H·d]

    def o_proj(self, layer: int) -> torch.nn.Module:
        return self.model.get_submodule(self.im.sites[layer].o_proj.rsplit(".", 1)[0])


_BUILT: dict[tuple[str, str], Built | BaseException] = {}


def _capture_inputs(modules, run):
    """run() with a pre-hook on each module recording its first input; returns (result, inputs)."""
    seen = [None] * len(modules)
    handles = [m.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0]))
               for i, m in enumerate(modules)]
    try:
        return run(), seen
    finally:
        for h in handles:
            h.remove()


def built(family: zoo.Family, implementation: str) -> Built:
    """The family built and instrumented once per session (a failure is kept and re-raised)."""
    key = (family.name, implementation)
    if key not in _BUILT:
        try:
            _BUILT[key] = _build(family, implementation)
        except Exception as error:            # kept: each capability of a broken build fails alike
            _BUILT[key] = error
    value = _BUILT[key]
    if isinstance(value, BaseException):
        raise value
    return value


def _build(family, implementation) -> Built:
    model = zoo.build(family, implementation)
    kw = zoo.inputs(family, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        im = attnfx.instrument(model, backend="eager", example_inputs=kw)
    modules = [model.get_submodule(s.o_proj.rsplit(".", 1)[0]) if s.o_proj else torch.nn.Identity()
               for s in im.sites]
    with torch.no_grad():
        bare, z = _capture_inputs(modules, lambda: _main(model(**kw)))
    return Built(family, model, im, kw, bare, z)


# ---- the checks ------------------------------------------------------------------------------------
def check_sites(b: Built):
    assert len(b.im.sites) == b.family.attention_layers


def check_identity(b: Built):
    with torch.no_grad():
        assert torch.equal(_main(b.im(**b.kw)), b.bare)


def check_recording(b: Built):
    """z equals the output projection's input (where a gate sits between them, z is pre-gate);
    a head's contribution equals its columns of that input through its W_O columns."""
    last = len(b.im.sites) - 1
    heads = [(last, h) for h in range(b.im.sites[last].num_heads)]
    with torch.no_grad(), b.im.record("z", "contrib", heads=heads) as rec:
        b.im(**b.kw)
    for layer, (z, site) in enumerate(zip(b.z, b.im.sites)):
        if not site.gated:
            assert_close(rec["z"][layer].flatten(2), z, equal_nan=True)
    site, o_proj = b.im.sites[last], b.o_proj(last)
    weight = o_proj.weight.T if isinstance(o_proj, Conv1D) else o_proj.weight          # [d_model, H·d]
    for _, h in heads:
        columns = slice(h * site.head_dim, (h + 1) * site.head_dim)
        assert_close(rec["contrib"][(last, h)], b.z[last][..., columns] @ weight[:, columns].T, equal_nan=True)


def _zeroed_columns(b: Built, layer: int, columns: slice) -> torch.Tensor:
    """The bare model's output with `columns` of site `layer`'s output-projection input zeroed."""
    def pre(module, args):
        x = args[0].clone()
        x[..., columns] = 0.0
        return (x, *args[1:])
    handle = b.o_proj(layer).register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            return _main(b.model(**b.kw))
    finally:
        handle.remove()


def check_steering(b: Built):
    layer = len(b.im.sites) - 1
    site = b.im.sites[layer]
    assert site.o_proj is not None, f"site {layer} has no output projection"
    d, group = site.head_dim, site.num_heads // site.num_kv_heads
    with torch.no_grad(), b.im.steering.ablated(layer, 1):
        ablated = _main(b.im(**b.kw))
    assert_close(ablated, _zeroed_columns(b, layer, slice(d, 2 * d)), equal_nan=True)
    b.im.steering.scale(layer, 0, 0.0, on="value")
    try:
        with torch.no_grad():
            value_ablated = _main(b.im(**b.kw))
    finally:
        b.im.steering.reset()
    assert_close(value_ablated, _zeroed_columns(b, layer, slice(0, group * d)), equal_nan=True)
    assert not torch.equal(ablated, b.bare)


def check_recompiles(b: Built):
    sites = b.im.sites
    with torch.no_grad():
        b.im(**b.kw)            # compiled here when no other check of this build ran first (xdist)
    before = counters["attnfx"]["graphs_compiled"]
    with torch.no_grad():
        for i in range(10):
            b.im.steering.scale(i % len(sites), i % sites[0].num_heads, 1 + i / 10)
            b.im(**b.kw)
    b.im.steering.reset()
    assert counters["attnfx"]["graphs_compiled"] == before


def check_generate(b: Built):
    kw = {k: v for k, v in b.kw.items() if not k.startswith("decoder_")}
    options = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = b.model.generate(**kw, **options)
        got = b.im.generate(**kw, **options)
    assert torch.equal(got, want)


def check_dla(b: Built):
    dla = attnfx.head_attribution(b.im, b.kw, TARGETS, foil=FOILS, reduce="none")
    assert_close(dla, _explicit_dla(b))


def check_relevance(b: Built):
    def target(out):
        return _main(out)[:, -1, :3].sum(-1)
    rel = attnfx.relevance(b.im, b.kw, target, rule="gradient", components=("heads",))
    modules = [b.o_proj(layer) for layer in range(len(b.im.sites))]
    with torch.enable_grad():
        value, z = _capture_inputs(modules, lambda: target(b.model(**b.kw)))
        grads = torch.autograd.grad(value.sum(), z)
    site = b.im.sites[0]
    heads = [(zl * gl).unflatten(-1, (site.num_heads, site.head_dim)).sum(-1) for zl, gl in zip(z, grads)]
    assert_close(rel.target, value.detach())
    # [b, t, L, H]; an encoder-decoder's layers see their own lengths: NaN past a layer's positions
    assert_close(rel.heads_per_position, padded_stack(heads, dim=2, fill=float("nan")), equal_nan=True)


def _corrupt(kw: dict) -> dict:
    """Other token ids (shifted by one position) or other features, the same masks."""
    gen = torch.Generator().manual_seed(1)
    out = dict(kw)
    for name, value in kw.items():
        if name == "input_ids":
            out[name] = value.roll(1, dims=1)
        elif value.is_floating_point():
            out[name] = torch.randn(value.shape, generator=gen)
    return out


def check_patching(b: Built):
    layer, head, d = len(b.im.sites) - 1, 1, b.im.sites[-1].head_dim
    corrupt = _corrupt(b.kw)
    metric = metrics.logit_diff(5, 9)
    result = patching.activation_patching(b.im, b.kw, corrupt, metric, "heads", progress=False)
    module = b.o_proj(layer)
    with torch.no_grad():
        _, (source,) = _capture_inputs([module], lambda: b.model(**corrupt))

    def patch(mod, args):
        x = args[0].clone()
        x[..., head * d:(head + 1) * d] = source[..., head * d:(head + 1) * d]
        return (x, *args[1:])
    handle = module.register_forward_pre_hook(patch)
    try:
        with torch.no_grad():
            patched = metric(_main(b.model(**b.kw)))
    finally:
        handle.remove()
    assert_close(result.scores[layer, head], (patched - metric(b.bare)).mean())


CHECKS = {name: globals()[f"check_{name}"] for name in zoo.CAPABILITIES}


# ---- the reference DLA, from the model's modules -------------------------------------------------
def _leaf_io(model, kw) -> tuple[torch.Tensor, dict]:
    """One bare forward: its main output and, per leaf module, (module, first input, output)."""
    seen = {}

    def keep(name, module):
        def hook(mod, args, out):
            seen.setdefault(name, (module, args[0] if args else None, out))
        return hook
    hooks = [m.register_forward_hook(keep(name, m)) for name, m in model.named_modules()
             if next(m.children(), None) is None]
    try:
        with torch.no_grad():
            return _main(model(**kw)), seen
    finally:
        for h in hooks:
            h.remove()


def _same_values(a, b) -> bool:
    return isinstance(b, torch.Tensor) and torch.equal(a, b)


def _same_tensor(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.data_ptr() == b.data_ptr()
            and a.shape == b.shape)


def _frozen_norm(norm: torch.nn.Module, x: torch.Tensor):
    """The norm linearised at rows x [n, d]: c ↦ γ ⊙ P(c) / σ(x), with P centring for a LayerNorm.
    Kind, γ (w or 1+w alike) and ε are read off the module's outputs, not its class: a norm's
    output at 0 is its bias β; a constant row is centred away by a LayerNorm only; on an
    alternating ±s row (mean 0, mean square s²) it gives γ·s/√(s²+ε)."""
    d = x.shape[-1]
    sign = torch.ones(d, dtype=x.dtype).index_fill(0, torch.arange(1, d, 2), -1.0)
    with torch.no_grad():
        beta = norm(torch.zeros(1, d))[0]
        centred = torch.allclose(norm(torch.ones(1, d))[0], beta)
        unit, small = ((norm(s * sign[None])[0] - beta) * sign for s in (1.0, 1e-3))
        i = unit.abs().argmax()
        ratio = float(unit[i] / small[i] * 1e-3) ** 2               # (s₂² + ε) / (s₁² + ε): s₁ = 1, s₂ = 1e-3
        eps = (1e-6 - ratio) / (ratio - 1)
        gamma = unit * (1 + eps) ** 0.5
        centre = x - x.mean(-1, keepdim=True) if centred else x
        sigma = (centre.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        # the reading must reproduce the norm at x, or this reference does not describe it
        assert_close(gamma * centre / sigma + beta, norm(x))

    def apply(c):                                                   # c: [n, ..., d], rows of x first
        c = c - c.mean(-1, keepdim=True) if centred else c
        return gamma * c / sigma.view(-1, *([1] * (c.dim() - 2)), 1)
    return apply


def _explicit_dla(b: Built) -> torch.Tensor:
    """[b, L, H]: each head's z_h W_O,hᵀ at the last position through the post-block norm fed by
    the output projection (if any), the final norm (the module whose output the unembedding
    reads), the unembedding and the logit scale, every norm frozen at this input; target minus foil."""
    sites, unembed = b.im.sites, b.model.get_output_embeddings()
    logits, seen = _leaf_io(b.model, b.kw)
    _, head_in, head_out = next(v for v in seen.values() if v[0] is unembed)
    final = next(v for v in seen.values() if v[0] is not unembed and _same_tensor(v[2], head_in))
    final_norm = _frozen_norm(final[0], final[1][:, -1])
    scale = (logits * head_out).sum() / head_out.pow(2).sum()       # logits = scale · unembed(x)
    assert_close(logits, scale * head_out)
    direction = unembed.weight.detach()[TARGETS] - unembed.weight.detach()[FOILS]      # [b, d_model]
    out = torch.zeros(logits.shape[0], len(sites), sites[0].num_heads)
    for layer, site in enumerate(sites):
        op = b.o_proj(layer)
        w = op.weight.detach().T if isinstance(op, Conv1D) else op.weight.detach()   # [d_model, H·d]
        z = b.z[layer][:, -1].unflatten(-1, (site.num_heads, site.head_dim))          # [b, H, d]
        contrib = torch.einsum("bhd,mhd->bhm", z, w.unflatten(1, (site.num_heads, site.head_dim)))
        o_out = next(v[2] for v in seen.values() if v[0] is op)
        for module, inp, output in seen.values():                  # a post-block norm reads o_proj's output
            if module is not op and _same_tensor(inp, o_out) and not _same_values(inp, output):
                contrib = _frozen_norm(module, inp[:, -1])(contrib)
        out[:, layer] = scale * (final_norm(contrib) * direction[:, None]).sum(-1)
    return out


# ---- the matrix -----------------------------------------------------------------------------------
def _param(family, implementation, capability):
    reason = zoo.gap(family, implementation, capability)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(family, implementation, capability, marks=marks,
                        id=f"{family.name}-{implementation}-{capability}")


@pytest.mark.parametrize("family, implementation, capability", [_param(*case) for case in zoo.cases()])
def test_zoo(family, implementation, capability):
    CHECKS[capability](built(family, implementation))


# Decoders whose path from the heads to the logits is not linear once its norms are frozen, beyond
# what one graph's walk can hold apart (MoE experts, whose hidden activations are not found; a
# soft-cap; a GELU as an autograd.Function; Mamba's convolution), and an op the refusal names.
NOT_LINEAR_BY_GRADIENT = {"bloom": "gelu_impl", "gemma2": "tanh", "jamba": "conv1d", "mixtral": "mlp.experts",
                          "qwen2_moe": "mlp.shared_expert", "qwen3_moe": "mlp.experts", "qwen3_next": "mlp.shared_expert",
                          "deepseek_v3": "mlp.experts", "gpt_oss": "mlp.experts", "dbrx": "activation_fn"}
DECODERS = [family for family in zoo.FAMILIES if zoo.not_applicable(family, "dla") is None]


@pytest.mark.parametrize("family", DECODERS, ids=lambda family: family.name)
def test_dla_by_the_direct_path_gradient_equals_the_walk_of_one_graph(family):
    """The gradient DLA takes where the stream crosses graphs (analysis/direct_path.py: branches'
    reads held constant, norms' σ frozen) forced on a model in one graph: every component equals
    the single-graph walk (fp32 round-off; biases summed), or the path is refused, naming the op."""
    b = built(family, zoo.primary(family))
    positions = last_positions(*as_call(b.kw), b.model.forward)
    targets, foils = TARGETS, FOILS
    if family.name in NOT_LINEAR_BY_GRADIENT:
        with pytest.raises(UnsupportedModelError, match=f"not linear once its norms are frozen.*"
                                                        f"{re.escape(NOT_LINEAR_BY_GRADIENT[family.name])}"):
            attribution_across_graphs(b.im, b.kw, targets, foils, positions)
        return
    got = attribution_across_graphs(b.im, b.kw, targets, foils, positions)
    walk = attnfx.logit_attribution(b.im, b.kw, TARGETS, foil=FOILS)
    for name in ("heads", "attn_bias", "mlp", "embed", "total"):
        assert_close(got[name], getattr(walk, name))
    assert_close(got["norm_bias"], walk.norm_bias + walk.logit_bias + walk.const)
    assert torch.equal(got["direct"], walk.direct)


@pytest.mark.parametrize("page", support_table.PAGES, ids=lambda page: page.name)
def test_support_table_is_rendered_from_the_zoo(page):
    assert support_table.in_readme(page.read_text()) == support_table.render(), (
        f"{page.name}'s support table is stale: run `{support_table.WRITE}` (make support-table)")
