"""The lab world: a fixed vocabulary of made-up words, a fact table and three target lexicons.

Every lab task family draws its sentences from this one world, so the lab model's tokenizer,
its memorised facts and its translation lexicons stay the same whatever seed a task uses. The
task ``seed`` only chooses which sentences are generated and how they fall into splits; the
world itself is a pure function of :data:`WORLD_SEED`.

Made-up words are built from syllables: two syllables of consonant + vowel (+ optional coda) for
the source language ("lab English", which keeps English function words), and a different
syllable inventory per target language so that the three "translations" look distinct.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "WORLD_SEED",
    "World",
    "get_world",
    "RELATIONS",
    "COMPARATIVES",
    "COMMITMENT",
    "TARGET_LANGUAGES",
]

# Changing this changes every lab task and invalidates cached lab models.
WORLD_SEED = 20240517

# Relation name -> (attribute set in World, the sentence that states it).
RELATIONS: dict[str, str] = {
    "color": "the {e} is {v}.",
    "food": "the {e} eats the {v}.",
    "home": "the {e} lives in the {v}.",
    "tool": "the {e} uses the {v}.",
}

# Comparative pairs (word, its inverse): the RTE-like family reasons over them.
COMPARATIVES: list[tuple[str, str]] = [
    ("bigger", "smaller"),
    ("older", "younger"),
    ("faster", "slower"),
    ("taller", "shorter"),
]

# How a speaker embeds a clause, by CommitmentBank label: committed to it (True), to its negation
# (False), or to neither. The CB-like family turns on these words, as CB turns on the speaker's
# commitment.
COMMITMENT: dict[str, tuple[str, ...]] = {
    "True": ("knows that", "saw that", "proved that"),
    "False": ("denies that", "disproved that", "refuted that"),
    "Neither": ("wonders whether", "asks whether", "guesses that"),
}

TARGET_LANGUAGES: tuple[str, ...] = ("fr", "de", "ro")

# Function words of lab English; every one has a translation in each target language.
FUNCTION_WORDS: tuple[str, ...] = ("the", "is", "eats", "lives", "in", "uses", "and", "than", "a")

# Syllable inventories: (onsets, vowels, codas). Distinct per language so words never collide
# across languages by accident and each language has its own "look".
_SYLLABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "src": (tuple("bdfgklmnprstvz"), tuple("aeiou"), ("", "", "", "n", "k")),
    "fr": (("b", "l", "m", "p", "s", "v", "ch", "gr"), ("ai", "eu", "ou", "e"), ("", "", "x", "t")),
    "de": (("k", "sch", "st", "br", "w", "h", "z"), ("a", "ei", "u", "o"), ("", "ch", "tz", "rn")),
    "ro": (("c", "d", "t", "ș", "n", "r"), ("ă", "î", "ea", "i"), ("", "", "ul", "u")),
}


@dataclass(frozen=True)
class World:
    """Everything the lab families draw from; build it with :func:`get_world`.

    Attributes:
        entities: creature names (subjects of almost every sentence).
        values: attribute values per relation of :data:`RELATIONS` (``values["food"]`` ...).
        facts: the fact table, ``facts[entity][relation] -> value`` (closed-book QA asks it).
        verbs: action verbs of events (summaries, translation).
        positive, negative: sentiment adjectives; ``neutral``: words that carry no sentiment.
        polysemes: words with a noun sense and a verb sense (the WiC-like family).
        lexicons: target language -> source word -> target word (one word each, a bijection).
    """

    entities: tuple[str, ...]
    values: dict[str, tuple[str, ...]]
    facts: dict[str, dict[str, str]]
    verbs: tuple[str, ...]
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    neutral: tuple[str, ...]
    polysemes: tuple[str, ...]
    lexicons: dict[str, dict[str, str]]

    @property
    def source_words(self) -> tuple[str, ...]:
        """Every lab-English word a translation sentence can contain, in a fixed order."""
        words = [*FUNCTION_WORDS, *self.entities, *self.verbs]
        words += [w for relation in RELATIONS for w in self.values[relation]]
        words += [w for pair in COMPARATIVES for w in pair]
        return tuple(words)


def _word(rng: random.Random, language: str, syllables: int) -> str:
    onsets, vowels, codas = _SYLLABLES[language]
    parts = [rng.choice(onsets) + rng.choice(vowels) for _ in range(syllables)]
    return "".join(parts) + rng.choice(codas)


def _fresh(rng: random.Random, language: str, n: int, used: set[str], syllables: int = 2):
    """``n`` new words of ``language`` that are not in ``used`` (and add them to it)."""
    out: list[str] = []
    while len(out) < n:
        w = _word(rng, language, syllables)
        if w not in used:
            used.add(w)
            out.append(w)
    return tuple(out)


@lru_cache(maxsize=4)
def get_world(seed: int = WORLD_SEED) -> World:
    """The lab world for ``seed`` (default :data:`WORLD_SEED`); cached, treat it as read-only.

    Args:
        seed: the world seed. Only tests should pass anything but the default.

    Returns:
        A :class:`World`.
    """
    rng = random.Random(f"lab-world:{seed}")
    # English words used by templates and function words are reserved so that no made-up word
    # can collide with them.
    used: set[str] = set(FUNCTION_WORDS) | {w for pair in COMPARATIVES for w in pair}
    used |= {"true", "false", "neither", "yes", "no", "question", "answer", "review", "article"}
    used.add("not")  # the RTE-like family's negation
    used |= {word for phrases in COMMITMENT.values() for p in phrases for word in p.split()}
    entities = _fresh(rng, "src", 40, used)
    values = {
        "color": _fresh(rng, "src", 8, used),
        "food": _fresh(rng, "src", 10, used),
        "home": _fresh(rng, "src", 10, used),
        "tool": _fresh(rng, "src", 8, used),
    }
    verbs = _fresh(rng, "src", 8, used)
    positive = _fresh(rng, "src", 10, used)
    negative = _fresh(rng, "src", 10, used)
    neutral = _fresh(rng, "src", 10, used)
    polysemes = _fresh(rng, "src", 8, used)
    facts = {e: {r: rng.choice(values[r]) for r in RELATIONS} for e in entities}
    world = World(
        entities=entities,
        values=values,
        facts=facts,
        verbs=verbs,
        positive=positive,
        negative=negative,
        neutral=neutral,
        polysemes=polysemes,
        lexicons={},
    )
    for language in TARGET_LANGUAGES:
        targets = _fresh(rng, language, len(world.source_words), used)
        world.lexicons[language] = dict(zip(world.source_words, targets, strict=True))
    return world
