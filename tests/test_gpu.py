"""On CUDA (skipped cleanly without one): Inductor-compiled instrumentation in bf16 and fp16
against the eager model, steering against hooks, and generation."""
import pytest
import torch

import attnfx
from _tol import assert_close
from models import FAMILIES, build, output_tensor

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "neox", "bert"])
def test_inductor_on_cuda_matches_the_model(family, dtype):
    model = build(FAMILIES[family], layers=2, heads=8, kv_heads=2, head_dim=64).to("cuda", dtype)
    im = attnfx.instrument(model)                       # inductor is the default on CUDA
    ids = torch.randint(1, 64, (4, 300), device="cuda")
    with torch.no_grad():
        reference = output_tensor(model(input_ids=ids)).float()
        assert_close(output_tensor(im(input_ids=ids)).float(), reference, dtype=dtype)
        im.steering.scale(1, 3, 0.0, on="z")
        o_proj = model.get_submodule(im.sites[1].o_proj.rsplit(".", 1)[0])

        def zero(mod, args):
            x = args[0].clone()
            x[..., 3 * 64:4 * 64] = 0
            return (x,)

        handle = o_proj.register_forward_pre_hook(zero)
        expected = output_tensor(model(input_ids=ids)).float()
        handle.remove()
        assert_close(output_tensor(im(input_ids=ids)).float(), expected, dtype=dtype)


def test_generation_on_cuda_equals_the_model():
    model = build(FAMILIES["llama"], layers=2, heads=8, kv_heads=2, head_dim=64).to("cuda")
    im = attnfx.instrument(model)
    ids = torch.randint(1, 64, (2, 16), device="cuda")
    greedy = dict(do_sample=False, max_new_tokens=16, min_new_tokens=16, pad_token_id=0)
    assert torch.equal(im.generate(ids, **greedy), model.generate(ids, **greedy))
