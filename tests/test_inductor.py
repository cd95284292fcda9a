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


_SECOND_PROCESS = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import attnfx
from torch._dynamo.utils import counters
from models import FAMILIES, build
model = build(FAMILIES["gpt2"], layers=1, heads=2)
im = attnfx.instrument(model, backend="inductor")
im.steering.scale(0, 1, 3.0, on="value_unbiased")
with torch.no_grad():
    logits = im(input_ids=torch.arange(1, 9).view(1, 8)).logits
print(json.dumps({"fx": counters["inductor"]["fxgraph_cache_hit"],
                  "aot": counters["aot_autograd"]["autograd_cache_hit"], "logits": logits.flatten().tolist()}))
"""


def test_a_second_process_reuses_the_compiled_graph(tmp_path):
    """torch's on-disk caches serve a second process: Inductor's FX graph cache and AOT
    autograd's cache both hit (the latter needs the example values attnfx gives its inserted
    nodes), and the cached graph computes what the first one did."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path))

    def run():
        proc = subprocess.run([sys.executable, "-c", _SECOND_PROCESS, str(Path(__file__).parent)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert (first["fx"], first["aot"]) == (0, 0)
    assert second["fx"] >= 1 and second["aot"] >= 1
    assert torch.equal(torch.tensor(first["logits"]), torch.tensor(second["logits"]))
