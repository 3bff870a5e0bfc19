"""Stage 2: fine-tune the model on a mixture while every row carries its task's frozen prompt.

One config key, ``stage2.mode``, gives ProMoT and the paper's comparisons:

- ``promot``: each row gets its task's bank prompt, frozen; only the model trains.
- ``standard``: no prompt at all (task id -1 on every row); plain multi-task fine-tuning.
- ``random_prompt``: a fixed random prompt per task (seeded, frozen): the paper's ablation.
- ``joint``: the bank prompts train together with the model, at their own learning rate.
- ``hft``: ``standard`` with a random half of the parameter tensors frozen in each round
  (:mod:`multipromot.train.hft`).
- ``lora``: one LoRA adapter trains, the model is frozen; ``promot_lora``: the model trains with
  each row's frozen task adapter (``lora.adapters``) instead of a prompt
  (:mod:`multipromot.train.lora`). These three train in one process.

Each works with k-shot exemplars. Their number has one owner, :func:`resolve_shots`: the
method label's ``+Kshot`` (``run`` writes it into ``stage2.shots``), else ``stage2.shots``,
else the mixture header's ``exemplars.shots``; stage 2 prints which one decided and records it
in ``stage2.json``.

One process trains unsharded; under ``torchrun --nproc_per_node N`` the model is sharded with
FSDP2 and each rank draws its own positions of the one global sample stream, so the ranks
together see exactly the batches one process would (``batch_size`` is the global batch). The
loss is a sum over target tokens divided by the global token count, so N processes, or
gradient accumulation, give the one-process result to float rounding.

Outputs under ``out_dir``: ``checkpoints/step_<N>/`` (sharded, atomic, exact resume),
``best/`` (the best validated weights so far, if ``keep_best_by`` selects), ``final/`` (the
selected weights + tokenizer, loadable with ``from_pretrained``, with lineage to the base
model so its bank prompts stay accepted), ``metrics.jsonl`` and ``tensorboard/``.

At scale (README "Scale out"): SIGTERM/SIGUSR1 finish the current step on every rank, write a
checkpoint and exit with status 128 + the signal (143 for SIGTERM, 138 for SIGUSR1) by raising
:class:`Preempted`; rerunning continues from it, also with another number of ranks (dcp
reshards; the sampler continues the same global stream). A resume compares the checkpoint's
recorded settings with the config: :data:`RESUME_REFUSED` keys must match,
:data:`RESUME_APPLIED` ones may change and are announced. ``mixed_precision``,
``activation_checkpointing`` and ``cpu_offload`` shape FSDP2; ``export_shard_size`` writes
``final/`` as sharded safetensors without gathering the model on one rank; ``async_save``
writes checkpoints in a background thread (published only once complete; the next save, a
preemption and the end of training wait for it).

Why one module of this size (about 700 lines): the loop, its resume checks, preemption, saving
and best-step selection share the loop's state (step, sampler, optimizer, loss history); the
model variants (FSDP2, LoRA in train/lora.py, HFT in train/hft.py) live in their own modules
and are only called from here.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from multipromot.bank import PromptBank
from multipromot.config import RunConfig, parse_size, resolve_path
from multipromot.data.batches import batches_from_draws
from multipromot.data.collate import Collator
from multipromot.data.mixtures import Mixture, load_mixture
from multipromot.data.sampler import MixtureSampler
from multipromot.errors import UserError
from multipromot.eval.generation import validate_tasks
from multipromot.features import IGNORE_INDEX
from multipromot.fsio import publish_dir, temp_dir_for, write_atomic, write_json
from multipromot.models import load_model, model_fingerprint, read_lineage, save_model
from multipromot.soft_prompt import PromptedModel, init_prompts
from multipromot.train import distributed as D
from multipromot.train import hft, lora
from multipromot.train.checkpoint import (
    BackgroundCheckpointer,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    read_trainer_state,
    resolve_resume,
    save_checkpoint,
)
from multipromot.train.common import (
    MetricsLogger,
    Throughput,
    build_optimizer,
    lr_schedule,
    token_loss,
)
from multipromot.train.export import export_sharded

__all__ = [
    "finetune",
    "resolve_shots",
    "Preempted",
    "TRAINABLE",
    "PROMPT_BANK_DIR",
    "RESUME_REFUSED",
    "RESUME_APPLIED",
]

# What trains in each mode (PromptedModel.set_trainable).
TRAINABLE = {
    "promot": "model",
    "standard": "model",
    "random_prompt": "model",
    "joint": "both",
    "hft": "model",
}
# Modes whose model carries LoRA adapters (train/lora.py) instead of a prompt table.
LORA_MODES = ("lora", "promot_lora")
# Modes that give no row a prompt (task id -1 everywhere; lora's one adapter is on every row).
UNPROMPTED_MODES = ("standard", "hft", "lora")
# Inside an exported model directory: the prompts of the modes whose table is not the bank's
# (joint trains it, random_prompt draws it), as a prompt bank of its own (checksummed entries).
PROMPT_BANK_DIR = "prompt_bank"

# Recorded in every checkpoint and compared on resume. Changing one of these midway would make
# the continued run neither the old one nor the new one: refused, naming the keys.
RESUME_REFUSED = (
    "model",
    "seed",
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
    "lora",
    "hft",
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


def resolve_shots(stage2_shots: int, mixture: Mixture) -> tuple[int, str]:
    """Exemplars per stage-2 example and what decided it: ``stage2.shots`` when >= 0 (``run``
    sets it from a method's ``+Kshot``), else the mixture header's ``exemplars.shots``."""
    if stage2_shots >= 0:
        return stage2_shots, "stage2.shots"
    return mixture.shots, f"exemplars.shots of mixture {mixture.name!r}"


def finetune(cfg: RunConfig, *, progress: bool = True) -> Path:
    """Run stage 2 as ``cfg.stage2`` says; resume from a checkpoint if there is one.

    Under torchrun every rank calls this; the process group is joined and left here.

    Args:
        cfg: the run config (``model``, ``seed``, ``out_dir``, ``bank.dir``, ``stage2.*``).
        progress: show the progress bar (rank 0 only).

    Returns:
        The run's output directory (``final/`` inside holds the selected model).

    Raises:
        UserError: a bad mixture, model, bank entry, checkpoint or config value.
    """
    created = D.init_distributed()
    try:
        return _finetune(cfg, progress)
    finally:
        D.teardown(created)


def _finetune(cfg: RunConfig, progress: bool) -> Path:
    s2 = cfg.stage2
    out = Path(cfg.out_dir)
    if s2.mode in ("hft", *LORA_MODES) and (D.is_distributed() or s2.export_shard_size):
        raise UserError(
            f"{s2.mode} trains in one process, without stage2.export_shard_size", key="stage2.mode"
        )
    rows, accum = _micro_batch(s2.batch_size, s2.grad_accum, D.world_size())
    resume_from = D.on_rank0(resolve_resume, out / "checkpoints", s2.resume)
    saved = read_trainer_state(resume_from) if resume_from else None
    if saved is not None and saved.get("mode") != s2.mode:
        raise UserError(
            f"the checkpoint was trained with mode {saved.get('mode')!r}, this run "
            f"asks for {s2.mode!r}",
            file=resume_from,
            key="stage2.mode",
        )

    torch.manual_seed(cfg.seed)
    mixture = load_mixture(resolve_path(cfg, s2.mixture))
    shots, shots_from = resolve_shots(s2.shots, mixture)
    settings = _settings(cfg, mixture, shots)
    if saved is not None:  # refused before the model is even loaded
        _check_settings(saved.get("settings"), settings, resume_from, progress)
    prompted, tokenizer, build, info = _load_prompted(cfg, mixture, saved and saved["bank_refs"])
    decoder_only = not prompted.is_encoder_decoder
    task_ids = (
        [-1] * len(mixture.tasks)
        if s2.mode in UNPROMPTED_MODES
        else list(range(len(mixture.tasks)))
    )
    # rows of one task per micro-batch where rows cannot mix adapters while training
    order = "task" if s2.mode == "promot_lora" else "length" if s2.group_by_length else "drawn"
    info.update(shots=shots, shots_from=shots_from)
    if D.is_main() and progress:
        print(f"stage 2 ({s2.mode}, {mixture.name}): {shots}-shot examples ({shots_from})")
    device = D.device()

    optimizer = _optimizer(prompted, s2, cfg.lora)
    scheduler = lr_schedule(
        optimizer, warmup_steps=s2.warmup_steps, total_steps=s2.steps, decay=s2.decay
    )
    sampler = MixtureSampler(mixture, seed=cfg.seed, rank=D.rank(), world_size=D.world_size())
    collator = Collator(
        tokenizer,
        decoder_only=decoder_only,
        max_input_length=s2.max_input_length,
        max_target_length=s2.max_target_length,
    )

    start, losses, best = 0, [], {"by": s2.keep_best_by, "step": None, "value": None}
    if resume_from is not None:
        trainer = load_checkpoint(
            resume_from, model=prompted, optimizer=optimizer, scheduler=scheduler, sampler=sampler
        )
        start, losses, best = trainer["step"], trainer["losses"], trainer["best"]
        if D.is_main() and progress:
            print(
                f"stage 2: resumed from step {start} ({resume_from}, written by "
                f"{trainer['world_size']} process(es), now {D.world_size()})"
            )
    D.on_rank0(_trim_metrics, out / "metrics.jsonl", start)  # drop records a kill left behind
    shard_bytes = parse_size(s2.export_shard_size) if s2.export_shard_size else None

    background = BackgroundCheckpointer() if s2.async_save else None

    def save(step: int) -> Path:
        write = save_checkpoint if background is None else background.save
        settle()  # a background save still in flight: published (and pruned) first
        path = write(
            out / "checkpoints",
            step,
            model=prompted,
            optimizer=optimizer,
            scheduler=scheduler,
            sampler=sampler,
            state={
                "mode": s2.mode,
                "bank_refs": info["bank_refs"],
                "losses": losses,
                "best": best,
                "settings": settings,
            },
        )
        if background is None:
            prune()
        return path

    def settle() -> None:
        """Wait for the background save in flight, if any, then prune: pruning only ever
        runs once the checkpoint it keeps is published."""
        if background is not None and background.wait() is not None:
            prune()

    def prune() -> None:
        protect = {best["step"]} if best["step"] is not None else set()
        D.on_rank0(prune_checkpoints, out / "checkpoints", s2.keep_last, protect)

    logger = MetricsLogger(out, enabled=D.is_main(), trackers=cfg.log.to)
    speed = Throughput()
    bar = tqdm(
        total=s2.steps,
        initial=start,
        desc=f"stage 2 ({s2.mode})",
        dynamic_ncols=True,
        disable=not (progress and D.is_main()),
    )
    trainable = [p for p in prompted.parameters() if p.requires_grad]
    prompted.train()
    with D.PreemptionGuard() as guard:
        for step in range(start + 1, s2.steps + 1):
            if s2.mode == "hft":
                hft.freeze_for_step(
                    prompted.model, step, seed=cfg.seed, round_steps=cfg.hft.round_steps
                )
            # This rank's micro-batches: its next rows * accum draws of the one global stream.
            batches = batches_from_draws(
                mixture.tasks,
                sampler.take(rows * accum),
                collator,
                batch_size=rows,
                shots=shots,
                seed=mixture.exemplar_seed,
                task_ids=task_ids,
                order=order,
            )
            loss, tokens = _forward_backward(
                prompted,
                batches,
                decoder_only=decoder_only,
                label_smoothing=s2.label_smoothing,
                bf16=s2.bf16,
            )
            max_norm = s2.max_grad_norm if s2.max_grad_norm > 0 else float("inf")
            grad_norm = _scalar(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                # Stop before the optimizer step: the weights and every checkpoint stay finite.
                settle()
                last = latest_checkpoint(out / "checkpoints")
                raise UserError(
                    f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}; "
                    f"stopped before updating the weights; last good checkpoint: {last or 'none'} "
                    "(lower stage2.lr or check the data, then resume)",
                    key="stage2",
                )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append([step, loss])

            tokens_per_s = speed.update(tokens)
            bar.update(1)
            if _due(step, s2.log_every, s2.steps):
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
                logger.log(
                    {
                        "stage": 2,
                        "step": step,
                        "loss": loss,
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": grad_norm,
                        "tokens_per_s": tokens_per_s,
                    },
                    step=step,
                )

            if s2.eval_every > 0 and _due(step, s2.eval_every, s2.steps):
                record = _validate(prompted, tokenizer, mixture, collator, task_ids, s2, device)
                logger.log({"stage": 2, "step": step, **record}, step=step)
                if _improved(best, record):
                    best.update(step=step, value=record[_best_key(best["by"])])
                    _export(
                        prompted,
                        build,
                        tokenizer,
                        out / "best",
                        info={
                            **info,
                            "step": step,
                            "selected_by": best["by"],
                            "value": best["value"],
                        },
                        shard_bytes=shard_bytes,
                    )

            saved_now = _due(step, s2.save_every, s2.steps)
            if saved_now:
                save(step)
            signum = guard.stop_requested()
            if signum is not None:
                # Preempted: the step is finished; keep it and leave before the scheduler kills.
                path = save(step) if not saved_now else out / "checkpoints" / f"step_{step}"
                settle()
                bar.close()
                logger.close()
                if D.is_main():
                    print(
                        f"stage 2: {signal.Signals(signum).name} at step {step}: checkpoint "
                        f"{path}; run the same command again to continue (stage2.resume="
                        f"latest), with any number of processes",
                        file=sys.stderr,
                    )
                raise Preempted(128 + signum)
    settle()
    bar.close()
    logger.close()
    _finish(
        prompted,
        build,
        tokenizer,
        out,
        best,
        info,
        step=max(start, s2.steps),
        shard_bytes=shard_bytes,
    )
    return out


# -- resuming with other settings --------------------------------------------------------------


def _settings(cfg: RunConfig, mixture: Mixture, shots: int) -> dict:
    """What a checkpoint records of the run that wrote it (compared on resume)."""
    s2 = cfg.stage2
    keys = [k for k in RESUME_REFUSED + RESUME_APPLIED if hasattr(s2, k)]
    return {
        **{k: getattr(s2, k) for k in keys},
        "model": cfg.model,
        "seed": cfg.seed,
        "mixture": mixture.name,
        "tasks": mixture.task_names,
        "shots": shots,
        **_method_settings(cfg),
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


# -- model, prompts, optimizer ----------------------------------------------------------------


def _load_prompted(cfg: RunConfig, mixture: Mixture, refs: dict | None):
    """The PromptedModel for ``cfg.stage2.mode``, sharded when there are several ranks.

    Rank 0 alone loads the model (and builds a built-in one into the cache, so ranks never
    race on it) and reads the bank; the other ranks get the weights by broadcast.

    Returns:
        (prompted model on its device, tokenizer, a function that builds the same structure
        unsharded (for exports), the run's provenance: base model, lineage, bank refs).
    """
    import transformers.modeling_utils  # noqa: F401

    # Imported above on every rank at once: the other ranks would otherwise import the
    # modeling machinery only after rank 0's load (they wait for its result), in series.
    s2 = cfg.stage2
    names = mixture.task_names
    loaded: dict = {}

    def load() -> dict:
        model, tokenizer, path = load_model(cfg.model, seed=cfg.seed)
        if s2.mode in LORA_MODES:
            table, bank_refs = None, {}
            loaded["model"] = _adapted(cfg, model, names)
        else:
            table, bank_refs = _prompt_table(cfg, mixture, model, tokenizer, refs)
            loaded["model"] = _wrap(model, table, names, s2.mode)
        loaded["tokenizer"] = tokenizer
        lineage = read_lineage(path) if Path(path).is_dir() else {}
        return {
            "base_model": {
                "name": str(path),
                "fingerprint": lineage.get("fingerprint") or model_fingerprint(model),
            },
            "parents": list(lineage.get("lineage", [])),
            "bank_refs": bank_refs,
            "bank_dir": resolve_path(cfg, cfg.bank.dir),
            "prompt_shape": None if table is None else list(table.shape),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "mode": s2.mode,
            "mixture": mixture.name,
            "tasks": names,
            **_method_settings(cfg),
        }

    info = D.on_rank0(load)
    path = info["base_model"]["name"]
    if D.is_main():
        tokenizer = loaded["tokenizer"]
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)

    def build() -> PromptedModel:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

        config = AutoConfig.from_pretrained(path)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_config(config, dtype=getattr(torch, info["dtype"]))
        shape = info["prompt_shape"]
        return _wrap(model, None if shape is None else torch.zeros(shape), names, s2.mode)

    if s2.activation_checkpointing and "model" in loaded:
        D.enable_activation_checkpointing(loaded["model"])
    if D.is_distributed():

        def build_for_shards() -> PromptedModel:
            built = build()
            if s2.activation_checkpointing:  # before fully_shard, as torchtitan orders it
                D.enable_activation_checkpointing(built)
            return built

        policies = D.fsdp_policies(s2.mixed_precision, s2.cpu_offload)
        prompted = D.build_sharded(build_for_shards, loaded.get("model"), **policies)
    else:
        prompted = loaded["model"].to(D.device())
    loaded.clear()  # rank 0's full copy goes once the shards hold the weights
    return prompted, tokenizer, build, info


def _adapted(cfg: RunConfig, model, names: list[str]) -> lora.AdaptedModel:
    """lora: a new adapter shared by every row, the only thing that trains; promot_lora: the
    tasks' adapters from ``lora.adapters``, frozen, and the model trains."""
    if cfg.stage2.mode == "lora":
        adapted = lora.attach(model, cfg.lora, None)
        adapted.set_trainable("adapters")
        return adapted
    if not cfg.lora.adapters:
        raise UserError(
            "is not set: promot_lora's stage 2 needs its stage-1 task adapters", key="lora.adapters"
        )
    adapted = lora.load_adapters(model, resolve_path(cfg, cfg.lora.adapters), names)
    adapted.set_trainable("model")
    return adapted


def _method_settings(cfg: RunConfig) -> dict:
    """What stage2.json records of the settings only some modes read."""
    if cfg.stage2.mode == "hft":
        return {"hft": {"round_steps": cfg.hft.round_steps}}
    if cfg.stage2.mode == "promot_lora":  # and which stage-1 adapters it starts from
        return {"lora": {**lora.settings(cfg.lora), "adapters": cfg.lora.adapters}}
    if cfg.stage2.mode == "lora":
        return {"lora": lora.settings(cfg.lora)}
    return {}


def _wrap(model, table: torch.Tensor | None, names: list[str], mode: str) -> PromptedModel:
    prompted = PromptedModel(model, table, names if table is not None else None)
    prompted.set_trainable(TRAINABLE[mode])
    return prompted


def _prompt_table(cfg: RunConfig, mixture: Mixture, model, tokenizer, refs: dict | None):
    """The prompt table [T, P, d] for the mode (None for ``standard``) and the bank refs used.

    A resumed run passes the refs its checkpoint recorded, so a newer bank version made
    meanwhile does not change the prompts halfway through a run.
    """
    mode, names = cfg.stage2.mode, mixture.task_names
    if mode in UNPROMPTED_MODES:
        return None, {}
    if mode == "random_prompt":
        table = init_prompts(
            model, tokenizer, len(names), cfg.stage1.prompt_length, method="random", seed=cfg.seed
        )
        return table, {}
    bank = PromptBank(resolve_path(cfg, cfg.bank.dir))
    bank_refs = {name: bank.get((refs or {}).get(name, name)).ref for name in names}
    try:
        table = PromptedModel.from_bank(model, bank, names, refs=bank_refs).prompts.detach()
    except ValueError as e:  # prompts of different lengths cannot share one table
        raise UserError(str(e), file=bank.root, key="stage2.mixture") from None
    return table, bank_refs


def _optimizer(prompted: PromptedModel, s2, lora_cfg) -> torch.optim.Optimizer:
    """The model's parameters at ``lr``; in joint mode the prompt table at ``prompt_lr``; in
    lora mode the adapter with ``lora.optimizer`` at ``lora.lr``.

    With Adafactor the model's steps scale with each weight's RMS (T5 fine-tuning) and the
    prompt's do not (prompt tuning); AdamW ignores the flag.
    """
    model_params = [p for p in prompted.model.parameters() if p.requires_grad]
    if s2.mode == "lora":  # a zero-initialised LoRA B has no RMS to scale steps by
        groups = [{"params": model_params, "lr": lora_cfg.lr, "scale_parameter": False}]
        optimizer = build_optimizer(groups, lora_cfg.optimizer, lora_cfg.lr)
        return D.prepare_optimizer(optimizer)
    groups = [{"params": model_params, "lr": s2.lr, "scale_parameter": True}]
    if s2.mode == "joint":
        groups.append({"params": [prompted.prompts], "lr": s2.prompt_lr, "scale_parameter": False})
    optimizer = build_optimizer(groups, s2.optimizer, s2.lr, s2.weight_decay)
    return D.prepare_optimizer(optimizer)


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


def _validate(prompted, tokenizer, mixture, collator, task_ids, s2, device) -> dict:
    """Validation loss (and the task metric when selecting by it) on every fine-tuned task.

    Every rank evaluates the same examples: FSDP needs all ranks in every forward, and the
    ranks then agree on the best step without another collective.
    """
    with _autocast(s2.bf16, device):
        results = validate_tasks(
            prompted,
            tokenizer,
            mixture.tasks,
            collator,
            examples=s2.eval_examples,
            with_metric=s2.keep_best_by == "metric",
            task_ids=task_ids,
            max_new_tokens=s2.max_target_length,
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


# -- outputs ----------------------------------------------------------------------------------


def _export(
    prompted, build: Callable, tokenizer, dest: Path, *, info: dict, shard_bytes: int | None = None
) -> None:
    """Write full weights + tokenizer (+ the prompt table when it is not the bank's) to
    ``dest`` on rank 0; a collective under FSDP.

    By default the shards are gathered into one CPU copy on rank 0 (``save_pretrained``);
    with ``shard_bytes`` (``stage2.export_shard_size``) the weights stream out tensor by
    tensor into sharded safetensors + an index (:mod:`multipromot.train.export`).
    """
    name = f"stage2:{info['mode']}:{info['mixture']}"
    parents = [info["base_model"]["fingerprint"], *info["parents"]]
    if shard_bytes is not None:
        export_sharded(
            prompted.model, tokenizer, dest, max_shard_bytes=shard_bytes, name=name, parents=parents
        )
        plain = _prompts_only(prompted) if info["mode"] in ("joint", "random_prompt") else None
    else:
        plain = D.gather_full_model(prompted, build) if D.is_distributed() else prompted

    def write() -> None:
        if info["mode"] in LORA_MODES:  # weights + the adapters in peft's format
            lora.export(
                plain, tokenizer, dest, name=name, parents=parents, merge=info["mode"] == "lora"
            )
        elif shard_bytes is None:
            save_model(plain.model, tokenizer, dest, name=name, parents=parents)
        record = dict(info)
        if info["mode"] in ("joint", "random_prompt"):
            # The rows were trained (joint) or drawn (random) here: inference needs them, as
            # checksummed bank entries tied to these weights' fingerprint.
            record["bank_dir"] = PROMPT_BANK_DIR
            record["bank_refs"] = _own_prompt_bank(plain, tokenizer, dest, info)
        write_json(dest / "stage2.json", record, indent=2)

    D.on_rank0(write)


class _PromptTable:
    def __init__(self, prompts: torch.Tensor):
        self.prompts = prompts


def _prompts_only(prompted: PromptedModel) -> _PromptTable | None:
    """The full prompt table (gathered under FSDP: a collective) on rank 0, for the export's
    own prompt bank when the weights themselves were streamed out."""
    table = dict(D.iter_full_tensors(prompted, ["prompts"]))
    return _PromptTable(table["prompts"]) if D.is_main() else None


def _own_prompt_bank(plain, tokenizer, dest: Path, info: dict) -> dict:
    """Store ``plain``'s prompt table in ``dest/prompt_bank`` (one entry per task, trained on
    the weights in ``dest``); returns the task -> ref map."""
    bank = PromptBank(dest / PROMPT_BANK_DIR)
    base = {"name": str(dest.resolve()), "fingerprint": read_lineage(dest)["fingerprint"]}
    refs = {}
    for i, task in enumerate(info["tasks"]):
        entry = bank.add(
            task,
            plain.prompts[i].detach(),
            base_model=base,
            init=info["mode"],
            extra={"stage2_mode": info["mode"], "mixture": info["mixture"]},
        )
        refs[task] = entry.ref
    return refs


def _finish(
    prompted,
    build,
    tokenizer,
    out: Path,
    best: dict,
    info: dict,
    *,
    step: int,
    shard_bytes: int | None = None,
) -> None:
    """``final/`` = the best validated weights (``keep_best_by``) or the last; then record the
    bank entries' use."""
    final = out / "final"
    if best["by"] != "none" and best["step"] is not None and (out / "best").is_dir():
        D.on_rank0(_copy_dir, out / "best", final)
    else:
        _export(
            prompted,
            build,
            tokenizer,
            final,
            shard_bytes=shard_bytes,
            info={**info, "step": step, "selected_by": "last", "value": None},
        )

    def record() -> None:
        bank = PromptBank(info["bank_dir"])
        for ref in info["bank_refs"].values():
            bank.record_stage2(ref, final.resolve())

    if info["bank_refs"]:
        D.on_rank0(record)


def _copy_dir(src: Path, dst: Path) -> None:
    """Replace ``dst`` by a copy of ``src``; a kill leaves the old ``dst`` or the new one."""
    tmp = temp_dir_for(dst)
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    publish_dir(tmp, dst)


def _trim_metrics(path: Path, step: int) -> None:
    """Keep only stage-2 records up to ``step`` (a resumed run logs the later steps again)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill
            continue
        if record.get("stage") != 2 or record.get("step", 0) <= step:
            kept.append(line)
    write_atomic(path, "".join(f"{line}\n" for line in kept).encode())
