"""Hostile files: nothing the framework loads can run code, reach outside its directories, or
exhaust memory on the way in.

Every payload that could execute would create a marker file; each test asserts the marker does
not exist afterwards, and that the input was refused with one line (exit status 2 through the
command line).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from reliability import tally
from test_templates import RESOURCE_BOMBS

from multipromot.bank import PromptBank
from multipromot.cli import main
from multipromot.errors import BankError, UserError
from multipromot.fsio import content_sha256 as _content_sha256
from multipromot.fsio import sha256_bytes as _sha256

BASE = {"name": "models/base", "fingerprint": "f00dfeedf00dfeed"}


class Exploit:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(autouse=True)
def _quiet_datasets():
    """datasets' "Generating train split" bars also go to stderr; the error line is ours."""
    import datasets

    was = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    yield
    if not was:
        datasets.enable_progress_bars()


def _one_error_line(capsys) -> str:
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ----------------------------------------------------------------------------- pickles


def _bank_with_entry(tmp_path: Path) -> tuple[PromptBank, Path]:
    bank = PromptBank(tmp_path / "bank")
    entry = bank.add("rte", torch.ones(4, 8), base_model=BASE)
    bank.add("rte", torch.zeros(4, 8), base_model=BASE)
    return bank, entry.path


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickle_disguised_as_a_bank_prompt_never_runs(tmp_path, capsys, how):
    """The attacker also rewrites meta.json so that the checksums match the payload: loading
    still refuses it, because a prompt is only ever read as safetensors."""
    bank, path = _bank_with_entry(tmp_path)
    marker = tmp_path / "pwned"
    target = path / "prompt.safetensors"
    if how == "pickle":
        target.write_bytes(pickle.dumps(Exploit(marker)))
    else:
        torch.save({"prompt": Exploit(marker)}, target)
    meta = json.loads((path / "meta.json").read_text())
    meta["sha256"] = _sha256(target.read_bytes())
    meta["meta_sha256"] = _content_sha256(meta, "meta_sha256")
    (path / "meta.json").write_text(json.dumps(meta))

    with pytest.raises(BankError, match="not a readable safetensors file") as err:
        bank.load_prompt("rte@v1")
    assert str(target) in str(err.value)
    assert main(["bank", "diff", "rte@v1", "rte@v2", "--bank", str(bank.root)]) == 2
    assert str(target) in _one_error_line(capsys)
    assert main(["bank", "verify", "--bank", str(bank.root)]) == 2
    capsys.readouterr()
    assert not marker.exists()


def _peft_dir(tmp_path: Path, bank: PromptBank) -> Path:
    out = bank.export_peft("rte@v2", tmp_path / "adapter", task_type="SEQ_2_SEQ_LM")
    return out


@pytest.mark.parametrize("kind", ["bin_only", "safetensors_is_a_pickle"])
def test_pickle_disguised_as_a_peft_adapter_never_runs(tmp_path, capsys, kind):
    bank, _ = _bank_with_entry(tmp_path)
    adapter = _peft_dir(tmp_path, bank)
    marker = tmp_path / "pwned"
    weights = adapter / "adapter_model.safetensors"
    if kind == "bin_only":
        weights.unlink()
        torch.save({"prompt_embeddings": Exploit(marker)}, adapter / "adapter_model.bin")
        expected = "adapter_model.bin is pickled; multipromot never unpickles"
    else:
        torch.save({"prompt_embeddings": Exploit(marker)}, weights)
        expected = "not a readable safetensors file"
    code = main(["bank", "import", str(adapter), "--task", "evil", "--bank", str(bank.root)])
    assert code == 2
    assert expected in _one_error_line(capsys)
    assert not marker.exists()
    assert bank.tasks() == ["rte"]


