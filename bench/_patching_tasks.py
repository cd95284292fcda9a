"""Clean / corrupt prompt pairs of the correlation study (bench/patching.py) on the embedded
default model, built from its held-out prompts (`attnfx.models.load_prompts()`).

* ioi      "<bos> when A and B went to the P , B gave a O to" → A (the indirect object).
           Corrupt: the second subject S2 = B replaced by A ("…, A gave a O to"), so the right
           answer flips to B (the pairing of Nanda's attribution-patching demo).
* ioi_abc  the same clean prompts; corrupt: the three name slots filled with three distinct
           names other than A and B ("when C and D went to the P , E gave a O to"): Wang et al.'s
           p_ABC distribution (no name repeats, so there is no indirect object), also ACDC's IOI
           corruption. The clean answer and subject are absent from the corrupt prompt.
* factual  "<bos> the capital of X is" → capital(X); corrupt: "the capital of X' is" with X' ≠ X
           another country (seeded draw).

Metric of all three: logit[correct] − logit[incorrect] at the last position, with correct /
incorrect = A / B (IOI) and capital(X) / capital(X') (factual), the same on clean and corrupt runs.
Every pair must tokenise to equal lengths, and a batch has one length: other pairs are dropped.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import torch

S2 = 9                   # word index of the second subject in "when A and B went to the P , B gave a O to"
NAME_SLOTS = (1, 3, S2)  # the two names of the first clause and S2


@dataclass
class Task:
    name: str
    clean_template: str
    corrupt_template: str
    clean: dict                    # input_ids [n, t]
    corrupt: dict                  # input_ids [n, t], same shape
    correct: torch.Tensor          # [n] token ids
    incorrect: torch.Tensor        # [n]
    dropped: int                   # pairs dropped for a token-length mismatch
    examples: tuple[str, str]      # one decoded (clean, corrupt) pair

    def __len__(self) -> int:
        return self.clean["input_ids"].shape[0]


def _batch(name, templates, tok, pairs) -> Task:
    """pairs: (clean text, corrupt text, correct word, incorrect word); keeps the pairs of equal
    token lengths that share the most common length."""
    encode = lambda text: tok(text)["input_ids"]                                 # noqa: E731
    rows = [(encode(c), encode(x), a, b) for c, x, a, b in pairs]
    equal = [r for r in rows if len(r[0]) == len(r[1])]
    if not equal:
        raise ValueError(f"task {name}: no clean/corrupt pair tokenises to equal lengths")
    length = Counter(len(r[0]) for r in equal).most_common(1)[0][0]
    kept = [r for r in equal if len(r[0]) == length]
    vocab = tok.get_vocab()
    ids = lambda i: torch.tensor([r[i] for r in kept])                           # noqa: E731
    return Task(name, *templates, {"input_ids": ids(0)}, {"input_ids": ids(1)},
                torch.tensor([vocab[r[2]] for r in kept]), torch.tensor([vocab[r[3]] for r in kept]),
                dropped=len(rows) - len(kept), examples=(tok.decode(kept[0][0]), tok.decode(kept[0][1])))


def _ioi_words(item) -> list[str]:
    words = item["prompt"].split()
    if len(words) != 14 or words[S2] != item["subject"] or words[S2 + 1] != "gave":
        raise ValueError(f"unexpected IOI prompt layout: {item['prompt']!r}")
    return words


def ioi_tasks(tok, prompts: dict, n: int, seed: int = 0) -> list[Task]:
    """The S2-swap and the ABC corruption of the first n held-out IOI prompts."""
    items = prompts["ioi"][:n]
    names = prompts["world"]["names"]
    rng = random.Random(f"ioi-abc-{seed}")
    swap, abc = [], []
    for item in items:
        words, io, s = _ioi_words(item), item["answer"], item["subject"]
        flipped = list(words)
        flipped[S2] = io
        swap.append((item["prompt"], " ".join(flipped), io, s))
        renamed = list(words)
        for slot, name in zip(NAME_SLOTS, rng.sample([m for m in names if m not in (io, s)], 3)):
            renamed[slot] = name
        abc.append((item["prompt"], " ".join(renamed), io, s))
    clean = "when A and B went to the P , B gave a O to"
    return [_batch("ioi", (clean, "when A and B went to the P , A gave a O to"), tok, swap),
            _batch("ioi_abc", (clean, "when C and D went to the P , E gave a O to"), tok, abc)]


def factual_task(tok, prompts: dict, n: int, seed: int = 0) -> Task:
    """Capital recall of the first n countries, each against another country drawn at random."""
    facts = [f for f in prompts["facts"] if f["relation"] == "capital"]
    rng = random.Random(f"factual-{seed}")
    pairs = []
    for i, fact in enumerate(facts[:n]):
        other = facts[(i + rng.randrange(1, len(facts))) % len(facts)]
        pairs.append((fact["prompt"], other["prompt"], fact["answer"], other["answer"]))
    return _batch("factual", ("the capital of X is", "the capital of X' is"), tok, pairs)


def subset(task: Task, n: int) -> Task:
    """The first n pairs of a task."""
    head = lambda batch: {k: v[:n] for k, v in batch.items()}                  # noqa: E731
    return Task(task.name, task.clean_template, task.corrupt_template, head(task.clean), head(task.corrupt),
                task.correct[:n], task.incorrect[:n], task.dropped, task.examples)
