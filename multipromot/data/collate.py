"""From rendered strings to model tensors: tokenization, truncation, padding, labels, task ids.

This is seqio's task-feature / model-feature boundary: templates and exemplars produce strings
(:class:`Item`), and only the :class:`Collator` tokenizes.

Layout (``E`` = exemplars, each followed by :data:`~multipromot.data.exemplars.SEPARATOR`; ``B`` = the
special tokens the tokenizer itself puts in front of a text, e.g. Llama's ``<s>``, usually
none; ``eos`` = the tokenizer's end-of-sequence token):

* **seq2seq** (T5): ``input_ids = B E input eos``, right-padded; ``labels = target eos``,
  right-padded with -100.
* **decoder-only** (GPT-2, Llama): ``input_ids = B E input target eos``, **left**-padded so that
  generation continues right after the prompt; ``labels`` are -100 everywhere except on
  ``target eos``. The target is tokenized with its leading
  :data:`~multipromot.features.TARGET_DELIMITER` (``" target"``), the same way exemplars show it.
* **generation** (``for_generation=True``): only the prompt part (``B E input``, plus ``eos`` for
  seq2seq encoders), no labels.

Truncation policy, applied per item, in this order:

1. The target is cut to ``max_target_length`` tokens *including* its eos (the tail goes).
2. If ``B E input`` (+ eos for seq2seq) exceeds ``max_input_length``, whole exemplars are dropped
   first, the first (farthest from the input) first, until it fits or none is left. Exemplars are
   never cut in half: a broken demonstration teaches a broken format, while fewer shots is still
   a well-formed k-shot prompt.
3. Only then is the input cut, at its end (the head is kept), as T5 / the paper cut long
   summarization inputs to a fixed length.

So the encoder input never exceeds ``max_input_length`` and the labels never exceed
``max_target_length``; a decoder-only row is at most ``max_input_length + max_target_length``.

Special tokens: every piece is tokenized with ``add_special_tokens=False`` (ByT5 and T5 append
eos by default, which would land in the middle of the sequence), then the collator adds the
tokenizer's own leading special tokens once and its own eos where the layout says.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from multipromot.errors import UserError
from multipromot.features import IGNORE_INDEX, SEPARATOR, TARGET_DELIMITER, Item

__all__ = ["Collator"]


def _leading_special_ids(tokenizer: Any) -> list[int]:
    """Ids the tokenizer puts in front of any text by default (BOS for Llama, none for T5)."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []


