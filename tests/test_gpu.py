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


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_triton_kernel_bf16_long_sequences(causal, head_dim):
    """The fused kernel in bf16 at T = 4096 (GQA 4:1), every output and gradient vs the
    fp32 reference."""
    from attnfx.kernels.attention import attention_bwd, attention_fwd
    from attnfx.ops import reference

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, 4096, head_dim, device="cuda", generator=g).bfloat16()
    k, v = (torch.randn(1, 2, 4096, head_dim, device="cuda", generator=g).bfloat16() for _ in range(2))
    extras = dict(head_scale=torch.rand(8, device="cuda") * 2, spans=torch.tensor([[0, 4], [2048, 4096]]),
                  directions=torch.randn(8, head_dim, 4, device="cuda"))
    got = attention_fwd(q, k, v, causal=causal, **extras)
    want = reference.attention(q, k, v, causal=causal, **extras)
    for name in want:
        finite = want[name].isfinite()
        assert_close(got[name].float()[finite], want[name].float()[finite], dtype=torch.bfloat16)
    do = torch.randn_like(q)
    plain = attention_fwd(q, k, v, causal=causal)
    got_grads = attention_bwd(do, q, k, v, plain["o"], plain["lse"], causal=causal)[:3]
    want_grads = reference.attention_backward(do, q, k, v, causal=causal)
    for a, b in zip(got_grads, want_grads):
        assert_close(a.float(), b.float(), dtype=torch.bfloat16)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "neox"])
def test_lowered_inductor_equals_the_model(family):
    """Compiled end to end with the Triton kernel lowered into the graph (fullgraph)."""
    from torch._dynamo.utils import counters

    model = build(FAMILIES[family], layers=2, heads=8, kv_heads=2, head_dim=64).to("cuda", torch.bfloat16)
    im = attnfx.instrument(model, lower=True, fullgraph=True)
    ids = torch.randint(1, 64, (2, 512), device="cuda")
    before = counters["attnfx"]["sites_lowered"]
    with torch.no_grad():
        assert_close(output_tensor(im(input_ids=ids)).float(), output_tensor(model(input_ids=ids)).float(),
                     dtype=torch.bfloat16)
    assert counters["attnfx"]["sites_lowered"] - before == 2


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_relevance_on_cuda_runs_the_kernels_lrp_mode(family):
    """attnfx.relevance on CUDA lowers attention onto the Triton kernel in AttnLRP mode and equals
    the explicit rules (fp64 on the CPU)."""
    from torch._dynamo.utils import counters

    from attnfx.analysis.lrp_explicit import explicit_relevance

    model = build(FAMILIES[family], layers=2, heads=8, kv_heads=2, head_dim=64)
    ids = torch.randint(1, 64, (2, 200))
    target = lambda out: output_tensor(out)[:, -1, 5]          # noqa: E731
    want = explicit_relevance(model.double(), {"input_ids": ids}, target)
    im = attnfx.instrument(model.float().cuda())
    before = counters["attnfx"]["sites_lowered"]
    got = attnfx.relevance(im, {"input_ids": ids.cuda()}, target)
    assert counters["attnfx"]["sites_lowered"] - before == 2
    for name, key in (("tokens", "tokens"), ("heads_per_position", "heads"), ("residual", "resid")):
        scale = want[key].abs().max().item()
        torch.testing.assert_close(getattr(got, name).double().cpu(), want[key], rtol=0, atol=1e-4 * scale)
