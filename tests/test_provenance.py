"""Provenance by content, not by name (issue 26, items 1-6): end-to-end scenarios on the tiny
config, each one a result a user could have believed before."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest

from multipromot import experiment
from multipromot.bank import PromptBank
from multipromot.cli import main
from multipromot.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny(tmp_path):
    """configs/tiny.yaml, made smaller still and pointed at a temp dir: (config, overrides)."""
    for sub in ("configs", "mixtures", "eval"):
        shutil.copytree(ROOT / sub, tmp_path / sub, ignore=shutil.ignore_patterns("data"))
    return tmp_path / "configs" / "tiny.yaml", [
        f"out_dir={tmp_path / 'run'}",
        f"bank.dir={tmp_path / 'bank'}",
        "stage1.steps=2",
        "stage1.eval_every=2",
        "stage1.eval_examples=2",
        "stage1.batching=mixed",  # every prompt moves at every step (2 steps here)
        "stage2.steps=2",
        "stage2.save_every=2",
        "stage2.eval_every=2",
        "stage2.eval_examples=2",
        "eval.examples=2",
        "eval.max_new_tokens=2",
        "eval.shots=[1]",
        "eval.curve=false",
    ]


def _error_line(capsys) -> str:
    """The one error line on stderr (local data's hold-out notes may precede it)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def _records(run: Path) -> list[dict]:
    return json.loads((run / "results.json").read_text())["records"]


def test_a_recreated_bank_that_repeats_refs_is_redone_not_reused(
    tiny, tmp_path, monkeypatch, capsys
):
    """Item 1. Delete the bank, run stage 1 again with another learning rate: the new prompts
    are again lab_rte@v0001 with other content. Was: `run` reused prompt_tuning's and
    ProMoT's scores and weights of the old prompts while the report showed the new settings."""
    from multipromot.train import stage2

    path, overrides = tiny
    base = [*overrides, "methods=[prompt_tuning,promot]"]
    experiment.run_experiment(load_config(path, base))
    run, bank_dir = tmp_path / "run", tmp_path / "bank"
    first = PromptBank(bank_dir).get("lab_rte")

    shutil.rmtree(bank_dir)
    assert main(["stage1", str(path), *base, "stage1.lr=0.05"]) == 0
    second = PromptBank(bank_dir).get("lab_rte")
    assert second.ref == first.ref and second.meta["sha256"] != first.meta["sha256"]
    capsys.readouterr()

    # reuse=strict: refused in one line that says the content changed, before training
    trained = []
    real = stage2.finetune
    monkeypatch.setattr(stage2, "finetune", lambda sub, **kw: trained.append(sub) or real(sub))
    changed = [*base, "stage1.lr=0.05"]
    assert main(["run", str(path), *changed, "reuse=strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and not trained
    # (stage 1's own record changed first: its lr)
    assert "stage1.json: reuse: was made from other settings" in err[0]

    # the default: stage 1 is shared with the standalone run (same settings), stage 2 and
    # both evaluations are redone with the new prompts
    experiment.run_experiment(load_config(path, changed))
    out = capsys.readouterr().out
    assert [t.stage2.mode for t in trained] == ["promot"]
    assert "holds other content than before: the bank was recreated" in out
    for r in _records(run):
        assert r["bank_refs"]["lab_rte"] == "lab_rte@v0001"
        assert r["bank_sha256"]["lab_rte"] == second.meta["sha256"]
    new_record = json.loads((run / "methods" / "promot" / "final" / "stage2.json").read_text())
    assert new_record["bank_sha256"]["lab_rte"] == second.meta["sha256"]


def test_a_model_whose_refs_now_hold_other_prompts_is_refused(tiny, tmp_path, capsys):
    """Item 1: evaluating a stage-2 model after its bank was recreated names the entry instead
    of scoring it with the foreign prompt."""
    path, overrides = tiny
    base = [*overrides, "methods=[promot]"]
    experiment.run_experiment(load_config(path, base))
    final = tmp_path / "run" / "methods" / "promot" / "final"
    shutil.rmtree(tmp_path / "bank")
    assert main(["stage1", str(path), *base, "stage1.lr=0.05"]) == 0
    capsys.readouterr()
    assert main(["eval", str(path), *base, f"model={final}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "lab_" in err and "holds another prompt than the one recorded" in err
    assert len(err.splitlines()) == 1


def _inline_mixture(folder: Path, name: str, question: str) -> Path:
    """A mixture with one inline task ``my_task`` over local JSONL data, its template asking
    ``question``."""
    data = folder / "my_task.jsonl"
    if not data.exists():
        rows = [{"text": f"item {i}", "label": i % 2} for i in range(40)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = folder / f"{name}.yaml"
    path.write_text(
        f"name: {name}\ntasks:\n  - name: my_task\n"
        "    source: {files: my_task.jsonl, format: json}\n"
        f'    template: {{jinja: "{{{{text}}}} {question} ||| {{{{answer_choices[label]}}}}", '
        'answer_choices: "even ||| odd"}\n'
        "    metric: accuracy\n"
    )
    return path


def test_an_inline_task_may_not_take_a_catalogue_tasks_name(tiny, tmp_path, capsys):
    """Item 2: an inline task named like the catalogue's lab_rte would fill the bank's lab_rte
    entries. Refused in one line naming both definitions, before anything trains."""
    path, overrides = tiny
    mixture = tmp_path / "mixtures" / "shadow.yaml"
    mixture.write_text(
        _inline_mixture(tmp_path / "mixtures", "x", "even or odd?")
        .read_text()
        .replace("name: my_task", "name: lab_rte")
    )
    assert main(["stage1", str(path), *overrides, f"stage1.mixture={mixture}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{mixture}: tasks[0].name: inline task 'lab_rte' takes the name of" in err
    assert "catalogue.yaml" in err  # where the catalogue defines it
    assert not (tmp_path / "bank").exists()


def test_a_prompt_tuned_for_another_definition_of_its_task_is_refused(tiny, tmp_path, capsys):
    """Item 2: two inline definitions of `my_task` (other templates): the prompt stage 1 tuned
    for the first is refused for the second, by the definition fingerprint its entry records.
    Was: stage 2 trained with the foreign prompt."""
    path, overrides = tiny
    first = _inline_mixture(tmp_path / "mixtures", "first", "even or odd?")
    second = _inline_mixture(tmp_path / "mixtures", "second", "is the number odd or even?")
    assert main(["stage1", str(path), *overrides, f"stage1.mixture={first}"]) == 0
    entry = PromptBank(tmp_path / "bank").get("my_task")
    assert entry.format["definition"]
    capsys.readouterr()

    # stage 2 on the other definition: refused before it trains, naming the entry
    stage2 = [*overrides, f"stage2.mixture={second}", "stage2.mode=promot"]
    assert main(["stage2", str(path), *stage2]) == 2
    err = _error_line(capsys)
    assert "my_task@v0001" in err
    assert "was tuned for another definition of task 'my_task'" in err
    assert not (tmp_path / "run" / "final").exists()

    # `run` whose stage 1 and stage 2 define the task differently: refused in preflight
    both = [*overrides, f"stage1.mixture={first}", f"stage2.mixture={second}", "methods=[promot]"]
    assert main(["run", str(path), *both]) == 2
    err = _error_line(capsys)
    assert "fine-tunes task 'my_task'" in err and str(first) in err
    assert PromptBank(tmp_path / "bank").versions("my_task") == [1]  # stage 1 did not run

    # the same definition passes
    assert main(["stage2", str(path), *overrides, f"stage2.mixture={first}"]) == 0


def test_load_trained_gives_the_prompts_the_model_was_trained_with(tiny, tmp_path):
    """Item 3: one call loads a model folder with its tokenizer, pinned prompts and router; a
    newer current version changes nothing, and other versions are loaded only out loud. Was:
    the README's `PromptedModel.from_bank` gave the current version without a word."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from multipromot import PromptedModel, UnpinnedPromptWarning, load_trained

    path, overrides = tiny
    experiment.run_experiment(load_config(path, [*overrides, "methods=[promot]"]))
    final = tmp_path / "run" / "methods" / "promot" / "final"
    bank = PromptBank(tmp_path / "bank")
    old = bank.get("lab_rte")
    newer = bank.add("lab_rte", bank.load_prompt(old) * -1.0, base_model=old.meta["base_model"])
    assert bank.get("lab_rte").ref == newer.ref == "lab_rte@v0002"

    with warnings.catch_warnings():
        warnings.simplefilter("error", UnpinnedPromptWarning)  # the pinned load says nothing
        trained = load_trained(final)
    assert trained.refs == {"lab_rte": "lab_rte@v0001", "lab_trans_fr": "lab_trans_fr@v0001"}
    row = trained.tasks.index("lab_rte")
    assert torch.equal(trained.model.prompts[row], bank.load_prompt("lab_rte@v0001"))
    assert trained.route(["a question nobody templated"]) == [None]
    outputs = trained.generate(
        ["x is bigger than y. question: y is bigger than x"], tasks=["lab_rte"]
    )
    assert len(outputs) == 1 and isinstance(outputs[0], str)

    # the bank's current versions, asked for: loaded, and said
    with pytest.warns(UnpinnedPromptWarning, match="trained with lab_rte@v0001"):
        current = load_trained(final, refs="current", router=False)
    assert current.refs["lab_rte"] == "lab_rte@v0002"

    # the README's old snippet on a stage-2 model: the bank says it too
    hf_model = AutoModelForSeq2SeqLM.from_pretrained(final)
    with pytest.warns(UnpinnedPromptWarning, match="lab_rte@v0002.*trained with lab_rte@v0001"):
        PromptedModel.from_bank(hf_model, bank, tasks=["lab_rte"])


def _section(report: Path, heading: str) -> str:
    text = report.read_text()
    return text.split(f"## {heading}", 1)[1].split("\n## ", 1)[0]


def test_reports_state_the_command_as_typed_and_what_was_actually_used(tiny, tmp_path, monkeypatch):
    """Item 4. Was: `eval`'s report said `multipromot run CONFIG` and listed the config's
    methods, bank.dir and stage-1 lr (the prompts came from the bank stage2.json records, made
    at another lr); `run`'s dropped the command-line overrides, so pasting it ran something
    else."""
    import shlex

    path, overrides = tiny
    monkeypatch.chdir(tmp_path)
    argv = ["run", str(path), *overrides, "methods=[promot]", "stage2.lr=0.002"]
    assert main(argv) == 0
    produced = _section(tmp_path / "run" / "report.md", "How this was produced")
    command = produced.split("```\n", 1)[1].split("\n```", 1)[0]
    assert command.startswith(f"cd {shlex.quote(str(tmp_path))} && multipromot run ")
    assert shlex.split(command.split(" && ", 1)[1])[1:] == argv  # pasting runs the same
    assert f"- prompt bank: `{tmp_path / 'bank'}`" in produced
    import torch

    assert f"- torch threads: `{torch.get_num_threads()} (this command" in produced
    assert "`lab_rte@v0001` (sha256 `" in produced and "stage1.lr=0.3" in produced

    # `eval` of the stage-2 model with a config that says other things
    final = tmp_path / "run" / "methods" / "promot" / "final"
    other = [*overrides, f"model={final}", "stage1.lr=0.9", f"bank.dir={tmp_path / 'nobank'}"]
    other += ["methods=[standard]"]
    assert main(["eval", str(path), *other]) == 0
    report = tmp_path / "run" / "eval" / "report.md"
    produced = _section(report, "How this was produced")
    assert "multipromot eval " in produced and "multipromot run" not in produced
    assert "- methods:" not in produced and "0.9" not in produced.split("```", 2)[2]
    assert f"- prompt bank: `{tmp_path / 'bank'}`" in produced  # what stage2.json records
    assert "nobank" not in produced.split("```", 2)[2]
    assert "- fine-tuned as: `promot on mixture lab_rte_fr`" in produced
    assert "stage1.lr=0.3" in produced  # how the prompts it used were made
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert results["produced"]["command"] == produced.split("```\n", 1)[1].split("\n```")[0]


def test_a_relative_bank_dir_on_the_command_line_keeps_models_usable(
    tiny, tmp_path, monkeypatch, capsys
):
    """Item 6. Was: `bank.dir=relbank` on the command line was stored unresolved in
    stage2.json, evaluation resolved it against final/, the run failed after stage 2 trained,
    and running again reused the broken model."""
    from multipromot.train import stage2

    path, overrides = tiny
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    relative = [o for o in overrides if not o.startswith("bank.dir=")]
    relative += ["bank.dir=relbank", "methods=[promot]"]
    assert main(["run", str(path), *relative]) == 0
    final = tmp_path / "run" / "methods" / "promot" / "final"
    record = json.loads((final / "stage2.json").read_text())
    assert record["bank_dir"] == str(work / "relbank")  # absolute: loadable from anywhere

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["eval", str(path), *relative, f"model={final}"]) == 0
    scored = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())["records"]
    assert {r["bank_dir"] for r in scored} == {str(work / "relbank")}

    # A model folder whose record names its bank as the older multipromot wrote it (relative
    # to nothing): not reused, made again.
    monkeypatch.chdir(work)
    record["bank_dir"] = "relbank"
    (final / "stage2.json").write_text(json.dumps(record))
    trained = []
    real = stage2.finetune
    monkeypatch.setattr(stage2, "finetune", lambda sub, **kw: trained.append(sub) or real(sub))
    capsys.readouterr()
    assert main(["run", str(path), *relative]) == 0
    assert "cannot be loaded" in capsys.readouterr().out
    assert [t.stage2.mode for t in trained] == ["promot"]
    assert json.loads((final / "stage2.json").read_text())["bank_dir"] == str(work / "relbank")


def test_k_shot_inputs_are_measured_against_their_budget(tiny, tmp_path, capsys):
    """Item 5. Was: exemplars that did not fit max_input_length were dropped in collation while
    the records kept the K asked; promot+65shot trained where about one exemplar fit."""
    path, overrides = tiny
    # 4 lab_rte exemplars keep 0.69 on average within 256 tokens: refused before training
    assert main(["run", str(path), *overrides, "methods=[promot+4shot]"]) == 2
    err = _error_line(capsys)
    assert "methods: method 'promot+4shot' trains 4-shot" in err
    assert "task 'lab_rte'" in err and "stage2.max_input_length=256" in err
    assert not (tmp_path / "bank").exists()  # nothing trained

    # 1 exemplar keeps 0.81 on average: said, trained, and recorded as kept
    argv = ["run", str(path), *overrides, "methods=[promot+1shot]", "eval.shots=[8]"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "warning: method 'promot+1shot' trains 1-shot (method label 'promot+1shot')" in err
    assert "suite task 'lab_cb' 8-shot" in err  # the evaluation's budget, said too
    final = tmp_path / "run" / "methods" / "promot+1shot" / "final"
    record = json.loads((final / "stage2.json").read_text())
    assert record["shots"] == 1 and record["shots_from"] == "method label 'promot+1shot'"
    assert 0.5 <= record["shots_kept"]["lab_rte"] < 1.0
    records = _records(tmp_path / "run")
    assert all(r["train_shots_kept"] == record["shots_kept"] for r in records)
    cb = [r for r in records if r["task"] == "lab_cb"]
    assert cb and all(r["shots"] == 8 and r["exemplars_kept"] < 8 for r in cb)
    text = (tmp_path / "run" / "report.md").read_text()
    assert "`lab_cb` 8-shot: " in text and "did not fit the input budget" in text
    assert "exemplars kept on average: lab_rte 0." in text


def _heldout_suite(folder: Path) -> Path:
    """A suite with one catalogue task and one inline task over local JSONL data."""
    rows = [{"question": f"what is word {i}?", "answer": f"w{i % 5}"} for i in range(40)]
    (folder / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    suite = folder / "mine.yaml"
    suite.write_text(
        "name: mine\nshots: [1]\nexamples: 3\nsplit: test\ntasks:\n"
        "  - {task: lab_cb, random: 33.33}\n"
        "  - name: my_heldout\n"
        "    source: {files: heldout.jsonl, format: json}\n"
        '    template: {jinja: "Q: {{question}} A: ||| {{answer}}"}\n'
        "    metric: exact_match\n"
    )
    return suite


def test_a_suite_and_route_eval_take_inline_tasks(tiny, tmp_path, capsys):
    """Item 8. Was: a suite accepted only catalogue and lab tasks, and `route --eval` refused
    inline tasks: a researcher could not measure in-context ability, or the router, on
    held-out tasks of their own."""
    path, overrides = tiny
    suite = _heldout_suite(tmp_path / "eval")
    argv = ["run", str(path), *overrides, "methods=[promot]", f"eval.suite={suite}"]
    assert main(argv) == 0
    records = _records(tmp_path / "run")
    mine = [r for r in records if r["task"] == "my_heldout"]
    assert len(mine) == 1 and not mine[0]["seen"] and mine[0]["shots"] == 1
    assert mine[0]["n"] == 2 and mine[0]["prompt"] is None  # eval.examples=2; no prompt
    assert "my_heldout" in (tmp_path / "run" / "report.md").read_text()

    # the router on the user's held-out tasks: how often they stay unprompted
    bank = str(tmp_path / "bank")
    capsys.readouterr()
    assert main(["route", "--bank", bank, "--eval", "--suite", str(suite), "--examples", "3"]) == 0
    out = capsys.readouterr().out
    assert "other-format inputs routed to none:" in out and "of 18 " in out  # 2 tasks x 3 x 3

    # a bank of the user's own (inline) tasks: --mixture gives their definitions
    inline = _inline_mixture(tmp_path / "mixtures", "mine", "even or odd?")
    own = [*overrides, f"stage1.mixture={inline}", f"bank.dir={tmp_path / 'own_bank'}"]
    assert main(["stage1", str(path), *own]) == 0
    capsys.readouterr()
    own_bank = str(tmp_path / "own_bank")
    assert main(["route", "--bank", own_bank, "--eval", "--examples", "3"]) == 2
    assert "--mixture" in _error_line(capsys)
    routed = ["route", "--bank", own_bank, "--eval", "--examples", "3", "--json"]
    assert main([*routed, "--mixture", str(inline), "--suite", str(suite)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_positives"] == 9 and result["per_task"]["my_task"] >= 0


def test_selection_on_the_reported_split_is_said_and_can_be_held_out(tiny, tmp_path):
    """Item 9. Was: a fine-tuned task scored on the split that also picked its stage-1 prompt
    and stage-2 step (SuperGLUE's validation) said so in results.json only, and a config could
    not hold out a selection split."""
    from multipromot.data.mixtures import load_mixture

    path, overrides = tiny
    folder = tmp_path / "mixtures"
    # as SuperGLUE's catalogue tasks are: `test` reads the source's validation split
    same = folder / "same.yaml"
    same.write_text(
        "name: same\ntasks:\n  - {task: lab_rte, splits: {test: validation}}\n"
        "  - task: lab_trans_fr\n"
    )
    both = [f"stage1.mixture={same}", f"stage2.mixture={same}", "methods=[promot]"]
    assert main(["run", str(path), *overrides, *both]) == 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "`lab_rte` is scored on `validation`, the split that also selected" in report
    assert "`lab_trans_fr` is scored" not in report
    rte = [r for r in _records(tmp_path / "run") if r["task"] == "lab_rte"]
    assert rte and all(r["selected_on_scored_split"] for r in rte)

    # the same task with its selection split held out from train: disjoint, nothing to say
    held = folder / "held.yaml"
    held.write_text(
        "name: held\ntasks:\n"
        "  - {task: lab_rte, splits: {test: validation, validation: {from: train, size: 20}}}\n"
        "  - task: lab_trans_fr\n"
    )
    task = load_mixture(held).tasks[0]
    assert task.split_origin("validation").startswith("held out from train (20 rows")
    assert len(task.examples("train")) == len(load_mixture(same).tasks[0].examples("train")) - 20
    out = [f"out_dir={tmp_path / 'held_run'}", f"stage1.mixture={held}", f"stage2.mixture={held}"]
    assert main(["run", str(path), *overrides, *out, "methods=[promot]"]) == 0
    assert "the split that also selected" not in (tmp_path / "held_run" / "report.md").read_text()
    rte = [r for r in _records(tmp_path / "held_run") if r["task"] == "lab_rte"]
    assert rte and not any(r["selected_on_scored_split"] for r in rte)
