"""attnfx.ops.backends: the default order, explicit overrides, and no silent fallback: a forced
implementation that cannot run raises BackendUnavailableError. Without attnfx._C (simulated)
the package still imports and runs every op on the reference, and says what is missing."""
import subprocess
import sys
import textwrap

import pytest
import torch

import attnfx
from attnfx.ops import backends
from attnfx.errors import BackendUnavailableError, InvalidArgumentError
from attnfx.ops import _cpp, readout

OPS = ["attention_argmax", "attention_stats", "head_contrib", "head_readout", "lrp_act", "lrp_layer_norm", "lrp_rms_norm"]


@pytest.fixture(autouse=True)
def _default_order():
    yield
    attnfx.set_backend(None)


@pytest.fixture
def without_extension(monkeypatch):
    """attnfx._C as if it had failed to import (the loader's cached state)."""
    monkeypatch.setattr(_cpp, "_state", (None, f"attnfx._C not built: No module named 'attnfx._C'; {_cpp.REBUILD}"))


def test_report_names_every_op_and_why():
    lines = {line.split()[0]: line for line in backends.report(["cpu"]).splitlines()}
    assert sorted(lines) == sorted(OPS + ["attention"])
    assert all(lines[op].split()[2] == "cpp" and "default order cpp > reference" in lines[op] for op in OPS)
    assert lines["attention"].split()[2] == "reference"          # no C++ attention; Triton only when forced


def test_overrides_per_op_win_over_the_global_one():
    attnfx.set_backend("reference")
    attnfx.set_backend("cpp", op="head_readout")
    assert backends.choose("head_readout", "cpu") == "cpp"
    assert backends.choose("head_contrib", "cpu") == "reference"
    assert "forced by set_backend('cpp', op='head_readout')" in backends.explain("head_readout", "cpu")[1]
    attnfx.set_backend(None, op="head_readout")
    assert backends.choose("head_readout", "cpu") == "reference"
    attnfx.set_backend(None)
    assert backends.choose("head_contrib", "cpu") == "cpp"


def test_bad_names_are_typed_errors():
    with pytest.raises(InvalidArgumentError, match="one of"):
        attnfx.set_backend("cuda")
    with pytest.raises(InvalidArgumentError, match="unknown op 'softmax'"):
        attnfx.set_backend("cpp", op="softmax")
    with pytest.raises(BackendUnavailableError, match=r"head_readout has no 'triton' implementation; it has \['cpp', 'reference'\]"):
        attnfx.set_backend("triton", op="head_readout")


def test_a_forced_backend_an_op_lacks_raises_when_the_op_runs():
    attnfx.set_backend("triton")                        # every op; head_readout has no Triton kernel
    z, u = torch.randn(1, 2, 3, 4), torch.randn(3, 4, 5)
    with pytest.raises(BackendUnavailableError, match=r"head_readout on cpu: forced by set_backend\('triton'\), "
                                                      r"but head_readout has no triton implementation; "
                                                      r"available there: \['cpp', 'reference'\]"):
        torch.ops.attnfx.head_readout(z, u)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    attnfx.set_backend("triton", op="attention_stats")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        backends.choose("attention_stats", "cpu")


@pytest.mark.skipif(_cpp.has_kernels(["head_readout"], "cuda"), reason="this attnfx._C has CUDA kernels")
def test_an_extension_without_cuda_kernels_is_skipped_on_cuda_and_cannot_be_forced():
    name, why = backends.explain("head_readout", "cuda")
    assert name == "reference" and "skipped cpp: attnfx._C has no cuda kernel for head_readout" in why
    attnfx.set_backend("cpp")
    with pytest.raises(BackendUnavailableError, match="has no cuda kernel"):
        backends.choose("lrp_act", "cuda")


def test_without_the_extension_ops_run_on_the_reference(without_extension):
    assert "attnfx._C not built" in backends.report(["cpu"])
    assert backends.choose("head_readout", "cpu") == "reference"
    z, u = torch.randn(2, 3, 4, 5), torch.randn(4, 5, 6)
    assert torch.equal(torch.ops.attnfx.head_readout(z, u), readout.readout_reference(z, u))


def test_without_the_extension_forcing_cpp_raises(without_extension):
    with pytest.raises(BackendUnavailableError, match=r"cannot force 'cpp': attnfx._C not built: .*pip install --no-build-isolation -e \."):
        attnfx.set_backend("cpp")


def test_a_forced_cpp_raises_once_the_extension_is_gone(monkeypatch):
    attnfx.set_backend("cpp")
    monkeypatch.setattr(_cpp, "_state", (None, "attnfx._C not built: gone"))
    with pytest.raises(BackendUnavailableError, match="forced by set_backend\\('cpp'\\), but attnfx._C not built: gone"):
        torch.ops.attnfx.lrp_act(torch.randn(3), "gelu", 1e-6)


def test_a_fresh_interpreter_without_the_extension():
    """`import attnfx` and every op work with attnfx._C unimportable; report() says why."""
    script = textwrap.dedent("""
        import sys
        sys.modules["attnfx._C"] = None                  # import attnfx._C now raises ImportError
        import torch, attnfx
        from attnfx.ops import backends
        from attnfx.errors import BackendUnavailableError
        print(backends.report(["cpu"]))
        x = torch.randn(2, 3, 8, requires_grad=True)
        torch.ops.attnfx.lrp_layer_norm(x, None, None, 1e-5).sum().backward()
        lse, mass = torch.ops.attnfx.attention_stats(torch.randn(1, 2, 4, 8), torch.randn(1, 1, 4, 8), None,
                                                     torch.tensor([[0, 2]]), True, 0.3)
        try:
            attnfx.set_backend("cpp")
        except BackendUnavailableError as e:
            print("forcing cpp:", e)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert all(f"{op} " in out.stdout for op in OPS)
    assert out.stdout.count("reference  default order cpp > reference; skipped cpp: attnfx._C not built") == len(OPS)
    assert "forcing cpp: cannot force 'cpp': attnfx._C not built" in out.stdout
    assert "pip install --no-build-isolation -e ." in out.stdout
