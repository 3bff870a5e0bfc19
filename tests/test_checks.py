"""Checks that came too late or not at all (issue 26, item 7). The one-line refusals are cases
of the bad-input catalogue (tests/reliability/catalogue.py); these are the rest: exit statuses
that said "fine", listings that called a broken entry healthy, nothing downloaded before a
command is refused, and the words a reuse decision gives."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from safetensors.torch import save as save_safetensors

from multipromot.bank import PromptBank
from multipromot.bank.entry import META_FILE, PROMPT_FILE, meta_bytes
from multipromot.cli import data as data_cli
from multipromot.cli import main
from multipromot.data.mirror import write_snapshot
from multipromot.fsio import sha256_bytes
from multipromot.reuse import changes

BASE = {"name": "models/base", "fingerprint": "f00dfeedf00dfeed"}


def _forge_nan(bank: PromptBank, ref: str) -> None:
    """Replace an entry's tensor by NaNs and make its records agree (checksums match): what a
    tool writing the bank by hand could leave."""
    entry = bank.get(ref)
    data = save_safetensors({"prompt": torch.full((4, 8), float("nan"))}, metadata={"format": "pt"})
    (entry.path / PROMPT_FILE).write_bytes(data)
    meta = {**entry.meta, "sha256": sha256_bytes(data)}
    meta.pop("meta_sha256", None)
    (entry.path / META_FILE).write_bytes(meta_bytes(meta))


def test_bank_list_flags_a_nan_prompt_instead_of_listing_it_healthy(tmp_path, capsys):
    bank = PromptBank(tmp_path / "bank")
    bank.add("rte", torch.ones(4, 8), base_model=BASE)
    bank.add("qa", torch.ones(4, 8), base_model=BASE)
    _forge_nan(bank, "rte")
    assert main(["bank", "list", "--bank", str(tmp_path / "bank"), "--json"]) == 1  # was 0
    out, err = capsys.readouterr()
    assert [e["ref"] for e in json.loads(out)] == ["qa@v0001"]
    assert "rte@v0001" in err and "NaN or infinite" in err


def test_data_check_fails_when_a_task_cannot_load_or_render(tmp_path, capsys):
    """Was: exit 0 when no listed task loaded, and an XSum parquet stored as RTE passed."""
    # offline, a hub task outside any mirror cannot load: exit 1, said
    assert main(["data", "check", "xsum"]) == 1
    assert "1 of 1 tasks cannot load: xsum" in capsys.readouterr().err
    # a mirror whose rte files hold XSum's columns: every split fails the template's fields
    rows = datasets.Dataset.from_list([{"document": "a text", "summary": "short", "id": "1"}] * 4)
    write_snapshot(tmp_path / "m", "aps/super_glue", "rte", {"train": rows, "validation": rows})
    try:
        assert main(["data", "check", "rte", "--mirror", str(tmp_path / "m"), "--json"]) == 1
        [row] = json.loads(capsys.readouterr().out)
        assert row["rows"]["train"] == 4 and "premise" in row["error"]
    finally:
        from multipromot.data.mirror import set_mirror
        from multipromot.data.tasks import get_task

        set_mirror(None)
        get_task("rte").clear_cache()
    # local tasks that load and render: exit 0
    assert main(["data", "check", "lab_rte", "lab_qa"]) == 0


def test_data_pull_refuses_before_downloading_anything(tmp_path, monkeypatch, capsys):
    """Was: task names and --to were checked only after the first tasks had downloaded."""
    downloads = []
    monkeypatch.setattr(data_cli, "pull_task", lambda task, to, **kw: downloads.append(task))
    (tmp_path / "notes.txt").write_text("a file\n")
    assert main(["data", "pull", "rte", "cb", "--to", str(tmp_path / "notes.txt")]) == 2
    assert main(["data", "pull", "rte", "no_such_task", "--to", str(tmp_path / "m")]) == 2
    assert main(["data", "pull", "rte", "lab_cb", "--to", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "--to: is a file" in err[0] and "no_such_task" in err[1]
    assert "lab_cb: is not a hub dataset" in err[2]
    assert downloads == []


def test_a_wise_row_redone_after_its_source_retrained_says_so():
    """Was: "trained.fingerprint (the data files, templates or rates)"."""
    old = {"trained": {"alpha": 0.5, "step": 4, "fingerprint": "aaaa", "weights": "/w"}}
    new = {"trained": {"alpha": 0.5, "step": 6, "fingerprint": "bbbb", "weights": "/w"}}
    said = changes(old, new)
    assert said.startswith("trained.step 4 -> 6")
    assert (
        "trained.fingerprint (other weights: the model it was made from was trained again)" in said
    )
    assert "data files" not in said
    # a prompt ref whose content changed names the ref
    old = {"bank_refs": {"rte": "rte@v0001"}, "bank_sha256": {"rte": "11"}}
    new = {"bank_refs": {"rte": "rte@v0001"}, "bank_sha256": {"rte": "22"}}
    assert "the prompt rte@v0001 holds other content than before" in changes(old, new)


@pytest.mark.parametrize("argv", [["--nodes", "1000000"], ["--gpu-memory", "inf"], ["--gpus", "0"]])
def test_plan_refuses_machines_that_do_not_exist(tmp_path, argv, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("seed: 0\n")
    assert main(["plan", str(config), *argv]) == 2
    assert capsys.readouterr().err.startswith(f"error: {argv[0]}: must be > 0 and at most")
