"""``multipromot sweep CONFIG [key=v1,v2 ...] --seeds 0,1,2``: a grid of ``run`` cells and their
aggregate.

The cells are the product of the swept values times the seeds; each is a ``run`` of CONFIG with
its overrides, in its own folder ``<out_dir>/cells/<name>`` named by them
(``stage2.lr=0.001,seed=1``). Cells share pieces only through ``run``'s provenance records: the
built-in base model of a seed through the model cache, stage 1 through the bank (an entry
records what it was made from, so a cell whose stage-1 settings equal another's reuses its
prompts), and a re-run sweep continues every cell from what it finished (a cell whose
override changed is a new cell; the others are reused). When all cells are done, the
aggregate (:mod:`multipromot.eval.aggregate`) writes ``sweep.json``, ``sweep.md`` and plots
under ``out_dir``.

Where cells run: one after another in this process (default); ``--jobs N`` local processes at
once, each with ``cores // N`` threads; ``--launcher slurm``: one job per cell (a job array) through submitit
(tested with submitit's local executor). Every cell's output goes to ``<cell>/run.log``.

``seed`` is the training seed; a built-in base model (the lab models) is built with
``model_seed``, which follows ``seed`` unless fixed (``--model-seed N`` holds the base model
fixed while training varies). Bad sweep input (an unknown key or value, an empty list, a key
that cannot be swept, more cells than ``--max-cells``) is refused before any cell runs.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from multipromot.config import RunConfig, load_config, model_seed
from multipromot.errors import UserError
from multipromot.eval.aggregate import aggregate_sweep
from multipromot.experiment import run_experiment, torch_threads
from multipromot.models import BUILTIN_MODELS, load_model
from multipromot.train.stage1 import made_from as stage1_made_from

__all__ = ["Cell", "Sweep", "plan_sweep", "run_sweep", "parse_axis", "CELLS_DIR"]

CELLS_DIR = "cells"
# Keys a cell cannot vary: where it writes, how it reuses, the grid itself, the seed (--seeds)
# and the methods (every cell runs them all, so methods compare on the same seeds and items).
UNSWEEPABLE = ("out_dir", "config_file", "reuse", "sweep", "seed", "methods")


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its folder name, its swept values and seed, its overrides."""

    name: str
    values: dict
    seed: int
    overrides: tuple[str, ...]

    def folder(self, sweep_dir: Path) -> Path:
        return sweep_dir / CELLS_DIR / self.name


@dataclass
class Sweep:
    """A planned sweep: the base config, where it writes, its cells and how they run."""

    config: str
    overrides: list[str]  # fixed overrides, applied to every cell
    cfg: RunConfig
    out_dir: Path
    axes: dict[str, list[str]]
    seeds: list[int]
    cells: list[Cell] = field(default_factory=list)
    jobs: int = 1
    launcher: str = "local"
    command: str = ""  # as typed, for the aggregate


def parse_axis(item: str) -> tuple[str, list[str]]:
    """``key=v1,v2`` -> (key, [v1, v2]); commas inside brackets or quotes do not split
    (``eval.shots=[1],[1,4]`` is two values).

    Raises:
        UserError: not ``key=value``, or an empty value in the list.
    """
    if "=" not in item:
        raise UserError(f"{item!r} must look like key=value or key=v1,v2", file="<command line>")
    key, _, text = item.partition("=")
    values, depth, quote, current = [], 0, "", ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            values.append(current)
            current = ""
            continue
        current += char
    values.append(current)
    if any(not v.strip() for v in values):
        raise UserError(f"an empty value in {text!r}", file="<command line>", key=key)
    return key.strip(), [v.strip() for v in values]


def _cell_name(values: dict, seed: int) -> str:
    parts = [
        f"{key}={urllib.parse.quote(str(value), safe='=.-_+[]@:')}" for key, value in values.items()
    ]
    return ",".join([*parts, f"seed={seed}"])


