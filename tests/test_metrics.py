"""Post-processing rules, the paper's metrics, Norm. Avg. on the paper's numbers, specialization."""

from __future__ import annotations

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from multipromot.data import metrics
from multipromot.data.metrics import (
    accuracy,
    bleu,
    cut_at_prefix,
    exact_match,
    first_line,
    first_word,
    list_metrics,
    normalize_answer,
    normalized_average,
    postprocess,
    register_metric,
    register_postprocessor,
    reset_registries,
    rouge2,
    score,
    specialization_rate,
)
from multipromot.errors import UserError


@pytest.fixture(autouse=True)
def _clean_registries():
    yield
    reset_registries()


# ------------------------------------------------------------------------- post-processing


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (" Paris\n\nQ: What is the capital of Italy? A: Rome", "Paris"),  # next exemplar
        ("Paris Q: What is the capital of Italy? A: Rome", "Paris"),  # next prefix, same line
        ("<extra_id_0> Lewis Hamilton won. <extra_id_1> the race", "Lewis Hamilton won."),
        ("Le chat est noir. Translate English to French: The dog", "Le chat est noir."),
        ("Hamilton won the race. Article: Rain fell.", "Hamilton won the race."),
        ("True question: Dogs fly. Is it true or false? answer: False", "True"),
        ("Two lines\nof summary", "Two lines\nof summary"),  # a single newline is kept
        ("\n\nQ: the model opened a new example", ""),
    ],
)
def test_cut_at_prefix_keeps_text_before_the_next_example(raw, expected):
    assert cut_at_prefix(raw) == expected
    assert postprocess(raw, "prefix") == expected


def test_first_line_and_first_word():
    assert first_line("Paris\nRome\n\nQ: x") == "Paris"
    assert first_word(" True.\n\nDogs bark. question: x") == "True"
    assert first_word('"False," he said') == "False"
    assert first_word("\u201cNeither\u201d") == "Neither"
    assert first_word("   ") == ""
    assert postprocess("Neither! really", "first_word") == "Neither"
    assert postprocess("Paris\nRome", "first_line") == "Paris"


def test_postprocess_none_and_custom_stops():
    raw = " True\n\nQ: x"
    assert postprocess(raw, "none") == raw
    # A template's own cue can be added as a stop (here the lab WiC "yes or no?" template).
    assert postprocess("yes yes or no? answer: no", "prefix", stops=("yes or no?",)) == "yes"
    assert postprocess("a || b", "prefix", separator="||") == "a"


def test_unknown_postprocess_rule_is_a_user_error():
    with pytest.raises(UserError, match="unknown postprocess rule 'last_word'") as err:
        postprocess("x", "last_word")
    assert err.value.key == "postprocess"


def test_registered_postprocessor_is_used_until_reset():
    @register_postprocessor("upper")
    def upper(text, stops, separator):
        return cut_at_prefix(text, stops, separator).upper()

    assert postprocess("paris\n\nQ: x", "upper") == "PARIS"
    reset_registries()
    with pytest.raises(UserError):
        postprocess("x", "upper")


# ------------------------------------------------------------------------- metrics


def test_accuracy_compares_the_first_word_case_insensitively():
    preds = [" True.", "false\n\nQ: next", "Neither", "It is true"]
    refs = ["True", "False", "False", "True"]
    assert accuracy(preds, refs) == 50.0
    # Multi-word labels compare as many leading words as the label has.
    assert accuracy(["not entailment, surely", "not sure"], ["not entailment"] * 2) == 50.0
    assert accuracy(["yes"], [["Yes", "Y"]]) == 100.0


def test_normalize_answer_follows_squad():
    assert normalize_answer("The Eiffel  Tower!") == "eiffel tower"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("Rock 'n' Roll") == "rock n roll"


def test_exact_match_against_one_or_several_gold_answers():
    preds = ["The Eiffel Tower.", "paris", "London"]
    refs = [["Eiffel Tower", "Tour Eiffel"], "Paris, France", "london"]
    assert exact_match(preds, refs) == pytest.approx(200 / 3)


HYPS = ["le chat est assis sur le tapis rouge", "il fait beau aujourd'hui à paris"]
REFS = ["le chat est assis sur le tapis", "il fait très beau aujourd'hui à paris"]


