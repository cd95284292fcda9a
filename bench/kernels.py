"""Attention forward TFLOP/s and peak memory: attnfx's Triton kernel (plain, + head scales,
+ readouts, + attention mass) against SDPA's flash and cuDNN backends and FlexAttention.

    python bench/kernels.py            # CUDA: bf16, head_dim 64/128, T = 512 … 16k, causal and not
    python bench/kernels.py --quick    # a smoke run; on CPU it runs the kernel in Triton's interpreter

FLOPs = 4·b·H·T²·d, halved when causal. The token count b·T is held at 16k and H·d at 2048, so
every point does the same work per token. Results: bench/results/<device>/kernels.{json,png}.
The backward columns come with the backward kernel.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"                 # before the kernel module is imported

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H                                     # noqa: E402

from attnfx.kernels.attention import attention_fwd        # noqa: E402

TOKENS, WIDTH = 16384, 2048
DIRECTIONS, SPANS = 8, 4


def _flops(b, h, t, d, causal) -> float:
    return 4 * b * h * t * t * d / (2 if causal else 1)


def _providers(q, k, v, causal: bool, cuda: bool) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
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

    def sdpa(backend):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return run

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention)
    mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, T, T) if causal else None
    fns["sdpa flash (FA2)"] = sdpa(SDPBackend.FLASH_ATTENTION)
    fns["sdpa cuDNN"] = sdpa(SDPBackend.CUDNN_ATTENTION)
    fns["FlexAttention"] = lambda: flex(q, k, v, block_mask=mask)
    return fns


def _peak_mb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main() -> None:
    args = H.parse_args(H.cli(__doc__.split("\n")[0]))
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    lengths = [512, 1024, 2048, 4096, 8192, 16384] if cuda and not args.quick else [64, 128]
    tokens = TOKENS if cuda and not args.quick else 128
    rows = []
    for d in (64, 128):
        heads = WIDTH // d if cuda and not args.quick else 2
        for causal in (True, False):
            for T in lengths:
                b = max(1, tokens // T)
                q, k, v = (torch.randn(b, heads, T, d, device=device, dtype=dtype) for _ in range(3))
                fns = _providers(q, k, v, causal, cuda)
                times = H.bench(fns, repeats=3 if not cuda else H.CPU_REPEATS)
                for name, ms in times.items():
                    rows.append({"provider": name, "head_dim": d, "causal": causal, "T": T, "batch": b,
                                 "heads": heads, "dtype": str(dtype).removeprefix("torch."), "ms": ms,
                                 "tflops": _flops(b, heads, T, d, causal) / ms / 1e9,
                                 "peak_mb": _peak_mb(fns[name]) if cuda else None})
                print(f"d={d} causal={causal} T={T}: " +
                      ", ".join(f"{n} {r['tflops']:.3g}" for n, r in ((r["provider"], r) for r in rows[-len(times):])),
                      flush=True)
    ratios = _ratios(rows)
    path = H.write_json("kernels", {"direction": "forward", "tokens": tokens, "width": WIDTH, "rows": rows,
                                    "ratios": ratios, "interpreted": not cuda}, args.out)
    _plot(rows, path.with_suffix(".png"))
    print(f"ratios: {ratios}\nwrote {path}")


def _ratios(rows) -> dict:
    """The targets: readouts vs our plain kernel; our plain kernel vs SDPA flash at d 128, T ≥ 2k."""
    def tf(provider, r):
        return next((x["tflops"] for x in rows if x["provider"] == provider and x["head_dim"] == r["head_dim"]
                     and x["causal"] == r["causal"] and x["T"] == r["T"]), None)

    out = {}
    for r in rows:
        if r["provider"] != "attnfx":
            continue
        key = f"d{r['head_dim']}_{'causal' if r['causal'] else 'full'}_T{r['T']}"
        readouts, flash = tf("attnfx+readouts", r), tf("sdpa flash (FA2)", r)
        out[key] = {"readouts_over_plain": readouts / r["tflops"] if readouts else None,
                    "plain_over_fa2": r["tflops"] / flash if flash else None}
    return out


def _plot(rows, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["head_dim"], r["causal"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), squeeze=False)
    for ax, (d, causal) in zip(axes[0], panels):
        for i, name in enumerate(dict.fromkeys(r["provider"] for r in rows)):
            pts = [(r["T"], r["tflops"]) for r in rows if r["provider"] == name and r["head_dim"] == d
                   and r["causal"] == causal]
            ax.plot(*zip(*pts), marker="o", label=name, color=f"C{i}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("forward TFLOP/s")
        ax.set_title(f"head_dim {d}, {'causal' if causal else 'bidirectional'}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Attention forward, {H.device_name()}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
