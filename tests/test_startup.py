"""Start-up (issue 26, item 10): the commands that need no model import no model code. Was:
every command imported torch, transformers, peft and scoring libraries first (7-10 s on a busy
2-core machine, `--help` and `bank list` included; benchmarks/RESULTS.md has the figures)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer.main

from multipromot import cli
from multipromot.bank import PromptBank

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "datasets", "rouge_score", "nltk", "scipy", "lm_eval")
# Runs a command in a fresh interpreter and prints which heavy packages it imported.
PROBE = (
    "import json, sys\n"
    "from multipromot.cli import main\n"
    "status = main(sys.argv[1:])\n"
    f"print(json.dumps([status, [m for m in {HEAVY!r} if m in sys.modules]]))\n"
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("startup")
    bank = PromptBank(root / "bank")
    base = {"name": "models/base", "fingerprint": "f00d"}
    bank.add("rte", torch.ones(4, 8), base_model=base)
    bank.add("rte", torch.zeros(4, 8), base_model=base)
    (root / "mix.yaml").write_text((ROOT / "mixtures" / "lab_rte_fr.yaml").read_text())
    return root


@pytest.mark.parametrize(
    ("argv", "status"),
    [
        (["--help"], 0),
        (["bank", "list", "--bank", "bank"], 0),
        (["bank", "show", "rte", "--bank", "bank"], 0),
        (["bank", "verify", "--bank", "bank"], 0),
        (["bank", "diff", "rte@v1", "rte@v2", "--bank", "bank"], 0),
        (["mixture", "show", "mix.yaml"], 0),
        (["mixture", "sample", "mix.yaml", "-n", "2"], 0),
        (["data", "check", "lab_rte"], 0),
        (["route", "--bank", "nope", "some input"], 2),
        (["route", "--bank", "bank"], 2),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else str(v),
)
def test_commands_that_need_no_model_import_no_model_code(workdir, argv, status):
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )
    code, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    assert code == status, done.stderr
    assert heavy == [], f"multipromot {' '.join(argv)} imported {heavy}"


def test_help_lists_every_command_with_its_own_summary():
    """`--help` answers from the table in multipromot.cli without importing the commands; the
    table's summaries are the commands' own first lines."""
    root = typer.main.get_command(cli.full_app())
    ctx = root.make_context("multipromot", [], resilient_parsing=True)
    assert root.list_commands(ctx) == [*cli.COMMANDS, *cli.GROUPS]
    for name, (_, summary) in {**cli.COMMANDS, **cli.GROUPS}.items():
        command = root.get_command(ctx, name)
        own = command.get_short_help_str(limit=10_000)
        assert own.startswith(summary.rstrip(".")), (name, own)
