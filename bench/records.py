"""What recording costs (issue 14), two parts in one run:

overhead: the default model (GPT-2 shape: 4 layers, 8 heads, d_model 128; batch 8 × T 128, its
    longest) — the bare model eager, the bare model under torch.compile, attnfx with no record, and
    attnfx recording everything for all layers (RECORD_ALL) — per torch.compile backend.
lengths: attention statistics vs the pattern of one layer on a random 2-layer Llama (4 heads of
    d 64, 2 kv heads), batch 1, T = 256 … 8k: attnfx with no record, recording "attention_stats"
    on two key spans, recording "pattern". The statistics must stay O(T) in memory; the pattern
    series stops (and says why) where it would not fit in memory or time.

Time: the harness timer (median), here. Peak memory: in a child process built the same way, started
with glibc's mmap threshold fixed (MEMORY_METHOD). Fixed, it slows calls (sys 13 s vs 4 s on a T ≤ 2k
sweep); fixed late, in a heap holding freed blocks, it left 20-40 MiB of reused pages in every
reading. "peak": what one call adds above the memory live before it; "retained": what is still
held after it (outputs and records).

    python bench/records.py [--quick] [--part overhead|lengths|all] [--lengths 256 1024 ...]
    python bench/records.py --table       # README tables from bench/results/<device>/records.json
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.utils._pytree as pytree
from torch._dynamo.utils import counters
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

import attnfx
from _harness import CPU_REPEATS, bench, cli, device_name, device_slug, parse_args, write_json
from attnfx.models.loader import load_default

RECORD_ALL = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "mlp_hidden", "q", "k", "v", "z",
              "pattern", "attention_stats", "loss")
OVERHEAD = dict(batch=8, seq=128)          # the default model's n_positions: its longest input
QUICK_OVERHEAD = dict(batch=2, seq=32)
LLAMA = dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=512, vocab_size=256, max_position_embeddings=8192)   # head_dim 64
LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
QUICK_LENGTHS = (128, 256)
LAYER = 0                                  # the layer whose statistics / pattern are recorded
SPANS = lambda t: [(0, 4), (t // 2, t)]    # noqa: E731  (attention sink, second half of the keys)
COMPILE_CALLS = 2                          # attnfx marks the shared input dynamic on its first call: the bare
                                           # compiled forward recompiles once on its second
MEMORY_REPEATS = 3                         # after one warm call; with the threshold fixed, repeats agree to 0.1 MiB
SWEEP_BUDGET_S = 40                        # timing budget per length and provider: caps repeats at long T
MIN_REPEATS = 3
PATTERN_COPIES = 4                         # [b, H, T, S] fp32 tensors alive at once when recording the
                                           # pattern (scores, masked, softmax, result): a feasibility estimate
MEMORY_FRACTION = 0.5                      # of MemAvailable a pattern call may be estimated to take
PATTERN_CALL_LIMIT_S = 120                 # skip a pattern length whose one call would exceed this (T² from the last)
SLOPE_FROM_T = 1024                        # fit memory ∝ T^slope from here on: below, fixed costs dominate
PINNED_MMAP_THRESHOLD = 64 * 1024          # glibc: blocks ≥ 64 KiB are mmapped, and unmapped on free
MIB = 2 ** 20
LABELS = {"eager": "bare model, eager", "compiled": "bare model, torch.compile", "attnfx": "attnfx, no record",
          "attnfx+record_all": "attnfx, record everything", "plain": "no record", "stats": "attention_stats",
          "pattern": "pattern"}
MEMORY_METHOD = {
    "cpu": "Linux VmHWM − VmRSS in a child process started with MALLOC_MMAP_THRESHOLD_=65536 (glibc: blocks "
           "≥ 64 KiB mmapped and unmapped on free, no dynamic threshold that keeps freed blocks ≤ 32 MiB in the "
           "heap): before each call malloc_trim(0), then /proc/self/clear_refs ← 5 resets the peak RSS to the "
           "current RSS; VmHWM after the call is its peak. Counts touched pages of every allocation (torch, "
           "Python, oneDNN scratch). One warm call, then the median of 3.",
    "cuda": "torch.cuda.max_memory_allocated() − memory_allocated() before the call, after "
            "reset_peak_memory_stats (torch's allocator only), in a child process. One warm call, then median of 3.",
}


# ---- memory (in the child process) ---------------------------------------------------------------
def _proc_bytes(key: str, file: str = "/proc/self/status") -> int:
    with open(file) as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))     # kB


def _one_peak(fn, libc) -> tuple[float, float]:
    """(peak MiB above the memory before the call, MiB still held after it while its result lives)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base, out = torch.cuda.memory_allocated(), fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / MIB, (torch.cuda.memory_allocated() - base) / MIB
    libc.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")     # VmHWM ← VmRSS
    base, out = _proc_bytes("VmRSS"), fn()            # noqa: F841  (held while VmRSS is read)
    return (_proc_bytes("VmHWM") - base) / MIB, (_proc_bytes("VmRSS") - base) / MIB


