"""Capture: the shared dynamo backend, the state marker op, the per-call context, graphs compiled
after a graph break (resumed.py) and flex attention as the bare model runs it (flex_kernel.py)."""
