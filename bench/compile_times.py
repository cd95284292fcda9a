"""What compiling costs a user: wall time of instrument(), the first call, a call at a second
sequence length and batch size, and a second process's first call (torch's on-disk caches
warm), for attnfx and, side by side, the bare model under torch.compile with the same backend.

Each measurement runs in a fresh Python process, so nothing is shared but the Inductor cache
directory (a new empty one per model and backend: the first process is cold). Models: GPT-2
small and a Llama-3.2-1B-sized random model (GQA), fp32, on the CPU; 1 thread unless --threads.
Run: python bench/compile_times.py [--quick] [--backends eager inductor]."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from _harness import cli, parse_args, write_json

MODELS = {
    "gpt2-small": ("gpt2", dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)),
    "llama-1b": ("llama", dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                 num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                                 tie_word_embeddings=True)),
}
QUICK_MODELS = {
    "gpt2-tiny": ("gpt2", dict(n_layer=2, n_head=4, n_embd=64, vocab_size=100, n_positions=128)),
    "llama-tiny": ("llama", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128, vocab_size=100)),
}
FIRST, SECOND = (2, 64), (3, 96)      # (batch, seq) of the first call and of the second shape


def _build(family: str, config: dict):
    import transformers
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    return model.eval()


def _timed(fn) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - start


def child(spec: dict) -> dict:
    """One process: build the model, then time the calls a user makes first, in seconds."""
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = _build(spec["family"], spec["config"])
    vocab = model.config.vocab_size
    first, second = (torch.randint(1, vocab, shape) for shape in (FIRST, SECOND))
    out = {}
    if spec["who"] == "attnfx":
        import attnfx
        start = time.perf_counter()
        im = attnfx.instrument(model, backend=spec["backend"])
        out["instrument_s"] = time.perf_counter() - start
        im.steering.scale(0, 0, 2.0)
        fn = im
    else:
        fn = torch.compile(model, backend=spec["backend"])
    out["first_call_s"] = _timed(lambda: fn(input_ids=first))
    out["again_s"] = _timed(lambda: fn(input_ids=first))
    if spec["second_shape"]:
        out["second_shape_s"] = _timed(lambda: fn(input_ids=second))
    from torch._dynamo.utils import counters
    out["graphs_compiled"] = counters["stats"]["unique_graphs"]
    out["fx_graph_cache_hits"] = counters["inductor"]["fxgraph_cache_hit"]
    out["aot_autograd_cache_hits"] = counters["aot_autograd"]["autograd_cache_hit"]
    return out


def _run_child(spec: dict, cache_dir: str) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {spec['who']}/{spec['backend']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(models: dict, backends: list[str], threads: int, whom: list[str]) -> dict:
    results = {}
    for name, (family, config) in models.items():
        for backend in backends:
            for who in whom:
                spec = dict(family=family, config=config, backend=backend, who=who, threads=threads)
                with tempfile.TemporaryDirectory(prefix="attnfx-inductor-cache-") as cache_dir:
                    cold = _run_child({**spec, "second_shape": True}, cache_dir)
                    warm = _run_child({**spec, "second_shape": False}, cache_dir)
                results[f"{name}/{backend}/{who}"] = {"first_process": cold, "second_process": warm}
                print(name, backend, who, {"cold": cold, "warm": warm}, flush=True)
    return results


def _plot(path, results: dict, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [("instrument", lambda r: r["first_process"].get("instrument_s", 0.0)),
               ("first call", lambda r: r["first_process"]["first_call_s"]),
               ("second shape", lambda r: r["first_process"]["second_shape_s"]),
               ("2nd process, first call", lambda r: r["second_process"]["first_call_s"])]
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(results)), 4.5))
    width = 0.8 / len(columns)
    names = list(results)
    for i, (label, get) in enumerate(columns):
        values = [get(results[n]) for n in names]
        bars = ax.bar([x + i * width for x in range(len(names))], values, width, label=label)
        ax.bar_label(bars, [f"{v:.3g}" for v in values], fontsize=7, padding=2)
    ax.set_xticks([x + width * (len(columns) - 1) / 2 for x in range(len(names))], [n.replace("/", "\n") for n in names], fontsize=8)
    ax.set_ylabel("seconds")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
        return
    parser = cli(__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["eager", "inductor"], choices=("eager", "aot_eager", "inductor"))
    parser.add_argument("--models", nargs="+", default=None, help="subset of the model names")
    parser.add_argument("--who", nargs="+", default=["bare", "attnfx"], choices=("bare", "attnfx"))
    args = parse_args(parser)
    models = QUICK_MODELS if args.quick else MODELS
    if args.models:
        models = {name: models[name] for name in args.models}
    results = measure(models, args.backends, args.threads, args.who)
    path = write_json("compile_times", {"shapes": {"first": FIRST, "second": SECOND},
                                        "models": {n: dict(family=f, **c) for n, (f, c) in models.items()},
                                        "results": results}, args.out)
    _plot(path.with_suffix(".png"), results, f"{path.parent.name} · compile and first-call times · "
                                             f"{args.threads} thread(s)")
    print(path)


if __name__ == "__main__":
    main()
