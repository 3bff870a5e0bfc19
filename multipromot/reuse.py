"""What each piece of a ``run`` was made from, and whether a stored piece may be reused.

A run folder keeps one record per finished piece, each written and read only here:

- ``stage1.json``: ``{"entries": [bank refs], "made_from": ...}`` (this run's stage-1 prompts);
- ``stage1_lora.json``: ``{"made_from", "files", "best"}`` (promot_lora's stage-1 adapters);
- ``methods/<label>/made_from.json``: the stage-2 model's record (its checkpoints and
  ``final/`` are of these settings);
- ``methods/<label>/eval.json``: ``{"made_from", "records"}`` (the method's scores).

A ``made_from`` record holds the model, the seed, the config keys that change the piece, the
bank refs it used and a fingerprint of the data. A piece is reused only when its stored record
equals the one the current config gives; otherwise ``reuse: redo`` (the default) does that
piece again and ``reuse: strict`` stops with one line naming what changed.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from multipromot.bank import PromptBank
from multipromot.config import RunConfig, bank_dir, model_seed, resolve_path
from multipromot.data.mixtures import load_mixture, mixture_fingerprint, tasks_fingerprint
from multipromot.errors import UserError
from multipromot.eval.suite_file import load_suite
from multipromot.fsio import write_json
from multipromot.method_eval import method_shots
from multipromot.methods import Method
from multipromot.train.stage2_model import kind_settings

__all__ = [
    "read_record",
    "write_record",
    "changes",
    "check_stale",
    "train_record",
    "eval_record",
    "current_refs",
    "NOT_RESULT_STAGE2",
]

# stage2.* keys that do not change the trained model
NOT_RESULT_STAGE2 = ("log_every", "resume")


def read_record(path: Path) -> dict | None:
    """A piece's JSON record, or None when it is missing, truncated or not a JSON object (the
    piece is then redone)."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_record(path: Path, record: dict) -> None:
    """Write a piece's record atomically (after the piece itself is complete)."""
    write_json(path, record)


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        flat = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def changes(old: dict | None, new: dict) -> str:
    """What differs between a stored ``made_from`` record and the current one, in words ("" when
    equal)."""
    if old is None:
        return "no record of what it was made from (unreadable, or from an older multipromot)"
    if old == new:
        return ""
    a, b = _flatten(old), _flatten(new)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    # a setting that changed says most: it goes before what follows from it (other weights)
    keys.sort(key=lambda k: _describe(k, a, b) is not None)
    shown = []
    for key in keys[:3]:
        described = _describe(key, a, b)
        if described is None:
            described = f"{key} {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}"
        shown.append(described)
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return ", ".join(shown) + more


def _describe(key: str, a: dict, b: dict) -> str | None:
    """Words for a changed key whose values are digests (None: show the values)."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] == "bank_sha256":
        task, prefix = parts[-1], ".".join(parts[:-2])
        refs_key = f"{prefix}.bank_refs.{task}" if prefix else f"bank_refs.{task}"
        ref = b.get(refs_key) or a.get(refs_key) or task
        return (
            f"{key} (the prompt {ref} holds other content than before: the bank was recreated "
            "or the entry replaced)"
        )
    last = parts[-1]
    if last == "fingerprint":
        return f"{key} (other weights: the model it was made from was trained again)"
    if last == "files" and "adapters" in parts:
        return f"{key} (the stage-1 adapter files changed)"
    if last in ("data", "tasks"):
        return f"{key} (the data files, templates or rates)"
    return None


def check_stale(cfg: RunConfig, path: Path, what: str, changed: str) -> None:
    """A stored piece does not match the config: stop (``reuse=strict``) or say it is redone.

    Raises:
        UserError: under ``reuse=strict``.
    """
    if cfg.reuse == "strict":
        raise UserError(
            f"was made from other settings: {changed}; use another out_dir, or reuse=redo to "
            "redo it",
            file=path,
            key="reuse",
        )
    print(f"{what}: made from other settings ({changed}); doing it again")


def current_refs(cfg: RunConfig, tasks: list[str], stage1_refs: dict) -> tuple[dict, dict]:
    """The bank refs a method's prompts come from now (this run's stage 1, else the bank's
    current entry: what stage 2 reads) and their content: ``(task -> ref, task -> sha256)``.
    Records keep both, so a ref that names another prompt than before (a recreated bank
    repeats ``rte@v0001``) is a change, not a match."""
    bank = PromptBank(bank_dir(cfg))
    refs, content = {}, {}
    for task in tasks:
        try:
            entry = bank.get(stage1_refs.get(task) or task)
        except UserError:
            refs[task] = content[task] = None  # stage 2 or the evaluation will say so
            continue
        refs[task], content[task] = entry.ref, str(entry.meta["sha256"])
    return refs, content


def train_record(
    cfg: RunConfig, method: Method, stage2: dict, stage1_refs: dict, adapters: dict | None = None
) -> dict:
    """What a method's stage-2 model is made from.

    Args:
        cfg: the run config.
        method: the method (a kind that trains).
        stage2: the ``stage2.*`` keys it trains with (after the label's ``+Kshot``).
        stage1_refs: task -> ref of this run's stage-1 prompts.
        adapters: a ``per_task`` kind's stage-1 adapters (their record and files).
    """
    s2 = {k: v for k, v in stage2.items() if k not in NOT_RESULT_STAGE2}
    mixture = load_mixture(method.mixture)
    record = {
        "model": cfg.model,
        "seed": cfg.seed,
        "model_seed": model_seed(cfg),
        "stage2": s2,
        "data": mixture_fingerprint(mixture),
    }
    spec = method.spec
    if spec.prompts == "bank":  # it starts from the bank's prompts
        record["bank_dir"] = bank_dir(cfg)
        record["bank_refs"], record["bank_sha256"] = current_refs(
            cfg, mixture.task_names, stage1_refs
        )
    record.update(kind_settings(cfg, spec))
    if spec.adapters == "per_task":
        record["adapters"] = {"made_from": adapters["made_from"], "files": adapters["files"]}
    return record


def eval_record(cfg: RunConfig, method: Method, trained: dict | None, stage1_refs: dict) -> dict:
    """What a method's scores are made from: its model (``trained``, or the base model), the
    ``eval.*`` settings, the suite's and the fine-tuned tasks' data, and, for the kinds that
    score the base model with this run's prompts, those prompts."""
    mixture = load_mixture(method.mixture)
    suite_path = resolve_path(cfg, cfg.eval.suite)
    suite = load_suite(suite_path)
    record = {
        "trained": trained,
        "model": cfg.model,
        "seed": cfg.seed,
        "model_seed": model_seed(cfg),
        # eval.compare only chooses which differences the report shows: not what was scored
        "eval": {k: v for k, v in asdict(cfg.eval).items() if k != "compare"},
        # the exemplars its fine-tuned tasks are scored with (stage2.shots, the label, the header)
        "finetuned_shots": method_shots(cfg, method, mixture),
        "suite": {
            "file": str(Path(suite_path).resolve()),
            "shots": list(suite.shots),
            "examples": suite.examples,
            "split": suite.split,
            "tasks": tasks_fingerprint(suite.resolved_tasks()),
        },
        "data": mixture_fingerprint(mixture),
    }
    if method.spec.weights == "base" and method.spec.prompts == "bank":
        record["bank_dir"] = bank_dir(cfg)
        record["bank_refs"], record["bank_sha256"] = current_refs(
            cfg, mixture.task_names, stage1_refs
        )
    return record
