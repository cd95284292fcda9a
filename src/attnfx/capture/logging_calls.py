"""Logging, print and warnings inside model code, as dynamo traces them.

Dynamo breaks the graph at a `logging.Logger` method, at `print` and at `warnings.warn` unless
told otherwise. A break inside the model's forward splits the traced frame at the call into the
model, so the graphs that hold attention lose attnfx's state and the call must refuse to run
(transformers' loss warns once through `logger.warning_once`; many models print or warn). Under
attnfx's trace, logger methods are ignored (no-ops while tracing: the record is not emitted from
compiled code) and `print` / `warnings.warn` are reordered after the graph (they still run, with
their tensor arguments' values). The settings are scoped to attnfx's own calls.
"""
from __future__ import annotations

import logging
import warnings

import torch._dynamo

_LOGGER_METHODS = ("debug", "info", "warning", "warn", "error", "exception", "critical", "log",
                   # transformers adds these to logging.Logger
                   "warning_once", "warning_advice", "info_once")


def _ignored() -> frozenset:
    # read at each call: transformers adds its methods when it is imported, maybe after attnfx
    return frozenset(getattr(logging.Logger, name) for name in _LOGGER_METHODS if hasattr(logging.Logger, name))


def tolerant_logging():
    """Context in which dynamo traces through logging, print and warnings without a graph break."""
    config = torch._dynamo.config
    return config.patch(ignore_logger_methods=set(config.ignore_logger_methods) | set(_ignored()),
                        reorderable_logging_functions=set(config.reorderable_logging_functions)
                        | {print, warnings.warn})
