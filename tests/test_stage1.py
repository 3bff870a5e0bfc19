"""Stage 1 end to end: a mixture of a local-file task and a generated task -> one bank entry each."""

import json
import textwrap

import pytest

from multipromot.bank import PromptBank
from multipromot.cli import main
from multipromot.config import load_config
from multipromot.train.stage1 import train_prompts


@pytest.fixture
def run_config(tmp_path):
    """Two tasks with different output formats: a local JSONL yes/no task and the generated
    lab_rte (True/False), prompt-tuned together on tiny-t5."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [
        {"text": f"item {i} is {'big' if i % 2 else 'small'}", "label": i % 2} for i in range(40)
    ]
    for split, part in (("train", rows[:32]), ("validation", rows[32:])):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (tmp_path / "mix.yaml").write_text(
        textwrap.dedent("""\
        name: two_formats
        version: 1
        tasks:
          - name: sizes
            source: {files: {train: data/train.jsonl, validation: data/validation.jsonl}, format: json}
            template: {jinja: "Size: {{text}} ||| {{answer_choices[label]}}", answer_choices: "no ||| yes"}
            metric: accuracy
          - task: lab_rte
        """)
    )
    (tmp_path / "run.yaml").write_text(
        textwrap.dedent(f"""\
        seed: 0
        out_dir: {tmp_path / "run"}
        model: tiny-t5
        bank: {{dir: {tmp_path / "bank"}}}
        stage1:
          mixture: mix.yaml
          prompt_length: 4
          steps: 30
          batch_size: 8
          eval_every: 30
          eval_examples: 8
          select_by: loss
          max_input_length: 160
          max_target_length: 8
          log_every: 10
        """)
    )
    return tmp_path / "run.yaml"


def validation_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "stage1" / "metrics.jsonl").open()]
    return {r["step"]: r["validation"] for r in records if "validation" in r}


def test_stage1_lowers_validation_loss_of_every_task_and_fills_the_bank(run_config, tmp_path):
    cfg = load_config(run_config)
    entries = train_prompts(cfg, progress=False)

    losses = validation_losses(tmp_path / "run")
    assert sorted(losses) == [0, 30]
    for task in ("sizes", "lab_rte"):
        assert losses[30][task]["loss"] < losses[0][task]["loss"] - 0.05, (task, losses)

    bank = PromptBank(tmp_path / "bank")
    assert [e.ref for e in entries] == ["sizes@v0001", "lab_rte@v0001"]
    assert sorted(bank.tasks()) == ["lab_rte", "sizes"]
    for entry in entries:
        meta = entry.meta
        assert meta["prompt_length"] == 4 and meta["dim"] == 64
        assert meta["stage1"]["metric"] == "loss" and meta["stage1"]["best_step"] == 30
        assert meta["stage1"]["value"] == pytest.approx(losses[30][entry.task]["loss"])
        assert meta["format"]["signature"]["pieces"]  # the router needs the template skeleton
    # The stored prompt is the one that scored best, and it loads for the model it was trained on.
    from multipromot.models import load_model

    model, _, _ = load_model("tiny-t5")
    assert bank.load_prompt("lab_rte", model=model).shape == (4, 64)


def test_stage1_cli_prints_entries_and_rejects_bad_config(run_config, tmp_path, capsys):
    assert main(["stage1", str(run_config), "stage1.steps=2", "stage1.eval_every=2"]) == 0
    out = capsys.readouterr().out
    assert "sizes@v0001" in out and "lab_rte@v0001" in out
    assert main(["stage1", str(run_config), "stage1.init=zeros"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {run_config}: stage1.init: must be random, vocab or text"]


def test_stage1_never_keeps_the_untrained_prompt_and_breaks_ties_by_loss(run_config, tmp_path):
    """tiny-t5 scores the same accuracy at every step (a tie): the stored prompt must be a
    trained one, the one with the lowest validation loss (was: step 0, the initial prompt)."""
    cfg = load_config(
        run_config, ["stage1.select_by=metric", "stage1.steps=20", "stage1.eval_every=10"]
    )
    entries = train_prompts(cfg, progress=False)
    losses = validation_losses(tmp_path / "run")
    assert sorted(losses) == [0, 10, 20]
    for entry in entries:
        scores = {step: losses[step][entry.task]["score"] for step in (10, 20)}
        chosen = entry.meta["stage1"]["best_step"]
        assert chosen in (10, 20)
        if scores[10] == scores[20]:  # a tie: the lower validation loss wins
            other = 30 - chosen
            assert losses[chosen][entry.task]["loss"] <= losses[other][entry.task]["loss"]
        assert entry.meta["stage1"]["loss"] == pytest.approx(losses[chosen][entry.task]["loss"])


def test_tie_rules():
    from multipromot.train.stage1 import Best, better

    def cand(value, loss, step):
        return Best(value, loss, step, "accuracy", None)

    assert better(cand(50, 1.0, 20), cand(50, 1.1, 10), True)  # lower loss wins a tie
    assert not better(cand(50, 1.2, 20), cand(50, 1.1, 10), True)
    assert better(cand(50, 1.0, 20), cand(50, 1.0, 10), True)  # then the later step
    assert not better(cand(40, 0.1, 20), cand(50, 1.0, 10), True)  # the value comes first
    assert not better(cand(50, 1.0, 20), cand(50, 1.1, 10), True, "first")
    assert better(cand(0.5, 9.0, 20), cand(0.6, 9.0, 10), False)  # select_by loss


def _bank_prompts(bank_dir):
    bank = PromptBank(bank_dir)
    return {task: bank.get(task).prompt_path.read_bytes() for task in bank.tasks()}


def test_stage1_resumes_after_an_interrupt_with_the_same_prompts(
    run_config, tmp_path, monkeypatch, capsys
):
    """Interrupted after its second checkpoint (step 8 of 12), with the half line a kill
    leaves at the end of metrics.jsonl, stage 1 run again continues from step 8, stores
    bit-identical prompts to an uninterrupted run and logs what it would have."""
    import multipromot.train.stage1 as stage1

    settings = [
        "stage1.steps=12",
        "stage1.eval_every=4",
        "stage1.optimizer=adamw",
        "stage1.lr=0.05",
        "stage1.warmup_steps=3",
    ]
    whole = load_config(
        run_config,
        [*settings, f"out_dir={tmp_path / 'whole'}", f"bank.dir={tmp_path / 'whole_bank'}"],
    )
    train_prompts(whole, progress=False)

    cut = load_config(run_config, settings)
    real_save = stage1.save_checkpoint
    saves = []

    def save_then_stop(root, step, **kwargs):
        path = real_save(root, step, **kwargs)
        saves.append(step)
        if len(saves) == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(stage1, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_prompts(cut, progress=False)
    monkeypatch.setattr(stage1, "save_checkpoint", real_save)
    assert saves == [4, 8] and not (tmp_path / "bank").exists()
    with (tmp_path / "run" / "stage1" / "metrics.jsonl").open("a") as log:
        log.write('{"stage": 1, "step": 9, "lo')  # the half line a kill mid-write leaves

    capsys.readouterr()
    train_prompts(cut, progress=True)
    assert "stage 1: resumed from step 8" in capsys.readouterr().out
    assert _bank_prompts(tmp_path / "bank") == _bank_prompts(tmp_path / "whole_bank")

    def logged(run):  # the metrics log, less the wall-clock speed
        lines = [json.loads(line) for line in (run / "stage1/metrics.jsonl").open()]
        return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in lines]

    assert logged(tmp_path / "run") == logged(tmp_path / "whole")  # no step logged twice


@pytest.mark.slow  # three stage-1 processes on 2 shared cores
def test_stage1_killed_with_sigkill_then_run_again_stores_the_same_prompts(run_config, tmp_path):
    """The issue's acceptance test, with a real kill -9: stage 1 killed after a checkpoint,
    the same command again continues from its last checkpoint and stores bit-identical
    prompts to an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from multipromot.train.checkpoint import is_complete

    settings = [
        "stage1.steps=60",
        "stage1.eval_every=4",
        "stage1.optimizer=adamw",
        "stage1.lr=0.05",
        "stage1.warmup_steps=3",
    ]
    command = [sys.executable, "-m", "multipromot", "stage1", str(run_config), *settings]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [*command, f"out_dir={tmp_path / 'whole'}", f"bank.dir={tmp_path / 'whole_bank'}"],
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )

    killed = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoints = tmp_path / "run" / "stage1" / "checkpoints"
    deadline = time.monotonic() + 600
    while not (checkpoints / "step_8").is_dir() or not is_complete(checkpoints / "step_8"):
        assert killed.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "bank").exists()  # killed before stage 1 stored its prompts

    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stage 1: resumed from step " in again.stdout
    assert _bank_prompts(tmp_path / "bank") == _bank_prompts(tmp_path / "whole_bank")
