"""The head-level methods of the literature as one-call recipes on attnfx's graph: batched,
compiled, fused attention kept, a few passes instead of one per head (issue 16). One module per
method; each has a plain-torch reference in its tests and a reproduction under bench/.

    from attnfx import recipes
    scores = recipes.ships.head_importance(im, prompts, tok)
"""
import importlib

__all__ = ["ships", "sinks", "lookback", "retrieval", "decore", "flow"]


def __getattr__(name):
    if name in __all__:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'attnfx.recipes' has no attribute {name!r}")
