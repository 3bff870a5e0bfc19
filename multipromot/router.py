"""Router: which bank prompt (or none) to prepend to each input.

ProMoT prepends a task's soft prompt only to inputs in that task's format and feeds every other
input to the fine-tuned model bare (paper, arXiv 2211.00635, Sec. 4, "Evaluation"). The router
makes that call per input, in a fixed order of small strategies (each a :class:`RouteStrategy`);
the first one that decides wins:

1. :class:`ExplicitTask`: the caller named the task.
2. :class:`SignatureMatch`: the input is written in a bank task's template. Each task carries a
   ``templates.FormatSignature`` (the template's literal pieces, in order, and its answers).
   A k-shot prompt is ``exemplar SEP ... SEP input``; the signature must match the final input
   *and* every exemplar (an exemplar ends with one of the task's answers when it has some). A
   prompt whose final input is a bank task's but whose exemplars show another format is routed
   to none: its exemplars ask for a different output format than the prompt was tuned on.
3. :class:`SimilarityFallback`: for bank tasks without a signature (by default), character n-gram
   TF-IDF similarity to the task's example inputs, with a per-task abstain threshold calibrated
   on those examples against inputs of other formats. Every part of a k-shot prompt (each
   exemplar and the final input) must look like the task.

An input no strategy claims gets no prompt (``task=None``). Routing is deterministic.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from multipromot.errors import BankError, UserError
from multipromot.templates import FormatSignature

__all__ = [
    "DEFAULT_SEPARATOR",
    "signature_from_dict",
    "Route",
    "RouterEntry",
    "RouteStrategy",
    "ExplicitTask",
    "SignatureMatch",
    "SimilarityFallback",
    "Router",
    "evaluate_routing",
]

# Same value as ``multipromot.exemplars.SEPARATOR`` (a test checks it). Not imported: that module
# pulls in the collator and tokenizer stack, and ``multipromot route`` should start fast.
DEFAULT_SEPARATOR = "\n\n"


def signature_from_dict(data: Any, *, key: str | None = None) -> FormatSignature | None:
    """A signature from a bank entry's ``meta["format"]["signature"]`` (or a signature object).

    Args:
        data: ``{"pieces": [...], "answers": [...] | None}``, an object with ``.pieces`` and
            ``.answers``, or None.
        key: the bank entry, for error messages.

    Returns:
        The signature, or None when ``data`` is None or has no non-blank piece (such a template
        has no literal text to recognise it by).

    Raises:
        BankError: ``data`` is not of that shape.
    """
    if data is None:
        return None
    if isinstance(data, Mapping):
        pieces, answers = data.get("pieces"), data.get("answers")
    elif hasattr(data, "pieces"):
        pieces, answers = data.pieces, getattr(data, "answers", None)
    else:
        raise BankError("format.signature must be {pieces: [...], answers: [...]}", key=key)
    if not isinstance(pieces, Sequence) or isinstance(pieces, str):
        raise BankError("format.signature.pieces must be a list of strings", key=key)
    if answers is not None and (not isinstance(answers, Sequence) or isinstance(answers, str)):
        raise BankError("format.signature.answers must be a list of strings or null", key=key)
    if not all(isinstance(p, str) for p in pieces) or not all(
        isinstance(a, str) for a in answers or ()
    ):
        raise BankError("format.signature holds a value that is not a string", key=key)
    if not any(p.strip() for p in pieces):
        return None
    return FormatSignature(pieces=tuple(pieces), answers=tuple(answers) if answers else None)


@dataclass(frozen=True)
class Route:
    """The router's decision for one input.

    Attributes:
        task: the bank task whose prompt to prepend, or None for no prompt.
        reason: one line saying which strategy decided and why.
        score: the strategy's confidence: 1.0 for explicit and signature decisions, the cosine
            similarity for the similarity fallback, 0.0 when nothing matched.
    """

    task: str | None
    reason: str
    score: float

    def to_json(self, text: str | None = None) -> dict:
        """The decision as ``multipromot route --json`` prints it.

        Args:
            text: the routed input.

        Returns:
            ``{"input": text, "task": task or None, "reason": ..., "score": ...}``.
        """
        return {"input": text, "task": self.task, "reason": self.reason, "score": self.score}


@dataclass
class RouterEntry:
    """One bank task as the router sees it.

    Attributes:
        task: the task name.
        signature: its input format (``Template.signature``), or None if unknown.
        examples: its validation inputs (0-shot), for the similarity fallback and to learn
            whether the template starts and ends with a literal piece.
    """

    task: str
    signature: FormatSignature | None = None
    examples: list[str] = field(default_factory=list)


@runtime_checkable
class RouteStrategy(Protocol):
    """One way of deciding. Return a :class:`Route` to decide an input, None to pass it on."""

    name: str

    def decide(self, texts: Sequence[str], requested: Sequence[str | None]) -> list[Route | None]:
        """Decide the inputs this strategy can.

        Args:
            texts: the inputs still undecided.
            requested: the caller's explicit task per input (None = let the router decide).

        Returns:
            One entry per input: a Route, or None to leave it to the next strategy.
        """
        ...


# ============================================================================ explicit


class ExplicitTask:
    """Strategy 1: a task the caller named wins, if the bank has it."""

    name = "explicit"

    def __init__(self, tasks: Sequence[str]):
        self.tasks = frozenset(tasks)

    def decide(self, texts: Sequence[str], requested: Sequence[str | None]) -> list[Route | None]:
        """See :class:`RouteStrategy`.

        Raises:
            UserError: a requested task is not in the bank.
        """
        routes: list[Route | None] = []
        for task in requested:
            if task is None:
                routes.append(None)
            elif task not in self.tasks:
                known = ", ".join(sorted(self.tasks)) or "none"
                raise UserError(f"task is not in the router's bank (tasks: {known})", key=task)
            else:
                routes.append(Route(task, "explicit: named by the caller", 1.0))
        return routes


# ============================================================================ signature


@dataclass(frozen=True)
class _Format:
    """A signature compiled for matching, with what the task's examples show about its layout.

    Attributes:
        pieces: one regex per piece; any whitespace run of the input matches a piece's space
            (``templates.FormatSignature`` pieces are whitespace-normalised, inputs are not).
        answers: casefolded answer choices, or None.
        starts_with_piece / ends_with_piece: every example starts / ends with a piece, so an
            input must too (without examples: not required).
        sep_before / sep_after: every example has the separator right before / after piece i,
            i.e. the template itself puts it there (without examples: never).
        specificity: characters of literal text, to prefer the stricter of two fitting formats.
        max_chunks: how many separator-delimited chunks one input or exemplar can span.
    """

    task: str
    pieces: tuple[re.Pattern[str], ...]
    answers: frozenset[str] | None
    starts_with_piece: bool
    ends_with_piece: bool
    sep_before: tuple[bool, ...]
    sep_after: tuple[bool, ...]
    specificity: int
    max_chunks: int


def _piece_words(entry: RouterEntry) -> list[list[str]]:
    """The signature's pieces as word lists, blank pieces dropped ([] = no usable signature)."""
    pieces = entry.signature.pieces if entry.signature else ()
    return [words for words in (p.split() for p in pieces) if words]


