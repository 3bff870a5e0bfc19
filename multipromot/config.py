"""Run configs: OmegaConf YAML + ``key=value`` overrides -> typed dataclasses.

Every config key is declared here with its default, so a typo in a YAML file or an override is an
error naming the file and the key, not a silently ignored setting. Values are validated where a
wrong value would otherwise surface deep inside training.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from multipromot.errors import UserError
from multipromot.methods import MAX_SHOTS, Method, method_kind, parse_method
from multipromot.yamlio import read_yaml

__all__ = [
    "BankConfig",
    "Stage1Config",
    "Stage2Config",
    "EvalConfig",
    "LogConfig",
    "RunConfig",
    "DataConfig",
    "LoraConfig",
    "HftConfig",
    "SdftConfig",
    "SweepConfig",
    "load_config",
    "resolve_path",
    "bank_dir",
    "run_methods",
    "model_seed",
]

OPTIMIZERS = ("adafactor", "adamw")


@dataclass
class BankConfig:
    dir: str = field(
        default="prompt_bank",
        metadata={"help": "the prompt bank folder: stage 1 writes into it, stage 2 reads from it"},
    )
    refs: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "task -> bank ref stage 2 uses instead of the task's current version (`run` "
            "sets it to the prompts its own stage 1 tuned for the method)"
        },
    )


@dataclass
class Stage1Config:
    """Prompt tuning: the model is frozen, one soft prompt per task of the mixture."""

    mixture: str = field(
        default="", metadata={"help": "the mixture YAML whose tasks each get a soft prompt"}
    )
    shots: int = field(
        default=0,
        metadata={
            "help": "same-task exemplars in front of every stage-1 example (and validation "
            "input), as stage 2 puts them; `run` tunes one set of prompts per number of "
            "exemplars its methods use (a prompt is tuned with the exemplars it is used with)"
        },
    )
    prompt_length: int = field(
        default=100,
        metadata={
            "help": "positions per soft prompt, P (the paper: 100; 50 for decoder-only models)"
        },
    )
    init: str = field(
        default="vocab",
        metadata={
            "help": "how a prompt starts: random | vocab (embeddings of sampled vocabulary "
            "tokens) | text (the embeddings of init_text)"
        },
    )
    init_text: str = field(
        default="", metadata={"help": "for init=text; empty = each task's answer choices"}
    )
    optimizer: str = field(default="adafactor", metadata={"help": "adafactor | adamw"})
    lr: float = field(default=0.3, metadata={"help": "the prompts' learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "the optimizer's weight decay"})
    warmup_steps: int = field(default=0, metadata={"help": "steps of linear learning-rate warmup"})
    steps: int = field(default=5000, metadata={"help": "training steps"})
    batch_size: int = field(default=32, metadata={"help": "rows per training step"})
    eval_every: int = field(
        default=1000,
        metadata={
            "help": "steps between validations (per task); the best step per task goes to the bank"
        },
    )
    eval_examples: int = field(default=200, metadata={"help": "validation examples per task"})
    select_by: str = field(
        default="metric",
        metadata={"help": "what picks each task's best step: metric (the task's own) | loss"},
    )
    ties: str = field(
        default="loss",
        metadata={
            "help": "equal validation values: loss (the lower validation loss, then the later "
            "step) | first (the earlier step); the step-0 prompt, never trained, is never "
            "selected"
        },
    )
    batching: str = field(
        default="task",
        metadata={
            "help": "task: each batch holds one task's rows, sorted by length inside windows of "
            "32 batches (little padding; each prompt gets fewer, larger updates, as in prompt "
            "tuning task by task); mixed: rows in drawn order, every prompt updated at every step"
        },
    )
    max_input_length: int = field(default=512, metadata={"help": "token budget of an input"})
    max_target_length: int = field(default=128, metadata={"help": "token budget of a target"})
    log_every: int = field(
        default=10, metadata={"help": "steps between training records in metrics.jsonl"}
    )


@dataclass
class Stage2Config:
    """Model tuning with frozen bank prompts (or one of the paper's baselines, by ``mode``)."""

    mixture: str = field(
        default="",
        metadata={
            "help": "the mixture YAML stage 2 trains on (a method label's @alias picks another)"
        },
    )
    mode: str = field(
        default="promot",
        metadata={
            "help": "the method kind stage 2 trains: promot | standard | random_prompt | joint "
            "| lora | promot_lora | hft | sdft"
        },
    )
    shots: int = field(
        default=-1,
        metadata={"help": "k-shot exemplars per example; -1 = the mixture's own setting"},
    )
    prompt_shots: int = field(
        default=-1,
        metadata={
            "help": "the exemplars the bank prompts must have been tuned with (stage1.shots); "
            "-1 = stage 2's own number; another number is the ablation of a prompt tuned and "
            "used differently (a method's ~promptJshot)"
        },
    )
    freeze_bottom: int = field(
        default=0,
        metadata={
            "help": "keep the embeddings and the bottom K transformer blocks frozen (0: none; "
            "a method's ~freezeK)"
        },
    )
    optimizer: str = field(default="adafactor", metadata={"help": "adafactor | adamw"})
    lr: float = field(default=1e-3, metadata={"help": "the model's learning rate"})
    prompt_lr: float = field(
        default=0.3, metadata={"help": "joint mode: the prompt's learning rate"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "the optimizer's weight decay"})
    warmup_steps: int = field(default=0, metadata={"help": "steps of linear learning-rate warmup"})
    decay: str = field(
        default="constant",
        metadata={"help": "learning rate after warmup: constant | linear | cosine"},
    )
    steps: int = field(default=1000, metadata={"help": "training steps"})
    batch_size: int = field(
        default=64,
        metadata={"help": "global batch (split over ranks and accumulation steps)"},
    )
    grad_accum: int = field(
        default=1, metadata={"help": "gradient accumulation steps per optimizer step"}
    )
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "gradient-norm clipping; 0 disables clipping"}
    )
    label_smoothing: float = field(
        default=0.1, metadata={"help": "label smoothing of the token loss, in [0, 1)"}
    )
    bf16: str = field(
        default="auto",
        metadata={"help": "bf16 autocast: auto (when the device supports it) | true | false"},
    )
    group_by_length: bool = field(
        default=False,
        metadata={"help": "sort each step's rows by length before batching them (less padding)"},
    )
    max_input_length: int = field(default=512, metadata={"help": "token budget of an input"})
    max_target_length: int = field(default=128, metadata={"help": "token budget of a target"})
    save_every: int = field(default=100, metadata={"help": "steps between checkpoints"})
    eval_every: int = field(
        default=100, metadata={"help": "steps between validations of the fine-tuned tasks"}
    )
    eval_examples: int = field(default=200, metadata={"help": "validation examples per task"})
    keep_best_by: str = field(
        default="metric",
        metadata={
            "help": "which step becomes best/ and final/: metric | loss | none (keep the last)"
        },
    )
    resume: str = field(
        default="",
        metadata={
            "help": '"" (start fresh unless a checkpoint exists) | latest | a checkpoint dir'
        },
    )
    log_every: int = field(
        default=10, metadata={"help": "steps between training records in metrics.jsonl"}
    )
    # -- scale-out options (train/stage2.py, train/distributed.py); defaults keep today's run
    keep_last: int = field(
        default=0,
        metadata={"help": "checkpoints kept (the latest and the best are never pruned); 0 = all"},
    )
    async_save: bool = field(
        default=False,
        metadata={"help": "write checkpoints in a background thread while training goes on"},
    )
    mixed_precision: str = field(
        default="auto",
        metadata={"help": "FSDP2 policy when sharded: auto (bf16 on GPUs) | bf16 | fp32"},
    )
    activation_checkpointing: bool = field(
        default=False, metadata={"help": "recompute each transformer block in backward"}
    )
    cpu_offload: bool = field(
        default=False,
        metadata={"help": "FSDP2 CPUOffloadPolicy: sharded params, grads, optimizer on CPU"},
    )
    export_shard_size: str = field(
        default="",
        metadata={"help": "e.g. 5GB: final/ as sharded safetensors + index, streamed"},
    )


