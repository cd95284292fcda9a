"""Patching: exact activation patching against a manual patch, batching, and the gradient
estimates (AtP, RelP, AtP*) against the exact effect where theory says they are exact."""
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import attnfx
from _tol import TOL
from attnfx import metrics, patching
from attnfx.errors import InvalidArgumentError, ShapeMismatchError
from models import FAMILIES, VOCAB, PlainAttention, build, output_tensor


class AttentionOnly(nn.Module):
    """embed → x + attention(x) → unembed: the logits are linear in every head output."""

    def __init__(self, heads=4, kv_heads=2, head_dim=8, handwritten=False):
        super().__init__()
        d = heads * head_dim
        self.embed = nn.Embedding(VOCAB, d)
        self.attn = PlainAttention(d, heads, kv_heads, bias=True, causal=True, handwritten=handwritten,
                                   gqa_mode="enable_gqa")
        self.unembed = nn.Linear(d, VOCAB, bias=False)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        return self.unembed(x + self.attn(x, torch.ones_like(input_ids)))


def _pair(batch=3, seq=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ({"input_ids": torch.randint(1, VOCAB, (batch, seq), generator=g)},
            {"input_ids": torch.randint(1, VOCAB, (batch, seq), generator=g)})


def _attention_only(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    model = AttentionOnly(**kw).to(dtype)
    clean, corrupt = _pair()
    return attnfx.instrument(model, example_inputs=clean), clean, corrupt


# ---- exact activation patching ---------------------------------------------------------------
def test_patching_one_head_equals_a_manual_patch():
    model = build(FAMILIES["llama"], layers=2, heads=4, kv_heads=2, head_dim=8)
    im = attnfx.instrument(model)
    clean, corrupt = _pair()
    metric = metrics.logit_diff(5, 9)
    result = patching.activation_patching(im, clean, corrupt, metric, "heads", progress=False)
    with torch.no_grad(), im.record("z") as rec:
        im(**corrupt)
    source = rec["z"][1][:, :, 2]                                  # layer 1, head 2: [b, t, d]
    o_proj = model.model.layers[1].self_attn.o_proj

    def patch(module, args):
        x = args[0].clone()
        x[..., 2 * 8:3 * 8] = source
        return (x,)

    with torch.no_grad():
        base = metric(output_tensor(model(**clean)))
        handle = o_proj.register_forward_pre_hook(patch)
        patched = metric(output_tensor(model(**clean)))
        handle.remove()
    torch.testing.assert_close(result.scores[1, 2], (patched - base).mean(), rtol=TOL[torch.float32],
                               atol=TOL[torch.float32])
    assert result.scores.shape == (2, 4) and result.dims == ("layer", "head")


@pytest.mark.parametrize("component", ["heads", "resid", "keys"])
def test_batched_and_unbatched_patching_agree(component):
    im, clean, corrupt = _attention_only(torch.float32)
    metric = metrics.logit_diff(5, 9)
    one = patching.activation_patching(im, clean, corrupt, metric, component, per_position=True,
                                       rows_per_forward=3, progress=False)
    before = counters["attnfx"]["graphs_compiled"]
    many = patching.activation_patching(im, clean, corrupt, metric, component, per_position=True,
                                        rows_per_forward=3 * 7, progress=False)
    assert counters["attnfx"]["graphs_compiled"] - before <= 1          # one shape per call, padded chunks
    torch.testing.assert_close(many.scores, one.scores, rtol=TOL[torch.float32], atol=TOL[torch.float32])


def test_patching_every_position_of_the_residual_stream_is_the_corrupt_run():
    im, clean, corrupt = _attention_only(torch.float32)
    metric = metrics.logit_diff(5, 9)
    result = patching.activation_patching(im, clean, corrupt, metric, "resid", progress=False)
    torch.testing.assert_close(result.scores[0], (result.corrupt - result.clean).mean(), rtol=1e-5, atol=1e-5)


# ---- gradient estimates against the exact effect ------------------------------------------------
@pytest.mark.parametrize("component", ["heads", "attn"])
def test_atp_is_exact_where_the_metric_is_linear_in_the_component(component):
    im, clean, corrupt = _attention_only()
    metric = metrics.logit_diff(5, 9)
    exact = patching.activation_patching(im, clean, corrupt, metric, component, progress=False)
    atp = patching.attribution_patching(im, clean, corrupt, metric, component)
    torch.testing.assert_close(atp.scores, exact.scores, rtol=1e-9, atol=1e-12)
    assert (atp.forwards, atp.backwards) == (2, 1)


def test_relp_equals_atp_without_nonlinearities_or_norms_and_halves_values():
    """Downstream of the attention the model is linear: RelP's coefficients are the gradient.
    Through A·V the uniform rule halves v's coefficient exactly."""
    im, clean, corrupt = _attention_only()
    metric = metrics.logit_diff(5, 9)
    for component in ("heads", "attn"):
        torch.testing.assert_close(patching.relp(im, clean, corrupt, metric, component).scores,
                                   patching.attribution_patching(im, clean, corrupt, metric, component).scores,
                                   rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(patching.relp(im, clean, corrupt, metric, "values").scores,
                               patching.attribution_patching(im, clean, corrupt, metric, "values").scores / 2,
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("component", ["queries", "keys"])
def test_relp_under_cp_lrp_refuses_queries_and_keys(component):
    """CP-LRP detaches q and k, so they have no relevance coefficient: a typed error that says so,
    not autograd's "appears to not have been used in the graph"."""
    im, clean, corrupt = _attention_only(torch.float32)
    with pytest.raises(InvalidArgumentError, match="CP-LRP detaches"):
        patching.relp(im, clean, corrupt, metrics.logit_diff(5, 9), component, rule="cp-lrp")
    patching.relp(im, clean, corrupt, metrics.logit_diff(5, 9), component)       # AttnLRP has them


@pytest.mark.parametrize("handwritten", [False, True])
@pytest.mark.parametrize("component", ["keys", "queries"])
def test_qk_fix_equals_the_exact_effect_of_one_query_or_key(component, handwritten):
    im, clean, corrupt = _attention_only(handwritten=handwritten)
    metric = metrics.logit_diff(5, 9)
    exact = patching.activation_patching(im, clean, corrupt, metric, component, per_position=True, progress=False)
    star = patching.atp_star(im, clean, corrupt, metric, component, per_position=True, graddrop=False)
    atp = patching.attribution_patching(im, clean, corrupt, metric, component, per_position=True)
    torch.testing.assert_close(star.signed, exact.scores, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(atp.scores, exact.scores, rtol=1e-3, atol=1e-6)      # the softmax is not linear


def test_graddrop_leaves_the_last_layers_estimates_as_their_magnitude():
    """Dropping an earlier layer's gradient does not change the gradient at a later component
    (one example, so the mean of |estimates| is |estimate|)."""
    model = build(FAMILIES["llama"], layers=2, heads=4, kv_heads=2, head_dim=8)
    im = attnfx.instrument(model)
    clean, corrupt = _pair(batch=1)
    metric = metrics.logit_diff(5, 9)
    star = patching.atp_star(im, clean, corrupt, metric, "heads")
    atp = patching.attribution_patching(im, clean, corrupt, metric, "heads")
    torch.testing.assert_close(star.scores[1], atp.scores[1].abs(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(star.signed, atp.scores, rtol=1e-5, atol=1e-7)
    assert (star.forwards, star.backwards) == (4, 3)


# ---- compiled, metrics, errors --------------------------------------------------------------------
def test_compiled_patching_equals_eager():
    model = build(FAMILIES["gpt2"], layers=2, heads=4, head_dim=8)
    clean, corrupt = _pair()
    metric = metrics.logit_diff(5, 9)
    results = []
    for backend in ("eager", "aot_eager"):
        im = attnfx.instrument(model, backend=backend)
        results.append((patching.activation_patching(im, clean, corrupt, metric, "mlp", progress=False),
                        patching.relp(im, clean, corrupt, metric, "mlp")))
        im.uninstrument()
    for a, b in zip(*results):
        torch.testing.assert_close(b.scores, a.scores, rtol=TOL[torch.float32], atol=TOL[torch.float32])


def test_metrics():
    torch.manual_seed(0)
    clean, corrupt = torch.randn(2, 4, 10), torch.randn(2, 4, 10)
    normalized = metrics.normalized_logit_diff([1, 2], [3, 4], clean, corrupt)
    torch.testing.assert_close(normalized(clean), torch.ones(2))
    torch.testing.assert_close(normalized(corrupt), torch.zeros(2))
    torch.testing.assert_close(metrics.kl_to_clean(clean)(clean), torch.zeros(2))
    assert bool((metrics.kl_to_clean(clean)(corrupt) > 0).all())
    torch.testing.assert_close(metrics.target_prob(3)(clean), clean[:, -1].softmax(-1)[:, 3])
    with pytest.raises(ShapeMismatchError, match="one per example"):
        metrics.logit_diff([1, 2, 3], 4)(clean)
    with pytest.raises(InvalidArgumentError, match="token ids"):
        metrics.logit_diff(1, 40)(clean)


def test_bad_arguments_raise_typed_errors(tmp_path):
    im, clean, corrupt = _attention_only(torch.float32)
    metric = metrics.logit_diff(5, 9)
    with pytest.raises(InvalidArgumentError, match="components"):
        patching.activation_patching(im, clean, corrupt, metric, "neurons")
    with pytest.raises(ShapeMismatchError, match="share"):
        patching.attribution_patching(im, clean, {"input_ids": corrupt["input_ids"][:, :4]}, metric)
    with pytest.raises(InvalidArgumentError, match="'mlp'"):
        patching.attribution_patching(im, clean, corrupt, metric, "mlp")         # this model has none
    path = patching.attribution_patching(im, clean, corrupt, metric, "heads", per_position=True).plot(
        tmp_path / "heads.png")
    assert path.stat().st_size > 0
