"""The one benchmark harness (STYLE 10): a CLI, a timer, device and version metadata, and
results written as JSON (+ a bar plot) under bench/results/<device>/."""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CPU_WARMUP = 1          # calls before timing on CPU; compilation is warmed up by the caller
CPU_REPEATS = 15        # median of 15 rounds: on a shared 2-core CPU, medians of 7 still moved ±10% run to run
CPU_THREADS = 1         # cores here are shared: at load 4 on 2 cores, 2 OpenMP threads stalled an
                        # eager generate() from 0.2 s to 5-12 s (a descheduled thread blocks every op)
GPU_WARMUP_MS = 200     # do_bench warmup budget
GPU_REP_MS = 2000       # do_bench budget: leaves ≥ 5 repeats for a ~300 ms generate() call


def cli(description: str) -> argparse.ArgumentParser:
    """The common flags; a benchmark adds its own and calls parse_args()."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not a measurement")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results root (default: bench/results)")
    parser.add_argument("--threads", type=int, default=CPU_THREADS, help="torch CPU threads (ignored on CUDA)")
    return parser


def parse_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parses the CLI and applies --threads before anything compiles (Inductor bakes it in)."""
    args = parser.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
    return args


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu-{platform.processor() or _cpu_model()}-{os.cpu_count()}cores"


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _git_commit() -> str:
    """HEAD, with "+dirty" when the working tree differs (src/ is often edited under a benchmark)."""
    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=RESULTS.parent, capture_output=True, text=True).stdout.strip()
    return (git("rev-parse", "--short", "HEAD") or "unknown") + ("+dirty" if git("status", "--porcelain", "src") else "")


def versions() -> dict[str, str]:
    import transformers

    found = {"python": platform.python_version(), "torch": torch.__version__,
             "transformers": transformers.__version__, "attnfx_git": _git_commit()}
    try:
        import triton
        found["triton"] = triton.__version__
    except ImportError:
        pass
    return found


def _wall_clock_ms(fns: dict, repeats: int) -> dict[str, float]:
    """Round-robin over the providers, so background load on a shared CPU hits all alike."""
    def once(fn) -> float:
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1e3

    samples = {name: [] for name in fns}
    for i in range(CPU_WARMUP + repeats):
        for name, fn in fns.items():
            ms = once(fn)
            if i >= CPU_WARMUP:
                samples[name].append(ms)
    return {name: statistics.median(times) for name, times in samples.items()}


def bench(fns: dict, repeats: int = CPU_REPEATS, rep_ms: int = GPU_REP_MS) -> dict[str, float]:
    """Median time in ms of each provider fn(): triton's do_bench on CUDA (rep_ms of timing),
    else an interleaved median wall clock."""
    if torch.cuda.is_available():
        from triton.testing import do_bench
        return {name: float(do_bench(fn, warmup=min(GPU_WARMUP_MS, rep_ms), rep=rep_ms, return_mode="median"))
                for name, fn in fns.items()}
    return _wall_clock_ms(fns, repeats)


def write_json(name: str, payload: dict, out: Path = RESULTS) -> Path:
    """Writes <out>/<device-slug>/<name>.json with device, versions and timestamp added."""
    device = device_name()
    record = {"name": name, "device": device, "versions": versions(), "argv": sys.argv[1:],
              "cpu_threads": torch.get_num_threads(),
              "load_average_1min": os.getloadavg()[0],     # other processes on the machine while timing
              "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              **payload}
    path = Path(out) / device_slug(device) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def bar_plot(path: Path, title: str, times: dict[str, dict[str, float]],
             notes: dict[str, dict[str, str]]) -> Path:
    """One panel per group (workload), one bar per provider (ms), each bar labelled by notes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(times), figsize=(4.5 * len(times), 4.2), squeeze=False)
    for ax, (group, by_provider) in zip(axes[0], times.items()):
        names, values = list(by_provider), list(by_provider.values())
        bars = ax.bar(names, values, color=[f"C{i}" for i in range(len(names))])
        ax.bar_label(bars, [notes.get(group, {}).get(n, "") for n in names], padding=3)
        ax.set_ylim(0, max(values) * 1.2)
        ax.set_title(group)
        ax.set_ylabel("time (ms, median)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


MIB = 2 ** 20


def peak_mib(fn) -> float:
    """The peak memory fn() adds above what was live before it, in MiB: CUDA's allocator peak, or on
    the CPU Linux's peak RSS (VmHWM) reset to the current RSS (/proc/self/clear_refs ← 5) after
    returning freed heap pages (malloc_trim)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return (torch.cuda.max_memory_allocated() - base) / MIB
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")          # VmHWM ← VmRSS
    base = _status("VmRSS")
    fn()
    return (_status("VmHWM") - base) / MIB


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