@dataclass
class EvalConfig:
    suite: str = field(default="", metadata={"help": "the evaluation suite YAML (eval/*.yaml)"})
    shots: list[int] = field(
        default_factory=lambda: [1, 4],
        metadata={"help": "the k-shot settings the suite's unseen tasks are scored at"},
    )
    num_beams: int = field(
        default=1, metadata={"help": "beam width (1 = greedy; the paper uses 4)"}
    )
    max_new_tokens: int = field(default=32, metadata={"help": "generation budget per row"})
    batch_size: int = field(default=32, metadata={"help": "rows per generate call"})
    examples: int = field(default=100, metadata={"help": "scored examples per task"})
    router: bool = field(
        default=True, metadata={"help": "route each input to a bank prompt or none"}
    )
    prompts: bool = field(
        default=True,
        metadata={"help": "`multipromot eval`: use the bank prompts of stage2.mixture's tasks"},
    )
    curve: bool = field(
        default=False,
        metadata={"help": "also evaluate every stage-2 checkpoint (curves over steps)"},
    )
    drift_examples: int = field(
        default=32,
        metadata={
            "help": "items per task and shots setting on which each evaluated model's drift "
            "from the base model is measured: the mean KL(base || model) of the next-token "
            "distributions, teacher-forced on the held-out inputs and their references "
            "(results.json `drift`); 0 = not measured"
        },
    )
    compare: list[str] = field(
        default_factory=lambda: ["pretrained", "standard"],
        metadata={
            "help": "methods every other method is compared with: the report gives each "
            "difference on the same items (and seeds, in a sweep) with its 95% interval; a "
            "label not in `methods` is skipped"
        },
    )


