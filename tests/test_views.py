"""attnfx.views (issue 14): self-contained HTML views of attention patterns and token relevance,
their colours, their typed errors, and a render in a real headless Chromium (Debian's package:
`make browser`), checked by its screenshot's pixels and by the DOM after the page's script ran."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

import attnfx
from attnfx import views
from attnfx.errors import InvalidArgumentError, ShapeMismatchError, SiteIndexError
from attnfx.models.loader import load_default, load_prompts

NASTY = ["<bos>", "<script>alert(1)</script>", "a&b", "\"q'", " sp"]
EXTERNAL = ("http://", "https://", "src=", "@import", "url(", "<link", "//cdn")
BROWSER_TIMEOUT_S = 60
BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--force-device-scale-factor=1", "--hide-scrollbars")
WINDOW = "1200,800"          # the default model's 8 heads of 6 tokens fit, two rows of grids
WHITE = "#ffffff"


def _pattern(heads: int, t: int, seed: int = 0) -> torch.Tensor:
    """A causal softmax pattern [heads, t, t]."""
    scores = torch.randn(heads, t, t, generator=torch.Generator().manual_seed(seed))
    return scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)


class _Elements(HTMLParser):
    """Attributes (unescaped) of every element carrying a class, in document order."""

    def __init__(self, html: str):
        super().__init__()
        self.found: list[tuple[str, dict]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "class" in attrs:
            self.found.append((tag, attrs))

    def of(self, cls: str) -> list[dict]:
        return [attrs for _, attrs in self.found if cls in attrs["class"].split()]


def _background(attrs: dict) -> str:
    """#rrggbb of an element's inline background, as written (hex) or as the browser serialises it (rgb())."""
    style = attrs.get("style", "")
    if m := re.search(r"background:\s*(#[0-9a-f]{6})", style):
        return m.group(1)
    r, g, b = map(int, re.search(r"background:\s*rgb\((\d+), (\d+), (\d+)\)", style).groups())
    return f"#{r:02x}{g:02x}{b:02x}"


def _towards(end: str, x: float) -> str:
    """#rrggbb a fraction x of the way from white to `end`, channel by channel."""
    return "#" + "".join(f"{round(255 + (c - 255) * x):02x}" for c in _rgb(end))


def _rgb(colour: str) -> np.ndarray:
    return np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.int64)


# ---------------------------------------------------------------- the file itself


@pytest.mark.parametrize("kind", ["attention", "relevance"])
def test_html_is_self_contained_and_escapes_token_text(tmp_path, kind):
    title = "<b>title</b> & more"
    if kind == "attention":
        path = views.attention_view(NASTY, _pattern(2, len(NASTY)), tmp_path / "a.html", layer=0, title=title)
    else:
        path = views.relevance_view(NASTY, torch.linspace(-1, 2, len(NASTY)), tmp_path / "r.html", title=title)
    html = path.read_text(encoding="utf-8")
    assert not [needle for needle in EXTERNAL if needle in html.lower()]
    assert re.findall(r"<script[^>]*>", html) == (["<script>"] if kind == "attention" else [])   # inline only
    assert "alert(1)</script>" not in html and "<b>title" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "a&amp;b" in html and "&quot;q&#x27;" in html
    assert "&lt;b&gt;title&lt;/b&gt; &amp; more" in html
    if kind == "attention":                                       # a parser reads the tokens back unchanged
        assert [attrs["title"] for attrs in _Elements(html).of("q")] == NASTY * 2      # 2 heads


