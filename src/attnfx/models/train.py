"""Train the default model: `python -m attnfx.models.train --out DIR`.

Deterministic given --seed and --threads: the world, the corpus, the initial weights, the batch
order and the CPU kernels (torch.use_deterministic_algorithms) all follow from them. Writes
config.json, model.safetensors, tokenizer.json, prompts.json (the world and the held-out
prompts), metrics.json and MODEL_CARD.md into DIR.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

from . import data
from .card import write_card
from .tokenizer import build_tokenizer, wrap_tokenizer


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    steps: int = 8000       # copying (induction) emerges after ~2000 steps, in-context answers later
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    final_lr_fraction: float = 0.05     # cosine decay ends at lr × this
    weight_decay: float = 0.0           # memorising facts is the point; no decay
    grad_clip: float = 1.0
    threads: int = 1        # the shipped weights are bit-reproducible with this thread count
    n_embd: int = 128       # d 256 costs ~0.4 s/step on 2 cores against ~0.07 s: too slow for 15 min
    n_layer: int = 4
    n_head: int = 8
    n_positions: int = 128
    world: data.WorldConfig = field(default_factory=data.WorldConfig)

    @property
    def documents(self) -> int:
        return self.steps * self.batch_size


def model_config(cfg: TrainConfig, tokenizer) -> transformers.GPT2Config:
    return transformers.GPT2Config(
        vocab_size=tokenizer.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa")


def _batches(rows: list[list[int]], cfg: TrainConfig, pad: int):
    """Length-bucketed batches (little padding) in a seeded random order.
    Yields (input_ids, attention_mask, labels), right-padded."""
    rng = random.Random(f"batches-{cfg.seed}")
    bucket = cfg.batch_size * 32
    order = []
    for start in range(0, len(rows), bucket):
        chunk = sorted(range(start, min(start + bucket, len(rows))), key=lambda i: len(rows[i]))
        order += [chunk[i:i + cfg.batch_size] for i in range(0, len(chunk), cfg.batch_size)]
    rng.shuffle(order)
    for idx in order[:cfg.steps]:
        width = max(len(rows[i]) for i in idx)
        ids = torch.full((len(idx), width), pad)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(rows[i])] = torch.tensor(rows[i])
            mask[r, :len(rows[i])] = 1
        yield ids, mask, ids.masked_fill(mask == 0, -100)


def _lr(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    floor = cfg.final_lr_fraction
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def train(cfg: TrainConfig, progress: bool = True):
    """Returns (model, tokenizer, world, corpus_hash, seconds)."""
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    world = data.make_world(cfg.seed, cfg.world)
    tokenizer = wrap_tokenizer(build_tokenizer(world))
    corpus = data.training_corpus(world, cfg.documents, cfg.seed)
    digest = data.corpus_hash(corpus)
    rows = [enc.ids + [tokenizer.eos_token_id] for enc in tokenizer.backend_tokenizer.encode_batch(corpus)]
    model = transformers.GPT2LMHeadModel(model_config(cfg, tokenizer))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    model.train()
    start = time.perf_counter()
    bar = tqdm(_batches(rows, cfg, tokenizer.pad_token_id), total=cfg.steps, disable=not progress,
               desc="train", unit="step")
    for step, (ids, mask, labels) in enumerate(bar):
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - start
    model.eval()
    return model, tokenizer, world, digest, seconds


def save(out: Path, cfg: TrainConfig, model, tokenizer, world, digest: str, seconds: float,
         metrics: dict | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)      # tokenizer.json + tokenizer_config.json (AutoTokenizer loads it)
    prompts = data.heldout_prompts(world)
    (out / "prompts.json").write_text(json.dumps({"world": world.to_json(), **prompts}, indent=1) + "\n")
    summary = {"train_config": asdict(cfg), "corpus_hash": digest, "corpus_documents": cfg.documents,
               "train_seconds": round(seconds, 1), "torch": torch.__version__,
               "transformers": transformers.__version__,
               "parameters": sum(p.numel() for p in model.parameters()), "metrics": metrics}
    (out / "metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_card(out / "MODEL_CARD.md", summary)


def headline(metrics: dict) -> dict:
    """The acceptance numbers: held-out accuracies and the value-scaling rates."""
    out = {"fact_recall": metrics["fact_recall"], "ioi": metrics["ioi_accuracy"],
           "copy": metrics["copy_accuracy"], "counterfactual": metrics["counterfactual"]}
    for key in (k for k in metrics if k.startswith("value_scaling_")):
        result = metrics[key]
        out[key] = {"top_in_context_head": result["top_in_context_head"],
                    "top_memorised_head": result["top_memorised_head"],
                    **{name: {f"{p['factor']:g}": p["in_context"] for p in sweep["points"]}
                       for name, sweep in result["sweeps"].items()}}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--threads", type=int, default=TrainConfig.threads)
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    parser.add_argument("--inductor", action="store_true",
                        help="also run the value-scaling experiment compiled by Inductor")
    args = parser.parse_args(argv)
    cfg = TrainConfig(seed=args.seed, steps=args.steps, threads=args.threads)
    model, tokenizer, world, digest, seconds = train(cfg)
    metrics = None
    if not args.no_eval:
        from .evaluate import evaluate
        backends = ("eager", "inductor") if args.inductor else ("eager",)
        metrics = evaluate(model, tokenizer, data.heldout_prompts(world), backends=backends)
    save(args.out, cfg, model, tokenizer, world, digest, seconds, metrics)
    print(json.dumps({"corpus_hash": digest, "train_seconds": round(seconds, 1),
                      **(headline(metrics) if metrics else {})}, indent=1))


if __name__ == "__main__":
    main()
