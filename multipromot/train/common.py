"""Plain helpers shared by the stage-1 and stage-2 loops (and the lab's pretraining):
optimizer, schedule, the one token loss, metrics logging (``metrics.jsonl`` plus the trackers
of ``log.to``: TensorBoard, Weights & Biases, Trackio, MLflow) and throughput.

Each loop stays one explicit ``for step`` loop in its own module; what they share lives here.
Batches come from :mod:`multipromot.data.batches`.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from multipromot.config import RunConfig, resolve_path
from multipromot.data.mirror import set_mirror
from multipromot.errors import UserError
from multipromot.features import IGNORE_INDEX
from multipromot.train.metrics_log import MetricsLog

__all__ = [
    "build_optimizer",
    "lr_schedule",
    "token_loss",
    "MetricsLogger",
    "Throughput",
    "TRACKERS",
    "check_trackers",
    "use_data_mirror",
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
            params,
            lr=lr,
            relative_step=False,
            scale_parameter=scale_parameter,
            warmup_init=False,
            weight_decay=weight_decay,
        )
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


TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")
# the module each tracker needs, checked before anything trains
_TRACKER_MODULES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "trackio": "trackio",
    "mlflow": "mlflow",
}


def check_trackers(names: Sequence[str], *, file: str | None = None) -> list[str]:
    """Validate ``log.to``: known tracker names, each installed.

    Args:
        names: tracker names, e.g. ``["tensorboard", "wandb"]``.
        file: the config file, for the error message.

    Returns:
        The names, in order, without repeats.

    Raises:
        UserError: an unknown name, or a tracker whose package is not installed.
    """
    chosen = list(dict.fromkeys(names))
    for name in chosen:
        if name not in TRACKERS:
            raise UserError(
                f"unknown tracker {name!r}; use {', '.join(TRACKERS)}", file=file, key="log.to"
            )
        if importlib.util.find_spec(_TRACKER_MODULES[name]) is None:
            raise UserError(
                f"{name} is not installed (pip install {name})", file=file, key="log.to"
            )
    return chosen


class _TensorBoard:
    def __init__(self, out_dir: Path, run_name: str):
        from torch.utils.tensorboard import SummaryWriter  # heavy: only when asked for

        self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    """Offline with ``WANDB_MODE=offline`` (wandb's own switch); files under ``WANDB_DIR``,
    else the run's directory."""

    def __init__(self, out_dir: Path, run_name: str):
        import wandb  # optional extra; heavy

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "multipromot"),
            name=run_name,
            dir=os.environ.get("WANDB_DIR") or str(out_dir),
            reinit="create_new",  # stage 1 and each method's stage 2 are runs of their own
        )

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    """Trackio keeps its runs in a local database by default (no network)."""

    def __init__(self, out_dir: Path, run_name: str):
        import trackio  # optional extra

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "multipromot"), name=run_name)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.trackio.log(scalars, step=step)

    def close(self) -> None:
        self.trackio.finish()


class _Mlflow:
    """``MLFLOW_TRACKING_URI`` if set, else a local file store in the run's ``mlruns/``."""

    def __init__(self, out_dir: Path, run_name: str):
        from mlflow.tracking import MlflowClient  # optional extra; heavy

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (out_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "multipromot")
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment, run_name=run_name).info.run_id

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.client.log_metric(self.run_id, key, value, step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


_TRACKER_CLASSES = {
    "tensorboard": _TensorBoard,
    "wandb": _Wandb,
    "trackio": _Trackio,
    "mlflow": _Mlflow,
}


class MetricsLogger:
    """Appends one JSON object per record to ``metrics.jsonl`` and sends the same scalars (the
    record's numbers but ``step``, for records that have a step) to every tracker of ``log.to``.

    Only the writing rank should construct one with ``enabled=True``.

    Args:
        out_dir: the run (or stage) directory; ``metrics.jsonl`` and ``tensorboard/`` go here.
        enabled: False on ranks that do not write.
        trackers: names from :data:`TRACKERS` (``log.to``); default TensorBoard only.
        run_name: the run's name in trackers that show one (default: ``out_dir``'s name).

    Raises:
        UserError: an unknown or uninstalled tracker (:func:`check_trackers`), on every rank.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        enabled: bool = True,
        trackers: Sequence[str] = ("tensorboard",),
        run_name: str | None = None,
    ):
        names = check_trackers(trackers)
        self.enabled = enabled
        self.file = MetricsLog(out_dir)
        self._trackers: list = []
        if enabled:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            name = run_name or Path(out_dir).resolve().name
            for tracker in names:
                self._trackers.append(_TRACKER_CLASSES[tracker](Path(out_dir), name))

    def log(self, record: dict, *, step: int | None = None) -> None:
        if not self.enabled:
            return
        self.file.append(record)
        if step is None or not self._trackers:
            return
        scalars = {
            key: float(value)
            for key, value in record.items()
            if isinstance(value, (int, float)) and key != "step"
        }
        if scalars:
            for tracker in self._trackers:
                tracker.log(scalars, step)

    def close(self) -> None:
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []


def use_data_mirror(cfg: RunConfig) -> None:
    """Make the config's ``data.mirror`` (if set) the folder hub datasets load from in this
    process; every command that reads a config's data calls it before loading any."""
    if cfg.data.mirror:
        set_mirror(resolve_path(cfg, cfg.data.mirror))