@dataclass
class DataConfig:
    mirror: str = field(
        default="",
        metadata={
            "help": "a folder of hub dataset snapshots (`multipromot data pull`); hub sources "
            "load from <mirror>/<org>/<name> first. Empty: $MULTIPROMOT_DATA_MIRROR, else the "
            "hub or its cache"
        },
    )


@dataclass
class LogConfig:
    """Where training metrics go besides ``metrics.jsonl`` (checked by
    ``train.common.check_trackers``): tensorboard, wandb, trackio, mlflow."""

    to: list[str] = field(
        default_factory=lambda: ["tensorboard"],
        metadata={
            "help": "trackers that get the training scalars: tensorboard, wandb, trackio, mlflow"
        },
    )


@dataclass
class LoraConfig:
    """LoRA adapters (peft) of the methods ``lora`` and ``promot_lora`` (train/lora.py)."""

    rank: int = field(default=4, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=8.0, metadata={"help": "LoRA scaling alpha"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout, in [0, 1)"})
    target_modules: list[str] = field(
        default_factory=list,
        metadata={"help": "modules that get an adapter; empty: peft's default for the model"},
    )
    optimizer: str = field(
        default="adamw",
        metadata={
            "help": "LoRA weights train with this wherever they train (promot_lora's stage 1, "
            "lora's stage 2): adafactor | adamw"
        },
    )
    lr: float = field(default=1e-3, metadata={"help": "the LoRA weights' learning rate"})
    adapters: str = field(
        default="",
        metadata={
            "help": "promot_lora's stage 2: the folder of per-task adapters (one peft folder "
            "per task); `run` sets it to its own stage 1's"
        },
    )


@dataclass
class HftConfig:
    """Half Fine-Tuning (method ``hft``, train/hft.py)."""

    round_steps: int = field(
        default=50,
        metadata={"help": "a new random half of the parameter tensors is frozen every round"},
    )


@dataclass
class SdftConfig:
    """Self-distilled targets (method ``sdft``, train/sdft.py)."""

    threshold: float = field(
        default=100.0,
        metadata={
            "help": "a rewrite replaces its target when its per-item score against the "
            "original target (the task's metric, 0-100) is at least this"
        },
    )
    cache: str = field(
        default="",
        metadata={
            "help": "the folder of rewritten target sets, one per provenance (base model, "
            "rewrite prompt, data, rows); empty: <out_dir>/sdft_targets (`run`: its run "
            "folder's, shared by its sdft methods)"
        },
    )


@dataclass
class SweepConfig:
    """``multipromot sweep``'s grid, when the config holds one (command-line arguments win)."""

    seeds: list[int] = field(
        default_factory=list, metadata={"help": "the seeds of every cell; empty: [seed]"}
    )
    grid: dict[str, list[Any]] = field(
        default_factory=dict,
        metadata={"help": "key -> the values it takes (the cells are their product x seeds)"},
    )
    max_cells: int = field(
        default=64, metadata={"help": "refuse a grid of more cells (a budget you set)"}
    )
    jobs: int = field(
        default=1, metadata={"help": "cells run at once as local processes (threads split)"}
    )
    launcher: str = field(
        default="local", metadata={"help": "local (processes here) | slurm (submitit)"}
    )


@dataclass
class RunConfig:
    seed: int = field(default=0, metadata={"help": "the run's seed (a 32-bit integer)"})
    model_seed: int = field(
        default=-1,
        metadata={
            "help": "the seed a built-in model (the lab models) is built with; -1: `seed`. Set it "
            "to hold the base model fixed while `seed` varies training (`sweep --model-seed`)"
        },
    )
    out_dir: str = field(default="runs/default", metadata={"help": "the run folder"})
    reuse: str = field(
        default="redo",
        metadata={
            "help": "`run` on a folder with results made from other settings: redo (train and "
            "evaluate those parts again) | strict (stop with one line naming what changed)"
        },
    )
    model: str = field(
        default="tiny-t5",
        metadata={"help": "a hub id, a local directory, or a built-in model"},
    )
    bank: BankConfig = field(
        default_factory=BankConfig, metadata={"help": "the prompt bank (bank.*)"}
    )
    stage1: Stage1Config = field(
        default_factory=Stage1Config, metadata={"help": "stage 1, prompt tuning (stage1.*)"}
    )
    stage2: Stage2Config = field(
        default_factory=Stage2Config, metadata={"help": "stage 2, model tuning (stage2.*)"}
    )
    eval: EvalConfig = field(
        default_factory=EvalConfig, metadata={"help": "k-shot evaluation (eval.*)"}
    )
    methods: list[str] = field(
        default_factory=list,
        metadata={
            "help": "the methods `multipromot run` compares: kind[+Kshot][@mixture] or "
            "wiseA:LABEL labels"
        },
    )
    mixtures: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "stage-2 mixtures by alias: promot@multi"},
    )
    config_file: str = field(
        default="",
        metadata={"help": "set by load_config: where relative paths are resolved from"},
    )
    overrides: list[str] = field(
        default_factory=list,
        metadata={
            "help": "set by load_config: the key=value overrides it was given, in order (a "
            "report prints the command with them)"
        },
    )
    workdir: str = field(
        default="",
        metadata={
            "help": "set by load_config: the working directory, against which relative "
            "command-line paths resolve (a report's command starts there)"
        },
    )
    data: DataConfig = field(
        default_factory=DataConfig, metadata={"help": "dataset sources (data.*)"}
    )
    log: LogConfig = field(
        default_factory=LogConfig, metadata={"help": "experiment trackers (log.*)"}
    )
    lora: LoraConfig = field(
        default_factory=LoraConfig, metadata={"help": "LoRA adapters (lora.*)"}
    )
    hft: HftConfig = field(default_factory=HftConfig, metadata={"help": "Half Fine-Tuning (hft.*)"})
    sdft: SdftConfig = field(
        default_factory=SdftConfig, metadata={"help": "self-distilled targets (sdft.*)"}
    )
    sweep: SweepConfig = field(
        default_factory=SweepConfig, metadata={"help": "`multipromot sweep`'s grid (sweep.*)"}
    )