def _compile(entry: RouterEntry, sep: str) -> _Format | None:
    words = _piece_words(entry)
    if not words:
        return None
    pieces = tuple(re.compile(r"\s+".join(re.escape(w) for w in ws)) for ws in words)
    last_at_end = re.compile(pieces[-1].pattern + r"\Z")
    examples = [x.strip() for x in entry.examples if x.strip()]
    located = [(x, spans) for x in examples if (spans := _plain_spans(x, pieces)) is not None]

    def always(test) -> bool:
        return bool(sep) and bool(located) and all(test(x, spans) for x, spans in located)

    n = len(pieces)
    sep_before = tuple(
        always(lambda x, spans, i=i: x[: spans[i][0]].rstrip(" \t").endswith(sep)) for i in range(n)
    )
    sep_after = tuple(
        always(lambda x, spans, i=i: x[spans[i][1] :].lstrip(" \t").startswith(sep))
        for i in range(n)
    )
    answers = entry.signature.answers
    return _Format(
        task=entry.task,
        pieces=pieces,
        answers=frozenset(a.strip().casefold() for a in answers) if answers else None,
        starts_with_piece=bool(examples) and all(pieces[0].match(x) for x in examples),
        ends_with_piece=bool(examples) and all(last_at_end.search(x) for x in examples),
        sep_before=sep_before,
        sep_after=sep_after,
        specificity=sum(len(w) for ws in words for w in ws),
        # Chunks split where the template puts a separator or a piece's space holds one.
        max_chunks=1 + sum(sep_before) + sum(sep_after) + sum(len(ws) - 1 for ws in words),
    )


