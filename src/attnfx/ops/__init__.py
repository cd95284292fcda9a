"""Ops of attnfx, each with a plain-torch reference (the oracle the kernels are tested against)."""
