"""The faithfulness corpus: real English prose available offline — the sentences of the Python
Language Reference that CPython ships as `pydoc_data.topics` (the text `help("for")` prints; the
docs are under the PSF licence). Human-written technical English, not generated text.

Extraction (deterministic, `python bench/_corpus.py` rewrites faithfulness_sentences.txt): every
topic in sorted order; paragraphs of flowing text only (indented code/grammar blocks and heading
underlines skipped, wrapped lines joined); split after . ! ? before a capital; kept when the
sentence starts with a capital, ends with ".", holds no code-like characters or quotes, is ≥ 95 %
letters and spaces, and is 8–40 MiniLM word-piece tokens long ([CLS]/[SEP] not counted); first
occurrence of each kept. The list that was extracted (CPython 3.11.7) is committed beside this
file, so the benchmark does not depend on the running Python's docs.
"""
from __future__ import annotations

import re
from pathlib import Path

SENTENCES = Path(__file__).resolve().parent / "faithfulness_sentences.txt"
MIN_TOKENS, MAX_TOKENS = 8, 40
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_LIKE = re.compile(r"""[:=()\[\]{}<>_*`|\\#@%"']""")
_MIN_LETTER_SHARE = 0.95        # drops sentences dense in digits and symbols (numbers, paths)


def _paragraphs(text: str):
    para = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("   ") or set(line.strip()) <= set("*=-~^"):
            if para:
                yield " ".join(para)
            para = []
        else:
            para.append(line.strip())
    if para:
        yield " ".join(para)


def _keep(sentence: str, n_tokens: int) -> bool:
    letters = sum(c.isalpha() or c == " " for c in sentence) / len(sentence)
    return (sentence[:1].isupper() and sentence.endswith(".") and not _CODE_LIKE.search(sentence)
            and letters >= _MIN_LETTER_SHARE and MIN_TOKENS <= n_tokens <= MAX_TOKENS)


def extract(tokenizer) -> list[str]:
    """The corpus from the running Python's pydoc_data.topics (see the module docstring)."""
    import pydoc_data.topics

    kept, seen = [], set()
    for name in sorted(pydoc_data.topics.topics):
        for paragraph in _paragraphs(pydoc_data.topics.topics[name]):
            for sentence in (s.strip() for s in _SPLIT.split(paragraph)):
                if sentence and sentence not in seen and _keep(sentence, len(tokenizer.tokenize(sentence))):
                    seen.add(sentence)
                    kept.append(sentence)
    return kept


def load() -> list[str]:
    """The committed corpus, one sentence a line."""
    return SENTENCES.read_text().splitlines()


if __name__ == "__main__":
    import platform

    from _minilm import load_minilm

    sentences = extract(load_minilm()[1])
    SENTENCES.write_text("\n".join(sentences) + "\n")
    print(f"{len(sentences)} sentences from pydoc_data.topics (Python {platform.python_version()}) -> {SENTENCES}")
