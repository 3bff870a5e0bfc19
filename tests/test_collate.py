"""Collator: layouts, label masking, padding side, eos, truncation order, task ids, batching."""

from __future__ import annotations

import pytest
import torch
from transformers import ByT5Tokenizer

from multipromot.data.batches import group_by_length
from multipromot.data.collate import Collator
from multipromot.errors import UserError
from multipromot.features import IGNORE_INDEX, SEPARATOR, Item

EOS, PAD = 1, 0  # ByT5: byte b is id b + 3


def ids(text: str) -> list[int]:
    return [b + 3 for b in text.encode("utf-8")]


@pytest.fixture(scope="module")
def tok():
    return ByT5Tokenizer()


class CountingTokenizer:
    """Wraps a tokenizer, counting calls; optionally puts a BOS id in front like Llama's."""

    def __init__(self, inner, bos: int | None = None):
        self.inner, self.bos, self.calls = inner, bos, 0
        self.eos_token_id, self.pad_token_id = inner.eos_token_id, inner.pad_token_id

    def __call__(self, text, add_special_tokens=True):
        self.calls += 1
        out = self.inner(text, add_special_tokens=False)
        if add_special_tokens and self.bos is not None:
            rows = out["input_ids"]
            out = {
                "input_ids": [self.bos, *rows]
                if isinstance(text, str)
                else [[self.bos, *r] for r in rows]
            }
        return out


def test_seq2seq_layout_right_padding_and_labels(tok):
    items = [
        Item(task_id=0, input="ab", target="T", exemplars=["x y"]),
        Item(task_id=3, input="abcd", target="True"),
    ]
    batch = Collator(tok, decoder_only=False)(items)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "task_ids"}
    row0 = ids("x y" + SEPARATOR + "ab") + [EOS]
    row1 = ids("abcd") + [EOS]
    width = max(len(row0), len(row1))
    assert batch["input_ids"].tolist() == [
        row0 + [PAD] * (width - len(row0)),
        row1 + [PAD] * (width - len(row1)),
    ]
    assert batch["attention_mask"].tolist() == [
        [1] * len(row0) + [0] * (width - len(row0)),
        [1] * len(row1) + [0] * (width - len(row1)),
    ]
    assert batch["labels"].tolist() == [
        ids("T") + [EOS] + [IGNORE_INDEX] * 3,
        ids("True") + [EOS],
    ]
    assert batch["task_ids"].tolist() == [0, 3]
    assert all(t.dtype == torch.long for t in batch.values())


def test_decoder_only_left_padding_and_loss_only_on_target_and_eos(tok):
    items = [Item(0, "Q: 1+1?", "2", exemplars=["Q: 0+1? 1"]), Item(-1, "Q: hi", "hello")]
    batch = Collator(tok, decoder_only=True)(items)
    prompt0 = ids("Q: 0+1? 1" + SEPARATOR + "Q: 1+1?")
    row0 = prompt0 + ids(" 2") + [EOS]
    row1 = ids("Q: hi") + ids(" hello") + [EOS]
    width = max(len(row0), len(row1))
    assert batch["input_ids"].tolist() == [
        [PAD] * (width - len(row0)) + row0,
        [PAD] * (width - len(row1)) + row1,
    ]
    assert batch["attention_mask"][1].tolist() == [0] * (width - len(row1)) + [1] * len(row1)
    labels = batch["labels"].tolist()
    assert labels[0] == [IGNORE_INDEX] * (width - 3) + ids(" 2") + [EOS]
    assert labels[1] == [IGNORE_INDEX] * (width - 7) + ids(" hello") + [EOS]
    assert batch["task_ids"].tolist() == [0, -1]


def test_generation_batches_hold_prompts_only(tok):
    items = [Item(1, "short", "ignored"), Item(2, "a longer input", "x", exemplars=["e 1"])]
    dec = Collator(tok, decoder_only=True, for_generation=True)(items)
    assert "labels" not in dec
    prompt1 = ids("e 1" + SEPARATOR + "a longer input")
    assert dec["input_ids"][1].tolist() == prompt1  # the longest row: no padding
    assert dec["input_ids"][0].tolist() == [PAD] * (len(prompt1) - 5) + ids("short")
    enc = Collator(tok, decoder_only=False, for_generation=True)(items)
    assert "labels" not in enc
    assert enc["input_ids"][0].tolist()[:6] == ids("short") + [EOS]


