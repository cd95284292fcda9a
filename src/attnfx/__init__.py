"""attnfx: compiler-level instrumentation of attention heads.

    im = attnfx.instrument(model)
    im.steering.scale(layer=3, head=5, factor=4.0, on="value_unbiased")
    with im.record("z") as rec:
        im(input_ids)

`import attnfx` loads only the typed errors: torch, dynamo and the ops are imported by the first
name that needs them (the first `instrument` call pays for dynamo, which torch.compile needs anyway).
"""
import importlib

from . import errors
from .errors import *  # noqa: F401,F403  (typed errors are part of the public surface)

__all__ = ["instrument", "InstrumentedModel", "SiteInfo", "FinalNormInfo", "PATTERNS", "errors", "set_backend",
           "head_attribution", "logit_attribution", "LogitAttribution", "logit_lens", "relevance", "patching", "path_patching", "metrics",
           "models", "views", "data", "sweeps"]
__version__ = "0.1.0"

# public name -> (module, attribute); attribute None means the module itself
_LAZY = {
    "instrument": (".api", "instrument"),
    "InstrumentedModel": (".api", "InstrumentedModel"),
    "SiteInfo": (".graph.siteinfo", "SiteInfo"),
    "FinalNormInfo": (".graph.siteinfo", "FinalNormInfo"),
    "PATTERNS": (".graph.sites", "PATTERNS"),
    "set_backend": (".ops.backends", "set_backend"),
    "head_attribution": (".analysis.attribution", "head_attribution"),
    "logit_attribution": (".analysis.attribution", "logit_attribution"),
    "LogitAttribution": (".analysis.attribution", "LogitAttribution"),
    "logit_lens": (".analysis.lens", "logit_lens"),
    "relevance": (".analysis.relevance", "relevance"),
    "patching": (".analysis.patching", None),
    "path_patching": (".analysis.path_patching", "path_patching"),
    "metrics": (".analysis.metrics", None),
    "models": (".models", None),          # the README's first call: attnfx.models.load_default()
    "views": (".views", None),            # self-contained HTML views of patterns and relevance
    "data": (".data", None),              # analyses over a dataset in padded batches (torchrun: sharded)
    "sweeps": (".sweeps", None),          # ready per-example analyses for data.reduce (DLA, relevance, patching)
}


def __getattr__(name):
    try:
        module_name, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'attnfx' has no attribute {name!r}") from None
    module = importlib.import_module(module_name, __name__)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value               # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
