"""Capture: the shared dynamo backend, the state marker op and the per-call context."""