def _validate(cfg: RunConfig, file: str) -> None:
    # `stage2.bf16=true` on the command line arrives as a bool rendered "True".
    cfg.stage2.bf16 = str(cfg.stage2.bf16).lower()
    checks = [
        ("stage1.init", cfg.stage1.init in ("random", "vocab", "text"), "random, vocab or text"),
        ("stage1.optimizer", cfg.stage1.optimizer in OPTIMIZERS, " or ".join(OPTIMIZERS)),
        ("stage1.select_by", cfg.stage1.select_by in ("metric", "loss"), "metric or loss"),
        ("stage1.batching", cfg.stage1.batching in ("task", "mixed"), "task or mixed"),
        ("stage1.ties", cfg.stage1.ties in ("loss", "first"), "loss or first"),
        ("reuse", cfg.reuse in ("redo", "strict"), "redo or strict"),
        ("stage2.optimizer", cfg.stage2.optimizer in OPTIMIZERS, " or ".join(OPTIMIZERS)),
        ("lora.optimizer", cfg.lora.optimizer in OPTIMIZERS, " or ".join(OPTIMIZERS)),
        (
            "stage2.decay",
            cfg.stage2.decay in ("constant", "linear", "cosine"),
            "constant, linear or cosine",
        ),
        ("stage2.bf16", cfg.stage2.bf16 in ("auto", "true", "false"), "auto, true or false"),
        (
            "stage2.keep_best_by",
            cfg.stage2.keep_best_by in ("metric", "loss", "none"),
            "metric, loss or none",
        ),
    ]
    for key, ok, allowed in checks:
        if not ok:
            raise UserError(f"must be {allowed}", file=file, key=key)
    method_kind(cfg.stage2.mode, file=file)
    positive = {
        "stage1.prompt_length": cfg.stage1.prompt_length,
        "stage1.steps": cfg.stage1.steps,
        "stage1.batch_size": cfg.stage1.batch_size,
        "stage1.lr": cfg.stage1.lr,
        "stage2.steps": cfg.stage2.steps,
        "stage2.batch_size": cfg.stage2.batch_size,
        "stage2.grad_accum": cfg.stage2.grad_accum,
        "stage2.lr": cfg.stage2.lr,
        "eval.batch_size": cfg.eval.batch_size,
        "eval.num_beams": cfg.eval.num_beams,
        "lora.rank": cfg.lora.rank,
        "lora.alpha": cfg.lora.alpha,
        "lora.lr": cfg.lora.lr,
        "hft.round_steps": cfg.hft.round_steps,
    }
    for key, value in positive.items():
        if not value > 0:
            raise UserError(f"must be > 0, got {value}", file=file, key=key)
    _validate_ranges(cfg, file)
    if cfg.stage2.batch_size % cfg.stage2.grad_accum:
        raise UserError(
            "must be a multiple of stage2.grad_accum", file=file, key="stage2.batch_size"
        )
    if cfg.stage2.mixed_precision not in ("auto", "bf16", "fp32"):
        raise UserError("must be auto, bf16 or fp32", file=file, key="stage2.mixed_precision")
    if cfg.stage2.keep_last < 0:
        raise UserError(
            f"must be >= 0, got {cfg.stage2.keep_last}", file=file, key="stage2.keep_last"
        )
    if cfg.stage2.export_shard_size and parse_size(cfg.stage2.export_shard_size) is None:
        raise UserError(
            "must be a size such as 5GB, 500MB or 2000000000 (bytes)",
            file=file,
            key="stage2.export_shard_size",
        )


