"""Stage 2's model for a method kind: the base model wrapped with what its table entry says
(a prompt table from the bank, a random one, none, or LoRA adapters), sharded when there are
several ranks, and its optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from multipromot.bank import PromptBank
from multipromot.config import RunConfig, bank_dir, model_seed, resolve_path
from multipromot.data.mixtures import Mixture
from multipromot.errors import UserError
from multipromot.methods import MethodKind
from multipromot.models import load_model, model_fingerprint, read_lineage
from multipromot.soft_prompt import PromptedModel, init_prompts
from multipromot.train import distributed as D
from multipromot.train import lora
from multipromot.train.common import build_optimizer
from multipromot.train.freeze import freeze_bottom
from multipromot.train.sdft import settings as sdft_settings
from multipromot.train.stage2_export import Stage2Record

__all__ = ["load_prompted", "build_stage2_optimizer", "kind_settings", "stage2_settings"]


def kind_settings(cfg: RunConfig, kind: MethodKind) -> dict:
    """The config sections besides ``stage2`` that shape a kind's weights
    (``MethodKind.settings``), as ``run`` compares them before reusing a model: ``hft.*``,
    the ``lora.*`` keys that shape an adapter, ``sdft.threshold``."""
    sections = {
        "hft": lambda: asdict(cfg.hft),
        "lora": lambda: lora.settings(cfg.lora),
        "sdft": lambda: sdft_settings(cfg),
    }
    return {section: sections[section]() for section in kind.settings}


def stage2_settings(cfg: RunConfig, kind: MethodKind) -> dict:
    """:func:`kind_settings` as ``stage2.json`` and a checkpoint record them: with the folder of
    the stage-1 adapters a ``per_task`` kind starts from."""
    settings = kind_settings(cfg, kind)
    if kind.adapters == "per_task":
        settings["lora"]["adapters"] = cfg.lora.adapters
    return settings


def load_prompted(
    cfg: RunConfig,
    kind: MethodKind,
    mixture: Mixture,
    refs: dict | None,
    sha256: dict | None = None,
    *,
    prompt_shots: int = 0,
):
    """The model for ``kind``, sharded when there are several ranks.

    Rank 0 alone loads the model (and builds a built-in one into the cache, so ranks never
    race on it) and reads the bank; the other ranks get the weights by broadcast.

    Args:
        cfg: the run config.
        kind: the method kind (``stage2.mode``'s entry).
        mixture: the stage-2 mixture.
        refs: task -> bank ref a resumed run's checkpoint recorded (so a newer bank version
            made meanwhile does not change the prompts halfway through a run); None: the
            bank's current entries.
        sha256: task -> the content those refs had (a recreated bank may reuse a ref for
            another prompt: refused).
        prompt_shots: the exemplars the bank prompts must have been tuned with.

    Returns:
        (model on its device, tokenizer, a function that builds the same structure unsharded
        (for exports), the run's :class:`Stage2Record` without the step it is taken at).
    """
    import transformers.modeling_utils  # noqa: F401

    # Imported above on every rank at once: the other ranks would otherwise import the
    # modeling machinery only after rank 0's load (they wait for its result), in series.
    names = mixture.task_names
    loaded: dict = {}

    def load() -> Stage2Record:
        model, tokenizer, path = load_model(cfg.model, seed=model_seed(cfg))
        table, bank_dir, bank_refs, content = None, None, {}, {}
        if kind.adapters is not None:
            loaded["model"] = _adapted(cfg, kind, model, names)
        else:
            table, bank_dir, bank_refs, content = _prompt_table(
                cfg, kind, mixture, model, tokenizer, refs, sha256, prompt_shots
            )
            loaded["model"] = _wrap(model, table, names, kind, cfg.stage2.freeze_bottom)
        loaded["tokenizer"] = tokenizer
        lineage = read_lineage(path) if Path(path).is_dir() else {}
        return Stage2Record(
            base_model={
                "name": str(path),
                "fingerprint": lineage.get("fingerprint") or model_fingerprint(model),
            },
            parents=list(lineage.get("lineage", [])),
            mode=kind.name,
            mixture=mixture.name,
            tasks=names,
            bank_dir=bank_dir,
            bank_refs=bank_refs,
            bank_sha256=content,
            prompt_shape=None if table is None else list(table.shape),
            dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
            settings=stage2_settings(cfg, kind),
        )

    record = D.on_rank0(load)
    path = record.base_model["name"]
    if D.is_main():
        tokenizer = loaded["tokenizer"]
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)

    def build() -> PromptedModel:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

        config = AutoConfig.from_pretrained(path)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_config(config, dtype=getattr(torch, record.dtype))
        shape = record.prompt_shape
        table = None if shape is None else torch.zeros(shape)
        return _wrap(model, table, names, kind, cfg.stage2.freeze_bottom)

    prompted = _place(loaded.pop("model", None), build, cfg)
    return prompted, tokenizer, build, record


def _place(model, build: Callable[[], PromptedModel], cfg: RunConfig):
    """The model on this process's device, or sharded with FSDP2 under torchrun (rank 0 holds
    the loaded ``model``, the other ranks None; they get its weights by broadcast)."""
    s2 = cfg.stage2
    if s2.activation_checkpointing and model is not None:
        D.enable_activation_checkpointing(model)
    if not D.is_distributed():
        return model.to(D.device())

    def build_for_shards() -> PromptedModel:
        built = build()
        if s2.activation_checkpointing:  # before fully_shard, as torchtitan orders it
            D.enable_activation_checkpointing(built)
        return built

    policies = D.fsdp_policies(s2.mixed_precision, s2.cpu_offload)
    return D.build_sharded(build_for_shards, model, **policies)


def _adapted(cfg: RunConfig, kind: MethodKind, model, names: list[str]) -> lora.AdaptedModel:
    """``shared``: a new adapter on every row, the only thing that trains; ``per_task``: the
    tasks' adapters from ``lora.adapters``, frozen, and the model trains."""
    if kind.adapters == "shared":
        adapted = lora.attach(model, cfg.lora, None)
    else:
        if not cfg.lora.adapters:
            raise UserError(
                f"is not set: {kind.name}'s stage 2 needs its stage-1 task adapters",
                key="lora.adapters",
            )
        adapted = lora.load_adapters(model, resolve_path(cfg, cfg.lora.adapters), names)
    adapted.set_trainable(kind.trainable)
    return adapted


