"""Tensor parallelism (issue 17): a tiny Llama (4 heads, 2 kv heads) sharded over 2 gloo processes
on the CPU, by HF's own tensor parallelism (from_pretrained(tp_plan="auto"): DTensor parameters,
Megatron-style) and by torch's parallelize_module directly. Each process's graph computes two of
the heads; attnfx reports and steers global head indices and gathers records to every head.
Checked in each process against the same model unsharded, instrumented in that process: logits,
steered logits (every knob, heads on either process, positions= too), greedy generation, a
patch, and the recorded z, q, k, v, pattern and attention statistics, at the fp32 tolerance."""
from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _tol import assert_close

WORLD = 2
RECORDS = ("z", "q", "k", "v", "pattern")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def _parallelized(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    mesh = init_device_mesh("cpu", (WORLD,))
    plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}
    for layer in model.model.layers:
        parallelize_module(layer, mesh, plan)
    return model


def _steer(im):
    """Knobs on heads of both processes: rank 0 holds heads 0–1 (kv head 0), rank 1 heads 2–3 (kv head 1)."""
    im.steering.scale(1, 3, 0.25)
    im.steering.scale(0, 1, 1.7, on="query")
    im.steering.scale(0, 1, 0.5, on="value")
    im.steering.ablate(1, [0, 2], positions=[-1])
    im.steering.scale(0, 2, 3.0, positions=[1, 2])


def _check(rank: int, port: int, saved: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        import attnfx
        from transformers import AutoModelForCausalLM
        plain = AutoModelForCausalLM.from_pretrained(saved).eval()
        ids = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(1))
        ref = attnfx.instrument(plain)
        _check_against(ref, attnfx.instrument(AutoModelForCausalLM.from_pretrained(saved, tp_plan="auto").eval()),
                       ids, rank)
        ref.steering.reset()
        _check_against(ref, attnfx.instrument(_parallelized(copy.deepcopy(plain))), ids, rank, full=False)
    finally:
        dist.destroy_process_group()


def _check_against(ref, im, ids, rank: int, full: bool = True) -> None:
    import attnfx
    from attnfx.errors import UnsupportedModelError

    assert [(s.num_heads, s.num_kv_heads) for s in im.sites] == [(4, 2), (4, 2)]
    assert [(s.shard.offset, s.shard.kv_offset) for s in im.sites] == [(2 * rank, rank)] * 2
    assert_close(im(ids).logits, ref(ids).logits)

    if not full:
        for model in (ref, im):
            _steer(model)
        assert_close(im(ids).logits, ref(ids).logits)
        return
    with ref.record(*RECORDS, "attention_stats", spans=[(0, 1), (1, 7)]) as expected, \
            im.record(*RECORDS, "attention_stats", spans=[(0, 1), (1, 7)]) as got:
        ref(ids), im(ids)
    for kind in (*RECORDS, "lse", "mass"):
        for layer in range(2):
            assert got[kind][layer].shape == expected[kind][layer].shape, kind
            assert_close(got[kind][layer], expected[kind][layer])

    for model in (ref, im):
        _steer(model)
    assert_close(im(ids).logits, ref(ids).logits)
    with ref.record("z") as expected, im.record("z") as got:
        ref(ids), im(ids)
    assert_close(got["z"][1], expected["z"][1])
    assert torch.equal(im.generate(ids, max_new_tokens=4, do_sample=False),
                       ref.generate(ids, max_new_tokens=4, do_sample=False))
    # a patch of one head on rank 1 from the other batch row's recorded z
    source = expected["z"][0][:, :, 3].flip(0)
    for model in (ref, im):
        model.steering.reset()
        model.steering.patch(0, 3, source)
    assert_close(im(ids).logits, ref(ids).logits)

    with pytest.raises(UnsupportedModelError, match="tensor parallelism"):
        with im.record("readout", directions=torch.randn(1, 64)):
            pass
    with pytest.raises(UnsupportedModelError, match="tensor parallelism"):
        with im.record("mlp_hidden"):
            pass
    # analyses that differentiate through the heads or project them through W_O refuse rather than
    # answer from one process's heads (relevance did, silently, before: off by 0.06–0.14)
    target = torch.tensor([1, 2])
    for analysis in (lambda: attnfx.head_attribution(im, ids, target), lambda: attnfx.relevance(im, ids, target),
                     lambda: attnfx.patching.attribution_patching(im, ids, ids.flip(0), lambda out: out.logits[:, -1, 1])):
        with pytest.raises(UnsupportedModelError, match="run tensor parallel"):
            analysis()


def test_tensor_parallel_heads_steer_and_record_as_the_unsharded_model(tmp_path):
    pytest.importorskip("transformers")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch built without gloo")
    _tiny_llama().save_pretrained(tmp_path)
    mp.spawn(_check, args=(_free_port(), str(tmp_path)), nprocs=WORLD)
