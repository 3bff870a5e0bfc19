"""Lab task families: generated tasks in the output formats of the paper's task types.

Each family is a generator ``fn(split, seed, **sizes) -> list[dict]`` registered with
:func:`multipromot.data.sources.register_generator`; ``multipromot/lab/catalogue.yaml`` pairs each
one with its template, answer set and metric.

=================  ====================================  ==================  ===========
family             mirrors                               output              metric
=================  ====================================  ==================  ===========
lab_rte            RTE (comparatives: negated, other)    True / False        accuracy
lab_cb             CommitmentBank (speaker commitment)   True/False/Neither  accuracy
lab_wic            WiC (noun sense or verb sense)        no / yes            accuracy
lab_sentiment      SST-2 (majority of polar adjectives)  negative/positive   accuracy
lab_qa             closed-book TriviaQA (fact table)     one word            exact_match
lab_trans_fr/de/ro WMT En-Fr/De/Ro (word lexicons)       a sentence          bleu
lab_sum            XSum (headline of the main event)     a headline          rouge2
=================  ====================================  ==================  ===========

Splits are disjoint by construction: one stream of distinct examples per (family, seed) is cut
into validation, test and train, in that order, so the held-out splits never change when the
train size does. Classification families cycle through their labels, so every split is
balanced. Closed-book QA is the exception to "distinct content": its facts must be learnt from
train, so every fact is asked in train, and validation and test ask it in phrasings that train
never uses for that fact.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import lru_cache, partial

from multipromot.errors import UserError
from multipromot.lab.world import COMMITMENT, COMPARATIVES, RELATIONS, World, get_world

__all__ = [
    "FAMILIES",
    "PRETRAIN_FAMILIES",
    "SPLITS",
    "DEFAULT_SIZES",
    "RULE_OPTIONS",
    "generate",
    "lab_rte",
    "lab_cb",
    "lab_wic",
    "lab_sentiment",
    "lab_qa",
    "lab_trans_fr",
    "lab_trans_de",
    "lab_trans_ro",
    "lab_sum",
]

SPLITS: tuple[str, ...] = ("train", "validation", "test")
DEFAULT_SIZES: dict[str, int] = {"n_train": 3000, "n_validation": 200, "n_test": 200}
# Rule settings a family's generator takes besides the sizes, with their defaults (the demo's).
RULE_OPTIONS: dict[str, dict[str, float]] = {"lab_rte": {"other_dimension": 0.5}}

Example = dict[str, object]
# A maker turns (rng, running index) into one example; the index picks the label so that
# labels cycle and every split is balanced.
Maker = Callable[[random.Random, World, int], Example]


# ---------------------------------------------------------------------------- sentence pieces
def _two(rng: random.Random, items: tuple[str, ...]) -> tuple[str, str]:
    a, b = rng.sample(items, 2)
    return a, b


def _fact_sentence(entity: str, relation: str, value: str) -> str:
    return RELATIONS[relation].format(e=entity, v=value)


def _maybe_distracted(
    rng: random.Random, world: World, sentence: str, mentioned: tuple[str, ...]
) -> str:
    """``sentence``, half the time with an unrelated fact about another entity before or after
    it, so that the answer's position in the premise varies."""
    if rng.random() >= 0.5:
        return sentence
    entity = rng.choice([e for e in world.entities if e not in mentioned])
    relation = rng.choice(list(RELATIONS))
    fact = _fact_sentence(entity, relation, rng.choice(world.values[relation]))
    return f"{sentence} {fact}" if rng.random() < 0.5 else f"{fact} {sentence}"


def _event(rng: random.Random, world: World) -> tuple[str, str, str, str]:
    """(entity, verb, food, home): "the E V the F in the H." is the event sentence."""
    return (
        rng.choice(world.entities),
        rng.choice(world.verbs),
        rng.choice(world.values["food"]),
        rng.choice(world.values["home"]),
    )


