"""Tolerances in one place (DEVELOPERS.md): fp32 1e-5, fp16 2e-3, bf16 2e-2."""
import torch

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, **kwargs) -> None:
    tol = TOL[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, atol=tol, rtol=tol, **kwargs)
