"""attnfx.data under torch.distributed (issue 17). Two gloo ranks on the CPU, started as torchrun
starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT; one thread each), sweep per-head DLA, relevance
and activation patching over the default model's prompts and get exactly (torch.equal) what one
process gets, for "mean" and "none", with an uneven shard (rank 0: batches 0, 2, 4, the last of
one example; rank 1: 1, 3). Only rank 0 saves and shows a bar. A rank killed mid-sweep makes the
other raise within the process group's timeout; a rerun with the same checkpoint folder runs only
the batches not written and gives the uninterrupted result. A checkpoint of another sweep is refused.

Each spawn runs every check it can in one process group: starting one (imports, loading and
instrumenting the model) costs more than the sweeps."""
from __future__ import annotations

import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import attnfx
from _tol import assert_close
from attnfx import data, sweeps
from attnfx.errors import InvalidArgumentError, ShapeMismatchError
from attnfx.models.loader import load_default, load_prompts, load_tokenizer

WORLD = 2
BATCH = 2                   # 9 prompts: 5 batches, rank 0 runs three (the last of one example), rank 1 two
PG_TIMEOUT_S = 20           # the process group's timeout: how long a rank may wait for a dead one
RAISE_WITHIN_S = 60         # what the killed-rank test allows rank 0, its own sweep included
SPAWN_LIMIT_S = 300         # a hung spawn fails the test instead of the session
KILL_AT = 2                 # rank 1 kills itself at its second batch (batch 3), after writing batch 1
NAMES = ("dla", "relevance", "patching")
ALONE = (1, 3)              # IOI prompts batched with a left-padded fact: run alone too, by the API itself


def _pairs(tokenizer):
    """9 (clean, corrupt) prompts with answer and foil ids: facts (the capital of X → of Y, 6
    tokens) alternating with IOI (the second subject → a third name, 15 tokens), so that every
    batch is padded to 15 (fewer shapes to compile) but the last, of one IOI prompt."""
    shipped = load_prompts()
    facts, ioi, names = shipped["facts"], shipped["ioi"], shipped["world"]["names"]
    rows = []
    for k in range(5):
        if k < 4:
            rows.append((facts[k]["prompt"], facts[k + 1]["prompt"], facts[k]["answer"], facts[k + 1]["answer"]))
        words = ioi[k]["prompt"].split()
        words[9] = next(name for name in names if name not in words)          # "…, S gave" → "…, C gave"
        rows.append((ioi[k]["prompt"], " ".join(words), ioi[k]["answer"], ioi[k]["subject"]))
    clean, corrupt, answers, foils = zip(*rows)
    return list(clean), list(corrupt), tokenizer.convert_tokens_to_ids(answers), tokenizer.convert_tokens_to_ids(foils)


def _sweep(im, tokenizer, analysis, **kwargs):
    prompts = _pairs(tokenizer)[0]
    return data.reduce(im, prompts, tokenizer, analysis, batch_size=BATCH, padding_side="left", **kwargs)


