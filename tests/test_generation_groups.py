"""Generation that runs the encoder or the prefill a group of rows at a time (soft_prompt.py).

Seq2seq: the encoder runs in groups of rows that keep the batch's padded length, so the outputs
must be bit for bit those of the whole batch at once. Decoder-only with cached prompts: the text
runs in groups of rows of similar length, each cut to its longest row, then the whole batch
decodes from one cache; the tokens must be the prepend path's (scores to float summation
order).
"""

from __future__ import annotations

import pytest
import torch

import multipromot.soft_prompt as sp
from multipromot.data.collate import Collator
from multipromot.eval.generation import predict
from multipromot.features import Item
from multipromot.soft_prompt import PromptedModel, init_prompts
from tests.conftest import build_tiny

P = 6
ATOL = 1e-5
# Lengths from 1 to ~60 bytes, so that groups differ in width and some rows are cut a lot.
TEXTS = [
    "a much longer input text that runs on for a while, past fifty bytes",
    "hi",
    "x",
    "mid length text",
    "another fairly long input, about forty bytes",
    "short one",
    "yo",
    "the quick brown fox",
]
IDS = [0, -1, 1, 0, 1, -1, 0, 1]


def _prompted(name: str) -> tuple[PromptedModel, object]:
    model, tok = build_tiny(name)
    prompts = init_prompts(model, tok, 2, P, method="random", seed=1)
    return PromptedModel(model, prompts, ["t0", "t1"]).eval(), tok


def _batch(tok, texts: list[str], decoder_only: bool) -> dict[str, torch.Tensor]:
    tok.padding_side = "left" if decoder_only else "right"
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _generate(pm, batch, *, num_beams=1, cached=False, **extra):
    # Random-init models emit EOS at once: no EOS and a fixed budget, scores compared too.
    return pm.generate(
        **batch,
        task_ids=torch.tensor(IDS[: batch["input_ids"].shape[0]]),
        prefix_cache=cached,
        max_new_tokens=5,
        eos_token_id=None,
        num_beams=num_beams,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
        **extra,
    )


def _scores(out, num_beams: int) -> list[torch.Tensor]:
    return list(out.scores) if num_beams == 1 else [out.sequences_scores]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_seq2seq_encoder_in_groups_is_bit_exact(monkeypatch, num_beams):
    pm, tok = _prompted("tiny-t5")
    batch = _batch(tok, TEXTS, decoder_only=False)
    positions = batch["input_ids"].shape[1] + P
    monkeypatch.setattr(sp, "PREFILL_POSITIONS", 10**9)  # one group: generate's own encoder
    ref = _generate(pm, batch, num_beams=num_beams)
    calls = []
    encoder = pm.model.get_encoder()
    hook = encoder.register_forward_hook(lambda mod, args, out: calls.append(1))
    monkeypatch.setattr(sp, "PREFILL_POSITIONS", 3 * positions)  # groups of 3, 3 and 2 rows
    got = _generate(pm, batch, num_beams=num_beams)
    hook.remove()
    assert len(calls) == 3
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(_scores(got, num_beams), _scores(ref, num_beams), strict=True):
        assert torch.equal(a, b)
    # Rows differ (random T5 repeats one token: its scores tell the rows apart).
    assert torch.unique(_scores(ref, num_beams)[0], dim=0).shape[0] > 2


def test_seq2seq_groups_skipped_when_encoder_internals_are_asked_for(monkeypatch):
    pm, tok = _prompted("tiny-t5")
    monkeypatch.setattr(sp, "PREFILL_POSITIONS", 8)
    out = _generate(pm, _batch(tok, TEXTS, False), output_hidden_states=True)
    assert out.encoder_hidden_states is not None  # generate ran the encoder itself


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("budget", [1, 40, 10**9])  # a row per group, a few groups, one group
def test_cached_prefill_in_groups_equals_prepend(monkeypatch, name, num_beams, budget):
    pm, tok = _prompted(name)
    batch = _batch(tok, TEXTS, decoder_only=True)
    ref = _generate(pm, batch, num_beams=num_beams)
    monkeypatch.setattr(sp, "PREFILL_POSITIONS", budget)
    got = _generate(pm, batch, num_beams=num_beams, cached=True)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(_scores(got, num_beams), _scores(ref, num_beams), strict=True):
        assert (a - b).abs().max() < ATOL
    assert len({tuple(r.tolist()) for r in ref.sequences}) > 2


def test_row_groups_follow_length_and_budget():
    # widths with 2 extra positions per row: 10 + 2 -> one row; 4 + 2 -> three rows; 1 + 2 ...
    groups = sp._row_groups([4, 10, 1, 4, 3, 1], 2, 20)
    assert groups == [([1], 10), ([0, 3, 4], 4), ([2, 5], 1)]
    assert sp._row_groups([2, 5], 0, 1) == [([1], 5), ([0], 2)]  # at least one row per group
    assert sp._row_groups([2, 5, 3], 0, None) == [([1, 2, 0], 5)]  # no budget: one group
    assert sp._row_groups([], 0, None) == []


def test_cached_several_returned_sequences_in_groups(monkeypatch):
    pm, tok = _prompted("tiny-llama")
    batch = _batch(tok, TEXTS[:4], decoder_only=True)
    opts = dict(max_new_tokens=4, eos_token_id=None, do_sample=True, num_return_sequences=2)
    monkeypatch.setattr(sp, "PREFILL_POSITIONS", 20)
    torch.manual_seed(5)
    ref = pm.generate(**batch, task_ids=torch.tensor(IDS[:4]), **opts)
    torch.manual_seed(5)
    got = pm.generate(**batch, task_ids=torch.tensor(IDS[:4]), prefix_cache=True, **opts)
    assert got.shape == (8, 4) and torch.equal(got, ref)


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-llama"])
def test_predict_outputs_unchanged_by_groups(monkeypatch, name):
    pm, tok = _prompted(name)
    pm.model.generation_config.eos_token_id = None  # random init: else every output is empty
    items = [Item(t, text, "") for t, text in zip(IDS * 2, TEXTS * 2, strict=True)]
    decoder_only = name != "tiny-t5"
    collator = Collator(tok, decoder_only=decoder_only, max_input_length=96, for_generation=True)
    opts = dict(batch_size=8, max_new_tokens=5)
    monkeypatch.setattr(sp, "PREFILL_POSITIONS", 10**9)
    whole = predict(pm, tok, items, collator, prefix_cache=False, **opts)
    monkeypatch.setattr(sp, "PREFILL_POSITIONS", 64)
    assert predict(pm, tok, items, collator, **opts) == whole
    # Random T5 decodes pad tokens only (empty strings); the seq2seq test compares scores.
    assert len(set(whole)) > 2 or not decoder_only
