"""Compile every variant of the attention kernels for Hopper (sm_90) without a GPU and report
what ptxas made of each: block sizes, warps, stages, registers, spills, shared memory and the
matrix instruction (wgmma, mma.sync, or neither: FMA).

    python tools/sm90_table.py            # Markdown table
    python tools/sm90_table.py --write    # the table into docs/guides/ops.md, between its markers
    python tools/sm90_table.py --json     # rows for tests/test_sm90_compile.py

Each variant runs the real launcher (src/attnfx/kernels/attention.py) on small CPU tensors with the launch
recorded instead of run, so the block sizes, warps, stages and argument specialisations are the
ones a CUDA call would use; the recorded call is then bound and compiled as Triton's JIT would,
for the target GPUTarget("cuda", 90, 32). Registers and spills come from ptxas's own -v log
(Triton runs ptxas with -v; TRITON_DUMP_PTXAS_LOG makes it print the log), shared memory from
the compiled kernel's metadata, the instruction kind from the PTX. Needs Triton's NVIDIA backend
and its bundled ptxas, and TRITON_INTERPRET unset: the interpreter replaces compilation.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from marked_blocks import between, replace_between

SM90 = ("cuda", 90, 32)
SEQ = 512                   # a multiple of 16, as long sequences usually are (it sets Triton's divisibility hints)
HEADS, KV_HEADS = 4, 1      # GQA 4:1 (a group of 1 would be specialised away)
DIRECTIONS, SPANS = 4, 3    # readout directions [H, d, K], key spans [n, 2]
FORWARD_EXTRAS = ("plain", "head scale", "readouts", "span mass", "lse")


def variants():
    """(name, call) for each variant: call(attention module) runs its launcher once."""
    out = []
    for dtype_name in ("bf16", "fp16"):
        dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[dtype_name])
        for d in (64, 128):
            for causal in (False, True):
                tag = f"d{d} {dtype_name} {'causal' if causal else 'full'}"
                for extra in FORWARD_EXTRAS:
                    out.append((f"fwd {tag} {extra}", _forward_call(d, dtype, causal, extra)))
                for lrp in (False, True):
                    out.append((f"bwd {tag} {'lrp' if lrp else 'plain'}", _backward_call(d, dtype, causal, lrp)))
    return out


def _qkv(d, dtype):
    q = torch.zeros(1, HEADS, SEQ, d, dtype=dtype)
    k, v = (torch.zeros(1, KV_HEADS, SEQ, d, dtype=dtype) for _ in range(2))
    return q, k, v


def _forward_call(d, dtype, causal, extra):
    def call(attention):
        q, k, v = _qkv(d, dtype)
        kw = {"head scale": dict(head_scale=torch.ones(HEADS)),
              "readouts": dict(directions=torch.zeros(HEADS, d, DIRECTIONS)),
              "span mass": dict(spans=torch.tensor([[0, 4], [SEQ // 2, SEQ], [4, 64]][:SPANS]))}.get(extra, {})
        attention.attention_fwd(q, k, v, causal=causal, write_lse=extra == "lse", **kw)
    return call


def _backward_call(d, dtype, causal, lrp):
    def call(attention):
        q, k, v = _qkv(d, dtype)
        lse = torch.zeros(1, HEADS, SEQ)
        attention.attention_bwd(torch.zeros_like(q), q, k, v, q, lse, causal=causal, lrp=lrp)
    return call


class _Recorder:
    """Stands in for a launcher: kernel[grid](*args, **kwargs) records the call instead of running it."""

    def __init__(self, kernel, calls):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.kernel, grid, args, kwargs))


def _recorded_launches(attention, call):
    """(kernel, grid, args, kwargs, candidate) of each launch `call` makes: an autotuned launch as
    one per candidate shape (candidate 0: the shape a single launch would use)."""
    calls, launch = [], attention.launch
    launcher = launch.launcher
    launch.launcher = lambda kernel, traceable: _Recorder(kernel, calls)
    try:
        call(attention)
    finally:
        launch.launcher = launcher
    out = []
    for kernel, grid, args, kwargs in calls:
        configs = getattr(kernel, "configs", None)           # a triton Autotuner
        if configs is None:
            out.append((kernel, grid, args, kwargs, 0))
        else:
            out += [(kernel.fn, grid, args, {**kwargs, **c.all_kwargs()}, i) for i, c in enumerate(configs)]
    return out


def _compile(kernel, args, kwargs, target):
    """Bind and specialise (kernel, args, kwargs) as JITFunction.run does, then compile for target;
    returns the compiled kernel and ptxas's -v log."""
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):           # the -v log, printed under TRITON_DUMP_PTXAS_LOG
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    return compiled, log.getvalue()


