"""Analyses built on the instrumented graph: head attribution (DLA), later relevance and patching."""
