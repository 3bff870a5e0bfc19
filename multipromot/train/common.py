"""Plain helpers shared by the stage-1 and stage-2 loops (and the lab's pretraining):
optimizer, schedule, the one token loss, metrics logging and throughput.

Each loop stays one explicit ``for step`` loop in its own module; what they share lives here.
Batches come from :mod:`multipromot.data.batches`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from multipromot.features import IGNORE_INDEX

__all__ = [
    "build_optimizer",
    "lr_schedule",
    "token_loss",
    "MetricsLogger",
    "Throughput",
]


def build_optimizer(
    params: Iterable,
    name: str,
    lr: float,
    weight_decay: float = 0.0,
    *,
    scale_parameter: bool = False,
) -> torch.optim.Optimizer:
    """Adafactor (the paper's choice) or AdamW.

    Adafactor runs with a fixed learning rate (``relative_step`` off), as in the paper's setups.
    ``scale_parameter`` multiplies each step by the parameter's RMS: T5's own recipe for
    training model weights (a weight initialised at RMS 0.02 moves by 2% of ``lr``, not by
    ``lr``), off for soft prompts (prompt tuning's recipe). A param group may set it too.
    Without it a 1M-parameter lab T5 at lr 1e-2 stalled at loss 1.2; with it, it learned
    (multipromot/lab/model.py).
    """
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params, lr=lr, relative_step=False, scale_parameter=scale_parameter,
            warmup_init=False, weight_decay=weight_decay,
        )  # fmt: skip
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")


def lr_schedule(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    decay: str = "constant",
    final_fraction: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then constant, linear or cosine decay to ``final_fraction`` of the peak."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        if decay == "linear":
            shape = 1.0 - progress
        elif decay == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            raise ValueError(f"unknown decay {decay!r}")
        return final_fraction + (1.0 - final_fraction) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def token_loss(
    logits: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0, shift: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the target tokens (labels != -100).

    Args:
        logits: [B, L, V]
        labels: [B, L], -100 where no loss is taken.
        label_smoothing: the paper uses 0.1 in stage 2.
        shift: True for decoder-only models (position t predicts token t + 1).

    Returns:
        (loss, number of target tokens). Summing ``loss * n`` over micro-batches and ranks and
        dividing by the summed ``n`` gives the same value as one big batch.
    """
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    n = (labels != IGNORE_INDEX).sum()
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    return loss / n.clamp(min=1), n


class Throughput:
    """Tokens per second over a sliding window of recent steps."""

    def __init__(self, window: int = 20):
        self.window = window
        self.marks: list[tuple[float, int]] = []
        self.total = 0

    def update(self, tokens: int) -> float:
        self.total += tokens
        self.marks.append((time.perf_counter(), self.total))
        self.marks = self.marks[-self.window :]
        if len(self.marks) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return (n1 - n0) / max(t1 - t0, 1e-9)


class MetricsLogger:
    """Appends one JSON object per record to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

    Only the writing rank should construct one with ``enabled=True``.
    """

    def __init__(
        self, out_dir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True
    ):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
                except ImportError:  # tensorboard is optional at run time
                    self._tb = None

    def log(self, record: dict, *, step: int | None = None) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        if self._tb is not None and step is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
