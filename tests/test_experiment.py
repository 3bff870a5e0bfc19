"""`multipromot run`: one command from stage 1 to the report, and a re-run finishes the rest."""

import json
import re
import shutil
from pathlib import Path

import pytest

from multipromot import experiment
from multipromot.bank import PromptBank
from multipromot.cli import main
from multipromot.config import load_config, run_methods
from multipromot.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["pretrained", "prompt_tuning", "standard", "promot", "promot+1shot"]


@pytest.fixture
def tiny_config(tmp_path):
    """configs/tiny.yaml, made smaller still and pointed at a temp dir."""
    for sub in ("configs", "mixtures", "eval"):
        shutil.copytree(ROOT / sub, tmp_path / sub, ignore=shutil.ignore_patterns("data"))
    return tmp_path / "configs" / "tiny.yaml", [
        f"out_dir={tmp_path / 'run'}",
        f"bank.dir={tmp_path / 'bank'}",
        "stage1.steps=4",
        "stage1.eval_every=4",
        "stage1.eval_examples=4",
        "stage2.steps=4",
        "stage2.save_every=2",
        "stage2.eval_every=2",
        "stage2.eval_examples=4",
        "eval.examples=3",
        "eval.max_new_tokens=4",
        "eval.curve=true",
    ]


def test_run_writes_report_results_and_resumes_after_a_crash(
    tiny_config, tmp_path, monkeypatch, capsys
):
    path, overrides = tiny_config
    cfg = load_config(path, overrides)
    assert cfg.methods == METHODS

    # First attempt: stage 2 "crashes" on its second method.
    from multipromot.train import stage2

    real = stage2.finetune
    calls = []

    def crash_on_second(sub_cfg, **kw):
        calls.append(sub_cfg.stage2.mode)
        if len(calls) == 2:
            raise KeyboardInterrupt("pre-empted")
        return real(sub_cfg, **kw)

    monkeypatch.setattr(stage2, "finetune", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        experiment.run_experiment(cfg)
    run = tmp_path / "run"
    done_first = run / "methods" / "standard" / "eval.json"
    assert done_first.is_file() and not (run / "report.md").exists()
    stamp = done_first.stat().st_mtime_ns

    # Second attempt: nothing finished is redone; the rest completes.
    monkeypatch.setattr(stage2, "finetune", real)
    report = experiment.run_experiment(cfg)
    assert done_first.stat().st_mtime_ns == stamp
    # stage 1 ran once for each number of exemplars its methods use (0 and promot+1shot's 1)
    assert PromptBank(tmp_path / "bank").versions("lab_rte") == [1, 2]
    assert report == run / "report.md"

    results = json.loads((run / "results.json").read_text())
    methods = {r["method"] for r in results["records"]}
    assert methods == set(METHODS)
    seen = {(r["method"], r["task"]) for r in results["records"] if r["seen"]}
    assert ("promot", "lab_rte") in seen and ("standard", "lab_trans_fr") in seen
    # The curve: every checkpoint (steps 2 and 4) is evaluated; one step per method is selected.
    steps = {(r["step"], r["selected"]) for r in results["records"] if r["method"] == "standard"}
    assert {s for s, _ in steps} == {2, 4} and sum(sel for _, sel in steps) == 1
    assert (run / "norm_avg.png").is_file() and (run / "specialization.png").is_file()
    unseen = {r["task"] for r in results["records"] if not r["seen"]}
    assert unseen == {"lab_cb", "lab_qa"}  # eval/tiny.yaml
    text = report.read_text()
    assert "Norm. Avg." in text and "promot+1shot" in text
    assert "with the training losses below" in text
    out = capsys.readouterr().out
    assert f"report: {report}" in out
    # What the user sees: stage 1's score per task, and one progress line per scored
    # (method, task, shots) with its item count (curve points say their step).
    assert re.search(r"^stage 1: lab_rte@v0001: accuracy [0-9.]+ at step \d+$", out, re.M)
    assert re.search(r"^promot: lab_rte 0-shot: \d+ items, accuracy [0-9.]+$", out, re.M)
    assert re.search(r"^promot\+1shot: lab_cb 1-shot: \d+ items, \w+ [0-9.]+$", out, re.M)
    assert re.search(r"^standard \(step \d\): lab_qa 1-shot: \d+ items, \w+ [0-9.]+$", out, re.M)
    # Prompted methods routed fine-tuned inputs to their own prompt; unseen k-shot inputs got none.
    promot = [r for r in results["records"] if r["method"] == "promot"]
    assert {r["prompt"] for r in promot if r["seen"]} == {"lab_rte", "lab_trans_fr"}
    assert {r["prompt"] for r in promot if not r["seen"]} == {None}
    # The shots stage 2 trained with, as resolved (label, stage2.shots, mixture header).
    shots = {r["method"]: r["train_shots"] for r in results["records"]}
    assert (shots["promot"], shots["promot+1shot"], shots["pretrained"]) == (0, 1, 0)


def test_unknown_method_is_a_one_line_error(tiny_config, capsys):
    path, overrides = tiny_config
    assert main(["run", str(path), *overrides, "methods=[promot,magic]"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path.resolve()}: methods: unknown method 'magic'")
    with pytest.raises(UserError, match="names mixture 'multi'"):
        load_config(path, [*overrides, "methods=[promot@multi]"])  # refused when it loads


def test_parse_method_grammar(tiny_config):
    path, overrides = tiny_config
    labels = "methods=[promot+1shot@multi,promot,standard,prompt_tuning]"
    cfg = load_config(path, [*overrides, "mixtures={multi: mixtures/lab_rte_fr.yaml}", labels])
    m, promot, standard, prompt_tuning = run_methods(cfg)
    assert (m.kind, m.shots, m.trains, m.uses_prompts) == ("promot", 1, True, True)
    assert promot.shots is None  # stage2.shots / mixture decide
    assert m.mixture.endswith("mixtures/lab_rte_fr.yaml")
    assert standard.uses_prompts is False
    assert prompt_tuning.trains is False


def test_eval_command_scores_a_model_without_training(tiny_config, tmp_path, capsys):
    path, overrides = tiny_config
    assert main(["eval", str(path), *overrides, "eval.prompts=false", "eval.curve=false"]) == 0
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    records = results["records"]
    assert {r["method"] for r in records} == {"tiny-t5"}
    assert {(r["task"], r["seen"]) for r in records} == {
        ("lab_rte", True),
        ("lab_trans_fr", True),
        ("lab_cb", False),
        ("lab_qa", False),
    }
    assert all(r["prompt"] is None for r in records)  # no prompts asked for, none used
    assert "report:" in capsys.readouterr().out


def test_evaluation_uses_the_prompt_versions_stage_2_trained_with(tiny_config, tmp_path):
    """A prompt version added to the bank after stage 2 changes nothing `run` or `eval` score."""
    path, overrides = tiny_config
    cfg = load_config(path, [*overrides, "methods=[prompt_tuning,promot]", "eval.curve=false"])
    experiment.run_experiment(cfg)
    bank = PromptBank(tmp_path / "bank")
    pinned = {"lab_rte": "lab_rte@v0001", "lab_trans_fr": "lab_trans_fr@v0001"}
    first = json.loads((tmp_path / "run" / "results.json").read_text())["records"]
    assert all(r["bank_refs"] == pinned for r in first)

    # A newer version of lab_rte, trained on the same base model, becomes current.
    old = bank.get("lab_rte")
    newer = bank.add("lab_rte", bank.load_prompt(old) * -1.0, base_model=old.meta["base_model"])
    assert newer.ref == "lab_rte@v0002" and bank.get("lab_rte").current

    # `run` evaluates again (its finished evaluations removed) with the pinned versions ...
    for method in ("prompt_tuning", "promot"):
        (tmp_path / "run" / "methods" / method / "eval.json").unlink()
    experiment.run_experiment(cfg)
    again = json.loads((tmp_path / "run" / "results.json").read_text())["records"]
    assert all(r["bank_refs"] == pinned for r in again)
    assert [r["score"] for r in again] == [r["score"] for r in first]
    # ... and so does `multipromot eval` of the stage-2 model.
    final = tmp_path / "run" / "methods" / "promot" / "final"
    assert main(["eval", str(path), *overrides, f"model={final}", "eval.curve=false"]) == 0
    evaluated = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())["records"]
    assert all(r["bank_refs"] == pinned for r in evaluated)


def test_shots_precedence_label_then_stage2_shots_then_mixture(tiny_config, tmp_path, monkeypatch):
    """`+Kshot` in the label wins over stage2.shots, which wins over the mixture header."""
    from multipromot.data.mixtures import load_mixture
    from multipromot.train import stage2

    path, overrides = tiny_config
    header = tmp_path / "mixtures" / "one_shot.yaml"
    header.write_text("name: one_shot\nexemplars: {shots: 1, seed: 0}\ntasks:\n  - task: lab_rte\n")
    mixture = load_mixture(header)
    assert stage2.resolve_shots(-1, mixture) == (1, "exemplars.shots of mixture 'one_shot'")
    assert stage2.resolve_shots(0, mixture) == (0, "stage2.shots")

    seen = {}

    def fake_finetune(sub, **kw):
        seen[sub.out_dir] = stage2.resolve_shots(sub.stage2.shots, load_mixture(sub.stage2.mixture))

    monkeypatch.setattr(stage2, "finetune", fake_finetune)
    for label, extra, want in [
        ("promot", [], 1),  # the mixture header decides
        ("promot", ["stage2.shots=0"], 0),  # stage2.shots over the header
        ("promot+3shot", ["stage2.shots=0"], 3),  # the label over both
    ]:
        cfg = load_config(path, [*overrides, f"stage2.mixture={header}", *extra])
        cfg.methods = [label]
        method_dir = tmp_path / f"{label}-{len(extra)}"
        experiment._stage2(cfg, run_methods(cfg)[0], method_dir, {})
        assert seen[str(method_dir)][0] == want, (label, extra)


def test_ctrl_c_exits_130_with_a_line_saying_how_to_continue(tiny_config, monkeypatch, capsys):
    from multipromot.cli import stages

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "run_experiment", interrupted)
    path, overrides = tiny_config
    assert main(["run", str(path), *overrides]) == 130  # `stage1 && stage2` sees a failure
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted:") and "run the same command again" in err


