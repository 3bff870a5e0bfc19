"""Router: explicit task, template signatures (k-shot aware), similarity fallback, from_bank.

The synthetic formats below follow the paper's templates (arXiv 2211.00635, Table 7): an RTE-like
classification task and an En-Fr translation task carry signatures; a headline task has none
(only the similarity fallback can route it). Inputs of other formats, including k-shot prompts
whose exemplars are of another format, must get no prompt.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from multipromot.bank.entry import BankEntry, signature_from_record
from multipromot.data.templates import FormatSignature, Template
from multipromot.errors import BankError, UserError
from multipromot.features import SEPARATOR
from multipromot.router import (
    ExplicitTask,
    Route,
    Router,
    RouterEntry,
    RouteStrategy,
    SignatureMatch,
    SimilarityFallback,
    evaluate_routing,
)

SEP = SEPARATOR
SYLLABLES = "ka lo mi ne ru ta vo shi ben dar ost pel qui zan tor ila mon fer gal hu".split()
COMMON = (
    "the a of to in is was for on with as by at from his her their city river king team "
    "year people music water game film school war island party season world house church "
    "road village company station club line group album song book north south old new"
).split()


def _word(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(COMMON)
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))


def _sentence(rng: random.Random, lo: int = 4, hi: int = 14) -> str:
    words = [_word(rng) for _ in range(rng.randint(lo, hi))]
    return " ".join(words).capitalize() + "."


# Each format: rng -> (input, target), rendered the way exemplars.kshot_input renders them.
def rte(rng):
    return (
        f"{_sentence(rng)} question: {_sentence(rng, 3, 8)} Is it true or false? answer:",
        rng.choice(["True", "False"]),
    )


def en_fr(rng):
    return f"Translate English to French: {_sentence(rng)}", _sentence(rng)


def headline(rng):
    return f"Write a short headline for this news story: {_sentence(rng)} {_sentence(rng)}", (
        " ".join(_word(rng) for _ in range(rng.randint(2, 5))).title()
    )


def qa(rng):
    return f"Q: {_sentence(rng, 3, 9)[:-1]}? A:", _word(rng).title()


def cb(rng):
    return (
        f"{_sentence(rng)} question: {_sentence(rng, 3, 8)} "
        "Is it true or false or neither? answer:",
        rng.choice(["True", "False", "Neither"]),
    )


def wic(rng):  # the paper's WiC template: "true or False" is not RTE's "true or false"
    return (
        f"{_sentence(rng)} {_sentence(rng)} question: The word {_word(rng)} is used in the same "
        "way in the two sentences.Is it true or False? answer:",
        rng.choice(["True", "False"]),
    )


def en_de(rng):
    return f"Translate English to German: {_sentence(rng)}", _sentence(rng)


def summary(rng):
    body = " ".join(_sentence(rng) for _ in range(rng.randint(2, 4)))
    return f"Article: {body} One sentence summary:", _sentence(rng)


def free_text(rng):
    return SEP.join(
        " ".join(_sentence(rng) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 3))
    ), ""


def kshot(rng, exemplar_fmt, input_fmt, k: int) -> str:
    exemplars = [" ".join(exemplar_fmt(rng)) for _ in range(k)]
    return SEP.join([*exemplars, input_fmt(rng)[0]])


# As templates.Template.signature gives them: whitespace-normalised literal pieces.
RTE_SIG = FormatSignature(("question:", "Is it true or false? answer:"), ("True", "False"))
EN_FR_SIG = FormatSignature(("Translate English to French:",), None)
BANK = {"rte": (rte, RTE_SIG), "en_fr": (en_fr, EN_FR_SIG), "headline": (headline, None)}
OTHER = [qa, cb, wic, en_de, summary, free_text]


def _inputs(fmt, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [fmt(rng)[0] for _ in range(n)]


def _negatives(seed: int, n: int) -> list[str]:
    """Other formats 0-shot and k-shot, and k-shot prompts mixing bank and other formats."""
    rng = random.Random(seed)
    bank_fmts = [fmt for fmt, _ in BANK.values()]
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:  # another format, 0-shot
            out.append(rng.choice(OTHER)(rng)[0])
        elif kind == 1:  # another format, k-shot
            fmt = rng.choice(OTHER[:-1])
            out.append(kshot(rng, fmt, fmt, rng.randint(1, 3)))
        elif kind == 2:  # exemplars of another format, final input of a bank task
            out.append(kshot(rng, rng.choice(OTHER[:-1]), rng.choice(bank_fmts), rng.randint(1, 3)))
        else:  # exemplars of a bank task, final input of another format
            out.append(kshot(rng, rng.choice(bank_fmts), rng.choice(OTHER[:-1]), rng.randint(1, 2)))
    return out


def _positives(seed: int, n: int) -> dict[str, list[str]]:
    """Held-out inputs of each bank task: half 0-shot, half 1- or 2-shot with its own exemplars."""
    rng = random.Random(seed)
    return {
        task: [fmt(rng)[0] if i % 2 else kshot(rng, fmt, fmt, 1 + i % 4 // 2) for i in range(n)]
        for task, (fmt, _) in BANK.items()
    }


@pytest.fixture(scope="module")
def router() -> Router:
    entries = [RouterEntry(t, sig, _inputs(fmt, 100, seed=1)) for t, (fmt, sig) in BANK.items()]
    # Calibration negatives: only some of the other formats; evaluation uses all of them.
    rng = random.Random(2)
    negatives = [f(rng)[0] for f in (qa, cb, free_text) for _ in range(60)]
    negatives += [kshot(rng, qa, qa, 2) for _ in range(30)]
    negatives += [kshot(rng, qa, headline, 1) for _ in range(30)]
    return Router(entries, negatives)


def test_held_out_bank_inputs_route_to_their_task_and_other_formats_to_none(router):
    positives = _positives(seed=10, n=200)
    negatives = _negatives(seed=11, n=800)
    result = evaluate_routing(router, positives, negatives)
    assert result["n_positives"] == 600 and result["n_negatives"] == 800
    assert result["positive_rate"] >= 99.0, result["mistakes"]
    assert min(result["per_task"].values()) >= 99.0, result["per_task"]
    assert result["negative_rate"] >= 99.0, result["mistakes"]


def test_signed_tasks_are_routed_exactly_by_their_signature(router):
    positives = _positives(seed=20, n=100)
    routes = router.route(positives["rte"] + positives["en_fr"])
    assert all(r.reason.startswith("signature:") and r.score == 1.0 for r in routes)
    assert [r.task for r in routes] == ["rte"] * 100 + ["en_fr"] * 100


def test_one_shot_prompt_of_a_bank_task_routes_to_it(router):
    text = (
        "Cats sleep a lot. question: Cats are awake. Is it true or false? answer: False"
        f"{SEP}Dogs bark. question: Dogs make sounds. Is it true or false? answer:"
    )
    (route,) = router.route([text])
    assert route == Route("rte", "signature: rte format (1-shot)", 1.0)


def test_kshot_prompt_with_exemplars_of_another_format_routes_to_none(router):
    qa_then_rte = (
        f"Q: Who wrote Hamlet? A: Shakespeare{SEP}"
        "Dogs bark. question: Dogs make sounds. Is it true or false? answer:"
    )
    rte_then_qa = (
        f"Dogs bark. question: Dogs make sounds. Is it true or false? answer: True{SEP}"
        "Q: Who wrote Hamlet? A:"
    )
    cb_then_rte = (
        f"Dogs bark. question: Dogs fly. Is it true or false or neither? answer: Neither{SEP}"
        "Dogs bark. question: Dogs make sounds. Is it true or false? answer:"
    )
    routes = router.route([qa_then_rte, rte_then_qa, cb_then_rte])
    assert [r.task for r in routes] == [None, None, None]
    assert routes[0].reason == "signature: input in rte format, exemplars are not"
    assert routes[2].reason == "signature: input in rte format, exemplars are not"


def test_pieces_match_across_any_whitespace_but_literally_otherwise(router):
    texts = [
        "Dogs bark. question:\tDogs make sounds. Is it true or false?\nanswer:",
        "Dogs bark. Question: Dogs make sounds. Is it true or false? answer:",  # "Question"
        "Dogs bark. question: Dogs make sounds. Is it true or False? answer:",  # paper's WiC
    ]
    assert [r.task for r in router.route(texts)] == ["rte", None, None]


def test_exemplar_with_an_answer_outside_the_answer_set_is_another_format(router):
    text = (
        f"Dogs bark. question: Dogs fly. Is it true or false? answer: Maybe{SEP}"
        "Dogs bark. question: Dogs make sounds. Is it true or false? answer:"
    )
    assert router.route([text])[0].task is None


def test_unsigned_task_is_routed_by_similarity(router):
    rng = random.Random(30)
    zero_shot, one_shot = headline(rng)[0], kshot(rng, headline, headline, 1)
    routes = router.route([zero_shot, one_shot, kshot(rng, qa, headline, 2)])
    assert [r.task for r in routes] == ["headline", "headline", None]
    assert routes[0].reason.startswith("similarity:")
    threshold = float(router.strategies[2].thresholds[router.strategies[2].tasks.index("headline")])
    assert routes[0].score >= threshold > routes[2].score


def test_explicit_task_wins_over_the_format(router):
    qa_input = "Q: Who wrote Hamlet? A:"
    rte_input = "Dogs bark. question: Dogs make sounds. Is it true or false? answer:"
    routes = router.route([qa_input, rte_input, rte_input], tasks=["en_fr", "headline", None])
    assert [r.task for r in routes] == ["en_fr", "headline", "rte"]
    assert routes[0] == Route("en_fr", "explicit: named by the caller", 1.0)


def test_explicit_task_not_in_the_bank_is_a_user_error(router):
    with pytest.raises(UserError, match="not in the router's bank") as err:
        router.route(["x"], tasks=["squad"])
    assert err.value.key == "squad"
    with pytest.raises(UserError, match="1 inputs but 2 tasks"):
        router.route(["x"], tasks=[None, None])


def test_route_to_json_is_what_route_json_prints(router):
    (route,) = router.route(["Q: Who wrote Hamlet? A:"])
    record = route.to_json("Q: Who wrote Hamlet? A:")
    assert set(record) == {"input", "task", "reason", "score"}
    assert record["input"] == "Q: Who wrote Hamlet? A:" and record["task"] is None
    assert json.loads(json.dumps(record)) == record


def _render(template: Template, rng: random.Random, n: int, shots: int = 0) -> list[str]:
    """k-shot inputs as features.kshot_text joins them, rendered by a real Template."""

    def example() -> dict:
        return {
            "passage": _sentence(rng),
            "question": _sentence(rng, 3, 6),
            "label": rng.randint(0, 1),
        }

    out = []
    for _ in range(n):
        parts = [" ".join(template.apply(example())) for _ in range(shots)]
        out.append(SEP.join([*parts, template.apply(example())[0]]))
    return out


def test_template_with_the_separator_in_its_own_text():
    # Template.signature drops the template's "\n\n" (pieces are whitespace-normalised); the
    # task's examples show that the template puts the separator before each piece.
    boolq = Template(
        "boolq",
        "{{passage}}\n\nQuestion: {{question}}\n\nAnswer: ||| {{answer_choices[label]}}",
        "no ||| yes",
    )
    assert boolq.signature == FormatSignature(("Question:", "Answer:"), ("no", "yes"))
    rng = random.Random(0)
    entry = RouterEntry("boolq", boolq.signature, _render(boolq, rng, 20))
    strategy = SignatureMatch([entry])
    zero, two = _render(boolq, rng, 1)[0], _render(boolq, rng, 1, shots=2)[0]
    qa_then_boolq = SEP.join([" ".join(qa(rng)), zero])
    routes = strategy.decide([zero, two, qa_then_boolq], [None] * 3)
    assert [r.task for r in routes] == ["boolq", "boolq", None]
    assert routes[1].reason == "signature: boolq format (2-shot)"
    # Without examples the router cannot know the separator belongs to the template: no match.
    bare = SignatureMatch([RouterEntry("boolq", boolq.signature)])
    assert bare.decide([zero], [None]) == [None]


def test_real_template_signature_routes_rendered_inputs():
    rte_t = Template(
        "lab_rte",
        "{{premise}} question: {{hypothesis}} Is it true or false? answer: "
        "||| {{answer_choices[label]}}",
        "True ||| False",
    )
    rng = random.Random(1)

    def example() -> dict:
        return {"premise": _sentence(rng), "hypothesis": _sentence(rng, 3, 6), "label": 1}

    router = Router([RouterEntry("lab_rte", rte_t.signature, [rte_t.apply(example())[0]])])
    one_shot = SEP.join([" ".join(rte_t.apply(example())), rte_t.apply(example())[0]])
    routes = router.route([rte_t.apply(example())[0], one_shot, "Q: Who wrote Hamlet? A:"])
    assert [r.task for r in routes] == ["lab_rte", "lab_rte", None]
    assert routes[1].reason == "signature: lab_rte format (1-shot)"


def test_signature_without_examples_still_requires_separator_free_fields():
    strategy = SignatureMatch([RouterEntry("rte", RTE_SIG)])
    rte_input = "Dogs bark. question: Dogs make sounds. Is it true or false? answer:"
    texts = [rte_input, f"Some free text.{SEP}{rte_input}", f"{rte_input} True{SEP}Q: x? A:"]
    routes = strategy.decide(texts, [None] * 3)
    # The last input matches no format at all: the signature strategy leaves it to the next.
    assert [r.task if r else "pass" for r in routes] == ["rte", None, "pass"]
    assert routes[1].reason == "signature: input in rte format, exemplars are not"
    assert [r.task for r in Router([RouterEntry("rte", RTE_SIG)]).route(texts)] == [
        "rte",
        None,
        None,
    ]


def test_similarity_fallback_off_for_signed_tasks_unless_asked():
    entries = [RouterEntry("rte", RTE_SIG, _inputs(rte, 40, seed=1))]
    assert SimilarityFallback(entries).tasks == []
    assert SimilarityFallback(entries, signed_tasks=True).tasks == ["rte"]


def test_custom_strategy_follows_the_protocol():
    class AlwaysNone:
        name = "never"

        def decide(self, texts, requested):
            return [Route(None, "never", 0.0) for _ in texts]

    assert isinstance(AlwaysNone(), RouteStrategy)
    assert isinstance(ExplicitTask(["rte"]), RouteStrategy)
    router = Router([RouterEntry("rte", RTE_SIG)], strategies=[AlwaysNone()])
    assert router.route(["a question: b Is it true or false? answer:"])[0].task is None


def test_duplicate_entries_are_rejected():
    with pytest.raises(UserError, match="each task once"):
        Router([RouterEntry("rte"), RouterEntry("rte")])


def test_signature_from_record_reads_bank_meta_and_rejects_bad_shapes():
    assert signature_from_record({"pieces": ["Q:", "A:"], "answers": None}) == FormatSignature(
        ("Q:", "A:"), None
    )
    assert signature_from_record({"pieces": ["Q:", " "], "answers": []}) == FormatSignature(
        ("Q:", " "), None
    )
    assert signature_from_record(RTE_SIG) == RTE_SIG
    assert signature_from_record({"pieces": [" ", ""], "answers": None}) is None
    assert signature_from_record(None) is None
    with pytest.raises(BankError, match="pieces must be a list"):
        signature_from_record({"pieces": "Q:"}, key="qa: format.signature")


def _entry(task, version, current, signature):
    meta = {"format": {"template": "t", "signature": signature}}
    return BankEntry(task, version, Path(task), meta, current)


class _FakeBank:
    """What Router.from_bank uses of PromptBank: entries() (BankEntry records)."""

    def entries(self):
        return [
            _entry("qa", 1, False, {"pieces": ["Translate English to French: "]}),
            _entry("qa", 2, True, {"pieces": ["Q: ", " A:"], "answers": None}),
            _entry("rte", 1, True, {"pieces": list(RTE_SIG.pieces), "answers": ["True", "False"]}),
        ]


def test_from_bank_uses_current_entries_and_their_signatures():
    router = Router.from_bank(_FakeBank(), examples={"qa": ["Q: Who? A:", "Q: Where? A:"]})
    assert router.tasks == ["qa", "rte"]
    texts = [
        "Q: Who wrote Hamlet? A:",
        "Translate English to French: cheese",  # only the old qa version had this signature
        "Dogs bark. question: Dogs make sounds. Is it true or false? answer:",
    ]
    assert [r.task for r in router.route(texts)] == ["qa", None, "rte"]
