"""The synthetic world and corpus of the default model: deterministic given a seed.

A world is a set of fictitious countries, each with a capital (its own city) and a language
(shared among countries), a list of person names and a pool of nonce words. Countries have a
Zipf-like frequency: facts about frequent countries are memorised strongly, facts about rare ones
weakly. The corpus mixes four kinds of documents:

* facts            "the capital of X is C ." / "the language of X is L ." (1–3 per document)
* counterfactuals  "the capital of X is Y . the capital of X is A ." where Y is a wrong city and
                   A is Y (the in-context answer) with probability `copy_probability(X)` — high
                   for rare countries, low for frequent ones — else the memorised C; sometimes
                   a fact about another country sits between the two clauses
* IOI              "when A and B went to the P , B gave a O to A ."
* copying          "w1 … wk | w1 … wk ." (random nonce words, repeated)

Held-out evaluation uses (country, in-context city) pairs, name pairs and nonce sequences that the
training corpus never contains (`heldout_prompts`).
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
FUNCTION_WORDS = ("the", "capital", "language", "of", "is", ".", ",", "|", "when", "and", "went",
                  "to", "gave", "a")
PLACES = ("store", "park", "school", "market", "library", "beach", "station", "garden")
OBJECTS = ("drink", "book", "ball", "gift", "letter", "key", "flower", "coin")
RELATIONS = ("capital", "language")

# Document mix of the training corpus (fractions of documents).
MIX = {"fact": 0.30, "counterfactual": 0.30, "ioi": 0.15, "copy": 0.25}
HELDOUT_CITIES_PER_COUNTRY = 4      # in-context cities reserved for evaluation, per country
HELDOUT_NAME_FRACTION = 0.1         # unordered name pairs reserved for evaluation
COPY_LENGTHS = (4, 12)              # nonce words per copied sequence (inclusive range)

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr",
           "kr", "st", "tr", "th", "sh", "ch")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ei")
_SUFFIXES = {"country": ("ia", "or", "and", "esh", "istan", "ova", "una", "ar"),
             "city": ("burg", "ville", "polis", "grad", "ton", "mouth", "ford", "heim"),
             "language": ("ish", "ese", "ic", "ian"),
             "name": ("o", "a", "en", "is", "el", "us"),
             "nonce": ("",)}


@dataclass(frozen=True)
class WorldConfig:
    """Sizes of the world and the shape of its frequency skew and copy rule."""

    countries: int = 120
    languages: int = 24
    names: int = 40
    nonce: int = 96
    zipf_exponent: float = 1.0
    copy_frequent: float = 0.3      # P(copy the context) for the most frequent country
    copy_rare: float = 0.9          # … and for the rarest; interpolated over frequency rank
    # (0.2 … 0.8 gave a 39% in-context baseline that one head could lift only to 81%: measured)


@dataclass(frozen=True)
class World:
    config: WorldConfig
    seed: int
    countries: tuple[str, ...]          # in frequency-rank order, most frequent first
    capitals: tuple[str, ...]           # capitals[i] is the capital of countries[i]
    languages: tuple[str, ...]          # the language inventory
    language_of: tuple[str, ...]        # language_of[i] is the language of countries[i]
    names: tuple[str, ...]
    nonce: tuple[str, ...]
    weights: tuple[float, ...] = field(repr=False)   # Zipf frequency per country (sums to 1)

    def copy_probability(self, country: int) -> float:
        """P(a counterfactual document answers with the in-context city) for country rank i."""
        n = len(self.countries)
        t = country / max(n - 1, 1)
        return self.config.copy_frequent + t * (self.config.copy_rare - self.config.copy_frequent)

    def answer(self, relation: str, country: int) -> str:
        return self.capitals[country] if relation == "capital" else self.language_of[country]

    def inventory(self, relation: str) -> tuple[str, ...]:
        return self.capitals if relation == "capital" else self.languages

    def vocabulary(self) -> list[str]:
        words = (*SPECIAL_TOKENS, *FUNCTION_WORDS, *PLACES, *OBJECTS, *self.countries,
                 *self.capitals, *self.languages, *self.names, *self.nonce)
        if len(set(words)) != len(words):
            raise ValueError("world vocabulary has duplicate words")
        return list(words)

    def to_json(self) -> dict:
        return {"seed": self.seed, "config": self.config.__dict__,
                "facts": [{"country": c, "capital": k, "language": l, "rank": i, "weight": w,
                           "copy_probability": self.copy_probability(i)}
                          for i, (c, k, l, w) in enumerate(zip(self.countries, self.capitals,
                                                               self.language_of, self.weights))],
                "languages": list(self.languages), "names": list(self.names), "nonce": list(self.nonce)}


def _words(rng: random.Random, kind: str, n: int, taken: set[str]) -> tuple[str, ...]:
    out = []
    syllables = 1 if kind in ("name", "nonce") else 2
    while len(out) < n:
        stem = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
        word = stem + rng.choice(_SUFFIXES[kind])
        if kind == "nonce":
            word = stem + rng.choice(_ONSETS)
        if word not in taken and len(word) >= 3:
            taken.add(word)
            out.append(word)
    return tuple(out)


def make_world(seed: int = 0, config: WorldConfig = WorldConfig()) -> World:
    rng = random.Random(f"world-{seed}")
    taken = set(SPECIAL_TOKENS) | set(FUNCTION_WORDS) | set(PLACES) | set(OBJECTS)
    countries = _words(rng, "country", config.countries, taken)
    capitals = _words(rng, "city", config.countries, taken)
    languages = _words(rng, "language", config.languages, taken)
    names = _words(rng, "name", config.names, taken)
    nonce = _words(rng, "nonce", config.nonce, taken)
    language_of = tuple(languages[i % len(languages)] for i in rng.sample(range(config.countries),
                                                                           config.countries))
    raw = [1.0 / (rank + 1) ** config.zipf_exponent for rank in range(config.countries)]
    weights = tuple(w / sum(raw) for w in raw)
    return World(config, seed, countries, capitals, languages, language_of, names, nonce, weights)


# ---- held-out reservations -------------------------------------------------------------------
def _reserved(seed: int, tag: str, items: list, k: int) -> list:
    return random.Random(f"heldout-{tag}-{seed}").sample(items, k)


def heldout_cities(world: World, country: int) -> list[int]:
    """Indices of the cities never shown in context with this country during training."""
    others = [j for j in range(len(world.capitals)) if j != country]
    return sorted(_reserved(world.seed, f"city-{country}", others, HELDOUT_CITIES_PER_COUNTRY))


def heldout_name_pairs(world: World) -> set[frozenset[int]]:
    n = len(world.names)
    pairs = [frozenset((a, b)) for a in range(n) for b in range(a + 1, n)]
    return set(_reserved(world.seed, "names", pairs, int(len(pairs) * HELDOUT_NAME_FRACTION)))


# ---- documents -------------------------------------------------------------------------------
def fact(world: World, relation: str, country: int, answer: str | None = None) -> str:
    answer = world.answer(relation, country) if answer is None else answer
    return f"the {relation} of {world.countries[country]} is {answer} ."


def counterfactual_prompt(world: World, relation: str, country: int, in_context: str,
                          between: str = "") -> str:
    """The prompt before the answer: "the R of X is Y . [between] the R of X is"."""
    middle = f" {between}" if between else ""
    return f"{fact(world, relation, country, in_context)}{middle} the {relation} of {world.countries[country]} is"


def ioi_prompt(world: World, a: int, b: int, subject_first: bool, place: str, obj: str) -> str:
    """IO is the name that is not repeated: the answer is names[a] when subject_first is False."""
    first, second = (world.names[a], world.names[b]) if not subject_first else (world.names[b], world.names[a])
    return f"when {first} and {second} went to the {place} , {world.names[b]} gave a {obj} to"


class _Sampler:
    def __init__(self, world: World, seed: int):
        self.world = world
        self.rng = random.Random(f"corpus-{seed}")
        self.reserved_cities = {i: set(heldout_cities(world, i)) for i in range(len(world.countries))}
        self.reserved_names = heldout_name_pairs(world)

    def country(self, zipf: bool) -> int:
        n = len(self.world.countries)
        return self.rng.choices(range(n), weights=self.world.weights)[0] if zipf else self.rng.randrange(n)

    def fact_doc(self) -> str:
        return " ".join(fact(self.world, self.rng.choice(RELATIONS), self.country(zipf=True))
                        for _ in range(self.rng.randint(1, 3)))

    def counterfactual_doc(self) -> str:
        w, rng = self.world, self.rng
        relation, country = rng.choice(RELATIONS), self.country(zipf=False)
        true = w.answer(relation, country)
        if relation == "capital":
            choices = [j for j in range(len(w.capitals)) if j != country and j not in self.reserved_cities[country]]
            in_context = w.capitals[rng.choice(choices)]
        else:
            in_context = rng.choice([l for l in w.languages if l != true])
        between = ""
        if rng.random() < 0.5:
            other = rng.choice([j for j in range(len(w.countries)) if j != country])
            between = fact(w, rng.choice(RELATIONS), other)
        answer = in_context if rng.random() < w.copy_probability(country) else true
        return f"{counterfactual_prompt(w, relation, country, in_context, between)} {answer} ."

    def ioi_doc(self) -> str:
        w, rng = self.world, self.rng
        while True:
            a, b = rng.sample(range(len(w.names)), 2)
            if frozenset((a, b)) not in self.reserved_names:
                break
        prompt = ioi_prompt(w, a, b, rng.random() < 0.5, rng.choice(PLACES), rng.choice(OBJECTS))
        return f"{prompt} {w.names[a]} ."

    def copy_doc(self) -> str:
        words = self.rng.choices(self.world.nonce, k=self.rng.randint(*COPY_LENGTHS))
        return " ".join(words) + " | " + " ".join(words) + " ."

    def document(self) -> str:
        kind = self.rng.choices(list(MIX), weights=list(MIX.values()))[0]
        return getattr(self, f"{kind}_doc")()


def training_corpus(world: World, documents: int, seed: int = 0) -> list[str]:
    """`documents` training documents (plain text, words separated by spaces; no BOS/EOS)."""
    sampler = _Sampler(world, seed)
    return [sampler.document() for _ in range(documents)]


def corpus_hash(corpus: list[str]) -> str:
    digest = hashlib.sha256()
    for doc in corpus:
        digest.update(doc.encode())
        digest.update(b"\n")
    return digest.hexdigest()


# ---- held-out evaluation prompts -----------------------------------------------------------------
def heldout_prompts(world: World, ioi: int = 400, copy: int = 200) -> dict:
    """Evaluation sets; none of their (country, in-context city) pairs, name pairs or nonce
    sequences appear in the training corpus."""
    rng = random.Random(f"eval-{world.seed}")
    n = len(world.countries)
    facts = [{"prompt": f"the {r} of {world.countries[i]} is", "answer": world.answer(r, i),
              "country": i, "relation": r} for r in RELATIONS for i in range(n)]
    counterfactual = [{"prompt": counterfactual_prompt(world, "capital", i, world.capitals[j]),
                       "in_context": world.capitals[j], "memorised": world.capitals[i], "country": i}
                      for i in range(n) for j in heldout_cities(world, i)]
    pairs = sorted(tuple(sorted(p)) for p in heldout_name_pairs(world))
    ioi_set = []
    for _ in range(ioi):
        a, b = rng.choice(pairs)
        if rng.random() < 0.5:
            a, b = b, a
        ioi_set.append({"prompt": ioi_prompt(world, a, b, rng.random() < 0.5, rng.choice(PLACES),
                                             rng.choice(OBJECTS)),
                        "answer": world.names[a], "subject": world.names[b]})
    copy_set = []
    for _ in range(copy):
        words = rng.choices(world.nonce, k=rng.randint(*COPY_LENGTHS))
        copy_set.append({"first": " ".join(words)})
    return {"facts": facts, "counterfactual": counterfactual, "ioi": ioi_set, "copy": copy_set}
