"""Stage 1: prompt tuning. The model is frozen; one soft prompt per task of the mixture.

All tasks train in one run, each row gathering its own task's prompt, so a prompt's gradient
comes only from its own rows. By default (``stage1.batching=task``) the rows are cut into
batches of one task and similar length: a mixture of short and long formats padded together
wastes about half of every batch (benchmarks/RESULTS.md, item 2). Each task is validated on
its own metric every ``eval_every`` steps and the best step's prompt (per task) goes to the
bank. Only trained steps compete: the step-0 prompt is validated (the curve's start) but never
stored; ties go to the lower validation loss, then to the later step.

Resume: after every validation the prompts, the optimizer, the scheduler, the batch stream,
the RNG states and the best prompt so far per task are checkpointed under
``<out_dir>/stage1/checkpoints`` (:mod:`multipromot.train.checkpoint`, atomic; only the prompts
are saved, the frozen model is not). A rerun with the same settings continues from the latest
checkpoint and ends with the same prompts as an uninterrupted run; a checkpoint made from other
settings (:func:`made_from`) is not resumed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from multipromot.bank import BankEntry, PromptBank, describe_model
from multipromot.bank.entry import format_record
from multipromot.config import RunConfig, bank_dir, model_seed, resolve_path
from multipromot.data.batches import batches_from_draws
from multipromot.data.collate import Collator
from multipromot.data.mixtures import load_mixture, mixture_fingerprint
from multipromot.data.sampler import MixtureSampler
from multipromot.errors import UserError
from multipromot.eval.generation import validate_tasks
from multipromot.fsio import json_sha256
from multipromot.models import is_encoder_decoder, load_model
from multipromot.soft_prompt import PromptedModel, init_prompts
from multipromot.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from multipromot.train.common import (
    MetricsLogger,
    Throughput,
    build_optimizer,
    lr_schedule,
    use_data_mirror,
)
from multipromot.train.metrics_log import MetricsLog

__all__ = [
    "train_prompts",
    "stage1_folder",
    "setup",
    "train",
    "Stage1Run",
    "batch_stream",
    "made_from",
    "BatchStream",
    "Best",
    "better",
]

# stage1.* keys that do not change the prompts (how often to log)
_NOT_RESULT_KEYS = ("log_every",)


@dataclass
class Best:
    """The best validation result seen so far for one task, and what was trained at that step
    (a prompt here; a LoRA adapter's state in promot_lora's stage 1)."""

    value: float
    loss: float
    step: int
    metric: str
    weights: Any


def better(new: Best, old: Best | None, higher_is_better: bool, ties: str = "loss") -> bool:
    """The better candidate: the task's value, then (``ties=loss``) the lower validation loss,
    then the later step, so that a tie does not keep an earlier, less trained prompt;
    ``ties=first`` keeps the earlier step on equal values."""
    if old is None:
        return True
    if new.value != old.value:
        return new.value > old.value if higher_is_better else new.value < old.value
    if ties == "first":
        return False
    if new.loss != old.loss:
        return new.loss < old.loss
    return new.step > old.step


def made_from(cfg: RunConfig, mixture=None) -> dict:
    """What stage 1's prompts are made from: the model, the seed, every ``stage1.*`` key that
    changes them and the fingerprint of the mixture's data. A result (or a checkpoint) is reused
    only when this record is equal.

    Args:
        cfg: the run config.
        mixture: the loaded ``stage1.mixture`` (loaded here if not given).

    Returns:
        A JSON-able record.
    """
    s1 = asdict(cfg.stage1)
    for key in _NOT_RESULT_KEYS:
        s1.pop(key)
    s1["mixture"] = resolve_path(cfg, cfg.stage1.mixture)
    mixture = mixture or load_mixture(s1["mixture"])
    return {
        "model": cfg.model,
        "seed": cfg.seed,
        "model_seed": model_seed(cfg),
        "stage1": s1,
        "data": mixture_fingerprint(mixture),
    }


class _Trained(nn.Module):
    """What a stage-1 checkpoint holds: the trained prompt table and the best prompt per task
    so far (a buffer, so it travels in the same atomic checkpoint); not the frozen model."""

    def __init__(self, prompts: nn.Parameter):
        super().__init__()
        self.prompts = prompts
        self.register_buffer("best", prompts.detach().clone())


def stage1_folder(shots: int) -> str:
    """The folder under ``out_dir`` of stage 1 tuned with ``shots`` exemplars (checkpoints,
    metrics.jsonl): ``stage1`` for 0-shot prompts, ``stage1_Kshot`` otherwise."""
    return "stage1" if shots == 0 else f"stage1_{shots}shot"


def train_prompts(cfg: RunConfig, *, progress: bool = True) -> list[BankEntry]:
    """Train one soft prompt per task of ``cfg.stage1.mixture`` and add them to the bank.

    Args:
        cfg: the run config (``model``, ``seed``, ``bank.dir``, ``stage1.*``, ``out_dir``).
        progress: show a progress bar.

    Returns:
        The new bank entries, one per task, in mixture order.

    Raises:
        UserError: a bad mixture, model or config value, or a non-finite loss.
    """
    run = setup(cfg, progress=progress)
    train(run)
    return _write_to_bank(run)


@dataclass
class Stage1Run:
    """What a stage-1 setup builds; :func:`train` advances it. What trains per task is a soft
    prompt here (:func:`setup`) or a LoRA adapter (``train.stage1_lora``): ``snapshot(i, task)``
    copies the i-th task's trained weights, and ``best`` keeps each task's best step's copy
    (what is stored at the end)."""

    cfg: RunConfig
    tasks: list
    model: nn.Module  # called on a batch; only its per-task weights train
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    collator: Collator
    batches: BatchStream
    snapshot: Callable[[int, Any], Any]
    out_dir: Path
    progress: bool
    label: str = "stage 1"
    lr_key: str = "stage1.lr"  # what to lower when the loss is not finite
    trained: _Trained | None = None  # checkpointed prompts (None: no checkpoints)
    record: dict | None = None  # what the checkpoints were made from
    model_path: str = ""
    shots: int = 0  # exemplars in front of every example and validation input
    exemplar_seed: int = 0
    start: int = 0
    best: dict[str, Best] = field(default_factory=dict)


def setup(cfg: RunConfig, *, progress: bool = True) -> Stage1Run:
    """The frozen model with a prompt table (``stage1.init``), the optimizer over the prompts
    alone, the batch stream; continued from the latest checkpoint made from the same settings."""
    s1 = cfg.stage1
    use_data_mirror(cfg)
    torch.manual_seed(cfg.seed)
    model, tokenizer, model_path = load_model(cfg.model, seed=model_seed(cfg))
    mixture = load_mixture(resolve_path(cfg, s1.mixture))
    tasks = mixture.tasks
    texts = None
    if s1.init == "text":
        texts = [s1.init_text or " ".join(t.answers or [t.name]) for t in tasks]
    prompts = init_prompts(
        model, tokenizer, len(tasks), s1.prompt_length, method=s1.init, texts=texts, seed=cfg.seed
    )
    prompted = PromptedModel(model, prompts, [t.name for t in tasks])
    prompted.set_trainable("prompt")
    model.eval()  # the model is frozen: no dropout noise on the prompt's gradient
    optimizer = build_optimizer([prompted.prompts], s1.optimizer, s1.lr, s1.weight_decay)
    collator = Collator(
        tokenizer,
        decoder_only=not is_encoder_decoder(model),
        max_input_length=s1.max_input_length,
        max_target_length=s1.max_target_length,
    )
    sampler = MixtureSampler(mixture, seed=cfg.seed)
    run = Stage1Run(
        cfg=cfg,
        tasks=tasks,
        model=prompted,
        tokenizer=tokenizer,
        model_path=model_path,
        snapshot=lambda i, task: prompted.prompts[i].detach().clone(),
        optimizer=optimizer,
        scheduler=lr_schedule(optimizer, warmup_steps=s1.warmup_steps, total_steps=s1.steps),
        collator=collator,
        batches=batch_stream(
            tasks,
            sampler,
            collator,
            s1.batch_size,
            by_task=s1.batching == "task",
            shots=s1.shots,
            seed=mixture.exemplar_seed,
        ),
        trained=_Trained(prompted.prompts),
        record=made_from(cfg, mixture),
        out_dir=Path(cfg.out_dir) / stage1_folder(s1.shots),
        progress=progress,
        shots=s1.shots,
        exemplar_seed=mixture.exemplar_seed,
    )
    run.start = _resume(run)
    MetricsLog(run.out_dir).trim(run.start, stage=1)  # what it logs again (all, if it starts over)
    return run


def train(run: Stage1Run) -> None:
    """The loop: one step per batch up to ``stage1.steps``; every ``eval_every`` steps each
    task is validated on its own metric (its best step's prompt kept) and a checkpoint is
    written.

    Raises:
        UserError: a non-finite loss (nothing of this run reaches the bank).
    """
    s1 = run.cfg.stage1
    logger = MetricsLogger(run.out_dir, trackers=run.cfg.log.to)
    speed = Throughput()
    if run.start == 0:
        _validate(run, 0, logger)
    bar = tqdm(
        range(run.start + 1, s1.steps + 1),
        desc=run.label,
        disable=not run.progress,
        dynamic_ncols=True,
    )
    for step in bar:
        batch = next(run.batches)
        loss = run.model(**batch).loss
        if not torch.isfinite(loss):
            raise UserError(
                f"non-finite loss ({loss.item()}) at step {step} of {run.label}; nothing it "
                f"trained was stored (lower {run.lr_key} or check the data)",
                key=run.lr_key,
            )
        loss.backward()
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)

        tokens_per_s = speed.update(int(batch["attention_mask"].sum()))
        if step % s1.log_every == 0 or step == s1.steps:
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_per_s:,.0f}")
            lr = run.scheduler.get_last_lr()[0]
            record = {"stage": 1, "step": step, "loss": loss.item(), "lr": lr}
            logger.log({**record, "tokens_per_s": tokens_per_s}, step=step)
        if step % s1.eval_every == 0 or step == s1.steps:
            _validate(run, step, logger)
            if run.trained is not None:
                _checkpoint(run, step)
    logger.close()


def _validate(run: Stage1Run, step: int, logger: MetricsLogger) -> None:
    """Score every task; keep each task's best trained weights so far (step 0, the untrained
    prompt or adapter, is scored for the curve but never kept)."""
    s1 = run.cfg.stage1
    select = "score" if s1.select_by == "metric" else "loss"
    results = validate_tasks(
        run.model,
        run.tokenizer,
        run.tasks,
        run.collator,
        examples=s1.eval_examples,
        with_metric=select == "score",
        shots=run.shots,
        seed=run.exemplar_seed,
    )
    logger.log({"stage": 1, "step": step, "validation": results})
    if step == 0:
        return
    for i, task in enumerate(run.tasks):
        r = results[task.name]
        name = task.metric if select == "score" else "loss"
        new = Best(r[select], r["loss"], step, name, run.snapshot(i, task))
        if better(new, run.best.get(task.name), select == "score", s1.ties):
            run.best[task.name] = new


def _checkpoint(run: Stage1Run, step: int) -> None:
    """The prompts, each task's best prompt and score so far, the optimizer, schedule and
    batch stream, atomically."""
    with torch.no_grad():
        for i, task in enumerate(run.tasks):
            run.trained.best[i].copy_(run.best[task.name].weights)
    saved = {
        t: {"value": b.value, "loss": b.loss, "step": b.step, "metric": b.metric}
        for t, b in run.best.items()
    }
    save_checkpoint(
        run.out_dir / "checkpoints",
        step,
        model=run.trained,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        sampler=run.batches,
        state={"made_from": run.record, "best": saved},
    )


def _resume(run: Stage1Run) -> int:
    """Load the latest stage-1 checkpoint made from the same settings into ``run``; returns its
    step (0 when there is none, or it was made from other settings)."""
    path = latest_checkpoint(run.out_dir / "checkpoints")
    if path is None:
        return 0
    try:
        state = read_trainer_state(path)
    except UserError:
        state = {}  # unreadable: started over, like one made from other settings
    if state.get("made_from") != run.record:
        if run.progress:
            print(f"stage 1: not resuming {path} (made from other settings or data)")
        return 0
    state = load_checkpoint(
        path,
        model=run.trained,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        sampler=run.batches,
    )
    for i, task in enumerate(run.tasks):
        b = state["best"][task.name]
        weights = run.trained.best[i].detach().clone()
        run.best[task.name] = Best(b["value"], b["loss"], b["step"], b["metric"], weights)
    if run.progress:
        print(f"stage 1: resumed from step {state['step']} ({path})")
    return int(state["step"])


class BatchStream:
    """Endless stage-1 batches (see :func:`batch_stream`) whose position is checkpointable: the
    sampler state at the start of the current window of draws and how many of its batches were
    taken. Restoring redraws that window and skips the batches already trained on."""

    def __init__(
        self,
        tasks,
        sampler,
        collator,
        batch_size: int,
        *,
        by_task: bool,
        shots: int = 0,
        seed: int = 0,
    ):
        self.tasks, self.sampler, self.collator = tasks, sampler, collator
        self.batch_size, self.by_task = batch_size, by_task
        self.shots, self.seed = shots, seed
        self._window: list[dict] = []
        self._window_start = sampler.state_dict()
        self._taken = 0

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self._taken >= len(self._window):
            self._window_start = self.sampler.state_dict()
            self._window = self._draw()
            self._taken = 0
        self._taken += 1
        return self._window[self._taken - 1]

    def _draw(self) -> list[dict]:
        rows = 32 * self.batch_size if self.by_task else self.batch_size
        return batches_from_draws(
            self.tasks,
            self.sampler.take(rows),
            self.collator,
            batch_size=self.batch_size,
            shots=self.shots,
            seed=self.seed,
            order="task" if self.by_task else "drawn",
        )

    def state_dict(self) -> dict:
        """JSON-able position: the window's starting sampler state and the batches taken."""
        return {"window_start": self._window_start, "taken": self._taken}

    def load_state_dict(self, state: dict) -> None:
        """Continue where :meth:`state_dict` was taken."""
        self.sampler.load_state_dict(state["window_start"])
        self._window_start = self.sampler.state_dict()
        self._taken = int(state["taken"])
        self._window = self._draw() if self._taken else []