class Collator:
    """Turns a list of :class:`Item` into padded tensors.

    Args:
        tokenizer: a Hugging Face tokenizer (called once per batch on all pieces).
        decoder_only: True for causal LMs (left padding, labels over target + eos only).
        max_input_length: budget for the prompt part (see the module docstring).
        max_target_length: budget for target + eos.
        for_generation: build prompts only, without targets and labels.

    Raises:
        UserError: the tokenizer has no eos token, or a length budget is below 2.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        decoder_only: bool,
        max_input_length: int = 512,
        max_target_length: int = 128,
        for_generation: bool = False,
    ):
        if tokenizer.eos_token_id is None:
            raise UserError("the tokenizer has no eos token", key="tokenizer")
        for key, value in (
            ("max_input_length", max_input_length),
            ("max_target_length", max_target_length),
        ):
            if value < 2:
                raise UserError(f"must be >= 2, got {value}", key=key)
        self.tokenizer = tokenizer
        self.decoder_only = decoder_only
        self.max_input_length = max_input_length
        self.max_target_length = max_target_length
        self.for_generation = for_generation
        self.eos_id = int(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id  # GPT-2 has no pad token
        self.prefix = _leading_special_ids(tokenizer)

    def __call__(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        """Tokenize, truncate and pad a batch.

        Args:
            items: the batch.

        Returns:
            ``input_ids``, ``attention_mask``, ``task_ids`` and, unless ``for_generation``,
            ``labels`` (all ``torch.long``).
        """
        texts: list[str] = []
        for item in items:
            texts.extend(e + SEPARATOR for e in item.exemplars)
            texts.append(item.input)
            if not self.for_generation:
                # The delimiter goes with the target, as in the exemplars ("input target"),
                # so the prompt never ends in a space (BPE tokenizes " word" as one token).
                delimit = self.decoder_only and item.target
                target = TARGET_DELIMITER + item.target if delimit else item.target
                texts.append(target)
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]

        prompts: list[list[int]] = []
        targets: list[list[int]] = []
        cursor = 0
        for item in items:
            n = len(item.exemplars)
            exemplars, source = ids[cursor : cursor + n], ids[cursor + n]
            cursor += n + 1
            prompts.append(self._prompt(exemplars, source))
            if not self.for_generation:
                targets.append(list(ids[cursor][: self.max_target_length - 1]) + [self.eos_id])
                cursor += 1
        return self._pad(items, prompts, targets)

    def exemplars_kept(self, items: Sequence[Item]) -> list[int]:
        """How many of each item's exemplars its prompt keeps: the truncation policy (module
        docstring) drops whole exemplars, farthest first, until ``max_input_length`` fits.
        Records and checks say how many shots an input really had with this."""
        texts: list[str] = []
        for item in items:
            texts.extend(e + SEPARATOR for e in item.exemplars)
            texts.append(item.input)
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        kept, cursor = [], 0
        for item in items:
            n = len(item.exemplars)
            kept.append(self._fit(ids[cursor : cursor + n], ids[cursor + n]))
            cursor += n + 1
        return kept

    def _budget(self) -> int:
        """Tokens for ``E input``: the input budget less the leading specials and seq2seq's eos."""
        return self.max_input_length - len(self.prefix) - (0 if self.decoder_only else 1)

    def _fit(self, exemplars: list[list[int]], source: list[int]) -> int:
        """How many exemplars (the last ones, nearest the input) fit with the input."""
        kept, total = len(exemplars), sum(map(len, exemplars))
        while kept and total + len(source) > self._budget():
            total -= len(exemplars[len(exemplars) - kept])
            kept -= 1
        return kept

    def _prompt(self, exemplars: list[list[int]], source: list[int]) -> list[int]:
        """``B E input`` (+ eos for seq2seq), truncated by the policy in the module docstring."""
        closing = [] if self.decoder_only else [self.eos_id]
        kept = exemplars[len(exemplars) - self._fit(exemplars, source) :]
        room = max(self._budget() - sum(map(len, kept)), 0)
        body = [tok for piece in kept for tok in piece] + list(source[:room])
        return self.prefix + body + closing

    def _pad(
        self, items: Sequence[Item], prompts: list[list[int]], targets: list[list[int]]
    ) -> dict[str, torch.Tensor]:
        task_ids = torch.tensor([item.task_id for item in items], dtype=torch.long)
        if self.decoder_only:
            if targets:
                rows = [p + t for p, t in zip(prompts, targets, strict=True)]
                labels = [
                    [IGNORE_INDEX] * len(p) + t for p, t in zip(prompts, targets, strict=True)
                ]
            else:
                rows, labels = prompts, []
            width = max(map(len, rows), default=0)
            out = {
                "input_ids": _tensor([[self.pad_id] * (width - len(r)) + r for r in rows]),
                "attention_mask": _tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
            }
            if labels:
                out["labels"] = _tensor([[IGNORE_INDEX] * (width - len(r)) + r for r in labels])
        else:
            width = max(map(len, prompts), default=0)
            out = {
                "input_ids": _tensor([r + [self.pad_id] * (width - len(r)) for r in prompts]),
                "attention_mask": _tensor([[1] * len(r) + [0] * (width - len(r)) for r in prompts]),
            }
            if targets:
                twidth = max(map(len, targets))
                out["labels"] = _tensor([t + [IGNORE_INDEX] * (twidth - len(t)) for t in targets])
        out["task_ids"] = task_ids
        return out


def _tensor(rows: list[list[int]]) -> torch.Tensor:
    if not rows:
        return torch.zeros((0, 0), dtype=torch.long)
    return torch.tensor(rows, dtype=torch.long)