def peak_memory(fn, libc) -> dict[str, float]:
    fn()                                             # compiles here; allocator and oneDNN caches of this shape
    peaks, kept = zip(*(_one_peak(fn, libc) for _ in range(MEMORY_REPEATS)))
    return {"peak_mib": statistics.median(peaks), "retained_mib": statistics.median(kept)}


def memory_child(plan: dict) -> dict:
    """The child's whole run: the plan's configurations built as the parent built them, measured."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != str(PINNED_MMAP_THRESHOLD) and not torch.cuda.is_available():
        raise RuntimeError("the memory child needs MALLOC_MMAP_THRESHOLD_ fixed from its start (see MEMORY_METHOD)")
    libc, found = ctypes.CDLL("libc.so.6"), {"overhead": {}, "lengths": []}
    with torch.no_grad():
        for backend in plan["backends"]:
            fns = overhead_providers(backend, plan["case"])
            found["overhead"][backend] = {name: peak_memory(fn, libc) for name, fn in fns.items()}
        im = llama() if plan["lengths"] else None
        for t, with_pattern in plan["lengths"]:
            fns = length_providers(im, t)
            if not with_pattern:
                del fns["pattern"]
            found["lengths"].append({name: peak_memory(fn, libc) for name, fn in fns.items()})
    return found


def measure_memory(plan: dict, threads: int) -> dict:
    """Runs memory_child(plan) in a fresh process with the mmap threshold fixed from its start."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(PINNED_MMAP_THRESHOLD)}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "plan.json"
        path.write_text(json.dumps(plan))
        subprocess.run([sys.executable, __file__, "--threads", str(threads), "--memory-child", str(path)],
                       env=env, check=True)
        return json.loads(path.with_suffix(".result.json").read_text())


def _tensor_mib(tree) -> float:
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)) / MIB


# ---- part 1: recording everything vs a plain forward ------------------------------------------------
def overhead_providers(backend: str, case: dict) -> dict:
    """The four ways to run the default model; each returns what it keeps (output, and the recording),
    so "retained" counts it. Every call computes HF's loss: the record adds the per-token loss."""
    model = load_default("cuda" if torch.cuda.is_available() else "cpu")[0]     # one instrumented copy per backend
    ids = torch.randint(5, model.config.vocab_size, (case["batch"], case["seq"]),
                        generator=torch.Generator().manual_seed(0)).to(model.device)
    inputs = {"input_ids": ids, "labels": ids}
    im = attnfx.instrument(model, backend=backend)
    compiled = torch.compile(model.forward, backend=im.backend)
    spans = SPANS(case["seq"])

    def record_all():
        with im.record(*RECORD_ALL, spans=spans) as rec:
            return im(**inputs), rec
    return {"eager": lambda: model(**inputs), "compiled": lambda: compiled(**inputs),
            "attnfx": lambda: im(**inputs), "attnfx+record_all": record_all}


def time_overhead(backend: str, case: dict) -> dict:
    fns = overhead_providers(backend, case)
    with torch.no_grad():
        for _ in range(COMPILE_CALLS):
            outs = {name: fn() for name, fn in fns.items()}
        out, rec = outs["attnfx+record_all"]
        change = (out.logits - outs["attnfx"].logits).abs().max().item()
        if change != 0.0:
            raise AssertionError(f"recording changed the logits by {change:.2e}")
        graphs = counters["stats"]["unique_graphs"]
        times = bench(fns)
    return {"times_ms": times, "records_mib": _tensor_mib(rec.calls[-1]),
            "recompiles_while_timing": counters["stats"]["unique_graphs"] - graphs}