def _tiny_checkpoint(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    from multipromot.train.checkpoint import save_checkpoint

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    return save_checkpoint(tmp_path / "ckpts", 1, model=model), model


@pytest.mark.parametrize("name", [".metadata", "__0_0.distcp", "rng.safetensors"])
def test_pickle_disguised_as_a_checkpoint_file_never_runs(tmp_path, name):
    """dcp's .metadata goes through an allow-list unpickler, its tensor files through
    ``torch.load(weights_only=True)``, the RNG file through safetensors: the payload is
    refused wherever it is put."""
    from multipromot.train.checkpoint import load_checkpoint

    path, model = _tiny_checkpoint(tmp_path)
    marker = tmp_path / "pwned"
    if name == ".metadata":
        (path / name).write_bytes(pickle.dumps(Exploit(marker)))
    else:
        torch.save({"weight": Exploit(marker)}, path / name)
    with pytest.raises(BaseException) as err:  # noqa: B017 (dcp raises a BaseException)
        load_checkpoint(path, model=model)
    assert not isinstance(err.value, KeyboardInterrupt)
    assert not marker.exists()


def test_pickle_disguised_as_model_weights_never_runs(tmp_path):
    """A model directory (``model:`` in a run config) whose pytorch_model.bin is a pickle
    payload: transformers loads it with weights_only=True and refuses it."""
    from multipromot.models import build_builtin, load_model

    model, tok = build_builtin("tiny-t5", 0)
    model_dir = tmp_path / "model"
    model.config.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    marker = tmp_path / "pwned"
    torch.save({"shared.weight": Exploit(marker)}, model_dir / "pytorch_model.bin")
    with pytest.raises(Exception, match="[Ww]eights only load failed"):
        load_model(str(model_dir))
    assert not marker.exists()


# ----------------------------------------------------------------------------- templates

# Each would run `touch MARKER` (or read Python internals) if the sandbox let it.
ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ lipsum.__globals__['os'].system('touch MARKER') }}",
    "{{ joiner.__init__.__globals__['os'].popen('touch MARKER').read() }}",
    "{{ namespace.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ text|attr('__class__')|attr('__mro__') }}",
    "{{ text|attr('\\x5f\\x5fclass\\x5f\\x5f') }}",
    "{{ '{0.__class__.__mro__}'.format(text) }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os }}",
    "{% set x = [] %}{{ x.append(1) }}",
    "{{ range.__self__.__import__('os').system('touch MARKER') }}",
    # resource bounds: each of these would take hours or gigabytes
    "{{ 'a' * 1000000000 }}",
    "{{ 9 ** 99999 }}",
    "{{ ((9 ** 999) ** 999) ** 999 }}",
    "{% set n = namespace(x=9) %}{% for i in range(40) %}{% set n.x = n.x * n.x %}{% endfor %}",
    "{{ range(10 ** 9)|list|length }}",
]


def _mixture(tmp_path: Path, template: dict, extra_source: dict | None = None) -> Path:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(4)))
    spec = {
        "name": "hostile",
        "tasks": [
            {
                "name": "evil",
                "source": {"files": "data.jsonl", "format": "json", **(extra_source or {})},
                "template": template,
                "metric": "accuracy",
            }
        ],
    }
    path = tmp_path / "mix.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("payload", ESCAPES)
def test_template_cannot_escape_the_sandbox(tmp_path, capsys, payload):
    marker = tmp_path / "pwned"
    jinja = payload.replace("MARKER", str(marker)) + " ||| {{ label }}"
    path = _mixture(tmp_path, {"jinja": jinja})
    assert main(["mixture", "sample", str(path), "-n", "2"]) == 2
    line = _one_error_line(capsys)
    assert str(path) in line and "tasks[0].template" in line
    assert not marker.exists()


