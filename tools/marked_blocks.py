"""Blocks of a text file between two marker comments, which the generators of the README's and the
docs' tables (support_table, headline_table, sm90_table) read and rewrite."""
from __future__ import annotations

from pathlib import Path


def between(text: str, start: str, end: str) -> str:
    """The block between the markers, without its surrounding newlines."""
    return text[text.index(start) + len(start):text.index(end)].strip("\n")


def replace_between(path, start: str, end: str, block: str) -> None:
    """Rewrite the file with `block` between its markers (markers kept, one newline each side)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    head, tail = text[:text.index(start) + len(start)], text[text.index(end):]
    path.write_text(head + "\n" + block + "\n" + tail, encoding="utf-8")
