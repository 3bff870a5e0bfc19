"""The run commands: ``stage1``, ``stage2``, ``run`` and ``eval`` (each takes a config and
``key=value`` overrides)."""

from __future__ import annotations

import os

from multipromot.cli.app import CONFIG_ARG, OVERRIDES_ARG, app
from multipromot.config import load_config
from multipromot.experiment import run_eval, run_experiment
from multipromot.preflight import preflight
from multipromot.train import stage2 as stage2_module
from multipromot.train.stage1 import train_prompts


@app.command()
def stage1(config: str = CONFIG_ARG, overrides: list[str] = OVERRIDES_ARG) -> None:
    """Prompt-tune every task of stage1.mixture into the bank (the model stays frozen)."""
    cfg = load_config(config, overrides or [])
    preflight(cfg, command="stage1")
    entries = train_prompts(cfg)
    for entry in entries:
        s1 = entry.meta.get("stage1", {})
        print(
            f"{entry.ref}  P={entry.meta['prompt_length']}  "
            f"{s1.get('metric')}={s1.get('value', float('nan')):.4g} (step {s1.get('best_step')})"
        )
    print(f"bank: {cfg.bank.dir}")


@app.command()
def stage2(config: str = CONFIG_ARG, overrides: list[str] = OVERRIDES_ARG) -> None:
    """Fine-tune the model on stage2.mixture with frozen bank prompts (torchrun = FSDP2)."""
    cfg = load_config(config, overrides or [])
    preflight(cfg, command="stage2")
    out = stage2_module.finetune(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line, not one per rank
        print(f"stage 2 done: {out}")


@app.command()
def run(config: str = CONFIG_ARG, overrides: list[str] = OVERRIDES_ARG) -> None:
    """Stage 1 -> stage 2 per method -> evaluation -> report (re-run to resume)."""
    run_experiment(load_config(config, overrides or []))


@app.command(name="eval")
def eval_(config: str = CONFIG_ARG, overrides: list[str] = OVERRIDES_ARG) -> None:
    """k-shot evaluation of `model` (a base model or a stage-2 final/), router on or off."""
    run_eval(load_config(config, overrides or []))