def parse_size(text: str) -> int | None:
    """Bytes in ``text`` (``5GB``, ``500MB``, ``1.5GiB``, ``2000000``); None if not a size."""
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
    }
    text = str(text).strip().upper()
    number = text.rstrip("KMGIB")
    unit = text[len(number) :]
    try:
        value = float(number)
    except ValueError:
        return None
    if unit not in units or not value > 0 or value * units[unit] > 2**62:
        return None
    return int(value * units[unit])


# Keys that hold paths (dotted; "mixtures.*" is every alias). `model` is a path only when it
# names an existing directory next to the config (otherwise it is a hub id or a built-in).
PATH_KEYS = (
    "out_dir",
    "bank.dir",
    "stage1.mixture",
    "stage2.mixture",
    "eval.suite",
    "data.mirror",
    "lora.adapters",
    "sdft.cache",
)


def _anchor_paths(data: dict, folder: Path) -> dict:
    """The config file's relative paths made absolute against its folder, so a config runs from
    any working directory (as paths inside a mixture resolve against the mixture file).
    Command-line overrides are not anchored: they are relative to the working directory."""

    def anchor(value: Any) -> Any:
        if not isinstance(value, str) or not value or "${" in value or os.path.isabs(value):
            return value
        return os.path.normpath(folder / value)

    out = {**data}
    for dotted in PATH_KEYS:
        section, _, key = dotted.rpartition(".")
        holder = out.get(section) if section else out
        if isinstance(holder, dict) and key in holder:
            holder = {**holder, key: anchor(holder[key])}
            out = {**out, section: holder} if section else holder
    if isinstance(out.get("mixtures"), dict):
        out["mixtures"] = {alias: anchor(v) for alias, v in out["mixtures"].items()}
    model = out.get("model")
    if isinstance(model, str) and model and (folder / model).is_dir():
        out["model"] = os.path.normpath(folder / model)
    return out


