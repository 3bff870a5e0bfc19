"""Output post-processing and the paper's metrics, all on a 0-100 scale.

The paper (Wang et al., "Two-stage LLM Fine-tuning with Less Specialization and More
Generalization", arXiv 2211.00635, Sec. 5.1 and App. B.2) scores classification by accuracy,
closed-book QA by exact match, translation by BLEU and summarization by ROUGE-2, and summarises
the unseen tasks by a "Norm. Avg.". Before scoring, App. B.2 trims each generated text: keep the
span between the ``<extra_id_0>`` and ``<extra_id_1>`` sentinels, drop everything from the next
example's prefix token on (``Q:``, ``Translate``, ``Article:``; the paper counts the prompt's own
prefix as the first, so in a continuation alone it is the first one found), and for
classification (RTE, CB, WiC) look only at whether the first output token is a label.

Post-processing rules are looked up by the name a task stores (``Task.postprocess``):

- ``none``: the text unchanged.
- ``prefix``: the paper's rule: the sentinel span, cut at the exemplar separator or the next
  input prefix, stripped (the default for generative tasks).
- ``first_line``: ``prefix``, then only the first line.
- ``first_word``: ``first_line``, then the first word with surrounding punctuation stripped
  (classification).
"""

from __future__ import annotations

import os
import re
import string
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from multipromot.errors import UserError
from multipromot.features import SEPARATOR
from multipromot.registry import Registry

__all__ = [
    "DEFAULT_STOPS",
    "cut_at_prefix",
    "first_line",
    "first_word",
    "postprocess",
    "register_postprocessor",
    "check_postprocessor",
    "normalize_answer",
    "accuracy",
    "exact_match",
    "bleu",
    "rouge2",
    "score",
    "item_values",
    "item_scores",
    "scores_items",
    "score_values",
    "register_metric",
    "list_metrics",
    "check_metric",
    "reset_registries",
    "normalized_average",
    "specialization_rate",
]

# The input prefixes of the paper's templates (App. B.1, Table 7): a model that goes on writing
# after its answer starts the next example with one of these. Case-sensitive on purpose: "Q:" is
# a prefix, "q:" inside an answer is not.
DEFAULT_STOPS: tuple[str, ...] = ("Q:", "Translate ", "Article:", "question:", "answer:")

# Same value as ``multipromot.data.exemplars.SEPARATOR`` (a test checks it); not imported from there
# because that module pulls in the collator and the tokenizer stack, and metrics must stay light.

_SENTINEL = re.compile(r"<extra_id_\d+>")
# string.punctuation is ASCII only; model outputs also carry typographic quotes and ellipses.
_PUNCT = string.punctuation + "\u2018\u2019\u201c\u201d\u00ab\u00bb\u2026\u00bf\u00a1"
_PUNCT_TABLE = str.maketrans("", "", _PUNCT)
_ARTICLES = re.compile(r"\b(a|an|the)\b")

Reference = str | Sequence[str]


# ---------------------------------------------------------------------------------------------
# Post-processing
# ---------------------------------------------------------------------------------------------


def _sentinel_span(text: str) -> str:
    """The text between ``<extra_id_0>`` and the next sentinel (T5 span-corruption outputs)."""
    head = text.split("<extra_id_0>", 1)
    text = head[1] if len(head) == 2 else head[0]
    match = _SENTINEL.search(text)
    return text[: match.start()] if match else text


def cut_at_prefix(
    text: str, stops: Sequence[str] = DEFAULT_STOPS, separator: str = SEPARATOR
) -> str:
    """The paper's output trimming (App. B.2): keep the text before the model starts a new example.

    Args:
        text: a generated continuation (new tokens only, not the prompt).
        stops: input prefixes that open an example (the template's own cues).
        separator: the exemplar separator of k-shot prompts.

    Returns:
        The sentinel span of ``text`` cut at the first separator or stop prefix, stripped.
        Empty when the model opened a new example straight away.
    """
    text = _sentinel_span(text).strip()
    cut = len(text)
    for marker in (separator, *stops):
        if marker:
            pos = text.find(marker)
            if pos != -1:
                cut = min(cut, pos)
    return text[:cut].strip()