def _wrap(
    model, table: torch.Tensor | None, names: list[str], kind: MethodKind, freeze: int = 0
) -> PromptedModel:
    """The model with its prompt table, trainable as the kind says, the bottom ``freeze``
    layers frozen (train.freeze)."""
    prompted = PromptedModel(model, table, names if table is not None else None)
    prompted.set_trainable(kind.trainable)
    freeze_bottom(model, freeze)
    return prompted


def _prompt_table(
    cfg: RunConfig,
    kind: MethodKind,
    mixture: Mixture,
    model,
    tokenizer,
    refs,
    sha256,
    prompt_shots: int = 0,
):
    """The prompt table [T, P, d] for the kind (None without prompts), and the bank folder,
    refs and their content (sha256) it came from (None, {}, {} when it is not the bank's).

    Raises:
        BankError: a prompt tuned for another definition of its task, or a resumed run's ref
            whose content changed.
        UserError: a prompt tuned with another number of exemplars than ``prompt_shots``.
    """
    names = mixture.task_names
    if kind.prompts == "none":
        return None, None, {}, {}
    if kind.prompts == "random":
        table = init_prompts(
            model, tokenizer, len(names), cfg.stage1.prompt_length, method="random", seed=cfg.seed
        )
        return table, None, {}, {}
    bank = PromptBank(bank_dir(cfg))
    # a resumed run's refs, else the ones the config pins, else each task's current version
    pinned = refs or cfg.bank.refs or {}
    entries = {name: bank.get(pinned.get(name, name)) for name in names}
    bank_refs = {name: entry.ref for name, entry in entries.items()}
    bank.check_content(bank_refs, sha256)
    bank.check_definitions(bank_refs, mixture.tasks)
    for entry in entries.values():
        tuned = int((entry.meta.get("stage1") or {}).get("shots", 0))  # older entries: 0-shot
        if tuned != prompt_shots:
            raise UserError(
                f"{entry.ref} was tuned with {tuned}-shot inputs, but this stage 2 uses prompts "
                f"tuned with {prompt_shots} (tune them with stage1.shots={prompt_shots}, or set "
                f"stage2.prompt_shots={tuned} to use these: the ablation)",
                file=bank.root,
                key="stage2.prompt_shots",
            )
    try:
        table = PromptedModel.from_bank(model, bank, names, refs=bank_refs).prompts.detach()
    except ValueError as e:  # prompts of different lengths cannot share one table
        raise UserError(str(e), file=bank.root, key="stage2.mixture") from None
    return table, str(bank.root), bank_refs, bank.content(bank_refs)


def build_stage2_optimizer(prompted, kind: MethodKind, cfg: RunConfig) -> torch.optim.Optimizer:
    """The model's parameters at ``stage2.lr``; for ``trainable: both`` the prompt table at
    ``stage2.prompt_lr``; for ``trainable: adapters`` the adapter with ``lora.optimizer`` at
    ``lora.lr``.

    With Adafactor the model's steps scale with each weight's RMS (T5 fine-tuning) and the
    prompt's do not (prompt tuning); AdamW ignores the flag.
    """
    s2, lora_cfg = cfg.stage2, cfg.lora
    model_params = [p for p in prompted.model.parameters() if p.requires_grad]
    if kind.trainable == "adapters":  # a zero-initialised LoRA B has no RMS to scale steps by
        groups = [{"params": model_params, "lr": lora_cfg.lr, "scale_parameter": False}]
        optimizer = build_optimizer(groups, lora_cfg.optimizer, lora_cfg.lr)
        return D.prepare_optimizer(optimizer)
    groups = [{"params": model_params, "lr": s2.lr, "scale_parameter": True}]
    if kind.trainable == "both":
        groups.append({"params": [prompted.prompts], "lr": s2.prompt_lr, "scale_parameter": False})
    optimizer = build_optimizer(groups, s2.optimizer, s2.lr, s2.weight_decay)
    return D.prepare_optimizer(optimizer)
