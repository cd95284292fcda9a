"""Load the default model shipped inside the package (`attnfx/models/default/`), offline."""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..errors import InvalidArgumentError

__all__ = ["load_default", "load_tokenizer", "load_prompts", "default_dir"]

ARTIFACTS = ("config.json", "model.safetensors", "tokenizer.json")


def default_dir() -> Path:
    """The folder of the shipped artifacts (config, weights, tokenizer, prompts, card)."""
    return Path(str(resources.files("attnfx.models") / "default"))


def _checked_dir(path) -> Path:
    folder = default_dir() if path is None else Path(path)
    missing = [name for name in ARTIFACTS if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks {', '.join(missing)}: expected the artifacts written by "
            "`python -m attnfx.models.train --out DIR` (config.json, model.safetensors, tokenizer.json)")
    return folder


def load_tokenizer(path=None):
    """The word-level tokenizer as a transformers fast tokenizer (`<bos>` prepended, `<pad>` set)."""
    from .tokenizer import wrap_tokenizer

    return wrap_tokenizer(_checked_dir(path) / "tokenizer.json")


def load_default(device="cpu", *, attn_implementation: str = "sdpa", path=None):
    """(model, tokenizer) of the default model: a GPT2LMHeadModel in eval mode (input_ids [b, t] →
    logits [b, t, vocab]) and its tokenizer. Reads only files inside the package (or `path`, a
    folder written by the training script)."""
    import transformers

    if attn_implementation not in ("sdpa", "eager"):
        raise InvalidArgumentError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")
    folder = _checked_dir(path)
    model = transformers.GPT2LMHeadModel.from_pretrained(
        folder, local_files_only=True, attn_implementation=attn_implementation)
    return model.to(device).eval(), load_tokenizer(folder)


def load_prompts(path=None) -> dict:
    """The world (facts, names, nonce words) and the held-out prompts: keys "world", "facts",
    "counterfactual", "ioi", "copy" (see `attnfx.models.data.heldout_prompts`)."""
    folder = default_dir() if path is None else Path(path)
    return json.loads((folder / "prompts.json").read_text())
