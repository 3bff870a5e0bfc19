"""Half Fine-Tuning (HFT; Hui et al. 2024, "HFT: Half Fine-Tuning for Large Language Models"):
fine-tune like ``standard``, but in every round of ``hft.round_steps`` steps a random half of
the model's parameter groups is frozen, so about half of the pretrained weights stay as they
were in each round.

A group is one parameter tensor (a projection matrix, a layer norm, an embedding; tied tensors
count once), the granularity at which HFT chooses. Round r (steps ``r * round_steps + 1`` to
``(r + 1) * round_steps``) freezes ``floor(n / 2)`` of the ``n`` groups, drawn from a generator
seeded by the run's seed and r alone: a resumed run freezes exactly what an uninterrupted one
did. A frozen tensor gets no gradient, so neither AdamW nor Adafactor moves it (their steps skip
parameters without a gradient), weight decay included.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["groups", "frozen_groups", "freeze_for_step"]


def groups(model: nn.Module) -> list[str]:
    """The parameter groups HFT chooses among: every parameter tensor, by name, once."""
    return [name for name, _ in model.named_parameters()]


def frozen_groups(names: list[str], *, seed: int, round_index: int) -> set[str]:
    """The half of ``names`` frozen in round ``round_index`` (determined by the seed)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + round_index)
    order = torch.randperm(len(names), generator=generator).tolist()
    return {names[i] for i in order[: len(names) // 2]}


def freeze_for_step(model: nn.Module, step: int, *, seed: int, round_steps: int) -> set[str]:
    """Set ``requires_grad`` for step ``step`` (1-based): its round's half frozen, the other
    half trainable. Returns the frozen names."""
    frozen = frozen_groups(groups(model), seed=seed, round_index=(step - 1) // round_steps)
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
    return frozen
