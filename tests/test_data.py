"""attnfx.data (issue 14): padded batches of a list, a list of dicts or a datasets.Dataset equal each
prompt tokenized alone; an analysis reduced over the batches equals it run one example at a time,
with left and right padding, on the default model; results round-trip through safetensors exactly,
labels and metadata included; bad input raises typed errors; the tokenizer is never changed."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import given, strategies as st

import attnfx
from _tol import assert_close
from attnfx import data
from attnfx.batching import SIDES
from attnfx.errors import InvalidArgumentError, ShapeMismatchError
from attnfx.models.loader import load_default, load_prompts, load_tokenizer

datasets = pytest.importorskip("datasets")

_SHIPPED = load_prompts()
# eight held-out prompts of eight lengths (5 to 17 words): every batch of two or more is padded
PROMPTS = [_SHIPPED["facts"][0]["prompt"], _SHIPPED["ioi"][0]["prompt"], _SHIPPED["copy"][0]["first"],
           _SHIPPED["counterfactual"][0]["prompt"], _SHIPPED["copy"][1]["first"], _SHIPPED["copy"][2]["first"],
           _SHIPPED["facts"][120]["prompt"] + " " + _SHIPPED["facts"][120]["answer"], "the"]
POOL = [row["first"] for row in _SHIPPED["copy"][:40]] + PROMPTS
LAYERS = [0, -1]
KINDS = ("resid_pre", "z")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def default():
    model, tokenizer = load_default()
    return attnfx.instrument(model, backend="eager"), tokenizer


@pytest.fixture(scope="module")
def alone(default):
    """Each prompt run alone (no padding): {kind: [n, len(LAYERS), ...]} at its last token."""
    im, tokenizer = default
    rows = {kind: [] for kind in KINDS}
    for prompt in PROMPTS:
        with torch.no_grad(), im.record(*KINDS, layers=[0, im.num_layers - 1]) as rec:
            im(**tokenizer(prompt, return_tensors="pt"))
        for kind in KINDS:
            rows[kind].append(torch.stack([rec[kind, layer][0, -1] for layer in LAYERS]))
    return {kind: torch.stack(value) for kind, value in rows.items()}


def _check_batches(found, texts, tok, side):
    assert torch.equal(torch.cat([b.indices for b in found]), torch.arange(len(texts)))
    assert [t for b in found for t in b.texts] == list(texts)
    for batch in found:
        ids, mask = batch.encoding["input_ids"], batch.encoding["attention_mask"]
        alone = [tok(text)["input_ids"] for text in batch.texts]
        assert ids.shape == (len(batch), max(map(len, alone)))
        for row, want in enumerate(alone):
            n, pads = len(want), ids.shape[1] - len(want)
            real = slice(pads, None) if side == "left" else slice(0, n)
            padded = slice(0, pads) if side == "left" else slice(n, None)
            assert ids[row, real].tolist() == want and mask[row, real].eq(1).all()
            assert mask[row, padded].eq(0).all() and ids[row, padded].eq(tok.pad_token_id).all()
            assert batch.last_positions[row] == (ids.shape[1] - 1 if side == "left" else n - 1)
        if side == "left":      # real tokens count from 0, as the row alone would see them
            assert batch.encoding["position_ids"][mask.bool()].tolist() == [i for w in alone for i in range(len(w))]
        else:
            assert "position_ids" not in batch.encoding


@given(texts=st.lists(st.sampled_from(POOL), min_size=1, max_size=11), batch_size=st.integers(1, 5),
       side=st.sampled_from(SIDES))
def test_batches_equal_each_prompt_tokenized_alone(tok, texts, batch_size, side):
    found = list(data.batches(texts, tok, batch_size=batch_size, padding_side=side, progress=False))
    assert [len(b) for b in found] == [min(batch_size, len(texts) - s) for s in range(0, len(texts), batch_size)]
    _check_batches(found, texts, tok, side)
    assert tok.padding_side == "right"


def test_dataset_and_list_of_dicts_batch_like_the_list(tok):
    rows = [{"prompt": text, "label": i % 3} for i, text in enumerate(PROMPTS)]
    table = datasets.Dataset.from_list(rows)
    want = list(data.batches(PROMPTS, tok, batch_size=3, padding_side="left", progress=False))
    for source in (table, rows):
        found = list(data.batches(source, tok, batch_size=3, padding_side="left", column="prompt", progress=False))
        _check_batches(found, PROMPTS, tok, "left")
        for got, expected in zip(found, want, strict=True):
            assert got.encoding.keys() == expected.encoding.keys()
            assert all(torch.equal(got.encoding[k], expected.encoding[k]) for k in expected.encoding)


@pytest.mark.parametrize("side", SIDES)
@given(n=st.integers(2, len(PROMPTS)), batch_size=st.integers(2, 4))
def test_reduce_equals_the_examples_run_one_at_a_time(default, alone, side, n, batch_size):
    im, tokenizer = default
    run = lambda how: data.reduce(im, PROMPTS[:n], tokenizer, data.last_token(KINDS, layers=LAYERS),  # noqa: E731
                                  reduce=how, batch_size=batch_size, padding_side=side, progress=False)
    mean, total, rows = run("mean"), run("sum"), run("none")
    for kind in KINDS:
        want = alone[kind][:n]
        assert_close(rows[kind], want)
        assert_close(mean[kind], want.mean(0))
        assert_close(total[kind], want.sum(0))
        assert mean[kind].dtype == torch.float32 and mean[kind].shape == want.shape[1:]


def test_left_padded_last_token_equals_the_prompt_alone_only_with_position_ids(default, alone):
    im, tokenizer = default
    analysis = data.last_token(KINDS, layers=LAYERS)
    for positions, equal in ((None, True), (False, False)):
        (batch,) = data.batches(PROMPTS, tokenizer, batch_size=len(PROMPTS), padding_side="left",
                                position_ids=positions, progress=False)
        got = analysis(im, batch)
        # the longest prompt has no pads: the same either way
        longest = max(range(len(PROMPTS)), key=lambda i: len(tokenizer(PROMPTS[i])["input_ids"]))
        assert_close(got["resid_pre"][longest], alone["resid_pre"][longest])
        same = torch.allclose(got["resid_pre"], alone["resid_pre"], atol=1e-5, rtol=1e-5)
        assert same == equal        # absolute positions: a left-padded row is shifted without them


def test_token_loss_rows_equal_hf_loss_of_each_prompt_alone(default):
    im, tokenizer = default
    prompts = PROMPTS[:6]
    got = data.reduce(im, prompts, tokenizer, data.token_loss(), reduce="none", batch_size=3,
                      padding_side="left", progress=False)
    for i, prompt in enumerate(prompts):
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            want = im.model(**enc, labels=enc["input_ids"]).loss
        assert_close(got["loss"][i], want)
        assert got["tokens"][i] == enc["input_ids"].shape[1] - 1


def test_reduce_checks_what_an_analysis_returns(default):
    im, tokenizer = default
    ids = lambda im, batch: {"ids": batch.encoding["input_ids"].float()}    # noqa: E731  [b, t]: t differs
    rows = data.reduce(im, PROMPTS, tokenizer, ids, reduce="none", batch_size=3, progress=False)["ids"]
    widest = max(len(tokenizer(p)["input_ids"]) for p in PROMPTS)
    assert rows.shape == (len(PROMPTS), widest)
    for i in range(len(PROMPTS)):           # batches of 3, right-padded (the tokenizer's side)
        want = tokenizer(PROMPTS[3 * (i // 3):3 * (i // 3) + 3], padding=True)["input_ids"][i % 3]
        assert rows[i, :len(want)].tolist() == want and rows[i, len(want):].isnan().all()
    with pytest.raises(ShapeMismatchError, match="one shape per example"):
        data.reduce(im, PROMPTS, tokenizer, ids, batch_size=3, progress=False)
    with pytest.raises(ShapeMismatchError, match="only floating results"):
        data.reduce(im, PROMPTS, tokenizer, lambda im, b: {"ids": b.encoding["input_ids"]}, reduce="none",
                    batch_size=3, progress=False)
    with pytest.raises(ShapeMismatchError, match=r"\[batch=3, ...\]"):
        data.reduce(im, PROMPTS, tokenizer, lambda im, b: {"x": torch.zeros(1)}, batch_size=3, progress=False)
    with pytest.raises(InvalidArgumentError, match="dict of tensors"):
        data.reduce(im, PROMPTS, tokenizer, lambda im, b: torch.zeros(len(b)), batch_size=3, progress=False)
    with pytest.raises(InvalidArgumentError, match="reduce must be one of"):
        data.reduce(im, PROMPTS, tokenizer, ids, reduce="per_row")
    counts = data.reduce(im, PROMPTS, tokenizer, lambda im, b: {"n": b.encoding["attention_mask"].sum(-1)},
                         batch_size=3, progress=False)["n"]
    assert counts.dtype == torch.float32
    assert counts.item() == pytest.approx(sum(len(tokenizer(p)["input_ids"]) for p in PROMPTS) / len(PROMPTS))


def test_bad_sources_and_tokenizers_raise_typed_errors_before_any_batch(tok):
    table = datasets.Dataset.from_dict({"text": PROMPTS})
    no_pad = load_tokenizer()
    no_pad.pad_token = None
    cases = [
        (dict(source=table, column="prompt"), "column 'prompt' is not among the dataset's columns \\['text'\\]"),
        (dict(source=[{"prompt": "a"}]), "example 0 has no 'text'"),
        (dict(source=[]), "source is empty"),
        (dict(source=table.select([])), "source is empty"),
        (dict(source=datasets.DatasetDict({"train": table})), "DatasetDict of splits \\['train'\\]"),
        (dict(source="the capital"), "wrap it in a list"),
        (dict(source=iter(PROMPTS)), "a length"),
        (dict(source=["a", 3]), "example 1 .* is a int, expected a str"),
        (dict(source=PROMPTS, tokenizer=no_pad), "no pad token.*tokenizer.pad_token = tokenizer.eos_token"),
        (dict(source=PROMPTS, padding_side="middle"), "padding_side must be one of"),
        (dict(source=PROMPTS, batch_size=0), "batch_size must be a positive int"),
        (dict(source=PROMPTS, max_length=0), "max_length must be a positive int"),
    ]
    for kwargs, message in cases:
        kwargs = dict(tokenizer=tok, progress=False) | kwargs
        with pytest.raises(InvalidArgumentError, match=message):
            data.batches(kwargs.pop("source"), kwargs.pop("tokenizer"), **kwargs)      # not iterated
    (batch,) = data.batches(PROMPTS[:1], no_pad, batch_size=1, progress=False)         # one row needs no pad
    assert batch.encoding["input_ids"].shape == (1, len(tok(PROMPTS[0])["input_ids"]))


def test_the_tokenizer_is_never_changed_even_when_the_analysis_raises(default):
    im, tokenizer = default
    tokenizer.padding_side = "right"
    seen = []

    def analysis(im, batch):
        seen.append((batch.padding_side, tokenizer.padding_side))
        if len(seen) == 2:
            raise RuntimeError("boom")
        return {"x": torch.zeros(len(batch))}

    with pytest.raises(RuntimeError, match="boom"):
        data.reduce(im, PROMPTS, tokenizer, analysis, padding_side="left", batch_size=3, progress=False)
    assert seen == [("left", "right")] * 2 and tokenizer.padding_side == "right"
    (batch,) = data.batches(PROMPTS, tokenizer, batch_size=len(PROMPTS), progress=False)
    assert batch.padding_side == "right" and batch.encoding["attention_mask"][:, 0].eq(1).all()


def test_progress_bar_counts_examples(tok, capsys):
    list(data.batches(PROMPTS, tok, batch_size=3, progress=True))
    assert f"{len(PROMPTS)}/{len(PROMPTS)}" in capsys.readouterr().err
    list(data.batches(PROMPTS, tok, batch_size=3, progress=False))
    assert capsys.readouterr().err == ""


def _header(path) -> dict:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])               # safetensors: u64 header size, JSON header, raw data
    return json.loads(raw[8:8 + size])


@given(labels=st.lists(st.text(), max_size=6), meta=st.dictionaries(
    st.text(max_size=8), st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False,
                                      allow_infinity=False) | st.text(), lambda inner: st.lists(inner, max_size=3),
                                      max_leaves=6), max_size=4))
def test_save_load_round_trip_is_exact(tmp_path_factory, labels, meta):
    path = tmp_path_factory.mktemp("saved") / "out.safetensors"
    base = torch.randn(4, 6)
    tensors = {"mean": base, "row": base[1], "half": base.to(torch.bfloat16), "ids": torch.arange(5),
               "flags": torch.tensor([True, False]), "t": base.T}
    data.save(path, tensors, labels=labels, metadata=meta)
    got, got_labels, got_meta = data.load(path)
    assert got.keys() == tensors.keys()
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in tensors.items())
    assert got_labels == labels and got_meta == meta
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:             # a safetensors file, not a pickle or a zip
        assert set(f.keys()) == set(tensors)
    assert path.read_bytes()[:1] != b"\x80" and path.read_bytes()[:2] != b"PK"
    assert json.loads(_header(path)["__metadata__"]["attnfx.labels"]) == labels


def test_save_keeps_dict_labels_and_refuses_what_would_not_read_back(tmp_path):
    path = tmp_path / "x.safetensors"
    labels = {"text": PROMPTS, "class": [i % 2 for i in range(len(PROMPTS))]}
    data.save(path, {"x": torch.ones(2)}, labels=labels, metadata={"layers": LAYERS, "kinds": list(KINDS)})
    assert data.load(path)[1:] == (labels, {"layers": LAYERS, "kinds": list(KINDS)})
    data.save(path, {"x": torch.ones(2)})
    assert data.load(path)[1:] == (None, None)
    for kwargs, message in [
        (dict(metadata={"kinds": KINDS}), "would not read back equal"),
        (dict(metadata={1: "a"}), "would not read back equal"),
        (dict(metadata={"x": float("nan")}), "must be JSON"),
        (dict(metadata={"x": torch.ones(1)}), "must be JSON"),
        (dict(metadata=["a"]), "metadata must be a dict"),
        (dict(labels="abc"), "labels must be a list"),
    ]:
        with pytest.raises(InvalidArgumentError, match=message):
            data.save(path, {"x": torch.ones(2)}, **kwargs)
    with pytest.raises(InvalidArgumentError, match="tensors must be"):
        data.save(path, {"x": [1, 2]})