def test_truncation_drops_first_exemplars_before_cutting_the_input(tok):
    exemplars = ["first exemplar", "second"]
    sep = len(ids(SEPARATOR))
    # Room for the input and the second exemplar only (+ eos): the first one goes.
    budget = len(ids("second")) + sep + len(ids("the input")) + 1
    item = Item(0, "the input", "t", exemplars=exemplars)
    batch = Collator(tok, decoder_only=False, max_input_length=budget)([item])
    assert batch["input_ids"][0].tolist() == ids("second" + SEPARATOR + "the input") + [EOS]
    # Room for less than the input: every exemplar goes, then the input loses its end.
    batch = Collator(tok, decoder_only=False, max_input_length=5)([item])
    assert batch["input_ids"][0].tolist() == ids("the ") + [EOS]
    # Decoder-only: the same policy on the prompt part; the target stays whole.
    batch = Collator(tok, decoder_only=True, max_input_length=4)([item])
    assert batch["input_ids"][0].tolist() == ids("the ") + ids(" t") + [EOS]


def test_exemplars_kept_counts_what_the_prompt_keeps(tok):
    """What the records and the shots check report (issue 26, item 5) is what collation does."""
    exemplars = ["first exemplar", "second"]
    sep = len(ids(SEPARATOR))
    item = Item(0, "the input", "t", exemplars=exemplars)
    for budget, kept in [(200, 2), (len(ids("second")) + sep + len(ids("the input")) + 1, 1)]:
        collator = Collator(tok, decoder_only=False, max_input_length=budget)
        assert collator.exemplars_kept([item, Item(0, "x", "t")]) == [kept, 0]
        prompt = tok.decode(collator([item])["input_ids"][0], skip_special_tokens=True)
        assert prompt.count(SEPARATOR) == kept
    assert Collator(tok, decoder_only=True, max_input_length=4).exemplars_kept([item]) == [0]


def test_target_is_cut_to_max_target_length_including_eos(tok):
    item = Item(0, "in", "abcdefgh")
    enc = Collator(tok, decoder_only=False, max_target_length=4)([item])
    assert enc["labels"][0].tolist() == ids("abc") + [EOS]
    dec = Collator(tok, decoder_only=True, max_target_length=4)([item])
    assert dec["labels"][0].tolist() == [IGNORE_INDEX] * 2 + ids(" ab") + [EOS]
    # An empty target trains eos only, without a stray delimiter.
    empty = Collator(tok, decoder_only=True)([Item(0, "in", "")])
    assert empty["labels"][0].tolist() == [IGNORE_INDEX] * 2 + [EOS]


def test_tokenizer_special_tokens_are_placed_once_and_called_once_per_batch(tok):
    # ByT5 appends eos by default: it must not appear inside the sequence.
    batch = Collator(tok, decoder_only=True)([Item(0, "ab", "c", exemplars=["z"])])
    assert batch["input_ids"][0].tolist().count(EOS) == 1
    # A Llama-like tokenizer puts BOS (here 2) first: once, in front of the exemplars.
    llama_like = CountingTokenizer(tok, bos=2)
    collator = Collator(llama_like, decoder_only=True)
    llama_like.calls = 0
    items = [Item(0, "ab", "c", exemplars=["z", "y"]), Item(1, "d", "e")]
    batch = collator(items)
    assert llama_like.calls == 1
    assert batch["input_ids"][0].tolist()[:2] == [2, *ids("z")]
    assert batch["input_ids"][0].tolist().count(2) == 1


def test_bad_settings_are_user_errors(tok):
    with pytest.raises(UserError, match="max_input_length: must be >= 2"):
        Collator(tok, decoder_only=False, max_input_length=1)

    class NoEos:
        eos_token_id = None
        pad_token_id = 0

    with pytest.raises(UserError, match="no eos token"):
        Collator(NoEos(), decoder_only=True)


def test_group_by_length_sorts_within_windows_only():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10]
    items = [Item(i, "x" * n, "") for i, n in enumerate(lengths)]
    grouped = group_by_length(items, batch_size=2, window=4)
    # windows of 4 items in drawn order: [5,1,9,3], [7,2,8,4], [6,10]
    assert [[len(it.input) for it in b] for b in grouped] == [
        [9, 5],
        [3, 1],
        [8, 7],
        [4, 2],
        [10, 6],
    ]
    assert sorted(it.task_id for b in grouped for it in b) == list(range(10))
    assert group_by_length(items, batch_size=2, window=4) == grouped  # deterministic
    assert len(group_by_length(items, batch_size=3)) == 4  # one window: 3 + 3 + 3 + 1