def _overhead_ratios(result: dict) -> dict:
    times, memory = result["times_ms"], result["memory"]
    return {f"{a}/{b}": {"time": times[a] / times[b], "peak": memory[a]["peak_mib"] / memory[b]["peak_mib"]}
            for a, b in (("attnfx+record_all", "attnfx"), ("attnfx", "compiled"), ("compiled", "eager"))}


# ---- part 2: attention statistics vs the pattern, over T ---------------------------------------------
def llama():
    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA, attn_implementation="sdpa", bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(config).to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return attnfx.instrument(model)


def length_providers(im, t: int) -> dict:
    ids = torch.randint(1, im.model.config.vocab_size, (1, t), generator=torch.Generator().manual_seed(t))
    ids, spans = ids.to(im.model.device), SPANS(t)

    def recorded(kinds, **kw):
        def call():
            with im.record(*kinds, layers=[LAYER], **kw) as rec:
                return im(input_ids=ids), rec
        return call
    return {"plain": lambda: im(input_ids=ids), "stats": recorded(("attention_stats",), spans=spans),
            "pattern": recorded(("pattern",))}


def _available_bytes() -> int:
    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else _proc_bytes("MemAvailable", "/proc/meminfo")


def _pattern_skip(t: int, heads: int, last: tuple[int, float] | None) -> str | None:
    """Why the pattern is not measured at length t, or None: estimated memory or time too large."""
    need, free = PATTERN_COPIES * heads * t * t * 4 / 2 ** 30, _available_bytes() / 2 ** 30
    seconds = last[1] * (t / last[0]) ** 2 if last else 0.0
    if need > MEMORY_FRACTION * free:
        return (f"skipped: {PATTERN_COPIES} × [1, {heads}, T, T] fp32 = {need:.1f} GiB > "
                f"{MEMORY_FRACTION} × {free:.1f} GiB free")
    if seconds > PATTERN_CALL_LIMIT_S:
        return f"skipped: one call estimated at {seconds:.0f} s (T² from T = {last[0]}) > {PATTERN_CALL_LIMIT_S} s"
    return None


def _agreement(fns) -> float:
    """max |mass − the pattern summed over each span| at this length: both record the same attention."""
    _, stats = fns["stats"]()
    _, rec = fns["pattern"]()
    pattern, mass = rec["pattern", LAYER], stats["mass"][LAYER]                    # [b, H, T, S], [b, T, H, n]
    t = pattern.shape[-1]
    want = torch.stack([pattern[..., a:b].sum(-1) for a, b in SPANS(t)], dim=-1).transpose(1, 2)
    return (mass - want).abs().max().item()


def _repeats(fns) -> tuple[int, dict]:
    """Calls each provider once (the warmup, after compiling) and fits the repeats to SWEEP_BUDGET_S."""
    seconds = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        seconds[name] = time.perf_counter() - start
    return max(MIN_REPEATS, min(CPU_REPEATS, int(SWEEP_BUDGET_S / max(seconds.values())))), seconds


def time_length(im, t: int, last_pattern) -> dict:
    heads = im.model.config.num_attention_heads
    fns = length_providers(im, t)
    skip = _pattern_skip(t, heads, last_pattern)
    row = {"T": t, "pattern_status": skip or "measured"}
    with torch.no_grad():
        if skip:
            del fns["pattern"]
        else:
            row["max_abs_err_mass_vs_pattern"] = _agreement(fns)         # also compiles both at this length
        fns["plain"]()
        row["repeats"], row["first_call_s"] = _repeats(fns)
        row["times_ms"] = bench(fns, repeats=row["repeats"])
    row["analytic_mib"] = {"pattern": heads * t * t * 4 / MIB,
                           "stats": heads * t * (1 + len(SPANS(t))) * 4 / MIB}   # lse + mass, fp32
    return row


