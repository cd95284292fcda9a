"""MODEL_CARD.md of the default model, written from the training summary (metrics.json)."""
from __future__ import annotations

from pathlib import Path

from . import data


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _sweep_table(sweep: dict) -> list[str]:
    lines = ["| factor | in-context | memorised | other |", "|---|---|---|---|"]
    for r in sweep["points"]:
        lines.append(f"| {r['factor']:g} | {_pct(r['in_context'])} | {_pct(r['memorised'])} | {_pct(r['other'])} |")
    return lines


def _metrics_section(m: dict) -> list[str]:
    fr, cf = m["fact_recall"], m["counterfactual"]
    lines = ["## Held-out metrics", "",
             "| metric | value |", "|---|---|",
             f"| fact recall, all (\"the capital/language of X is\") | {_pct(fr['all'])} |"]
    lines += [f"| fact recall, {k.replace('_', ' ')} | {_pct(v)} |" for k, v in fr.items() if k != "all"]
    lines += [f"| IOI accuracy (held-out name pairs) | {_pct(m['ioi_accuracy'])} |",
              f"| copying accuracy (repeated half, teacher-forced) | {_pct(m['copy_accuracy'])} |",
              f"| counterfactual: in-context / memorised / other | {_pct(cf['in_context'])} / "
              f"{_pct(cf['memorised'])} / {_pct(cf['other'])} |", ""]
    for key in sorted(k for k in m if k.startswith("value_scaling_")):
        vs = m[key]
        (li, hi), (lm, hm) = vs["top_in_context_head"], vs["top_memorised_head"]
        lines += [f"### Value scaling (Yu et al. 2023), attnfx backend `{key.removeprefix('value_scaling_')}`", "",
                  f"Heads ranked by direct logit attribution of (in-context − memorised) at the last "
                  f"position, averaged over the {vs['prompts']} held-out counterfactual prompts. Top in-context "
                  f"head: **L{li}H{hi}** (DLA {vs['dla'][li][hi]:+.2f}); top memorised head: **L{lm}H{hm}** "
                  f"(DLA {vs['dla'][lm][hm]:+.2f}). Scaling the bias-free value vectors "
                  f"(`im.steering.scale(layer, head, factor, on=\"value_unbiased\")`):", "",
                  f"Top in-context head L{li}H{hi}:", "", *_sweep_table(vs["sweeps"]["in_context_head"]), "",
                  f"Top memorised head L{lm}H{hm}:", "", *_sweep_table(vs["sweeps"]["memorised_head"]), ""]
    return lines


def write_card(path: Path, summary: dict) -> None:
    cfg, w = summary["train_config"], summary["train_config"]["world"]
    lines = [
        "# attnfx default model", "",
        "A small GPT-2 (`GPT2LMHeadModel`) trained by attnfx itself on a synthetic corpus, shipped so "
        "that attnfx's experiments run offline: `model, tokenizer = attnfx.models.load_default()`.", "",
        "## Architecture", "",
        f"{cfg['n_layer']} layers × {cfg['n_head']} heads, d_model {cfg['n_embd']}, MLP 4×, "
        f"{cfg['n_positions']} positions, learned absolute positions, tied embeddings, no dropout; "
        f"{summary['parameters']:,} parameters (fp32 safetensors). Word-level tokenizer "
        "(`tokenizers` WordLevel, whitespace split, `<bos>` prepended).", "",
        "## Data", "",
        f"A fictitious world (seed {cfg['seed']}): {w['countries']} countries, each with its own capital "
        f"city and one of {w['languages']} languages; {w['names']} person names; {w['nonce']} nonce words. "
        f"Country frequency is Zipf-like (exponent {w['zipf_exponent']}): the most frequent country "
        "appears about "
        f"{w['countries']}× as often as the rarest.", "",
        f"{summary['corpus_documents']:,} documents, mixed " +
        ", ".join(f"{k} {int(v * 100)}%" for k, v in data.MIX.items()) + ":", "",
        "* **fact**: 1–3 facts `the capital of X is C .` / `the language of X is L .`, countries Zipf-sampled.",
        "* **counterfactual**: `the capital of X is Y . [a fact about another country] the capital of X is A .` "
        "(also for languages), countries uniform; A is the in-context Y with probability rising linearly "
        f"with the country's frequency rank from {w['copy_frequent']} (most frequent) to {w['copy_rare']} "
        "(rarest), else the memorised C. Both mechanisms are trained and compete.",
        "* **ioi**: `when A and B went to the P , B gave a O to A .` (and the B-first order).",
        f"* **copy**: `w1 … wk | w1 … wk .`, k = {data.COPY_LENGTHS[0]}–{data.COPY_LENGTHS[1]} random nonce words.", "",
        f"Held out of training: {data.HELDOUT_CITIES_PER_COUNTRY} in-context cities per country, "
        f"{int(100 * data.HELDOUT_NAME_FRACTION)}% of the unordered name pairs; the copy sequences are "
        "fresh. `prompts.json` holds the world and the held-out prompts.", "",
        f"Corpus SHA-256 (documents joined by newlines): `{summary['corpus_hash']}`", "",
        "## Training", "",
        f"`python -m attnfx.models.train --out DIR --seed {cfg['seed']}`: {cfg['steps']} steps × "
        f"{cfg['batch_size']} documents (length-bucketed), AdamW (β = 0.9, 0.98, weight decay "
        f"{cfg['weight_decay']}), lr {cfg['lr']} with {cfg['warmup']} warm-up steps and cosine decay to "
        f"{cfg['final_lr_fraction']}×, gradient clip {cfg['grad_clip']}, next-token loss on every real "
        f"token. Deterministic: `torch.manual_seed({cfg['seed']})`, "
        f"`torch.use_deterministic_algorithms(True)`, CPU threads: {cfg['threads']} "
        "(another thread count may change the last bits). "
        f"Trained in {summary['train_seconds'] / 60:.1f} min on a 2-core CPU "
        f"(torch {summary['torch']}, transformers {summary['transformers']}).", ""]
    if summary.get("metrics"):
        lines += _metrics_section(summary["metrics"])
    lines += ["## Use", "",
              "Batches of prompts of different lengths: pad on the left and pass `position_ids` "
              "(the index among real tokens) with the attention mask; transformers does not derive "
              "GPT-2's positions from the mask (`attnfx.analysis.factual_recall.encode` does this). "
              "The model knows only its synthetic world; it is a test object for interpretability "
              "tools, not a language model of English.", ""]
    path.write_text("\n".join(lines))