def test_a_changed_config_never_reports_the_first_runs_numbers(
    tiny_config, tmp_path, monkeypatch, capsys
):
    """The issue's scenario: `run`, then `run` again on the same out_dir with another model and
    stage-2 settings. Was: finished in seconds, every number the first run's under new labels."""
    from multipromot.train import stage2

    path, overrides = tiny_config
    base = [*overrides, "methods=[pretrained,prompt_tuning,standard]", "eval.curve=false"]
    experiment.run_experiment(load_config(path, base))
    first = json.loads((tmp_path / "run" / "results.json").read_text())["records"]
    capsys.readouterr()
    # eval.curve=false: the plots are drawn (bars, tests/test_report.py), with the losses
    assert (tmp_path / "run" / "norm_avg.png").is_file()
    assert "with the training losses below" in (tmp_path / "run" / "report.md").read_text()

    trained = []
    real = stage2.finetune
    monkeypatch.setattr(stage2, "finetune", lambda sub, **kw: trained.append(sub) or real(sub))
    changed = [*base, "model=tiny-gpt2", "stage2.steps=6", "stage2.lr=0.05"]

    # reuse=strict: one line naming what changed, before anything is trained
    assert main(["run", str(path), *changed, "reuse=strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage1.json: reuse: was made from other settings" in err[0]
    assert "model 'tiny-t5' -> 'tiny-gpt2'" in err[0] and not trained

    # the default redoes every part made from other settings
    report = experiment.run_experiment(load_config(path, changed))
    out = capsys.readouterr().out
    assert "stage 1: made from other settings (model 'tiny-t5' -> 'tiny-gpt2'" in out
    assert [t.stage2.lr for t in trained] == [0.05]  # stage 2 trained again, with the new lr
    second = json.loads((tmp_path / "run" / "results.json").read_text())["records"]
    for method in ("pretrained", "prompt_tuning", "standard"):
        made = json.loads((tmp_path / "run/methods" / method / "eval.json").read_text())
        assert made["made_from"]["model"] == "tiny-gpt2"
    assert {r["step"] for r in second if r["method"] == "standard"} <= {2, 4, 6}
    assert first != second
    assert PromptBank(tmp_path / "bank").versions("lab_rte") == [1, 2]  # new stage-1 prompts
    text = report.read_text()
    assert "- `standard`: stage-2 step" in text and "trained and scored by this run" in text

    # the same config again: everything reused, nothing trained
    trained.clear()
    experiment.run_experiment(load_config(path, changed))
    assert not trained
    text = report.read_text()
    assert text.count("reused (trained and scored by an earlier run)") == 3
    again = json.loads((tmp_path / "run" / "results.json").read_text())["records"]
    assert again == second

    # an evaluation setting alone re-scores, without training again
    experiment.run_experiment(load_config(path, [*changed, "eval.examples=2"]))
    assert not trained and "stage 2 reused, scored by this run" in report.read_text()


def test_a_truncated_record_in_the_run_folder_is_redone(tiny_config, tmp_path, capsys):
    path, overrides = tiny_config
    cfg = load_config(path, [*overrides, "methods=[pretrained]", "eval.curve=false"])
    experiment.run_experiment(cfg)
    done = tmp_path / "run" / "methods" / "pretrained" / "eval.json"
    done.write_bytes(done.read_bytes()[:40])
    capsys.readouterr()
    experiment.run_experiment(cfg)
    assert (
        "evaluation of pretrained: made from other settings (no record" in capsys.readouterr().out
    )
    assert json.loads(done.read_text())["records"]
    done.write_bytes(done.read_bytes()[:40])
    assert (
        main(
            [
                "run",
                str(path),
                *overrides,
                "methods=[pretrained]",
                "eval.curve=false",
                "reuse=strict",
            ]
        )
        == 2
    )