def _plain_spans(text: str, pieces: Sequence[re.Pattern[str]]) -> list[tuple[int, int]] | None:
    """Leftmost in-order spans of the pieces in ``text``, or None if one is missing."""
    spans, pos = [], 0
    for piece in pieces:
        match = piece.search(text, pos)
        if match is None:
            return None
        spans.append(match.span())
        pos = match.end()
    return spans


def _clear(field_text: str, sep: str, sep_at_start: bool, sep_at_end: bool) -> bool:
    """Whether text between pieces holds no separator, apart from one the template puts there.

    A k-shot prompt's parts are joined by ``sep``, so a separator inside a field means the text
    runs across two parts: this is what keeps another format's exemplar from passing as a field.
    """
    if not sep:
        return True
    if sep_at_start and (rest := field_text.lstrip(" \t")).startswith(sep):
        field_text = rest[len(sep) :]
    if sep_at_end and (rest := field_text.rstrip(" \t")).endswith(sep):
        field_text = rest[: -len(sep)]
    return sep not in field_text


def _split_pieces(unit: str, fmt: _Format, sep: str) -> tuple[str, str] | None:
    """``(head, tail)``: the text before the first and after the last piece, if the pieces occur
    in order and no field (text around them) holds a stray separator."""
    first = fmt.pieces[0].search(unit)
    if first is None or not _clear(unit[: first.start()], sep, False, fmt.sep_before[0]):
        return None
    pos, last = first.end(), len(fmt.pieces) - 1
    for i in range(1, last + 1):
        after, before = fmt.sep_after[i - 1], fmt.sep_before[i]
        match = fmt.pieces[i].search(unit, pos)
        if match is None or not _clear(unit[pos : match.start()], sep, after, before):
            return None
        if i == last:
            # The last piece is taken as late as the field rules allow: a question that happens
            # to contain "A:" must not end the "Q: ... A:" template early.
            for later in fmt.pieces[i].finditer(unit, match.end()):
                if not _clear(unit[pos : later.start()], sep, after, before):
                    break
                match = later
        pos = match.end()
    tail = unit[pos:]
    if not _clear(tail, sep, fmt.sep_after[-1], False):
        return None
    return unit[: first.start()], tail


def _is_input(unit: str, fmt: _Format, sep: str) -> bool:
    """Whether ``unit`` is an input of the format (what the model is asked to complete)."""
    parts = _split_pieces(unit, fmt, sep)
    if parts is None:
        return False
    head, tail = parts
    if fmt.starts_with_piece and head.strip():
        return False
    return not (fmt.ends_with_piece and tail.strip())


def _is_exemplar(unit: str, fmt: _Format, sep: str) -> bool:
    """Whether ``unit`` is a solved example of the format: its input, then a target."""
    parts = _split_pieces(unit, fmt, sep)
    if parts is None:
        return False
    head, tail = parts
    if fmt.starts_with_piece and head.strip():
        return False
    target = tail.strip()
    if not target:
        return False
    if fmt.answers is None:
        return True
    if fmt.ends_with_piece:
        return target.casefold() in fmt.answers
    # The answer closes the exemplar as a whole word: "untrue" does not end with answer "true".
    folded = target.casefold()
    return any(
        folded == a or (folded.endswith(a) and not folded[-len(a) - 1].isalnum())
        for a in fmt.answers
    )


