"""Specialization after fine-tuning on a generation task: answers in its output language, and
answers that repeat the input.

The True/False share (:func:`multipromot.data.metrics.specialization_rate`) measures what
fine-tuning on a classification task does to unseen tasks. A generation task leaves other
marks: the paper (Wang et al., section 5 and Table 10) reports that En-Fr fine-tuning makes the
model answer other tasks in French and repeat its input. Two per-output flags measure that:

- **in the output language**: at least half of the output's words are words of the fine-tuned
  generation tasks' targets that never occur in their inputs (on the lab, the made-up
  vocabulary of the translation task; for En-Fr, French words absent from the English side).
  The word list comes from the tasks' train rows (:func:`language_words`).
- **repeats the input**: the output, at least ``MIN_COPY_WORDS`` words long, appears verbatim
  (case and spacing aside) in the item's own input (not its exemplars). An extractive answer
  may do this legitimately, so read the share against the pretrained model's on the same task.

Both are shares of the unseen tasks' outputs; results.json keeps them per record
(``target_language``, ``input_copy``) and per item in samples.jsonl.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["MIN_COPY_WORDS", "language_words", "in_language", "copies_input"]

MIN_COPY_WORDS = 3
# Rows of each task's train split read for its word list: enough for the lab's vocabularies and
# a real task's frequent words, without reading a large corpus at evaluation time.
LANGUAGE_ROWS = 2000
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def language_words(tasks: Iterable, rows: int = LANGUAGE_ROWS) -> frozenset[str]:
    """The words of the generation tasks' train targets (tasks without an answer set) that never
    occur in their train inputs; empty when no task generates text."""
    targets: set[str] = set()
    inputs: set[str] = set()
    for task in tasks:
        if task.answers:
            continue
        examples = task.examples("train")
        for index in range(min(rows, len(examples))):
            text, target = task.render(examples[index])
            inputs.update(_words(text))
            targets.update(_words(target))
    return frozenset(targets - inputs)


def in_language(output: str, words: frozenset[str]) -> bool:
    """At least half of ``output``'s words are in ``words`` (an output with no words is not)."""
    found = _words(output)
    return bool(found) and 2 * sum(w in words for w in found) >= len(found)


def copies_input(output: str, text: str) -> bool:
    """``output`` (at least ``MIN_COPY_WORDS`` words) appears verbatim in ``text``, ignoring case
    and runs of whitespace."""
    said = " ".join(output.lower().split())
    if len(said.split()) < MIN_COPY_WORDS:
        return False
    return said in " ".join(text.lower().split())