def test_answer_choices_and_source_filter_are_sandboxed_too(tmp_path, capsys):
    marker = tmp_path / "pwned"
    touch = f"lipsum.__globals__.os.system('touch {marker}')"
    path = _mixture(
        tmp_path,
        {
            "jinja": "{{text}} ||| {{answer_choices[label]}}",
            "answer_choices": "{{ " + touch + " }} ||| b",
        },
    )
    assert main(["mixture", "sample", str(path)]) == 2
    assert "tasks[0].template" in _one_error_line(capsys)
    path = _mixture(tmp_path, {"jinja": "{{text}} ||| x"}, {"filter": touch})
    assert main(["mixture", "sample", str(path)]) == 2
    assert "tasks[0].source.filter" in _one_error_line(capsys)
    assert not marker.exists()


# Rendered in a fresh process under a 3 GiB address-space cap, so that a bomb the meter missed
# would end in MemoryError (or a hang, caught by the timeout), not in the meter's message.
_BOMB_SCRIPT = """
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from multipromot.data.templates import Template
from multipromot.errors import UserError
outcomes = []
for jinja in json.loads(sys.argv[1]):
    start = time.monotonic()
    try:
        Template("bomb", jinja + " ||| x").apply({"text": "t", "label": 0})
        outcome = "rendered"
    except UserError as e:
        outcome = str(e)
    outcomes.append([outcome, time.monotonic() - start])
print(json.dumps(outcomes))
"""
# the wall-time bound's own case: 2**40 macro calls in a handful of loop iterations
_DEADLINE_BOMB = (
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}"
)


