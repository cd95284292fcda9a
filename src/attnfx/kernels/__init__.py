"""Triton kernels of attnfx, installed as `attnfx.kernels` (docs/design.md §4). Set TRITON_INTERPRET=1
before importing them to run on CPU (fp32/fp16 only)."""
