"""The bad-input catalogue (tests/reliability/catalogue.py): every malformed config, mixture,
template, data file, bank entry and argument gives exit status 2 and one line on stderr that
names the file and the key or entry, with no traceback; in process, and end to end through
``python -m multipromot`` for a few. RELIABILITY.md lists every case with the message it gives,
and the last test keeps that list true."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from reliability.catalogue import CASES, USAGE_CASES, prepare, run
from reliability.make_report import CATALOGUE_END, CATALOGUE_START, catalogue_section

ROOT = Path(__file__).resolve().parents[1]
MESSAGES: dict[str, str] = {}  # case id -> message, for the RELIABILITY.md check


@pytest.fixture(autouse=True)
def _quiet_datasets():
    """datasets' "Generating train split" bars also go to stderr; the error line is ours."""
    import datasets

    was = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    yield
    if not was:
        datasets.enable_progress_bars()


def test_the_catalogue_has_at_least_30_distinct_inputs():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30
    assert {case.area for case in CASES} == {"config", "mixture", "template", "data", "bank", "cli"}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_line_naming_file_and_key(case, tmp_path):
    code, out, err = run(case, tmp_path / case.id)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for part in case.expect:
        assert part in lines[0], (part, lines[0])
    MESSAGES[case.id] = lines[0]


@pytest.mark.parametrize("case", USAGE_CASES, ids=lambda c: c.id)
def test_usage_errors_exit_2_without_traceback(case, tmp_path):
    code, out, err = run(case, tmp_path / case.id)
    assert code == 2 and "Traceback" not in out + err and err.startswith("error:")
    for part in case.expect:
        assert part in err, (part, err)


def test_usage_errors_are_one_line(tmp_path):
    for case in USAGE_CASES:
        _, _, err = run(case, tmp_path / case.id)
        assert len(err.strip().splitlines()) == 1, err


END_TO_END = ["config-alias-bomb", "data-broken-jsonl", "bank-checksum"]


def _memory_cap() -> None:  # in the child: 3 GiB of address space, so a bomb cannot go far
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def test_end_to_end_exit_status_and_one_line(tmp_path):
    """The same inputs through a real ``python -m multipromot`` process (all at once: each
    process spends seconds importing torch), with a memory cap."""
    cases = {case.id: case for case in CASES}
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1"}
    procs = {}
    for name in END_TO_END:
        root = tmp_path / name
        prepare(cases[name], root)
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "multipromot", *cases[name].argv],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_memory_cap,
        )
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert proc.returncode == 2, (name, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert "Traceback" not in out + err and out == ""
        for part in cases[name].expect:
            assert part in lines[0], (name, part, lines[0])


def test_reliability_md_lists_every_case_with_its_message(tmp_path):
    """RELIABILITY.md's catalogue is generated from this list (make_report.py); a changed
    message or a new case needs `python tests/reliability/make_report.py` to be run again."""
    for case in CASES:
        if case.id not in MESSAGES:  # run alone (-k): make the messages here
            MESSAGES[case.id] = run(case, tmp_path / case.id)[2].strip()
    text = (ROOT / "RELIABILITY.md").read_text()
    start, end = text.index(CATALOGUE_START), text.index(CATALOGUE_END) + len(CATALOGUE_END)
    assert text[start:end] == catalogue_section(MESSAGES)
