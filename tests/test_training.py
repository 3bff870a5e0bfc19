"""Shared loop helpers: schedules, token-weighted loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from multipromot.train.common import build_optimizer, lr_schedule, token_loss


def factors(decay, warmup=2, total=6, final=0.0):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([param], "adamw", lr=1.0)
    sched = lr_schedule(
        opt, warmup_steps=warmup, total_steps=total, decay=decay, final_fraction=final
    )
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_warmup_then_schedules():
    assert factors("constant") == pytest.approx([0.5, 1, 1, 1, 1, 1])
    # After warmup, progress runs 0, 1/4, 2/4, 3/4 over the remaining steps (1.0 = after the end).
    assert factors("linear") == pytest.approx([0.5, 1, 1, 0.75, 0.5, 0.25])
    cos = [0.5 * (1 + math.cos(math.pi * p)) for p in (0, 0.25, 0.5, 0.75)]
    assert factors("cosine") == pytest.approx([0.5, 1, *cos])
    assert factors("cosine", final=0.2)[-1] == pytest.approx(0.2 + 0.8 * cos[-1])


def test_token_loss_ignores_masked_positions_and_combines_exactly():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[1, 2, -100, -100, -100], [3, 4, 5, 6, -100]])
    loss, n = token_loss(logits, labels)
    keep = labels != -100
    expected = F.cross_entropy(logits[keep], labels[keep])
    assert int(n) == 6
    assert torch.allclose(loss, expected)
    # Two halves weighted by their token counts give the whole batch's loss.
    (l1, n1), (l2, n2) = token_loss(logits[:1], labels[:1]), token_loss(logits[1:], labels[1:])
    assert torch.allclose((l1 * n1 + l2 * n2) / (n1 + n2), loss)


def test_token_loss_shift_for_decoder_only():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 7)
    labels = torch.tensor([[-100, 2, 3, 1]])
    loss, n = token_loss(logits, labels, shift=True)
    expected = F.cross_entropy(logits[0, :3], torch.tensor([2, 3, 1]))
    assert int(n) == 3 and torch.allclose(loss, expected)


def test_label_smoothing_raises_loss_of_confident_predictions():
    logits = torch.full((1, 1, 4), -10.0)
    logits[0, 0, 2] = 10.0
    labels = torch.tensor([[2]])
    plain, _ = token_loss(logits, labels)
    smooth, _ = token_loss(logits, labels, label_smoothing=0.1)
    assert smooth > plain + 0.5


def test_adafactor_scale_parameter_moves_weights_relative_to_their_size():
    """T5's recipe for model weights: a step is lr x the weight's RMS, not lr (prompts: off)."""
    moved = {}
    for scale in (False, True):
        torch.manual_seed(0)
        param = torch.nn.Parameter(torch.randn(8, 8) * 0.01)  # RMS ~0.01, like a T5 projection
        before = param.detach().clone()
        opt = build_optimizer([param], "adafactor", lr=1e-2, scale_parameter=scale)
        param.grad = torch.randn(8, 8)
        opt.step()
        moved[scale] = (param.detach() - before).pow(2).mean().sqrt().item()
    assert moved[False] == pytest.approx(1e-2, rel=0.05)
    assert moved[True] == pytest.approx(1e-2 * 0.01, rel=0.2)


def _two_task_mixture(tmp_path):
    from multipromot.data.mixtures import load_mixture

    path = tmp_path / "mix.yaml"
    path.write_text("name: two\nversion: 1\ntasks:\n  - task: lab_qa\n  - task: lab_sum\n")
    return load_mixture(path)


def test_batches_ordered_by_task_keep_the_rows_and_separate_tasks(tmp_path):
    from transformers import ByT5Tokenizer

    from multipromot.data.batches import batches_from_draws
    from multipromot.data.collate import Collator
    from multipromot.data.sampler import MixtureSampler

    mixture = _two_task_mixture(tmp_path)
    collator = Collator(ByT5Tokenizer(), decoder_only=False, max_input_length=400)

    def rows(group: bool) -> list[list[tuple[int, tuple[int, ...]]]]:
        draws = MixtureSampler(mixture, seed=3).take(32)  # one window of 8 batches
        batches = batches_from_draws(
            mixture.tasks, draws, collator, batch_size=4, order="task" if group else "drawn"
        )
        return [
            [
                (int(t), tuple(ids[m.bool()].tolist()))
                for t, ids, m in zip(
                    b["task_ids"], b["input_ids"], b["attention_mask"], strict=True
                )
            ]
            for b in batches
        ]

    drawn, grouped = rows(False), rows(True)
    # The same rows (the same draws), only their order inside the window moved.
    assert sorted(r for b in grouped for r in b) == sorted(r for b in drawn for r in b)
    mixed = [b for b in drawn if len({t for t, _ in b}) > 1]
    assert mixed, "the drawn order should mix the two tasks in some batch"
    # Grouped: at most one batch straddles the boundary between the two tasks.
    assert sum(len({t for t, _ in b}) > 1 for b in grouped) <= 1

    # Sorted by length inside each task: far less padding than the drawn order.
    def padding(batches) -> int:
        return sum(
            max(len(ids) for _, ids in b) * len(b) - sum(len(ids) for _, ids in b) for b in batches
        )

    assert padding(grouped) < padding(drawn) / 2


def test_predict_sorts_by_length_and_returns_outputs_in_item_order():
    """Batches are cut from rows sorted by length; each output still lands on its own item, and
    equals what the row gives alone."""
    from multipromot.data.collate import Collator
    from multipromot.eval.generation import predict
    from multipromot.features import Item
    from multipromot.models import build_builtin
    from multipromot.soft_prompt import PromptedModel, init_prompts

    model, tok = build_builtin("tiny-t5", 0)
    model.eval()
    with torch.no_grad():  # a random-init T5 ends at once; keep eos and pad from winning
        model.shared.weight[[tok.eos_token_id, tok.pad_token_id]] = 0.0
    prompts = init_prompts(model, tok, 2, 3, method="random", seed=0)
    prompted = PromptedModel(model, prompts, ["a", "b"])
    lengths = [3, 40, 7, 25, 1, 60, 12, 33, 5]
    items = [Item(i % 3 - 1, "x" * n + str(i), "") for i, n in enumerate(lengths)]
    collator = Collator(tok, decoder_only=False, max_input_length=128, for_generation=True)

    class Recorder:
        """Wraps the collator to see the batches predict builds."""

        def __init__(self):
            self.batches = []

        def __call__(self, batch):
            self.batches.append([len(item.input) for item in batch])
            return collator(batch)

    recorder = Recorder()
    together = predict(prompted, tok, items, recorder, batch_size=4, max_new_tokens=5)
    alone = [predict(prompted, tok, [item], collator, max_new_tokens=5)[0] for item in items]
    assert together == alone
    assert len(set(together)) > 1  # rows differ, so a mix-up of the order would show
    flat = [n for batch in recorder.batches for n in batch]
    assert flat == sorted(flat, reverse=True)
