"""`multipromot route`: per-input decisions and the held-out routing figures on built-in tasks."""

import json

import pytest
import torch

from multipromot.bank import PromptBank
from multipromot.bank.entry import format_record
from multipromot.cli import main
from multipromot.data.tasks import get_task

BASE = {"name": "base", "fingerprint": "0123456789abcdef"}


@pytest.fixture
def bank_dir(tmp_path):
    bank = PromptBank(tmp_path / "bank")
    for task in ("lab_rte", "lab_trans_fr"):
        bank.add(task, torch.randn(4, 8), base_model=BASE, format=format_record(get_task(task)))
    return str(tmp_path / "bank")


def test_route_eval_meets_the_99_percent_targets(bank_dir, capsys):
    assert main(["route", "--bank", bank_dir, "--eval", "--examples", "40", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_positives"] == 2 * 3 * 40  # two bank tasks x (0, 1, 4 shots) x 40
    assert result["n_negatives"] >= 6 * 3 * 40  # every other lab task, 0/1/4-shot
    assert result["positive_rate"] >= 99.0
    assert result["negative_rate"] >= 99.0


def test_route_explains_each_input(bank_dir, capsys):
    rte = get_task("lab_rte")
    rte_input, _ = rte.render(rte.examples("test")[0])
    qa = get_task("lab_qa")
    qa_input, qa_target = qa.render(qa.examples("train")[0])
    kshot_other = f"{qa_input} {qa_target}\n\n{rte_input}"  # a QA exemplar before an RTE input
    assert main(["route", "--bank", bank_dir, "--json", rte_input, qa_input, kshot_other]) == 0
    routes = json.loads(capsys.readouterr().out)
    assert [r["task"] for r in routes] == ["lab_rte", None, None]
    assert [r["input"] for r in routes] == [rte_input, qa_input, kshot_other]
    assert all(r["reason"] for r in routes)


def test_route_errors_are_one_line(bank_dir, tmp_path, capsys):
    assert main(["route", "--bank", bank_dir]) == 2
    assert (
        capsys.readouterr().err.strip() == "error: route: give inputs to route, --file F, or --eval"
    )
    missing = str(tmp_path / "nope.txt")
    assert main(["route", "--bank", bank_dir, "--file", missing]) == 2
    assert capsys.readouterr().err.strip() == f"error: {missing}: no such file"


def test_a_bank_task_without_signature_is_routed_by_the_calibrated_similarity_fallback(
    tmp_path, capsys
):
    """An entry with no format record (e.g. imported from PEFT) has no signature: `route`
    calibrates the similarity fallback on its validation inputs against other formats."""
    bank = PromptBank(tmp_path / "bank")
    bank.add("lab_qa", torch.randn(4, 8), base_model=BASE)  # no format: no signature
    qa, cb = get_task("lab_qa"), get_task("lab_cb")
    qa_inputs = [qa.render(qa.examples("test")[i])[0] for i in range(5)]
    cb_inputs = [cb.render(cb.examples("test")[i])[0] for i in range(5)]
    assert main(["route", "--bank", str(bank.root), "--json", *qa_inputs, *cb_inputs]) == 0
    routes = json.loads(capsys.readouterr().out)
    assert [r["task"] for r in routes] == ["lab_qa"] * 5 + [None] * 5
    assert all(r["reason"].startswith("similarity") for r in routes[:5])


def test_route_refuses_a_bank_folder_that_does_not_exist(tmp_path, capsys):
    assert main(["route", "--bank", str(tmp_path / "nope"), "some input"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path / 'nope'}: --bank: no prompt bank here (not a directory)"


def test_route_refuses_a_binary_file_and_zero_eval_examples(bank_dir, tmp_path, capsys):
    binary = tmp_path / "model.bin"
    binary.write_bytes(b"\x80\x04\x95\x00\xff\xfe")
    assert main(["route", "--bank", bank_dir, "--file", str(binary)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {binary}: --file: not a UTF-8 text file with one input per line"]
    # the file is read before any model or task loads: its error, not the model's, comes first
    assert (
        main(["route", "--bank", bank_dir, "--model", "no-such-model", "--file", str(binary)]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {binary}: --file: not a UTF-8 text file with one input per line"]
    assert main(["route", "--bank", bank_dir, "--eval", "--examples", "0"]) == 2  # was nan%
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--examples" in err[0] and "nan" not in err[0]
