"""Stage 2: fine-tune the model on a mixture while every row carries its task's frozen prompt.

``stage2.mode`` names a method kind (:data:`multipromot.methods.KINDS`: ``promot``,
``standard``, ``random_prompt``, ``joint``, ``hft``, ``lora``, ``promot_lora``); its table entry
says what trains, which prompt table or adapters the rows get, and whether it may be sharded.
Each works with k-shot exemplars. Their number has one owner, :func:`resolve_shots`: the method
label's ``+Kshot`` (``run`` writes it into ``stage2.shots``), else ``stage2.shots``, else the
mixture header's ``exemplars.shots``; stage 2 prints which one decided and records it.

The recipe reads in three parts, as torchtune's do: :func:`setup` builds everything from the
config (:class:`Stage2Run`), :func:`train` is the loop, and the export
(:mod:`multipromot.train.stage2_export`) writes ``best/`` and ``final/``. The model for a kind
is built in :mod:`multipromot.train.stage2_model`, checkpoints are kept by
:class:`~multipromot.train.stage2_checkpoints.Checkpoints`.

One process trains unsharded; under ``torchrun --nproc_per_node N`` the model is sharded with
FSDP2 and each rank draws its own positions of the one global sample stream, so the ranks
together see exactly the batches one process would (``batch_size`` is the global batch). The
loss is a sum over target tokens divided by the global token count, so N processes, or
gradient accumulation, give the one-process result to float rounding.

Outputs under ``out_dir``: ``checkpoints/step_<N>/`` (sharded, atomic, exact resume),
``best/`` (the best validated weights so far, if ``keep_best_by`` selects), ``final/`` (the
selected weights; what makes it complete: :mod:`multipromot.train.stage2_export`),
``metrics.jsonl`` and ``tensorboard/``.

At scale (docs/guides/scale-out.md): SIGTERM/SIGUSR1 finish the current step on every rank,
write a checkpoint and exit with status 128 + the signal (143 for SIGTERM, 138 for SIGUSR1) by
raising :class:`Preempted`; rerunning continues from it, also with another number of ranks
(dcp reshards; the sampler continues the same global stream). A resume compares the
checkpoint's recorded settings with the config: :data:`RESUME_REFUSED` keys must match,
:data:`RESUME_APPLIED` ones may change and are announced.

Why this module is over 500 lines: the setup, the loop and its step helpers (the accumulated
forward/backward, validation and best-step selection, the resume checks) all read and advance
one :class:`Stage2Run`; what does not (the model per kind, checkpoints, the export) lives in
its own module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from multipromot.config import RunConfig, model_seed, parse_size, resolve_path
from multipromot.data.batches import batches_from_draws
from multipromot.data.collate import Collator
from multipromot.data.exemplars import shots_kept
from multipromot.data.mixtures import Mixture, load_mixture
from multipromot.data.sampler import MixtureSampler
from multipromot.errors import UserError
from multipromot.eval.generation import validate_tasks
from multipromot.features import IGNORE_INDEX
from multipromot.methods import MIN_SHOTS_KEPT, MethodKind, method_kind
from multipromot.train import distributed as D
from multipromot.train import hft, sdft
from multipromot.train.checkpoint import load_checkpoint, read_trainer_state
from multipromot.train.common import (
    MetricsLogger,
    Throughput,
    lr_schedule,
    token_loss,
    use_data_mirror,
)
from multipromot.train.metrics_log import MetricsLog
from multipromot.train.stage2_checkpoints import Checkpoints
from multipromot.train.stage2_export import Stage2Record, export_model, finish
from multipromot.train.stage2_model import build_stage2_optimizer, load_prompted, stage2_settings

__all__ = [
    "finetune",
    "setup",
    "train",
    "Stage2Run",
    "resolve_shots",
    "Preempted",
    "RESUME_REFUSED",
    "RESUME_APPLIED",
]

# Recorded in every checkpoint and compared on resume. Changing one of these midway would make
# the continued run neither the old one nor the new one: refused, naming the keys.
RESUME_REFUSED = (
    "model",
    "seed",
    "model_seed",
    "mixture",
    "tasks",
    "mode",
    "shots",
    "optimizer",
    "lr",
    "prompt_lr",
    "weight_decay",
    "warmup_steps",
    "decay",
    "batch_size",
    "max_grad_norm",
    "label_smoothing",
    "max_input_length",
    "max_target_length",
    "keep_best_by",
    "prompt_shots",
    "freeze_bottom",
    "lora",
    "hft",
    "sdft",
    "replay",
)
# Safe to change on resume (the gradient of a step is the same to float rounding, or only the
# schedule's end moves): applied, and said so. The other keys (save_every, eval_every, ...)
# are bookkeeping and may change silently.
RESUME_APPLIED = (
    "steps",
    "grad_accum",
    "group_by_length",
    "bf16",
    "mixed_precision",
    "activation_checkpointing",
    "cpu_offload",
)


class Preempted(SystemExit):
    """Stage 2 stopped on SIGTERM/SIGUSR1 after checkpointing; ``code`` = 128 + the signal.

    A ``SystemExit``, so the command exits with that status and no traceback; research code
    can catch it by this name.
    """


def resolve_shots(
    stage2_shots: int, mixture: Mixture, *, label: str | None = None
) -> tuple[int, str]:
    """Exemplars per stage-2 example and what decided it: ``stage2.shots`` when >= 0 (``run``
    sets it from a method's ``+Kshot``: ``label`` names that method), else the mixture
    header's ``exemplars.shots``."""
    if stage2_shots >= 0:
        return stage2_shots, f"method label {label!r}" if label else "stage2.shots"
    return mixture.shots, f"exemplars.shots of mixture {mixture.name!r}"


def finetune(cfg: RunConfig, *, progress: bool = True, label: str | None = None) -> Path:
    """Run stage 2 as ``cfg.stage2`` says; resume from a checkpoint if there is one.

    Under torchrun every rank calls this; the process group is joined and left here.

    Args:
        cfg: the run config (``model``, ``seed``, ``out_dir``, ``bank.dir``, ``stage2.*``).
        progress: show the progress bar (rank 0 only).
        label: the method label whose ``+Kshot`` ``run`` wrote into ``stage2.shots`` (what
            the record says decided the shots).

    Returns:
        The run's output directory (``final/`` inside holds the selected model).

    Raises:
        UserError: a bad mixture, model, bank entry, checkpoint or config value.
        Preempted: SIGTERM or SIGUSR1 arrived; the last step is checkpointed.
    """
    created = D.init_distributed()
    try:
        run = setup(cfg, progress=progress, label=label)
        train(run)
        finish(
            run.out,
            run.best["step"],
            lambda folder: run.export(folder, step=max(run.start, cfg.stage2.steps)),
            bank_dir=run.record.bank_dir,
            bank_refs=run.record.bank_refs,
        )
        return run.out
    finally:
        D.teardown(created)


@dataclass
class Stage2Run:
    """Everything :func:`setup` builds from the config; :func:`train` advances it.

    ``start``, ``losses`` and ``best`` are the loop's state, saved in every checkpoint (with
    the settings a resume is compared against and the bank refs the prompts came from).
    """

    cfg: RunConfig
    kind: MethodKind
    out: Path
    mixture: Mixture
    shots: int
    prompted: torch.nn.Module
    tokenizer: object
    build: Callable
    record: Stage2Record
    optimizer: torch.optim.Optimizer
    scheduler: object
    sampler: MixtureSampler
    collator: Collator
    checkpoints: Checkpoints
    settings: dict
    rows: int  # rows per micro-batch on this rank
    accum: int  # micro-batches per step
    shard_bytes: int | None
    progress: bool
    start: int = 0
    losses: list = dataclasses.field(default_factory=list)
    best: dict = dataclasses.field(default_factory=dict)

    @property
    def task_ids(self) -> list[int]:
        """Each mixture task's row in the prompt table (-1: no prompt; a ``shared`` adapter is
        on every row). Replay tasks are not the mixture's tasks: they have no row."""
        if not self.kind.prompted and self.kind.adapters != "per_task":
            return [-1] * len(self.mixture.tasks)
        return list(range(len(self.mixture.tasks)))

    @property
    def order(self) -> str:
        """Row order inside a step: one task per micro-batch where rows cannot mix adapters
        while training, by length when asked, else as drawn."""
        if self.kind.adapters == "per_task":
            return "task"
        return "length" if self.cfg.stage2.group_by_length else "drawn"

    def batches(self) -> list[dict]:
        """This rank's micro-batches of the next step: its next ``rows * accum`` draws of the
        one global stream (the mixture's tasks, then its replay tasks: no prompt, their own
        exemplars)."""
        task_ids, shots = self.mixture.stream_rows(self.task_ids, self.shots)
        return batches_from_draws(
            self.mixture.stream().tasks,
            self.sampler.take(self.rows * self.accum),
            self.collator,
            batch_size=self.rows,
            shots=shots,
            seed=self.mixture.exemplar_seed,
            task_ids=task_ids,
            order=self.order,
        )

    def checkpoint(self, step: int) -> Path:
        """Save the loop's state at ``step`` (a collective)."""
        return self.checkpoints.save(
            step,
            model=self.prompted,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            sampler=self.sampler,
            state={
                "mode": self.kind.name,
                "bank_refs": self.record.bank_refs,
                "bank_sha256": self.record.bank_sha256,
                "losses": self.losses,
                "best": self.best,
                "settings": self.settings,
            },
        )

    def export(self, folder: Path, *, step: int, selected_by: str = "last", value=None) -> None:
        """Export the current weights as a model folder (a collective under FSDP)."""
        record = dataclasses.replace(self.record, step=step, selected_by=selected_by, value=value)
        export_model(
            self.prompted,
            self.build,
            self.tokenizer,
            folder,
            record,
            self.kind,
            shard_bytes=self.shard_bytes,
        )


def setup(cfg: RunConfig, *, progress: bool = True, label: str | None = None) -> Stage2Run:
    """Build stage 2 from the config: check the kind and the resume point (before any model is
    loaded), then the model, optimizer, schedule, sample stream and collator, and restore the
    checkpoint a run continues from.

    Raises:
        UserError: a kind that trains in one process under torchrun, a batch that does not
            split over the ranks, a checkpoint of another kind or other settings, k-shot
            inputs that keep fewer than ``methods.MIN_SHOTS_KEPT`` of their exemplars.
    """
    s2 = cfg.stage2
    kind = method_kind(s2.mode, file=cfg.config_file or None)
    use_data_mirror(cfg)
    out = Path(cfg.out_dir)
    full = kind.trainable in ("model", "both") and kind.adapters is None and kind.freezing is None
    if s2.freeze_bottom and not full:
        raise UserError(
            f"freezes layers of a full fine-tuning; {kind.name} is not one",
            key="stage2.freeze_bottom",
        )
    if kind.single_process and (D.is_distributed() or s2.export_shard_size):
        raise UserError(
            f"{kind.name} trains in one process, without stage2.export_shard_size",
            key="stage2.mode",
        )
    rows, accum = _micro_batch(s2.batch_size, s2.grad_accum, D.world_size())
    best = {"by": s2.keep_best_by, "step": None, "value": None}
    checkpoints = Checkpoints(
        out / "checkpoints",
        keep_last=s2.keep_last,
        async_save=s2.async_save,
        protected=lambda: {best["step"]} if best["step"] is not None else set(),
    )
    resume_from, saved = _resume_point(checkpoints, s2.resume, kind)
    torch.manual_seed(cfg.seed)
    mixture = load_mixture(resolve_path(cfg, s2.mixture))
    shots, shots_from = resolve_shots(s2.shots, mixture, label=label)
    settings = _settings(cfg, kind, mixture, shots)
    if saved is not None:  # refused before the model is even loaded
        _check_settings(saved.get("settings"), settings, resume_from, progress)
    targets = {}
    if kind.targets == "self_distilled":  # the base model's rewrites, before the model loads
        mixture, targets = sdft.distilled(cfg, mixture, shots, progress=progress and D.is_main())
    prompted, tokenizer, build, record = load_prompted(
        cfg,
        kind,
        mixture,
        saved and saved["bank_refs"],
        saved and saved.get("bank_sha256"),
        prompt_shots=shots if s2.prompt_shots < 0 else s2.prompt_shots,
    )
    record.shots, record.shots_from = shots, shots_from
    record.targets = targets
    record.replay = mixture.replay.record() if mixture.replayed else {}
    if D.is_main() and progress:
        print(f"stage 2 ({kind.name}, {mixture.name}): {shots}-shot examples ({shots_from})")
    optimizer = build_stage2_optimizer(prompted, kind, cfg)
    run = Stage2Run(
        cfg=cfg,
        kind=kind,
        out=out,
        mixture=mixture,
        shots=shots,
        prompted=prompted,
        tokenizer=tokenizer,
        build=build,
        record=record,
        optimizer=optimizer,
        scheduler=lr_schedule(
            optimizer, warmup_steps=s2.warmup_steps, total_steps=s2.steps, decay=s2.decay
        ),
        sampler=MixtureSampler(
            mixture.stream(), seed=cfg.seed, rank=D.rank(), world_size=D.world_size()
        ),
        collator=Collator(
            tokenizer,
            decoder_only=not prompted.is_encoder_decoder,
            max_input_length=s2.max_input_length,
            max_target_length=s2.max_target_length,
        ),
        checkpoints=checkpoints,
        settings=settings,
        rows=rows,
        accum=accum,
        shard_bytes=parse_size(s2.export_shard_size) if s2.export_shard_size else None,
        progress=progress,
        best=best,
    )
    run.record.shots_kept = _shots_kept(run)
    if resume_from is not None:
        _restore(run, resume_from)
    D.on_rank0(MetricsLog(out).trim, run.start, stage=2)  # the steps it logs again
    return run


def _shots_kept(run: Stage2Run) -> dict[str, float]:
    """Per task, the exemplars its k-shot inputs keep on average within
    ``stage2.max_input_length`` (the collator drops the rest); recorded in ``stage2.json``.

    Raises:
        UserError: a task keeps fewer than ``MIN_SHOTS_KEPT`` of the shots asked.
    """
    _, shots = run.mixture.stream_rows(run.task_ids, run.shots)
    kept = {}
    for i, (task, k) in enumerate(zip(run.mixture.stream().tasks, shots, strict=True)):
        if not k:
            continue
        kept[task.name] = shots_kept(task, run.collator, k, seed=run.mixture.exemplar_seed)
        if kept[task.name] < MIN_SHOTS_KEPT * k:
            what = run.record.shots_from if i < len(run.mixture.tasks) else "replay.shots"
            raise UserError(
                f"{k}-shot training ({what}), but task {task.name!r}'s "
                f"inputs keep {kept[task.name]:.2f} exemplars on average within "
                f"stage2.max_input_length={run.cfg.stage2.max_input_length} tokens; ask for "
                "fewer shots or raise stage2.max_input_length",
                key="stage2.max_input_length",
            )
    return kept


def _resume_point(checkpoints: Checkpoints, resume: str, kind: MethodKind):
    """The checkpoint a run continues from and its trainer state (None, None: start fresh).

    Raises:
        UserError: the checkpoint was trained as another kind.
    """
    path = checkpoints.resume_point(resume)
    saved = read_trainer_state(path) if path else None
    if saved is not None and saved.get("mode") != kind.name:
        raise UserError(
            f"the checkpoint was trained with mode {saved.get('mode')!r}, this run asks for "
            f"{kind.name!r}",
            file=path,
            key="stage2.mode",
        )
    return path, saved


def _restore(run: Stage2Run, path: Path) -> None:
    """Load a checkpoint into the run: weights, optimizer, schedule, sample stream, RNG and the
    loop's state (step, losses, best step)."""
    trainer = load_checkpoint(
        path,
        model=run.prompted,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        sampler=run.sampler,
    )
    run.start, run.losses = trainer["step"], trainer["losses"]
    run.best.update(trainer["best"])
    if D.is_main() and run.progress:
        print(
            f"stage 2: resumed from step {run.start} ({path}, written by "
            f"{trainer['world_size']} process(es), now {D.world_size()})"
        )


def train(run: Stage2Run) -> None:
    """The loop: from ``run.start`` to ``stage2.steps``, one optimizer step per global batch;
    validation (and the best step's export) every ``eval_every``, a checkpoint every
    ``save_every``, and on SIGTERM/SIGUSR1 a checkpoint and :class:`Preempted`.

    Raises:
        UserError: a non-finite loss or gradient norm (before the weights are updated).
        Preempted: a stop signal arrived; the step it arrived in is checkpointed.
    """
    cfg, s2 = run.cfg, run.cfg.stage2
    logger = MetricsLogger(run.out, enabled=D.is_main(), trackers=cfg.log.to)
    speed = Throughput()
    bar = tqdm(
        total=s2.steps,
        initial=run.start,
        desc=f"stage 2 ({run.kind.name})",
        dynamic_ncols=True,
        disable=not (run.progress and D.is_main()),
    )
    trainable = [p for p in run.prompted.parameters() if p.requires_grad]
    decoder_only = not run.prompted.is_encoder_decoder
    run.prompted.train()
    with D.PreemptionGuard() as guard:
        for step in range(run.start + 1, s2.steps + 1):
            if run.kind.freezing == "half_per_round":
                hft.freeze_for_step(
                    run.prompted.model, step, seed=cfg.seed, round_steps=cfg.hft.round_steps
                )
            loss, tokens = _forward_backward(
                run.prompted,
                run.batches(),
                decoder_only=decoder_only,
                label_smoothing=s2.label_smoothing,
                bf16=s2.bf16,
            )
            max_norm = s2.max_grad_norm if s2.max_grad_norm > 0 else float("inf")
            grad_norm = _scalar(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                _stop_not_finite(run, step, loss, grad_norm)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.losses.append([step, loss])

            tokens_per_s = speed.update(tokens)
            bar.update(1)
            if _due(step, s2.log_every, s2.steps):
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
                lr = run.scheduler.get_last_lr()[0]
                logger.log(
                    {
                        "stage": 2,
                        "step": step,
                        "loss": loss,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens_per_s": tokens_per_s,
                    },
                    step=step,
                )
            if s2.eval_every > 0 and _due(step, s2.eval_every, s2.steps):
                _validate_and_select(run, step, logger)
            saved_now = _due(step, s2.save_every, s2.steps)
            if saved_now:
                run.checkpoint(step)
            signum = guard.stop_requested()
            if signum is not None:
                bar.close()
                logger.close()
                _preempt(run, step, signum, saved_now)
    run.checkpoints.settle()
    bar.close()
    logger.close()


def _validate_and_select(run: Stage2Run, step: int, logger: MetricsLogger) -> None:
    """Validate; when the step is the best so far, export it to ``best/``."""
    s2 = run.cfg.stage2
    record = _validate(run, s2, D.device())
    logger.log({"stage": 2, "step": step, **record}, step=step)
    best = run.best
    if _improved(best, record):
        best.update(step=step, value=record[_best_key(best["by"])])
        run.export(run.out / "best", step=step, selected_by=best["by"], value=best["value"])


def _stop_not_finite(run: Stage2Run, step: int, loss: float, grad_norm: float) -> None:
    """Stop before the optimizer step: the weights and every checkpoint stay finite."""
    run.checkpoints.settle()
    last = run.checkpoints.latest()
    raise UserError(
        f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}; stopped "
        f"before updating the weights; last good checkpoint: {last or 'none'} (lower "
        "stage2.lr or check the data, then resume)",
        key="stage2",
    )


def _preempt(run: Stage2Run, step: int, signum: int, saved_now: bool) -> None:
    """The step is finished: keep it and leave before the scheduler kills the job."""
    path = run.checkpoint(step) if not saved_now else run.checkpoints.root / f"step_{step}"
    run.checkpoints.settle()
    if D.is_main():
        print(
            f"stage 2: {signal.Signals(signum).name} at step {step}: checkpoint {path}; run the "
            "same command again to continue (stage2.resume=latest), with any number of "
            "processes",
            file=sys.stderr,
        )
    raise Preempted(128 + signum)


# -- one step -------------------------------------------------------------------------------


def _micro_batch(batch_size: int, grad_accum: int, world: int) -> tuple[int, int]:
    """Rows per micro-batch on each rank, and micro-batches per step."""
    if batch_size % (grad_accum * world):
        raise UserError(
            f"the global batch {batch_size} must split evenly over grad_accum={grad_accum} "
            f"x {world} process(es)",
            key="stage2.batch_size",
        )
    return batch_size // (grad_accum * world), grad_accum


def _forward_backward(
    prompted, batches, *, decoder_only, label_smoothing, bf16
) -> tuple[float, int]:
    """Accumulate the gradient of the global token-mean loss over this rank's micro-batches.

    Returns:
        (the step's loss over all ranks' target tokens, tokens processed by all ranks).
    """
    device = D.device()
    local = [_target_count(b["labels"], decoder_only) for b in batches]
    (total,) = D.sum_across_ranks([sum(local)])
    # Each micro-batch adds its token sum / the global count; FSDP then *averages* gradients
    # over ranks, so multiply by the world size to keep the sum.
    scale = D.world_size() / max(total, 1.0)
    loss_sum, tokens = 0.0, 0
    for i, batch in enumerate(batches):
        D.set_gradient_sync(prompted, i == len(batches) - 1)
        batch = {k: v.to(device) for k, v in batch.items()}
        extra = {}
        if not decoder_only:  # decoder inputs from the labels, without the model's own loss
            extra["decoder_input_ids"] = prompted.model.prepare_decoder_input_ids_from_labels(
                labels=batch["labels"]
            )
        with _autocast(bf16, device):
            out = prompted(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                task_ids=batch["task_ids"],
                **extra,
            )
        loss, n = token_loss(
            out.logits, batch["labels"], label_smoothing=label_smoothing, shift=decoder_only
        )
        (loss * n * scale).backward()
        loss_sum += float(loss.detach() * n)
        tokens += int(batch["attention_mask"].sum()) + (0 if decoder_only else local[i])
    loss_total, tokens_total = D.sum_across_ranks([loss_sum, tokens])
    return loss_total / max(total, 1.0), int(tokens_total)


def _due(step: int, every: int, last: int) -> bool:
    """Every ``every`` steps (never if ``every`` <= 0), and always at the last step."""
    return step == last or (every > 0 and step % every == 0)


def _target_count(labels: torch.Tensor, decoder_only: bool) -> int:
    """Target tokens token_loss will count (decoder-only: after the one-position shift)."""
    return int((labels[:, 1:] if decoder_only else labels).ne(IGNORE_INDEX).sum())


def _autocast(bf16: str, device: torch.device):
    """bf16 autocast when asked, or by default where the device has fast bf16 (not the CPU)."""
    on = bf16 == "true" or (
        bf16 == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


def _scalar(value) -> float:
    if hasattr(value, "full_tensor"):  # a DTensor under FSDP
        value = value.full_tensor()
    return float(value)


# -- validation and selection -----------------------------------------------------------------


def _validate(run: Stage2Run, s2, device) -> dict:
    """Validation loss (and the task metric when selecting by it) on every fine-tuned task,
    with the exemplars the model trains with.

    Every rank evaluates the same examples: FSDP needs all ranks in every forward, and the
    ranks then agree on the best step without another collective.
    """
    with _autocast(s2.bf16, device):
        results = validate_tasks(
            run.prompted,
            run.tokenizer,
            run.mixture.tasks,
            run.collator,
            examples=s2.eval_examples,
            with_metric=s2.keep_best_by == "metric",
            task_ids=run.task_ids,
            max_new_tokens=s2.max_target_length,
            shots=run.shots,
            seed=run.mixture.exemplar_seed,
        )
    record: dict = {"validation": results}
    record["val_loss"] = sum(r["loss"] for r in results.values()) / len(results)
    if all("score" in r for r in results.values()):
        record["val_score"] = sum(r["score"] for r in results.values()) / len(results)
    return record


def _best_key(by: str) -> str:
    return "val_score" if by == "metric" else "val_loss"


def _improved(best: dict, record: dict) -> bool:
    if best["by"] == "none":
        return False
    value = record[_best_key(best["by"])]
    if best["value"] is None:
        return True
    return value > best["value"] if best["by"] == "metric" else value < best["value"]


# -- resuming with other settings --------------------------------------------------------------


def _settings(cfg: RunConfig, kind: MethodKind, mixture: Mixture, shots: int) -> dict:
    """What a checkpoint records of the run that wrote it (compared on resume)."""
    s2 = cfg.stage2
    keys = [k for k in RESUME_REFUSED + RESUME_APPLIED if hasattr(s2, k)]
    return {
        **{k: getattr(s2, k) for k in keys},
        "model": cfg.model,
        "seed": cfg.seed,
        "model_seed": model_seed(cfg),
        "mixture": mixture.name,
        "tasks": mixture.task_names,
        "shots": shots,
        **stage2_settings(cfg, kind),
        # only with a replay: older checkpoints' settings stay comparable
        **({"replay": mixture.replay.record()} if mixture.replayed else {}),
    }


def _check_settings(saved: dict | None, now: dict, path: Path, progress: bool) -> None:
    """Refuse a resume whose arithmetic settings differ from the checkpoint's (one line naming
    every differing key); announce the safe changes that are applied.

    Raises:
        UserError: a :data:`RESUME_REFUSED` key differs.
    """
    if saved is None:  # a checkpoint from before settings were recorded: only mode is known
        return
    changed = {k: (saved.get(k), now[k]) for k in now if k in saved and saved[k] != now[k]}
    refused = [k for k in RESUME_REFUSED if k in changed]
    if refused:
        diff = ", ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused)
        raise UserError(
            f"the checkpoint was trained with other settings ({diff}); resume with its values "
            "or start a fresh out_dir",
            file=path,
            key="stage2",
        )
    applied = [k for k in RESUME_APPLIED if k in changed]
    if applied and D.is_main() and progress:
        diff = ", ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in applied)
        print(f"stage 2: resuming with changed settings, applied: {diff}")
