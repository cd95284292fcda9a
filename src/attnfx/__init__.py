"""attnfx: compiler-level instrumentation of attention heads.

    im = attnfx.instrument(model)
    im.steering.scale(layer=3, head=5, factor=4.0, on="value_unbiased")
    with im.record("z") as rec:
        im(input_ids)
"""
from . import errors
from .api import FinalNormInfo, InstrumentedModel, SiteInfo, instrument
from .backends import set_backend
from .errors import *  # noqa: F401,F403  (typed errors are part of the public surface)
from .sites import PATTERNS

__all__ = ["instrument", "InstrumentedModel", "SiteInfo", "FinalNormInfo", "PATTERNS", "errors", "set_backend",
           "head_attribution", "relevance", "patching", "metrics", "models"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "head_attribution":
        from .analysis.attribution import head_attribution
        return head_attribution
    if name == "relevance":
        from .analysis.relevance import relevance
        return relevance
    if name in ("patching", "metrics"):
        import importlib
        return importlib.import_module(f".analysis.{name}", __name__)
    if name == "models":                 # the README's first call: attnfx.models.load_default()
        import importlib
        return importlib.import_module(".models", __name__)
    raise AttributeError(name)
