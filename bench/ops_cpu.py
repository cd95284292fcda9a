"""attnfx's C++ ops (attnfx._C) against the plain-torch references, as reference_ms / cpp_ms.

    python bench/ops_cpu.py            # CPU: fp32 and bf16, 1 and 2 threads
    python bench/ops_cpu.py --quick    # small sizes: a smoke run, not a measurement

Sizes: b·t = 4096 tokens, H = 12 heads of d = 64 (d_model 768), K = 8 readout directions,
contributions of 3 heads at every position; attention statistics at T = S = 1024 and 2048
(causal, 4 kv heads, 4 key spans); LRP rules on the MLP activation [4096, 3072] and the norms'
[4096, 768], forward and backward. Every provider calls the same torch.ops.attnfx op with one
implementation forced (attnfx.set_backend). On CUDA the CUDA kernels are compared with the
reference and, for attention statistics, with the Triton attention forward (write_o=False).
Results: bench/results/<device>/ops_cpu.{json,png}.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H                                     # noqa: E402

import attnfx                                            # noqa: E402
import attnfx.ops                                        # noqa: E402,F401  (registers the ops)

ops = torch.ops.attnfx
TOKENS, HEADS, HEAD_DIM, DIRECTIONS, MLP = 4096, 12, 64, 8, 3072
SEQS, KV_HEADS = (1024, 2048), 4
ATTENTION_REPEATS = 5     # a reference call at T = 2048 builds four [12, 2048, 2048] fp32 tensors: ~1 s


def _cases(dtype, device, quick: bool):
    """(op, case name, fn(), repeats) for every workload; fn calls the op with its inputs bound."""
    tokens, seqs = (256, (128,)) if quick else (TOKENS, SEQS)
    r = lambda *shape: torch.randn(*shape, device=device).to(dtype)    # noqa: E731
    d_model = HEADS * HEAD_DIM
    z, u, w_o = r(4, tokens // 4, HEADS, HEAD_DIM), r(HEADS, HEAD_DIM, DIRECTIONS), r(d_model, d_model)
    act_x, norm_x, w = r(tokens, MLP), r(tokens, d_model), r(d_model)
    cases = [("head_readout", f"z [{tokens} tok, 12, 64] · u [12, 64, 8]", lambda: ops.head_readout(z, u), None),
             ("head_contrib", "3 heads, all positions", lambda: ops.head_contrib(z, w_o, [0, 5, 11], None), None)]
    for T in seqs:
        q, k = r(1, HEADS, T, HEAD_DIM), r(1, KV_HEADS, T, HEAD_DIM)
        spans = torch.tensor([[0, 4], [T // 4, T // 2], [T // 2, T], [T - 64, T]])
        cases.append(("attention_stats", f"T = S = {T}", lambda q=q, k=k, s=spans: ops.attention_stats(
            q, k, None, s, True, HEAD_DIM ** -0.5), ATTENTION_REPEATS))
    cases += [
        ("lrp_act", f"gelu fwd [{tokens}, {MLP}]", lambda: ops.lrp_act(act_x, "gelu", 1e-6), None),
        ("lrp_act", f"gelu bwd [{tokens}, {MLP}]", lambda: ops.lrp_act_backward(act_x, act_x, "gelu", 1e-6), None),
        ("lrp_layer_norm", f"fwd [{tokens}, {d_model}]", lambda: ops.lrp_layer_norm(norm_x, w, w, 1e-5), None),
        ("lrp_layer_norm", f"bwd [{tokens}, {d_model}]", lambda: ops.lrp_layer_norm_backward(norm_x, norm_x, w, 1e-5), None),
        ("lrp_rms_norm", f"fwd [{tokens}, {d_model}]", lambda: ops.lrp_rms_norm(norm_x, w, 1e-6), None),
        ("lrp_rms_norm", f"bwd [{tokens}, {d_model}]", lambda: ops.lrp_rms_norm_backward(norm_x, norm_x, w, 1e-6), None),
    ]
    return cases


def _forced(op: str, name: str, fn):
    def run():
        attnfx.set_backend(name, op=op)
        try:
            return fn()
        finally:
            attnfx.set_backend(None, op=op)
    return run


def _providers(op: str, fn, cuda: bool) -> dict:
    names = ["reference", "cpp"] + (["triton"] if cuda and op == "attention_stats" else [])
    return {name: _forced(op, name, fn) for name in names}


def _measure(dtype, device, threads: int, quick: bool) -> list[dict]:
    rows = []
    for op, case, fn, repeats in _cases(dtype, device, quick):
        ms = H.bench(_providers(op, fn, device == "cuda"), **({"repeats": repeats} if repeats else {}))
        row = {"op": op, "case": case, "dtype": str(dtype).removeprefix("torch."), "threads": threads, "ms": ms,
               "reference_over_cpp": ms["reference"] / ms["cpp"]}
        if "triton" in ms:
            row["triton_over_cuda"] = ms["triton"] / ms["cpp"]
        rows.append(row)
        print(f"{op:<16} {case:<34} {row['dtype']:<9} {threads} thr  " +
              "  ".join(f"{k} {v:8.2f} ms" for k, v in ms.items()) + f"  ratio {row['reference_over_cpp']:.2f}")
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({r["threads"] for r in rows})
    labels = list(dict.fromkeys(f"{r['op']}: {r['case']} ({r['dtype']})" for r in rows))
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(labels) * len(groups) + 1.5))
    height = 0.8 / len(groups)
    for gi, threads in enumerate(groups):
        ratio = {f"{r['op']}: {r['case']} ({r['dtype']})": r["reference_over_cpp"] for r in rows if r["threads"] == threads}
        ys = [i + gi * height for i in range(len(labels))]
        bars = ax.barh(ys, [ratio.get(label, 0) for label in labels], height, label=f"{threads} thread(s)")
        ax.bar_label(bars, [f"{ratio.get(label, 0):.1f}×" for label in labels], padding=2, fontsize=7)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(labels))], labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("reference ms / C++ ms (> 1: C++ faster)")
    ax.legend(loc="lower right")
    ax.set_title(f"attnfx._C vs the torch reference — {H.device_name()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")            # the long case labels
    plt.close(fig)


def main() -> None:
    parser = H.cli(__doc__.split("\n")[0])
    parser.add_argument("--thread-counts", type=int, nargs="+", default=[1, 2], help="CPU thread counts to run")
    args = H.parse_args(parser)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    rows = []
    for threads in ([0] if cuda else args.thread_counts):
        if not cuda:
            torch.set_num_threads(threads)
        for dtype in (torch.float32, torch.bfloat16):
            rows += _measure(dtype, device, threads, args.quick)
    name = "ops_cpu" + ("_quick" if args.quick else "")
    path = H.write_json(name, {"quick": args.quick, "rows": rows}, args.out)
    _plot(rows, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
