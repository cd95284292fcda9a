"""Attention sinks of the default model (issue 16): recipes.sinks.sink_mass over all its held-out
prompts (facts, counterfactual, IOI, copy), as a [L, H] heatmap + JSON, and what it costs against
reading the same numbers off explicit patterns (rec["pattern"] of every layer, then
recipes.sinks.from_patterns). Two workloads: "heldout" (the 1320 prompts, ~5-25 tokens) and
"long" (copy prompts chained to the model's 128 positions), where the t × s pattern starts to weigh.

Time: the harness timer (median). Peak: CPU — VmHWM − VmRSS around one call (reset through
/proc/self/clear_refs), glibc's mmap threshold pinned at 64 KiB from the start (bench/records.py's
method) so freed blocks go back to the OS; CUDA — max_memory_allocated above the start.

    python bench/sinks.py [--quick] [--first 1]
"""
from __future__ import annotations

import os
import sys

import torch

import attnfx
from _harness import bench, cli, parse_args, peak_mib, write_json
from attnfx import data, recipes
from attnfx.models.loader import load_default, load_prompts
from attnfx.viz import head_heatmap

BATCH = 32                       # prompts per instrumented call
LONG_EXAMPLES, LONG_TOKENS = 64, 128       # the default model's n_positions
REPEATS = 5                      # each provider runs the whole dataset: seconds per round
PINNED_MMAP_THRESHOLD = "65536"


def heldout_texts(prompts: dict) -> dict[str, list[str]]:
    return {"facts": [p["prompt"] for p in prompts["facts"]],
            "counterfactual": [p["prompt"] for p in prompts["counterfactual"]],
            "ioi": [p["prompt"] for p in prompts["ioi"]],
            "copy": [p["first"] + " | " + p["first"] for p in prompts["copy"]]}


def long_texts(copies: list[str]) -> list[str]:
    """Copy prompts chained until LONG_TOKENS − 1 words (+ <bos>): every row fills the model."""
    words = " ".join(copies).split()
    width = LONG_TOKENS - 1
    return [" ".join(words[i * 7 % len(words):][:width]) for i in range(LONG_EXAMPLES)]


def uniform_mass(texts, tok, first) -> float:
    """What a head attending uniformly over its visible keys would put on the first tokens: the
    length effect (query i sees i + 1 keys), to read the heatmap against."""
    per_example = []
    for text in texts:
        n = len(tok(text)["input_ids"])
        seen = torch.arange(1, n + 1, dtype=torch.float64)
        per_example.append(float((seen.clamp(max=first) / seen).mean()))
    return sum(per_example) / len(per_example)


def from_patterns(im, texts, tok, first):
    total, count = 0, 0
    for batch in data.batches(texts, tok, batch_size=BATCH, padding_side="right", progress=False):
        with torch.no_grad(), im.record("pattern") as rec:
            im(**batch.encoding)
        part = recipes.sinks.from_patterns(rec["pattern"], batch.encoding["attention_mask"], first)
        total, count = total + part.double().sum(0), count + len(batch)
    return (total / count).float()


def main() -> None:
    if not torch.cuda.is_available() and os.environ.get("MALLOC_MMAP_THRESHOLD_") != PINNED_MMAP_THRESHOLD:
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": PINNED_MMAP_THRESHOLD}     # from the start: see above
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    parser = cli(__doc__.splitlines()[0])
    parser.add_argument("--first", type=int, default=1, help="leading tokens counted as the sink")
    args = parse_args(parser)
    model, tok = load_default()
    im = attnfx.instrument(model)
    kinds = heldout_texts(load_prompts())
    if args.quick:
        kinds = {kind: texts[:16] for kind, texts in kinds.items()}
    heldout = [t for texts in kinds.values() for t in texts]
    workloads = {"heldout": heldout, "long": long_texts(kinds["copy"])[:8 if args.quick else None]}
    stats = lambda texts: recipes.sinks.sink_mass(im, texts, tok, first=args.first, batch_size=BATCH,     # noqa: E731
                                                  progress=False)
    result = {"first": args.first, "batch_size": BATCH, "workloads": {}}
    for name, texts in workloads.items():
        fns = {"attention_stats": lambda: stats(texts), "pattern": lambda: from_patterns(im, texts, tok, args.first)}
        sinks, reference = fns["attention_stats"](), fns["pattern"]()      # also warms up compilation
        times = bench(fns, repeats=1 if args.quick else REPEATS)
        peaks = {provider: peak_mib(fn) for provider, fn in fns.items()}
        result["workloads"][name] = {"examples": len(texts), "time_ms": times, "peak_mib": peaks,
                                     "max_abs_diff_vs_pattern": float((sinks - reference).abs().max()),
                                     "sink_mass": sinks.tolist()}
    result["per_kind"] = {kind: stats(texts).tolist() for kind, texts in kinds.items()}
    result["uniform_mass"] = {kind: uniform_mass(texts, tok, args.first)
                              for kind, texts in {**kinds, "heldout": heldout}.items()}
    path = write_json("sinks" + ("_quick" if args.quick else ""), result, args.out)
    sinks = torch.tensor(result["workloads"]["heldout"]["sink_mass"])
    top = divmod(int(sinks.argmax()), sinks.shape[1])
    head_heatmap(sinks, path.with_suffix(".png"), label=f"mass on the first {args.first} token(s)", mark=top,
                 title=f"default model: mass on the first {args.first} token(s), "
                       f"mean over {len(heldout)} held-out prompts")
    print(path)
    for name, found in result["workloads"].items():
        print(name, found["examples"], found["time_ms"], found["peak_mib"], found["max_abs_diff_vs_pattern"])


if __name__ == "__main__":
    main()
