"""Figures for RELIABILITY.md: a test records what it tried and what survived.

When ``MULTIPROMOT_RELIABILITY_OUT`` names a directory, :func:`record` writes
``<dir>/<name>.json``; ``tests/reliability/make_report.py`` turns those files into the table.
Without it (a plain ``make test``) nothing is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ENV = "MULTIPROMOT_RELIABILITY_OUT"


def record(name: str, *, fault: str, trials: int, survived: int, data_lost: int, **details):
    """Write one row of the figures table (if asked to) and return it."""
    row = {
        "name": name,
        "fault": fault,
        "trials": trials,
        "survived": survived,
        "data_lost": data_lost,
        "details": details,
    }
    out = os.environ.get(ENV)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"{name}.json").write_text(json.dumps(row, indent=2, sort_keys=True) + "\n")
    return row