def test_bleu_is_sacrebleu_corpus_bleu():
    assert bleu(HYPS, REFS) == sacrebleu.corpus_bleu(HYPS, [REFS]).score
    assert bleu(HYPS, REFS) == pytest.approx(76.2786559370994, abs=1e-9)
    assert bleu(REFS, REFS) == pytest.approx(100.0)


def test_bleu_of_a_perfect_corpus_is_exactly_100():
    """sacrebleu gives 100.00000000000004 for this corpus (the lab's German test targets, where
    a perfect model met it); normalized_average refuses anything above 100."""
    from multipromot.lab import generate

    refs = [e["target"] for e in generate("lab_trans_de", "test", 0)[:100]]
    assert sacrebleu.corpus_bleu(refs, [refs]).score > 100.0
    assert bleu(refs, refs) == 100.0


def test_bleu_with_several_references_per_example():
    second = ["le chat était assis sur le tapis rouge", None]
    expected = sacrebleu.corpus_bleu(HYPS, [REFS, second]).score
    refs = [[REFS[0], second[0]], [REFS[1]]]  # the second example has one reference only
    assert bleu(HYPS, refs) == expected == pytest.approx(80.18066206152183, abs=1e-9)


def test_rouge2_is_rouge_score_fmeasure_with_stemming():
    preds = ["hamilton won the italian grand prix", "the cats were running home"]
    golds = ["lewis hamilton won the italian grand prix on sunday", "a cat runs home"]
    scorer = rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True)
    direct = [scorer.score(g, p)["rouge2"].fmeasure for p, g in zip(preds, golds, strict=True)]
    assert rouge2(preds, golds) == pytest.approx(100 * sum(direct) / 2, abs=1e-12)
    # By hand: 5 shared bigrams, P = 5/5, R = 5/8 -> F = 10/13; "running home" and "runs home"
    # share "run home" only after stemming: P = 1/4, R = 1/3 -> F = 2/7.
    assert rouge2(preds, golds) == pytest.approx(100 * (10 / 13 + 2 / 7) / 2, abs=1e-9)
    unstemmed = rouge_scorer.RougeScorer(["rouge2"], use_stemmer=False)
    assert unstemmed.score(golds[1], preds[1])["rouge2"].fmeasure == 0.0


def test_rouge2_takes_the_best_of_several_references():
    assert rouge2(["a cat runs home"], [["dogs bark", "the cat runs home"]]) == pytest.approx(
        100
        * rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True)
        .score("the cat runs home", "a cat runs home")["rouge2"]
        .fmeasure
    )


