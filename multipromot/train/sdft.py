"""Self-distilled targets (method ``sdft``): before stage 2, the base model rewrites each
training target, and stage 2 fine-tunes on the rewrites it got right.

SDFT ("Self-Distillation Bridges Distribution Gap in Language Model Fine-Tuning", Yang et al.,
ACL 2024) trains on the model's own phrasing of each answer, so fine-tuning moves the model
less far from what it already says. Here:

- **The rewrite prompt.** The example itself is shown as the one demonstration, then its input
  (1-shot: ``input TARGET_DELIMITER target SEPARATOR input``, built by the one item builder with
  ``exemplar_indices=[index]``); the base model (no prompt) continues it greedily, at most
  ``stage2.max_target_length`` new tokens, and the output is post-processed as the task's
  scoring does (``Task.postprocess``).
- **Kept where correct.** A rewrite replaces its target when its per-item score under the
  task's metric (:func:`multipromot.data.metrics.item_scores`) against the original target
  (and the task's other references) is at least ``sdft.threshold`` (100 by default: correct);
  otherwise the original target stays. A task whose metric has no per-item score (a registered
  metric) is refused before training (:func:`check_tasks`).
- **Only the rows stage 2 can draw.** The first ``steps x batch_size`` positions of stage 2's
  one global stream (the same for any number of ranks), and for k-shot training their
  exemplars; other train rows keep their targets (stage 2 never sees them). Replay rows are
  general data, never rewritten.
- **Cached by provenance.** ``<sdft.cache>/<digest>/`` holds ``made_from.json`` (what the set
  was made from: the base model's fingerprint, the rewrite prompt, the tasks' data fingerprint,
  the rows, the generation budget, the threshold; and what happened: rows rewritten, kept and
  changed per task, seconds) and one ``<task>.jsonl`` per task (index, original, rewrite,
  score, kept). A folder whose record equals the current provenance is reused; it is written
  into a temporary sibling and published in one rename.

The stage-2 task is the same task with those train rows retargeted
(:func:`multipromot.data.tasks.with_targets`): its validation split, inputs, metric and answer
set are the task's own, so selection and scoring see the original data.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from multipromot.config import RunConfig, model_seed, resolve_path
from multipromot.data.collate import Collator
from multipromot.data.exemplars import build_item, choose_exemplars
from multipromot.data.metrics import item_scores, postprocess, scores_items
from multipromot.data.mixtures import Mixture, tasks_fingerprint
from multipromot.data.sampler import MixtureSampler
from multipromot.data.tasks import with_targets
from multipromot.errors import UserError
from multipromot.eval.generation import predict
from multipromot.features import SEPARATOR, TARGET_DELIMITER
from multipromot.fsio import json_sha256, publish_dir, temp_dir_for, write_atomic, write_json
from multipromot.models import load_model, model_fingerprint, read_lineage
from multipromot.soft_prompt import PromptedModel
from multipromot.train import distributed as D

__all__ = [
    "PROMPT",
    "RECORD",
    "check_tasks",
    "drawable_rows",
    "distilled",
    "settings",
    "cache_folder",
]

# The rewrite prompt's form, part of the provenance: changing it makes every cached set stale.
PROMPT = {
    "form": "1-shot: the example itself as the demonstration, then its input",
    "separator": SEPARATOR,
    "target_delimiter": TARGET_DELIMITER,
    "decoding": "greedy",
    "output": "post-processed by the task's rule",
}
RECORD = "made_from.json"
_BATCH = 32  # rows per generate call: fixed, so the rewrite is a function of its provenance


def settings(cfg: RunConfig) -> dict:
    """The ``sdft.*`` keys that shape the weights (the cache folder does not)."""
    return {"threshold": cfg.sdft.threshold}


def cache_folder(cfg: RunConfig) -> Path:
    """The folder of rewritten target sets: ``sdft.cache``, else ``<out_dir>/sdft_targets``."""
    if cfg.sdft.cache:
        return Path(resolve_path(cfg, cfg.sdft.cache))
    return Path(cfg.out_dir) / "sdft_targets"


def check_tasks(tasks: Sequence, *, file=None, key: str = "stage2.mode") -> None:
    """Refuse a task whose metric gives no item a score of its own: no rewrite could be judged.

    Raises:
        UserError: naming the task and its metric.
    """
    for task in tasks:
        if not scores_items(task.metric):
            raise UserError(
                f"sdft keeps a rewritten target only where it scores as correct, but task "
                f"{task.name!r}'s metric {task.metric!r} gives no per-item score (a registered "
                "metric; the built-in ones do)",
                file=file,
                key=key,
            )


def drawable_rows(
    mixture: Mixture, *, seed: int, draws: int, shots: int, exemplar_seed: int
) -> dict[str, list[int]]:
    """Per fine-tuned task, the train rows stage 2 can draw in ``draws`` positions of its
    stream (``mixture.stream()``, seed ``seed``), with their exemplars when ``shots`` > 0."""
    stream = mixture.stream()
    own = len(mixture.tasks)
    rows: dict[int, set[int]] = {i: set() for i in range(own)}
    for draw in MixtureSampler(stream, seed=seed).take(draws):
        if draw.task_index < own:
            rows[draw.task_index].add(draw.example_index)
    for t, indices in rows.items():
        task = mixture.tasks[t]
        for index in list(indices):
            indices.update(choose_exemplars(task, index, shots, exemplar_seed, "train"))
    return {mixture.tasks[t].name: sorted(indices) for t, indices in rows.items()}


def distilled(
    cfg: RunConfig, mixture: Mixture, shots: int, *, progress: bool = True
) -> tuple[Mixture, dict]:
    """``mixture`` with its tasks' drawable train rows retargeted to the base model's correct
    rewrites (made, or read from the cache), and what the rewrite did.

    Rank 0 alone makes a missing set (the other ranks wait for it, then read it).

    Returns:
        (the mixture stage 2 trains on, ``{"folder", "seconds", "reused", "threshold",
        "tasks": {task: {"rows", "kept", "changed", "share_kept", "share_changed"}}}``).
    """
    check_tasks(mixture.tasks, file=cfg.config_file or None)
    rows = drawable_rows(
        mixture,
        seed=cfg.seed,
        draws=cfg.stage2.steps * cfg.stage2.batch_size,
        shots=shots,
        exemplar_seed=mixture.exemplar_seed,
    )
    folder, stats = D.on_rank0(_made, cfg, mixture, rows, progress)
    targets = _read_targets(Path(folder), mixture)
    tasks = [with_targets(task, targets[task.name]) for task in mixture.tasks]
    retargeted = dataclasses.replace(mixture, tasks=tasks)
    return retargeted, stats


def _made(cfg: RunConfig, mixture: Mixture, rows: dict[str, list[int]], progress: bool):
    """The cached set for this provenance (made now if missing): (folder, statistics)."""
    model, tokenizer, path = load_model(cfg.model, seed=model_seed(cfg))
    lineage = read_lineage(path) if Path(path).is_dir() else {}
    provenance = {
        "base_model": {
            "name": str(path),
            "fingerprint": lineage.get("fingerprint") or model_fingerprint(model),
        },
        "prompt": PROMPT,
        "data": tasks_fingerprint(mixture.tasks),
        "rows": json_sha256(rows),
        "max_new_tokens": cfg.stage2.max_target_length,
        "max_input_length": cfg.stage2.max_input_length,
        "threshold": cfg.sdft.threshold,
    }
    digest = json_sha256(provenance)
    folder = cache_folder(cfg) / digest[:16]
    saved = _read_record(folder)
    if saved is not None and saved.get("made_from") == provenance:
        del model
        stats = {**saved["statistics"], "folder": str(folder), "reused": True}
        if progress:
            print(f"sdft: reusing the rewritten targets in {folder}")
        return str(folder), stats
    started = time.monotonic()
    model.eval()
    prompted = PromptedModel(model).to(D.device())
    collator = Collator(
        tokenizer,
        decoder_only=not prompted.is_encoder_decoder,
        max_input_length=cfg.stage2.max_input_length,
        for_generation=True,
    )
    tmp = temp_dir_for(folder)
    try:
        per_task = {}
        for task in mixture.tasks:
            per_task[task.name] = _rewrite_task(
                prompted, tokenizer, collator, task, rows[task.name], cfg, tmp / task.name
            )
            if progress:
                s = per_task[task.name]
                print(
                    f"sdft: {task.name}: {s['rows']} train targets rewritten by the base "
                    f"model, {s['kept']} kept ({s['share_kept']:.1f}%), {s['changed']} of "
                    "them differ from the original"
                )
        stats = {
            "threshold": cfg.sdft.threshold,
            "seconds": round(time.monotonic() - started, 1),
            "tasks": per_task,
        }
        write_json(tmp / RECORD, {"made_from": provenance, "statistics": stats}, indent=1)
        publish_dir(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # left only when the set was not published
        del prompted, model
        gc.collect()
    if progress:
        print(f"sdft: {sum(s['rows'] for s in per_task.values())} targets in {stats['seconds']} s")
    return str(folder), {**stats, "folder": str(folder), "reused": False}


def _rewrite_task(
    prompted, tokenizer, collator, task, indices: list[int], cfg: RunConfig, stem: Path
) -> dict:
    """Rewrite ``task``'s train rows ``indices``; one line per row to ``<stem>.jsonl``."""
    items = [build_item(task, i, split="train", exemplar_indices=[i]) for i in indices]
    outputs = predict(
        prompted,
        tokenizer,
        items,
        collator,
        batch_size=_BATCH,
        max_new_tokens=cfg.stage2.max_target_length,
    )
    rewrites = [postprocess(text, task.postprocess) for text in outputs]
    golds = [item.gold for item in items]
    scores = item_scores(task.metric, rewrites, golds) if items else []
    lines, kept, changed = [], 0, 0
    for index, item, rewrite, value in zip(indices, items, rewrites, scores, strict=True):
        keep = value >= cfg.sdft.threshold and rewrite != ""
        kept += keep
        changed += keep and rewrite != item.target
        row = {"index": index, "original": item.target, "rewrite": rewrite, "score": value}
        lines.append(json.dumps({**row, "kept": bool(keep)}, ensure_ascii=False))
    write_atomic(stem.with_name(f"{stem.name}.jsonl"), "".join(f"{x}\n" for x in lines).encode())
    n = len(indices)
    return {
        "rows": n,
        "train_rows": len(task.examples("train")),
        "kept": int(kept),
        "changed": int(changed),
        "share_kept": 100.0 * kept / n if n else 0.0,
        "share_changed": 100.0 * changed / n if n else 0.0,
    }


def _read_record(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "statistics" in data else None


def _read_targets(folder: Path, mixture: Mixture) -> dict[str, dict[int, str]]:
    """Per task, train row -> its kept rewrite (rows whose rewrite was not kept are absent)."""
    targets: dict[str, dict[int, str]] = {}
    for task in mixture.tasks:
        path = folder / f"{task.name}.jsonl"
        kept = {}
        try:
            for line in path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                if row["kept"]:
                    kept[int(row["index"])] = row["rewrite"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"unreadable rewritten targets ({e}); delete the folder", file=path
            ) from None
        targets[task.name] = kept
    return targets
