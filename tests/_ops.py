"""Shared by the tests of the ops in attnfx.ops (readout, attention_stats, lrp_act, lrp_norm):
a fixture that forces each CPU implementation in turn, and the dtypes they are tested in."""
import pytest
import torch

import attnfx
from _tol import TOL

CPU_IMPLS = ["reference", "cpp"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CUDA = torch.cuda.is_available()


@pytest.fixture(params=CPU_IMPLS)
def impl(request):
    """Forces one implementation for every op; "cpp" raises (fails the test) if attnfx._C is not built."""
    attnfx.set_backend(request.param)
    yield request.param
    attnfx.set_backend(None)


def run_with(name: str, fn, *args):
    """fn(*args) with implementation `name` forced for every op."""
    attnfx.set_backend(name)
    try:
        return fn(*args)
    finally:
        attnfx.set_backend(None)


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal dtype and shape, values within the tolerance of their dtype (tests/_tol.py)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=TOL[expected.dtype], rtol=TOL[expected.dtype])