# ---- what each rank runs ---------------------------------------------------------------------------
def _worker(mode: str, folder: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    model, tokenizer = load_default()
    im = attnfx.instrument(model, backend="eager")
    (_checks if mode == "checks" else _resume)(im, tokenizer, dist.get_rank(), folder)
    dist.destroy_process_group()


def _checks(im, tokenizer, rank: int, folder: Path) -> None:
    """Both reductions alone and shared, two rows by the API alone, saves, then a sweep during which
    rank 1 dies."""
    _, corrupt, answers, foils = _pairs(tokenizer)
    analysis = sweeps.combined(sweeps.head_dla(answers, foils), sweeps.head_relevance(answers, foils),
                               sweeps.head_patching(corrupt, tokenizer, answers, foils))
    found = {}
    for how in ("none", "mean"):            # alone first: the shared run finds every shape compiled alike
        for run, distributed in (("alone", False), ("shared", None)):
            result = _sweep(im, tokenizer, analysis, reduce=how, distributed=distributed, progress=run == "shared")
            found.update({f"{run}/{how}/{name}": value for name, value in result.items()})
    data.save(folder / f"rank{rank}.safetensors", found, distributed=False)
    data.save(folder / "saved.safetensors", {"rank": torch.tensor([rank])})
    if rank == 0:
        data.save(folder / "alone.safetensors", _each_alone(im, tokenizer))
    dist.barrier()

    calls, dla = [], sweeps.head_dla(answers, foils)

    def dying(im, batch):
        calls.append(int(batch.indices[0]))
        if rank == 1 and len(calls) == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        return dla(im, batch)

    start = time.monotonic()
    try:
        _sweep(im, tokenizer, dying, reduce="mean", checkpoint=folder / "checkpoint", progress=False)
    except Exception as error:      # noqa: BLE001  what the collective raises is gloo's to choose
        (folder / "raised.json").write_text(json.dumps({"error": f"{type(error).__name__}: {error}"[:300],
                                                        "seconds": time.monotonic() - start}))
        sys.stderr.flush()
        os._exit(0)                 # the group is broken: nothing to tear down


def _each_alone(im, tokenizer) -> dict[str, torch.Tensor]:
    """The ALONE prompts one at a time (no padding) through head_attribution, relevance and
    activation_patching: {name: [len(ALONE), L, H]}."""
    from attnfx.analysis import metrics
    from attnfx.analysis.patching import activation_patching

    def alone(text):        # position_ids as HF computes them: the call the sweep compiled for its last batch
        ids = tokenizer(text, return_tensors="pt")
        return dict(ids, position_ids=torch.arange(ids["input_ids"].shape[1])[None])

    clean, corrupt, answers, foils = _pairs(tokenizer)
    found = {name: [] for name in NAMES}
    for i in ALONE:
        ids = alone(clean[i])
        found["dla"].append(attnfx.head_attribution(im, ids, answers[i], foils[i], reduce="none")[0])
        found["relevance"].append(attnfx.relevance(im, ids, answers[i], foil=foils[i], components=("heads",)).heads[0])
        metric = metrics.logit_diff(answers[i], foils[i])
        found["patching"].append(activation_patching(im, ids, alone(corrupt[i]), metric, progress=False).scores)
    return {name: torch.stack(rows) for name, rows in found.items()}


def _resume(im, tokenizer, rank: int, folder: Path) -> None:
    _, _, answers, foils = _pairs(tokenizer)
    calls, dla = [], sweeps.head_dla(answers, foils)
    counted = lambda im, batch: calls.append(int(batch.indices[0])) or dla(im, batch)     # noqa: E731
    result = _sweep(im, tokenizer, counted, reduce="mean", checkpoint=folder / "checkpoint", progress=False)
    data.save(folder / f"resumed{rank}.safetensors", result, metadata={"calls": calls}, distributed=False)


# ---- the parent: spawns the ranks and checks what they wrote ---------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(mode: str, folder: Path) -> list[subprocess.CompletedProcess]:
    """Runs WORLD ranks of `mode`, as torchrun would (one thread each); their exit codes and stderr."""
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(WORLD),
                        "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    logs = [folder / f"{mode}{r}.err" for r in range(WORLD)]
    ranks = []
    for r, log in enumerate(logs):
        with open(log, "w") as err:
            ranks.append(subprocess.Popen([sys.executable, __file__, mode, str(folder)], stdout=subprocess.DEVNULL,
                                          stderr=err, env=env | {"RANK": str(r), "LOCAL_RANK": str(r)}))
    deadline = time.monotonic() + SPAWN_LIMIT_S
    try:
        for rank in ranks:
            rank.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
                rank.wait()
    return [subprocess.CompletedProcess(rank.args, rank.returncode, None, log.read_text())
            for rank, log in zip(ranks, logs)]


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    runs = _spawn("checks", folder)
    assert runs[0].returncode == 0, runs[0].stderr[-3000:]
    return folder, runs


@pytest.fixture(scope="module")
def resumed(checked):
    folder, _ = checked
    runs = _spawn("resume", folder)
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    return folder


def test_two_ranks_give_exactly_the_one_process_result(checked):
    folder, _ = checked
    ranks = [data.load(folder / f"rank{r}.safetensors")[0] for r in range(WORLD)]
    prompts = 9
    for how in ("none", "mean"):
        for name in NAMES:
            alone = ranks[0][f"alone/{how}/{name}"]
            assert alone.shape == ((prompts,) if how == "none" else ()) + (4, 8)
            assert alone.isfinite().all() and alone.abs().amax() > 0
            for found in ranks:             # every rank holds the whole result, and each computed it alone alike
                assert torch.equal(found[f"shared/{how}/{name}"], alone), (how, name)
                assert torch.equal(found[f"alone/{how}/{name}"], alone), (how, name)
    for name in NAMES:
        assert_close(ranks[0][f"alone/mean/{name}"], ranks[0][f"alone/none/{name}"].mean(0))


def test_each_row_is_its_prompt_run_alone(checked):
    folder, _ = checked
    swept, alone = data.load(folder / "rank0.safetensors")[0], data.load(folder / "alone.safetensors")[0]
    for name in NAMES:
        assert_close(swept[f"alone/none/{name}"][list(ALONE)], alone[name])


def test_only_rank_0_saves_and_shows_progress(checked):
    folder, runs = checked
    assert data.load(folder / "saved.safetensors")[0]["rank"].tolist() == [0]
    assert re.search(r"\b5/5 \[.*example", runs[0].stderr)    # its three batches: 2 + 2 + 1 examples
    assert "example" not in runs[1].stderr


def test_a_killed_rank_makes_the_others_raise(checked):
    folder, runs = checked
    assert runs[1].returncode == -signal.SIGKILL
    raised = json.loads((folder / "raised.json").read_text())
    assert raised["seconds"] < RAISE_WITHIN_S, raised
    written = sorted(path.name for path in (folder / "checkpoint").iterdir())
    assert written == [f"batch-{n:08d}.safetensors" for n in (0, 1, 2, 4)]      # rank 1 died at batch 3


def test_a_rerun_resumes_from_the_checkpoint(checked, resumed):
    uninterrupted = data.load(checked[0] / "rank0.safetensors")[0]["shared/mean/dla"]
    for rank, skipped in ((0, []), (1, [6])):       # rank 1 reruns batch 3 only (its first example: 6)
        tensors, _, metadata = data.load(resumed / f"resumed{rank}.safetensors")
        assert metadata["calls"] == skipped
        assert torch.equal(tensors["dla"], uninterrupted)


@pytest.fixture(scope="module")
def model():
    return load_default()[0]


def test_a_checkpoint_resumes_alone_and_refuses_another_sweep(model, tmp_path):
    tokenizer = load_tokenizer()
    prompts = _pairs(tokenizer)[0]
    calls = []

    def lengths(im, batch):
        calls.append(int(batch.indices[0]))
        if len(calls) == 3 and not (tmp_path / "crashed").exists():
            (tmp_path / "crashed").touch()
            raise RuntimeError("crash")
        return {"tokens": batch.encoding["attention_mask"].sum(-1).double() / 7}

    def run(source=prompts, analysis=lengths, **kwargs):
        return data.reduce(model, source, tokenizer, analysis, progress=False, checkpoint=tmp_path / "ckpt",
                           **{"batch_size": BATCH, "reduce": "sum"} | kwargs)

    with pytest.raises(RuntimeError, match="crash"):
        run()
    calls.clear()
    resumed = run()
    assert calls == [4, 6, 8]                       # batches 0 and 1 were written before the crash
    alone = data.reduce(model, prompts, tokenizer, lengths, reduce="sum", batch_size=BATCH, progress=False)
    assert torch.equal(resumed["tokens"], alone["tokens"])
    (tmp_path / "ckpt" / "batch-00000004.safetensors").unlink()
    for kwargs, message in [(dict(reduce="mean"), "written by a sweep with"),
                            (dict(batch_size=3), "written by a sweep with"),
                            (dict(padding_side="left"), "written by a sweep with"),
                            (dict(source=list(reversed(prompts))), "other texts than batch 0"),
                            (dict(analysis=lambda im, b: {"x": torch.zeros(len(b))}), "checkpoint's other batches")]:
        with pytest.raises(InvalidArgumentError, match=message):
            run(**kwargs)
    with pytest.raises(InvalidArgumentError, match="distributed=True needs"):
        data.reduce(model, prompts, tokenizer, lengths, distributed=True, progress=False)


def test_sweep_analyses_check_their_arguments():
    tokenizer = load_tokenizer()
    (batch,) = data.batches(["the capital of x is", "when a and b went to"], tokenizer, batch_size=2, progress=False)
    for make, message in [(lambda: sweeps.head_dla([1.5, 2.0]), "one integer token id per example"),
                          (lambda: sweeps.head_relevance([[1, 2]]), "one integer token id per example"),
                          (lambda: sweeps.head_patching("a b", tokenizer, [1]), "a list of texts"),
                          (lambda: sweeps.combined(), "one or more analyses")]:
        with pytest.raises(InvalidArgumentError, match=message):
            make()
    with pytest.raises(InvalidArgumentError, match="holds 1 ids, one per example"):
        sweeps.head_dla([1])(None, batch)
    with pytest.raises(ShapeMismatchError, match="example 1 has 7 tokens clean and 4 corrupt"):
        sweeps.head_patching(["the capital of y is", "when a and"], tokenizer, [1, 2])(None, batch)
    twice = sweeps.combined(lambda im, b: {"x": torch.zeros(len(b))}, lambda im, b: {"x": torch.ones(len(b))})
    with pytest.raises(InvalidArgumentError, match=r"return \['x'\]"):
        twice(None, batch)


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
