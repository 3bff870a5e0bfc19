"""``multipromot bank ...`` through ``multipromot.cli.main``: output, --json, exit status 2."""

from __future__ import annotations

import json

import pytest
import torch

from multipromot.bank import PromptBank, describe_model
from multipromot.cli import main
from multipromot.models import load_model, save_model
from tests.conftest import build_tiny

BASE = {"name": "models/base", "fingerprint": "f00dfeedf00dfeed"}


def _prompt(seed: int, shape: tuple[int, int] = (4, 8)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def run(capsys, *args: str) -> tuple[int, str, str]:
    status = main(["bank", *args])
    out = capsys.readouterr()
    return status, out.out, out.err


def run_json(capsys, *args: str):
    status, out, err = run(capsys, *args, "--json")
    assert status == 0, err
    return json.loads(out)


def assert_one_error_line(err: str, *needles: str) -> None:
    """One ``error:`` line and no traceback (transformers' progress bars may also be there)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch):
    """Rich wraps tables to the terminal width (80 when captured); keep rows on one line."""
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture
def bank(tmp_path) -> PromptBank:
    """rte v1 (stage-1 score 51.5) and v2 (current), cb v1."""
    store = PromptBank(tmp_path / "pb")
    stage1 = {"steps": 300, "metric": "accuracy", "value": 51.5}
    store.add("rte", torch.tensor([[1.0, 0.0], [0.0, 1.0]]), base_model=BASE, stage1=stage1)
    store.add("rte", torch.tensor([[2.0, 0.0], [1.0, 1.0]]), base_model=BASE)
    store.add("cb", _prompt(0, (2, 2)), base_model=BASE)
    return store


def test_list_shows_current_versions(capsys, bank):
    rows = run_json(capsys, "list", "--bank", str(bank.root))
    assert [(r["ref"], r["current"]) for r in rows] == [("cb@v0001", True), ("rte@v0002", True)]
    assert rows[1]["prompt_length"] == 2 and rows[1]["base_model"] == "models/base"
    every = run_json(capsys, "list", "--all", "--bank", str(bank.root))
    assert [r["ref"] for r in every] == ["cb@v0001", "rte@v0001", "rte@v0002"]
    assert every[1]["stage1"] == {"metric": "accuracy", "value": 51.5}

    status, out, _ = run(capsys, "list", "--all", "--bank", str(bank.root))
    assert status == 0
    assert "rte" in out and "v0002 *" in out and "accuracy 51.5" in out and "2 x 2" in out


def test_show_lists_meta_and_stage2_checkpoints(capsys, bank):
    bank.record_stage2("rte", "runs/promot/final")
    shown = run_json(capsys, "show", "rte", "--bank", str(bank.root))
    assert shown["ref"] == "rte@v0002" and shown["current"] is True
    assert shown["meta"]["stage2"][0]["checkpoint"] == "runs/promot/final"
    assert [v["ref"] for v in shown["versions"]] == ["rte@v0001", "rte@v0002"]
    status, out, _ = run(capsys, "show", "rte@1", "--bank", str(bank.root))
    assert status == 0
    assert "rte@v0001" in out and "accuracy 51.5 after 300 steps" in out
    assert "stage-2 checkpoints: none" in out


def test_diff_numbers(capsys, bank):
    d = run_json(capsys, "diff", "rte@v1", "rte@v2", "--bank", str(bank.root))
    assert d["cosine"] == pytest.approx(3 / 12**0.5)
    assert d["l2_distance"] == pytest.approx(2**0.5)
    status, out, _ = run(capsys, "diff", "rte@v1", "rte", "--bank", str(bank.root))
    assert status == 0 and "cosine 0.8660" in out and "L2 distance 1.4142" in out


def test_verify_ok_and_flipped_byte(capsys, bank):
    status, out, err = run(capsys, "verify", "--bank", str(bank.root))
    assert (status, err) == (0, "") and "3 entries, all checks passed" in out

    path = bank.get("rte@v1").prompt_path
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))
    status, out, err = run(capsys, "verify", "--bank", str(bank.root))
    assert status == 2
    assert out.strip().splitlines() == [
        f"{path}: rte@v0001: " + out.split("rte@v0001: ", 1)[1].strip()
    ]
    assert "checksum mismatch" in out
    assert_one_error_line(err, "1 problem(s) found")
    report = json.loads(run(capsys, "verify", "--json", "--bank", str(bank.root))[1])
    assert report["ok"] is False and report["problems"][0]["entry"] == "rte@v0001"

    status, _, err = run(capsys, "show", "rte@v1", "--bank", str(bank.root))
    assert status == 0  # show reads meta only
    status, _, err = run(capsys, "diff", "rte@v1", "rte", "--bank", str(bank.root))
    assert status == 2
    assert_one_error_line(err, "rte@v0001", "checksum mismatch")


def test_verify_fix_rebuilds_the_index(capsys, bank):
    (bank.root / "index.json").unlink()
    status, out, _ = run(capsys, "verify", "--bank", str(bank.root))
    assert status == 2 and "index.json: missing" in out
    status, out, _ = run(capsys, "verify", "--fix", "--bank", str(bank.root))
    assert status == 0 and "all checks passed" in out


def test_rm_rules(capsys, bank):
    root = str(bank.root)
    status, _, err = run(capsys, "rm", "rte@v2", "--bank", root)
    assert status == 2
    assert_one_error_line(err, "rte@v0002", "current version", "--force")
    status, _, err = run(capsys, "rm", "rte", "--bank", root)
    assert status == 2
    assert_one_error_line(err, "names every version of rte")
    assert bank.versions("rte") == [1, 2]

    assert run_json(capsys, "rm", "rte@v1", "--bank", root) == {
        "removed": ["rte@v0001"],
        "current": {"rte": "rte@v0002"},
    }
    bank.add("rte", _prompt(3, (2, 2)), base_model=BASE)
    status, out, _ = run(capsys, "rm", "rte@v3", "--force", "--bank", root)
    assert status == 0 and "removed rte@v0003" in out and "current is now rte@v0002" in out
    assert run_json(capsys, "rm", "cb", "--force", "--bank", root) == {
        "removed": ["cb@v0001"],
        "current": {"cb": None},
    }
    assert bank.tasks() == ["rte"]


@pytest.mark.parametrize("name", ["../evil", "a/b"])
def test_bad_task_names_exit_2(capsys, bank, tmp_path, name):
    for args in (["show", name], ["rm", name, "--force"], ["export", name, str(tmp_path / "o")]):
        status, _, err = run(capsys, *args, "--bank", str(bank.root))
        assert status == 2
        assert_one_error_line(err, repr(name), "bad task name")
    status, _, err = run(capsys, "import", str(tmp_path), "--task", name, "--bank", str(bank.root))
    assert status == 2
    assert_one_error_line(err, repr(name))


def test_missing_bank_and_entry_exit_2(capsys, tmp_path, bank):
    status, _, err = run(capsys, "list", "--bank", str(tmp_path / "nope"))
    assert status == 2
    assert_one_error_line(err, "nope", "no prompt bank here")
    status, _, err = run(capsys, "show", "rte@v7", "--bank", str(bank.root))
    assert status == 2
    assert_one_error_line(err, "rte@v0007", "no such version")


@pytest.fixture(scope="module")
def gpt2_dirs(tmp_path_factory):
    """tiny-gpt2 saved as a base model, and an unrelated tiny-gpt2 (other seed)."""
    root = tmp_path_factory.mktemp("models")
    for name, seed in (("base", 0), ("other", 1)):
        model, tok = build_tiny("tiny-gpt2", seed=seed)
        save_model(model, tok, root / name, name=f"tiny-gpt2-seed{seed}")
    return root / "base", root / "other"


def test_wrong_fingerprint_exits_2(capsys, tmp_path, gpt2_dirs):
    base_dir, other_dir = gpt2_dirs
    model, _, _ = load_model(str(base_dir))
    store = PromptBank(tmp_path / "pb")
    record = describe_model(model)
    store.add("rte", _prompt(0, (3, 64)), base_model=record)

    status, out, err = run(capsys, "verify", "--model", str(base_dir), "--bank", str(store.root))
    assert status == 0, err
    status, out, err = run(capsys, "verify", "--model", str(other_dir), "--bank", str(store.root))
    assert status == 2
    [line] = out.strip().splitlines()
    assert "rte@v0001" in line and "fingerprint mismatch" in line and record["fingerprint"] in line
    assert_one_error_line(err, "1 problem(s) found")


def test_export_and_import_peft(capsys, tmp_path, gpt2_dirs):
    base_dir, _ = gpt2_dirs
    model, _, _ = load_model(str(base_dir))
    store = PromptBank(tmp_path / "pb")
    prompt = _prompt(1, (3, 64))
    store.add("rte", prompt, base_model=describe_model(model))
    root = str(store.root)

    out_dir = tmp_path / "out"
    info = run_json(capsys, "export", "rte", "--format", "peft", str(out_dir), "--bank", root)
    assert info["task_type"] == "CAUSAL_LM" and info["ref"] == "rte@v0001"
    assert info["base_model_name_or_path"] == str(base_dir.resolve())
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "multipromot_meta.json",
    ]
    status, _, err = run(capsys, "export", "rte", str(out_dir), "--bank", root)
    assert status == 2
    assert_one_error_line(err, "not an empty directory")

    entry = run_json(
        capsys, "import", str(out_dir), "--format", "peft", "--task", "rte2", "--bank", root
    )
    assert entry["ref"] == "rte2@v0001" and entry["fingerprint"] == store.get("rte").fingerprint
    assert torch.equal(store.load_prompt("rte2", model=model), prompt)

    (out_dir / "multipromot_meta.json").unlink()
    status, out, err = run(
        capsys,
        "import",
        str(out_dir),
        "--task",
        "rte",
        "--base-model",
        str(base_dir),
        "--bank",
        root,
    )
    assert status == 0, err
    assert "imported" in out and "rte@v0002" in out

    status, _, err = run(
        capsys, "export", "rte", str(tmp_path / "x"), "--format", "onnx", "--bank", root
    )
    assert status == 2
    assert_one_error_line(err, "--format", "'onnx'", "peft")


def test_list_shows_the_healthy_entries_and_flags_a_corrupt_one(capsys, bank):
    """One corrupt meta.json made `bank list` fail entirely."""
    (bank.root / "cb" / "v0001" / "meta.json").write_text("{not json")
    status, out, err = run(capsys, "list", "--bank", str(bank.root))
    assert status == 1
    assert "rte" in out and "v0002" in out
    bad = err.strip().splitlines()
    assert len(bad) == 1 and bad[0].startswith("bad entry ") and "cb@v0001" in bad[0]


def test_export_into_the_bank_is_refused(capsys, bank, tmp_path):
    """An adapter exported into the bank's own folder broke the bank."""
    for inside in (bank.root / "adapter", bank.root / "rte" / "x"):
        status, _, err = run(
            capsys,
            "export",
            "rte",
            str(inside),
            "--task-type",
            "CAUSAL_LM",
            "--bank",
            str(bank.root),
        )
        assert status == 2 and "is inside the prompt bank" in err and not inside.exists()
    assert bank.verify() == []


def test_verify_fix_never_makes_a_junk_folder_current(capsys, bank):
    """A folder named like a version but not an entry (an adapter exported into the bank) was
    made current by `verify --fix` (and by every read, as a crashed writer's entry)."""
    junk = bank.root / "rte" / "v0003"
    junk.mkdir()
    (junk / "adapter_config.json").write_text("{}")
    assert bank.get("rte").ref == "rte@v0002"
    status, out, _ = run(capsys, "verify", "--bank", str(bank.root))
    assert status == 2 and "rte@v0003" in out
    run(capsys, "verify", "--fix", "--bank", str(bank.root))
    assert PromptBank(bank.root).get("rte").ref == "rte@v0002"
    (bank.root / "index.json").unlink()  # rebuilt from disk alone
    run(capsys, "verify", "--fix", "--bank", str(bank.root))
    assert PromptBank(bank.root).get("rte").ref == "rte@v0002"


def test_bank_entries_and_exports_follow_the_umask(capsys, tmp_path):
    """Entries and exports were 0700 folders (mkdtemp), unreadable by a colleague."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        store = PromptBank(tmp_path / "shared")
        entry = store.add("rte", torch.ones(2, 2), base_model=BASE)
        status, _, err = run(
            capsys,
            "export",
            "rte",
            str(tmp_path / "out"),
            "--task-type",
            "CAUSAL_LM",
            "--bank",
            str(store.root),
        )
        assert status == 0, err
    finally:
        os.umask(old)
    for folder in (entry.path, tmp_path / "out"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755, folder
        for file in folder.iterdir():
            assert stat.S_IMODE(file.stat().st_mode) == 0o644, file


def test_import_refuses_a_prompt_of_another_width_than_the_base_model(capsys, tmp_path, gpt2_dirs):
    base_dir, _ = gpt2_dirs  # tiny-gpt2: 64 wide
    store = PromptBank(tmp_path / "pb")
    store.add("rte", _prompt(1, (3, 8)), base_model=BASE)
    status, _, err = run(
        capsys,
        "export",
        "rte",
        str(tmp_path / "ad"),
        "--task-type",
        "CAUSAL_LM",
        "--bank",
        str(store.root),
    )
    assert status == 0, err
    status, _, err = run(
        capsys,
        "import",
        str(tmp_path / "ad"),
        "--task",
        "x",
        "--base-model",
        str(base_dir),
        "--bank",
        str(store.root),
    )
    assert status == 2
    assert_one_error_line(err, "the prompt is 8 wide", "embeds tokens in 64")
    assert store.tasks() == ["rte"]
