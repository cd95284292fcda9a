"""Analyses: head attribution (DLA) on the instrumented graph; perturbation curves / ABPC and plain-torch
token-attribution baselines (Gradient×Input, Integrated Gradients, attention rollout) to evaluate relevance."""