def test_attention_cells_colour_monotone_in_probability_darkest_at_the_largest(tmp_path):
    probs = _pattern(3, 7, seed=1)
    heads = [2, 0]
    html = views.attention_view([f"t{i}" for i in range(7)], probs, tmp_path / "a.html", heads=heads).read_text()
    cells = _Elements(html).of("c")
    assert len(cells) == len(heads) * 7 * 7
    shown = probs[heads].flatten().tolist()                       # the grids, row-major, in `heads` order
    colours = [_background(attrs) for attrs in cells]
    assert [float(attrs["title"].rsplit(": ", 1)[1]) for attrs in cells] == pytest.approx(shown, abs=5e-5)
    assert colours == [_towards(views.DARKEST, p / max(shown)) for p in shown]    # one scale for the heads shown
    assert colours[int(np.argmax(shown))] == views.DARKEST
    assert all(c == WHITE for c, p in zip(colours, shown) if p == 0)
    channels = np.stack([_rgb(c) for c in colours])[np.argsort(shown, kind="stable")]
    assert (np.diff(channels, axis=0) <= 0).all()                 # each channel darkens as p grows


def test_relevance_colours_are_signed_centred_at_zero_and_scaled_by_max_abs(tmp_path):
    values = torch.tensor([-2.0, -0.5, 0.0, 0.5, 1.0, 4.0])
    html = views.relevance_view([f"w{i}" for i in range(6)], values[None], tmp_path / "r.html").read_text()
    spans = _Elements(html).of("tok")
    colours = [_background(attrs) for attrs in spans]
    assert [float(attrs["title"]) for attrs in spans] == values.tolist()
    assert colours[5] == views.POSITIVE and colours[2] == WHITE
    assert colours[0] == _towards(views.NEGATIVE, 0.5) and colours[4] == _towards(views.POSITIVE, 0.25)
    assert colours[1] == _towards(views.NEGATIVE, 0.125) and colours[3] == _towards(views.POSITIVE, 0.125)


@pytest.mark.parametrize("call, error, match", [
    (lambda p: views.attention_view(["a", "b"], torch.eye(3), p), ShapeMismatchError, r"len\(tokens\) = 2"),
    (lambda p: views.attention_view(["a", "b"], torch.eye(2)[None, None], p), ShapeMismatchError, r"\[heads, t, t\]"),
    (lambda p: views.attention_view(["a", "b"], torch.full((2, 2), float("nan")), p), InvalidArgumentError, "finite"),
    (lambda p: views.attention_view(["a", "b"], -torch.eye(2), p), InvalidArgumentError, r"\[0, 1\]"),
    (lambda p: views.attention_view(["a", "b"], torch.eye(2).expand(2, 2, 2), p, heads=[2]), SiteIndexError,
     r"\[0, 2\)"),
    (lambda p: views.attention_view([1, 2], torch.eye(2), p), InvalidArgumentError, "list of str"),
    (lambda p: views.attention_view(["a"], [[1.0]], p), InvalidArgumentError, "torch.Tensor"),
    (lambda p: views.relevance_view(["a", "b"], torch.zeros(2, 2), p), ShapeMismatchError, r"rel.tokens\[i\]"),
    (lambda p: views.relevance_view(["a", "b"], torch.tensor([1.0, float("inf")]), p), InvalidArgumentError, "finite"),
])
def test_bad_inputs_raise_typed_errors_before_writing(tmp_path, call, error, match):
    path = tmp_path / "never.html"
    with pytest.raises(error, match=match):
        call(path)
    assert not path.exists()


# ---------------------------------------------------------------- rendered by Chromium