def first_line(text: str, stops: Sequence[str] = DEFAULT_STOPS, separator: str = SEPARATOR) -> str:
    """:func:`cut_at_prefix`, then the first line only.

    Args:
        text: a generated continuation.
        stops: input prefixes that open an example.
        separator: the exemplar separator.

    Returns:
        The first line of the trimmed text, stripped.
    """
    return cut_at_prefix(text, stops, separator).split("\n", 1)[0].strip()


def _strip_punct(word: str) -> str:
    return word.strip(_PUNCT)


def first_word(text: str, stops: Sequence[str] = DEFAULT_STOPS, separator: str = SEPARATOR) -> str:
    """The classification rule: the first word of the trimmed output, punctuation stripped.

    Args:
        text: a generated continuation.
        stops: input prefixes that open an example.
        separator: the exemplar separator.

    Returns:
        ``"True"`` for ``" True.\\n\\nP question: ..."``; ``""`` when there is no word.
    """
    words = first_line(text, stops, separator).split()
    return _strip_punct(words[0]) if words else ""


def _no_postprocess(
    text: str, stops: Sequence[str] = DEFAULT_STOPS, separator: str = SEPARATOR
) -> str:
    return text


Postprocessor = Callable[..., str]
_POSTPROCESSORS: Registry[Postprocessor] = Registry(
    "postprocess",
    {
        "none": _no_postprocess,
        "prefix": cut_at_prefix,
        "first_line": first_line,
        "first_word": first_word,
    },
    suggestions=1,
)


def register_postprocessor(
    name: str, *, replace: bool = False
) -> Callable[[Postprocessor], Postprocessor]:
    """Decorator: make ``fn(text, stops, separator) -> str`` available to tasks as ``name``.

    Args:
        name: the name a task's ``postprocess`` key uses.
        replace: allow replacing another rule registered under ``name`` (a built-in one too).

    Returns:
        The decorator (it returns the function unchanged).

    Raises:
        UserError: (from the decorator) the name is taken and ``replace`` is False.
    """

    def add(fn: Postprocessor) -> Postprocessor:
        return _POSTPROCESSORS.register(name, fn, replace=replace)

    return add


def check_postprocessor(
    name: str, *, file: str | os.PathLike | None = None, key: str | None = None
) -> str:
    """``name`` if it is a known post-processing rule.

    Raises:
        UserError: unknown name, with the closest one (``unknown postprocess 'X'; did you
            mean Y?``), naming ``file`` and ``key``.
    """
    _POSTPROCESSORS.lookup(name, file=file, key=key)
    return name


def postprocess(
    text: str,
    name: str = "prefix",
    *,
    stops: Sequence[str] = DEFAULT_STOPS,
    separator: str = SEPARATOR,
) -> str:
    """Apply the post-processing rule a task names to one generated text.

    Args:
        text: a generated continuation.
        name: ``none``, ``prefix``, ``first_line``, ``first_word`` or a registered name.
        stops: input prefixes that open an example (pass a template's own cues to add them).
        separator: the exemplar separator.

    Returns:
        The processed text.

    Raises:
        UserError: unknown rule name.
    """
    fn = _POSTPROCESSORS.get(name)
    if fn is None:
        raise UserError(
            f"unknown postprocess rule {name!r}; known: {', '.join(_POSTPROCESSORS.names())}",
            key="postprocess",
        )
    return fn(text, stops, separator)


# ---------------------------------------------------------------------------------------------
# Metrics (each returns 0-100)
# ---------------------------------------------------------------------------------------------


def _as_list(reference: Reference) -> list[str]:
    return [reference] if isinstance(reference, str) else list(reference)


