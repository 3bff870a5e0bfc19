"""``multipromot sweep CONFIG [key=v1,v2 ...] --seeds 0,1,2``: a grid of runs and its aggregate
(:mod:`multipromot.sweep`)."""

from __future__ import annotations

import typer

from multipromot.cli.app import CONFIG_ARG, app
from multipromot.errors import UserError
from multipromot.sweep import plan_sweep, run_sweep


def _ints(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"must be integers separated by commas, got {text!r}", key=option) from None


def _parameters(items: list[str]) -> dict:
    """``--slurm name=value`` pairs for submitit's executor (numbers as numbers)."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UserError(f"{item!r} must look like name=value", key="--slurm")
        out[name] = int(value) if value.isdigit() else value
    return out


@app.command()
def sweep(
    config: str = CONFIG_ARG,
    arguments: list[str] = typer.Argument(
        None, help="key=value (every cell) or key=v1,v2 (swept: one cell per value)."
    ),
    seeds: str = typer.Option(None, "--seeds", help="Seeds of every cell, e.g. 0,1,2."),
    model_seed: int = typer.Option(
        None, "--model-seed", help="Hold the built-in base model fixed at this seed."
    ),
    jobs: int = typer.Option(None, "--jobs", help="Cells at once (local processes)."),
    launcher: str = typer.Option(None, "--launcher", help="local (default) or slurm (submitit)."),
    max_cells: int = typer.Option(None, "--max-cells", help="Refuse a bigger grid."),
    slurm: list[str] = typer.Option(
        None, "--slurm", help="submitit parameter, e.g. --slurm timeout_min=600 (repeatable)."
    ),
    aggregate_only: bool = typer.Option(
        False, "--aggregate-only", help="Run no cell: aggregate the finished ones again."
    ),
    compare: str = typer.Option(
        None, "--compare", help="Methods the differences are taken against (default: eval.compare)."
    ),
) -> None:
    """Run a grid of `run` cells (the swept values x the seeds), then write sweep.json,
    sweep.md and the plots: every score with its 95% interval over seeds and items, and the
    paired differences between methods. Re-run to continue a killed sweep."""
    planned = plan_sweep(
        config,
        arguments or [],
        seeds=_ints(seeds, "--seeds"),
        model_seed_value=model_seed,
        max_cells=max_cells,
        jobs=jobs,
        launcher=launcher,
    )
    report = run_sweep(
        planned,
        slurm=_parameters(slurm or []),
        aggregate_only=aggregate_only,
        compare=[c.strip() for c in compare.split(",") if c.strip()] if compare else None,
    )
    print(f"sweep: {report}")
