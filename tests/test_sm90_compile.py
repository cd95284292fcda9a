"""Every variant of the attention kernels compiles for Hopper (sm_90) the way it should: no
register spills, wgmma (not mma.sync) for the matrix products, shared memory within the
227 KB a block may have. No GPU needed: tools/sm90_table.py compiles each variant with Triton's
NVIDIA backend and its bundled ptxas, in a subprocess without TRITON_INTERPRET (this process
runs Triton's interpreter, which replaces compilation), all variants in one run (~2 min)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_LIMIT = 227 * 1024          # H100/H200: the most shared memory one block may opt in to
DTYPES = ("bf16", "fp16")
FORWARD_EXTRAS = ("plain", "head scale", "readouts", "span mass", "lse")


@pytest.fixture(scope="session")
def sm90_rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")                  # Triton 3.9 warns when unset
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "sm90_table.py"), "--json"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    if "skip" in report:
        pytest.skip(f"cannot compile for sm_90 here: {report['skip']}")
    return report["rows"]


def test_every_variant_compiled(sm90_rows):
    """d 64 and 128 × bf16 and fp16 × causal or not × (each forward extra, and the backward's two
    kernels, plain and AttnLRP)."""
    variants = {r["variant"] for r in sm90_rows}
    assert len(variants) == 2 * 2 * 2 * (len(FORWARD_EXTRAS) + 2)
    assert {r["variant"].split()[2] for r in sm90_rows} == set(DTYPES)
    backward = [r for r in sm90_rows if r["variant"].startswith("bwd") and r["candidate"] == 0]
    assert sorted({r["kernel"] for r in backward}) == ["attention_bwd_dkdv", "attention_bwd_dq"]
    assert len(backward) == 2 * len({r["variant"] for r in backward})


def test_every_autotuning_candidate_compiled(sm90_rows, monkeypatch):
    """Each launch is compiled at every shape its autotuner may pick (launch.forward_candidates /
    backward_candidates), so the checks below hold whichever wins on the GPU."""
    from attnfx.kernels import launch

    monkeypatch.setattr(launch, "INTERPRET", False)         # the CUDA shapes, not the interpreter's
    for row in sm90_rows:
        _, d, dtype, mask, extra = row["variant"].split(" ", 4)
        block_d, dtype = int(d[1:]), {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        if row["variant"].startswith("fwd"):
            shapes = launch.forward_candidates(block_d, dtype, extra == "span mass")
        else:
            shapes = launch.backward_candidates(block_d, dtype, mask == "causal")[row["kernel"] == "attention_bwd_dq"]
        shape = shapes[row["candidate"]]
        assert (row["block_m"], row["block_n"], row["warps"], row["stages"]) == (
            shape.BLOCK_M, shape.BLOCK_N, shape.num_warps, shape.num_stages), row
    counted = {(r["variant"], r["kernel"]) for r in sm90_rows if r["candidate"] == 1}
    assert len(counted) > 0 and len(counted) == len([r for r in sm90_rows if r["candidate"] == 1])


def test_no_variant_spills(sm90_rows):
    spilled = [(r["variant"], r["kernel"], r["spill_bytes"]) for r in sm90_rows if r["spill_bytes"]]
    assert spilled == []


def _rows_per_warpgroup(row) -> float:
    """Rows of the kernel's products each warpgroup (4 warps) owns: the query block's, or in the
    dK/dV pass (computed keys × queries) the key block's."""
    rows = row["block_n"] if row["kernel"] == "attention_bwd_dkdv" else row["block_m"]
    return rows / (row["warps"] / 4)


def test_matrix_products_use_wgmma(sm90_rows):
    """Every product is Hopper's wgmma, none Ampere's mma.sync, and every warpgroup owns whole
    64-row wgmma tiles: with fewer rows than that, warpgroups split the columns instead and
    each recomputes the whole QKᵀ tile feeding them."""
    not_wgmma = [(r["variant"], r["kernel"], r["mma"]) for r in sm90_rows if r["mma"] != "wgmma"]
    assert not_wgmma == []
    split = [(r["variant"], r["kernel"]) for r in sm90_rows if _rows_per_warpgroup(r) % 64]
    assert split == []


def test_shared_memory_fits(sm90_rows):
    over = [(r["variant"], r["kernel"], r["shared"]) for r in sm90_rows if r["shared"] > SHARED_LIMIT]
    assert over == []


def test_readme_table_is_current(sm90_rows):
    """The ops guide's sm_90 table is this test's own output (tools/sm90_table.py --write)."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import sm90_table
    finally:
        sys.path.remove(str(ROOT / "tools"))
    guide = (ROOT / "docs" / "guides" / "ops.md").read_text(encoding="utf-8")
    assert sm90_table.in_readme(guide) == sm90_table.markdown(sm90_rows), (
        "docs/guides/ops.md's sm_90 table is stale: run `.venv/bin/python tools/sm90_table.py --write`")
