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
