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

from multipromot.config import RunConfig, model_seed, resolve_path
from multipromot.data.collate import Collator
from multipromot.data.mixtures import load_mixture
from multipromot.data.sampler import MixtureSampler
from multipromot.fsio import publish_dir, sha256_file, temp_dir_for
from multipromot.models import is_encoder_decoder, load_model
from multipromot.train import lora
from multipromot.train.common import (
    build_optimizer,
    lr_schedule,
    use_data_mirror,
)
from multipromot.train.metrics_log import MetricsLog
from multipromot.train.stage1 import Stage1Run, batch_stream, train
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
    run = setup(cfg, progress=progress)
    MetricsLog(run.out_dir).trim(0, stage=1)  # a rerun starts over: its old lines go
    train(run)
    adapted = run.model
    for task in run.tasks:
        name = lora.adapter_name(task.name)
        set_peft_model_state_dict(adapted.model, run.best[task.name].weights, adapter_name=name)
    folder = run.out_dir / "adapters"
    tmp = temp_dir_for(folder)
    lora.save_adapters(adapted, tmp)
    publish_dir(tmp, folder)
    return folder, {
        t: {"best_step": b.step, "metric": b.metric, "value": b.value, "loss": b.loss}
        for t, b in run.best.items()
    }


def setup(cfg: RunConfig, *, progress: bool = True) -> Stage1Run:
    """Stage 1's run with a LoRA adapter per task in place of the prompts: the frozen model in
    eval mode but for the adapters' routing, ``lora.optimizer`` over the adapters alone, the
    same batch stream as prompt tuning; no checkpoints."""
    s1 = cfg.stage1
    use_data_mirror(cfg)
    torch.manual_seed(cfg.seed)
    model, tokenizer, _ = load_model(cfg.model, seed=model_seed(cfg))
    mixture = load_mixture(resolve_path(cfg, s1.mixture))
    tasks = mixture.tasks
    adapted = lora.attach(model, cfg.lora, [t.name for t in tasks])
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
    sampler = MixtureSampler(mixture, seed=cfg.seed)

    def snapshot(i: int, task) -> dict:
        state = get_peft_model_state_dict(adapted.model, adapter_name=lora.adapter_name(task.name))
        return {k: v.detach().clone() for k, v in state.items()}

    return Stage1Run(
        cfg=cfg,
        tasks=tasks,
        model=adapted,
        tokenizer=tokenizer,
        optimizer=optimizer,
        scheduler=scheduler,
        collator=collator,
        batches=batch_stream(
            tasks, sampler, collator, s1.batch_size, by_task=s1.batching == "task"
        ),
        snapshot=snapshot,
        out_dir=Path(cfg.out_dir) / ADAPTERS_FOLDER,
        progress=progress,
        label="stage 1 (lora)",
        lr_key="lora.lr",
    )
