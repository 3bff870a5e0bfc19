"""PromptedModel: per-row soft prompts for T5, GPT-2 and Llama (tiny random models, dropout 0)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from multipromot.soft_prompt import PromptedModel, init_prompts
from multipromot.train.common import token_loss
from tests.conftest import build_tiny

P = 4  # prompt length used throughout
ATOL = 1e-5
# (input, target) rows of different lengths, so batches carry padding.
ROWS = [("hello world", "yes"), ("hi", "no way"), ("a much longer input text", "maybe")]
MIXED_IDS = [0, -1, 1]  # a no-prompt row between two prompted rows of different tasks


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def make_batch(tok, rows: list[tuple[str, str]], decoder_only: bool) -> dict[str, torch.Tensor]:
    """A training batch as the collator makes it.

    Seq2seq: inputs right-padded, labels = target ids padded with -100. Decoder-only: input and
    target concatenated and left-padded, labels aligned with input_ids, -100 over the input.
    """
    pad = tok.pad_token_id
    if decoder_only:
        seqs = [(_ids(tok, x), _ids(tok, y)) for x, y in rows]
        width = max(len(x) + len(y) for x, y in seqs)
        input_ids, mask, labels = [], [], []
        for x, y in seqs:
            n = width - len(x) - len(y)
            input_ids.append([pad] * n + x + y)
            mask.append([0] * n + [1] * (len(x) + len(y)))
            labels.append([-100] * (n + len(x)) + y)
    else:
        xs = [_ids(tok, x) for x, _ in rows]
        ys = [_ids(tok, y) for _, y in rows]
        wx, wy = max(map(len, xs)), max(map(len, ys))
        input_ids = [x + [pad] * (wx - len(x)) for x in xs]
        mask = [[1] * len(x) + [0] * (wx - len(x)) for x in xs]
        labels = [y + [-100] * (wy - len(y)) for y in ys]
    return {
        "input_ids": torch.tensor(input_ids),
        "attention_mask": torch.tensor(mask),
        "labels": torch.tensor(labels),
    }


def gen_batch(tok, texts: list[str], decoder_only: bool) -> dict[str, torch.Tensor]:
    """A generation batch: inputs only, left-padded for decoder-only, right-padded for T5."""
    tok.padding_side = "left" if decoder_only else "right"
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def wrap(model, tok, num_tasks: int = 2) -> PromptedModel:
    prompts = init_prompts(model, tok, num_tasks, P, method="random", seed=1)
    return PromptedModel(model, prompts, [f"t{i}" for i in range(num_tasks)])


def row_logits(logits: torch.Tensor, batch: dict, i: int, decoder_only: bool) -> torch.Tensor:
    """Row i's logits over its real positions (inputs for decoder-only, targets for seq2seq)."""
    if decoder_only:
        n = int(batch["attention_mask"][i].sum())
        return logits[i, -n:]
    n = int((batch["labels"][i] != -100).sum())
    return logits[i, :n]


def manual_loss(logits: torch.Tensor, labels: torch.Tensor, decoder_only: bool, smoothing=0.0):
    """Mean cross-entropy over target tokens (labels != -100), computed independently."""
    if decoder_only:
        logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != -100
    return F.cross_entropy(logits[keep], labels[keep], label_smoothing=smoothing)


def test_no_prompt_row_equals_bare_model(tiny):
    name, model, tok = tiny
    decoder_only = name != "tiny-t5"
    pm = wrap(model, tok)
    batch = make_batch(tok, ROWS, decoder_only)
    with torch.no_grad():
        out = pm(**batch, task_ids=torch.tensor(MIXED_IDS))
        alone = make_batch(tok, [ROWS[1]], decoder_only)
        bare = model(**alone)
    # The -1 row sits among prompted rows of other lengths, yet sees exactly the bare model.
    diff = (row_logits(out.logits, batch, 1, decoder_only) - bare.logits[0]).abs().max()
    assert diff < ATOL
    # The prompt is really used: prompted rows differ from the bare model on their text.
    with torch.no_grad():
        bare0 = model(**make_batch(tok, [ROWS[0]], decoder_only)).logits[0]
    assert (row_logits(out.logits, batch, 0, decoder_only) - bare0).abs().max() > 1e-2


