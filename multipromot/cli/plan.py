"""``multipromot plan CONFIG --nodes N --gpus G``: per-rank memory of stage 2 under FSDP2,
from the model's config on the meta device (nothing is downloaded or allocated)."""

from __future__ import annotations

import json

import typer

from multipromot.cli.app import CONFIG_ARG, OVERRIDES_ARG, app
from multipromot.config import load_config
from multipromot.train.plan import plan_memory


@app.command()
def plan(
    config: str = CONFIG_ARG,
    overrides: list[str] = OVERRIDES_ARG,
    nodes: int = typer.Option(1, "--nodes", help="Machines."),
    gpus: int = typer.Option(8, "--gpus", help="GPUs (ranks) per machine."),
    gpu_memory: float = typer.Option(80.0, "--gpu-memory", help="GB per GPU."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object instead of the table."),
) -> None:
    """Per-rank parameters, gradients, optimizer state and activations of stage 2, with and
    without activation checkpointing, and whether they fit."""
    cfg = load_config(config, overrides or [])
    result = plan_memory(cfg, nodes=nodes, gpus=gpus, gpu_gb=gpu_memory)
    print(json.dumps(result.as_dict(), indent=1) if as_json else result.table())
