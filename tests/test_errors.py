"""Bad input gets a typed error naming what was expected; the model (and the steering state)
is untouched after every one."""
import pytest
import torch
from torch import nn

import attnfx
from attnfx import errors as E
from models import FAMILIES, build


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, dict(model.__dict__), model.forward)


def _assert_untouched(model, snap):
    state, attrs, forward = snap
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)
    assert model.__dict__.keys() == attrs.keys() and "forward" not in model.__dict__
    assert model.forward == forward


@pytest.fixture(scope="module")
def llama():
    model = build(FAMILIES["llama"], layers=2, heads=4, kv_heads=2)
    return model, attnfx.instrument(model)


IDS = torch.randint(1, 64, (2, 6))

# (name, call(model, im) -> raises, expected error, message fragment)
CASES = [
    ("not a module", lambda m, im: attnfx.instrument("gpt2"), E.UnsupportedModelError, "nn.Module"),
    ("no attention", lambda m, im: attnfx.instrument(nn.Sequential(nn.Linear(4, 4)), example_inputs=torch.ones(1, 4)),
     E.NoAttentionFoundError, "sdpa_call"),
    ("unknown backend", lambda m, im: attnfx.instrument(nn.Linear(2, 2), backend="tpu"), E.InvalidArgumentError, "inductor"),
    ("wrap the wrapper", lambda m, im: attnfx.instrument(im), E.AlreadyInstrumentedError, "already"),
    ("instrument twice", lambda m, im: attnfx.instrument(m), E.AlreadyInstrumentedError, "uninstrument"),
    ("layer out of range", lambda m, im: im.steering.scale(2, 0, 2.0), E.SiteIndexError, "0..1"),
    ("head out of range", lambda m, im: im.steering.scale(0, 4, 2.0), E.SiteIndexError, "0..3"),
    ("kv head out of range", lambda m, im: im.steering.scale(0, 2, 2.0, on="value"), E.SiteIndexError, "kv head"),
    ("negative head past the end", lambda m, im: im.steering.ablate(0, -5), E.SiteIndexError, "-4..-1"),
    ("non-int index", lambda m, im: im.steering.scale(0, "h1", 2.0), E.SiteIndexError, "int"),
    ("one bad head in a list", lambda m, im: im.steering.scale(0, [0, 9], 2.0), E.SiteIndexError, "head 9"),
    ("NaN factor", lambda m, im: im.steering.scale(0, 0, float("nan")), E.SteeringValueError, "finite"),
    ("inf factor", lambda m, im: im.steering.scale(0, 0, torch.tensor(float("inf"))), E.SteeringValueError, "finite"),
    ("unknown target", lambda m, im: im.steering.scale(0, 0, 2.0, on="keys"), E.InvalidArgumentError, "query"),
    ("unknown ablation", lambda m, im: im.steering.ablate(0, 0, how="random"), E.InvalidArgumentError, "mean"),
    ("mean without reference", lambda m, im: im.steering.ablate(0, 0, how="mean"), E.SteeringValueError, "reference"),
    ("patch wrong head_dim", lambda m, im: im.steering.patch(0, 0, torch.randn(2, 6, 5)), E.ShapeMismatchError, "head_dim 8"),
    ("patch int dtype", lambda m, im: im.steering.patch(0, 0, torch.ones(2, 6, 8, dtype=torch.long)),
     E.DTypeMismatchError, "floating"),
    ("patch NaN", lambda m, im: im.steering.patch(0, 0, torch.full((2, 6, 8), float("nan"))), E.SteeringValueError, "NaN"),
    ("patch on another device", lambda m, im: im.steering.patch(0, 0, torch.randn(2, 6, 8, device="meta")),
     E.DeviceMismatchError, "meta"),
    ("input on another device", lambda m, im: im(input_ids=torch.ones(2, 6, dtype=torch.long, device="meta")),
     E.DeviceMismatchError, "meta"),
    ("unknown record kind", lambda m, im: im.record("attention_pattern"), E.InvalidArgumentError, "readout"),
    ("readout without directions", lambda m, im: im.record("readout"), E.InvalidArgumentError, "directions"),
    ("readout wrong width", lambda m, im: im.record("readout", directions=torch.randn(2, 31)), E.ShapeMismatchError, "32"),
    ("contrib head out of range", lambda m, im: im.record("contrib", heads=[(0, 7)]), E.SiteIndexError, "head 7"),
    ("target outside vocab", lambda m, im: attnfx.head_attribution(im, {"input_ids": IDS}, target=999),
     E.InvalidArgumentError, "[0, 64)"),
    ("bad reduce", lambda m, im: attnfx.head_attribution(im, {"input_ids": IDS}, target=1, reduce="max"),
     E.InvalidArgumentError, "reduce"),
]


