"""`multipromot sweep`: a grid of run cells, refused bad input, resume after a kill, reuse of the
unchanged cells, the aggregate's counts, and the SLURM launcher through submitit's local
executor."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multipromot.cli import main
from multipromot.errors import UserError
from multipromot.sweep import CELLS_DIR, parse_axis, plan_sweep, run_sweep

ROOT = Path(__file__).resolve().parents[1]
# Cells as small as a run gets: a random tiny T5, one stage-2 step, a few items.
SMALL = [
    "methods=[pretrained,standard]",
    "stage2.steps=1",
    "stage2.save_every=1",
    "stage2.eval_every=1",
    "stage2.eval_examples=2",
    "eval.examples=3",
    "eval.max_new_tokens=3",
    "log.to=[]",
]


@pytest.fixture
def config(tmp_path):
    for sub in ("configs", "mixtures", "eval"):
        shutil.copytree(ROOT / sub, tmp_path / sub, ignore=shutil.ignore_patterns("data"))
    return str(tmp_path / "configs" / "tiny.yaml"), [
        f"out_dir={tmp_path / 'sweep'}",
        f"bank.dir={tmp_path / 'bank'}",
        *SMALL,
    ]


def test_axes_split_on_top_level_commas_only():
    assert parse_axis("stage2.lr=1e-3,3e-4") == ("stage2.lr", ["1e-3", "3e-4"])
    assert parse_axis("eval.shots=[1],[1,4]") == ("eval.shots", ["[1]", "[1,4]"])
    assert parse_axis("x='a,b'") == ("x", ["'a,b'"])
    with pytest.raises(UserError, match="empty value"):
        parse_axis("stage2.lr=1e-3,")


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["stage2.lrr=1,2"], "stage2.lrr"),
        (["stage2.lr=1,nope"], "stage2.lr"),
        (["out_dir=a,b"], "out_dir: cannot be swept"),
        (["seed=1,2"], "seed: cannot be swept (use --seeds)"),
        (["methods=[standard],[promot]"], "methods: cannot be swept"),
        (["stage2.lr=1e-3,1e-4", "--seeds", "0,1,2", "--max-cells", "4"], "6 cells"),
        (["--seeds", "0,0"], "distinct"),
        (["--jobs", "99"], "--jobs"),
        (["--launcher", "ray"], "local or slurm"),
    ],
)
def test_bad_sweep_input_is_one_line_before_any_cell_runs(config, capsys, arguments, message):
    path, overrides = config
    assert main(["sweep", path, *overrides, *arguments]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (Path(overrides[0].split("=", 1)[1]) / CELLS_DIR).exists()


def _sweep_command(path: str, overrides: list[str], *args: str) -> list[str]:
    return [sys.executable, "-m", "multipromot", "sweep", path, *overrides, *args]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_a_rerun_reuses_finished_cells_and_a_changed_value_redoes_its_cell_only(config, tmp_path):
    """Scoring-only cells (the pretrained model): a sweep run again reuses every finished cell;
    with one value changed, that value's cell is new and the other is reused."""
    path, overrides = config
    pretrained = [*overrides, "methods=[pretrained]"]
    out = tmp_path / "sweep" / CELLS_DIR
    run_sweep(plan_sweep(path, [*pretrained, "eval.examples=2,3"]))
    run_sweep(plan_sweep(path, [*pretrained, "eval.examples=2,3"]))
    for cell in ("eval.examples=2,seed=0", "eval.examples=3,seed=0"):
        assert "pretrained: reusing" in (out / cell / "run.log").read_text()
    run_sweep(plan_sweep(path, [*pretrained, "eval.examples=2,4"]))
    assert "pretrained: reusing" in (out / "eval.examples=2,seed=0" / "run.log").read_text()
    assert "reusing" not in (out / "eval.examples=4,seed=0" / "run.log").read_text()
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [g["label"] for g in summary["groups"]] == ["eval.examples=2", "eval.examples=4"]