def _mma(ptx: str) -> str:
    """The matrix instructions in the PTX: "wgmma", "mma.sync", both ("wgmma+mma.sync"), or "fma"."""
    kinds = [name for name, n in (("wgmma", ptx.count("wgmma.mma_async")), ("mma.sync", ptx.count("mma.sync"))) if n]
    return "+".join(kinds) or "fma"


def _row(name, kernel, kwargs, compiled, log):
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"no ptxas -v log for {name} {kernel.__name__}:\n{log}")
    return dict(variant=name, kernel=kernel.__name__.lstrip("_"), block_m=kwargs["BLOCK_M"],
                block_n=kwargs["BLOCK_N"], warps=compiled.metadata.num_warps,
                stages=compiled.metadata.num_stages, regs=int(regs[1]), spill_bytes=int(spills[1]),
                shared=compiled.metadata.shared, mma=_mma(compiled.asm["ptx"]))


def _unavailable() -> str | None:
    """Why this process cannot compile for sm_90, or None."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1: Triton's interpreter replaces compilation"
    try:
        from triton.backends import backends
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as error:
        return f"this Triton has no NVIDIA backend ({error})"
    if "nvidia" not in backends:
        return "this Triton has no NVIDIA backend"
    try:
        path = get_ptxas(SM90[1]).path
    except Exception as error:              # noqa: BLE001 — any failure to locate ptxas means: cannot compile
        return f"no ptxas for sm_90 ({error})"
    return None if path and os.path.exists(path) else "no ptxas for sm_90"


def _specialised(arg):
    """What Triton specialises an argument on: a tensor's dtype (alignment: fresh allocations
    are aligned), an int's value (1, multiples of 16), a float only as a float (AttnLRP's
    gradient scales compile the plain kernel)."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype
    return "float" if isinstance(arg, float) else arg


def rows():
    """One row per (variant, kernel), compiled for sm_90 (identical compilations shared)."""
    import attnfx.kernels.attention as attention       # after the TRITON_INTERPRET check: launch reads it

    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True      # a cache hit would skip ptxas and its log
    target, done, out = GPUTarget(*SM90), {}, []
    for name, call in variants():
        for kernel, _grid, args, kwargs, candidate in _recorded_launches(attention, call):
            key = (kernel.__name__, repr([_specialised(a) for a in args]), repr(kwargs))
            if key not in done:
                done[key] = _compile(kernel, args, kwargs, target)
            out.append(dict(_row(name, kernel, kwargs, *done[key]), candidate=candidate))
    return out


def markdown(table) -> str:
    """The first candidate of each (variant, kernel): the shape a single launch uses; the
    autotuner's others are counted below the table (the JSON has them all)."""
    lines = ["| variant | kernel | BLOCK_M×N | warps | stages | regs | spills (B) | shared (KB) | MMA |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['kernel']} | {r['block_m']}×{r['block_n']} | {r['warps']} | {r['stages']} | "
              f"{r['regs']} | {r['spill_bytes']} | {r['shared'] / 1024:.1f} | {r['mma']} |"
              for r in table if r["candidate"] == 0]
    others = [r for r in table if r["candidate"] > 0]
    if others:
        lines += ["", f"Besides these, {len(others)} autotuning candidates ({len({r['variant'] for r in others})} "
                      f"variants), compiled and checked alike: at most {max(r['regs'] for r in others)} registers, "
                      f"{max(r['spill_bytes'] for r in others)} B spilled, "
                      f"{max(r['shared'] for r in others) / 1024:.1f} KB shared, "
                      f"{'/'.join(sorted({r['mma'] for r in others}))} only."]
    return "\n".join(lines)


GUIDE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "guides", "ops.md")
START, END = "<!-- sm90-table:start -->", "<!-- sm90-table:end -->"


def in_readme(text: str) -> str:
    """The table between the markers of the ops guide's text."""
    return between(text, START, END)


def write_readme(table) -> None:
    replace_between(GUIDE, START, END, markdown(table))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print {'rows': [...]} or {'skip': reason}")
    parser.add_argument("--write", action="store_true", help="replace the table in docs/guides/ops.md")
    args = parser.parse_args()
    reason = _unavailable()
    if reason is not None:
        print(json.dumps({"skip": reason}) if args.json else f"cannot compile for sm_90: {reason}",
              file=sys.stdout if args.json else sys.stderr)
        return 0 if args.json else 1
    with tempfile.TemporaryDirectory() as cache:         # compile into a scratch cache, not ~/.triton
        triton.knobs.cache.dir = cache
        table = rows()
    if args.write:
        write_readme(table)
    else:
        print(json.dumps({"rows": table}) if args.json else markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
