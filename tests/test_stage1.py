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
