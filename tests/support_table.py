"""The per-family support table of README and the models guide, rendered from tests/zoo.py (families, implementations,
n/a capabilities and known gaps) — the data tests/test_zoo.py checks as a strict-xfail matrix.

    .venv/bin/python tests/support_table.py           print the table
    .venv/bin/python tests/support_table.py --write   replace it in README.md and docs/guides/models.md
                                                      (make support-table)
"""
from __future__ import annotations

import sys
from pathlib import Path

import zoo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
from marked_blocks import between, replace_between  # noqa: E402  (tools/ holds the README generators' helper)

README = Path(__file__).resolve().parent.parent / "README.md"
PAGES = (README, README.parent / "docs" / "guides" / "models.md")     # each holds the table between markers
START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"
WRITE = ".venv/bin/python tests/support_table.py --write"

# column → the capabilities of tests/test_zoo.py it summarises
COLUMNS = {"sites": ("sites",), "steering": ("identity", "steering", "recompiles"), "recording": ("recording",),
           "generate": ("generate",), "DLA": ("dla",), "relevance": ("relevance",), "patching": ("patching",)}
_SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


class _Notes:
    """Footnotes numbered in order of first use."""

    def __init__(self):
        self.reasons: list[str] = []

    def mark(self, reason: str) -> str:
        if reason not in self.reasons:
            self.reasons.append(reason)
        return "✗" + str(self.reasons.index(reason) + 1).translate(_SUPERSCRIPT)


def _implementation_gap(family, implementation) -> str | None:
    """A gap of this implementation alone ("name/impl" entries of zoo.GAPS)."""
    name = f"{family.name}/{implementation}"
    return next((reason for (key, _), reason in zoo.GAPS.items() if key == name), None)


def _cell(family, capabilities, notes: _Notes) -> str:
    """✗ with the first gap's note, — when no capability applies, · when none is checked, else ✓."""
    applicable = [c for c in capabilities if not zoo.not_applicable(family, c)]
    if not applicable:
        return "—"
    implementations = [i for i in family.implementations if _implementation_gap(family, i) is None]
    runs = [(i, c) for c in applicable for i in implementations if zoo.checked(family, i, c)]
    if not runs:
        return "·"
    reasons = [zoo.gap(family, i, c) for i, c in runs]
    return next((notes.mark(r) for r in reasons if r), "✓")


def _implementations(family, notes: _Notes) -> str:
    cells = []
    for implementation in family.implementations:
        reason = _implementation_gap(family, implementation)
        cells.append(f"`{implementation}`" + (" " + notes.mark(reason) if reason else ""))
    return ", ".join(cells)


def render() -> str:
    """The markdown block README.md holds between its support-table markers."""
    notes = _Notes()
    header = ["family", "implementations", *COLUMNS]
    rows = [header, ["---"] * len(header)]
    for family in zoo.FAMILIES:
        rows.append([family.name, _implementations(family, notes),
                     *(_cell(family, caps, notes) for caps in COLUMNS.values())])
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    legend = ("✓ checked by `tests/test_zoo.py`; — not applicable (no generate() for encoders and vision "
              "backbones, no direct logit attribution without a decoder's unembedding); · not in the matrix "
              "(add the family to `zoo.ANALYSED`)")
    gaps = [f"{i}. {reason}" for i, reason in enumerate(notes.reasons, 1)]
    lines += ["", legend + ("; ✗ a known gap:" if gaps else "; no known gaps."), *([""] + gaps if gaps else [])]
    lines += ["", "Sites and steering are checked under every implementation listed; recording, 0 "
              "recompilations over 10 steering changes, generate and DLA under `sdpa` (`eager` where it is the "
              "only one), as are relevance and patching for the families of `zoo.ANALYSED`. A plain `nn.Module` "
              "calling SDPA or hand-written attention is covered by `tests/test_sites.py`. Generated from "
              f"`tests/zoo.py` by `{WRITE}`."]
    return "\n".join(lines)


def in_readme(text: str) -> str:
    """The block between the markers of README's text."""
    return between(text, START, END)


def write() -> None:
    for page in PAGES:
        replace_between(page, START, END, render())


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
    else:
        print(render())
