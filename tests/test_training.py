"""Shared loop helpers: schedules, token-weighted loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from multipromot.training import build_optimizer, lr_schedule, token_loss


def factors(decay, warmup=2, total=6, final=0.0):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = build_optimizer([param], "adamw", lr=1.0)
    sched = lr_schedule(opt, warmup_steps=warmup, total_steps=total, decay=decay, final_fraction=final)
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
