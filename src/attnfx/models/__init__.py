"""The embedded default model: a small GPT-2 that attnfx trains itself on a synthetic world
(fact recall with in-context counterfactuals, IOI, sequence copying), shipped with its tokenizer
so that experiments run offline.

    model, tokenizer = attnfx.models.load_default()
"""
from .loader import default_dir, load_default, load_prompts, load_tokenizer

__all__ = ["load_default", "load_tokenizer", "load_prompts", "default_dir"]
