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

import logging
import numbers
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Any

from multipromot.data.catalogue import catalogue_index
from multipromot.data.metrics import list_metrics, postprocess
from multipromot.data.sources import Source, Subset, source_from_spec
from multipromot.data.templates import FormatSignature, Template, load_template
from multipromot.errors import UserError

_log = logging.getLogger(__name__)

__all__ = [
    "METRICS",
    "POSTPROCESSORS",
    "TASK_KEYS",
    "Task",
    "default_postprocess",
    "task_from_spec",
    "register_task",
    "get_task",
    "list_tasks",
    "reset_registry",
]

# The paper's metrics and metrics.py's post-processing rules; both registries can grow
# (metrics.register_metric / register_postprocessor), so other names are checked there.
METRICS = ("accuracy", "exact_match", "bleu", "rouge2")
POSTPROCESSORS = ("none", "prefix", "first_line", "first_word")
TASK_KEYS = ("name", "source", "template", "metric", "postprocess", "splits", "description")

# Task names become bank directories (prompt_bank/<task>/), so they must be safe path parts.
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
    """

    name: str
    source: Source
    template: Template
    metric: str
    postprocess: str | None = None
    splits: dict[str, str] = field(default_factory=dict)
    description: str = ""
    _cache: dict[str, Sequence[dict]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.postprocess is None:
            self.postprocess = default_postprocess(self.metric)
        self.splits = dict(self.splits)

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
                rows = self.source.load(self.source_split(split))
            except UserError as exc:
                raise UserError(
                    f"task {self.name!r}: {exc.message}", file=exc.file, key=exc.key or self.name
                ) from exc
            self._cache[split] = self._without_unlabelled(rows, split)
        return self._cache[split]

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
            self.name, len(rows) - len(keep), len(rows), split,
        )  # fmt: skip
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


# -- parsing -----------------------------------------------------------------------------------


def _sub(key: str | None, child: str) -> str:
    return f"{key}.{child}" if key else child


def _check_metric(metric: Any, *, file, key) -> str:
    if not isinstance(metric, str) or not metric:
        raise UserError(f"'metric' must be one of {', '.join(METRICS)}", file=file, key=key)
    if metric in METRICS:
        return metric
    known = list_metrics()
    if metric not in known:
        close = get_close_matches(metric, known, n=1)
        hint = f"; did you mean {close[0]}?" if close else f" (known: {', '.join(known)})"
        raise UserError(f"unknown metric {metric!r}{hint}", file=file, key=key)
    return metric


def _check_postprocess(name: Any, *, file, key) -> str:
    if not isinstance(name, str) or not name:
        raise UserError(
            f"'postprocess' must be one of {', '.join(POSTPROCESSORS)}", file=file, key=key
        )
    if name in POSTPROCESSORS:
        return name
    try:
        postprocess("", name)  # raises UserError for a name nobody registered
    except UserError:
        close = get_close_matches(name, POSTPROCESSORS, n=1)
        hint = f"; did you mean {close[0]}?" if close else f" (known: {', '.join(POSTPROCESSORS)})"
        raise UserError(f"unknown postprocess {name!r}{hint}", file=file, key=key) from None
    return name


def _check_splits(splits: Any, *, file, key) -> dict[str, str]:
    valid = isinstance(splits, Mapping) and all(
        isinstance(k, str) and k and isinstance(v, str) and v for k, v in splits.items()
    )
    if not valid:
        raise UserError(
            "'splits' must map split names to the source's split names, e.g. {test: validation}",
            file=file,
            key=key,
        )
    return dict(splits)


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
    for name in spec:
        if name not in TASK_KEYS and name not in skipped:
            raise UserError(
                f"unknown key {name!r} in a task (allowed: {', '.join(TASK_KEYS)})",
                file=file,
                key=_sub(key, str(name)),
            )
    for name in ("name", "source", "template", "metric"):
        if name not in spec:
            raise UserError(f"a task needs {name!r}", file=file, key=_sub(key, name))

    name = spec["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise UserError(
            f"task name {name!r} must be letters, digits, '_', '-' or '.' (it names a bank "
            "directory)",
            file=file,
            key=_sub(key, "name"),
        )
    metric = _check_metric(spec["metric"], file=file, key=_sub(key, "metric"))
    postprocess = None
    if spec.get("postprocess") is not None:
        postprocess = _check_postprocess(
            spec["postprocess"], file=file, key=_sub(key, "postprocess")
        )
    description = spec.get("description", "")
    if not isinstance(description, str):
        raise UserError("'description' must be a string", file=file, key=_sub(key, "description"))

    source_spec = spec["source"]
    splits: dict[str, str] = {}
    if "splits" in spec:
        splits = _check_splits(spec["splits"], file=file, key=_sub(key, "splits"))
    if isinstance(source_spec, Mapping) and "splits" in source_spec:
        source_key = _sub(_sub(key, "source"), "splits")
        if "splits" in spec:
            raise UserError(
                "give 'splits' once: on the task or in its source", file=file, key=source_key
            )
        splits = _check_splits(source_spec["splits"], file=file, key=source_key)
        source_spec = {k: v for k, v in source_spec.items() if k != "splits"}

    # The template first: it is the likelier typo, and checking it touches no file system.
    template = load_template(spec["template"], file=file, key=_sub(key, "template"), id=name)
    source = source_from_spec(source_spec, file=file, key=_sub(key, "source"))
    return Task(
        name=name,
        source=source,
        template=template,
        metric=metric,
        postprocess=postprocess,
        splits=splits,
        description=description,
    )


# -- registry ----------------------------------------------------------------------------------

_REGISTRY: dict[str, Task] = {}
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
    current = _REGISTRY.get(task.name)
    if current is not None and current is not task and not replace:
        raise UserError(f"task {task.name!r} is already registered", key=task.name)
    _REGISTRY[task.name] = task
    return task


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
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _BUILT:
        return _BUILT[name]
    index = catalogue_index()
    entry = index.get(name)
    if entry is None:
        known = sorted(set(_REGISTRY) | set(index))
        close = get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f" (known: {', '.join(known)})"
        raise UserError(f"unknown task {name!r}{hint}", file=file, key=key)
    task = task_from_spec(entry.spec, file=entry.file, key=entry.key)
    _BUILT[name] = task
    return task


def list_tasks() -> list[str]:
    """Every task name :func:`get_task` accepts (registered and catalogue).

    Returns:
        Sorted names.
    """
    return sorted(set(_REGISTRY) | set(catalogue_index()))


def reset_registry() -> None:
    """Forget registered tasks and built catalogue tasks (for tests)."""
    _REGISTRY.clear()
    _BUILT.clear()