def _parse_kshot(text: str, fmt: _Format, sep: str) -> tuple[bool, int | None]:
    """Match a whole (possibly k-shot) prompt against one format.

    Returns:
        ``(input_matched, shots)``: whether some suffix of ``text`` that starts at a ``sep``
        boundary is an input of the format, and the number of exemplars in front of it when
        everything before that suffix splits into exemplars of the same format (else None).
    """
    chunks = text.split(sep) if sep else [text]
    span = fmt.max_chunks
    n = len(chunks)
    # shots[j] = number of exemplars that chunks[:j] splits into, or None if it does not.
    shots: list[int | None] = [0] + [None] * n
    for end in range(1, n + 1):
        for start in range(max(0, end - span), end):
            if shots[start] is not None and _is_exemplar(sep.join(chunks[start:end]), fmt, sep):
                shots[end] = shots[start] + 1
                break
    input_matched = False
    best: int | None = None
    for start in range(n - 1, max(-1, n - 1 - span), -1):
        if _is_input(sep.join(chunks[start:]), fmt, sep):
            input_matched = True
            if shots[start] is not None:
                best = shots[start] if best is None else max(best, shots[start])
    return input_matched, best


class SignatureMatch:
    """Strategy 2: the input (and each of its exemplars) is written in a bank task's template.

    Decides an input when a task matches (``score`` 1.0), and decides *none* when the final
    input matches a task but its exemplars do not (a k-shot prompt of another format). Inputs
    that match no task at all are passed on.
    """

    name = "signature"

    def __init__(self, entries: Sequence[RouterEntry], separator: str = DEFAULT_SEPARATOR):
        self.separator = separator
        self.formats = [f for f in (_compile(e, separator) for e in entries) if f is not None]

    def _decide_one(self, text: str) -> Route | None:
        text = text.strip()
        matched: list[tuple[_Format, int]] = []
        other_exemplars: list[str] = []
        for fmt in self.formats:
            if fmt.pieces[0].search(text) is None:  # cheap reject before the k-shot parse
                continue
            input_ok, shots = _parse_kshot(text, fmt, self.separator)
            if shots is not None:
                matched.append((fmt, shots))
            elif input_ok:
                other_exemplars.append(fmt.task)
        if matched:
            # Most literal text wins when one template's pieces also fit another's inputs.
            matched.sort(key=lambda m: (-m[0].specificity, m[0].task))
            fmt, shots = matched[0]
            reason = f"signature: {fmt.task} format ({shots}-shot)"
            if len(matched) > 1:
                reason += f"; also fits {', '.join(m[0].task for m in matched[1:])}"
            return Route(fmt.task, reason, 1.0)
        if other_exemplars:
            tasks = ", ".join(other_exemplars)
            return Route(None, f"signature: input in {tasks} format, exemplars are not", 0.0)
        return None

    def decide(self, texts: Sequence[str], requested: Sequence[str | None]) -> list[Route | None]:
        """See :class:`RouteStrategy`."""
        return [self._decide_one(t) for t in texts]


# ============================================================================ similarity

_NGRAMS = (3, 4, 5)
_DIM = 1 << 18  # hash buckets; vectors stay sparse, so only the centroids pay for the size
_CHUNK = 4096  # texts per vectorising pass: bounds memory, and _CHUNK * _DIM < 2**31
_FNV_OFFSET = np.uint64(14695981039346656037)
_FNV_PRIME = np.uint64(1099511628211)


@dataclass(frozen=True)
class _Sparse:
    """Rows of a sparse matrix in coordinate form: ``value`` at (``row``, ``col``)."""

    n_rows: int
    row: np.ndarray
    col: np.ndarray
    value: np.ndarray

    def dot(self, dense: np.ndarray) -> np.ndarray:
        """``self @ dense.T`` for ``dense`` of shape ``[k, _DIM]``: ``[n_rows, k]``."""
        out = np.empty((self.n_rows, dense.shape[0]), dtype=np.float64)
        for j, column in enumerate(dense):
            out[:, j] = np.bincount(self.row, self.value * column[self.col], minlength=self.n_rows)
        return out

    def column_sums(self) -> np.ndarray:
        return np.bincount(self.col, self.value, minlength=_DIM)