@pytest.mark.parametrize("task_ids", [None, [-1, -1, -1]])
def test_batch_without_prompts_equals_bare_model(tiny, task_ids):
    name, model, tok = tiny
    decoder_only = name != "tiny-t5"
    pm = wrap(model, tok)
    batch = make_batch(tok, ROWS, decoder_only)
    ids = None if task_ids is None else torch.tensor(task_ids)
    with torch.no_grad():
        out = pm(**batch, task_ids=ids)
        for i, row in enumerate(ROWS):
            bare = model(**make_batch(tok, [row], decoder_only))
            got = row_logits(out.logits, batch, i, decoder_only)
            assert (got - bare.logits[0]).abs().max() < ATOL
    # No prompt positions were added: logits match the input (or target) length exactly.
    key = "input_ids" if decoder_only else "labels"
    assert out.logits.shape[:2] == batch[key].shape


def test_model_sees_documented_layout(tiny):
    name, model, tok = tiny
    decoder_only = name != "tiny-t5"
    pm = wrap(model, tok)
    seen = {}
    model.register_forward_pre_hook(lambda _m, _a, kw: seen.update(kw), with_kwargs=True)
    batch = make_batch(tok, ROWS, decoder_only)
    with torch.no_grad():
        pm(**batch, task_ids=torch.tensor(MIXED_IDS))
    mask = batch["attention_mask"]
    width = mask.shape[1]
    n = mask.sum(dim=1).tolist()  # real tokens per row
    if decoder_only:
        # [pads][prompt][text] for prompted rows, [pads + P masked placeholders][text] for -1.
        real = [n[0] + P, n[1], n[2] + P]
        expected = torch.tensor([[0] * (width + P - r) + [1] * r for r in real])
        positions = torch.tensor([[0] * (width + P - r) + list(range(r)) for r in real])
        assert torch.equal(seen["position_ids"], positions)
        # Prompt rows occupy the P positions right before the text.
        embeds = seen["inputs_embeds"]
        start = width + P - real[0]
        assert torch.equal(embeds[0, start : start + P], pm.prompts[0])
    else:
        # [prompt or P masked placeholders][text][right padding]
        rows = [[1] * P + [1] * n[0], [0] * P + [1] * n[1], [1] * P + [1] * n[2]]
        expected = torch.tensor([r + [0] * (width + P - len(r)) for r in rows])
        assert torch.equal(seen["inputs_embeds"][2, :P], pm.prompts[1])
    assert torch.equal(seen["attention_mask"], expected)


def test_mixed_batch_equals_rows_alone(tiny):
    name, model, tok = tiny
    decoder_only = name != "tiny-t5"
    pm = wrap(model, tok, num_tasks=3)
    task_ids = [2, -1, 0]
    batch = make_batch(tok, ROWS, decoder_only)
    with torch.no_grad():
        out = pm(**batch, task_ids=torch.tensor(task_ids))
        for i, (row, task) in enumerate(zip(ROWS, task_ids, strict=True)):
            one = make_batch(tok, [row], decoder_only)
            alone = pm(**one, task_ids=torch.tensor([task]))
            got = row_logits(out.logits, batch, i, decoder_only)
            assert (got - alone.logits[0]).abs().max() < ATOL
            # Row i's loss read off the batched logits equals its loss alone.
            row_loss = manual_loss(out.logits[i : i + 1], batch["labels"][i : i + 1], decoder_only)
            assert row_loss.item() == pytest.approx(alone.loss.item(), abs=ATOL)


def test_loss_covers_target_tokens_only(tiny):
    name, model, tok = tiny
    decoder_only = name != "tiny-t5"
    pm = wrap(model, tok)
    batch = make_batch(tok, ROWS, decoder_only)
    with torch.no_grad():
        out = pm(**batch, task_ids=torch.tensor(MIXED_IDS))
    # Callers never see prompt positions: logits align with input_ids (or the labels for T5) ...
    key = "input_ids" if decoder_only else "labels"
    assert out.logits.shape[:2] == batch[key].shape
    # ... and the model's loss is exactly the cross-entropy over the target tokens of those
    # logits, so no prompt position (nor any input position) contributes.
    expected = manual_loss(out.logits, batch["labels"], decoder_only)
    assert out.loss.item() == pytest.approx(expected.item(), abs=ATOL)
    # The stage loops' own loss (label smoothing, token sums) reads the same aligned logits.
    smooth, _ = token_loss(out.logits, batch["labels"], label_smoothing=0.1, shift=decoder_only)
    expected_smooth = manual_loss(out.logits, batch["labels"], decoder_only, smoothing=0.1)
    assert smooth.item() == pytest.approx(expected_smooth.item(), abs=ATOL)
    assert smooth.item() != pytest.approx(out.loss.item(), abs=1e-3)