@pytest.fixture(scope="module")
def browser():
    found = shutil.which("chromium")
    if found is None:
        reason = "needs Debian's chromium for the rendering tests (`make browser` installs it)"
        if os.environ.get("ATTNFX_REQUIRE_BROWSER") == "1":
            pytest.fail(f"ATTNFX_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    return found


def _chromium(browser, tmp_path, page, *args, fragment: str = "") -> str:
    """Run headless Chromium on a file:// page in a fresh profile; its stdout (--dump-dom's DOM)."""
    profile = tempfile.mkdtemp(prefix="profile-", dir=tmp_path)
    done = subprocess.run([browser, *BROWSER_FLAGS, f"--user-data-dir={profile}", *args,
                           page.resolve().as_uri() + fragment],
                          capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _screenshot(browser, tmp_path, page, fragment: str = "") -> np.ndarray:
    """The page's viewport as [height, width, 3] uint8, the PNG kept beside it in tmp_path."""
    import matplotlib.image

    png = page.with_suffix(".png")
    _chromium(browser, tmp_path, page, f"--screenshot={png}", f"--window-size={WINDOW}", fragment=fragment)
    pixels = matplotlib.image.imread(png)[..., :3]
    return np.round(pixels * 255).astype(np.int64)


def _where(pixels: np.ndarray, colour: str) -> np.ndarray:
    return np.argwhere((pixels == _rgb(colour)).all(-1))          # [n, (y, x)]


def test_heatmap_pixels_in_chromium_sit_where_the_cells_are(browser, tmp_path):
    """One head, row q uniform over keys ≤ q: only cell (0, 0) is 1.0, so the darkest pixels are
    exactly that cell; its neighbours below and right are found CELL_PX further on."""
    t, cell = 4, views.CELL_PX
    pattern = torch.tril(torch.ones(t, t)) / torch.arange(1, t + 1)[:, None]
    page = views.attention_view(list("abcd"), pattern, tmp_path / "grid.html")
    colours = [_background(attrs) for attrs in _Elements(page.read_text()).of("c")]
    pixels = _screenshot(browser, tmp_path, page)
    dark = _where(pixels, views.DARKEST)
    (y0, x0), (y1, x1) = dark.min(0), dark.max(0)
    assert (y1 - y0 + 1, x1 - x0 + 1, len(dark)) == (cell, cell, cell * cell)
    middle = cell // 2
    for q, k in [(1, 0), (1, 1), (0, 1), (3, 3), (2, 3)]:                # 0.5, 0.5, masked, 0.25, masked
        assert tuple(pixels[y0 + q * cell + middle, x0 + k * cell + middle]) == tuple(_rgb(colours[q * t + k]))
    assert colours[1] == WHITE and colours[4] != WHITE


@pytest.fixture(scope="module")
def default_model():
    model, tokenizer = load_default()
    return attnfx.instrument(model, backend="eager"), tokenizer, load_prompts()["facts"][0]


def test_real_pattern_renders_and_the_script_colours_the_selected_query(browser, tmp_path, default_model):
    im, tokenizer, fact = default_model
    layer, head, query = 1, 3, 4
    page = views.attention_view_of(im, tokenizer, fact["prompt"], tmp_path / "pattern.html", layer=layer)
    heads, t = im.sites[layer].num_heads, len(tokenizer(fact["prompt"])["input_ids"])
    written = [_background(attrs) for attrs in _Elements(page.read_text()).of("c")]
    fragment = f"#head={head}&query={query}"
    dom = _Elements(_chromium(browser, tmp_path, page, "--dump-dom", fragment=fragment))
    assert len(dom.of("c")) == heads * t * t
    strip = dom.of("tok")
    assert [_background(attrs) for attrs in strip] == written[(head * t + query) * t:(head * t + query + 1) * t]
    assert [i for i, attrs in enumerate(strip) if "sel" in attrs["class"].split()] == [query]
    pixels = _screenshot(browser, tmp_path, page, fragment)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20 and (pixels != 255).any(-1).mean() > 0.02
    # each head's cell (0, 0) is a softmax over one key, exactly 1.0: the darkest colour
    assert len(_where(pixels, views.DARKEST)) >= heads * views.CELL_PX ** 2


def test_real_relevance_renders_in_chromium(browser, tmp_path, default_model):
    im, tokenizer, fact = default_model
    batch = tokenizer(fact["prompt"], return_tensors="pt")
    rel = attnfx.relevance(im, batch, tokenizer.convert_tokens_to_ids(fact["answer"]), components=("tokens",))
    tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    page = views.relevance_view(tokens, rel.tokens[0], tmp_path / "relevance.html", title=fact["answer"])
    strongest = rel.tokens[0][rel.tokens[0].abs().argmax()]
    pixels = _screenshot(browser, tmp_path, page)
    assert len(_where(pixels, views.POSITIVE if strongest > 0 else views.NEGATIVE)) > 100
    assert (pixels != 255).any(-1).mean() > 0.005
