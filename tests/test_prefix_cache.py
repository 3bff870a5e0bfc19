"""Bank-prompt prefix caching for decoder-only generation: same outputs as prepending the prompt.

The cached path hands ``generate`` each task's prompt keys/values, computed once; these tests
compare it with the prepend path on mixed batches (two tasks and no-prompt rows), greedy and
beam, and check that a changed prompt or changed weights are never served from a stale cache.
"""

from __future__ import annotations

import pytest
import torch

from multipromot.data.collate import Collator
from multipromot.eval.generation import predict
from multipromot.features import Item
from multipromot.soft_prompt import PromptedModel, init_prompts
from tests.conftest import build_tiny

DECODERS = ["tiny-gpt2", "tiny-llama"]
P = 6
ATOL = 1e-5
TEXTS = ["hello world", "hi", "a much longer input text", "x", "mid length"]
MIXED_IDS = [0, -1, 1, 0, -1]  # two tasks, repeated, and no-prompt rows, in one batch


def _prompted(name: str, num_tasks: int = 2) -> tuple[PromptedModel, object]:
    model, tok = build_tiny(name)
    prompts = init_prompts(model, tok, num_tasks, P, method="random", seed=1)
    return PromptedModel(model, prompts, [f"t{i}" for i in range(num_tasks)]).eval(), tok


def _batch(tok, texts: list[str]) -> dict[str, torch.Tensor]:
    tok.padding_side = "left"
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _generate(pm, batch, task_ids, num_beams: int, cached: bool):
    # Random-init models emit EOS at once: no EOS and a fixed budget, scores compared too.
    return pm.generate(
        **batch,
        task_ids=torch.tensor(task_ids),
        prefix_cache=cached,
        max_new_tokens=6,
        eos_token_id=None,
        num_beams=num_beams,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )


def _assert_same(got, ref, num_beams: int) -> None:
    assert torch.equal(got.sequences, ref.sequences)
    if num_beams == 1:
        for step_got, step_ref in zip(got.scores, ref.scores, strict=True):
            assert (step_got - step_ref).abs().max() < ATOL
    else:
        assert (got.sequences_scores - ref.sequences_scores).abs().max() < ATOL


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_generate_equals_prepend_on_mixed_batch(name, num_beams):
    pm, tok = _prompted(name)
    batch = _batch(tok, TEXTS)
    ref = _generate(pm, batch, MIXED_IDS, num_beams, cached=False)
    got = _generate(pm, batch, MIXED_IDS, num_beams, cached=True)
    _assert_same(got, ref, num_beams)
    assert pm._prefixes.builds == 1  # the cached path was taken, both tasks in one pass
    # Rows differ (so a row mix-up in the cache would show).
    assert len({tuple(row.tolist()) for row in ref.sequences}) > 2


@pytest.mark.parametrize("name", DECODERS)
def test_prefix_is_computed_once_and_reused(name):
    pm, tok = _prompted(name, num_tasks=3)
    first = _generate(pm, _batch(tok, TEXTS[:2]), [0, -1], 1, cached=True)
    assert pm._prefixes.builds == 1 and sorted(pm._prefixes.prefix) == [0]
    # A later batch with task 0 again and a new task 2: only task 2 is computed.
    _generate(pm, _batch(tok, TEXTS), [2, 0, -1, 2, 0], 1, cached=True)
    assert pm._prefixes.builds == 2 and sorted(pm._prefixes.prefix) == [0, 2]
    again = _generate(pm, _batch(tok, TEXTS[:2]), [0, -1], 1, cached=True)
    assert pm._prefixes.builds == 2
    _assert_same(again, first, 1)


@pytest.mark.parametrize("name", DECODERS)
def test_changed_prompt_is_not_served_stale(name):
    pm, tok = _prompted(name)
    batch = _batch(tok, TEXTS)
    before = _generate(pm, batch, MIXED_IDS, 1, cached=True)
    # In place through .data: bypasses the version counter, caught by the value comparison.
    pm.prompts.data[1] = init_prompts(pm.model, tok, 1, P, method="random", seed=7)[0]
    ref = _generate(pm, batch, MIXED_IDS, 1, cached=False)
    got = _generate(pm, batch, MIXED_IDS, 1, cached=True)
    _assert_same(got, ref, 1)
    assert not torch.equal(ref.scores[0][2], before.scores[0][2])  # task 1's row changed
    assert pm._prefixes.builds == 2