MAX_SEED = 2**32 - 1  # numpy's and the sampler's seeds are 32-bit


def _validate_ranges(cfg: RunConfig, file: str) -> None:
    """The values that used to be accepted and then crash, or mean something else, deep inside
    training: every one is refused here, before anything is built."""
    s1, s2, ev = cfg.stage1, cfg.stage2, cfg.eval

    def fail(key: str, message: str) -> None:
        raise UserError(message, file=file, key=key)

    floats = {
        "stage1.lr": s1.lr,
        "stage1.weight_decay": s1.weight_decay,
        "stage2.lr": s2.lr,
        "stage2.prompt_lr": s2.prompt_lr,
        "stage2.weight_decay": s2.weight_decay,
        "stage2.max_grad_norm": s2.max_grad_norm,
        "stage2.label_smoothing": s2.label_smoothing,
    }
    for key, value in floats.items():
        if not math.isfinite(value):
            fail(key, f"must be a finite number, got {value}")
        if value < 0:
            fail(key, f"must be >= 0, got {value}")
    if s2.prompt_lr <= 0:
        fail("stage2.prompt_lr", f"must be > 0, got {s2.prompt_lr}")
    if not 0 <= cfg.lora.dropout < 1:
        fail("lora.dropout", f"must be in [0, 1), got {cfg.lora.dropout}")
    if s2.label_smoothing >= 1:
        fail("stage2.label_smoothing", f"must be in [0, 1), got {s2.label_smoothing}")
    if not 0 <= cfg.seed <= MAX_SEED:
        fail("seed", f"must be an integer in [0, {MAX_SEED}], got {cfg.seed}")
    if not -1 <= cfg.model_seed <= MAX_SEED:
        fail("model_seed", f"must be -1 (= seed) or in [0, {MAX_SEED}], got {cfg.model_seed}")
    at_least_one = {
        "stage1.eval_every": s1.eval_every,
        "stage1.log_every": s1.log_every,
        "stage1.eval_examples": s1.eval_examples,
        "stage2.eval_examples": s2.eval_examples,
        "stage1.max_input_length": s1.max_input_length,
        "stage1.max_target_length": s1.max_target_length,
        "stage2.max_input_length": s2.max_input_length,
        "stage2.max_target_length": s2.max_target_length,
        "eval.examples": ev.examples,
        "eval.max_new_tokens": ev.max_new_tokens,
    }
    for key, value in at_least_one.items():
        if value < 1:
            fail(key, f"must be >= 1, got {value}")
    for key, value in {
        "stage1.warmup_steps": s1.warmup_steps,
        "stage2.warmup_steps": s2.warmup_steps,
    }.items():
        if value < 0:
            fail(key, f"must be >= 0, got {value}")
    if not 0 <= s1.shots <= MAX_SHOTS:
        fail("stage1.shots", f"must be in 0..{MAX_SHOTS}, got {s1.shots}")
    if not -1 <= s2.prompt_shots <= MAX_SHOTS:
        fail(
            "stage2.prompt_shots",
            f"must be -1 (stage 2's) or 0..{MAX_SHOTS}, got {s2.prompt_shots}",
        )
    if not 0 <= cfg.sdft.threshold <= 100:
        fail("sdft.threshold", f"must be a score in [0, 100], got {cfg.sdft.threshold}")
    if ev.drift_examples < 0:
        fail("eval.drift_examples", f"must be >= 0, got {ev.drift_examples}")
    if s2.freeze_bottom < 0:
        fail("stage2.freeze_bottom", f"must be >= 0, got {s2.freeze_bottom}")
    if s2.shots < -1 or s2.shots > MAX_SHOTS:
        fail("stage2.shots", f"must be -1 (the mixture's) or 0..{MAX_SHOTS}, got {s2.shots}")
    for k in ev.shots:
        if not 0 <= k <= MAX_SHOTS:
            fail("eval.shots", f"each must be in 0..{MAX_SHOTS}, got {k}")
    if len(set(ev.shots)) != len(ev.shots):
        fail("eval.shots", f"lists a setting twice: {ev.shots}")
    duplicates = sorted({m for m in cfg.methods if cfg.methods.count(m) > 1})
    if duplicates:
        fail("methods", f"lists {', '.join(duplicates)} more than once")


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> RunConfig:
    """Read a run config and apply ``key=value`` overrides.

    Args:
        path: a YAML file, or None for the defaults.
        overrides: dotlist entries such as ``stage2.mode=standard``.

    Returns:
        A validated :class:`RunConfig`; ``config_file`` holds the resolved path.

    Raises:
        UserError: unreadable YAML, an unknown key, a value of the wrong type or range.
    """
    schema = OmegaConf.structured(RunConfig)
    file = os.fspath(path) if path is not None else "<defaults>"
    layers = []  # (layer, where it came from), merged in order over the schema
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError("no such config file", file=file)
        # the mixtures' reader: safe tags only, and bounded, so that an alias bomb ("billion
        # laughs") is refused instead of being expanded by OmegaConf until memory runs out
        data = read_yaml(p)
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise UserError("a config must be a mapping of keys to values", file=file)
        layers.append((_anchor_paths(data, p.resolve().parent), file))
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like key=value", file="<command line>")
        layers.append((OmegaConf.from_dotlist([item]), "<command line>"))
    merged = schema
    for layer, source in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or None
            raise UserError(str(e).splitlines()[0], file=source, key=key) from None
    try:  # interpolations (${oc.env:X}, ${key}) are resolved here
        cfg: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or None
        raise UserError(str(e).splitlines()[0], file=file, key=key) from None
    cfg.config_file = str(Path(path).resolve()) if path is not None else ""
    cfg.overrides, cfg.workdir = list(overrides), os.getcwd()
    _validate(cfg, file)
    if cfg.data.mirror and not Path(resolve_path(cfg, cfg.data.mirror)).is_dir():
        raise UserError("no such folder", file=file, key="data.mirror")
    run_methods(cfg)  # a bad method label is refused with the rest of the config
    return cfg