def plan_sweep(
    config: str,
    arguments: list[str],
    *,
    seeds: list[int] | None = None,
    model_seed_value: int | None = None,
    max_cells: int | None = None,
    jobs: int | None = None,
    launcher: str | None = None,
    command: str | None = None,
) -> Sweep:
    """The sweep's cells, each checked as a config before anything runs.

    Args:
        config: the run config.
        arguments: ``key=value`` (fixed) and ``key=v1,v2`` (swept) arguments.
        seeds: the seeds (default: ``sweep.seeds``, else ``[seed]``).
        model_seed_value: hold the built-in base model fixed at this seed.
        max_cells: refuse a larger grid (default: ``sweep.max_cells``).
        jobs: cells at once (default: ``sweep.jobs``).
        launcher: ``local`` or ``slurm`` (default: ``sweep.launcher``).
        command: the command line as typed (default: one rebuilt from these arguments).

    Raises:
        UserError: an unknown key or bad value (named with its cell), an empty list, a key that
            cannot be swept, too many cells or jobs, an unknown launcher.
    """
    fixed, axes = [], {}
    for item in arguments:
        key, values = parse_axis(item)
        if len(values) == 1:
            fixed.append(f"{key}={values[0]}")
        else:
            axes[key] = values
    if model_seed_value is not None:
        fixed.append(f"model_seed={model_seed_value}")
    cfg = load_config(config, fixed)
    where = cfg.config_file or None
    for key, values in cfg.sweep.grid.items():
        if key not in axes:  # the config's grid; the command line's axes win
            if not isinstance(values, list) or not values:
                raise UserError("lists no values", file=where, key=f"sweep.grid.{key}")
            axes[key] = [str(v) for v in values]
    for key in axes:
        if key.split(".")[0] in UNSWEEPABLE:
            hint = " (use --seeds)" if key == "seed" else ""
            raise UserError(f"cannot be swept{hint}", file="<command line>", key=key)
    seeds = list(seeds if seeds is not None else cfg.sweep.seeds or [cfg.seed])
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"the seeds must be distinct and at least one, got {seeds}", key="--seeds")
    limit = max_cells if max_cells is not None else cfg.sweep.max_cells
    count = len(seeds) * _product(len(v) for v in axes.values())
    if count > limit:
        raise UserError(
            f"the grid has {count} cells, more than the budget of {limit} (--max-cells)",
            key="sweep.max_cells",
        )
    jobs = jobs if jobs is not None else cfg.sweep.jobs
    cores = len(os.sched_getaffinity(0))
    if not 1 <= jobs <= cores:
        raise UserError(f"must be in 1..{cores} (this machine's cores)", key="--jobs")
    launcher = launcher or cfg.sweep.launcher
    if launcher not in ("local", "slurm"):
        raise UserError(f"must be local or slurm, got {launcher!r}", key="--launcher")
    out_dir = Path(cfg.out_dir).resolve()
    sweep = Sweep(config, fixed, cfg, out_dir, axes, seeds, jobs=jobs, launcher=launcher)
    sweep.command = command or _as_typed(sweep, arguments, model_seed_value, max_cells)
    for combo in itertools.product(*axes.values()) if axes else [()]:
        values = dict(zip(axes, combo, strict=True))
        for seed in seeds:
            cell = Cell(
                _cell_name(values, seed),
                values,
                seed,
                (*fixed, *(f"{k}={v}" for k, v in values.items()), f"seed={seed}"),
            )
            load_config(config, [*cell.overrides, f"out_dir={cell.folder(out_dir)}"])
            sweep.cells.append(cell)
    return sweep


def _aggregate_command(command: str, compare: list[str] | None) -> str:
    """The command that aggregated a sweep again: its cells' command with the options that made
    it an aggregation."""
    parts = [command, "--aggregate-only"]
    if compare is not None:
        parts += ["--compare", shlex.quote(",".join(compare))]
    return " ".join(parts)


def _made_by(summary: Path) -> dict:
    """The record of the run that made a sweep's cells, from its ``sweep.json`` (empty when
    there is none)."""
    if not summary.is_file():
        return {}
    made = json.loads(summary.read_text())
    keys = ("command", "finished", "git_commit", "cells_seconds", "threads_per_cell")
    return {k: made.get(k) for k in keys}


def _as_typed(sweep: Sweep, arguments: list[str], model_seed_value, max_cells) -> str:
    """The command that runs this sweep again, from the folder it was run in."""
    parts = ["multipromot", "sweep", sweep.config, *arguments]
    parts += ["--seeds", ",".join(map(str, sweep.seeds))]
    if model_seed_value is not None:
        parts += ["--model-seed", str(model_seed_value)]
    if sweep.jobs != 1:
        parts += ["--jobs", str(sweep.jobs)]
    if sweep.launcher != "local":
        parts += ["--launcher", sweep.launcher]
    if max_cells is not None:
        parts += ["--max-cells", str(max_cells)]
    return f"cd {shlex.quote(os.getcwd())} && {shlex.join(parts)}"


def _product(counts) -> int:
    total = 1
    for n in counts:
        total *= n
    return total


