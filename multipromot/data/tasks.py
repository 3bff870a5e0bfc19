"""Tasks: a name, a source of raw examples, a template, a metric (seqio's Task, in small).

A task is what a mixture mixes and what owns one prompt of the bank. It keeps strings apart
from tensors: ``examples(split)`` gives raw dicts, ``render(example)`` the ``(input, target)``
strings; only the collator tokenizes.

Tasks come from three places:

- the catalogue (``multipromot/catalogue/*.yaml``: the paper's tasks, the lab tasks), loaded
  lazily by :func:`get_task`;
- inline specs in a mixture YAML, parsed by :func:`task_from_spec`;
- Python: ``register_task(Task(...))``.

A task's ``splits`` maps the split names the framework asks for (``train``, ``validation``,
``test``) to the source's own names, e.g. ``{test: validation}`` for SuperGLUE, whose test
labels are hidden.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import os
import re
import sys
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from multipromot.data.catalogue import catalogue_index
from multipromot.data.metrics import check_metric, check_postprocessor
from multipromot.data.sources import (
    FileSource,
    FilteredSource,
    HubSource,
    Source,
    Subset,
    source_from_spec,
)
from multipromot.data.templates import FormatSignature, Template, compile_value, load_template
from multipromot.errors import UserError
from multipromot.registry import Registry
from multipromot.yamlio import check_keys, sub_key

_log = logging.getLogger(__name__)

__all__ = [
    "METRICS",
    "POSTPROCESSORS",
    "TASK_KEYS",
    "Task",
    "default_postprocess",
    "task_from_spec",
    "check_inline_name",
    "with_splits",
    "with_targets",
    "RetargetedTask",
    "register_task",
    "get_task",
    "list_tasks",
    "reset_registry",
]

# The paper's metrics and metrics.py's post-processing rules; both registries can grow
# (metrics.register_metric / register_postprocessor), so other names are checked there.
METRICS = ("accuracy", "exact_match", "triviaqa_exact_match", "bleu", "rouge2")
POSTPROCESSORS = ("none", "prefix", "first_line", "first_word")
TASK_KEYS = (
    "name",
    "source",
    "template",
    "metric",
    "postprocess",
    "splits",
    "description",
    "references",
)

# Task names become bank directories (prompt_bank/<task>/), so they must be safe path parts.
# A split a local source lacks is held out from its train rows: this share, at most this many.
HOLDOUT_FRACTION = 0.1
HOLDOUT_MAX = 1000
HOLDOUT_MIN_TRAIN = 20  # below this a missing split stays an error: too few rows to spare
HOLDOUT_SPLITS = ("validation", "test")  # carved in this order, disjoint from each other

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def default_postprocess(metric: str) -> str:
    """The post-processing a task gets when its spec names none.

    Args:
        metric: the task's metric.

    Returns:
        ``first_word`` for classification (``accuracy``), else ``prefix`` (the paper's rule:
        cut the output where the next example's prefix starts).
    """
    return "first_word" if metric == "accuracy" else "prefix"


@dataclass(eq=False)
class Task:
    """One task: where its examples come from and how they become strings.

    Args:
        name: unique name (also the prompt-bank directory).
        source: where the raw examples come from.
        template: turns an example into ``(input, target)``.
        metric: ``accuracy``, ``exact_match``, ``bleu``, ``rouge2`` or a registered metric.
        postprocess: the name of the rule applied to generated text before scoring (see
            ``multipromot.data.metrics``); default: :func:`default_postprocess`.
        splits: framework split name -> source split name (missing names map to themselves).
        description: free text for listings.
        holdouts: split -> rows (an int) or share of train (a float < 1) held out from the
            train split, seeded by the task name: ``train`` then leaves those rows out, so
            training never sees them. Set for a local source that lacks the split, or by
            ``splits: {validation: {from: train, size: N}}``.
        references: a Jinja expression over an example giving every acceptable answer (a
            string or a list), e.g. ``answers`` (WebQuestions) or ``answer.aliases +
            answer.normalized_aliases`` (TriviaQA); metrics then count a match with any of
            them. None: the template's target is the one reference.
    """

    name: str
    source: Source
    template: Template
    metric: str
    postprocess: str | None = None
    splits: dict[str, str] = field(default_factory=dict)
    description: str = ""
    references: str | None = None
    holdouts: dict[str, int | float] = field(default_factory=dict)
    auto_holdouts: tuple[str, ...] = ()  # the holdouts added because the source lacks them
    _cache: dict[str, Sequence[dict]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.postprocess is None:
            self.postprocess = default_postprocess(self.metric)
        self.splits = dict(self.splits)
        self._reference_value = None
        if self.references:
            self._reference_value = compile_value(
                self.references, convert=_as_answers, key=f"{self.name}.references"
            )

    def reference_list(self, example: Mapping[str, Any]) -> list[str]:
        """Every acceptable answer of ``example`` ([] when the task names no ``references``:
        the rendered target is then the only one).

        Raises:
            UserError: the expression fails on the example or gives no strings.
        """
        if self._reference_value is None:
            return []
        answers = self._reference_value(example)
        if not answers or not all(isinstance(a, str) for a in answers):
            raise UserError(
                f"references {self.references!r} must give strings, got {answers!r}",
                key=f"{self.name}.references",
            )
        return list(dict.fromkeys(answers))  # in order, without repeats

    def source_split(self, split: str) -> str:
        """The source's name for a framework split.

        Args:
            split: ``train``, ``validation``, ``test`` or any other name.

        Returns:
            The mapped name.
        """
        return self.splits.get(split, split)

    def examples(self, split: str) -> Sequence[dict]:
        """The raw examples of a split, loaded once and cached.

        Args:
            split: a framework split name (mapped through ``splits``).

        Returns:
            A sequence of example dicts (supports ``len``, indexing and slicing).

        Raises:
            UserError: the source cannot load the split (the message names the task).
        """
        if split not in self._cache:
            try:
                if self.holdouts and split in ("train", *self.holdouts):
                    self._cache.update(self._carve())
                if split not in self._cache:  # (a hold-out dropped for a tiny train set too)
                    rows = self.source.load(self.source_split(split))
                    self._cache[split] = self._without_unlabelled(rows, split)
            except UserError as exc:
                raise UserError(
                    f"task {self.name!r}: {exc.message}", file=exc.file, key=exc.key or self.name
                ) from exc
        return self._cache[split]

    def _carve(self) -> dict[str, Sequence[dict]]:
        """Train and the held-out splits, disjoint, from the source's train rows.

        A permutation seeded by the task name picks the held-out rows (the same on every run,
        rank and machine); each split keeps the rows in file order.
        """
        rows = self._without_unlabelled(self.source.load(self.source_split("train")), "train")
        if len(rows) < HOLDOUT_MIN_TRAIN and self.auto_holdouts:
            self.holdouts = {s: v for s, v in self.holdouts.items() if s not in self.auto_holdouts}
            self.auto_holdouts = ()
            if not self.holdouts:
                return {"train": rows}
        order = np.random.default_rng([zlib.crc32(self.name.encode()), 0x401D]).permutation(
            len(rows)
        )
        out: dict[str, Sequence[dict]] = {}
        start = 0
        for split in sorted(self.holdouts, key=lambda s: (s not in HOLDOUT_SPLITS, s)):
            size = self.holdouts[split]
            count = int(size) if size >= 1 else min(HOLDOUT_MAX, max(1, round(size * len(rows))))
            picked = sorted(int(i) for i in order[start : start + count])
            start += count
            out[split] = Subset(rows, picked)
            print(
                f"{self.name}: {split!r} = {len(picked)} of {len(rows)} train rows held out "
                "(seeded; training never sees them)",
                file=sys.stderr,
            )
        if start >= len(rows):
            raise UserError(
                f"holding out {start} rows leaves no train rows (train has {len(rows)})",
                key=f"{self.name}.splits",
            )
        out["train"] = Subset(rows, sorted(int(i) for i in order[start:]))
        return out

    def split_origin(self, split: str) -> str:
        """Where a split's rows come from, for records: ``train (held out: 10%)`` or the
        source's split name."""
        if split in self.holdouts:
            size = self.holdouts[split]
            share = f"{size:.0%}" if size < 1 else f"{int(size)} rows"
            return f"held out from train ({share}, seeded)"
        return self.source_split(split)

    def shares_rows(self, a: str, b: str) -> bool:
        """Whether two framework splits are the same rows (SuperGLUE's ``test`` and
        ``validation`` both read the source's validation split); held-out splits are disjoint
        from every other split."""
        if a == b:
            return True
        if a in self.holdouts or b in self.holdouts:
            return False
        return self.source_split(a) == self.source_split(b)

    def _without_unlabelled(self, rows: Sequence[dict], split: str) -> Sequence[dict]:
        """Drop rows whose ``label`` is negative (SuperGLUE's and SNLI's -1, "no gold label")
        from a task with answer choices: ``answer_choices[-1]`` would train and score them as
        the last choice. The count goes to the log."""
        if self.template.answer_choices is None or not len(rows):
            return rows
        column = getattr(rows, "column", None)
        if column is not None:
            labels = column("label")
        else:
            labels = [row.get("label") if isinstance(row, Mapping) else None for row in rows]
        if labels is None:
            return rows
        keep = [i for i, v in enumerate(labels) if not (isinstance(v, numbers.Integral) and v < 0)]
        if len(keep) == len(rows):
            return rows
        _log.warning(
            "task %s: dropped %d of %d %s rows with a negative label (no gold label)",
            self.name,
            len(rows) - len(keep),
            len(rows),
            split,
        )
        return Subset(rows, keep)

    def num_examples(self, split: str) -> int:
        """Number of examples in a split.

        Args:
            split: a framework split name.

        Returns:
            The count.
        """
        return len(self.examples(split))

    def render(self, example: Mapping[str, Any]) -> tuple[str, str]:
        """The strings the model sees for one example.

        Args:
            example: a raw example of this task.

        Returns:
            ``(input, target)``.

        Raises:
            UserError: the template fails on the example (names the template and the field).
        """
        return self.template.apply(example)

    @property
    def answers(self) -> list[str] | None:
        """The fixed answer set (classification), or None when answers vary per example."""
        return self.template.answers()

    @property
    def signature(self) -> FormatSignature:
        """The task's input format, for the router."""
        return self.template.signature

    def clear_cache(self) -> None:
        """Drop the loaded splits (they are loaded again on the next ``examples`` call)."""
        self._cache.clear()


# The key under which a retargeted train row carries its replacement target (with_targets).
_TARGET_KEY = "__multipromot_target__"


class _Retargeted(Sequence[dict]):
    """A split's rows, those named in ``targets`` carrying their replacement target."""

    def __init__(self, rows: Sequence[dict], targets: Mapping[int, str]):
        self._rows = rows
        self._targets = targets

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        row = self._rows[index]
        target = self._targets.get(index % len(self._rows) if index < 0 else index)
        return row if target is None else {**row, _TARGET_KEY: target}


@dataclass(eq=False)
class RetargetedTask(Task):
    """A task whose train rows ``targets`` (index -> target) train on other targets than the
    template renders (SDFT's self-distilled ones); every other split, the inputs, the metric
    and the answer set stay the task's. Made by :func:`with_targets`."""

    targets: Mapping[int, str] = field(default_factory=dict)

    def examples(self, split: str) -> Sequence[dict]:
        rows = super().examples(split)
        return _Retargeted(rows, self.targets) if split == "train" and self.targets else rows

    def render(self, example: Mapping[str, Any]) -> tuple[str, str]:
        source, target = super().render(example)
        return (source, example[_TARGET_KEY]) if _TARGET_KEY in example else (source, target)


def with_targets(task: Task, targets: Mapping[int, str]) -> Task:
    """``task`` with the train rows named in ``targets`` (index into its train split ->
    target string) rendered with those targets instead of the template's.

    Returns:
        A new task of the same name and definition (it shares the loaded splits); ``task``
        itself is unchanged.
    """
    given = {f.name: getattr(task, f.name) for f in dataclasses.fields(task) if f.init}
    given.pop("targets", None)
    retargeted = RetargetedTask(**given, targets=dict(targets))
    retargeted._cache = task._cache  # the same rows: loaded once
    return retargeted


def _as_answers(value: Any) -> list:
    """A references expression's result as a list (a string is one answer)."""
    if isinstance(value, str):
        return [value]
    return list(value) if isinstance(value, list | tuple) else [value]


# -- parsing -----------------------------------------------------------------------------------


def _check_metric(metric: Any, *, file, key) -> str:
    if not isinstance(metric, str) or not metric:
        raise UserError(f"'metric' must be one of {', '.join(METRICS)}", file=file, key=key)
    return check_metric(metric, file=file, key=key)


def _check_postprocess(name: Any, *, file, key) -> str:
    if not isinstance(name, str) or not name:
        raise UserError(
            f"'postprocess' must be one of {', '.join(POSTPROCESSORS)}", file=file, key=key
        )
    return check_postprocessor(name, file=file, key=key)


def _check_splits(splits: Any, *, file, key) -> tuple[dict[str, str], dict[str, int | float]]:
    """``(renames, holdouts)``: a split maps to the source's split name, or to
    ``{from: train, size: N}`` (N rows, or a share of train when below 1)."""
    if not isinstance(splits, Mapping):
        raise UserError(
            "'splits' must map split names to the source's split names, e.g. {test: validation}",
            file=file,
            key=key,
        )
    renames: dict[str, str] = {}
    holdouts: dict[str, int | float] = {}
    for name, value in splits.items():
        where = sub_key(key, str(name))
        if not isinstance(name, str) or not name:
            raise UserError("split names must be non-empty strings", file=file, key=key)
        if isinstance(value, str) and value:
            renames[name] = value
            continue
        if not isinstance(value, Mapping) or set(value) != {"from", "size"}:
            raise UserError(
                "must be the source's split name or {from: train, size: N}", file=file, key=where
            )
        size = value["size"]
        if value["from"] != "train" or name == "train":
            raise UserError(
                "only splits other than train are held out, from train",
                file=file,
                key=f"{where}.from",
            )
        ok = isinstance(size, int | float) and not isinstance(size, bool)
        if not ok or not (0 < size < 1 or (size >= 1 and float(size).is_integer())):
            raise UserError(
                f"must be a number of rows (>= 1) or a share of train in (0, 1), got {size!r}",
                file=file,
                key=f"{where}.size",
            )
        holdouts[name] = int(size) if size >= 1 else float(size)
    return renames, holdouts


def task_from_spec(
    spec: Mapping[str, Any],
    *,
    file: str | os.PathLike | None = None,
    key: str | None = None,
    ignore: Iterable[str] = (),
) -> Task:
    """Parse an inline task (a mixture entry or a catalogue entry).

    Args:
        spec: ``{name, source, template, metric, postprocess?, splits?, description?}``;
            ``splits`` may also sit inside ``source``.
        file: the YAML file (relative file globs resolve against its directory).
        key: the spec's key in that file, e.g. ``tasks[2]``; errors name sub-keys such as
            ``tasks[2].template``.
        ignore: keys the caller handles itself (a mixture's ``rate``), skipped here.

    Returns:
        The task (not registered).

    Raises:
        UserError: a missing or unknown key, a value of the wrong type, or a bad source or
            template; the error names file and key.
    """
    if not isinstance(spec, Mapping):
        raise UserError("an inline task must be a mapping", file=file, key=key)
    skipped = set(ignore)
    given = {name: value for name, value in spec.items() if name not in skipped}
    check_keys(file, key, given, TASK_KEYS, what="a task")
    for name in ("name", "source", "template", "metric"):
        if name not in spec:
            raise UserError(f"a task needs {name!r}", file=file, key=sub_key(key, name))

    name = spec["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise UserError(
            f"task name {name!r} must be letters, digits, '_', '-' or '.' (it names a bank "
            "directory)",
            file=file,
            key=sub_key(key, "name"),
        )
    metric = _check_metric(spec["metric"], file=file, key=sub_key(key, "metric"))
    postprocess = None
    if spec.get("postprocess") is not None:
        postprocess = _check_postprocess(
            spec["postprocess"], file=file, key=sub_key(key, "postprocess")
        )
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise UserError(
            "'description' must be a string", file=file, key=sub_key(key, "description")
        )

    source_spec = spec["source"]
    splits: dict[str, str] = {}
    holdouts: dict[str, int | float] = {}
    if "splits" in spec:
        splits, holdouts = _check_splits(spec["splits"], file=file, key=sub_key(key, "splits"))
    if isinstance(source_spec, Mapping) and "splits" in source_spec:
        source_key = sub_key(sub_key(key, "source"), "splits")
        if "splits" in spec:
            raise UserError(
                "give 'splits' once: on the task or in its source", file=file, key=source_key
            )
        splits, holdouts = _check_splits(source_spec["splits"], file=file, key=source_key)
        source_spec = {k: v for k, v in source_spec.items() if k != "splits"}

    # The template first: it is the likelier typo, and checking it touches no file system.
    template = load_template(spec["template"], file=file, key=sub_key(key, "template"), id=name)
    source = source_from_spec(source_spec, file=file, key=sub_key(key, "source"))
    references = spec.get("references")
    if references is not None and (not isinstance(references, str) or not references.strip()):
        raise UserError(
            "'references' must be an expression over an example's fields (e.g. answers)",
            file=file,
            key=sub_key(key, "references"),
        )
    if references is not None:  # parse now: a typo is an error before any data is read
        compile_value(references, file=file, key=sub_key(key, "references"))
    local = source
    while isinstance(local, FilteredSource):
        local = local.source
    auto: list[str] = []
    if isinstance(local, FileSource) and "train" in local.files:
        # Local data is often one file: a stage that needs validation (stage 1, best-on-
        # target) or test (evaluation) gets a held-out share of train instead of an error.
        for split in HOLDOUT_SPLITS:
            if split not in local.files and split not in splits and split not in holdouts:
                holdouts[split] = HOLDOUT_FRACTION
                auto.append(split)
    return Task(
        name=name,
        source=source,
        template=template,
        metric=metric,
        postprocess=postprocess,
        splits=splits,
        description=description,
        references=references,
        holdouts=holdouts,
        auto_holdouts=tuple(auto),
    )


# -- registry ----------------------------------------------------------------------------------

_TASKS: Registry[Task] = Registry("task")
# Catalogue tasks built so far; kept apart so that registering a task shadows, not collides.
_BUILT: dict[str, Task] = {}


def register_task(task: Task, *, replace: bool = False) -> Task:
    """Make a task available by name (``- task: NAME`` in a mixture); it shadows a catalogue
    task of the same name.

    Args:
        task: the task.
        replace: allow replacing a task registered earlier under the same name.

    Returns:
        The task.

    Raises:
        UserError: another task is already registered under that name.
    """
    return _TASKS.register(task.name, task, replace=replace)


def get_task(name: str, *, file: str | os.PathLike | None = None, key: str | None = None) -> Task:
    """A registered task, or a catalogue task (built on first use, then kept).

    Args:
        name: the task name.
        file: where the name was written (for the error message).
        key: its key there, e.g. ``tasks[0].task``.

    Returns:
        The task.

    Raises:
        UserError: no such task (with close matches), or a bad catalogue entry.
    """
    if name in _TASKS:
        return _TASKS.lookup(name)
    if name in _BUILT:
        return _BUILT[name]
    index = catalogue_index()
    entry = index.get(name)
    if entry is None:
        raise _TASKS.unknown(name, file=file, key=key, also=index)
    task = task_from_spec(entry.spec, file=entry.file, key=entry.key)
    _BUILT[name] = task
    return task


def with_splits(
    task: Task, splits: Any, *, file: str | os.PathLike | None, key: str | None
) -> Task:
    """``task`` with some of its splits given another way (the form of an inline task's
    ``splits``): a mixture's catalogue entry may hold out the split that selects the stage-1
    prompt and the stage-2 step, e.g. ``{validation: {from: train, size: 250}}``, where the
    catalogue's validation split is also the scored one (SuperGLUE's test labels are hidden).

    Returns:
        A new Task (the catalogue's own instance is unchanged).

    Raises:
        UserError: a malformed ``splits`` (naming the file and key).
    """
    renames, holdouts = _check_splits(splits, file=file, key=key)
    given = set(renames) | set(holdouts)
    return dataclasses.replace(
        task,
        splits={**{s: v for s, v in task.splits.items() if s not in given}, **renames},
        holdouts={**{s: v for s, v in task.holdouts.items() if s not in given}, **holdouts},
        auto_holdouts=tuple(s for s in task.auto_holdouts if s not in given),
    )


def check_inline_name(name: str, *, file: str | os.PathLike | None, key: str | None) -> None:
    """Refuse an inline task that takes the name of a catalogue or registered task.

    The bank keys prompts by task name: an inline ``rte`` would fill the bank's ``rte``
    entries, and a later run on the catalogue's ``rte`` would train with that foreign prompt.

    Raises:
        UserError: naming both definitions.
    """
    if name in _TASKS:
        other = "a task registered from Python (register_task)"
    elif name in catalogue_index():
        entry = catalogue_index()[name]
        where = Path(entry.file)
        package = Path(__file__).resolve().parents[2]  # shown as multipromot/...yaml
        shown = where.relative_to(package) if where.is_relative_to(package) else where
        other = f"the catalogue task defined in {shown}: {entry.key}"
    else:
        return
    raise UserError(
        f"inline task {name!r} takes the name of {other}; give it another name (the prompt "
        "bank keys prompts by task name, so the two would share prompts)",
        file=file,
        key=sub_key(key, "name"),
    )


def list_tasks() -> list[str]:
    """Every task name :func:`get_task` accepts (registered and catalogue).

    Returns:
        Sorted names.
    """
    return sorted(set(_TASKS.names()) | set(catalogue_index()))


def reset_registry() -> None:
    """Forget registered tasks and built catalogue tasks (for tests)."""
    _TASKS.reset()
    _BUILT.clear()


def hub_source(task: Task) -> HubSource | None:
    """The hub dataset under a task's source (through any filters), or None."""
    source = task.source
    while isinstance(source, FilteredSource):
        source = source.source
    return source if isinstance(source, HubSource) else None


def local_tasks(exclude: Iterable[str] = ()) -> list[Task]:
    """Every registered or catalogue task whose examples are on this machine (generated or
    local files), but ``exclude``: other-format inputs for the router, which must not need the
    network (hub tasks are left out)."""
    skip = set(exclude)
    return [
        task
        for task in (get_task(name) for name in list_tasks() if name not in skip)
        if hub_source(task) is None
    ]