def _slope(rows: list[dict], provider: str, above_plain: bool) -> float | None:
    """Least-squares slope of log(peak MiB) over log(T) from SLOPE_FROM_T on: 1 is O(T), 2 is O(T²);
    above_plain: of the peak above the same call without a record."""
    pts = [(r["T"], r["memory"][provider]["peak_mib"] - (r["memory"]["plain"]["peak_mib"] if above_plain else 0))
           for r in rows if provider in r["memory"] and r["T"] >= SLOPE_FROM_T]
    pts = [(math.log(t), math.log(m)) for t, m in pts if m > 0]
    if len(pts) < 2:
        return None
    mx, my = statistics.fmean(x for x, _ in pts), statistics.fmean(y for _, y in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def time_lengths(lengths) -> dict:
    im, rows, last = llama(), [], None
    for t in tqdm(lengths, desc="records: time over T"):
        row = time_length(im, t, last)
        if "pattern" in row["times_ms"]:
            last = (t, row["first_call_s"]["pattern"])
        rows.append(row)
        tqdm.write(f"T={t}: " + "  ".join(f"{k} {v:.1f} ms" for k, v in row["times_ms"].items()))
    return {"model": {"family": "llama", **LLAMA, "dtype": str(im.model.dtype)}, "backend": im.backend,
            "layer": LAYER, "spans": "[(0, 4), (T // 2, T)]", "rows": rows}


# ---- plot, tables, CLI ------------------------------------------------------------------------------
def _plot_overhead(ax, overhead: dict) -> None:
    providers = list(next(iter(overhead.values()))["times_ms"])
    width = 0.8 / len(overhead)
    for i, (backend, result) in enumerate(overhead.items()):
        xs = [p + i * width for p in range(len(providers))]
        bars = ax.bar(xs, [result["times_ms"][p] for p in providers], width, label=f"backend {backend}")
        ax.bar_label(bars, [f"{result['memory'][p]['peak_mib']:.3g} MiB" for p in providers], padding=2, fontsize=7)
    ax.set_xticks([p + width * (len(overhead) - 1) / 2 for p in range(len(providers))],
                  [LABELS[p].replace(", ", ",\n") for p in providers], fontsize=8)
    ax.set_ylabel("time (ms, median); bar label: peak memory")
    ax.set_title("default model: record everything, all layers", fontsize=9)
    ax.legend(fontsize=8)


def _plot_lengths(ax_mem, ax_time, lengths: dict) -> None:
    rows = lengths["rows"]
    for i, provider in enumerate(("plain", "stats", "pattern")):
        pts = [(r["T"], r["memory"][provider]["peak_mib"], r["times_ms"][provider])
               for r in rows if provider in r["times_ms"]]
        ax_mem.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i}", label=LABELS[provider])
        ax_time.plot([p[0] for p in pts], [p[2] for p in pts], "o-", color=f"C{i}", label=LABELS[provider])
    ts = [r["T"] for r in rows]
    ax_mem.plot(ts, [r["analytic_mib"]["pattern"] for r in rows], "k--", lw=0.8, label="one [1, H, T, T] fp32")
    for ax, label in ((ax_mem, "peak memory above the call's start (MiB)"), (ax_time, "time (ms, median)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (batch 1)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    ax_mem.set_title(f"one layer's attention_stats vs pattern ({lengths['model']['num_attention_heads']} heads)",
                     fontsize=9)


def plot(path: Path, result: dict) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = int("overhead" in result) + 2 * int("lengths" in result)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.4), squeeze=False)
    axes = list(axes[0])
    if "overhead" in result:
        _plot_overhead(axes.pop(0), result["overhead"])
    if "lengths" in result:
        _plot_lengths(axes[0], axes[1], result["lengths"])
    fig.suptitle(f"{path.parent.name} · {result['cpu_threads']} thread(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _cell(times: dict, memory: dict, provider: str, digits: int) -> str:
    if provider not in times:
        return "not run (see JSON)"
    return f"{times[provider]:.{digits}f} ms · {memory[provider]['peak_mib']:.1f} MiB"


def table(result: dict) -> str:
    """The README's markdown tables, time (median) · peak memory per provider: 4 + len(lengths) rows."""
    lines = []
    if "overhead" in result:
        overhead = result["overhead"]
        lines += ["| default model, batch {batch} × T {seq} | ".format(**result["overhead_case"]) +
                  " | ".join(f"backend {b}" for b in overhead) + " |", "|---" * (1 + len(overhead)) + "|"]
        for p in next(iter(overhead.values()))["times_ms"]:
            lines.append(f"| {LABELS[p]} | " + " | ".join(_cell(r["times_ms"], r["memory"], p, 1)
                                                  for r in overhead.values()) + " |")
        lines.append("")
    if "lengths" in result:
        lines += ["| T (1 layer recorded) | no record | attention_stats | pattern |", "|---|---|---|---|"]
        for r in result["lengths"]["rows"]:
            cells = [_cell(r["times_ms"], r["memory"], p, 0) for p in ("plain", "stats", "pattern")]
            lines.append(f"| {r['T']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _merge_memory(result: dict, memory: dict) -> None:
    for backend, found in memory["overhead"].items():
        result["overhead"][backend]["memory"] = found
        result["overhead"][backend]["ratios"] = _overhead_ratios(result["overhead"][backend])
    if "lengths" in result:
        rows = result["lengths"]["rows"]
        for row, found in zip(rows, memory["lengths"]):
            row["memory"] = found
        result["lengths"]["loglog_slopes"] = {"from_T": SLOPE_FROM_T, **{
            f"{p}_peak" + ("_above_plain" if above else ""): _slope(rows, p, above)
            for p in ("plain", "stats", "pattern") for above in (False, True) if not (above and p == "plain")}}
        last = rows[-1]                # bytes a record adds per token at the longest T: flat for O(T)
        result["lengths"]["extra_bytes_per_token_at_longest_T"] = {"T": last["T"], **{
            p: (last["memory"][p]["peak_mib"] - last["memory"]["plain"]["peak_mib"]) * MIB / last["T"]
            for p in ("stats", "pattern") if p in last["memory"]}}


def run(args) -> dict:
    """Times every configuration here, then measures its memory in the child."""
    result = {"memory_method": MEMORY_METHOD["cuda" if torch.cuda.is_available() else "cpu"],
              "record_all": RECORD_ALL}
    plan = {"backends": [], "case": None, "lengths": []}
    if args.part in ("overhead", "all"):
        default = ("inductor",) if torch.cuda.is_available() else ("eager",) if args.quick else ("eager", "inductor")
        plan["backends"], plan["case"] = args.backends or default, QUICK_OVERHEAD if args.quick else OVERHEAD
        result["overhead_case"] = plan["case"]
        result["overhead"] = {b: time_overhead(b, plan["case"])
                              for b in tqdm(plan["backends"], desc="records: overhead")}
    if args.part in ("lengths", "all"):
        result["lengths"] = time_lengths(args.lengths or (QUICK_LENGTHS if args.quick else LENGTHS))
        plan["lengths"] = [(r["T"], "pattern" in r["times_ms"]) for r in result["lengths"]["rows"]]
    _merge_memory(result, measure_memory(plan, torch.get_num_threads()))
    return result


def main() -> None:
    parser = cli(__doc__.splitlines()[0])
    parser.add_argument("--part", default="all", choices=("overhead", "lengths", "all"))
    parser.add_argument("--lengths", type=int, nargs="+", help=f"sequence lengths (default {LENGTHS})")
    parser.add_argument("--backends", nargs="+", choices=("eager", "aot_eager", "inductor"),
                        help="torch.compile backends of the overhead part (default: eager and inductor on CPU)")
    parser.add_argument("--table", action="store_true", help="print the README tables from the JSON and exit")
    parser.add_argument("--memory-child", type=Path, help=argparse.SUPPRESS)     # measure_memory's child
    args = parse_args(parser)
    name = "records" + ("_quick" if args.quick else "")
    if args.memory_child:
        found = memory_child(json.loads(args.memory_child.read_text()))
        args.memory_child.with_suffix(".result.json").write_text(json.dumps(found))
        return
    if args.table:
        print(table(json.loads((args.out / device_slug(device_name()) / f"{name}.json").read_text())))
        return
    start = time.perf_counter()
    result = run(args)
    result["wall_s"] = time.perf_counter() - start
    path = write_json(name, result, args.out)
    plot(path.with_suffix(".png"), json.loads(path.read_text()))
    print(path)
    print(table(result))


if __name__ == "__main__":
    main()
