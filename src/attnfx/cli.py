"""The `attnfx` command.

    attnfx demo [--model DIR] [--prompts FILE] [--out DIR] [--backend B] [--device D] [--limit N]

`demo` is the main job: on the embedded default model (or a local HF causal LM folder), measure
the in-context answer rate of counterfactual prompts, rank heads by direct logit attribution of
(in-context − memorised), and sweep the value scale of the top two heads at runtime — Yu et al.
(2023). Writes report.json, two PNG plots and report.html.
"""
from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from .demo import run_demo

    report = run_demo(model_dir=args.model, prompt_file=args.prompts, out=args.out, backend=args.backend,
                      device=args.device, limit=args.limit, seed=args.seed, batch_size=args.batch_size)
    failed = [name for name, ok in report["checks"].items() if name != "paper" and not ok]
    for name in failed:
        print(f"attnfx demo: FAILED: {name.replace('_', ' ')}", file=sys.stderr)
    return 1 if failed else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnfx", description="Record, attribute and steer attention heads inside torch.compile graphs.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo", help="single-head value scaling of factual recall (Yu et al. 2023) on the default model",
        description="Rank heads by direct logit attribution of (in-context − memorised) answers on "
                    "counterfactual prompts, then scale the top heads' value vectors at runtime (one "
                    "compiled graph) and report the in-context answer rate per scale. Writes "
                    "report.json, dla_heatmap.png, value_sweep.png and report.html.")
    demo.add_argument("--model", metavar="DIR", default=None,
                      help="local HF causal LM folder (default: attnfx's embedded model); nothing is downloaded")
    demo.add_argument("--prompts", metavar="FILE", default=None,
                      help="JSON list of {prompt, in_context, memorised} (default: DIR/prompts.json)")
    demo.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    demo.add_argument("--backend", choices=("eager", "aot_eager", "inductor"), default=None,
                      help="attnfx backend (default: inductor on CUDA, eager on CPU)")
    demo.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    demo.add_argument("--limit", type=int, default=None, help="use a seeded random subset of N prompts")
    demo.add_argument("--seed", type=int, default=0, help="seed of the prompt subset (default: 0)")
    demo.add_argument("--batch-size", type=int, default=256, help="prompts per forward (default: 256)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import AttnfxError

    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (AttnfxError, FileNotFoundError) as error:
        print(f"attnfx {args.command}: {type(error).__name__}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
