"""A few checks through Inductor (slow to compile on a 2-core CPU: kept few)."""
import pytest
import torch

import attnfx
from _tol import assert_close
from models import FAMILIES, build

pytestmark = pytest.mark.inductor


def test_inductor_steering_and_records_match_the_eager_backend():
    model = build(FAMILIES["llama"], layers=2, heads=4, kv_heads=2)
    fast = attnfx.instrument(model, backend="inductor")
    ids = torch.randint(1, 64, (2, 8))
    directions = torch.randn(2, 32)
    with torch.no_grad():
        assert_close(fast(input_ids=ids).logits, model(input_ids=ids).logits)
        fast.steering.scale(1, 2, 3.0, on="z")
        fast.steering.scale(0, 1, -1.0, on="value")
        with fast.record("z", "readout", directions=directions) as fast_rec:
            fast_logits = fast(input_ids=ids).logits
    fast.uninstrument()

    slow = attnfx.instrument(model, backend="eager")
    slow.steering.scale(1, 2, 3.0, on="z")
    slow.steering.scale(0, 1, -1.0, on="value")
    with torch.no_grad(), slow.record("z", "readout", directions=directions) as slow_rec:
        slow_logits = slow(input_ids=ids).logits
    assert_close(fast_logits, slow_logits)
    assert_close(fast_rec["readout"], slow_rec["readout"])
    for a, b in zip(fast_rec["z"], slow_rec["z"]):
        assert_close(a, b)


def test_inductor_generation_equals_the_model():
    model = build(FAMILIES["gpt2"], layers=2, heads=4)
    im = attnfx.instrument(model, backend="inductor")
    ids = torch.randint(1, 64, (1, 4))
    greedy = dict(do_sample=False, max_new_tokens=4, min_new_tokens=4, pad_token_id=0)
    assert torch.equal(im.generate(ids, **greedy), model.generate(ids, **greedy))