def _check_lengths(predictions: Sequence[str], references: Sequence[Reference]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")


def _words(text: str) -> list[str]:
    return [w for w in (_strip_punct(x).casefold() for x in text.split()) if w]


def _label_matches(prediction: str, answer: str) -> bool:
    # As many leading words as the answer has: one for "True", two for "not entailment".
    gold = _words(answer)
    return bool(gold) and _words(first_line(prediction))[: len(gold)] == gold


def accuracy(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Classification accuracy: the output's first word against the answer, case-insensitive.

    Args:
        predictions: model outputs (raw or post-processed; the first word is taken here).
        references: the gold label per example, or several acceptable labels.

    Returns:
        Percentage of examples whose first word(s) equal a gold label (0-100).

    Raises:
        ValueError: lengths differ or there is nothing to score.
    """
    _check_lengths(predictions, references)
    hits = sum(
        any(_label_matches(p, a) for a in _as_list(r))
        for p, r in zip(predictions, references, strict=True)
    )
    return 100.0 * hits / len(predictions)


def normalize_answer(text: str) -> str:
    """SQuAD / TriviaQA answer normalisation: lowercase, no punctuation, articles or extra spaces.

    Args:
        text: an answer string.

    Returns:
        The normalised string (``"The Eiffel  Tower!"`` -> ``"eiffel tower"``).
    """
    text = text.lower().translate(_PUNCT_TABLE)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Exact match after :func:`normalize_answer`, against one or several gold answers.

    Args:
        predictions: post-processed outputs.
        references: a gold answer per example, or a list of aliases (TriviaQA).

    Returns:
        Percentage of predictions equal to any normalised gold answer (0-100).

    Raises:
        ValueError: lengths differ or there is nothing to score.
    """
    return _matches(predictions, references, normalize_answer)


def _matches(
    predictions: Sequence[str], references: Sequence[Reference], normalize: Callable[[str], str]
) -> float:
    """Percentage of predictions equal to any of their references once both are normalised."""
    _check_lengths(predictions, references)
    hits = sum(
        normalize(p) in {normalize(a) for a in _as_list(r)}
        for p, r in zip(predictions, references, strict=True)
    )
    return 100.0 * hits / len(predictions)


_TRIVIAQA_PUNCT = str.maketrans({c: " " for c in string.punctuation + "\u2018\u2019\u00b4`"})


def normalize_triviaqa(text: str) -> str:
    """TriviaQA's official answer normalisation: lowercase, punctuation (and ``_``, curly
    quotes, accents) to spaces, articles dropped, whitespace collapsed.

    Unlike :func:`normalize_answer` (SQuAD), punctuation becomes a space, so ``"well-known"``
    matches ``"well known"``.
    """
    text = text.lower().translate(_TRIVIAQA_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def triviaqa_exact_match(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Exact match with TriviaQA's normalisation (:func:`normalize_triviaqa`) against any of an
    example's answers (its aliases and normalised aliases), 0-100.

    Raises:
        ValueError: lengths differ or there is nothing to score.
    """
    return _matches(predictions, references, normalize_triviaqa)


def bleu(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Corpus BLEU from sacrebleu (13a tokenisation, exp smoothing: sacrebleu's defaults).

    Args:
        predictions: post-processed translations.
        references: a reference per example, or several (missing ones are allowed).

    Returns:
        ``sacrebleu.corpus_bleu(...).score`` (0-100).

    Raises:
        ValueError: lengths differ or there is nothing to score.
    """
    _check_lengths(predictions, references)
    refs = [_as_list(r) for r in references]
    streams = max(len(r) for r in refs)
    # sacrebleu wants one stream per reference index; None marks "no reference here".
    ref_streams = [[r[i] if i < len(r) else None for r in refs] for i in range(streams)]
    import sacrebleu  # deferred: imports slowly (a mixture's tasks load without scoring)

    value = float(sacrebleu.corpus_bleu(list(predictions), ref_streams).score)
    # exp(mean log precision) of a perfect corpus can round to 100.00000000000004
    return min(value, 100.0)


_ROUGE2 = None  # rouge_score's RougeScorer, built on first use


def rouge2(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """Mean ROUGE-2 F-measure from rouge-score, with Porter stemming (as for XSum), times 100.

    rouge-score's default tokenizer keeps only ``[a-z0-9]`` tokens: fine for English
    summaries (XSum, WikiLingua/en), not for other scripts.

    Args:
        predictions: post-processed summaries.
        references: a reference per example, or several (the best one counts).

    Returns:
        Average over examples of the F-measure (0-100).

    Raises:
        ValueError: lengths differ or there is nothing to score.
    """
    global _ROUGE2
    _check_lengths(predictions, references)
    if _ROUGE2 is None:  # building the stemmer once keeps per-call cost low
        # deferred: rouge_score imports nltk and scipy, seconds (a mixture loads without them)
        from rouge_score import rouge_scorer

        _ROUGE2 = rouge_scorer.RougeScorer(["rouge2"], use_stemmer=True)
    total = 0.0
    for p, r in zip(predictions, references, strict=True):
        total += max(_ROUGE2.score(a, p)["rouge2"].fmeasure for a in _as_list(r))
    return 100.0 * total / len(predictions)


Metric = Callable[[Sequence[str], Sequence[Reference]], float]
# The built-in metrics: each item has a score of its own (item_scores).
_BUILTIN_METRICS: dict[str, Metric] = {
    "accuracy": accuracy,
    "exact_match": exact_match,
    "triviaqa_exact_match": triviaqa_exact_match,
    "bleu": bleu,
    "rouge2": rouge2,
}
_METRICS: Registry[Metric] = Registry("metric", _BUILTIN_METRICS, suggestions=1)


def register_metric(name: str, *, replace: bool = False) -> Callable[[Metric], Metric]:
    """Decorator: make ``fn(predictions, references) -> float (0-100)`` a metric named ``name``.

    Args:
        name: the name a task's ``metric`` key uses.
        replace: allow replacing another metric registered under ``name`` (a built-in one too).

    Returns:
        The decorator (it returns the function unchanged).

    Raises:
        UserError: (from the decorator) the name is taken and ``replace`` is False.
    """

    def add(fn: Metric) -> Metric:
        return _METRICS.register(name, fn, replace=replace)

    return add


def list_metrics() -> list[str]:
    """Names of all known metrics, sorted."""
    return _METRICS.names()


def check_metric(
    name: str, *, file: str | os.PathLike | None = None, key: str | None = None
) -> str:
    """``name`` if it is a known metric.

    Raises:
        UserError: unknown name, with the closest one (``unknown metric 'X'; did you mean
            Y?``), naming ``file`` and ``key``.
    """
    _METRICS.lookup(name, file=file, key=key)
    return name


def reset_registries() -> None:
    """Forget registered metrics and post-processing rules; keep the built-in ones (for tests)."""
    _METRICS.reset()
    _POSTPROCESSORS.reset()


def score(metric_name: str, predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """A task's metric by name, on a 0-100 scale.

    Args:
        metric_name: ``accuracy``, ``exact_match``, ``bleu``, ``rouge2`` or a registered name.
        predictions: post-processed outputs.
        references: gold answers (one or several per example).

    Returns:
        The score (0-100).

    Raises:
        UserError: unknown metric name.
        ValueError: lengths differ or there is nothing to score.
    """
    fn = _METRICS.get(metric_name)
    if fn is None:
        raise UserError(
            f"unknown metric {metric_name!r}; known: {', '.join(list_metrics())}", key="metric"
        )
    return float(fn(predictions, references))


# ---------------------------------------------------------------------------------------------
# Per-item values: what each item contributes to a task's score (for intervals)
# ---------------------------------------------------------------------------------------------


def _bleu_streams(references: Sequence[Reference]) -> list[list[str | None]]:
    refs = [_as_list(r) for r in references]
    streams = max(len(r) for r in refs)
    return [[r[i] if i < len(r) else None for r in refs] for i in range(streams)]


def item_values(
    metric_name: str, predictions: Sequence[str], references: Sequence[Reference]
) -> list[list[float]] | None:
    """Each item's contribution to the task's score, so that any subset of items can be scored
    again (:func:`score_values`): ``[score]`` per item for a metric that is a mean over items
    (accuracy, exact match, ROUGE-2), sacrebleu's sufficient statistics per sentence (lengths
    and n-gram counts) for corpus BLEU.

    Returns:
        One list of numbers per item, or None when the metric (a registered one) is not the
        mean of its per-item values on these items: no interval can then be computed.
    """
    check_metric(metric_name)
    if metric_name == "bleu":
        import sacrebleu  # deferred: imports slowly (a mixture's tasks load without scoring)

        stats = sacrebleu.BLEU()._extract_corpus_statistics(
            list(predictions), _bleu_streams(references)
        )
        return [[float(x) for x in row] for row in stats]
    fn = _METRICS.get(metric_name)
    values = [[float(fn([p], [r]))] for p, r in zip(predictions, references, strict=True)]
    whole = score(metric_name, predictions, references)
    if abs(float(np.mean(values)) - whole) > 1e-6 * max(1.0, abs(whole)):
        return None
    return values


def scores_items(metric_name: str) -> bool:
    """Whether a metric gives every item a 0-100 score of its own, known before any output is
    seen: the built-in ones (a registered metric may be a corpus statistic that is no mean of
    per-item scores; :func:`item_values` can only tell once it has outputs)."""
    return _METRICS.get(metric_name) is _BUILTIN_METRICS.get(metric_name, object())


def item_scores(
    metric_name: str, predictions: Sequence[str], references: Sequence[Reference]
) -> list[float] | None:
    """Each item's own score (0-100): its :func:`item_values` row scored alone (for BLEU the
    sentence's BLEU from its statistics, the other built-in metrics' per-item value).

    Returns:
        One score per item, or None when the metric has no per-item values.
    """
    values = item_values(metric_name, predictions, references)
    if values is None:
        return None
    return [score_values(metric_name, np.asarray([row], dtype=float)) for row in values]


def score_values(metric_name: str, values: np.ndarray) -> float:
    """The task's score (0-100) on a subset of items, from their :func:`item_values` rows; on
    all the items it equals :func:`score`."""
    if metric_name == "bleu":
        import sacrebleu  # deferred: imports slowly (a mixture's tasks load without scoring)

        totals = [int(round(x)) for x in np.asarray(values).sum(axis=0)]
        return min(float(sacrebleu.BLEU()._compute_score_from_stats(totals).score), 100.0)
    return float(np.mean(values))


# ---------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------


def normalized_average(
    scores: Mapping[str, float], random_baseline: Mapping[str, float] | None = None
) -> float:
    """The paper's "Norm. Avg.": the mean of per-task scores that are already on 0-100.

    With ``random_baseline`` each score is first rescaled as BIG-bench's normalized preferred
    metric, ``100 * (s - r) / (100 - r)`` (0 = random guessing, 100 = perfect; below random is
    negative), then averaged. The paper's tables are reproduced without a baseline: e.g.
    pretrained mT5 XXL, 1-shot, Table 3 averages to 17.52.

    Args:
        scores: ``{task: score}``, each in [0, 100].
        random_baseline: ``{task: random-guess score}`` in [0, 100), for every task in ``scores``.

    Returns:
        The average (0-100, or below 0 with a baseline when tasks score under random).

    Raises:
        ValueError: no scores, a score outside [0, 100], or a bad or missing baseline.
    """
    if not scores:
        raise ValueError("normalized_average needs at least one task score")
    values = []
    for task, s in scores.items():
        if not 0.0 <= s <= 100.0:
            raise ValueError(f"score of {task!r} is {s}; scores must be on a 0-100 scale")
        if random_baseline is not None:
            if task not in random_baseline:
                raise ValueError(f"no random baseline for task {task!r}")
            r = random_baseline[task]
            if not 0.0 <= r < 100.0:
                raise ValueError(f"random baseline of {task!r} is {r}; it must be in [0, 100)")
            s = 100.0 * (s - r) / (100.0 - r)
        values.append(s)
    return sum(values) / len(values)


def specialization_rate(
    outputs: Sequence[str],
    answer_set: Sequence[str] | set[str],
    *,
    stops: Sequence[str] = DEFAULT_STOPS,
    separator: str = SEPARATOR,
) -> float:
    """Format specialization: share of outputs that fall into a fine-tuned task's answer set.

    The paper's Figure 2 counts 1-shot TriviaQA outputs that are "True" or "False" after RTE
    fine-tuning. Here an output counts when its post-processed first word (:func:`first_word`)
    equals an answer, case-insensitive.

    Args:
        outputs: generated texts of some other task.
        answer_set: the fine-tuned task's labels, e.g. ``{"True", "False"}``.
        stops: input prefixes that open an example.
        separator: the exemplar separator.

    Returns:
        Percentage of outputs in the answer set (0-100).

    Raises:
        ValueError: no outputs, or an empty answer set.
    """
    if not outputs:
        raise ValueError("specialization_rate needs at least one output")
    answers = {_strip_punct(a.strip()).casefold() for a in answer_set}
    answers.discard("")
    if not answers:
        raise ValueError("specialization_rate needs a non-empty answer set")
    hits = sum(first_word(o, stops, separator).casefold() in answers for o in outputs)
    return 100.0 * hits / len(outputs)