def _hashed_counts(texts: Sequence[str]) -> _Sparse:
    """Character n-gram counts of each text, hashed into ``_DIM`` buckets.

    Byte n-grams of the lowercased UTF-8 text, hashed FNV-style in numpy (no Python loop per
    n-gram, and unlike ``hash()`` the same in every process).
    """
    if len(texts) > _CHUNK:
        raise ValueError(f"at most {_CHUNK} texts per call")
    data = [t.lower().encode("utf-8") for t in texts]
    lengths = np.array([len(d) for d in data], dtype=np.int64)
    flat = np.frombuffer(b"".join(data), dtype=np.uint8).astype(np.uint64)
    owner = np.repeat(np.arange(len(texts), dtype=np.int64), lengths)
    keys = []
    for n in _NGRAMS:
        m = flat.size - n + 1
        if m <= 0:
            continue
        h = np.full(m, _FNV_OFFSET ^ np.uint64(n), dtype=np.uint64)
        for k in range(n):
            h = (h ^ flat[k : k + m]) * _FNV_PRIME  # wraps mod 2**64, as FNV intends
        same = owner[:m] == owner[n - 1 : n - 1 + m]  # drop n-grams across two texts
        bucket = ((h ^ (h >> np.uint64(29))) % np.uint64(_DIM)).astype(np.int64)
        # With at most _CHUNK texts the cell index fits in 32 bits, which halves the sort below.
        keys.append((owner[:m][same] * _DIM + bucket[same]).astype(np.int32))
    cells, counts = np.unique(np.concatenate(keys or [np.zeros(0, np.int32)]), return_counts=True)
    cells = cells.astype(np.int64)
    return _Sparse(len(texts), cells // _DIM, cells % _DIM, counts.astype(np.float64))


class _CharTfidf:
    """Sublinear TF-IDF over hashed character n-grams, rows L2-normalised."""

    def __init__(self, corpus: Sequence[str]):
        self.corpus_counts = [
            (start, _hashed_counts(corpus[start : start + _CHUNK]))
            for start in range(0, len(corpus), _CHUNK)
        ]
        df = np.zeros(_DIM, dtype=np.float64)
        for _, counts in self.corpus_counts:
            df += np.bincount(counts.col, minlength=_DIM)
        self.idf = np.log((1.0 + len(corpus)) / (1.0 + df)) + 1.0

    def transform(self, texts: Sequence[str]) -> _Sparse:
        return self._weigh(_hashed_counts(texts))

    def transform_corpus(self) -> list[tuple[int, _Sparse]]:
        """The fitted corpus, transformed, once (its n-grams were hashed when fitting; the
        counts are released here)."""
        chunks, self.corpus_counts = self.corpus_counts, []
        return [(start, self._weigh(counts)) for start, counts in chunks]

    def _weigh(self, counts: _Sparse) -> _Sparse:
        value = (1.0 + np.log(counts.value)) * self.idf[counts.col]
        norms = np.sqrt(np.bincount(counts.row, value * value, minlength=counts.n_rows))
        value /= np.maximum(norms, 1e-12)[counts.row]
        return dataclasses.replace(counts, value=value)

    def iter_transform(self, texts: Sequence[str]) -> Iterator[tuple[int, _Sparse]]:
        for start in range(0, len(texts), _CHUNK):
            yield start, self.transform(texts[start : start + _CHUNK])


def _segments(texts: Sequence[str], sep: str) -> tuple[list[str], np.ndarray]:
    """All parts of all texts (split at ``sep``) and the index where each text's parts start."""
    parts: list[str] = []
    starts = np.zeros(len(texts), dtype=np.int64)
    for i, text in enumerate(texts):
        starts[i] = len(parts)
        pieces = [p.strip() for p in (text.split(sep) if sep else [text])]
        parts.extend([p for p in pieces if p] or [""])
    return parts, starts


def _balanced_threshold(pos: np.ndarray, neg: np.ndarray) -> float:
    """The cut between positive and negative scores with the best balanced accuracy.

    Among equally good cuts the middle one is taken, so a clean gap gets its midpoint.
    """
    if neg.size == 0:
        # Nothing to calibrate against: accept all but the lowest 1% of the task's own inputs.
        return float(np.quantile(pos, 0.01))
    values = np.unique(np.concatenate([pos, neg]))
    cuts = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]])
    pos_sorted, neg_sorted = np.sort(pos), np.sort(neg)
    tpr = 1.0 - np.searchsorted(pos_sorted, cuts, side="left") / pos.size
    tnr = np.searchsorted(neg_sorted, cuts, side="left") / neg.size
    balanced = (tpr + tnr) / 2
    best = np.flatnonzero(balanced >= balanced.max() - 1e-12)
    return float(cuts[best[len(best) // 2]])


class SimilarityFallback:
    """Strategy 3: character n-gram TF-IDF similarity to a task's example inputs.

    Each task is represented by the centroid of its examples' vectors. An input's score for a
    task is the lowest cosine over its parts (final input and each exemplar), so a k-shot
    prompt only scores high when all of it looks like the task. The best task is chosen if its
    score reaches that task's threshold, which maximises balanced accuracy between the task's
    own examples (scored against a centroid of the other half, so the score is honest) and the
    negatives: the ``negatives`` given plus every other bank task's examples.

    Args:
        entries: the bank tasks; those without examples are never chosen here.
        negatives: inputs of other formats (k-shot prompts of other tasks included).
        separator: the exemplar separator.
        signed_tasks: also consider tasks that have a signature. Off by default: a signature
            is the exact template, and an input that does not fit it (e.g. a CB input next to
            an RTE prompt) is another format even when its words are close.
    """

    name = "similarity"

    def __init__(
        self,
        entries: Sequence[RouterEntry],
        negatives: Sequence[str] = (),
        separator: str = DEFAULT_SEPARATOR,
        *,
        signed_tasks: bool = False,
    ):
        self.separator = separator
        chosen = [e for e in entries if e.examples and (signed_tasks or not _piece_words(e))]
        self.tasks = [e.task for e in chosen]
        self.thresholds = np.zeros(len(chosen), dtype=np.float64)
        self.centroids = np.zeros((len(chosen), _DIM), dtype=np.float64)
        if not chosen:
            return
        pool = [x for e in entries for x in e.examples] + list(negatives)
        owner = np.array([i for i, e in enumerate(entries) for _ in e.examples]
                         + [-1] * len(negatives))  # fmt: skip
        corpus, starts = _segments(pool, separator)
        self.vectorizer = _CharTfidf(corpus)
        # The pool is vectorised once and kept while calibrating: each task scores every other
        # task's examples and the negatives, and hashing them again per task made the build
        # quadratic in the bank size (3 s for 10 such tasks in a bank of 100, now 1.5 s;
        # benchmarks/router.py).
        text_of_part = np.repeat(np.arange(len(pool)), np.diff(np.append(starts, len(corpus))))
        pool_vectors = [(chunk, text_of_part[start + chunk.row])
                        for start, chunk in self.vectorizer.transform_corpus()]  # fmt: skip
        index = {e.task: i for i, e in enumerate(entries)}
        for t, entry in enumerate(chosen):
            own = np.flatnonzero(owner == index[entry.task])
            self.thresholds[t] = self._calibrate(own, owner != index[entry.task], pool_vectors,
                                                 starts)  # fmt: skip
            self.centroids[t] = self._centroid(own, pool_vectors, len(pool))

    @staticmethod
    def _centroid(texts: np.ndarray, pool_vectors, pool_size: int) -> np.ndarray:
        """Normalised sum of the vectors (all parts) of the pool texts at indices ``texts``."""
        chosen = np.zeros(pool_size, dtype=bool)
        chosen[texts] = True
        total = np.zeros(_DIM, dtype=np.float64)
        for chunk, text_of_row in pool_vectors:
            keep = chosen[text_of_row]
            total += np.bincount(chunk.col[keep], chunk.value[keep], minlength=_DIM)
        return total / max(float(np.linalg.norm(total)), 1e-12)

    def _scores(self, texts: Sequence[str], centroids: np.ndarray) -> np.ndarray:
        """``[len(texts), len(centroids)]``: per text, the lowest cosine over its parts."""
        if not texts:
            return np.zeros((0, centroids.shape[0]), dtype=np.float64)
        parts, starts = _segments(texts, self.separator)
        sims = np.empty((len(parts), centroids.shape[0]), dtype=np.float64)
        for start, vectors in self.vectorizer.iter_transform(parts):
            sims[start : start + vectors.n_rows] = vectors.dot(centroids)
        return np.minimum.reduceat(sims, starts, axis=0)

    def _calibrate(self, own: np.ndarray, others: np.ndarray, pool_vectors, starts) -> float:
        """The task's threshold; ``own``: pool indices of its examples, ``others``: a mask of
        the pool texts that are not its own (other tasks' examples and the negatives)."""
        # Two folds: each half is scored against the centroid of the other half, as unseen
        # inputs of the task will be scored against a centroid that never saw them.
        halves = [own[0::2], own[1::2]]
        if not halves[1].size:
            halves[1] = halves[0]
        centroids = np.stack([self._centroid(h, pool_vectors, len(starts))
                              for h in (halves[1], halves[0], own)])  # fmt: skip
        sims = np.concatenate([chunk.dot(centroids) for chunk, _ in pool_vectors])
        scores = np.minimum.reduceat(sims, starts, axis=0)  # per text: its lowest part
        pos = np.concatenate([scores[halves[0], 0], scores[halves[1], 1]])
        return _balanced_threshold(pos, scores[others, 2])

    def decide(self, texts: Sequence[str], requested: Sequence[str | None]) -> list[Route | None]:
        """See :class:`RouteStrategy`."""
        if not self.tasks:
            return [None] * len(texts)
        scores = self._scores(texts, self.centroids)
        routes: list[Route | None] = []
        for row in scores:
            t = int(np.argmax(row))
            s, th, task = float(row[t]), float(self.thresholds[t]), self.tasks[t]
            if s >= th:
                routes.append(Route(task, f"similarity: {s:.3f} to {task} >= {th:.3f}", s))
            else:
                reason = f"no format matched; best similarity {s:.3f} to {task} < {th:.3f}"
                routes.append(Route(None, reason, s))
        return routes


# ============================================================================ router


class Router:
    """Decide per input which bank prompt to prepend, or none.

    Args:
        entries: the bank tasks with their signatures and example inputs.
        negatives: inputs of other formats, to calibrate the similarity fallback's thresholds.
        separator: the exemplar separator of k-shot prompts (``exemplars.SEPARATOR``).
        similarity_for_signed_tasks: let the similarity fallback choose tasks that have a
            signature too (default: only tasks without one).
        strategies: replace the default chain (explicit, signature, similarity); each is a
            :class:`RouteStrategy`, tried in order.

    Raises:
        UserError: two entries share a task name.

    Example:
        >>> router = Router.from_bank(PromptBank("prompt_bank"))
        >>> [r.task for r in router.route(texts)]        # "rte", "wmt14_en_fr" or None
    """

    def __init__(
        self,
        entries: Sequence[RouterEntry],
        negatives: Sequence[str] = (),
        *,
        separator: str = DEFAULT_SEPARATOR,
        similarity_for_signed_tasks: bool = False,
        strategies: Sequence[RouteStrategy] | None = None,
    ):
        names = [e.task for e in entries]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise UserError("router entries must name each task once", key=", ".join(dupes))
        self.entries = list(entries)
        self.separator = separator
        if strategies is None:
            strategies = [
                ExplicitTask(names),
                SignatureMatch(self.entries, separator),
                SimilarityFallback(
                    self.entries, negatives, separator, signed_tasks=similarity_for_signed_tasks
                ),
            ]
        self.strategies = list(strategies)

    @property
    def tasks(self) -> list[str]:
        """The bank tasks this router can choose."""
        return [e.task for e in self.entries]

    @classmethod
    def from_bank(
        cls,
        bank: Any,
        *,
        examples: Mapping[str, Sequence[str]] | None = None,
        negatives: Sequence[str] = (),
        **kwargs: Any,
    ) -> Router:
        """A router over the current entry of every task in a prompt bank.

        Args:
            bank: a :class:`~multipromot.bank.PromptBank` (anything whose ``entries()`` gives
                objects with ``.task``, ``.current`` and ``.meta``).
            examples: ``{task: validation inputs}``; enables the similarity fallback for those
                tasks and tells the signature match whether a template starts or ends with
                literal text.
            negatives: inputs of other formats, for the similarity thresholds.
            **kwargs: passed on to :class:`Router`.

        Returns:
            The router.

        Raises:
            BankError: an entry's ``format.signature`` is malformed.
        """
        examples = examples or {}
        entries = []
        for entry in bank.entries():
            if not entry.current:
                continue
            fmt = entry.meta.get("format") or {}
            sig = signature_from_dict(fmt.get("signature"), key=f"{entry.task}: format.signature")
            entries.append(RouterEntry(entry.task, sig, list(examples.get(entry.task, ()))))
        return cls(entries, negatives, **kwargs)

    def route(self, texts: Sequence[str], tasks: Sequence[str | None] | None = None) -> list[Route]:
        """Route a batch of inputs.

        Args:
            texts: the model inputs (0-shot or k-shot prompts).
            tasks: optional per-input task names; None (or a None item) lets the router decide.

        Returns:
            One :class:`Route` per input, in order.

        Raises:
            UserError: ``tasks`` has a different length, or names a task not in the bank.
        """
        texts = list(texts)
        requested = list(tasks) if tasks is not None else [None] * len(texts)
        if len(requested) != len(texts):
            raise UserError(f"{len(texts)} inputs but {len(requested)} tasks", key="tasks")
        routes: list[Route | None] = [None] * len(texts)
        pending = list(range(len(texts)))
        for strategy in self.strategies:
            if not pending:
                break
            decided = strategy.decide([texts[i] for i in pending], [requested[i] for i in pending])
            for i, route in zip(pending, decided, strict=True):
                routes[i] = route
            pending = [i for i in pending if routes[i] is None]
        for i in pending:
            routes[i] = Route(None, "no format matched", 0.0)
        return [r for r in routes if r is not None]


def evaluate_routing(
    router: Router, positives: Mapping[str, Sequence[str]], negatives: Sequence[str]
) -> dict:
    """How well a router sends bank-task inputs to their task and other inputs to none.

    Args:
        router: the router to measure.
        positives: ``{task: held-out inputs of that task}`` (0-shot or k-shot of that task).
        negatives: inputs of other formats, k-shot prompts of other tasks included.

    Returns:
        ``{"positive_rate", "negative_rate", "per_task", "n_positives", "n_negatives",
        "mistakes"}``: percentages (0-100) of positives routed to their own task, of negatives
        routed to none, and per task; the counts; and up to 20 misrouted inputs with their
        expected task and the route taken.
    """
    texts = [t for inputs in positives.values() for t in inputs] + list(negatives)
    expected = [task for task, inputs in positives.items() for _ in inputs]
    expected += [None] * len(negatives)
    routes = router.route(texts)
    hit = [r.task == e for r, e in zip(routes, expected, strict=True)]
    n_pos = len(texts) - len(negatives)

    def pct(flags: list[bool]) -> float:
        return 100.0 * sum(flags) / len(flags) if flags else math.nan

    per_task = {
        task: pct([h for h, e in zip(hit, expected, strict=True) if e == task])
        for task in positives
    }
    mistakes = [
        {"expected": e, **r.to_json(t)}
        for t, r, e, h in zip(texts, routes, expected, hit, strict=True)
        if not h
    ][:20]
    return {
        "positive_rate": pct(hit[:n_pos]),
        "negative_rate": pct(hit[n_pos:]),
        "per_task": per_task,
        "n_positives": n_pos,
        "n_negatives": len(negatives),
        "mistakes": mistakes,
    }
