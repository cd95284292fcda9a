"""Attention TFLOP/s and peak memory, forward and backward: attnfx's Triton kernel (plain,
+ head scales, + readouts, + attention mass; backward plain and in AttnLRP mode) against SDPA's
flash and cuDNN backends and FlexAttention.

    python bench/kernels.py            # CUDA: bf16, head_dim 64/128, T = 512 … 16k, causal and not
    python bench/kernels.py --quick    # CUDA: T = 1k/4k/16k, no FlexAttention (its compiles take
                                       # minutes), short timing budgets: `make gpu-check`'s subset;
                                       # CPU: a smoke run of the kernel in Triton's interpreter
    python bench/kernels.py --lengths 4096 --flex   # any subset

A provider that fails is recorded with its error, and the JSON is rewritten after every point,
so a run cut short by a time cap still leaves its results.

FLOPs = 4·b·H·T²·d forward, ×2.5 backward, halved when causal. The token count b·T is held at
16k and H·d at 2048, so every point does the same work per token. A backward is timed alone:
`autograd.grad` of a retained graph for the torch providers, the two kernels of
`attention_bwd` for ours. Results: bench/results/<device>/kernels.{json,png}.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"                 # before the kernel module is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H                                     # noqa: E402

from attnfx.kernels.attention import attention_bwd, attention_fwd        # noqa: E402

TOKENS, WIDTH = 16384, 2048
DIRECTIONS, SPANS = 8, 4


def _flops(b, h, t, d, causal, direction) -> float:
    return 4 * b * h * t * t * d / (2 if causal else 1) * (2.5 if direction == "backward" else 1.0)


def _torch_providers(q, k, v, causal: bool, flex: bool = True) -> dict:
    """name → forward fn of the torch baselines (SDPA flash, cuDNN, FlexAttention) on CUDA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    import torch.nn.functional as F

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return run

    fns = {"sdpa flash (FA2)": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa cuDNN": sdpa(SDPBackend.CUDNN_ATTENTION)}
    if flex:
        compiled = torch.compile(flex_attention)
        T = q.shape[2]
        mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, T, T) if causal else None
        fns["FlexAttention"] = lambda q, k, v: compiled(q, k, v, block_mask=mask)
    return fns


