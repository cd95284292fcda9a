"""How the attention kernels launch: the block shapes each variant may run with, and the
autotuner that picks one of them.

Candidates per variant (head width, dtype, extra) were chosen with tools/sm90_table.py (ptxas -v
for sm_90), and tests/test_sm90_compile.py holds every one of them to it: no spills, wgmma, whole
64-row wgmma tiles per warpgroup (at 64 rows / 8 warps the two warpgroups split the head dim of
P·V and each computed the whole QKᵀ tile: d 128, 20 wgmma a key block per warpgroup for the 12
needed). Where a variant has two, Triton's autotuner times both at its first call and keeps the
choice: its key is the head width, the GQA group and the kernel's switches (and the dtypes), never
T or S, so a new sequence length (each decode step, each prompt) reuses it.

The first candidate is the one a single launch would use; fp32 (and wider) inputs take the FMA
path and d > 128 is untuned: both keep the one shape they always had. Under TRITON_INTERPRET one
small shape and no autotuner (it times on a GPU)."""
from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass

import torch
import triton
from torch.library import wrap_triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Arguments that tell variants apart; those a kernel lacks are left out of its key.
TUNING_KEY = ("D", "GROUP", "NUM_DIRS", "NUM_SPANS", "BLOCK_D", "BLOCK_K", "BLOCK_S", "CAUSAL", "HAS_KEY_MASK",
              "HAS_SCALE", "HAS_READOUT", "HAS_MASS", "WRITE_O", "WRITE_LSE", "PRECISION", "READOUT_PRECISION")


@dataclass(frozen=True)
class Shape:
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int

    def kwargs(self) -> dict:
        return asdict(self)


INTERPRETER_SHAPE = Shape(32, 32, 4, 1)          # the CPU tests stay fast


def forward_candidates(block_d: int, dtype: torch.dtype, has_mass: bool) -> tuple[Shape, ...]:
    """The forward's shapes. The span-mass extra's two more dots and its [M, n] sums need more
    registers: 8 warps at d 64, 32-key blocks at d 128. At d 128, 128 × 128 blocks reach 255
    registers and spill with readouts: two pipeline depths instead."""
    if INTERPRET:
        return (INTERPRETER_SHAPE,)
    if dtype.itemsize > 2 or block_d > 128:
        return (Shape(128, 64, 4, 3) if block_d <= 64 else Shape(64, 64 if block_d <= 128 else 32, 8, 3),)
    if block_d <= 64:
        return (Shape(128, 64, 8, 3), Shape(128, 64, 8, 2)) if has_mass else (Shape(128, 64, 4, 3), Shape(128, 128, 8, 3))
    return (Shape(128, 32 if has_mass else 64, 8, 3), Shape(128, 32 if has_mass else 64, 8, 2))


def backward_candidates(block_d: int, dtype: torch.dtype, causal: bool) -> tuple[tuple[Shape, ...], tuple[Shape, ...]]:
    """(dK/dV pass, dQ pass). The dK/dV pass keeps two [BLOCK_N, d] fp32 sums and its key block's
    K, V in registers, so its query blocks are short; causal at d 128, its second loop (the
    diagonal) costs the registers of a pipeline stage (8 B spilled, Triton 3.6) and 32 query
    rows spill 132 B: one shape. At 32 × 32, d 128 fell back to mma.sync."""
    if INTERPRET:
        return (INTERPRETER_SHAPE,), (INTERPRETER_SHAPE,)
    if dtype.itemsize > 2 or block_d > 128:
        shape = Shape(64, 64, 4, 2) if block_d <= 64 else Shape(32, 32, 8, 2)
        return (shape,), (shape,)
    if block_d <= 64:
        return (Shape(32, 128, 8, 2), Shape(64, 128, 8, 2)), (Shape(64, 64, 4, 2), Shape(64, 128, 4, 2))
    dkdv = (Shape(16, 128, 8, 1),) if causal else (Shape(16, 128, 8, 2), Shape(32, 128, 8, 1))
    return dkdv, (Shape(128, 64, 8, 2), Shape(128, 64, 8, 3))


def launcher(kernel, traceable: bool):
    """The kernel itself, or wrapped so that make_fx / AOT autograd trace it as a node Inductor
    compiles (torch.library.triton_op); wrapping costs ~1 ms per eager call, so only on request."""
    return wrap_triton(kernel) if traceable else kernel


@functools.cache
def autotuned(kernel, candidates: tuple[Shape, ...]):
    """kernel under Triton's autotuner over `candidates` (one autotuner per kernel and set)."""
    configs = [triton.Config({"BLOCK_M": s.BLOCK_M, "BLOCK_N": s.BLOCK_N}, num_warps=s.num_warps,
                             num_stages=s.num_stages) for s in candidates]
    return triton.autotune(configs, key=[name for name in TUNING_KEY if name in kernel.arg_names])(kernel)


def launch(kernel, candidates: tuple[Shape, ...], grid, traceable: bool, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) at one shape, or autotuned over several; grid(meta) → the
    launch grid for a shape's BLOCK_M / BLOCK_N."""
    if len(candidates) == 1:
        shape = candidates[0].kwargs()
        launcher(kernel, traceable)[grid(shape)](*args, **kwargs, **shape)
    else:
        launcher(autotuned(kernel, candidates), traceable)[grid](*args, **kwargs)