def run_sweep(
    sweep: Sweep,
    *,
    slurm: dict | None = None,
    cluster: str | None = None,
    aggregate_only: bool = False,
    compare: list[str] | None = None,
) -> Path:
    """Run every cell not finished yet, then write the aggregate; returns ``sweep.md``.

    Args:
        sweep: from :func:`plan_sweep`.
        slurm: submitit's executor parameters (``timeout_min``, ``slurm_partition``, ...).
        cluster: submitit's cluster (None: SLURM when available; ``local`` in tests).
        aggregate_only: run no cell; aggregate the finished ones again (e.g. with other
            ``compare`` baselines, which only choose the differences shown).
        compare: the baselines of the paired differences (default: ``eval.compare``).

    Raises:
        UserError: a cell failed (its folder and log named), or, with ``aggregate_only``, a
            cell has not finished.
    """
    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    commit = _git_commit(Path(sweep.config).resolve().parent)  # the code the cells run with
    print(
        f"sweep: {len(sweep.cells)} cells ({' x '.join(_axis_text(sweep))}) under "
        f"{sweep.out_dir / CELLS_DIR}; {_base_model_text(sweep)}"
    )
    if aggregate_only:
        for cell in sweep.cells:
            if not (cell.folder(sweep.out_dir) / "results.json").is_file():
                raise UserError(
                    f"cell {cell.name} has not finished; run the sweep without --aggregate-only",
                    file=cell.folder(sweep.out_dir),
                )
    elif sweep.launcher == "slurm":
        _run_submitit(sweep, slurm or {}, cluster)
    else:
        _run_local(sweep)
    cells = [
        {"name": c.name, "values": c.values, "seed": c.seed, "folder": c.folder(sweep.out_dir)}
        for c in sweep.cells
    ]
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta = {
        "command": sweep.command,
        "finished": now,
        "git_commit": commit,
        "cells_seconds": round(time.monotonic() - started, 1),
        # CPU training repeats to the bit only at the same thread count: say what cells ran with
        "threads_per_cell": _threads_per_cell(sweep),
    }
    if aggregate_only:
        # The cells were made by the command that ran them: keep its record (command, commit,
        # wall time) and say what aggregated them again.
        meta = {
            **{k: None for k in meta},
            **_made_by(sweep.out_dir / "sweep.json"),
            "aggregated": {
                "command": _aggregate_command(sweep.command, compare),
                "date": now,
                "git_commit": commit,
            },
        }
    return aggregate_sweep(
        sweep.out_dir,
        cells,
        axes=sweep.axes,
        seeds=sweep.seeds,
        description=_base_model_text(sweep),
        compare=compare if compare is not None else sweep.cfg.eval.compare,
        meta=meta,
    )


