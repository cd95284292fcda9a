"""Cost of `attnfx.relevance` (AttnLRP relevance of every input token and of every head at every
position) against a plain forward + backward of the same model, input and target, side by side,
eager and compiled (Inductor). Targets: ≤ 1.3× the time, ≤ 1.2× the peak memory.

    python bench/relevance.py [--quick]

Peak memory is the high-water mark of the bytes the CPU/CUDA allocator handed out during the call
(torch.profiler's memory events on CPU, max_memory_allocated on CUDA), over what was live before.
The plain backward computes the parameter gradients as training would; relevance takes
`autograd.grad` at its gates only. Results: bench/results/<device>/relevance.{json,png}.
"""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import attnfx
import _harness as H

CPU_MODEL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=1024, vocab_size=1000)
GPU_MODEL = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                 intermediate_size=5632, vocab_size=32000)
QUICK_MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=100)
SHAPE, QUICK_SHAPE = (4, 256), (2, 16)
TARGET_TOKEN, FOIL_TOKEN = 7, 11
TARGETS = {"time": 1.3, "memory": 1.2}
COMPONENTS = ("tokens", "heads")        # the workload: input tokens and every head (per position)


def _logit_diff(out):
    return out.logits[:, -1, TARGET_TOKEN] - out.logits[:, -1, FOIL_TOKEN]


def providers(model, ids, backend: str):
    """(name → callable: plain forward+backward and attnfx.relevance on one backend, the wrapper)."""
    compiled = model if backend == "eager" else torch.compile(model, backend=backend)
    im = attnfx.instrument(model, backend=backend)

    def plain():
        _logit_diff(compiled(input_ids=ids)).sum().backward()
        model.zero_grad(set_to_none=True)

    def relevance():
        attnfx.relevance(im, {"input_ids": ids}, _logit_diff, components=COMPONENTS)

    return {"plain fwd+bwd": plain, "attnfx.relevance": relevance}, im


def peak_bytes(fn) -> int:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # allocations are charged to the op that made them (self), frees arrive as "[memory]" events
    deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    running = peak = 0
    for _, delta in deltas:
        running += delta
        peak = max(peak, running)
    return peak


def main() -> None:
    args = H.parse_args(H.cli(__doc__.split("\n")[0]))
    cuda = torch.cuda.is_available()
    config = QUICK_MODEL if args.quick else GPU_MODEL if cuda else CPU_MODEL
    batch, seq = QUICK_SHAPE if args.quick else SHAPE
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config, attn_implementation="sdpa")).to(device, dtype).eval()
    ids = torch.randint(0, config["vocab_size"], (batch, seq), device=device)
    rows, times, notes = [], {}, {}
    for backend in ("eager", "inductor"):
        fns, im = providers(model, ids, backend)
        for fn in fns.values():                   # compile and warm up
            fn(), fn()
        ms = H.bench(fns, repeats=5 if args.quick else H.CPU_REPEATS)
        peaks = {name: peak_bytes(fn) for name, fn in fns.items()}
        ratio = {"time": ms["attnfx.relevance"] / ms["plain fwd+bwd"],
                 "memory": peaks["attnfx.relevance"] / peaks["plain fwd+bwd"]}
        rows += [{"backend": backend, "provider": name, "ms": ms[name], "peak_mb": peaks[name] / 2**20}
                 for name in fns]
        times[backend] = ms
        im.uninstrument()
        notes[backend] = {name: f"{ms[name]:.0f} ms\n{peaks[name] / 2**20:.0f} MB" for name in fns}
        rows.append({"backend": backend, "ratio": ratio, "meets": {k: ratio[k] <= TARGETS[k] for k in ratio}})
        print(f"{backend}: " + ", ".join(f"{n} {ms[n]:.1f} ms {peaks[n] / 2**20:.1f} MB" for n in fns)
              + f" → time ×{ratio['time']:.2f}, memory ×{ratio['memory']:.2f}", flush=True)
    path = H.write_json("relevance", {"model": config, "batch": batch, "seq": seq, "dtype": str(dtype),
                                      "components": COMPONENTS,
                                      "targets": TARGETS, "rows": rows}, args.out)
    H.bar_plot(path.with_suffix(".png"), f"attnfx.relevance vs plain forward+backward, {H.device_name()}",
               times, notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
