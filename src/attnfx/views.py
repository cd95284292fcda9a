"""HTML views for reports: attention patterns and token relevance, one self-contained file each.

Every file inlines its CSS (and, for patterns, a few lines of JS) and names no URL, so it opens
offline from file:// and can be mailed or attached as is. Colours are computed here, in Python,
and written into the cells; the JS only copies them, so the picture does not depend on it.

    with torch.no_grad(), im.record("pattern", layers=[3]) as rec:
        im(**batch)
    attention_view(tokens, rec["pattern", 3][0], "l3.html", layer=3)     # [H, t, t] of one example
    relevance_view(tokens, rel.tokens[0], "rel.html")                     # [t]
"""
from __future__ import annotations

from html import escape
from pathlib import Path

import torch

from .errors import InvalidArgumentError, ShapeMismatchError, SiteIndexError

__all__ = ["attention_view", "relevance_view", "attention_view_of", "CELL_PX", "DARKEST", "POSITIVE", "NEGATIVE"]

CELL_PX = 16                 # one heatmap cell: 32 tokens make a 512 px grid, small enough for 4 heads a row
WHITE = (255, 255, 255)
DARKEST = "#08306b"          # matplotlib's Blues at 1.0, as attnfx.viz's colour maps: the largest probability
POSITIVE = "#b2182b"         # RdBu_r's ends (attnfx.viz's diverging map): + relevance red, − blue
NEGATIVE = "#2166ac"
DARK_TEXT_FROM = 0.6         # above this fraction of the scale, white text reads better (as in viz.head_heatmap)
PROBABILITY_SLACK = 1e-2     # a bf16 softmax can round a probability near 1 up to 1.0039

_CSS = f"""
body{{font:13px/1.4 system-ui,sans-serif;margin:16px;color:#222}}
h1{{font-size:16px;margin:0 0 4px}} .note{{color:#555;margin:0 0 12px}}
.heads{{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}} figure{{margin:0}}
figcaption{{font-weight:600;margin-bottom:4px}}
.grid{{display:grid;align-items:end}}
.c{{display:block;width:{CELL_PX}px;height:{CELL_PX}px}}
.k,.q{{font:11px monospace;white-space:pre;overflow:hidden;text-overflow:ellipsis}}
.k{{writing-mode:vertical-rl;transform:rotate(180deg);max-height:9em;padding:3px 0;line-height:{CELL_PX}px}}
.q{{text-align:right;max-width:12em;padding-right:4px;line-height:{CELL_PX}px}}
#strip,.rel{{line-height:2.2;margin:8px 0 20px}}
.tok{{font:14px monospace;white-space:pre;padding:2px 3px;margin:1px;border:1px solid #ddd;border-radius:3px}}
#strip .tok{{cursor:pointer}} .tok.sel{{outline:2px solid #000}} .d{{color:#fff}}
"""

# Hover a query token (click to keep it): the strip takes that row's colours from the selected
# head's grid. `#head=2&query=5` in the URL picks the starting state (the last query by default).
_JS = """
const grids=[...document.querySelectorAll('.grid')],toks=[...document.querySelectorAll('#strip .tok')];
const pick=document.getElementById('head'),n=toks.length;let lock=null;
function show(q){const cells=grids[pick.selectedIndex].querySelectorAll('.c');
  toks.forEach((t,k)=>{const c=cells[q*n+k];t.style.background=c.style.background;t.title=c.title;
    t.classList.toggle('d',c.classList.contains('d'));t.classList.toggle('sel',k===q);});}
toks.forEach((t,q)=>{t.onmouseenter=()=>{if(lock===null)show(q);};t.onclick=()=>{lock=lock===q?null:q;show(q);};});
const want=new URLSearchParams(location.hash.slice(1)),q=Number(want.get('query'));
if(want.has('head'))pick.value=want.get('head');if(pick.selectedIndex<0)pick.selectedIndex=0;
pick.onchange=()=>show(lock??n-1);show(want.has('query')&&q>=0&&q<n?q:n-1);
"""


def attention_view(tokens, pattern: torch.Tensor, path, *, layer: int | None = None, heads=None,
                   title: str | None = None) -> Path:
    """Write one example's attention pattern ([H, t, t] or [t, t], rows the queries) as an HTML
    page: a query × key heatmap per head (white 0 → DARKEST at the largest probability shown),
    and a token strip where hovering a query colours the keys by its attention. `heads` picks
    and orders the heads shown; `layer` only labels the page."""
    tokens = _checked_tokens(tokens)
    probs, heads = _checked_pattern(tokens, pattern, heads)        # probs: [H, t, t]
    vmax = float(probs[heads].max()) or 1.0                        # heads stay comparable: one scale
    labels = [escape(tok) for tok in tokens]
    where = "" if layer is None else f"layer {int(layer)}: "
    title = title or f"attention pattern, {where}heads {', '.join(map(str, heads))}"
    options = "".join(f'<option value="{h}">{h}</option>' for h in heads)
    strip = "".join(f'<span class="tok">{label}</span>' for label in labels)
    grids = "".join(_grid(h, probs[h] / vmax, probs[h], labels) for h in heads)
    body = (f'<p class="note">{where}colour: attention probability, white 0 → dark blue {vmax:.3g} '
            f"(the largest shown); hover a cell for its value.</p>"
            f'<label>head <select id="head">{options}</select></label> — hover a query token (click to keep it): '
            f'the tokens take the colour of its attention over them.<div id="strip">{strip}</div>'
            f'<div class="heads">{grids}</div><script>{_JS}</script>')
    return _write(path, title, body)