def test_stage1_step_changes_only_prompts_of_batch_tasks(tiny):
    name, model, tok = tiny
    decoder_only = name != "tiny-t5"
    model.train()  # dropout is 0, so train mode is deterministic too
    pm = wrap(model, tok, num_tasks=3)
    pm.set_trainable("prompt")
    assert pm.prompts.requires_grad
    assert not any(p.requires_grad for p in model.parameters())
    before_model = {k: v.clone() for k, v in model.state_dict().items()}
    before_prompts = pm.prompts.detach().clone()
    # Every parameter goes to the optimizer: frozen ones must stay untouched regardless.
    optimizer = torch.optim.Adam(pm.parameters(), lr=0.1)
    batch = make_batch(tok, ROWS, decoder_only)
    pm(**batch, task_ids=torch.tensor([0, -1, 2])).loss.backward()
    optimizer.step()
    after = model.state_dict()
    assert all(torch.equal(before_model[k], after[k]) for k in before_model)
    assert torch.equal(pm.prompts[1], before_prompts[1])  # task 1 is not in the batch
    assert not torch.equal(pm.prompts[0], before_prompts[0])
    assert not torch.equal(pm.prompts[2], before_prompts[2])


def test_prompt_gradient_is_bit_identical_across_runs_with_threads():
    """Stage 1 on two CPU threads must repeat itself: the prompt table's gradient from a batch
    of 32 rows of one task is the same, bit for bit, every time (the backward of
    ``prompts[ids]`` accumulated in a varying order and made two demo runs diverge)."""
    model, tok = build_tiny("tiny-t5")
    prompts = init_prompts(model, tok, 2, 20, method="random", seed=1)
    pm = PromptedModel(model, prompts, ["t0", "t1"])
    pm.set_trainable("prompt")
    rows = [(f"input number {i} " * (1 + i % 4), f"out {i}") for i in range(32)]
    batch = make_batch(tok, rows, decoder_only=False)
    task_ids = torch.zeros(32, dtype=torch.long)  # a stage-1 batch of one task
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(4):
            pm.prompts.grad = None
            pm(**batch, task_ids=task_ids).loss.backward()
            grads.append(pm.prompts.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert grads[0].abs().sum() > 0
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@pytest.mark.parametrize("mode", ["model", "both"])
def test_trainable_modes_route_gradients(tiny, mode):
    name, model, tok = tiny
    decoder_only = name != "tiny-t5"
    pm = wrap(model, tok, num_tasks=3)
    pm.set_trainable(mode)
    batch = make_batch(tok, ROWS, decoder_only)
    pm(**batch, task_ids=torch.tensor([0, -1, 2])).loss.backward()
    embedding_grad = model.get_input_embeddings().weight.grad
    assert embedding_grad is not None and embedding_grad.abs().sum() > 0
    assert all(p.requires_grad for p in model.parameters())
    if mode == "model":
        assert not pm.prompts.requires_grad
        assert pm.prompts.grad is None  # stage 2: the frozen bank prompts get no gradient
    else:
        grad = pm.prompts.grad
        assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0
        assert torch.equal(grad[1], torch.zeros_like(grad[1]))  # absent task


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_batched_equals_per_row_and_bare(tiny, num_beams):
    name, model, tok = tiny
    decoder_only = name != "tiny-t5"
    pm = wrap(model, tok)
    texts = [x for x, _ in ROWS]
    # Random-init models emit EOS at once: no EOS, a fixed budget, and compare scores as well
    # as tokens (random T5 tends to repeat one token, so tokens alone say little).
    opts = dict(
        max_new_tokens=5,
        eos_token_id=None,
        num_beams=num_beams,
        do_sample=False,
        return_dict_in_generate=True,
        output_scores=True,
    )
    batch = gen_batch(tok, texts, decoder_only)
    out = pm.generate(**batch, task_ids=torch.tensor(MIXED_IDS), **opts)
    assert out.sequences.shape == (len(texts), 5)  # new tokens only, both families

    def check(got, ref, i: int) -> None:
        assert torch.equal(got.sequences[i], ref.sequences[0])
        if num_beams == 1:
            for step_got, step_ref in zip(got.scores, ref.scores, strict=True):
                assert (step_got[i] - step_ref[0]).abs().max() < ATOL
        else:
            assert got.sequences_scores[i].item() == pytest.approx(
                ref.sequences_scores[0].item(), abs=ATOL
            )

    for i, (text, task) in enumerate(zip(texts, MIXED_IDS, strict=True)):
        one = gen_batch(tok, [text], decoder_only)
        check(out, pm.generate(**one, task_ids=torch.tensor([task]), **opts), i)
    # The no-prompt row equals the bare model's own generate from input_ids.
    one = gen_batch(tok, [texts[1]], decoder_only)
    bare = model.generate(**one, **opts)
    skip = one["input_ids"].shape[1] if decoder_only else 1  # prompt text / decoder start
    bare.sequences = bare.sequences[:, skip:]
    check(out, bare, 1)


def test_generate_returns_new_tokens_tensor(tiny):
    name, model, tok = tiny
    pm = wrap(model, tok)
    batch = gen_batch(tok, ["abc", "de"], name != "tiny-t5")
    ids = pm.generate(**batch, task_ids=torch.tensor([1, 0]), max_new_tokens=3, eos_token_id=None)
    assert isinstance(ids, torch.Tensor) and ids.shape == (2, 3)


def test_task_ids_maps_names():
    model, tok = build_tiny("tiny-gpt2")
    pm = PromptedModel(model, torch.zeros(2, P, 64), ["rte", "cb"])
    ids = pm.task_ids(["cb", None, "rte"])
    assert ids.dtype == torch.long and ids.tolist() == [1, -1, 0]
    with pytest.raises(ValueError, match="'wmt'"):
        pm.task_ids(["rte", "wmt"])


def test_bad_inputs_raise():
    model, tok = build_tiny("tiny-gpt2")
    pm = PromptedModel(model, torch.zeros(2, P, 64))
    assert pm.task_names == ["task0", "task1"] and pm.prompt_length == P
    batch = make_batch(tok, ROWS, decoder_only=True)
    with pytest.raises(ValueError, match="out of range"):
        pm(**batch, task_ids=torch.tensor([0, 2, -1]))
    with pytest.raises(ValueError, match="left-padded"):
        right = torch.tensor([[1, 1, 0]])
        pm(input_ids=torch.tensor([[5, 6, 0]]), attention_mask=right)
    with pytest.raises(ValueError, match="shape"):
        PromptedModel(model, torch.zeros(2, P, 32))
    with pytest.raises(ValueError, match="3 task names"):
        PromptedModel(model, torch.zeros(2, P, 64), ["a", "b", "c"])
    with pytest.raises(ValueError, match="unknown trainable part"):
        pm.set_trainable("all")


def test_without_prompt_table_is_bare_model():
    model, tok = build_tiny("tiny-llama")
    pm = PromptedModel(model)
    assert pm.prompts is None and pm.prompt_length == 0 and pm.task_names == []
    batch = make_batch(tok, ROWS[:1], decoder_only=True)
    with torch.no_grad():
        got = pm(**batch, task_ids=torch.tensor([-1]))
        bare = model(**batch)
    assert torch.allclose(got.logits, bare.logits, atol=ATOL)
    assert got.loss.item() == pytest.approx(bare.loss.item(), abs=ATOL)
    with pytest.raises(ValueError, match="out of range"):
        pm(**batch, task_ids=torch.tensor([0]))
    with pytest.raises(ValueError, match="no prompt table"):
        pm.set_trainable("prompt")
    pm.set_trainable("model")
    assert all(p.requires_grad for p in model.parameters())


def test_init_prompts_random_matches_embedding_spread():
    model, tok = build_tiny("tiny-gpt2")  # embedding std ~0.02: far below Lester's [-0.5, 0.5]
    std = model.get_input_embeddings().weight.std().item()
    prompts = init_prompts(model, tok, 3, 50, method="random", seed=0)
    assert prompts.shape == (3, 50, 64) and prompts.dtype == torch.float32
    assert prompts.std().item() == pytest.approx(std, rel=0.1)
    assert prompts.abs().max().item() <= 3**0.5 * std + 1e-7
    assert torch.equal(prompts, init_prompts(model, tok, 3, 50, method="random", seed=0))
    assert not torch.equal(prompts, init_prompts(model, tok, 3, 50, method="random", seed=1))


def test_init_prompts_vocab_samples_non_special_token_embeddings():
    model, tok = build_tiny("tiny-t5")
    weight = model.get_input_embeddings().weight.detach()
    prompts = init_prompts(model, tok, 2, 20, method="vocab", seed=0)
    assert prompts.shape == (2, 20, 64)
    special = set(tok.all_special_ids)
    for prompt in prompts:
        # Each position is exactly one vocabulary row (ByT5 has 384 < 5000 ids: all usable).
        rows = [int((weight == vec).all(dim=1).nonzero()[0]) for vec in prompt]
        assert not special & set(rows)
        assert len(set(rows)) == 20  # sampled without replacement
    assert not torch.equal(prompts[0], prompts[1])


def test_init_prompts_text_cycles_to_length():
    model, tok = build_tiny("tiny-gpt2")
    weight = model.get_input_embeddings().weight.detach()
    prompts = init_prompts(model, tok, 2, 5, method="text", texts=["ab", "True False"])
    a, b = _ids(tok, "a")[0], _ids(tok, "b")[0]
    assert torch.equal(prompts[0], weight[[a, b, a, b, a]])
    assert torch.equal(prompts[1], weight[_ids(tok, "True ")])  # truncated to 5 tokens
    with pytest.raises(ValueError, match="one text per task"):
        init_prompts(model, tok, 2, 5, method="text", texts=["ab"])
    with pytest.raises(ValueError, match="no tokens"):
        init_prompts(model, tok, 1, 5, method="text", texts=[""])
    with pytest.raises(ValueError, match="unknown prompt init"):
        init_prompts(model, tok, 1, 5, method="zeros")


class FakeBank:
    """Stands in for PromptBank: records load_prompt calls."""

    def __init__(self, prompts: dict[str, torch.Tensor]):
        self.prompts = prompts
        self.calls: list[tuple[str, object]] = []

    def load_prompt(self, ref: str, model=None) -> torch.Tensor:
        self.calls.append((ref, model))
        return self.prompts[ref]


def test_from_bank_stacks_current_or_pinned_prompts():
    model, _ = build_tiny("tiny-gpt2")
    bank = FakeBank(
        {
            "rte": torch.full((P, 64), 1.0),
            "cb": torch.full((P, 64), 2.0),
            "cb@v0001": torch.full((P, 64), 3.0),
            "short": torch.zeros(2, 64),
        }
    )
    pm = PromptedModel.from_bank(model, bank, ["cb", "rte"])
    assert pm.task_names == ["cb", "rte"]
    assert pm.prompts[:, 0, 0].tolist() == [2.0, 1.0]
    assert bank.calls == [("cb", model), ("rte", model)]
    pinned = PromptedModel.from_bank(model, bank, ["rte", "cb"], refs={"cb": "cb@v0001"})
    assert pinned.prompts[:, 0, 0].tolist() == [1.0, 3.0]
    with pytest.raises(ValueError, match="differ in shape"):
        PromptedModel.from_bank(model, bank, ["rte", "short"])


def test_zero_length_prompt_equals_bare_model(tiny):
    """Decoder parity (issue 27): a prompt of length 0 adds nothing, so every row, prompted or
    not, sees exactly the bare model."""
    name, model, tok = tiny
    decoder_only = name != "tiny-t5"
    dim = model.get_input_embeddings().weight.shape[-1]
    pm = PromptedModel(model, torch.zeros(2, 0, dim), ["t0", "t1"])
    batch = make_batch(tok, ROWS, decoder_only)
    with torch.no_grad():
        out = pm(**batch, task_ids=torch.tensor(MIXED_IDS))
        for i, row in enumerate(ROWS):
            bare = model(**make_batch(tok, [row], decoder_only)).logits[0]
            assert (row_logits(out.logits, batch, i, decoder_only) - bare).abs().max() < ATOL
