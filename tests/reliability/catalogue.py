"""The bad-input catalogue: malformed configs, mixtures, templates, data files, bank entries and
command-line arguments, each with what the error line must name.

Used by tests/test_reliability_catalogue.py (every case: exit status 2, one line on stderr
naming the file and the key or entry, no traceback) and by tests/reliability/make_report.py
(the catalogue table of RELIABILITY.md, with the message each case gives). A case runs in an
empty directory of its own, with relative paths, so its message does not depend on where.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

DATA = "".join(json.dumps({"text": f"item {i}", "label": i % 2}) + "\n" for i in range(8))
TASK = """  - name: toy
    source: {files: data.jsonl, format: json}
    template: {jinja: "{{text}} even or odd? ||| {{answer_choices[label]}}", answer_choices: "even ||| odd"}
    metric: accuracy
"""
MIXTURE = "name: toy_mix\nversion: 1\ntasks:\n" + TASK
SPLITS = "{files: {train: data.jsonl, validation: data.jsonl, test: data.jsonl}, format: json}"
BASE = {"name": "models/base", "fingerprint": "f00dfeedf00dfeed"}


@dataclass(frozen=True)
class Case:
    """One malformed input.

    Attributes:
        id: a short stable name.
        area: config, mixture, template, data, bank or cli.
        what: the malformed input, in words.
        argv: the command (relative paths inside the case's directory).
        files: files to write first (name -> text or bytes).
        expect: substrings the error line must contain (the file and the key or entry).
        setup: builds more state in the directory (a bank) before the command runs.
    """

    id: str
    area: str
    what: str
    argv: list[str]
    files: dict[str, str | bytes] = field(default_factory=dict)
    expect: tuple[str, ...] = ()
    setup: Callable[[Path], None] | None = None


def _mixture(tasks: str = TASK, head: str = "name: toy_mix\nversion: 1\n") -> str:
    return head + "tasks:\n" + tasks


def _task(template: str = "", source: str = "", metric: str = "accuracy", name: str = "toy") -> str:
    source = source or "{files: data.jsonl, format: json}"
    template = template or (
        '{jinja: "{{text}} even or odd? ||| {{answer_choices[label]}}", '
        'answer_choices: "even ||| odd"}'
    )
    return (
        f"  - name: {name}\n    source: {source}\n    template: {template}\n    metric: {metric}\n"
    )


def _bank(root: Path) -> None:
    import torch

    from multipromot.bank import PromptBank

    bank = PromptBank(root / "bank")
    bank.add("rte", torch.ones(4, 8), base_model=BASE)
    bank.add("rte", torch.zeros(4, 8), base_model=BASE)


def _bank_then(change: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        _bank(root)
        change(root)

    return setup


def _flip_prompt(root: Path) -> None:
    path = root / "bank/rte/v0001/prompt.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))


def _meta_says_v5(root: Path) -> None:
    path = root / "bank/rte/v0001/meta.json"
    meta = json.loads(path.read_text())
    meta["version"] = 5
    path.write_text(json.dumps(meta))


def _export(root: Path) -> None:
    from multipromot.bank import PromptBank

    _bank(root)
    PromptBank(root / "bank").export_peft("rte", root / "adapter", task_type="CAUSAL_LM")


def _lora_adapter(root: Path) -> None:
    _export(root)
    config = json.loads((root / "adapter/adapter_config.json").read_text())
    config["peft_type"] = "LORA"
    (root / "adapter/adapter_config.json").write_text(json.dumps(config))


def _nan_adapter(root: Path) -> None:
    """A PEFT export whose prompt is NaN, with the files otherwise valid."""
    import torch
    from safetensors.torch import load_file, save_file

    _export(root)
    path = root / "adapter/adapter_model.safetensors"
    tensors = load_file(path)
    save_file({name: torch.full_like(t, float("nan")) for name, t in tensors.items()}, path)


def _symlink_out(root: Path) -> None:
    _bank(root)
    prompt = root / "bank/rte/v0002/prompt.safetensors"
    (root / "elsewhere.safetensors").write_bytes(prompt.read_bytes())
    prompt.unlink()
    prompt.symlink_to(root / "elsewhere.safetensors")


CASES: list[Case] = [
    # -- run configs (the command fails while loading the config, before any model is built)
    Case(
        "config-unknown-key",
        "config",
        "a misspelt key (stage2.mod)",
        ["stage1", "run.yaml"],
        {"run.yaml": "stage2: {mod: standard}\n"},
        ("run.yaml", "stage2.mod"),
    ),
    Case(
        "config-bad-choice",
        "config",
        "stage2.mode not one of the stage-2 modes",
        ["run", "run.yaml"],
        {"run.yaml": "stage2: {mode: bogus}\n"},
        ("run.yaml", "stage2.mode"),
    ),
    Case(
        "config-wrong-type",
        "config",
        "a number key given a word",
        ["stage1", "run.yaml"],
        {"run.yaml": "stage1: {steps: many}\n"},
        ("run.yaml", "stage1.steps"),
    ),
    Case(
        "config-negative",
        "config",
        "a negative batch size",
        ["stage2", "run.yaml"],
        {"run.yaml": "stage2: {batch_size: -4}\n"},
        ("run.yaml", "stage2.batch_size"),
    ),
    Case(
        "config-grad-accum",
        "config",
        "batch size not a multiple of grad_accum",
        ["stage2", "run.yaml"],
        {"run.yaml": "stage2: {batch_size: 6, grad_accum: 4}\n"},
        ("run.yaml", "stage2.batch_size"),
    ),
    Case(
        "config-yaml-syntax",
        "config",
        "unclosed bracket",
        ["stage1", "run.yaml"],
        {"run.yaml": "seed: [1\n"},
        ("run.yaml", "line 2"),
    ),
    Case(
        "config-not-mapping",
        "config",
        "a list instead of a mapping",
        ["run", "run.yaml"],
        {"run.yaml": "- a\n- b\n"},
        ("run.yaml", "mapping"),
    ),
    Case(
        "config-missing",
        "config",
        "a config file that does not exist",
        ["stage1", "nope.yaml"],
        {},
        ("nope.yaml", "no such config file"),
    ),
    Case(
        "config-duplicate-key",
        "config",
        "the same key twice (the second used to win)",
        ["stage1", "run.yaml"],
        {"run.yaml": "seed: 1\nseed: 2\n"},
        ("run.yaml", "line 2", "duplicate key 'seed'"),
    ),
    Case(
        "config-unsafe-tag",
        "config",
        "a !!python/object/apply tag",
        ["stage1", "run.yaml"],
        {"run.yaml": "seed: !!python/object/apply:os.system ['true']\n"},
        ("run.yaml", "line 1", "python/object/apply"),
    ),
    Case(
        "config-alias-bomb",
        "config",
        "a billion-laughs alias bomb",
        ["stage1", "run.yaml"],
        {
            "run.yaml": "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
            + "".join(
                f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n"
                for p, c in zip("abcdefg", "bcdefgh", strict=True)
            )
        },
        ("run.yaml", "aliases expand to more than"),
    ),
    Case(
        "config-override-no-equals",
        "cli",
        "an override without '='",
        ["stage1", "run.yaml", "stage2.mode"],
        {"run.yaml": "seed: 0\n"},
        ("<command line>", "key=value"),
    ),
    Case(
        "config-override-bad-type",
        "cli",
        "an override of the wrong type",
        ["stage2", "run.yaml", "stage2.steps=abc"],
        {"run.yaml": "seed: 0\n"},
        ("<command line>", "stage2.steps"),
    ),
    Case(
        "config-override-unknown",
        "cli",
        "an override of a key that does not exist",
        ["stage1", "run.yaml", "stage1.lr_schedule=cosine"],
        {"run.yaml": "seed: 0\n"},
        ("<command line>", "stage1.lr_schedule"),
    ),
    Case(
        "run-no-methods",
        "config",
        "`run` with no methods listed",
        ["run", "run.yaml"],
        {"run.yaml": "seed: 0\n"},
        ("run.yaml", "methods"),
    ),
    Case(
        "run-unknown-method",
        "config",
        "`run` with a method that does not exist",
        ["run", "run.yaml"],
        {"run.yaml": "methods: [promot, finetune_everything]\n"},
        ("run.yaml", "methods", "finetune_everything"),
    ),
    Case(
        "run-unknown-alias",
        "config",
        "a method naming an undefined mixture alias",
        ["run", "run.yaml"],
        {"run.yaml": "methods: [promot@multi]\n"},
        ("run.yaml", "methods", "multi"),
    ),
    # -- mixtures
    Case(
        "mixture-unknown-key",
        "mixture",
        "a misspelt top-level key (tsks)",
        ["mixture", "show", "mix.yaml"],
        {"mix.yaml": "name: x\ntsks: []\n"},
        ("mix.yaml", "tsks", "did you mean 'tasks'"),
    ),
    Case(
        "mixture-no-tasks",
        "mixture",
        "no tasks key",
        ["mixture", "show", "mix.yaml"],
        {"mix.yaml": "name: x\n"},
        ("mix.yaml", "tasks"),
    ),
    Case(
        "mixture-empty-tasks",
        "mixture",
        "an empty task list",
        ["mixture", "show", "mix.yaml"],
        {"mix.yaml": "name: x\ntasks: []\n"},
        ("mix.yaml", "tasks"),
    ),
    Case(
        "mixture-unknown-task",
        "mixture",
        "a catalogue task that does not exist",
        ["mixture", "show", "mix.yaml"],
        {"mix.yaml": "tasks: [{task: rtee}]\n"},
        ("mix.yaml", "tasks[0].task", "did you mean"),
    ),
    Case(
        "mixture-negative-rate",
        "mixture",
        "a negative rate",
        ["mixture", "show", "mix.yaml"],
        {"mix.yaml": _mixture(TASK + "    rate: -1\n"), "data.jsonl": DATA},
        ("mix.yaml", "tasks[0].rate"),
    ),
    Case(
        "mixture-zero-temperature",
        "mixture",
        "examples_proportional with temperature 0",
        ["mixture", "show", "mix.yaml"],
        {
            "mix.yaml": _mixture(head="rate: {examples_proportional: {temperature: 0}}\n"),
            "data.jsonl": DATA,
        },
        ("mix.yaml", "rate.examples_proportional.temperature"),
    ),
    Case(
        "mixture-all-rates-zero",
        "mixture",
        "every rate 0",
        ["mixture", "show", "mix.yaml"],
        {"mix.yaml": _mixture(TASK + "    rate: 0\n"), "data.jsonl": DATA},
        ("mix.yaml", "tasks", "all rates are zero"),
    ),
    Case(
        "mixture-cycle",
        "mixture",
        "two mixtures nesting each other",
        ["mixture", "show", "a.yaml"],
        {
            "a.yaml": "tasks: [{mixture: b.yaml, rate: 1}]\n",
            "b.yaml": "tasks: [{mixture: a.yaml, rate: 1}]\n",
        },
        ("b.yaml", "tasks[0].mixture", "cycle"),
    ),
    Case(
        "mixture-nested-missing",
        "mixture",
        "a nested mixture file that does not exist",
        ["mixture", "show", "mix.yaml"],
        {"mix.yaml": "tasks: [{mixture: gone.yaml, rate: 1}]\n"},
        ("mix.yaml", "tasks[0].mixture", "gone.yaml"),
    ),
    Case(
        "mixture-version",
        "mixture",
        "an unsupported schema version",
        ["mixture", "show", "mix.yaml"],
        {"mix.yaml": "version: 2\ntasks: [{task: rte}]\n"},
        ("mix.yaml", "version"),
    ),
    Case(
        "mixture-two-kinds",
        "mixture",
        "an entry with both task and name",
        ["mixture", "show", "mix.yaml"],
        {"mix.yaml": "tasks: [{task: rte, name: x}]\n"},
        ("mix.yaml", "tasks[0]", "exactly one of"),
    ),
    Case(
        "mixture-duplicate-key",
        "mixture",
        "a key twice in one mapping",
        ["mixture", "show", "mix.yaml"],
        {"mix.yaml": "name: a\nname: b\ntasks: []\n"},
        ("mix.yaml", "line 2", "duplicate key 'name'"),
    ),
    Case(
        "mixture-yaml-syntax",
        "mixture",
        "bad indentation",
        ["mixture", "show", "mix.yaml"],
        {"mix.yaml": "tasks:\n  - task: rte\n   rate: 1\n"},
        ("mix.yaml", "line 3"),
    ),
    Case(
        "mixture-not-utf8",
        "mixture",
        "a file that is not UTF-8",
        ["mixture", "show", "mix.yaml"],
        {"mix.yaml": b"name: caf\xe9\ntasks: []\n"},
        ("mix.yaml", "not UTF-8"),
    ),
    Case(
        "mixture-too-large",
        "mixture",
        "a 2 MiB file",
        ["mixture", "show", "mix.yaml"],
        {"mix.yaml": "# " + "x" * (2 << 20) + "\n"},
        ("mix.yaml", "at most 1 MiB"),
    ),
    Case(
        "mixture-alias-bomb",
        "mixture",
        "a billion-laughs alias bomb",
        ["mixture", "show", "mix.yaml"],
        {
            "mix.yaml": "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
            + "".join(
                f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n"
                for p, c in zip("abcdefg", "bcdefgh", strict=True)
            )
        },
        ("mix.yaml", "aliases expand to more than"),
    ),
    Case(
        "mixture-shots-negative",
        "mixture",
        "exemplars.shots below 0",
        ["mixture", "show", "mix.yaml"],
        {"mix.yaml": _mixture(head="exemplars: {shots: -1}\n"), "data.jsonl": DATA},
        ("mix.yaml", "exemplars.shots"),
    ),
    Case(
        "mixture-replay-share",
        "mixture",
        "a replay share of 1 (all of stage 2's rows replayed: nothing fine-tuned)",
        ["mixture", "show", "mix.yaml"],
        {"mix.yaml": "tasks: [{task: lab_rte}]\nreplay: {share: 1, tasks: [{task: lab_cb}]}\n"},
        ("mix.yaml", "replay.share", "[0, 1)"),
    ),
    Case(
        "mixture-replay-fine-tuned",
        "mixture",
        "a replay task that is also one of the fine-tuned tasks",
        ["mixture", "show", "mix.yaml"],
        {
            "mix.yaml": "tasks: [{task: lab_rte}, {task: lab_cb}]\n"
            "replay: {share: 0.1, tasks: [{task: lab_cb}]}\n"
        },
        ("mix.yaml", "replay.tasks[0]", "lab_cb"),
    ),
    Case(
        "mixture-not-given",
        "config",
        "stage 1 with no stage1.mixture in the config",
        ["stage1", "run.yaml"],
        {"run.yaml": "seed: 0\nstage1: {steps: 1}\n"},
        ("mixture", "no mixture file given"),
    ),
    Case(
        "task-missing-metric",
        "mixture",
        "an inline task without a metric",
        ["mixture", "show", "mix.yaml"],
        {"mix.yaml": _mixture(TASK.replace("    metric: accuracy\n", "")), "data.jsonl": DATA},
        ("mix.yaml", "tasks[0].metric"),
    ),
    Case(
        "task-unknown-metric",
        "mixture",
        "a misspelt metric",
        ["mixture", "show", "mix.yaml"],
        {"mix.yaml": _mixture(_task(metric="accuracyy")), "data.jsonl": DATA},
        ("mix.yaml", "tasks[0].metric", "did you mean accuracy"),
    ),
    Case(
        "task-bad-name",
        "mixture",
        "a task name with a path separator",
        ["mixture", "show", "mix.yaml"],
        {"mix.yaml": _mixture(_task(name="'../evil'")), "data.jsonl": DATA},
        ("mix.yaml", "tasks[0].name"),
    ),
    Case(
        "task-defined-twice",
        "mixture",
        "the same inline task name twice",
        ["mixture", "show", "mix.yaml"],
        {"mix.yaml": _mixture(TASK + TASK), "data.jsonl": DATA},
        ("mix.yaml", "tasks[1]", "duplicate task 'toy'"),
    ),
    # -- templates
    Case(
        "template-syntax",
        "template",
        "an unclosed Jinja expression",
        ["mixture", "show", "mix.yaml"],
        {"mix.yaml": _mixture(_task(template='{jinja: "{{text ||| x"}')), "data.jsonl": DATA},
        ("mix.yaml", "tasks[0].template", "Jinja syntax error"),
    ),
    Case(
        "template-no-separator",
        "template",
        "no ||| between input and target",
        ["mixture", "show", "mix.yaml"],
        {"mix.yaml": _mixture(_task(template='{jinja: "{{text}} answer"}')), "data.jsonl": DATA},
        ("mix.yaml", "tasks[0].template", "|||"),
    ),
    Case(
        "template-choices-missing",
        "template",
        "answer_choices used but not given",
        ["mixture", "show", "mix.yaml"],
        {
            "mix.yaml": _mixture(
                _task(template='{jinja: "{{text}} ||| {{answer_choices[label]}}"}')
            ),
            "data.jsonl": DATA,
        },
        ("mix.yaml", "tasks[0].template", "answer_choices"),
    ),
    Case(
        "template-missing-field",
        "template",
        "a field the examples do not have",
        ["mixture", "sample", "mix.yaml"],
        {"mix.yaml": _mixture(_task(template='{jinja: "{{premise}} ||| x"}')), "data.jsonl": DATA},
        ("mix.yaml", "tasks[0].template", "needs field 'premise'"),
    ),
    Case(
        "template-two-separators",
        "template",
        "a template that renders ||| twice",
        ["mixture", "sample", "mix.yaml"],
        {
            "mix.yaml": _mixture(_task(template='{jinja: "{{text}} ||| a ||| b"}')),
            "data.jsonl": DATA,
        },
        ("mix.yaml", "tasks[0].template", "exactly one"),
    ),
    Case(
        "template-sandbox",
        "template",
        "a template reaching for Python internals",
        ["mixture", "sample", "mix.yaml"],
        {
            "mix.yaml": _mixture(_task(template='{jinja: "{{ text.__class__ }} ||| x"}')),
            "data.jsonl": DATA,
        },
        ("mix.yaml", "tasks[0].template", "stopped by the sandbox"),
    ),
    Case(
        "template-unknown-catalogue",
        "template",
        "an unknown catalogue template name",
        ["mixture", "show", "mix.yaml"],
        {"mix.yaml": _mixture(_task(template="rtee")), "data.jsonl": DATA},
        ("mix.yaml", "tasks[0].template", "did you mean"),
    ),
    Case(
        "template-promptsource-unknown",
        "template",
        "a promptsource dataset that is not there",
        ["mixture", "show", "mix.yaml"],
        {
            "mix.yaml": _mixture(_task(template='{promptsource: "super_glue/rtex", name: x}')),
            "data.jsonl": DATA,
        },
        ("mix.yaml", "tasks[0].template.promptsource"),
    ),
    Case(
        "template-two-kinds",
        "template",
        "both jinja and promptsource",
        ["mixture", "show", "mix.yaml"],
        {
            "mix.yaml": _mixture(_task(template='{jinja: "a ||| b", promptsource: x}')),
            "data.jsonl": DATA,
        },
        ("mix.yaml", "tasks[0].template", "exactly one of"),
    ),
    # -- data files
    Case(
        "data-no-match",
        "data",
        "a file glob that matches nothing",
        ["mixture", "show", "mix.yaml"],
        {"mix.yaml": _mixture(_task(source="{files: missing/*.jsonl, format: json}"))},
        ("mix.yaml", "tasks[0].source.files", "no files match"),
    ),
    Case(
        "data-unknown-format",
        "data",
        "an unknown file format",
        ["mixture", "show", "mix.yaml"],
        {
            "mix.yaml": _mixture(_task(source="{files: data.jsonl, format: xml}")),
            "data.jsonl": DATA,
        },
        ("mix.yaml", "tasks[0].source.format", "unknown file format"),
    ),
    Case(
        "data-broken-jsonl",
        "data",
        "a JSON-lines file with a broken line",
        ["mixture", "sample", "mix.yaml"],
        {"mix.yaml": _mixture(), "data.jsonl": DATA + '{"text": "cut off\n'},
        ("mix.yaml", "tasks[0].source", "cannot read json files"),
    ),
    Case(
        "data-missing-split",
        "data",
        "no files for the split asked for",
        ["mixture", "sample", "mix.yaml", "--split", "validation"],
        {"mix.yaml": _mixture(), "data.jsonl": DATA},
        ("mix.yaml", "tasks[0].source", "no files for split 'validation'"),
    ),
    Case(
        "data-two-kinds",
        "data",
        "a source with both hub and files",
        ["mixture", "show", "mix.yaml"],
        {"mix.yaml": _mixture(_task(source="{hub: x/y, files: data.jsonl}")), "data.jsonl": DATA},
        ("mix.yaml", "tasks[0].source", "exactly one of"),
    ),
    Case(
        "data-bad-filter",
        "data",
        "a filter expression that does not parse",
        ["mixture", "show", "mix.yaml"],
        {
            "mix.yaml": _mixture(
                _task(source='{files: data.jsonl, format: json, filter: "label >="}')
            ),
            "data.jsonl": DATA,
        },
        ("mix.yaml", "tasks[0].source.filter", "not a valid expression"),
    ),
    # -- bank entries
    Case(
        "bank-missing",
        "bank",
        "a bank directory that does not exist",
        ["bank", "list", "--bank", "nope"],
        {},
        ("nope", "no prompt bank here"),
    ),
    Case(
        "bank-no-task",
        "bank",
        "a task the bank does not have",
        ["bank", "show", "sst2", "--bank", "bank"],
        {},
        ("sst2", "no entry for task"),
        _bank,
    ),
    Case(
        "bank-no-version",
        "bank",
        "a version the task does not have",
        ["bank", "show", "rte@v9", "--bank", "bank"],
        {},
        ("rte@v0009", "no such version"),
        _bank,
    ),
    Case(
        "bank-bad-ref",
        "bank",
        "a malformed version",
        ["bank", "show", "rte@vx", "--bank", "bank"],
        {},
        ("rte@vx", "bad version"),
        _bank,
    ),
    Case(
        "bank-checksum",
        "bank",
        "a flipped byte in prompt.safetensors",
        ["bank", "diff", "rte@v1", "rte@v2", "--bank", "bank"],
        {},
        ("bank/rte/v0001/prompt.safetensors", "rte@v0001", "checksum mismatch"),
        _bank_then(_flip_prompt),
    ),
    Case(
        "bank-meta-json",
        "bank",
        "meta.json that is not JSON",
        ["bank", "show", "rte@v1", "--bank", "bank"],
        {},
        ("bank/rte/v0001/meta.json", "rte@v0001", "not valid JSON"),
        _bank_then(lambda r: (r / "bank/rte/v0001/meta.json").write_text("{oops")),
    ),
    Case(
        "bank-meta-mismatch",
        "bank",
        "meta.json naming another version than its directory",
        ["bank", "show", "rte@v1", "--bank", "bank"],
        {},
        ("bank/rte/v0001/meta.json", "rte@v0001", "meta.json says rte@v5"),
        _bank_then(_meta_says_v5),
    ),
    Case(
        "bank-index-json",
        "bank",
        "index.json that is not JSON",
        ["bank", "list", "--bank", "bank"],
        {},
        ("bank/index.json", "not valid JSON", "verify --fix"),
        _bank_then(lambda r: (r / "bank/index.json").write_text("[1, 2")),
    ),
    Case(
        "bank-symlink",
        "bank",
        "prompt.safetensors a symlink out of the bank",
        ["bank", "diff", "rte@v1", "rte@v2", "--bank", "bank"],
        {},
        ("bank/rte/v0002/prompt.safetensors", "rte@v0002", "outside the bank"),
        _symlink_out,
    ),
    Case(
        "bank-rm-current",
        "bank",
        "removing the current version without --force",
        ["bank", "rm", "rte@v2", "--bank", "bank"],
        {},
        ("rte@v0002", "current version", "--force"),
        _bank,
    ),
    Case(
        "bank-rm-task",
        "bank",
        "removing a whole task without --force",
        ["bank", "rm", "rte", "--bank", "bank"],
        {},
        ("rte", "every version", "--force"),
        _bank,
    ),
    Case(
        "bank-bad-task-name",
        "bank",
        "an entry name with ../",
        ["bank", "show", "../etc@v1", "--bank", "bank"],
        {},
        ("'../etc'", "bad task name"),
        _bank,
    ),
    Case(
        "import-not-peft",
        "bank",
        "importing a directory that is not a PEFT adapter",
        ["bank", "import", "adapter", "--task", "x", "--bank", "bank"],
        {"adapter/readme.txt": "hello\n"},
        ("adapter", "not a PEFT adapter directory"),
    ),
    Case(
        "import-lora",
        "bank",
        "importing a LoRA adapter as a prompt",
        ["bank", "import", "adapter", "--task", "x", "--bank", "bank"],
        {},
        ("adapter/adapter_config.json", "peft_type", "LORA"),
        _lora_adapter,
    ),
    Case(
        "import-pickle",
        "bank",
        "importing an adapter that only has a pickled .bin",
        ["bank", "import", "adapter", "--task", "x", "--bank", "bank"],
        {
            "adapter/adapter_config.json": json.dumps({"peft_type": "PROMPT_TUNING"}),
            "adapter/adapter_model.bin": b"\x80\x04K\x01.",
        },
        ("adapter", "never unpickles"),
    ),
    Case(
        "export-unknown-format",
        "cli",
        "an export format that does not exist",
        ["bank", "export", "rte", "out", "--format", "onnx", "--bank", "bank"],
        {},
        ("--format", "onnx"),
        _bank,
    ),
    Case(
        "export-non-empty",
        "bank",
        "exporting into a directory that has files",
        ["bank", "export", "rte", "out", "--task-type", "CAUSAL_LM", "--bank", "bank"],
        {"out/keep.txt": "x\n"},
        ("out", "rte@v0002", "not an empty directory"),
        _bank,
    ),
    Case(
        "export-bad-task-type",
        "cli",
        "an unknown --task-type",
        ["bank", "export", "rte", "out", "--task-type", "CLASSIFY", "--bank", "bank"],
        {},
        ("rte@v0002", "CLASSIFY"),
        _bank,
    ),
    # -- values refused before any training (issue 13): config ranges and preflight
    *[
        Case(
            f"config-{name}",
            "config",
            what,
            [command, "run.yaml"],
            {"run.yaml": text},
            ("run.yaml", key),
        )
        for name, what, command, text, key in [
            (
                "eval-every-zero",
                "stage1.eval_every: 0 (a division by zero at step 1)",
                "stage1",
                "stage1: {eval_every: 0}\n",
                "stage1.eval_every",
            ),
            (
                "log-every-zero",
                "stage1.log_every: 0",
                "stage1",
                "stage1: {log_every: 0}\n",
                "stage1.log_every",
            ),
            (
                "label-smoothing",
                "stage2.label_smoothing: 2.5",
                "stage2",
                "stage2: {label_smoothing: 2.5}\n",
                "stage2.label_smoothing",
            ),
            (
                "sdft-threshold",
                "sdft.threshold: 150 (a per-item score is at most 100)",
                "run",
                "sdft: {threshold: 150}\n",
                "sdft.threshold",
            ),
            (
                "drift-examples-negative",
                "eval.drift_examples: -1",
                "run",
                "eval: {drift_examples: -1}\n",
                "eval.drift_examples",
            ),
            ("huge-seed", "a seed beyond 32 bits", "run", "seed: 99999999999999999999\n", "seed"),
            (
                "duplicate-methods",
                "the same method twice",
                "run",
                "methods: [pretrained, pretrained]\n",
                "methods",
            ),
            (
                "env-interpolation",
                "an unset environment variable in an interpolation",
                "run",
                "out_dir: ${oc.env:NOPE}\n",
                "out_dir",
            ),
            (
                "cyclic-interpolation",
                "an interpolation of itself",
                "run",
                "out_dir: ${out_dir}\n",
                "out_dir",
            ),
            (
                "eval-examples-zero",
                "eval.examples: 0 (nan% scores)",
                "run",
                "eval: {examples: 0}\n",
                "eval.examples",
            ),
            (
                "max-new-tokens-zero",
                "eval.max_new_tokens: 0",
                "eval",
                "eval: {max_new_tokens: 0}\n",
                "eval.max_new_tokens",
            ),
            ("shots-negative", "eval.shots: [-1]", "run", "eval: {shots: [-1]}\n", "eval.shots"),
            (
                "shots-huge",
                "eval.shots: [1000] (was reported as 1000-shot)",
                "run",
                "eval: {shots: [1000]}\n",
                "eval.shots",
            ),
            (
                "eval-examples-negative",
                "stage1.eval_examples: -3 (meant all but 3)",
                "stage1",
                "stage1: {eval_examples: -3}\n",
                "stage1.eval_examples",
            ),
            (
                "grad-norm-negative",
                "stage2.max_grad_norm: -1",
                "stage2",
                "stage2: {max_grad_norm: -1}\n",
                "stage2.max_grad_norm",
            ),
            (
                "warmup-negative",
                "stage2.warmup_steps: -5",
                "stage2",
                "stage2: {warmup_steps: -5}\n",
                "stage2.warmup_steps",
            ),
            ("lr-inf", "stage2.lr: .inf", "stage2", "stage2: {lr: .inf}\n", "stage2.lr"),
            ("reuse-unknown", "reuse: sometimes", "run", "reuse: sometimes\n", "reuse"),
        ]
    ],
    Case(
        "preflight-no-suite",
        "config",
        "run without eval.suite (was found after both stages)",
        ["run", "run.yaml"],
        {
            "run.yaml": "methods: [pretrained]\nstage2: {mixture: mix.yaml}\n",
            "mix.yaml": _mixture(_task(source=SPLITS)),
            "data.jsonl": DATA,
        },
        ("run.yaml", "eval.suite", "is not set"),
    ),
    Case(
        "preflight-bank-is-a-file",
        "config",
        "bank.dir naming a file (prompts were lost after stage 1)",
        ["stage1", "run.yaml"],
        {
            "run.yaml": "bank: {dir: notes.txt}\nstage1: {mixture: mix.yaml}\n",
            "notes.txt": "x\n",
            "mix.yaml": _mixture(_task(source=SPLITS)),
            "data.jsonl": DATA,
        },
        ("run.yaml", "bank.dir", "is a file"),
    ),
    Case(
        "preflight-long-task-name",
        "mixture",
        "a 300-character task name (refused by the bank only after stage 1)",
        ["stage1", "run.yaml"],
        {
            "run.yaml": "stage1: {mixture: mix.yaml}\n",
            "mix.yaml": _mixture(_task(source=SPLITS, name="t" * 300)),
            "data.jsonl": DATA,
        },
        ("mix.yaml", "longer than 128"),
    ),
    Case(
        "mixture-tiny-temperature",
        "mixture",
        "examples_proportional with temperature 1e-5 (OverflowError)",
        ["mixture", "show", "mix.yaml"],
        {
            "mix.yaml": _mixture(
                head="name: m\nrate: {examples_proportional: {temperature: 1.0e-5}}\n"
            ),
            "data.jsonl": DATA,
        },
        ("mix.yaml", "overflows"),
    ),
    Case(
        "mixture-huge-rate",
        "mixture",
        "a rate of 1e308",
        ["mixture", "show", "mix.yaml"],
        {"mix.yaml": _mixture(TASK + "    rate: 1.0e+308\n"), "data.jsonl": DATA},
        ("mix.yaml", "tasks[0].rate", "<= 1e+15"),
    ),
    Case(
        "template-filter-typo",
        "template",
        "a misspelt filter ({{text|lowr}}; was a 71-line traceback)",
        ["mixture", "show", "mix.yaml"],
        {
            "mix.yaml": _mixture(_task(template='{jinja: "{{text|lowr}} ||| x"}')),
            "data.jsonl": DATA,
        },
        ("mix.yaml", "tasks[0].template", "unknown filter 'lowr'", "lower"),
    ),
    Case(
        "template-undefined-key",
        "template",
        "answer_choices[lable] (the message did not name lable)",
        ["mixture", "sample", "mix.yaml", "-n", "1"],
        {
            "mix.yaml": _mixture(
                _task(
                    template='{jinja: "{{text}} ||| {{answer_choices[lable]}}",'
                    ' answer_choices: "a ||| b"}'
                )
            ),
            "data.jsonl": DATA,
        },
        ("mix.yaml", "tasks[0].template", "'lable'"),
    ),
    Case(
        "template-recursive-macro",
        "template",
        "a macro that calls itself (RecursionError)",
        ["mixture", "sample", "mix.yaml", "-n", "1"],
        {
            "mix.yaml": _mixture(
                _task(
                    template='{jinja: "{% macro f(x) %}{{ f(x) }}{% endmacro %}'
                    '{{ f(text) }} ||| x"}'
                )
            ),
            "data.jsonl": DATA,
        },
        ("mix.yaml", "tasks[0].template", "recursed"),
    ),
    Case(
        "data-latin1",
        "data",
        "a latin-1 JSONL file (was a 70-line traceback)",
        ["mixture", "sample", "mix.yaml", "-n", "1"],
        {"mix.yaml": MIXTURE, "data.jsonl": '{"text": "caf\xe9", "label": 0}\n'.encode("latin-1")},
        ("mix.yaml", "data.jsonl is not UTF-8"),
    ),
    Case(
        "data-glob-mixed-splits",
        "data",
        "a glob over train, dev and an unnamed file (dev rows went into train)",
        ["mixture", "show", "mix.yaml"],
        {
            "mix.yaml": _mixture(_task(source="{files: '*.jsonl', format: json}")),
            "train.jsonl": DATA,
            "dev.jsonl": DATA,
            "extra.jsonl": DATA,
        },
        ("mix.yaml", "tasks[0].source.files", "extra.jsonl"),
    ),
    Case(
        "template-loop-bomb",
        "template",
        "two nested loops printing 10**10 characters (hung, then ran out of memory)",
        ["stage1", "run.yaml"],
        {
            "run.yaml": "stage1: {mixture: mix.yaml}\n",
            "mix.yaml": _mixture(
                _task(
                    source=SPLITS,
                    template='{jinja: "{% for i in range(100000) %}{% for j in range(100000) %}'
                    'x{% endfor %}{% endfor %} ||| {{label}}"}',
                )
            ),
            "data.jsonl": DATA,
        },
        ("mix.yaml", "tasks[0].template", "loop iterations"),
    ),
    Case(
        "template-doubling-bomb",
        "template",
        "a string doubled 40 times in a loop (2**40 characters)",
        ["mixture", "sample", "mix.yaml", "-n", "1"],
        {
            "mix.yaml": _mixture(
                _task(
                    template='{jinja: "{% set n = namespace(s=text) %}{% for i in range(40) %}'
                    '{% set n.s = n.s ~ n.s %}{% endfor %}{{ n.s }} ||| {{label}}"}'
                )
            ),
            "data.jsonl": DATA,
        },
        ("mix.yaml", "tasks[0].template", "would build more than"),
    ),
    Case(
        "template-padding-bomb",
        "template",
        "a padding filter to a width of 10**10 (text|center(10**10))",
        ["mixture", "sample", "mix.yaml", "-n", "1"],
        {
            "mix.yaml": _mixture(
                _task(template='{jinja: "{{ text|center(10**10) }} ||| {{label}}"}')
            ),
            "data.jsonl": DATA,
        },
        ("mix.yaml", "tasks[0].template", "width"),
    ),
    Case(
        "config-unresolvable-interpolation",
        "config",
        "an interpolation of a key that does not exist",
        ["run", "run.yaml"],
        {"run.yaml": "out_dir: ${nope.key}\n"},
        ("run.yaml", "out_dir", "nope.key"),
    ),
    Case(
        "route-bank-missing",
        "bank",
        "route --bank naming a folder that does not exist (answered '(none)' for every input)",
        ["route", "--bank", "nope", "hello"],
        {},
        ("nope", "--bank", "no prompt bank"),
    ),
    Case(
        "route-bank-file",
        "bank",
        "route --bank naming a file",
        ["route", "--bank", "notes.txt", "hello"],
        {"notes.txt": "not a bank\n"},
        ("notes.txt", "--bank"),
    ),
    Case(
        "bank-export-into-bank",
        "bank",
        "bank export into the bank's own folder (broke the bank)",
        ["bank", "export", "rte", "bank/rte-export", "--task-type", "CAUSAL_LM", "--bank", "bank"],
        setup=_bank,
        expect=("bank/rte-export",),
    ),
    Case(
        "import-nan-prompt",
        "bank",
        "importing a PEFT adapter whose prompt is NaN (valid files otherwise)",
        ["bank", "import", "adapter", "--task", "x", "--bank", "bank"],
        setup=_nan_adapter,
        expect=("NaN or infinite",),
    ),
    Case(
        "import-config-list",
        "bank",
        "an adapter_config.json that is a JSON list",
        ["bank", "import", "adapter", "--task", "x", "--bank", "bank"],
        {"adapter/adapter_config.json": "[1, 2]\n"},
        ("adapter/adapter_config.json", "JSON object"),
    ),
    # -- the methods beyond the paper (issue 17)
    Case(
        "run-wise-weight",
        "config",
        "a WiSE-FT weight outside [0, 1]",
        ["run", "run.yaml"],
        {"run.yaml": "methods: [standard, wise1.5:standard]\n"},
        ("run.yaml", "methods", "wise1.5:standard"),
    ),
    Case(
        "run-wise-unlisted",
        "config",
        "WiSE-FT of a method the run does not list",
        ["run", "run.yaml"],
        {"run.yaml": "methods: [wise0.5:standard]\n"},
        ("run.yaml", "methods", "'standard'"),
    ),
    Case(
        "run-lora-rank",
        "config",
        "a LoRA rank of 0",
        ["run", "run.yaml"],
        {"run.yaml": "methods: [lora]\nlora: {rank: 0}\n"},
        ("run.yaml", "lora.rank"),
    ),
    # -- provenance by content, checks that came too late (issue 26)
    Case(
        "mixture-inline-shadows-catalogue",
        "mixture",
        "an inline task named like a catalogue task (filled its bank entries; a later catalogue "
        "run trained with the foreign prompt)",
        ["stage1", "run.yaml"],
        {"run.yaml": "stage1: {mixture: mix.yaml}\n", "mix.yaml": _mixture(_task(name="lab_rte"))},
        ("mix.yaml", "tasks[0].name", "lab_rte", "catalogue.yaml"),
    ),
    Case(
        "suite-inline-shadows-catalogue",
        "config",
        "an evaluation suite's inline task named like a catalogue task",
        ["eval", "run.yaml"],
        {
            "run.yaml": "stage2: {mixture: mix.yaml}\neval: {suite: suite.yaml}\n",
            "mix.yaml": _mixture(_task(source=SPLITS)),
            "suite.yaml": "name: s\ntasks:\n" + _task(name="lab_cb", source=SPLITS),
            "data.jsonl": DATA,
        },
        ("suite.yaml", "tasks[0].name", "lab_cb"),
    ),
    Case(
        "run-shots-over-budget",
        "config",
        "promot+8shot where about one exemplar fits stage2.max_input_length (trained with the "
        "rest dropped while every record said 8-shot)",
        ["run", "run.yaml"],
        {
            "run.yaml": "methods: [promot+8shot]\nstage1: {mixture: mix.yaml}\n"
            "stage2: {mixture: mix.yaml, max_input_length: 64}\neval: {suite: suite.yaml}\n",
            "mix.yaml": _mixture(_task(source=SPLITS)),
            "suite.yaml": "name: s\nshots: [1]\ntasks: [lab_cb]\n",
            "data.jsonl": DATA,
        },
        ("run.yaml", "methods", "'toy'", "stage2.max_input_length=64"),
    ),
    Case(
        "run-wise-same-twice",
        "config",
        "wise0.5:standard and wise0.50:standard (one model evaluated twice)",
        ["run", "run.yaml"],
        {"run.yaml": "methods: [standard, wise0.5:standard, wise0.50:standard]\n"},
        ("run.yaml", "methods", "the same method twice"),
    ),
    Case(
        "run-lora-rank-width",
        "config",
        "a LoRA rank of 100000 on a 64-wide model (ran at 27 s a step)",
        ["run", "run.yaml"],
        {
            "run.yaml": "methods: [lora]\nlora: {rank: 100000}\nstage2: {mixture: mix.yaml}\n"
            "eval: {suite: suite.yaml}\n",
            "mix.yaml": _mixture(_task(source=SPLITS)),
            "suite.yaml": "name: s\nshots: [1]\ntasks: [lab_cb]\n",
            "data.jsonl": DATA,
        },
        ("run.yaml", "lora.rank", "at most 64"),
    ),
    Case(
        "template-empty-target",
        "template",
        "a template with nothing after ||| (accepted silently)",
        ["mixture", "show", "mix.yaml"],
        {"mix.yaml": _mixture(_task(template='{jinja: "{{text}} even or odd? |||"}'))},
        ("mix.yaml", "tasks[0].template", "empty target"),
    ),
    Case(
        "bank-export-vllm-into-bank",
        "bank",
        "bank export --format vllm into the bank's own folder (verify failed for good after)",
        ["bank", "export", "rte", "bank/rte-vllm", "--format", "vllm", "--task-type", "CAUSAL_LM"]
        + ["--bank", "bank"],
        setup=_bank,
        expect=("bank/rte-vllm", "inside the prompt bank"),
    ),
    Case(
        "bank-export-under-a-file",
        "bank",
        "bank export into a folder under an existing file (exit 1, a temp-dir message)",
        ["bank", "export", "rte", "notes.txt/rte", "--task-type", "CAUSAL_LM", "--bank", "bank"],
        {"notes.txt": "not a folder\n"},
        setup=_bank,
        expect=("notes.txt/rte", "notes.txt is a file"),
    ),
    Case(
        "bank-export-to-proc",
        "bank",
        "bank export into /proc (exit 1, a temp-dir message)",
        ["bank", "export", "rte", "/proc/rte-export", "--format", "vllm", "--task-type"]
        + ["CAUSAL_LM", "--bank", "bank"],
        setup=_bank,
        expect=("/proc/rte-export", "rte@v0002", "cannot be"),
    ),
    Case(
        "data-pull-to-a-file",
        "data",
        "data pull --to naming a file (checked only after the first downloads)",
        ["data", "pull", "rte", "--to", "notes.txt"],
        {"notes.txt": "not a folder\n"},
        ("notes.txt", "--to", "is a file"),
    ),
    Case(
        "data-pull-unknown-task",
        "data",
        "data pull with an unknown second task (resolved only after the first was downloaded)",
        ["data", "pull", "rte", "no_such_task", "--to", "mirror"],
        {},
        ("data pull", "no_such_task"),
    ),
    Case(
        "plan-million-nodes",
        "cli",
        "plan --nodes 1000000 (planned, and said it fits)",
        ["plan", "run.yaml", "--nodes", "1000000"],
        {"run.yaml": "seed: 0\n"},
        ("--nodes", "at most 10000"),
    ),
    Case(
        "plan-infinite-memory",
        "cli",
        "plan --gpu-memory inf",
        ["plan", "run.yaml", "--gpu-memory", "inf"],
        {"run.yaml": "seed: 0\n"},
        ("--gpu-memory", "inf"),
    ),
]

# Usage errors found by the command-line parser itself (typer/click): listed apart because
# their message is the parser's; cli.py prints it on one line with exit status 2.
USAGE_CASES: list[Case] = [
    Case("cli-unknown-command", "cli", "a command that does not exist", ["frobnicate"]),
    Case("cli-missing-argument", "cli", "bank rm without the entry", ["bank", "rm"]),
    Case("cli-unknown-option", "cli", "an option that does not exist", ["bank", "list", "--bogus"]),
    Case(
        "cli-out-of-range", "cli", "mixture sample -n 0", ["mixture", "sample", "x.yaml", "-n", "0"]
    ),
    Case(
        "mixture-sample-huge-n",
        "cli",
        "mixture sample -n 100000000 (rendered every example first: hung)",
        ["mixture", "sample", "mix.yaml", "-n", "100000000"],
        {"mix.yaml": MIXTURE, "data.jsonl": DATA},
        ("-n", "10000"),
    ),
    Case(
        "route-eval-zero-examples",
        "cli",
        "route --eval --examples 0 (printed nan%)",
        ["route", "--bank", "bank", "--eval", "--examples", "0"],
        setup=_bank,
        expect=("--examples",),
    ),
]


def prepare(case: Case, root: Path) -> None:
    """Write the case's files and run its setup in ``root`` (an empty directory)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, content in case.files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    if case.setup is not None:
        case.setup(root)


def run(case: Case, root: Path) -> tuple[int, str, str]:
    """Run the case in-process in ``root``: (exit status, stdout, stderr)."""
    from multipromot.cli import main

    prepare(case, root)
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(case.argv))
    finally:
        os.chdir(cwd)
    return code, out.getvalue(), normalise(err.getvalue(), root)


def normalise(text: str, root: Path) -> str:
    """The message with the case's directory taken out (so it reads the same everywhere)."""
    for prefix in (str(root.resolve()) + os.sep, str(root) + os.sep):
        text = text.replace(prefix, "")
    for prefix in (str(root.resolve()), str(root)):
        text = text.replace(prefix, ".")
    return text