def test_template_resource_bombs_end_in_the_meter_under_a_memory_cap(tmp_path):
    bombs = [jinja for jinja, _ in RESOURCE_BOMBS] + [_DEADLINE_BOMB]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _BOMB_SCRIPT, json.dumps(bombs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outcomes = json.loads(done.stdout.strip().splitlines()[-1])
    limits = Counter()
    for outcome, _ in outcomes:
        assert "(a limit per render)" in outcome, outcome
        reason = outcome.split(": ", 2)[-1]
        limits[
            "time"
            if "took more than" in reason
            else "steps"
            if "loop iterations" in reason
            else "size"
        ] += 1
    slowest = max(seconds for _, seconds in outcomes)
    assert slowest < 15  # the 5 s deadline plus a loaded machine's slack
    tally.record(
        "template_bombs",
        fault=f"template resource bombs ({len(bombs)}: nested loops, strings doubled in a "
        "loop, padding and format widths, join/replace amplification, 2**40 macro calls), "
        "each rendered in a process capped at 3 GiB",
        trials=len(bombs),
        survived=len(outcomes),
        data_lost=0,
        stopped_by_the_meter={f"{kind} bound": n for kind, n in sorted(limits.items())},
        slowest_refusal=f"{slowest:.1f} s (the 5 s deadline)",
        fastest_refusal=f"{min(seconds for _, seconds in outcomes):.2f} s",
    )


# ----------------------------------------------------------------------------- YAML

UNSAFE_TAGS = [
    "!!python/object/apply:os.system ['touch MARKER']",
    "!!python/object/new:subprocess.Popen [['touch', 'MARKER']]",
    "!!python/name:os.system",
    "!!python/module:os",
]


@pytest.mark.parametrize("tag", UNSAFE_TAGS)
def test_unsafe_yaml_tags_are_refused_in_mixtures_configs_and_suites(tmp_path, capsys, tag):
    from multipromot.eval.suites import load_suite

    marker = tmp_path / "pwned"
    value = tag.replace("MARKER", str(marker))
    mixture = tmp_path / "mix.yaml"
    mixture.write_text(f"name: {value}\ntasks: [{{task: rte}}]\n")
    assert main(["mixture", "show", str(mixture)]) == 2
    line = _one_error_line(capsys)
    assert str(mixture) in line and "line 1" in line and "python/" in line
    config = tmp_path / "run.yaml"
    config.write_text(f"seed: {value}\n")
    assert main(["stage1", str(config)]) == 2
    assert str(config) in _one_error_line(capsys)
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"name: x\ntasks: [{value}]\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_suite(suite)
    assert not marker.exists()


# Alias bombs ("billion laughs") in configs and mixtures are catalogue cases
# (tests/reliability/catalogue.py: config-alias-bomb, mixture-alias-bomb), the first of them
# also end to end under a memory cap (test_reliability_catalogue.py).


# ----------------------------------------------------------------------------- names and paths

TRAVERSALS = [
    "../evil",
    "..",
    "a/../../b",
    "/etc/passwd",
    "rte/../../x",
    "~root",
    ".hidden",
    "a\\..\\b",
    "nul\x00byte",
    "",
]


@pytest.mark.parametrize("name", TRAVERSALS)
def test_path_traversal_in_task_and_entry_names(tmp_path, capsys, name):
    bank, _ = _bank_with_entry(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(BankError):
        bank.add(name, torch.ones(4, 8), base_model=BASE)
    for argv in (["bank", "show", f"{name}@v1"], ["bank", "rm", name, "--force"]):
        assert main([*argv, "--bank", str(bank.root)]) == 2
        _one_error_line(capsys)
    adapter = _peft_dir(tmp_path, bank)
    assert main(["bank", "import", str(adapter), "--task", name, "--bank", str(bank.root)]) == 2
    _one_error_line(capsys)
    shutil.rmtree(adapter)
    # a mixture's inline task name becomes a bank directory in stage 1: refused on load
    path = _mixture(tmp_path, {"jinja": "{{text}} ||| x"})
    spec = yaml.safe_load(path.read_text())
    spec["tasks"][0]["name"] = name
    path.write_text(yaml.safe_dump(spec))
    assert main(["mixture", "show", str(path)]) == 2
    assert "tasks[0].name" in _one_error_line(capsys)
    path.unlink()
    (tmp_path / "data.jsonl").unlink()
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_symlinks_in_a_bank_never_lead_reads_or_writes_outside(tmp_path):
    bank, entry_dir = _bank_with_entry(tmp_path)
    root = bank.root
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    secret = outside / "secret.json"
    secret.write_text(json.dumps({"schema_version": 1, "tasks": {}, "entries": []}))

    # reads: a meta.json or index.json that is a symlink out of the bank is refused
    meta = entry_dir / "meta.json"
    shutil.copy(meta, outside / "meta.json")
    meta.unlink()
    meta.symlink_to(outside / "meta.json")
    with pytest.raises(BankError, match="outside the bank"):
        bank.get("rte@v1")
    meta.unlink()
    shutil.copy(outside / "meta.json", meta)
    index = root / "index.json"
    saved_index = index.read_bytes()
    index.unlink()
    index.symlink_to(secret)
    with pytest.raises(BankError, match="outside the bank"):
        bank.get("rte")
    index.unlink()
    index.write_bytes(saved_index)

    # writes: leftover-looking symlinks are not followed by the cleanup, a symlinked task
    # directory is not written into, a symlinked version is not removed through
    (root / ".tmp-evil").symlink_to(outside, target_is_directory=True)
    (root / ".trash-evil").symlink_to(outside, target_is_directory=True)
    (root / ".index.json.evil").symlink_to(outside / "precious.txt")
    (entry_dir / ".meta.json.evil").symlink_to(outside / "precious.txt")
    bank.add("rte", torch.full((4, 8), 2.0), base_model=BASE)
    assert (outside / "precious.txt").read_text() == "keep me"
    (root / "cb").symlink_to(outside, target_is_directory=True)
    with pytest.raises(BankError, match="symlink"):
        bank.add("cb", torch.ones(4, 8), base_model=BASE)
    version_link = root / "rte" / "v0009"
    version_link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(BankError):
        bank.remove("rte@v9", force=True)
    assert sorted(p.name for p in outside.iterdir()) == ["meta.json", "precious.txt", "secret.json"]
    assert secret.read_text().startswith('{"schema_version": 1')
    assert any("is a symlink" in str(p) for p in bank.verify())