def batch_stream(
    tasks, sampler, collator, batch_size: int, *, by_task: bool, shots: int = 0, seed: int = 0
) -> BatchStream:
    """Endless stage-1 batches, each row with ``shots`` same-task exemplars (the exemplar rule
    of stage 2, with the exemplar ``seed``). With ``by_task``, 32 batches' worth of rows are
    drawn at a time and cut into batches of one task and similar length (a frozen model's
    prompt gets its gradient from its own rows whatever shares the batch; the rows and the
    rates are the sampler's, only their order inside a window moves)."""
    return BatchStream(
        tasks, sampler, collator, batch_size, by_task=by_task, shots=shots, seed=seed
    )


def _write_to_bank(run: Stage1Run) -> list[BankEntry]:
    """Each task's best prompt as a new bank entry; its ``stage1`` record says how it was
    selected, the settings it was tuned with (the ``stage1.*`` keys, model and seed: what a
    report that uses the prompt states) and the digest of what it was made from
    (:func:`made_from`), so that another run from the same settings can reuse it."""
    s1 = run.cfg.stage1
    bank = PromptBank(bank_dir(run.cfg))
    settings = {"model": run.record["model"], "seed": run.record["seed"], **run.record["stage1"]}
    base = describe_model(run.model.model, name=run.model_path)
    entries = []
    for task in run.tasks:
        b = run.best[task.name]
        entries.append(
            bank.add(
                task.name,
                b.weights,
                base_model=base,
                init=s1.init,
                format=format_record(task),
                stage1={
                    "steps": s1.steps,
                    "best_step": b.step,
                    "metric": b.metric,
                    "value": b.value,
                    "loss": b.loss,
                    "shots": run.shots,  # the exemplars it was tuned with (and may be used with)
                    "made_from": json_sha256(run.record),
                    "settings": settings,
                },
            )
        )
    return entries
