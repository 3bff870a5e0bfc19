"""Strategy 2: the input is written in a bank task's template (its format signature)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from multipromot.features import SEPARATOR
from multipromot.router.base import Route, RouterEntry

__all__ = ["SignatureMatch"]


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

    def __init__(self, entries: Sequence[RouterEntry], separator: str = SEPARATOR):
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
