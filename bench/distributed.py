"""Data-parallel sweeps (issue 17): throughput of a per-head DLA sweep (sweeps.head_dla toward each
prompt's answer, data.reduce "mean", batches of 8) over the default model's prompts (facts, IOI,
counterfactual: 1120) on 1 and on N processes, each a rank of a torch.distributed group started
here with torch.multiprocessing.spawn (what torchrun would start): gloo and one thread per process
on the CPU (N = 2), NCCL and one GPU per process on CUDA (N = the GPUs). Efficiency = t1 / (N · tN).
The N-process result is checked bit for bit against the 1-process one.

    python bench/distributed.py [--quick] [--procs N]

Time, in one process group: rank 0 sweeping alone (distributed=False, the others idle at a
barrier), all N ranks sharing the sweep, and rank 0 sweeping only its share alone (what tN would
be without contention for the cores or collectives), interleaved REPEATS times after one warm
round of each (compiling every shape), medians on rank 0: background load on a shared CPU hits
all alike. Not _harness.bench: on CUDA do_bench picks its own number of calls per rank, and
collectives need the same number on every rank.
Results: bench/results/<device>/distributed.{json,png}.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _harness as H
from attnfx import data

BATCH = 8
REPEATS, QUICK_REPEATS = 5, 2
QUICK_PROMPTS = 160
INSTRUMENT_BACKEND = "eager"        # Inductor's compile of every shape on every rank would dominate a CPU run
PG_TIMEOUT = datetime.timedelta(minutes=5)


def prompts_and_answers(tokenizer, quick: bool):
    from attnfx.models.loader import load_prompts

    shipped = load_prompts()
    rows = ([(r["prompt"], r["answer"]) for r in shipped["facts"] + shipped["ioi"]]
            + [(r["prompt"], r["in_context"]) for r in shipped["counterfactual"]])
    rows = rows[::len(rows) // QUICK_PROMPTS][:QUICK_PROMPTS] if quick else rows
    texts, answers = zip(*rows)
    return list(texts), tokenizer.convert_tokens_to_ids(list(answers))


def _worker(rank: int, world: int, port: int, args, out: str) -> None:
    import attnfx
    from attnfx import sweeps
    from attnfx.models.loader import load_default

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=PG_TIMEOUT)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model, tokenizer = load_default(device)
    im = attnfx.instrument(model, backend=INSTRUMENT_BACKEND)
    texts, answers = prompts_and_answers(tokenizer, args.quick)
    starts = range(0, len(texts), BATCH)[0::world]          # rank 0's batches, as data.reduce shares them
    share = [i for first in starts for i in range(first, min(first + BATCH, len(texts)))]
    sweep = lambda rows, distributed: data.reduce(  # noqa: E731
        im, [texts[i] for i in rows], tokenizer, sweeps.head_dla([answers[i] for i in rows]), batch_size=BATCH,
        distributed=distributed, progress=False)
    modes = {"alone": lambda: sweep(range(len(texts)), False),      # rank 0 only: the 1-process sweep
             "shared": lambda: sweep(range(len(texts)), None),      # every rank
             "share": lambda: sweep(share, False)}                  # rank 0 only: its share, nobody beside it

    def timed(mode: str) -> float:
        dist.barrier()                      # the others wait here, idle, while rank 0 sweeps alone
        start = time.perf_counter()
        if rank == 0 or mode == "shared":
            results[mode] = modes[mode]()
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        dist.barrier()
        return seconds

    results, times = {}, {mode: [] for mode in modes}
    for mode in modes:                      # compile every shape: all on rank 0, its share on the others
        timed(mode)
    for _ in range(QUICK_REPEATS if args.quick else REPEATS):
        for mode in modes:                  # interleaved: background load hits every mode alike
            times[mode].append(timed(mode))
    if rank == 0:
        exact = all(torch.equal(results["alone"][k], results["shared"][k]) for k in results["alone"])
        data.save(out, results["shared"], metadata={"exact": exact, "prompts": len(texts), **{
            mode: statistics.median(seconds) for mode, seconds in times.items()}})
    dist.destroy_process_group()


def run(world: int, args) -> dict:
    """Rank 0's medians: the sweep alone in one process, and shared by `world` processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "result.safetensors")
        mp.spawn(_worker, args=(world, port, args, out), nprocs=world)
        return data.load(out)[2]


def main() -> None:
    parser = H.cli(__doc__.splitlines()[0])
    parser.add_argument("--procs", type=int, default=None, help="N (default: the GPUs on CUDA, else 2)")
    args = H.parse_args(parser)
    procs = args.procs or (torch.cuda.device_count() if torch.cuda.is_available() else 2)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)       # read by each spawned rank's torch at import
    os.environ["TOKENIZERS_PARALLELISM"] = "false"          # no Rust thread pool beside each rank's one thread
    found = run(procs, args)
    t1, tn, n = found["alone"], found["shared"], found["prompts"]
    payload = {"prompts": n, "batch_size": BATCH, "procs": procs, "instrument_backend": INSTRUMENT_BACKEND,
               "process_group_backend": "nccl" if torch.cuda.is_available() else "gloo",
               "seconds": {"1": t1, str(procs): tn, "rank0_share_alone": found["share"]},
               "prompts_per_s": {"1": n / t1, str(procs): n / tn}, "efficiency": t1 / (procs * tn),
               # rank 0's share with nobody beside it: what tN would be without contention or collectives
               "efficiency_without_contention": t1 / (procs * found["share"]), "exact": found["exact"]}
    path = H.write_json("distributed", payload, args.out)
    share = f"rank 0's 1/{procs}, alone"
    labels = {"1 process": t1 * 1e3, f"{procs} processes": tn * 1e3, share: found["share"] * 1e3}
    notes = {"1 process": f"{n / t1:.0f} prompts/s", f"{procs} processes": f"{n / tn:.0f} prompts/s, "
             f"eff. {payload['efficiency']:.2f}", share: f"eff. {payload['efficiency_without_contention']:.2f}"}
    group = f"DLA sweep, {n} prompts"
    H.bar_plot(path.with_suffix(".png"), f"data.reduce under torch.distributed ({H.device_name()})",
               {group: labels}, {group: notes})
    print(json.dumps({k: payload[k] for k in ("seconds", "prompts_per_s", "efficiency",
                                              "efficiency_without_contention", "exact")}, indent=1))
    print(path)


if __name__ == "__main__":
    main()
