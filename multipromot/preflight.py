"""Checks before training: every input a command will read, refused in one line before any
model is built (``run``, ``stage1``, ``stage2`` and ``eval`` call :func:`preflight`).

Config values are checked by :mod:`multipromot.config` when loading; this module checks what
needs the files: the output and bank folders, every mixture a command trains on (task names
the bank accepts, the splits it needs, the templates on each task's first rows) and the eval
suite (its tasks, and enough train rows for the exemplars asked).
"""

from __future__ import annotations

import sys
from pathlib import Path

from multipromot.bank import PromptBank
from multipromot.bank.entry import definition_fingerprint, validate_task_name
from multipromot.config import RunConfig, bank_dir, resolve_path
from multipromot.data.collate import Collator
from multipromot.data.exemplars import shots_kept
from multipromot.data.mixtures import load_mixture
from multipromot.errors import UserError
from multipromot.eval.suite_file import EVAL_MAX_INPUT_LENGTH, load_suite
from multipromot.methods import MIN_SHOTS_KEPT, method_kind
from multipromot.train import sdft
from multipromot.train.common import check_trackers, use_data_mirror
from multipromot.train.stage2 import resolve_shots

__all__ = ["preflight", "check_shots"]

_PREFLIGHT_ROWS = 8  # rows rendered per task and split: a template that fails on data fails now
_SHOTS_ROWS = 16  # k-shot inputs measured per task and shots setting


def preflight(cfg: RunConfig, methods: list | None = None, *, command: str = "run") -> None:
    """Check everything a command will read before it trains anything: the output and bank
    folders, every mixture it trains on (tasks, names the bank accepts, splits, the templates
    on the first rows), the eval suite (its tasks, and enough train rows for the exemplars).

    Args:
        cfg: the run config.
        methods: the methods of ``run`` (:class:`multipromot.methods.Method`); ignored by
            the other commands.
        command: ``run``, ``stage1``, ``stage2`` or ``eval``.

    Raises:
        UserError: the first bad input, in one line naming its file and key.
    """
    where = cfg.config_file or None
    use_data_mirror(cfg)  # before any task loads its data
    for key, value in (("out_dir", cfg.out_dir), ("bank.dir", cfg.bank.dir)):
        if Path(value).exists() and not Path(value).is_dir():
            raise UserError(f"{value} is a file, not a folder", file=where, key=key)
    if command != "eval":  # a tracker asked for but not installed fails here, not mid-run
        check_trackers(cfg.log.to, file=where)
    methods = (methods or []) if command == "run" else []
    if command == "stage1" or any(m.spec.stage1 == "prompts" for m in methods):
        _check_mixture(cfg, cfg.stage1.mixture, ("train", "validation"))
    if command == "stage2":
        _check_mixture(cfg, cfg.stage2.mixture, ("train", "validation"))
        adapters = resolve_path(cfg, cfg.lora.adapters)
        kind = method_kind(cfg.stage2.mode, file=where)
        if kind.targets == "self_distilled":
            mixture = load_mixture(resolve_path(cfg, cfg.stage2.mixture))
            _check_sdft(cfg, mixture, "stage 2", "stage2.mode")
        if kind.stage1 == "adapters" and not (adapters and Path(adapters).is_dir()):
            raise UserError(
                f"must name the folder of the task adapters {kind.name}'s stage 2 starts from",
                file=where,
                key="lora.adapters",
            )
    lora_methods = [m for m in methods if m.spec.stage1 == "adapters"]
    if lora_methods:
        _check_mixture(cfg, cfg.stage1.mixture, ("train", "validation"))
        _check_adapter_tasks(cfg, lora_methods)
    for method in methods:
        splits = ("train", "validation", "test") if method.trains else ("test",)
        _check_mixture(cfg, method.mixture, splits)
        if method.spec.targets == "self_distilled":
            _check_sdft(cfg, load_mixture(method.mixture), f"method {method.label!r}", "methods")
    if command == "eval":
        _check_mixture(cfg, cfg.stage2.mixture, ("test",))
    if command in ("run", "eval"):
        _check_suite(cfg)
    _check_definitions(cfg, methods, command)