@pytest.mark.parametrize("name", DECODERS)
def test_changed_weights_are_not_served_stale(name):
    pm, tok = _prompted(name)
    batch = _batch(tok, TEXTS)
    before = _generate(pm, batch, MIXED_IDS, 1, cached=True)
    # An optimizer step updates the weights in place (same storage, new version).
    optimizer = torch.optim.SGD(pm.model.parameters(), lr=0.5)
    pm.train()
    ids = batch["input_ids"]
    loss = pm(ids, batch["attention_mask"], labels=ids, task_ids=torch.tensor(MIXED_IDS)).loss
    loss.backward()
    optimizer.step()
    pm.eval()
    ref = _generate(pm, batch, MIXED_IDS, 1, cached=False)
    got = _generate(pm, batch, MIXED_IDS, 1, cached=True)
    _assert_same(got, ref, 1)
    assert (ref.scores[0] - before.scores[0]).abs().max() > 1e-3
    # load_state_dict copies into the same storage: also a new version.
    state = {k: v.clone() for k, v in pm.model.state_dict().items()}
    state["lm_head.weight"] = state["lm_head.weight"] * 0.5
    pm.model.load_state_dict(state)
    ref = _generate(pm, batch, MIXED_IDS, 1, cached=False)
    _assert_same(_generate(pm, batch, MIXED_IDS, 1, cached=True), ref, 1)
    assert pm._prefixes.builds == 3


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_generate_with_several_returned_sequences(num_beams):
    pm, tok = _prompted("tiny-gpt2")
    batch = _batch(tok, TEXTS[:3])
    opts = dict(
        max_new_tokens=4,
        eos_token_id=None,
        num_beams=num_beams,
        do_sample=num_beams == 1,
        num_return_sequences=2,
    )
    torch.manual_seed(5)
    ref = pm.generate(**batch, task_ids=torch.tensor([0, -1, 1]), **opts)
    torch.manual_seed(5)
    got = pm.generate(**batch, task_ids=torch.tensor([0, -1, 1]), prefix_cache=True, **opts)
    assert got.shape == (6, 4) and torch.equal(got, ref)
    assert pm._prefixes.builds == 1


def test_batch_without_prompts_skips_the_cache():
    pm, tok = _prompted("tiny-llama")
    batch = _batch(tok, TEXTS[:2])
    ref = _generate(pm, batch, [-1, -1], 1, cached=False)
    _assert_same(_generate(pm, batch, [-1, -1], 1, cached=True), ref, 1)
    assert pm._prefixes.builds == 0


def test_prefix_cache_refused_for_seq2seq_and_training():
    pm, tok = _prompted("tiny-t5")
    batch = {k: v for k, v in _batch(tok, TEXTS[:2]).items()}
    with pytest.raises(ValueError, match="decoder-only"):
        pm.generate(**batch, task_ids=torch.tensor([0, 1]), prefix_cache=True, max_new_tokens=2)
    pm, tok = _prompted("tiny-gpt2")
    pm.train()
    with pytest.raises(ValueError, match="eval mode"):
        pm.generate(**_batch(tok, TEXTS[:2]), task_ids=torch.tensor([0, 1]), prefix_cache=True)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_predict_uses_cache_with_identical_outputs(num_beams):
    pm, tok = _prompted("tiny-llama")
    pm.model.generation_config.eos_token_id = None  # random init: else every output is empty
    items = [Item(t, text, "") for t, text in zip(MIXED_IDS * 2, TEXTS * 2, strict=True)]
    collator = Collator(tok, decoder_only=True, max_input_length=64, for_generation=True)
    opts = dict(batch_size=4, num_beams=num_beams, max_new_tokens=5)
    plain = predict(pm, tok, items, collator, prefix_cache=False, **opts)
    assert pm._prefixes.builds == 0
    cached = predict(pm, tok, items, collator, **opts)  # the default for decoder-only models
    assert cached == plain
    assert pm._prefixes.builds == 1
    assert len(set(plain)) > 2