def test_score_dispatches_by_name_and_checks_inputs():
    assert score("exact_match", ["Paris"], ["paris"]) == 100.0
    assert score("accuracy", ["False"], ["True"]) == 0.0
    assert score("bleu", HYPS, REFS) == bleu(HYPS, REFS)
    with pytest.raises(UserError, match="unknown metric 'f1'") as err:
        score("f1", ["a"], ["a"])
    assert err.value.key == "metric"
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score("accuracy", ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        score("rouge2", [], [])


def test_registered_metric_until_reset():
    @register_metric("length_match")
    def length_match(predictions, references):
        return (
            100.0
            * sum(len(p) == len(r) for p, r in zip(predictions, references, strict=True))
            / len(predictions)
        )

    assert "length_match" in list_metrics()
    assert score("length_match", ["ab", "c"], ["xy", "zz"]) == 50.0
    reset_registries()
    assert list_metrics() == ["accuracy", "bleu", "exact_match", "rouge2", "triviaqa_exact_match"]


# ------------------------------------------------------------------------- summaries

# Wang et al., arXiv 2211.00635 (ICLR 2024 version), mT5 XXL, 8 unseen tasks, each score on
# 0-100 (accuracy, exact match, BLEU, ROUGE-2). Table 3 (fine-tuned on RTE), Table 4 (on WMT14
# En-Fr) and Table 5 (multi-task RTE + En-Fr).
PAPER_ROWS = {
    "table3_pretrained_1shot": (
        {
            "cb": 46.43,
            "wic": 49.69,
            "triviaqa": 17.58,
            "web_questions": 9.70,
            "wmt16_ende": 3.97,
            "wmt16_enro": 1.82,
            "xsum": 6.41,
            "wikilingua_en": 4.59,
        },
        17.52,
    ),
    "table3_pretrained_4shot": (
        {
            "cb": 51.79,
            "wic": 49.69,
            "triviaqa": 19.02,
            "web_questions": 13.04,
            "wmt16_ende": 8.83,
            "wmt16_enro": 3.92,
            "xsum": 2.35,
            "wikilingua_en": 1.33,
        },
        18.75,
    ),
    "table3_standard_ft_1shot": (
        {
            "cb": 73.21,
            "wic": 50.00,
            "triviaqa": 0.15,
            "web_questions": 0.05,
            "wmt16_ende": 0.00,
            "wmt16_enro": 0.00,
            "xsum": 0.00,
            "wikilingua_en": 0.00,
        },
        15.43,
    ),
    "table3_promot_1shot": (
        {
            "cb": 66.07,
            "wic": 51.41,
            "triviaqa": 17.64,
            "web_questions": 11.07,
            "wmt16_ende": 2.02,
            "wmt16_enro": 0.70,
            "xsum": 7.02,
            "wikilingua_en": 4.84,
        },
        20.10,
    ),
    "table4_promot_1shot": (
        {
            "cb": 41.07,
            "wic": 50.16,
            "triviaqa": 13.63,
            "web_questions": 9.40,
            "wmt16_ende": 15.52,
            "wmt16_enro": 18.54,
            "xsum": 1.49,
            "wikilingua_en": 1.14,
        },
        18.87,
    ),
    "table5_multi_promot_1shot": (
        {
            "cb": 83.93,
            "wic": 51.41,
            "triviaqa": 16.99,
            "web_questions": 10.04,
            "wmt16_ende": 18.83,
            "wmt16_enro": 18.41,
            "xsum": 4.50,
            "wikilingua_en": 2.89,
        },
        25.88,
    ),
}


@pytest.mark.parametrize("row", sorted(PAPER_ROWS))
def test_normalized_average_reproduces_the_papers_norm_avg(row):
    scores, published = PAPER_ROWS[row]
    assert len(scores) == 8
    # The mean of the printed entries, rounded half up to the paper's two decimals, is the
    # printed Norm. Avg. (Table 5's mean is 25.875; the 1e-9 undoes its float representation).
    assert round(normalized_average(scores) + 1e-9, 2) == published


def test_normalized_average_hand_computed_with_and_without_baseline():
    scores = {"cb": 50.0, "qa": 20.0}
    assert normalized_average(scores) == 35.0
    # BIG-bench normalized preferred metric: cb 100 * (50 - 100/3) / (100 - 100/3) = 25.
    assert normalized_average(scores, {"cb": 100 / 3, "qa": 0.0}) == pytest.approx(22.5)
    # Below random is negative: 100 * (40 - 50) / 50 = -20.
    assert normalized_average({"wic": 40.0}, {"wic": 50.0}) == pytest.approx(-20.0)


def test_normalized_average_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        normalized_average({})
    with pytest.raises(ValueError, match="0-100 scale"):
        normalized_average({"bleu": 140.0})
    with pytest.raises(ValueError, match="no random baseline for task 'qa'"):
        normalized_average({"qa": 10.0}, {"cb": 33.3})
    with pytest.raises(ValueError, match=r"must be in \[0, 100\)"):
        normalized_average({"qa": 10.0}, {"qa": 100.0})


def test_specialization_rate_counts_outputs_in_the_answer_set():
    outputs = [
        "True",
        " false.\n\nQ: Who wrote Hamlet? A: True",
        "Paris",
        "True or not",
        "<extra_id_0> False <extra_id_1> Paris",
        "\n\nQ: True",  # the model opened a new example: no answer, not counted
        "Truest",
        "",
    ]
    assert specialization_rate(outputs, {"True", "False"}) == 50.0
    assert specialization_rate(["positive", "Negative."], ["negative", "positive"]) == 100.0
    with pytest.raises(ValueError, match="at least one output"):
        specialization_rate([], {"True"})
    with pytest.raises(ValueError, match="non-empty answer set"):
        specialization_rate(["True"], {" "})


def test_metrics_module_exports():
    for name in metrics.__all__:
        assert hasattr(metrics, name)