def _check_sdft(cfg: RunConfig, mixture, what: str, key: str) -> None:
    """sdft judges each rewrite by its task's per-item score: every task needs one."""
    try:
        sdft.check_tasks(mixture.tasks)
    except UserError as e:
        raise UserError(f"{what}: {e.message}", file=cfg.config_file or None, key=key) from None


def _check_mixture(cfg: RunConfig, value: str, splits) -> None:
    mixture = load_mixture(resolve_path(cfg, value))
    for task in mixture.replayed:  # replay draws train rows only
        _check_rows(task, "train", mixture.file)
    for task in mixture.tasks:
        try:
            validate_task_name(task.name)
        except UserError as e:
            raise UserError(
                f"task {task.name[:40]!r}...: {e.message}"
                if len(task.name) > 40
                else f"task {task.name!r}: {e.message}",
                file=mixture.file,
                key="tasks",
            ) from None
        for split in splits:
            _check_rows(task, split, mixture.file)


def _check_definitions(cfg: RunConfig, methods: list, command: str) -> None:
    """A prompt is tuned for one definition of its task: refuse a stage-2 mixture whose task
    of that name is defined otherwise (an inline task of the same name with other data or
    template) than the stage-1 mixture's, or than the bank entry stage 2 would read."""
    if command == "stage2":
        if method_kind(cfg.stage2.mode, file=cfg.config_file or None).prompts == "bank":
            _check_against_bank(cfg, load_mixture(resolve_path(cfg, cfg.stage2.mixture)))
        return
    prompted = [m for m in methods if m.made.spec.prompts == "bank"]
    if not prompted:
        return
    tuned = {}
    if any(m.spec.stage1 == "prompts" for m in methods):
        stage1 = load_mixture(resolve_path(cfg, cfg.stage1.mixture))
        tuned = {t.name: (t, stage1.file) for t in stage1.tasks}
    for method in prompted:
        mixture = load_mixture(method.mixture)
        for task in mixture.tasks:
            if task.name not in tuned:
                continue
            other, where = tuned[task.name]
            if definition_fingerprint(other) != definition_fingerprint(task):
                raise UserError(
                    f"method {method.label!r} fine-tunes task {task.name!r} as {mixture.file} "
                    f"defines it, but stage 1 tunes its prompt for the definition in {where} "
                    "(another source, template or answer choices); give one of them another "
                    "name",
                    file=cfg.config_file or None,
                    key="methods",
                )
        _check_against_bank(cfg, mixture, skip=set(tuned))


def _check_against_bank(cfg: RunConfig, mixture, skip: set[str] = frozenset()) -> None:
    """The bank's current entries (what stage 2 reads for tasks stage 1 does not tune) must be
    tuned for the mixture's definitions of their tasks."""
    folder = Path(bank_dir(cfg))
    if not folder.is_dir():
        return  # stage 2 says which entry is missing
    bank = PromptBank(folder)
    present = set(bank.tasks())
    refs = {t.name: t.name for t in mixture.tasks if t.name in present and t.name not in skip}
    bank.check_definitions(refs, mixture.tasks)


def _check_adapter_tasks(cfg: RunConfig, methods: list) -> None:
    """A kind that starts from stage-1 adapters needs one for every task it fine-tunes."""
    trained = set(load_mixture(resolve_path(cfg, cfg.stage1.mixture)).task_names)
    for method in methods:
        missing = sorted(set(load_mixture(method.mixture).task_names) - trained)
        if missing:
            raise UserError(
                f"method {method.label!r} fine-tunes {', '.join(missing)}, which "
                "stage1.mixture trains no adapter for",
                file=cfg.config_file or None,
                key="methods",
            )


def _check_rows(task, split: str, file) -> None:
    rows = task.examples(split)
    if not len(rows):
        raise UserError(f"task {task.name!r} has no {split} examples", file=file, key=task.name)
    targets = [task.render(rows[i])[1] for i in range(min(_PREFLIGHT_ROWS, len(rows)))]
    if not any(targets):
        raise UserError(
            f"task {task.name!r}: its template renders an empty target on the first "
            f"{len(targets)} {split} rows (a field that is empty, or missing with a default): "
            "nothing to learn or score",
            file=file,
            key=task.name,
        )


