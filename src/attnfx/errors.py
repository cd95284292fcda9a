"""Typed errors. Each says what was expected and what was received; every one derives from
AttnfxError so callers can catch the family, and from the builtin that fits the mistake."""

__all__ = ["AttnfxError", "UnsupportedModelError", "NoAttentionFoundError", "AlreadyInstrumentedError",
           "DetachedError", "NotDiscoveredError", "UninstrumentedExecutionError", "SiteIndexError",
           "SteeringValueError", "ShapeMismatchError", "DeviceMismatchError", "DTypeMismatchError",
           "InvalidArgumentError", "RelevanceLeakError", "RelevanceLeakWarning", "BackendUnavailableError",
           "LoweringWarning"]


class AttnfxError(Exception):
    """Base class of every error attnfx raises on purpose."""


class UnsupportedModelError(AttnfxError, TypeError):
    """The object cannot be instrumented (not an nn.Module, or a shape attnfx does not handle)."""


class NoAttentionFoundError(AttnfxError, LookupError):
    """No attention computation matched any of the searched patterns."""


class AlreadyInstrumentedError(AttnfxError, RuntimeError):
    """The model is already wrapped by a live InstrumentedModel."""


class DetachedError(AttnfxError, RuntimeError):
    """The InstrumentedModel was un-instrumented and can no longer run."""


class NotDiscoveredError(AttnfxError, RuntimeError):
    """Sites are unknown until the model has run once (or example_inputs were given)."""


class UninstrumentedExecutionError(AttnfxError, RuntimeError):
    """A call ran without every attention site instrumented (dynamo fell back to eager)."""


class SiteIndexError(AttnfxError, IndexError):
    """A layer or head index outside the valid range."""


class SteeringValueError(AttnfxError, ValueError):
    """A steering value that is not finite or not of an accepted kind."""


class ShapeMismatchError(AttnfxError, ValueError):
    """A tensor whose shape does not match what the site or call expects."""


class DeviceMismatchError(AttnfxError, ValueError):
    """A tensor on a different device than the instrumented model."""


class DTypeMismatchError(AttnfxError, TypeError):
    """A tensor of a dtype that cannot be used where it was given."""


class InvalidArgumentError(AttnfxError, ValueError):
    """An option outside its accepted values (backend name, record kind, steering target...)."""


class RelevanceLeakError(AttnfxError, RuntimeError):
    """relevance(check=True) met ops in the graph that no LRP rule covers (named in the message)."""


class RelevanceLeakWarning(UserWarning):
    """relevance() used the plain gradient through ops that no LRP rule covers (named)."""


class BackendUnavailableError(AttnfxError, RuntimeError):
    """An op was forced onto an implementation it lacks or that cannot run here (attnfx.ops.backends)."""


class LoweringWarning(UserWarning):
    """instrument(lower=True) kept SDPA at some sites (named in the message)."""
