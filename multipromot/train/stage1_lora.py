"""Stage 1 of ``promot_lora`` (the paper's Table 11): one LoRA adapter per task of
``stage1.mixture`` instead of a soft prompt; the model is frozen.

It follows prompt tuning (:mod:`multipromot.train.stage1`) step for step: the same batches (one
task per batch with ``stage1.batching=task``), the same validation every ``eval_every`` steps on
each task's own metric, the same selection of each task's best trained step (``select_by``,
``ties``), the model in eval mode (no dropout noise on a frozen model). Only what trains
differs: each batch's task adapter (``lora.rank``, ``lora.alpha``, ``lora.target_modules``),
with ``lora.optimizer`` at ``lora.lr``.

Output: ``<out_dir>/stage1_lora/adapters/<task>/`` (peft's format, one folder per task:
``PeftModel.from_pretrained(base, folder)``), written at the end in one atomic step, and
``metrics.jsonl`` next to it. A killed run starts stage 1 over (no checkpoints: it is short
next to stage 2, and the adapters only count once all of them are written).
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from tqdm.auto import tqdm

from multipromot.config import RunConfig, resolve_path
from multipromot.data.collate import Collator
from multipromot.data.mixtures import load_mixture
from multipromot.data.sampler import MixtureSampler
from multipromot.errors import UserError
from multipromot.eval.generation import validate_tasks
from multipromot.fsio import publish_dir, sha256_file, temp_dir_for
from multipromot.models import is_encoder_decoder, load_model
from multipromot.train import lora
from multipromot.train.common import (
    MetricsLogger,
    Throughput,
    build_optimizer,
    lr_schedule,
    use_data_mirror,
)
from multipromot.train.metrics_log import MetricsLog
from multipromot.train.stage1 import Best, batch_stream, better
from multipromot.train.stage1 import made_from as prompt_made_from

__all__ = ["train_adapters", "made_from", "adapters_fingerprint", "ADAPTERS_FOLDER"]

ADAPTERS_FOLDER = "stage1_lora"  # under out_dir; the adapters are in its "adapters" folder

# stage1.* keys that shape a soft prompt only
_PROMPT_KEYS = ("prompt_length", "init", "init_text", "optimizer", "lr", "weight_decay")


def made_from(cfg: RunConfig) -> dict:
    """What the adapters are made from: stage 1's record without the prompt-only keys, plus the
    ``lora.*`` keys (the adapters' own folder aside)."""
    record = prompt_made_from(cfg)
    for key in _PROMPT_KEYS:
        record["stage1"].pop(key)
    record["lora"] = lora.settings(cfg.lora)
    return record


def adapters_fingerprint(folder: str | Path) -> dict:
    """sha256 of every adapter file under ``folder`` (relative path -> digest): what a stage-2
    record compares, so other adapters never pass for the ones a model was trained with."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()
    }


def train_adapters(cfg: RunConfig, *, progress: bool = True) -> tuple[Path, dict]:
    """Train one adapter per task of ``cfg.stage1.mixture``; keep each task's best step.

    Returns:
        (the adapters folder, ``{task: {"best_step", "metric", "value", "loss"}}``).

    Raises:
        UserError: a bad mixture, model, ``lora.*`` value, or a non-finite loss.
    """
    s1 = cfg.stage1
    use_data_mirror(cfg)
    torch.manual_seed(cfg.seed)
    model, tokenizer, _ = load_model(cfg.model, seed=cfg.seed)
    mixture = load_mixture(resolve_path(cfg, s1.mixture))
    tasks = mixture.tasks
    names = [t.name for t in tasks]
    adapted = lora.attach(model, cfg.lora, names)
    adapted.set_trainable("adapters")
    adapted.train()  # the training path of AdaptedModel (one adapter per forward) ...
    for module in adapted.modules():  # ... on a frozen model: no dropout, as in prompt tuning
        if isinstance(module, torch.nn.Dropout):
            module.eval()
    trainable = [p for p in adapted.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, cfg.lora.optimizer, cfg.lora.lr)
    scheduler = lr_schedule(optimizer, warmup_steps=s1.warmup_steps, total_steps=s1.steps)
    collator = Collator(
        tokenizer,
        decoder_only=not is_encoder_decoder(model),
        max_input_length=s1.max_input_length,
        max_target_length=s1.max_target_length,
    )
    batches = batch_stream(
        tasks,
        MixtureSampler(mixture, seed=cfg.seed),
        collator,
        s1.batch_size,
        by_task=s1.batching == "task",
    )
    out_dir = Path(cfg.out_dir) / ADAPTERS_FOLDER
    MetricsLog(out_dir).trim(0, stage=1)  # a rerun starts over: its old lines go
    logger = MetricsLogger(out_dir, trackers=cfg.log.to)
    speed = Throughput()
    select = "score" if s1.select_by == "metric" else "loss"
    best: dict[str, Best] = {}  # task -> its best step and adapter state

    def validate(step: int) -> None:
        results = validate_tasks(
            adapted,
            tokenizer,
            tasks,
            collator,
            examples=s1.eval_examples,
            with_metric=select == "score",
        )
        logger.log({"stage": 1, "step": step, "validation": results})
        if step == 0:  # the untrained adapter (= the base model) is scored, never kept
            return
        for task in tasks:
            r = results[task.name]
            state = get_peft_model_state_dict(
                adapted.model, adapter_name=lora.adapter_name(task.name)
            )
            new = Best(
                r[select],
                r["loss"],
                step,
                task.metric if select == "score" else "loss",
                {k: v.detach().clone() for k, v in state.items()},
            )
            if better(new, best.get(task.name), select == "score", s1.ties):
                best[task.name] = new

    validate(0)
    bar = tqdm(
        range(1, s1.steps + 1), desc="stage 1 (lora)", disable=not progress, dynamic_ncols=True
    )
    for step in bar:
        batch = next(batches)
        loss = adapted(**batch).loss
        if not torch.isfinite(loss):
            raise UserError(
                f"non-finite loss ({loss.item()}) at step {step}; no adapter was "
                "written (lower lora.lr or check the data)",
                key="lora.lr",
            )
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_per_s = speed.update(int(batch["attention_mask"].sum()))
        if step % s1.log_every == 0 or step == s1.steps:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            logger.log(
                {
                    "stage": 1,
                    "step": step,
                    "loss": loss.item(),
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": tokens_per_s,
                },
                step=step,
            )
        if step % s1.eval_every == 0 or step == s1.steps:
            validate(step)
    logger.close()
    for task in tasks:
        set_peft_model_state_dict(
            adapted.model, best[task.name].weights, adapter_name=lora.adapter_name(task.name)
        )
    folder = out_dir / "adapters"
    tmp = temp_dir_for(folder)
    lora.save_adapters(adapted, tmp)
    publish_dir(tmp, folder)
    return folder, {
        t: {"best_step": b.step, "metric": b.metric, "value": b.value, "loss": b.loss}
        for t, b in best.items()
    }