def _check_suite(cfg: RunConfig) -> None:
    where = cfg.config_file or None
    if not cfg.eval.suite:
        raise UserError(
            "is not set: name an evaluation suite (eval/*.yaml)", file=where, key="eval.suite"
        )
    suite = load_suite(resolve_path(cfg, cfg.eval.suite))
    shots = max(cfg.eval.shots or suite.shots or [0])
    for entry in suite.tasks:
        task = entry.resolve()
        _check_rows(task, suite.split, suite.file)
        pool = len(task.examples("train")) if shots else 0
        if shots > pool:
            raise UserError(
                f"asks for {shots} exemplars, but task {task.name!r} of the suite has {pool} "
                "train examples to draw them from",
                file=where,
                key="eval.shots",
            )


def check_shots(cfg: RunConfig, methods: list, tokenizer, *, decoder_only: bool) -> None:
    """Measure the rendered k-shot inputs against their token budgets, before anything trains
    (the collator drops whole exemplars that do not fit, silently in the loop).

    Stage 2 of each method that trains with K > 0 shots (its label's ``+Kshot``, else
    ``stage2.shots``, else its mixture's header): every task's first train inputs within
    ``stage2.max_input_length``; below :data:`MIN_SHOTS_KEPT` x K kept on average it is
    refused, below K it is said. The suite's k-shot settings within the evaluation's budget:
    said (the results record the exemplars each scored input kept).

    Raises:
        UserError: naming the method, the task, K and the budget.
    """
    where = cfg.config_file or None
    s2 = cfg.stage2
    train = Collator(
        tokenizer,
        decoder_only=decoder_only,
        max_input_length=s2.max_input_length,
        max_target_length=s2.max_target_length,
    )
    for method in methods:
        if not method.trains:
            continue
        mixture = load_mixture(method.mixture)
        asked = method.shots if method.shots is not None else s2.shots
        label = method.label if method.shots is not None else None
        shots, decided = resolve_shots(asked, mixture, label=label)
        _, per_task = mixture.stream_rows([-1] * len(mixture.tasks), shots)
        for i, (task, k) in enumerate(zip(mixture.stream().tasks, per_task, strict=True)):
            if not k:
                continue
            replayed = i >= len(mixture.tasks)
            kept = shots_kept(task, train, k, seed=mixture.exemplar_seed, examples=_SHOTS_ROWS)
            what = (
                f"method {method.label!r} trains {k}-shot "
                f"({'replay.shots of ' + str(mixture.file) if replayed else decided}), but "
                f"{'replay ' if replayed else ''}task {task.name!r}'s {k}-shot inputs keep "
                f"{kept:.2f} exemplars on average within "
                f"stage2.max_input_length={s2.max_input_length} tokens"
            )
            if kept < MIN_SHOTS_KEPT * k:
                raise UserError(
                    f"{what}; ask for fewer shots or raise stage2.max_input_length",
                    file=where,
                    key="methods"
                    if method.shots is not None and not replayed
                    else "stage2.max_input_length",
                )
            if kept < k:
                print(f"warning: {what}; the rest are dropped", file=sys.stderr)
    _warn_eval_shots(cfg, tokenizer, decoder_only)


def _warn_eval_shots(cfg: RunConfig, tokenizer, decoder_only: bool) -> None:
    """Say which suite tasks' k-shot inputs lose exemplars to the evaluation's budget."""
    if not cfg.eval.suite:
        return
    suite = load_suite(resolve_path(cfg, cfg.eval.suite))
    collator = Collator(
        tokenizer,
        decoder_only=decoder_only,
        max_input_length=EVAL_MAX_INPUT_LENGTH,
        for_generation=True,
    )
    for k in [k for k in (cfg.eval.shots or suite.shots) if k > 0]:
        for task in suite.resolved_tasks():
            kept = shots_kept(
                task, collator, k, split=suite.split, seed=cfg.seed, examples=_SHOTS_ROWS
            )
            if kept < k:
                print(
                    f"warning: suite task {task.name!r} {k}-shot: its inputs keep {kept:.2f} of "
                    f"{k} exemplars on average within the evaluation's "
                    f"{EVAL_MAX_INPUT_LENGTH}-token budget (results record exemplars_kept)",
                    file=sys.stderr,
                )