def model_seed(cfg: RunConfig) -> int:
    """The seed a built-in model is built with: ``model_seed``, or ``seed`` when it is -1."""
    return cfg.seed if cfg.model_seed < 0 else cfg.model_seed


def run_methods(cfg: RunConfig) -> list[Method]:
    """The config's ``methods``, parsed (:func:`multipromot.methods.parse_method`), with their
    mixture paths resolved.

    Raises:
        UserError: a label the grammar refuses, or one method under two labels.
    """
    mixtures = {alias: resolve_path(cfg, path) for alias, path in cfg.mixtures.items()}
    default = resolve_path(cfg, cfg.stage2.mixture)
    file = cfg.config_file or None
    methods = [
        parse_method(
            label, mixtures=mixtures, default_mixture=default, listed=cfg.methods, file=file
        )
        for label in cfg.methods
    ]
    seen: dict[tuple, str] = {}
    for method in methods:  # one method under two spellings would be evaluated twice
        first = seen.setdefault(method.identity, method.label)
        if first != method.label:
            raise UserError(
                f"lists {first!r} and {method.label!r}, the same method twice",
                file=file,
                key="methods",
            )
    return methods


def bank_dir(cfg: RunConfig) -> str:
    """The prompt bank folder, absolute: ``bank.dir`` resolved once (:func:`resolve_path`), so
    that stage 1 writes, stage 2 reads and every record names the same folder, whatever the
    working directory is when a record is read back."""
    return str(Path(resolve_path(cfg, cfg.bank.dir)).resolve())


def resolve_path(cfg: RunConfig, value: str) -> str:
    """A path from the config. Paths written in a config file are absolute after
    :func:`load_config` (anchored at the file's folder); a relative value set on the command line
    or in Python is relative to the working directory, or else (if it exists there) to the
    config file's folder."""
    if not value or os.path.isabs(value) or os.path.exists(value) or not cfg.config_file:
        return value
    candidate = Path(cfg.config_file).parent / value
    return str(candidate) if candidate.exists() else value