# ---------------------------------------------------------------------------- the makers
def _make_rte(
    rng: random.Random, world: World, i: int, *, other_dimension: float = 0.5, seed: int = 0
) -> Example:
    """A comparative and a hypothesis about it. "the A is bigger than the B." entails itself
    and its paraphrase "the B is smaller than the A." (True). Not entailed (False): the
    negation ("the A is not bigger than the B.") or, for a share ``other_dimension`` of the
    False rows, the same pair compared on another dimension ("the A is older than the B.",
    "the B is slower than the A."). Half the premises carry an unrelated fact before or after
    the comparative.

    label 0 (True) = entailed, 1 (False) = not entailed. Why two ways to be False: with the
    negation alone (``other_dimension`` 0), a soft prompt on the frozen lab model solves the
    task, so stage 2 has nothing left to learn on it, unlike the paper's RTE; the more False
    rows compare on another dimension, the more the model must compare the two comparatives,
    which its frozen features do not do, and the further prompt tuning alone stays below
    fine-tuning. The default 0.5 is the demo's task (lab version 4). The scores behind this,
    and two rules that no method learned: docs/results/lab-notes.md.

    The knob changes the rule and nothing else: the stream of draws is the same for every
    value (that of the default), so premises, labels and the True rows do not move; a False
    row that compares on another dimension only at a larger value takes its word from a
    draw of its own (seeded by ``seed`` and the row itself).
    """
    a, b = _two(rng, world.entities)
    dimension = rng.randrange(len(COMPARATIVES))
    word, inverse = COMPARATIVES[dimension]
    if rng.random() < 0.5:
        word, inverse = inverse, word
    premise = _maybe_distracted(rng, world, f"the {a} is {word} than the {b}.", (a, b))
    label = i % 2
    x, y, w = (b, a, inverse) if rng.random() < 0.5 else (a, b, word)  # paraphrase or restate
    others = [pair for d, pair in enumerate(COMPARATIVES) if d != dimension]
    draw = rng.random() if label == 1 else 1.0
    if draw < 0.5:  # the default's other-dimension rows draw their word from the stream
        other_word = rng.choice(rng.choice(others))
    if label == 1 and draw < min(other_dimension, 0.5):
        w, negation = other_word, ""
    elif label == 1 and draw >= 0.5 and other_dimension > 0.5:
        own = random.Random(f"lab_rte:{seed}|{premise}|{x}|{y}")  # the row's own draws
        if own.random() < (other_dimension - 0.5) / 0.5:
            w, negation = own.choice(own.choice(others)), ""
        else:
            negation = "not "
    else:
        negation = "not " if label == 1 else ""
    return {
        "premise": premise,
        "hypothesis": f"the {x} is {negation}{w} than the {y}.",
        "label": label,
    }


def _make_cb(rng: random.Random, world: World, i: int) -> Example:
    """A speaker embeds a fact; is the speaker committed to it (True), to its negation (False),
    or to neither? "the A knows that the B is red." -> "the B is red." True; "... denies
    that ..." False; "... wonders whether ..." Neither. As in CommitmentBank, the embedding verb
    decides, and half the premises carry an unrelated fact before or after."""
    label = i % 3
    a, b = _two(rng, world.entities)
    relation = rng.choice(list(RELATIONS))
    clause = _fact_sentence(b, relation, rng.choice(world.values[relation]))
    embedding = rng.choice(COMMITMENT[("True", "False", "Neither")[label]])
    premise = _maybe_distracted(rng, world, f"the {a} {embedding} {clause}", (a, b))
    return {"premise": premise, "hypothesis": clause, "label": label}


def _wic_sentence(rng: random.Random, world: World, word: str, sense: str) -> str:
    """``word`` in its noun sense ("the E V a W of the X.") or its verb sense ("the E W the X.")."""
    entity = rng.choice(world.entities)
    relation = rng.choice(("food", "home"))
    thing = rng.choice(world.values[relation])
    if sense == "noun":
        return f"the {entity} {rng.choice(world.verbs)} a {word} of the {thing}."
    return f"the {entity} {word} the {thing}."