def _providers(q, k, v, causal: bool, cuda: bool, flex: bool = True) -> dict:
    """name → forward fn."""
    import torch.nn.functional as F

    heads, d, T = q.shape[1], q.shape[-1], q.shape[2]
    scale = torch.ones(heads, device=q.device)
    u = torch.randn(heads, d, DIRECTIONS, device=q.device, dtype=q.dtype)
    spans = torch.tensor([[0, 4], [T // 4, T // 2], [T // 2, T], [T - 64, T]])
    fns = {
        "attnfx": lambda: attention_fwd(q, k, v, causal=causal),
        "attnfx+scales": lambda: attention_fwd(q, k, v, causal=causal, head_scale=scale),
        "attnfx+readouts": lambda: attention_fwd(q, k, v, causal=causal, head_scale=scale, directions=u),
        "attnfx+mass": lambda: attention_fwd(q, k, v, causal=causal, spans=spans),
    }
    if not cuda:
        fns["sdpa (math)"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return fns
    fns.update({name: (lambda fn=fn: fn(q, k, v)) for name, fn in _torch_providers(q, k, v, causal, flex).items()})
    return fns


def _backward_providers(q, k, v, causal: bool, cuda: bool, flex: bool = True) -> dict:
    """name → backward-only fn: our two backward kernels (plain, AttnLRP), autograd.grad of a
    retained forward graph for the torch providers."""
    import torch.nn.functional as F

    saved = attention_fwd(q, k, v, causal=causal)
    do = torch.randn_like(q)
    fns = {"attnfx": lambda: attention_bwd(do, q, k, v, saved["o"], saved["lse"], causal=causal),
           "attnfx lrp": lambda: attention_bwd(do, q, k, v, saved["o"], saved["lse"], causal=causal, lrp=True)}
    torch_fns = (_torch_providers(q, k, v, causal, flex) if cuda else
                 {"sdpa (math)": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)})
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    for name, fn in torch_fns.items():
        out = fn(*leaves)
        fns[name] = lambda out=out: torch.autograd.grad(out, leaves, do, retain_graph=True)
    return fns


def _peak_mb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _arguments():
    parser = H.cli(__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default: by --quick)")
    parser.add_argument("--flex", action=argparse.BooleanOptionalAction, default=None,
                        help="time FlexAttention (default: on, off with --quick)")
    parser.add_argument("--rep-ms", type=int, default=None, help="do_bench budget per provider (CUDA)")
    return H.parse_args(parser)


def main() -> None:
    args = _arguments()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    full = cuda and not args.quick
    lengths = args.lengths or ([1024, 4096, 16384] if cuda and args.quick else
                               [512, 1024, 2048, 4096, 8192, 16384] if cuda else [64, 128])
    flex = cuda and (args.flex if args.flex is not None else not args.quick)
    rep_ms = args.rep_ms or (100 if args.quick else H.GPU_REP_MS)
    tokens, name = (TOKENS if cuda else 128), "kernels" if full and args.lengths is None else "kernels_quick"
    rows = []
    for d in (64, 128):
        heads = WIDTH // d if cuda else 2
        for causal in (True, False):
            for T in lengths:
                b = max(1, tokens // T)
                q, k, v = (torch.randn(b, heads, T, d, device=device, dtype=dtype) for _ in range(3))
                for direction, make in (("forward", _providers), ("backward", _backward_providers)):
                    point = dict(head_dim=d, causal=causal, T=T, batch=b, heads=heads, direction=direction,
                                 dtype=str(dtype).removeprefix("torch."))
                    rows += _measure(make, (q, k, v, causal, cuda, flex), point, rep_ms)
                    path = H.write_json(name, {"tokens": tokens, "width": WIDTH, "rows": rows,
                                               "ratios": _ratios(rows), "interpreted": not cuda}, args.out)
    _plot([r for r in rows if "error" not in r], path.with_suffix(".png"))
    print(f"ratios: {_ratios(rows)}\nwrote {path}")


def _measure(make, inputs, point: dict, rep_ms: int) -> list[dict]:
    """One row per provider at this point; a provider that fails is a row with its error."""
    q, k, v, causal, cuda, _ = inputs
    b, heads, T, d = point["batch"], point["heads"], point["T"], point["head_dim"]
    try:
        fns = make(*inputs)
    except Exception as e:                                  # e.g. our forward failing under the backward
        print(f"{point}: setup failed: {e}", flush=True)
        return [{"provider": "(setup)", **point, "error": f"{type(e).__name__}: {str(e)[:300]}"}]
    rows = []
    for provider, fn in fns.items():
        try:
            ms = H.bench({provider: fn}, repeats=3 if not cuda else H.CPU_REPEATS, rep_ms=rep_ms)[provider]
            rows.append({"provider": provider, **point, "ms": ms,
                         "tflops": _flops(b, heads, T, d, causal, point["direction"]) / ms / 1e9,
                         "peak_mb": _peak_mb(fn) if cuda else None})
        except Exception as e:                              # one provider's failure is a result, not the end
            rows.append({"provider": provider, **point, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    print(f"{point['direction']} d={d} causal={causal} T={T}: " + ", ".join(
        f"{r['provider']} {r['tflops']:.3g}" if "error" not in r else f"{r['provider']} FAILED" for r in rows),
        flush=True)
    return rows


def _ratios(rows) -> dict:
    """The targets: readouts vs our plain kernel (forward); our plain kernel vs SDPA flash (FA2),
    forward and backward; our AttnLRP backward vs our plain backward."""
    def tf(provider, r):
        return next((x.get("tflops") for x in rows if x["provider"] == provider and x["direction"] == r["direction"]
                     and x["head_dim"] == r["head_dim"] and x["causal"] == r["causal"] and x["T"] == r["T"]), None)

    def ratio(a, b):
        return a / b if a and b else None

    out = {}
    for r in rows:
        if r["provider"] != "attnfx" or "error" in r:
            continue
        key = f"{r['direction']}_d{r['head_dim']}_{'causal' if r['causal'] else 'full'}_T{r['T']}"
        out[key] = {"plain_over_fa2": ratio(r["tflops"], tf("sdpa flash (FA2)", r))}
        if r["direction"] == "forward":
            out[key]["readouts_over_plain"] = ratio(tf("attnfx+readouts", r), r["tflops"])
        else:
            out[key]["lrp_over_plain"] = ratio(tf("attnfx lrp", r), r["tflops"])
    return out


def _plot(rows, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["direction"] == "backward", r["head_dim"], r["causal"]) for r in rows})
    columns = len(panels) // 2
    fig, axes = plt.subplots(2, columns, figsize=(4.6 * columns, 8), squeeze=False)
    colours = {name: f"C{i}" for i, name in enumerate(dict.fromkeys(r["provider"] for r in rows))}
    for ax, (backward, d, causal) in zip(axes.flat, panels):
        direction = "backward" if backward else "forward"
        for name, colour in colours.items():
            pts = [(r["T"], r["tflops"]) for r in rows if r["provider"] == name and r["head_dim"] == d
                   and r["causal"] == causal and r["direction"] == direction]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name, color=colour)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(f"{direction} TFLOP/s")
        ax.set_title(f"{direction}, head_dim {d}, {'causal' if causal else 'bidirectional'}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"Attention, {H.device_name()}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
