"""Ops of attnfx, each with a plain-torch reference (the oracle the kernels are tested against).
Importing this package registers the ops below (attnfx.ops.backends picks their implementation)."""
from . import attention, attention_argmax, attention_stats, lrp_rules, readout  # noqa: F401