def _make_wic(rng: random.Random, world: World, i: int) -> Example:
    """Is a polyseme used in the same sense in two sentences? Each polyseme has a noun sense
    and a verb sense (as "watch" or "park"): label 1 (yes) = both sentences use the noun
    sense, 0 (no) = one uses the noun sense and the other the verb sense, in either order.

    Why not senses that must be compared (two categories of the next word, "same" = equal
    categories): that is an XOR of two features, which the small lab model does not learn in
    pretraining, while it learns this version (the figures: docs/results/lab-notes.md).
    """
    word = rng.choice(world.polysemes)
    label = 1 - i % 2
    senses = ["noun", "noun"] if label == 1 else rng.sample(["noun", "verb"], 2)
    return {
        "word": word,
        "sentence1": _wic_sentence(rng, world, word, senses[0]),
        "sentence2": _wic_sentence(rng, world, word, senses[1]),
        "label": label,
    }


def _make_sentiment(rng: random.Random, world: World, i: int) -> Example:
    """A review of three polar adjectives (majority decides) among neutral words.

    label 1 = positive, 0 = negative.
    """
    label = 1 - i % 2
    majority, minority = (
        (world.positive, world.negative) if label == 1 else (world.negative, world.positive)
    )
    n_minority = rng.choice((0, 1))
    adjectives = [rng.choice(majority) for _ in range(3 - n_minority)]
    adjectives += [rng.choice(minority) for _ in range(n_minority)]
    rng.shuffle(adjectives)
    food, home = rng.choice(world.values["food"]), rng.choice(world.values["home"])
    filler = rng.choice(world.neutral)
    review = (
        f"the {food} was {adjectives[0]} and {adjectives[1]}. "
        f"the {home} was {filler} and {adjectives[2]}."
    )
    return {"review": review, "label": label}


def _make_translation(language: str) -> Maker:
    def make(rng: random.Random, world: World, i: int) -> Example:
        """Word-by-word "translation" of a lab-English sentence through the language's lexicon."""
        kind = i % 4
        if kind == 0:
            entity, verb, food, home = _event(rng, world)
            source = f"the {entity} {verb} the {food} in the {home}."
        elif kind == 1:
            relation = rng.choice(list(RELATIONS))
            source = _fact_sentence(
                rng.choice(world.entities), relation, rng.choice(world.values[relation])
            )
        elif kind == 2:
            a, b = _two(rng, world.entities)
            source = f"the {a} is {rng.choice(rng.choice(COMPARATIVES))} than the {b}."
        else:
            a, b = _two(rng, world.entities)
            food = rng.choice(world.values["food"])
            source = f"the {a} and the {b} {rng.choice(world.verbs)} the {food}."
        lexicon = world.lexicons[language]
        words = source.rstrip(".").split()
        target = " ".join(lexicon[w] for w in words) + "."
        return {"source": source, "target": target}

    return make


def _make_sum(rng: random.Random, world: World, i: int) -> Example:
    """A three-sentence article; the headline is its one event, without articles."""
    entity, verb, food, home = _event(rng, world)
    event = f"the {entity} {verb} the {food} in the {home}."
    others = [e for e in world.entities if e != entity]
    fillers = []
    for _ in range(2):
        relation = rng.choice(list(RELATIONS))
        fillers.append(
            _fact_sentence(rng.choice(others), relation, rng.choice(world.values[relation]))
        )
    sentences = [event, *fillers]
    rng.shuffle(sentences)  # the event is not always first: the model has to find it
    return {"article": " ".join(sentences), "summary": f"{entity} {verb} {food} in {home}"}


# ---------------------------------------------------------------------------- splitting
def _key(example: Example) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in example.items()))


@lru_cache(maxsize=64)
def _streamed_splits(
    family: str,
    seed: int,
    n_train: int,
    n_validation: int,
    n_test: int,
    options: tuple[tuple[str, object], ...] = (),
) -> dict[str, tuple[Example, ...]]:
    """Validation, test, then train: one stream of distinct examples cut in that order.

    ``options`` (the family's rule settings, as (name, value) pairs) change only the rule:
    the splits are drawn with the default rule, then each row is drawn again from the same
    generator state with these settings (:func:`_apply_rule`), so every row keeps its place,
    premise and label."""
    maker = _MAKERS[family]
    world = get_world()
    rng = random.Random(f"{family}:{seed}")
    seen: set[tuple] = set()
    out: dict[str, list[Example]] = {}
    states: dict[str, list] = {}
    for split, n in (("validation", n_validation), ("test", n_test), ("train", n_train)):
        examples: list[Example] = []
        states[split] = []
        index, misses = 0, 0
        while len(examples) < n:
            state = rng.getstate()
            example = maker(rng, world, index)
            key = _key(example)
            if key in seen:
                misses += 1
                if misses > 50 * n + 1000:  # the family's space is smaller than asked for
                    break
                continue
            seen.add(key)
            examples.append(example)
            states[split].append(state)
            index += 1
        out[split] = examples
    if options:
        out = _apply_rule(partial(maker, seed=seed, **dict(options)), world, out, states)
    return {split: tuple(examples) for split, examples in out.items()}


