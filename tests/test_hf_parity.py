"""HF parity (issue 12): with nothing steered, the instrumented model answers every ordinary HF
call as the bare model does; with steering set, those calls are steered."""
import numpy as np
import pytest
import torch

import attnfx
from _tol import assert_close
from models import FAMILIES, build

GREEDY = dict(do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)


def _left_padded(batch=3, seq=7):
    ids = torch.randint(1, 64, (batch, seq))
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, :2 * row] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_left_padded_greedy_generation_equals_the_model(family):
    model = build(FAMILIES[family], layers=2, heads=4, kv_heads=2).eval()
    im = attnfx.instrument(model)
    ids, mask = _left_padded()
    expected = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    assert torch.equal(im.generate(input_ids=ids, attention_mask=mask, **GREEDY), expected)


def _assert_loss_and_grads_equal(model, im, ids):
    out = im(input_ids=ids, labels=ids)
    out.loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = model(input_ids=ids, labels=ids)
    ref.loss.backward()
    assert_close(out.loss, ref.loss)
    for a, b in zip(ours, [p.grad for p in model.parameters()]):
        assert_close(a, b)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_labels_loss_and_gradients_equal_the_model(family):
    model = build(FAMILIES[family], layers=2, heads=4, kv_heads=2).eval()
    im = attnfx.instrument(model)
    ids = torch.randint(1, 64, (2, 6))
    _assert_loss_and_grads_equal(model, im, ids)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_output_attentions_and_hidden_states_equal_the_model(impl):
    model = build(FAMILIES["gpt2"], layers=2, heads=4, kv_heads=4, impl=impl).eval()
    im = attnfx.instrument(model)                 # first call asking for outputs goes through attnfx
    ids = torch.randint(1, 64, (2, 6))
    with torch.no_grad():
        out = im(input_ids=ids, output_attentions=True, output_hidden_states=True)
        ref = model(input_ids=ids, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == len(ref.attentions)
    for a, b in zip(out.attentions + out.hidden_states, ref.attentions + ref.hidden_states):
        assert_close(a, b)


@pytest.mark.parametrize("bare_first", [True, False], ids=["bare-first", "instrumented-first"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_output_hooks_are_installed_once_whoever_asks_first(family, bare_first):
    """HF installs its output-capturing hooks on the inner model (GPT2Model, LlamaModel) the first
    time outputs are asked for. Installing them again from the outer model doubled every captured
    output (5 hidden states instead of 3, the last ones off by 2.6) for im and for the bare model
    after it, when the bare model had asked first."""
    import copy
    model = build(FAMILIES[family], layers=2, heads=4, kv_heads=2, impl="eager").eval()
    twin = copy.deepcopy(model)
    ids, mask = _left_padded()
    kwargs = dict(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    with torch.no_grad():
        ref = twin(**kwargs)
        im = attnfx.instrument(model)
        if bare_first:
            model(**kwargs)
        outputs = [im(**kwargs), model(**kwargs)]
    for out in outputs:
        assert len(out.hidden_states) == len(ref.hidden_states) == 3
        assert len(out.attentions) == len(ref.attentions) == 2
        valid = mask.bool()                               # real query positions
        for a, b in zip(out.attentions, ref.attentions):
            assert_close(a.transpose(1, 2)[valid], b.transpose(1, 2)[valid])
        for a, b in zip(out.hidden_states, ref.hidden_states):
            assert_close(a[valid], b[valid])


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_gradient_checkpointing_in_train_mode_equals_the_model(backend):
    model = build(FAMILIES["llama"], layers=2, heads=4, kv_heads=2)
    im = attnfx.instrument(model, backend=backend)
    model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(1, 64, (2, 6))
    _assert_loss_and_grads_equal(model, im, ids)


@pytest.mark.parametrize("layer, head", [(np.int64(1), torch.tensor(2)), (-1, -2), (torch.tensor([1]), [2])])
def test_numpy_tensor_and_negative_indices_name_the_same_head(layer, head):
    model = build(FAMILIES["llama"], layers=2, heads=4, kv_heads=2).eval()
    im = attnfx.instrument(model)
    im.steering.scale(layer, head, np.float32(3.0))
    assert im.steering.active() == [("z", 1, 2, 3.0)]


def test_scoped_steering_is_restored_when_the_body_raises():
    model = build(FAMILIES["llama"], layers=2, heads=4, kv_heads=2).eval()
    im = attnfx.instrument(model)
    im.steering.scale(0, 1, 2.0)
    with pytest.raises(RuntimeError, match="boom"):
        with im.steering.scaled(1, 0, 5.0, on="value_unbiased"):
            assert ("value_unbiased", 1, 0, 5.0) in im.steering.active()
            raise RuntimeError("boom")
    assert im.steering.active() == [("z", 0, 1, 2.0)]


def test_readout_directions_do_not_outlive_head_attribution():
    model = build(FAMILIES["gpt2"], layers=2, heads=4, kv_heads=4).eval()
    im = attnfx.instrument(model)
    attnfx.head_attribution(im, {"input_ids": torch.randint(1, 64, (2, 5))}, target=3)
    assert "readout_directions" not in dict(im.named_buffers())


def test_models_is_reachable_from_the_package():
    assert callable(attnfx.models.load_default)


# ---- issue 12: sampling, beam search, the default model, contexts, state dicts, bad inputs ------
def _head_dim(model):
    return model.config.hidden_size // model.config.num_attention_heads


def _o_proj(model, layer):
    """The module whose input is the concatenated head outputs z of `layer`."""
    if hasattr(model, "transformer"):
        return model.transformer.h[layer].attn.c_proj            # GPT-2: Conv1D
    return model.model.layers[layer].self_attn.o_proj


def _z_scale_hook(model, layer, head, factor):
    """Reference steering the slow way: scale head `head`'s columns of the o_proj input."""
    d = _head_dim(model)

    def pre_hook(module, args):
        z = args[0].clone()
        z[..., head * d:(head + 1) * d] *= factor
        return (z,) + args[1:]
    return _o_proj(model, layer).register_forward_pre_hook(pre_hook)


def _steered(im, model, steer):
    """Steer `im` with scale(layer, head, factor) and hook the bare model the same way; returns
    the hook handle (None when steer is None)."""
    if steer is None:
        return None
    layer, head, factor = steer
    im.steering.scale(layer, head, factor)
    return _z_scale_hook(model, layer, head, factor)


STEERS = [None, (1, 2, 0.0), (0, 1, 3.0)]


@pytest.mark.parametrize("steer", STEERS, ids=["plain", "ablate-1.2", "scale3-0.1"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_seeded_sampling_on_a_left_padded_batch_equals_the_model(family, steer):
    model = build(FAMILIES[family], layers=2, heads=4, kv_heads=2).eval()
    im = attnfx.instrument(model)
    ids, mask = _left_padded()
    sample = dict(do_sample=True, top_k=8, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    torch.manual_seed(1)
    unsteered = model.generate(input_ids=ids, attention_mask=mask, **sample)
    handle = _steered(im, model, steer)
    try:
        torch.manual_seed(1)
        expected = model.generate(input_ids=ids, attention_mask=mask, **sample)
    finally:
        if handle is not None:
            handle.remove()
    torch.manual_seed(1)
    tokens = im.generate(input_ids=ids, attention_mask=mask, **sample)
    assert torch.equal(tokens, expected)
    if steer is not None:
        assert not torch.equal(tokens, unsteered)       # the steering changed what was sampled


@pytest.mark.parametrize("steer", STEERS, ids=["plain", "ablate-1.2", "scale3-0.1"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_beam_search_on_a_left_padded_batch_equals_the_model(family, steer):
    model = build(FAMILIES[family], layers=2, heads=4, kv_heads=2).eval()
    im = attnfx.instrument(model)
    ids, mask = _left_padded()
    beams = dict(GREEDY, num_beams=3)
    handle = _steered(im, model, steer)
    try:
        expected = model.generate(input_ids=ids, attention_mask=mask, **beams)
    finally:
        if handle is not None:
            handle.remove()
    assert torch.equal(im.generate(input_ids=ids, attention_mask=mask, **beams), expected)


def test_default_model_batch_encoding_generate_and_logits_equal_the_model():
    model, tokenizer = attnfx.models.load_default()
    tokenizer.padding_side = "left"
    prompts = attnfx.models.load_prompts()
    texts = [prompts["facts"][0]["prompt"], prompts["copy"][0]["first"], prompts["ioi"][0]["prompt"]]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any()                   # really left-padded
    im = attnfx.instrument(model)
    greedy = dict(do_sample=False, max_new_tokens=5, pad_token_id=tokenizer.pad_token_id)
    expected = model.generate(**enc, **greedy)
    assert torch.equal(im.generate(**enc, **greedy), expected)
    with torch.no_grad():
        assert_close(im(**enc).logits, model(**enc).logits)


def _context_logits(family, steer, context, dtype=torch.float32):
    """(attnfx logits, bare-model logits) of one left-padded batch, both run under `context()`;
    with steer set, attnfx is steered by scale() and the bare model by the reference hook."""
    model = build(FAMILIES[family], layers=2, heads=4, kv_heads=2).eval()
    im = attnfx.instrument(model)
    ids, mask = _left_padded(seq=6)
    with context():
        handle = _steered(im, model, steer)        # written under the context too
        try:
            ref = model(input_ids=ids, attention_mask=mask).logits
        finally:
            if handle is not None:
                handle.remove()
        out = im(input_ids=ids, attention_mask=mask).logits
        plain = model(input_ids=ids, attention_mask=mask).logits
    if steer is not None:
        with pytest.raises(AssertionError):            # the steering moves logits beyond the tolerance
            assert_close(plain.float(), ref.float(), dtype=dtype)
    return out, ref


@pytest.mark.parametrize("steer", [None, (0, 1, 3.0)], ids=["plain", "scale3-0.1"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_inference_mode_forward_equals_the_model(family, steer):
    out, ref = _context_logits(family, steer, torch.inference_mode)
    assert_close(out, ref)


@pytest.mark.parametrize("steer", [None, (0, 1, 3.0)], ids=["plain", "scale3-0.1"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_cpu_bf16_autocast_forward_equals_the_model(family, steer):
    out, ref = _context_logits(family, steer, lambda: torch.autocast("cpu", dtype=torch.bfloat16), torch.bfloat16)
    assert out.dtype == ref.dtype
    assert_close(out.float(), ref.float(), dtype=torch.bfloat16)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_state_dict_keys_are_the_models_and_load_into_a_fresh_model(family):
    fam = FAMILIES[family]
    model = build(fam, layers=2, heads=4, kv_heads=2, seed=0).eval()
    im = attnfx.instrument(model)
    ids = torch.randint(1, 64, (2, 6))
    assert list(im.state_dict()) == list(model.state_dict())
    fresh = build(fam, layers=2, heads=4, kv_heads=2, seed=1).eval()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        assert not torch.allclose(fresh(input_ids=ids).logits, ref)
        fresh.load_state_dict(im.state_dict())
        assert_close(fresh(input_ids=ids).logits, ref)


@pytest.mark.parametrize("family", ["gpt2", "llama"])      # llama: its own keys start with "model."
def test_wrapper_loads_a_model_state_dict(family):
    fam = FAMILIES[family]
    model = build(fam, layers=2, heads=4, kv_heads=2, seed=0).eval()
    im = attnfx.instrument(model)
    ids = torch.randint(1, 64, (2, 6))
    other = build(fam, layers=2, heads=4, kv_heads=2, seed=2).eval()
    with torch.no_grad():
        other_logits = other(input_ids=ids).logits
        assert not torch.allclose(model(input_ids=ids).logits, other_logits)
        im.load_state_dict(other.state_dict())
        assert_close(im(input_ids=ids).logits, other_logits)
        assert_close(model(input_ids=ids).logits, other_logits)   # the wrapped model's weights were loaded


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_save_pretrained_round_trip(family, tmp_path):
    model = build(FAMILIES[family], layers=2, heads=4, kv_heads=2, seed=0).eval()
    im = attnfx.instrument(model)
    im.steering.scale(0, 1, 3.0)                 # steering is runtime state, never saved
    ids = torch.randint(1, 64, (2, 6))
    im.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    assert list(reloaded.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("factor", [0.0, 3.0])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_steered_generate_equals_a_forward_hook_reference(family, factor):
    model = build(FAMILIES[family], layers=2, heads=4, kv_heads=2).eval()
    im = attnfx.instrument(model)
    ids, mask = _left_padded()
    plain = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    layer, head = 1, 2
    im.steering.scale(layer, head, factor)
    handle = _z_scale_hook(model, layer, head, factor)
    try:
        expected = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
        with torch.no_grad():
            ref_logits = model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()
    tokens = im.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    assert torch.equal(tokens, expected)
    with torch.no_grad():
        assert_close(im(input_ids=ids, attention_mask=mask).logits, ref_logits)
    assert not torch.equal(ref_logits, model(input_ids=ids, attention_mask=mask).logits)   # hook really steers
    assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, **GREEDY), plain)   # bare model untouched


def test_meta_device_model_is_refused_and_can_be_instrumented_once_materialised():
    ref = build(FAMILIES["gpt2"], layers=2, heads=4).eval()
    with torch.device("meta"):
        model = build(FAMILIES["gpt2"], layers=2, heads=4).eval()
    with pytest.raises(attnfx.errors.UnsupportedModelError):
        attnfx.instrument(model)
    model.to_empty(device="cpu")
    model.load_state_dict(ref.state_dict())
    for buf, ref_buf in zip(model.buffers(), ref.buffers()):
        buf.copy_(ref_buf)
    im = attnfx.instrument(model)
    ids = torch.randint(1, 64, (2, 6))
    with torch.no_grad():
        assert_close(im(input_ids=ids).logits, ref(input_ids=ids).logits)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_float_token_ids_raise_and_leave_the_model_usable(family):
    model = build(FAMILIES[family], layers=2, heads=4, kv_heads=2).eval()
    im = attnfx.instrument(model)
    ids = torch.randint(1, 64, (2, 6))
    with pytest.raises(attnfx.errors.DTypeMismatchError):
        im(input_ids=ids.float())
    with pytest.raises(attnfx.errors.DTypeMismatchError):
        im(ids.float())
    with torch.no_grad():
        assert_close(im(input_ids=ids).logits, model(input_ids=ids).logits)
        assert_close(im(ids).logits, model(ids).logits)


def _state(im):
    return {name: buf.clone() for name, buf in im.named_buffers()}


@pytest.mark.parametrize("bad_call, error", [
    (lambda s: s.scale(0, 1, float("nan")), "SteeringValueError"),
    (lambda s: s.scale(0, 1, float("inf")), "SteeringValueError"),
    (lambda s: s.scale(0, 1, torch.tensor([1.0, 2.0])), "SteeringValueError"),
    (lambda s: s.scale(0, 4, 2.0), "SiteIndexError"),
    (lambda s: s.scale([0, 1], [1, 9], 2.0), "SiteIndexError"),
    (lambda s: s.scale([1, 2], 0, 2.0), "SiteIndexError"),
    (lambda s: s.scale(0, 2, 2.0, on="value"), "SiteIndexError"),     # 2 kv heads
    (lambda s: s.scale(0, 1, 2.0, on="keys"), "InvalidArgumentError"),
    (lambda s: s.ablate([0, 1], [0, -5]), "SiteIndexError"),
    (lambda s: s.ablate(0, 0, how="mean"), "SteeringValueError"),
    (lambda s: s.patch(0, 1, torch.zeros(2, 6, 3)), "ShapeMismatchError"),
    (lambda s: s.patch(0, 1, torch.full((2, 6, 8), float("nan"))), "SteeringValueError"),
], ids=["nan", "inf", "non-scalar", "head-4", "head-list-9", "layer-list-2", "kv-head-2", "on-keys",
        "ablate-head-minus-5", "mean-without-reference", "patch-head-dim-3", "patch-nan"])
def test_bad_steering_values_raise_and_leave_the_state_unchanged(bad_call, error):
    model = build(FAMILIES["llama"], layers=2, heads=4, kv_heads=2).eval()
    im = attnfx.instrument(model)
    im.steering.scale(1, 3, 2.0)
    im.steering.ablate(0, 2)
    before, active = _state(im), im.steering.active()
    with pytest.raises(getattr(attnfx.errors, error)):
        bad_call(im.steering)
    after = _state(im)
    assert after.keys() == before.keys()
    for name in before:
        assert torch.equal(after[name], before[name]), name
    assert im.steering.active() == active


def test_uninstrumented_wrapper_repr_and_calls():
    model = build(FAMILIES["gpt2"], layers=2, heads=4).eval()
    im = attnfx.instrument(model)
    table = repr(im)
    assert "transformer.h.0.attn" in table                   # the sites table
    assert im.uninstrument() is model
    text = repr(im)
    assert "detached" in text and "transformer.h.0.attn" not in text and "layer" not in text
    ids = torch.randint(1, 64, (1, 4))
    with pytest.raises(attnfx.errors.DetachedError):
        im(input_ids=ids)
    with pytest.raises(attnfx.errors.DetachedError):
        im.generate(input_ids=ids, **GREEDY)
    with pytest.raises(attnfx.errors.DetachedError):
        im.steering.scale(0, 0, 2.0)
    assert torch.isfinite(model(input_ids=ids).logits).all()   # the model itself still runs


def test_import_attnfx_is_light_and_public_names_resolve():
    import subprocess
    import sys

    code = (
        "import sys, attnfx\n"
        "heavy = [m for m in ('torch._dynamo', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert callable(attnfx.instrument)\n"
        "assert callable(attnfx.models.load_default)\n"
        "assert callable(attnfx.relevance) and callable(attnfx.head_attribution)\n"
        "import types; assert isinstance(attnfx.patching, types.ModuleType)\n"
        "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"
