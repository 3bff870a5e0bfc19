"""``metrics.jsonl``: the training log of a stage, one JSON object per line, and its one owner.

Every stage loop appends through :class:`MetricsLog` (via ``train.common.MetricsLogger``, which
also feeds the trackers), a resumed loop trims what it will log again, and the report reads
the losses back from here. A kill can cut the last line in half: every reader skips a line
that does not parse, and a trim drops it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from multipromot.fsio import write_atomic

__all__ = ["MetricsLog", "METRICS_FILE"]

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """The ``metrics.jsonl`` of one stage folder.

    Records are dicts; those of a training loop carry ``stage`` (1 or 2) and ``step``.

    Args:
        folder: the stage's folder (the file is ``folder/metrics.jsonl``).
    """

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / METRICS_FILE

    def append(self, record: dict) -> None:
        """Add one record as one line (numbers that JSON cannot hold as they are, as floats)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def records(self) -> list[dict]:
        """Every readable record in file order; lines that do not parse (cut by a kill, or not
        JSON objects) are skipped. Empty when there is no file."""
        return [record for _, record in self._lines()]

    def _lines(self) -> list[tuple[str, dict]]:
        try:
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                out.append((line, record))
        return out

    def trim(self, step: int, *, stage: int) -> None:
        """Before a loop of ``stage`` continues after ``step`` (0: starts over), drop that
        stage's records of later steps (all of them when it starts over), which it will log
        again, and any unreadable line; other stages' records stay."""
        if not self.path.is_file():
            return
        kept = []
        for line, record in self._lines():
            if record.get("stage") != stage or (step > 0 and record.get("step", 0) <= step):
                kept.append(line + "\n")
        write_atomic(self.path, "".join(kept).encode())

    def losses(self) -> list[tuple[int, float]]:
        """``(step, loss)`` of the training records in step order; a step logged twice (by a
        resumed run) counts once, its last line."""
        losses: dict[int, float] = {}
        for record in self.records():
            if isinstance(record.get("loss"), int | float):
                losses[int(record.get("step", 0))] = float(record["loss"])
        return sorted(losses.items())