def _apply_rule(ruled: Maker, world: World, splits: dict, states: dict) -> dict:
    """Every row drawn again, from its generator state, with another rule. A row whose new
    form would repeat another row (a hypothesis turned into a negation can equal one the
    default already has) keeps its default form, so no split repeats an example or shares one
    with another."""
    rows = [(split, i) for split in splits for i in range(len(splits[split]))]
    new = {}
    for split, i in rows:
        replay = random.Random()
        replay.setstate(states[split][i])
        new[split, i] = ruled(replay, world, i)
    reverted: set[tuple[str, int]] = set()
    while True:
        current = {row: splits[row[0]][row[1]] if row in reverted else new[row] for row in rows}
        holders: dict[tuple, list] = {}
        for row, example in current.items():
            holders.setdefault(_key(example), []).append(row)
        clashes = [row for group in holders.values() if len(group) > 1 for row in group]
        changed = [row for row in clashes if row not in reverted]
        if not changed:
            return {
                split: [current[split, i] for i in range(len(splits[split]))] for split in splits
            }
        reverted.update(changed)


# Question phrasings per relation for closed-book QA.
_QUESTIONS: dict[str, tuple[str, ...]] = {
    "color": (
        "what color is the {e}?",
        "which color does the {e} have?",
        "the {e} has what color?",
        "name the color of the {e}.",
        "tell me the color of the {e}.",
    ),
    "food": (
        "what does the {e} eat?",
        "which food does the {e} eat?",
        "the {e} eats what?",
        "name the food of the {e}.",
        "tell me what the {e} eats.",
    ),
    "home": (
        "where does the {e} live?",
        "which place does the {e} live in?",
        "the {e} lives where?",
        "name the home of the {e}.",
        "tell me where the {e} lives.",
    ),
    "tool": (
        "what does the {e} use?",
        "which tool does the {e} use?",
        "the {e} uses what?",
        "name the tool of the {e}.",
        "tell me what the {e} uses.",
    ),
}
_QA_HELD_OUT = 2  # phrasings per fact kept out of train: one for validation, one for test


@lru_cache(maxsize=16)
def _qa_splits(
    seed: int, n_train: int, n_validation: int, n_test: int
) -> dict[str, tuple[Example, ...]]:
    """Every fact in train (in 3 phrasings); validation and test ask it in the other two."""
    world = get_world()
    rng = random.Random(f"lab_qa:{seed}")
    out: dict[str, list[Example]] = {split: [] for split in SPLITS}
    for entity in world.entities:
        for relation, phrasings in _QUESTIONS.items():
            order = rng.sample(range(len(phrasings)), len(phrasings))
            answer = world.facts[entity][relation]
            for split, index in zip(("validation", "test"), order, strict=False):
                out[split].append({"question": phrasings[index].format(e=entity), "answer": answer})
            for index in order[_QA_HELD_OUT:]:
                out["train"].append(
                    {"question": phrasings[index].format(e=entity), "answer": answer}
                )
    sizes = {"train": n_train, "validation": n_validation, "test": n_test}
    result = {}
    for split, examples in out.items():
        rng.shuffle(examples)
        result[split] = tuple(examples[: sizes[split]])
    return result


_MAKERS: dict[str, Maker] = {
    "lab_rte": _make_rte,
    "lab_cb": _make_cb,
    "lab_wic": _make_wic,
    "lab_sentiment": _make_sentiment,
    "lab_trans_fr": _make_translation("fr"),
    "lab_trans_de": _make_translation("de"),
    "lab_trans_ro": _make_translation("ro"),
    "lab_sum": _make_sum,
}

