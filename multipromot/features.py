"""The string contract between data and model: what a row is before it is tokenized.

Templates and exemplars produce :class:`Item` rows of plain strings (seqio's *task features*);
only :mod:`multipromot.data.collate` turns them into tensors (*model features*). Everything that
joins, counts or masks those strings takes its constants from here, so there is one definition
of each.

A k-shot input is ``exemplar_1 SEP ... SEP exemplar_k SEP input`` where each exemplar is
rendered ``input + TARGET_DELIMITER + target`` by the task's own template and ``SEP`` is
:data:`SEPARATOR`. Why ``"\\n\\n"``: it is the usual few-shot delimiter (GPT-3,
lm-evaluation-harness), and byte-level and BPE tokenizers (ByT5, GPT-2, the lab model) keep it
as a visible boundary. Sentencepiece tokenizers of the T5 family turn it into a single space;
the paper's templates carry their own cues ("question:", "answer:") so the boundary stays
readable there too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "IGNORE_INDEX",
    "SEPARATOR",
    "TARGET_DELIMITER",
    "EXEMPLAR_SPLIT",
    "Item",
    "item_chars",
    "kshot_text",
]

# The label value torch's cross entropy (and every transformers model) ignores.
IGNORE_INDEX = -100
# Between exemplars, and between the last exemplar and the input.
SEPARATOR = "\n\n"
# Between an exemplar's input and its target ("input target"), and in front of a decoder-only
# target, so that the model sees targets the same way in exemplars and in its own answer.
TARGET_DELIMITER = " "
# Exemplars always come from this split of the row's own task.
EXEMPLAR_SPLIT = "train"


@dataclass
class Item:
    """One training or evaluation row as strings.

    Args:
        task_id: row of the prompt table (index into the mixture's tasks); -1 = no prompt.
        input: the rendered input of the example.
        target: the rendered target (may be empty for generation).
        exemplars: rendered exemplars (``input + TARGET_DELIMITER + target``), in prompt order.
        references: every acceptable answer, for scoring (empty: ``target`` is the one).
    """

    task_id: int
    input: str
    target: str
    exemplars: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)

    @property
    def gold(self) -> str | list[str]:
        """What a metric compares an output with: every reference, or the target."""
        return self.references or self.target


def item_chars(item: Item) -> int:
    """A row's length in characters (input, target and exemplars): a length proxy for grouping
    that costs no tokenization."""
    return len(item.input) + len(item.target) + sum(map(len, item.exemplars))


def kshot_text(item: Item) -> str:
    """The row's full input as one string, exemplars first, as the model (and the router) sees
    it before tokenization."""
    return SEPARATOR.join([*item.exemplars, item.input])
