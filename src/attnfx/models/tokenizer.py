"""Word-level tokenizer of the default model: one id per word of the world's vocabulary, words
split on whitespace, `<bos>` prepended to every encoded text."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors

from .data import World

SPECIALS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}


def build_tokenizer(world: World) -> Tokenizer:
    vocab = {word: i for i, word in enumerate(world.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIALS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIALS.values()))
    bos = SPECIALS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                       special_tokens=[(bos, vocab[bos])])
    return tok


def wrap_tokenizer(tok: Tokenizer | str | Path):
    """A transformers fast tokenizer (batching, padding, decode) around the word-level one."""
    from transformers import PreTrainedTokenizerFast

    if isinstance(tok, Tokenizer):
        return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_file=str(tok), **SPECIALS)