@pytest.mark.parametrize("name, call, error, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_typed_error_and_touches_nothing(llama, name, call, error, fragment):
    model, im = llama
    im.steering.reset()
    im.steering.scale(1, 1, 3.0)
    snap, state = _snapshot(model), {n: b.clone() for n, b in im.named_buffers() if not n.startswith("model.")}
    with pytest.raises(error) as info:
        call(model, im)
    assert isinstance(info.value, E.AttnfxError)
    assert fragment in str(info.value)
    _assert_untouched(model, snap)
    now = {n: b for n, b in im.named_buffers() if not n.startswith("model.")}
    assert all(torch.equal(now[n], state[n]) for n in state)       # nothing half-mutated
    im.steering.reset()


def test_patch_shape_must_match_the_call():
    model = build(FAMILIES["gpt2"], layers=1, heads=2)
    im = attnfx.instrument(model)
    im.steering.patch(0, 1, torch.randn(2, 6, 8))
    with pytest.raises(E.ShapeMismatchError, match=r"\(2, 6\)"):
        im(input_ids=torch.randint(1, 64, (2, 7)))


def test_no_final_norm_means_no_head_attribution():
    im = attnfx.instrument(build(FAMILIES["bert"], layers=1, heads=2))
    with pytest.raises(E.UnsupportedModelError, match="unembedding"):
        attnfx.head_attribution(im, {"input_ids": IDS}, target=1)


def test_steering_before_sites_are_known():
    im = attnfx.instrument(build(FAMILIES["plain_sdpa"], layers=1, heads=2))
    with pytest.raises(E.NotDiscoveredError, match="example_inputs"):
        im.steering.scale(0, 0, 2.0)
    im(input_ids=IDS)
    im.steering.scale(0, 0, 2.0)


def test_nested_recordings_are_refused():
    model = build(FAMILIES["gpt2"], layers=1, heads=2)
    im = attnfx.instrument(model)
    with im.record("z"):
        with pytest.raises(E.InvalidArgumentError, match="already active"):
            with im.record("z"):
                pass


def test_using_a_model_after_uninstrumenting():
    model = build(FAMILIES["gpt2"], layers=1, heads=2)
    snap = _snapshot(model)
    im = attnfx.instrument(model)
    im.steering.scale(0, 0, 0.0)
    with torch.no_grad():
        im(input_ids=IDS)
    assert im.uninstrument() is model
    _assert_untouched(model, snap)
    for use in (lambda: im(input_ids=IDS), lambda: im.steering.scale(0, 0, 1.0), lambda: im.record("z"),
                lambda: im.generate(IDS, max_new_tokens=1), lambda: im.uninstrument()):
        with pytest.raises(E.DetachedError, match="instrument"):
            use()
    again = attnfx.instrument(model)             # a detached model can be instrumented again
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=IDS).logits, model(input_ids=IDS).logits, atol=0, rtol=0)


def test_a_recompile_limit_hit_while_capturing_is_named_not_called_no_attention():
    """Frames dynamo refuses for its recompile limit run uncompiled: the error says so (it read
    'no attention found' or 'skipped or disabled' before), and the model keeps its forward."""
    model = build(FAMILIES["llama"], layers=1, heads=4, kv_heads=2)
    snap = _snapshot(model)
    im = attnfx.instrument(model)
    with torch._dynamo.config.patch(recompile_limit=0), pytest.raises(E.UninstrumentedExecutionError,
                                                                       match="recompile limit"):
        im(IDS)
    im.uninstrument()
    _assert_untouched(model, snap)