def test_aggregate_only_runs_no_cell_and_takes_other_baselines(config, tmp_path):
    path, overrides = config
    plan = plan_sweep(path, [*overrides, "methods=[pretrained,standard]"])
    with pytest.raises(UserError, match="has not finished"):
        run_sweep(plan, aggregate_only=True)
    run_sweep(plan)
    made = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    log = tmp_path / "sweep" / CELLS_DIR / "seed=0" / "run.log"
    stamp = log.stat().st_mtime_ns
    run_sweep(plan, aggregate_only=True, compare=["standard"])
    assert log.stat().st_mtime_ns == stamp  # no cell ran
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    # what made the cells stays on record; what aggregated them again is said beside it
    for key in ("command", "finished", "git_commit", "cells_seconds", "threads_per_cell"):
        assert summary[key] == made[key]
    assert made["cells_seconds"] > 0
    import torch

    assert made["threads_per_cell"] == torch.get_num_threads()  # in-process cells'
    sweep_md = (tmp_path / "sweep" / "sweep.md").read_text()
    assert f"each cell ran with {torch.get_num_threads()} torch thread(s)" in sweep_md
    assert summary["aggregated"]["command"] == plan.command + " --aggregate-only --compare standard"
    pairs = {
        (d["method"], d["baseline"]) for d in summary["groups"][0]["statistics"]["differences"]
    }
    assert pairs == {("pretrained", "standard")}


@pytest.mark.slow  # five cell runs with training, in subprocesses
def test_a_killed_sweep_resumes_and_a_changed_value_redoes_its_cell_only(config, tmp_path):
    path, overrides = config
    out = tmp_path / "sweep" / CELLS_DIR
    first = out / "stage2.lr=0.001,seed=0"
    # Killed (SIGKILL, the whole process group) once the first cell is finished.
    command = _sweep_command(path, overrides, "stage2.lr=0.001,0.002", "--seeds", "0")
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = subprocess.Popen(command, env=_env(), start_new_session=True, **quiet)
    deadline = time.monotonic() + 300
    while not (first / "results.json").is_file():
        assert killed.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "sweep" / "sweep.json").exists()

    again = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    log = (first / "run.log").read_text()
    assert "pretrained: reusing" in log and "standard: reusing" in log  # nothing redone
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [g["label"] for g in summary["groups"]] == ["stage2.lr=0.001", "stage2.lr=0.002"]

    # One value changed: its cell is new, the other cell is reused as it is.
    changed = _sweep_command(path, overrides, "stage2.lr=0.001,0.003", "--seeds", "0")
    third = subprocess.run(changed, env=_env(), capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "standard: reusing" in (first / "run.log").read_text()
    new_log = (out / "stage2.lr=0.003,seed=0" / "run.log").read_text()
    assert "stage 2: standard" in new_log and "standard: reusing" not in new_log


def test_a_base_model_from_a_folder_is_called_fixed(config, tmp_path):
    """Only a built-in model is built from the seed: a sweep over a folder (or hub id) holds the
    base model fixed whatever --model-seed says, and its report must not claim otherwise."""
    from multipromot.sweep import _base_model_text

    path, overrides = config
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert "both vary" in _base_model_text(plan_sweep(path, overrides, seeds=[0, 1]))
    text = _base_model_text(plan_sweep(path, [*overrides, f"model={folder}"], seeds=[0, 1]))
    assert text == f"base model fixed ({folder}), training seed varies"


def test_seeds_and_items_are_counted_in_the_aggregate(config, tmp_path):
    path, overrides = config
    sweep = plan_sweep(path, overrides, seeds=[0, 1])
    assert [c.name for c in sweep.cells] == ["seed=0", "seed=1"]
    report = run_sweep(sweep)
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    (group,) = summary["groups"]
    rows = {r["method"]: r for r in group["statistics"]["rows"]}
    suite_tasks = len(rows["standard"]["tasks"])
    assert rows["standard"]["norm_avg"]["seeds"] == 2
    assert rows["standard"]["norm_avg"]["items"] == 3 * suite_tasks  # eval.examples per task
    diff = group["statistics"]["differences"][0]
    assert (diff["method"], diff["baseline"]) == ("standard", "pretrained")
    text = report.read_text()
    assert "2 seeds x" in text and "base model and training both vary with the seed" in text
    assert (tmp_path / "sweep" / "sweep_curves.png").is_file()


def test_the_slurm_launcher_runs_cells_as_submitit_jobs(config, tmp_path):
    """submitit's local executor stands in for SLURM: each cell is a job of one array."""
    pytest.importorskip("submitit")
    path, overrides = config
    sweep = plan_sweep(path, [*overrides, "methods=[pretrained]"], launcher="slurm")
    report = run_sweep(sweep, slurm={"timeout_min": 10}, cluster="local")
    assert (tmp_path / "sweep" / CELLS_DIR / "seed=0" / "results.json").is_file()
    assert list((tmp_path / "sweep" / "submitit").iterdir())  # the jobs' own folder
    assert "pretrained" in report.read_text()
    # the scheduler's threads, not ours: not claimed
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["threads_per_cell"] is None
