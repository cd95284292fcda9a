"""The main job (`attnfx demo`): the Yu et al. (2023) pipeline end to end on a subset of the
default model's held-out prompts, the report folder, `--model DIR` on other causal LMs, and the
errors a user meets."""
import json
import subprocess
import sys

import pytest
import torch
import transformers

from attnfx.analysis import factual_recall as fr
from attnfx.cli import main
from attnfx.demo import run_demo
from attnfx.errors import InvalidArgumentError, NoAttentionFoundError
from attnfx.models import default_dir, load_default, load_prompts

SUBSET = 160


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(out=out, limit=SUBSET, backend="eager", progress=False, echo=lambda *a: None)


def test_demo_writes_the_report_folder(report):
    out, rep = report
    assert {p.name for p in out.iterdir()} >= {"report.json", "report.html", "dla_heatmap.png", "value_sweep.png"}
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(rep))
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert rep["model"]["id"].startswith("attnfx-default@")
    assert rep["result"]["prompts"] == SUBSET and rep["seed"] == 0
    assert set(rep["timing_s"]) >= {"load", "experiment", "total"}
    layers, heads = len(rep["sites"]), rep["sites"][0]["num_heads"]
    assert torch.tensor(rep["result"]["dla"]).shape == (layers, heads)


def test_demo_reproduces_the_direction_of_the_paper(report):
    _, rep = report
    result, base = rep["result"], rep["result"]["baseline"]["in_context"]
    assert rep["checks"]["no_graph_compiled_during_sweeps"]
    assert rep["checks"]["scale_1_reproduces_baseline"]
    assert fr.rate_at(result, "in_context_head", 5.0) > base > fr.rate_at(result, "in_context_head", 0.0)
    assert fr.rate_at(result, "memorised_head", 5.0) < base
    assert [p["factor"] for p in result["sweeps"]["in_context_head"]["points"]] == list(fr.SWEEP_FACTORS)


def test_demo_top_heads_are_the_extremes_of_the_attribution(report):
    _, rep = report
    dla = torch.tensor(rep["result"]["dla"])
    heads = dla.shape[1]
    assert divmod(int(dla.argmax()), heads) == tuple(rep["result"]["top_in_context_head"])
    assert divmod(int(dla.argmin()), heads) == tuple(rep["result"]["top_memorised_head"])


def test_the_limit_subset_is_seeded():
    items = load_prompts()["counterfactual"]
    from attnfx.demo import prompt_items

    first = prompt_items(default_dir(), None, 50, seed=1)
    assert first == prompt_items(default_dir(), None, 50, seed=1)
    assert first != prompt_items(default_dir(), None, 50, seed=2)
    assert all(item in items for item in first)


def _save_llama(folder):
    """A random-weight Llama (GQA) with the default model's tokenizer: another architecture."""
    _, tok = load_default()
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def test_demo_runs_on_any_local_causal_lm(tmp_path):
    _save_llama(tmp_path / "llama")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(load_prompts()["counterfactual"][:24]))
    rep = run_demo(model_dir=tmp_path / "llama", prompt_file=prompts, out=tmp_path / "out", backend="eager",
                   progress=False, echo=lambda *a: None)
    assert rep["model"]["id"].startswith("llama@") and rep["model"]["class"] == "LlamaForCausalLM"
    assert rep["checks"]["no_graph_compiled_during_sweeps"] and rep["checks"]["scale_1_reproduces_baseline"]
    for sweep in rep["result"]["sweeps"].values():
        assert sweep["kv_head"] == sweep["head"] // 2        # value scaling acts on the GQA kv head
    assert (tmp_path / "out" / "report.html").is_file()


def test_cli_errors_name_what_was_expected(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["demo", "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "the capital of"}]))
    assert main(["demo", "--prompts", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "in_context" in capsys.readouterr().err


def test_a_model_without_attention_is_refused(tmp_path):
    _, tok = load_default()
    folder = tmp_path / "mamba"
    config = transformers.MambaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, state_size=4)
    transformers.MambaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(load_prompts()["counterfactual"][:4]))
    with pytest.raises(NoAttentionFoundError):
        run_demo(model_dir=folder, prompt_file=prompts, out=tmp_path / "out", backend="eager",
                 progress=False, echo=lambda *a: None)
    assert not (tmp_path / "out").exists()                  # nothing half-written


def test_prompt_file_validation(tmp_path):
    path = tmp_path / "p.json"
    for content, match in (("{", "not valid JSON"), ("[]", "non-empty"), ('{"x": 1}', "non-empty"),
                           ('[{"prompt": "a", "in_context": "b", "memorised": 3}]', "item 0")):
        path.write_text(content)
        with pytest.raises(InvalidArgumentError, match=match):
            fr.load_prompt_file(path)
    with pytest.raises(FileNotFoundError):
        fr.load_prompt_file(tmp_path / "none.json")


def test_console_script_help_lists_the_commands():
    done = subprocess.run([sys.executable, "-m", "attnfx.cli", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "demo" in done.stdout
