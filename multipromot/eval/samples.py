"""``samples.jsonl``: every scored item of an evaluation, one JSON object per line, and its one
owner. Everything statistical (intervals, paired differences, sweeps) is computed from these
lines, never from the summaries.

A line::

    {"method", "step", "selected", "task", "shots", "id" (the item's index in its split),
     "input_sha256" (of the k-shot input as the model read it), "output" (raw), "prediction"
     (post-processed), "references", "prompt" (the bank task whose prompt the row got, or null),
     "value" (the item's contribution to the task's score: [score] for a per-item mean such as
     accuracy, BLEU's n-gram counts for corpus BLEU; see data.metrics.ItemScores),
     "specialized", "target_language", "input_copy" (unseen tasks' per-item flags, or null
     where not measured; eval.specialization)}

Evaluation records carry their items under ``items`` until :func:`write_samples` moves them
here; :func:`read_samples` gives them back grouped by (method, step, task, shots).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from multipromot.fsio import sha256_file, write_atomic

__all__ = ["SAMPLES_FILE", "write_samples", "read_samples", "samples_digest", "input_digest"]

SAMPLES_FILE = "samples.jsonl"
_KEYS = ("method", "step", "selected", "task", "shots")


def input_digest(text: str) -> str:
    """The sha256 of a model input (an item's identity across methods, seeds and runs)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_samples(path: str | os.PathLike, records: Iterable[dict]) -> list[dict]:
    """Write the ``items`` of every record to ``path`` (atomically) and return the records
    without them (the summaries that eval.json and results.json keep)."""
    lines, summaries = [], []
    for record in records:
        items = record.get("items") or []
        head = {key: record.get(key) for key in _KEYS}
        lines += [json.dumps({**head, **item}) + "\n" for item in items]
        summaries.append({k: v for k, v in record.items() if k != "items"})
    write_atomic(Path(path), "".join(lines).encode("utf-8"))
    return summaries


def samples_digest(path: str | os.PathLike) -> str | None:
    """The sha256 of a samples file (None when it is missing): what a record of the scores keeps,
    so that scores are reused only with the very items they were computed from."""
    path = Path(path)
    return sha256_file(path) if path.is_file() else None


def read_samples(path: str | os.PathLike) -> dict[tuple, list[dict]]:
    """The items of a samples file by ``(method, step, task, shots)``, in file order.

    Raises:
        ValueError: a line that is not a JSON object with those keys (the file is written whole
            and atomically, so this is damage, not a cut).
    """
    grouped: dict[tuple, list[dict]] = {}
    text = Path(path).read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), 1):
        try:
            item = json.loads(line)
            key = (item["method"], item["step"], item["task"], item["shots"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: line {number} is not a sample ({e})") from None
        grouped.setdefault(key, []).append(item)
    return grouped
