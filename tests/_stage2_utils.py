"""Shared set-up for the stage-2, checkpoint and distributed tests: a two-task JSONL mixture,
banks of prompts for tiny models, run configs, and runs (in process or under torchrun).

Runs are cached for the whole session, so a reference run that several test files compare
against is trained once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from multipromot.train.metrics_log import MetricsLog

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("_stage2_driver.py")
TASKS = ["lab_rte", "lab_qa"]
PROMPT_LENGTH = 4

# A short run that still covers warmup, decay, accumulation, clipping, label smoothing,
# validation and two checkpoints: 4 steps of a global batch of 8 in 2 micro-batches.
BASE_STAGE2 = {
    "steps": 4,
    "batch_size": 8,
    "grad_accum": 2,
    "warmup_steps": 2,
    "decay": "linear",
    "save_every": 2,
    "eval_every": 2,
    "eval_examples": 4,
    "max_input_length": 48,
    "max_target_length": 8,
    "log_every": 1,
    "keep_best_by": "none",
}

_RUNS: dict[str, Path] = {}


def setup_env(base: Path) -> Path:
    """Point the model cache where conftest puts it (module-scoped fixtures run before the
    autouse one) and return it."""
    cache = base / "multipromot-cache"
    os.environ["MULTIPROMOT_CACHE"] = str(cache)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return cache


def write_mixture(root: Path) -> Path:
    """Two lab tasks: a True/False classification and a short-answer QA. Generated in memory
    (no ``datasets`` import: each torchrun rank starts faster)."""
    root.mkdir(parents=True, exist_ok=True)
    mixture = {"name": "tiny_mix", "version": 1, "tasks": [{"task": t} for t in TASKS]}
    path = root / "mix.yaml"
    path.write_text(yaml.safe_dump(mixture, sort_keys=False))
    return path


def dropout_model(dest: Path) -> str:
    """tiny-t5 with dropout 0.1, saved as a model directory: resume tests then also check that
    the RNG stream continues exactly."""
    from multipromot.models import build_builtin, save_model

    if not (dest / "multipromot.json").is_file():
        model, tok = build_builtin("tiny-t5", 0)
        model.config.dropout_rate = 0.1
        save_model(model, tok, dest, name="tiny-t5-dropout")
    return str(dest)


def make_bank(root: Path, model_spec: str) -> Path:
    """A bank with a P=4 prompt for each task, trained (here: drawn) on ``model_spec``."""
    from multipromot.bank import PromptBank, describe_model
    from multipromot.models import load_model
    from multipromot.soft_prompt import init_prompts

    if (root / "index.json").is_file():
        return root
    model, tok, path = load_model(model_spec, seed=0)
    table = init_prompts(model, tok, len(TASKS), PROMPT_LENGTH, method="vocab", seed=1)
    bank = PromptBank(root)
    for i, task in enumerate(TASKS):
        bank.add(task, table[i], base_model=describe_model(model, path))
    return root


def write_config(
    path: Path, *, model: str, out_dir: Path, bank: Path, mixture: Path, **stage2
) -> Path:
    config = {
        "seed": 0,
        "model": model,
        "out_dir": str(out_dir),
        "bank": {"dir": str(bank)},
        "stage1": {"prompt_length": PROMPT_LENGTH},
        "stage2": {"mixture": str(mixture), **BASE_STAGE2, **stage2},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_in_process(config: Path, overrides: list[str] = ()) -> Path:
    from multipromot.config import load_config
    from multipromot.train.stage2 import finetune

    return finetune(load_config(config, list(overrides)), progress=False)


def run_torchrun(
    config: Path, *args: str, nproc: int = 2, driver: bool = False, timeout: float = 240
) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N -m multipromot stage2 CONFIG ARGS`` (or the
    test driver, which can inject kills). One thread per rank: 2 cores."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    target = [str(DRIVER)] if driver else ["-m", "multipromot", "stage2"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *target,
        str(config),
        *args,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def cached_run(key: str, make) -> Path:
    """``make()`` once per session (several test files compare against the same run)."""
    if key not in _RUNS:
        _RUNS[key] = make()
    return _RUNS[key]


def train_losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(out_dir) if "loss" in r}


def val_losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in _records(out_dir) if "val_loss" in r}


def _records(out_dir: Path) -> list[dict]:
    return [r for r in MetricsLog(out_dir).records() if r.get("stage") == 2]


def final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(out_dir) / "final" / "model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def loss_diff(a: dict[int, float], b: dict[int, float]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(abs(a[k] - b[k]) for k in a)
