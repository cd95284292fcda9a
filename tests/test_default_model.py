"""The embedded default model (attnfx.models): offline loading, a deterministic corpus and
training script, held-out prompts that training never saw, and the Yu et al. (2023) acceptance
numbers measured with attnfx on the shipped weights."""
import json
import os
import subprocess
import sys

import pytest
import torch

from attnfx.models import data, default_dir, load_default, load_prompts
from attnfx.analysis import factual_recall as fr
from attnfx.models.train import TrainConfig, save, train

SHIPPED = json.loads((default_dir() / "metrics.json").read_text())
MAX_SHIPPED_BYTES = 20 * 2**20
TINY = TrainConfig(steps=3, batch_size=8, n_embd=32, n_layer=1, n_head=2, threads=1)
# Value-scaling factors of the acceptance: up, and down (bias-free values, Yu et al. 2023).
UP, DOWN = 5.0, 0.0

OFFLINE_SCRIPT = """
import socket
def _refuse(*args, **kwargs):
    raise OSError("network access attempted")
socket.socket.connect = _refuse
socket.create_connection = _refuse
import torch
from attnfx.models import load_default, load_prompts
model, tok = load_default()
fact = load_prompts()["facts"][0]
ids = torch.tensor([tok(fact["prompt"])["input_ids"]])
with torch.no_grad():
    pred = model(input_ids=ids).logits[0, -1].argmax()
assert tok.convert_ids_to_tokens(int(pred)) == fact["answer"], (fact, tok.convert_ids_to_tokens(int(pred)))
"""


def _world():
    cfg = SHIPPED["train_config"]
    return data.make_world(cfg["seed"], data.WorldConfig(**cfg["world"]))


@pytest.fixture(scope="module")
def default():
    return load_default()


def test_loader_works_offline():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_shipped_artifacts_are_small_and_consistent(default):
    model, tok = default
    files = [p for p in default_dir().iterdir() if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_SHIPPED_BYTES
    assert {"config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md",
            "prompts.json", "metrics.json"} <= {p.name for p in files}
    cfg = SHIPPED["train_config"]
    assert (model.config.n_layer, model.config.n_head, model.config.n_embd) == (
        cfg["n_layer"], cfg["n_head"], cfg["n_embd"])
    assert tok.get_vocab() == {w: i for i, w in enumerate(_world().vocabulary())}
    assert model.config.vocab_size == len(tok)
    assert load_prompts()["world"] == json.loads(json.dumps(_world().to_json()))


def test_corpus_is_deterministic_given_the_seed():
    world = data.make_world(3)
    first = data.corpus_hash(data.training_corpus(world, 500, seed=3))
    assert first == data.corpus_hash(data.training_corpus(data.make_world(3), 500, seed=3))
    assert first != data.corpus_hash(data.training_corpus(world, 500, seed=4))
    assert data.make_world(3) == world
    assert data.make_world(4).countries != world.countries


def test_shipped_corpus_hash_reproduces():
    cfg = SHIPPED["train_config"]
    corpus = data.training_corpus(_world(), cfg["steps"] * cfg["batch_size"], cfg["seed"])
    assert data.corpus_hash(corpus) == SHIPPED["corpus_hash"]


def test_heldout_pairs_never_appear_in_training():
    world = data.make_world(0)
    country = {c: i for i, c in enumerate(world.countries)}
    city = {c: i for i, c in enumerate(world.capitals)}
    name = {n: i for i, n in enumerate(world.names)}
    reserved_names = data.heldout_name_pairs(world)
    seen = {"counterfactual": 0, "ioi": 0}
    for doc in data.training_corpus(world, 4000, seed=0):
        words = doc.split()
        if words[0] == "when":
            seen["ioi"] += 1
            assert frozenset((name[words[1]], name[words[3]])) not in reserved_names, doc
        elif words[:3] == ["the", "capital", "of"] and city[words[5]] != country[words[3]]:
            # only counterfactual documents open with a wrong capital: the in-context one
            seen["counterfactual"] += 1
            assert city[words[5]] not in data.heldout_cities(world, country[words[3]]), doc
    assert min(seen.values()) > 100


def test_heldout_prompts_are_fresh_and_well_formed():
    prompts = load_prompts()
    cf = prompts["counterfactual"]
    assert len(cf) == len(prompts["world"]["facts"]) * data.HELDOUT_CITIES_PER_COUNTRY
    assert all(it["in_context"] != it["memorised"] for it in cf)
    assert all(it["answer"] != it["subject"] for it in prompts["ioi"])


def test_training_is_deterministic(tmp_path):
    runs = [train(TINY, progress=False) for _ in range(2)]
    (m1, _, _, h1, _), (m2, _, _, h2, _) = runs
    assert h1 == h2
    for (name, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), name
    model, tok, world, digest, seconds = runs[0]
    save(tmp_path, TINY, model, tok, world, digest, seconds, None)
    loaded, loaded_tok = load_default(path=tmp_path)
    ids = torch.tensor([loaded_tok("the capital of " + world.countries[0] + " is")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert (tmp_path / "MODEL_CARD.md").read_text().startswith("# attnfx default model")


def _run(default, backend):
    model, tok = default
    import attnfx

    im = attnfx.instrument(model, backend=backend)
    try:
        return fr.run(im, fr.prepare(tok, load_prompts()["counterfactual"]), factors=(DOWN, 1.0, UP))
    finally:
        im.uninstrument()


@pytest.fixture(scope="module")
def eager_run(default):
    return _run(default, "eager")


def test_value_scaling_moves_the_in_context_rate(default, eager_run):
    """The acceptance of issue 3, on every held-out counterfactual prompt: real competition at
    baseline, one head's value vectors decide it."""
    model, tok = default
    found, shipped = eager_run, SHIPPED["metrics"]["value_scaling_eager"]
    assert found["top_in_context_head"] == shipped["top_in_context_head"]
    assert found["top_memorised_head"] == shipped["top_memorised_head"]
    baseline = found["baseline"]["in_context"]
    plain = fr.answer_rates(model, fr.prepare(tok, load_prompts()["counterfactual"]))
    assert found["baseline"] == plain                     # instrumented, unsteered == the bare model
    assert fr.rate_at(found, "in_context_head", 1.0) == baseline
    assert 0.2 <= baseline <= 0.8
    assert fr.rate_at(found, "in_context_head", UP) >= 0.85
    assert fr.rate_at(found, "in_context_head", DOWN) < baseline
    assert fr.rate_at(found, "memorised_head", UP) < baseline
    assert all(s["graphs_compiled"] == 0 for s in found["sweeps"].values())


@pytest.mark.inductor
def test_eager_and_inductor_give_the_same_rates(eager_run, default):
    compiled = _run(default, "inductor")
    for key in ("baseline", "top_in_context_head", "top_memorised_head"):
        assert eager_run[key] == compiled[key], key
    for name in ("in_context_head", "memorised_head"):
        assert eager_run["sweeps"][name]["points"] == compiled["sweeps"][name]["points"], name