FAMILIES: tuple[str, ...] = (
    "lab_rte",
    "lab_cb",
    "lab_wic",
    "lab_sentiment",
    "lab_qa",
    "lab_trans_fr",
    "lab_trans_de",
    "lab_trans_ro",
    "lab_sum",
)
# RTE-like stays out of pretraining, so fine-tuning on it has something to learn (the paper's
# pretrained mT5 is at chance on RTE too).
PRETRAIN_FAMILIES: tuple[str, ...] = tuple(f for f in FAMILIES if f != "lab_rte")


def generate(
    family: str,
    split: str,
    seed: int = 0,
    *,
    n_train: int = DEFAULT_SIZES["n_train"],
    n_validation: int = DEFAULT_SIZES["n_validation"],
    n_test: int = DEFAULT_SIZES["n_test"],
    **rule: float,
) -> list[dict]:
    """Examples of one lab family and split; deterministic for ``(family, seed, sizes, rule)``.

    Args:
        family: one of :data:`FAMILIES`.
        split: ``train``, ``validation`` or ``test``.
        seed: chooses the sentences and their split (not the world's words or facts).
        n_train, n_validation, n_test: split sizes. Closed-book QA is capped by its fact table
            (160 facts: 480 train questions, 160 each for validation and test).
        rule: the family's rule settings (:data:`RULE_OPTIONS`): ``lab_rte`` takes
            ``other_dimension``, the share of False rows that compare on another dimension
            instead of negating (0 to 1; 0.5, the demo's task, by default).

    Returns:
        Fresh dicts (safe to mutate), each with the template's fields (and ``label`` for the
        classification families) plus ``idx``, its position in the split.

    Raises:
        UserError: unknown family or split, or a negative size.
    """
    if family not in FAMILIES:
        raise UserError(f"unknown lab family {family!r}; known: {', '.join(FAMILIES)}", key=family)
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; lab tasks have {', '.join(SPLITS)}", key=family)
    sizes = (int(n_train), int(n_validation), int(n_test))
    if min(sizes) < 0:
        raise UserError(f"split sizes must be >= 0, got {sizes}", key=family)
    options = _rule(family, rule)
    if family == "lab_qa":
        splits = _qa_splits(int(seed), *sizes)
    else:
        splits = _streamed_splits(family, int(seed), *sizes, options)
    return [{**example, "idx": i} for i, example in enumerate(splits[split])]


def _rule(family: str, given: dict) -> tuple[tuple[str, float], ...]:
    """The family's rule settings as a hashable tuple; () when they are its defaults (so the
    default task is cached, and generated, exactly as before the settings existed).

    Raises:
        UserError: a setting the family does not take, or a share outside [0, 1].
    """
    defaults = RULE_OPTIONS.get(family, {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise UserError(f"unknown rule setting(s) {', '.join(unknown)}", key=family)
    settings = {**defaults, **{k: float(v) for k, v in given.items()}}
    for name, value in settings.items():
        if not 0.0 <= value <= 1.0:
            raise UserError(f"{name} must be in [0, 1], got {value}", key=family)
    return () if settings == defaults else tuple(sorted(settings.items()))


def _generator(family: str) -> Callable[..., list[dict]]:
    def fn(split: str, seed: int = 0, **options: float) -> list[dict]:
        known = [*DEFAULT_SIZES, *RULE_OPTIONS.get(family, {})]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise UserError(
                f"unknown option(s) {', '.join(unknown)}; {family} takes {', '.join(known)}",
                key=family,
            )
        return generate(family, split, seed, **options)

    fn.__name__ = family
    fn.__qualname__ = family
    fn.__doc__ = f"The {family} lab family (see :func:`generate`)."
    return fn


lab_rte = _generator("lab_rte")
lab_cb = _generator("lab_cb")
lab_wic = _generator("lab_wic")
lab_sentiment = _generator("lab_sentiment")
lab_qa = _generator("lab_qa")
lab_trans_fr = _generator("lab_trans_fr")
lab_trans_de = _generator("lab_trans_de")
lab_trans_ro = _generator("lab_trans_ro")
lab_sum = _generator("lab_sum")