def _git_commit(folder: Path) -> str | None:
    """The commit of the checkout the config lives in (with ``+changes`` when it has
    uncommitted ones), or None outside a git checkout: which code made the sweep."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=folder,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def _axis_text(sweep: Sweep) -> list[str]:
    axes = [f"{k} in {{{', '.join(v)}}}" for k, v in sweep.axes.items()]
    return [*axes, f"seeds {{{', '.join(map(str, sweep.seeds))}}}"]


def _base_model_text(sweep: Sweep) -> str:
    if sweep.cfg.model not in BUILTIN_MODELS:  # a hub id or a folder: the seed builds nothing
        return f"base model fixed ({sweep.cfg.model}), training seed varies"
    if sweep.cfg.model_seed >= 0:
        return f"base model fixed (model_seed {sweep.cfg.model_seed}), training seed varies"
    return "base model and training both vary with the seed"


def _threads_per_cell(sweep: Sweep) -> int | None:
    """The torch threads each cell ran with: this process's for in-process cells, the budget
    of ``--jobs N``; None on a cluster (the scheduler's)."""
    if sweep.launcher != "local":
        return None
    if sweep.jobs == 1:  # the cells ran in this process
        return torch_threads()
    return _thread_budget(sweep)


def _thread_budget(sweep: Sweep) -> int:
    """Each of ``jobs`` local processes' threads: the cores this process may use, shared."""
    return max(1, len(os.sched_getaffinity(0)) // sweep.jobs)


def _run_local(sweep: Sweep) -> None:
    """Cells as ``multipromot run`` processes, ``jobs`` at a time; with several jobs, the base
    models are built first and the first cell of each stage-1 setting runs before the cells
    that can reuse its prompts."""
    threads = _thread_budget(sweep)
    if sweep.jobs == 1:  # in this process: no start-up per cell
        for cell in sweep.cells:
            _run_cell_here(sweep, cell)
        return
    _build_base_models(sweep)
    first, rest = _stage1_leaders(sweep)
    for wave in (first, rest):
        with ThreadPoolExecutor(max_workers=sweep.jobs) as pool:
            list(pool.map(lambda c: _run_cell(sweep, c, threads=threads), wave))


def _build_base_models(sweep: Sweep) -> None:
    """Each distinct built-in base model once, here, before cells run at once (two processes
    building the same cache entry would only waste the time of one)."""
    seen = set()
    for cell in sweep.cells:
        cfg = load_config(sweep.config, list(cell.overrides))
        key = (cfg.model, model_seed(cfg))
        if key not in seen:
            seen.add(key)
            load_model(cfg.model, seed=key[1])


def _stage1_leaders(sweep: Sweep) -> tuple[list[Cell], list[Cell]]:
    """The first cell of each distinct stage-1 record, and the others."""
    first, rest, seen = [], [], set()
    for cell in sweep.cells:
        cfg = load_config(sweep.config, list(cell.overrides))
        key = repr(stage1_made_from(cfg))
        (rest if key in seen else first).append(cell)
        seen.add(key)
    return first, rest


def _run_cell_here(sweep: Sweep, cell: Cell) -> None:
    """One cell in this process, its output in ``<cell>/run.log``.

    Raises:
        UserError: the run failed (the cell and its log named).
    """
    folder = cell.folder(sweep.out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    print(f"sweep: {cell.name}: running (log: {folder / 'run.log'})", flush=True)
    start = time.monotonic()
    cfg = load_config(sweep.config, [*cell.overrides, f"out_dir={folder}"])
    with (folder / "run.log").open("w") as log, redirect_stdout(log), redirect_stderr(log):
        try:
            run_experiment(cfg)
        except UserError as e:
            print(f"error: {e}")
            failed = e
        else:
            failed = None
    if failed is not None:
        raise UserError(
            f"cell {cell.name} failed ({failed}); see {folder / 'run.log'}; run the same sweep "
            "again to continue",
            file=folder,
        )
    print(f"sweep: {cell.name}: done in {time.monotonic() - start:.0f} s", flush=True)


def _run_cell(sweep: Sweep, cell: Cell, *, threads: int | None) -> None:
    """One cell as a ``multipromot run`` process (its output in ``<cell>/run.log``).

    Raises:
        UserError: the run failed (exit status and log named); KeyboardInterrupt when it was
            interrupted (130).
    """
    folder = cell.folder(sweep.out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    command = [
        sys.executable,
        "-m",
        "multipromot",
        "run",
        sweep.config,
        *cell.overrides,
        f"out_dir={folder}",
    ]
    print(f"sweep: {cell.name}: running (log: {folder / 'run.log'})", flush=True)
    start = time.monotonic()
    with (folder / "run.log").open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            status = process.wait()
        except KeyboardInterrupt:  # the cell got the same Ctrl-C: let it checkpoint and stop
            status = process.wait()
    if status == 130:
        raise KeyboardInterrupt
    if status != 0:
        raise UserError(
            f"cell {cell.name} failed (exit status {status}); see {folder / 'run.log'}; run the "
            "same sweep again to continue",
            file=folder,
        )
    print(f"sweep: {cell.name}: done in {time.monotonic() - start:.0f} s", flush=True)


def run_cell_job(config: str, overrides: list[str]) -> str:
    """One cell inside a submitit job (a module-level function, so submitit can send it)."""
    return str(run_experiment(load_config(config, overrides)))


def _run_submitit(sweep: Sweep, parameters: dict, cluster: str | None) -> None:
    """Every cell as a job of one submitit job array; waits for all of them."""
    import submitit  # only the slurm launcher needs it

    executor = submitit.AutoExecutor(folder=sweep.out_dir / "submitit", cluster=cluster)
    executor.update_parameters(**parameters)
    configs = [sweep.config] * len(sweep.cells)
    overrides = [[*cell.overrides, f"out_dir={cell.folder(sweep.out_dir)}"] for cell in sweep.cells]
    jobs = executor.map_array(run_cell_job, configs, overrides)
    print(f"sweep: submitted {len(jobs)} jobs ({', '.join(j.job_id for j in jobs[:3])}...)")
    failed = []
    for cell, job in zip(sweep.cells, jobs, strict=True):
        try:
            job.result()
            print(f"sweep: {cell.name}: done (job {job.job_id})", flush=True)
        except Exception as e:  # noqa: BLE001 - every failed cell is named below
            failed.append(f"{cell.name} (job {job.job_id}: {str(e).splitlines()[-1]})")
    if failed:
        raise UserError(
            f"{len(failed)} cell(s) failed: {'; '.join(failed)}; logs under "
            f"{sweep.out_dir / 'submitit'}; run the same sweep again to continue"
        )
