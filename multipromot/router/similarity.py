"""Strategy 3: character n-gram TF-IDF similarity to a task's example inputs, with a per-task
abstain threshold calibrated against inputs of other formats."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from multipromot.features import SEPARATOR
from multipromot.router.base import Route, RouterEntry
from multipromot.router.signature import _piece_words

__all__ = ["SimilarityFallback"]


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
        separator: str = SEPARATOR,
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
        owner = np.array(
            [i for i, e in enumerate(entries) for _ in e.examples] + [-1] * len(negatives)
        )
        corpus, starts = _segments(pool, separator)
        self.vectorizer = _CharTfidf(corpus)
        # The pool is vectorised once and kept while calibrating: each task scores every other
        # task's examples and the negatives, and hashing them again per task made the build
        # quadratic in the bank size (3 s for 10 such tasks in a bank of 100, now 1.5 s;
        # benchmarks/router.py).
        text_of_part = np.repeat(np.arange(len(pool)), np.diff(np.append(starts, len(corpus))))
        pool_vectors = [
            (chunk, text_of_part[start + chunk.row])
            for start, chunk in self.vectorizer.transform_corpus()
        ]
        index = {e.task: i for i, e in enumerate(entries)}
        for t, entry in enumerate(chosen):
            own = np.flatnonzero(owner == index[entry.task])
            self.thresholds[t] = self._calibrate(
                own, owner != index[entry.task], pool_vectors, starts
            )
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
        centroids = np.stack(
            [self._centroid(h, pool_vectors, len(starts)) for h in (halves[1], halves[0], own)]
        )
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