def relevance_view(tokens, relevance: torch.Tensor, path, *, title: str | None = None) -> Path:
    """Write per-token relevance ([t], or [1, t]) as an HTML page of coloured tokens: red
    positive, blue negative, white 0, scaled by the largest |relevance|; the value in each
    token's tooltip."""
    tokens = _checked_tokens(tokens)
    values = _checked_relevance(tokens, relevance)                 # [t]
    limit = float(values.abs().max()) or 1.0
    spans = []
    for tok, value in zip(tokens, values.tolist()):
        x = value / limit
        colour = _blend(POSITIVE if x > 0 else NEGATIVE, abs(x))
        dark = ' d' if abs(x) > DARK_TEXT_FROM else ''
        spans.append(f'<span class="tok{dark}" style="background:{colour}" title="{value:+.4g}">{escape(tok)}</span>')
    body = (f'<p class="note">relevance: red positive, blue negative, full colour at ±{limit:.4g} '
            f'(the largest |relevance|); hover a token for its value.</p><p class="rel">{"".join(spans)}</p>')
    return _write(path, title or "token relevance", body)


def attention_view_of(im, tokenizer, text: str, path, *, layer: int, heads=None, title: str | None = None) -> Path:
    """Record `layer`'s pattern [H, t, t] of `im` on `text` (a transformers tokenizer's encoding,
    input_ids [1, t]) and write its attention_view."""
    batch = tokenizer(text, return_tensors="pt").to(next(im.parameters()).device)
    with torch.no_grad(), im.record("pattern", layers=[layer]) as rec:
        im(**batch)
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    return attention_view(tokens, rec["pattern", layer][0], path, layer=layer, heads=heads, title=title or text)


def _grid(head: int, scaled: torch.Tensor, probs: torch.Tensor, labels: list[str]) -> str:
    """One head's heatmap: a CSS grid of a corner, the key labels, then per query its label and
    cells (row-major, the order the JS indexes)."""
    parts = ["<span></span>"] + [f'<span class="k" title="{label}">{label}</span>' for label in labels]
    for q, (row, values) in enumerate(zip(scaled.tolist(), probs.tolist())):
        parts.append(f'<span class="q" title="{labels[q]}">{labels[q]}</span>')
        for k, (x, p) in enumerate(zip(row, values)):
            dark = " d" if x > DARK_TEXT_FROM else ""
            parts.append(f'<i class="c{dark}" style="background:{_blend(DARKEST, x)}" '
                         f'title="{labels[q]} → {labels[k]}: {p:.4f}"></i>')
    columns = f"auto repeat({len(labels)},{CELL_PX}px)"
    return (f'<figure><figcaption>head {head}</figcaption>'
            f'<div class="grid" style="grid-template-columns:{columns}">{"".join(parts)}</div></figure>')


def _blend(end: str, x: float) -> str:
    """#rrggbb a fraction x ∈ [0, 1] of the way from white to `end`: each channel is monotone in x."""
    x = min(max(x, 0.0), 1.0)
    rgb = (int(end[i:i + 2], 16) for i in (1, 3, 5))
    return "#" + "".join(f"{round(w + (c - w) * x):02x}" for w, c in zip(WHITE, rgb))


def _checked_tokens(tokens) -> list[str]:
    tokens = list(tokens)
    if not tokens or not all(isinstance(tok, str) for tok in tokens):
        kinds = sorted({type(tok).__name__ for tok in tokens})
        raise InvalidArgumentError(f"tokens must be a non-empty list of str (tokenizer.convert_ids_to_tokens), "
                                   f"got {len(tokens)} of {kinds}")
    return tokens


def _checked_pattern(tokens, pattern, heads) -> tuple[torch.Tensor, list[int]]:
    if not isinstance(pattern, torch.Tensor):
        raise InvalidArgumentError(f"pattern must be a torch.Tensor, got {type(pattern).__name__}")
    t = len(tokens)
    probs = pattern.detach().float().cpu()
    probs = probs[None] if probs.dim() == 2 else probs
    if probs.dim() != 3 or tuple(probs.shape[1:]) != (t, t):
        raise ShapeMismatchError(f"pattern must be [heads, t, t] or [t, t] with t = len(tokens) = {t} "
                                 f"(one example: rec['pattern', layer][i]), got {tuple(pattern.shape)}")
    if not torch.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1 + PROBABILITY_SLACK:
        raise InvalidArgumentError(f"pattern must hold finite probabilities in [0, 1], got values in "
                                   f"[{float(probs.min())}, {float(probs.max())}]")
    count = probs.shape[0]
    heads = list(range(count)) if heads is None else [int(h) for h in heads]
    if not heads or any(not 0 <= h < count for h in heads):
        raise SiteIndexError(f"heads must be a non-empty list of indices in [0, {count}), got {heads}")
    return probs, heads


def _checked_relevance(tokens, relevance) -> torch.Tensor:
    if not isinstance(relevance, torch.Tensor):
        raise InvalidArgumentError(f"relevance must be a torch.Tensor, got {type(relevance).__name__}")
    values = relevance.detach().float().cpu()
    values = values[0] if values.dim() == 2 and values.shape[0] == 1 else values
    if tuple(values.shape) != (len(tokens),):
        raise ShapeMismatchError(f"relevance must be [t] or [1, t] with t = len(tokens) = {len(tokens)} "
                                 f"(one example: rel.tokens[i]), got {tuple(relevance.shape)}")
    if not torch.isfinite(values).all():
        raise InvalidArgumentError("relevance must be finite, got NaN or inf (a padded row: slice its real tokens)")
    return values


def _write(path, title: str, body: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    title = escape(title)
    path.write_text(f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
                    f"<style>{_CSS}</style></head><body><h1>{title}</h1>{body}</body></html>\n", encoding="utf-8")
    return path
