"""Mixtures: which tasks a stage trains on, and at which rates.

A mixture YAML file (``mixtures/*.yaml``) is data, validated on load; every error is one
:class:`~multipromot.errors.UserError` naming the file and the key (``tasks[2].rate``)::

    name: rte_enfr
    version: 1
    rate: {examples_proportional: {cap: 100000, temperature: 1.0}}   # default for its tasks
    exemplars: {shots: 1, seed: 0}
    tasks:
      - task: rte                          # a catalogue task
      - task: wmt14_en_fr
        rate: 2.0                          # an explicit rate
      - task: cb                           # splits as an inline task's: here the split that
        splits: {validation: {from: train, size: 250}}   # selects prompt and step is held
                                           # out from train, disjoint from the scored one
      - name: my_rte_local                 # an inline task (source, template, metric)
        source: {files: data/rte/*.jsonl, format: json, split: train}
        template: {jinja: "{{premise}} ... ||| {{answer_choices[label]}}", answer_choices: "True ||| False"}
        metric: accuracy
      - mixture: other.yaml                # a nested mixture, relative to this file
        rate: 0.5
    replay:                                # optional, stage 2: general-purpose rows
      share: 0.1                           # of the stage-2 rows, in [0, 1)
      shots: 4                             # exemplars in front of each replay row
      tasks:                               # entries of the forms of `tasks`
        - task: lab_cb
        - task: lab_sum
          rate: 2.0

Rates follow seqio: a rate is a number or ``examples_proportional`` (``min(n_train * scale,
cap) ** (1 / temperature)``, seqio's ``mixing_rate_num_examples``); the top-level ``rate`` is
the default of every task entry that has none (1.0 if absent). A nested mixture's rate must be
a number: its tasks get ``rate * (their rate in the nested mixture, normalised)``, in the same
units as the other entries. A catalogue task reached twice through nesting gets the sum of its
rates (seqio's rule); any other task name defined twice is an error. Only the top file's
``exemplars`` and ``replay`` apply. The final rates are normalised to sum to 1.

Replay (the mitigation of mixing general data back in): ``replay.tasks`` are drawn into stage
2's stream for a share ``replay.share`` of its rows (their rates, normalised among themselves,
split that share; the mixture's own tasks split the rest), each row with ``replay.shots``
same-task exemplars (default 0) from its train split, and no prompt (task id -1). They are not
the mixture's tasks: ``Mixture.tasks`` holds the fine-tuned tasks only, so stage 1 tunes no
prompt for a replay task, stage 2 does not validate or select on one, and ``run`` scores it
only where the evaluation suite lists it (as an unseen task). Only train rows are replayed
(the sampler draws train; exemplars come from train); a replay task whose train split is the
same rows as its validation or test split, or that is also one of the mixture's tasks, is
refused. :meth:`Mixture.stream` is the mixture stage 2 samples.

Files are read with :func:`multipromot.yamlio.read_yaml` (safe and bounded).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any

from multipromot.data.sampler import task_size
from multipromot.data.sources import source_fingerprint
from multipromot.data.tasks import check_inline_name, get_task, task_from_spec, with_splits
from multipromot.data.templates import load_template
from multipromot.errors import UserError
from multipromot.yamlio import check_keys, read_yaml

__all__ = [
    "SCHEMA_VERSIONS",
    "MAX_NESTING",
    "Mixture",
    "Replay",
    "ExamplesProportional",
    "rate_examples_proportional",
    "load_mixture",
    "mixture_fingerprint",
    "MAX_RATE",
    "tasks_fingerprint",
]

SCHEMA_VERSIONS = (1,)
MAX_NESTING = 16
_TOP_KEYS = ("name", "version", "description", "rate", "exemplars", "tasks", "replay")
_REPLAY_KEYS = ("share", "shots", "rate", "tasks")
_EXEMPLAR_KEYS = ("shots", "seed")
_CATALOGUE_KEYS = ("task", "rate", "template", "splits")
_NESTED_KEYS = ("mixture", "rate")
_PROPORTIONAL_KEYS = ("cap", "temperature", "scale")


MAX_RATE = 1e15  # the largest rate, explicit or examples-proportional


@dataclass
class Replay:
    """General-purpose rows a stage-2 mixture mixes in (the mixture file's ``replay``).

    Args:
        tasks: the replayed tasks (never the mixture's own).
        rates: one rate per task; normalised here to sum to 1.
        share: the share of stage 2's rows that are replay rows, in [0, 1).
        shots: exemplars in front of each replay row.
        origins: where each task was defined (``file:key``).

    Raises:
        ValueError: lengths differ, no tasks, a share outside [0, 1), or a zero total rate.
    """

    tasks: list[Any]
    rates: list[float]
    share: float
    shots: int = 0
    origins: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.tasks or len(self.rates) != len(self.tasks):
            raise ValueError(f"{len(self.tasks)} replay tasks but {len(self.rates)} rates")
        if not 0 <= self.share < 1:
            raise ValueError(f"the replay share must be in [0, 1), got {self.share}")
        total = sum(float(r) for r in self.rates)
        if not total > 0:
            raise ValueError("the replay rates sum to zero")
        self.rates = [float(r) / total for r in self.rates]

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def record(self) -> dict:
        """What the replay is, as JSON-able data (results, records, resume checks)."""
        return {
            "share": self.share,
            "shots": self.shots,
            "tasks": dict(zip(self.task_names, self.rates, strict=True)),
        }


@dataclass
class Mixture:
    """Tasks and their sampling rates.

    Args:
        name: the mixture's name.
        tasks: the tasks; a task's index is its task id (its row in the prompt table).
        rates: one non-negative rate per task; normalised here to sum to 1.
        shots: exemplars per example in stage 2 (0 = zero-shot).
        exemplar_seed: seed of the exemplar choice.
        version: schema version of the file it came from.
        file: the YAML file it came from, if any.
        origins: where each task was defined (``file:key``), for ``mixture show``.
        replay: general-purpose rows stage 2 mixes in (:class:`Replay`), or None.

    Raises:
        ValueError: lengths differ, no tasks, a negative or non-finite rate, or a zero total.
    """

    name: str
    tasks: list[Any]
    rates: list[float]
    shots: int = 0
    exemplar_seed: int = 0
    _: KW_ONLY
    version: int = 1
    file: str | None = None
    origins: list[str] = field(default_factory=list)
    replay: Replay | None = None

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("a mixture needs at least one task")
        if len(self.rates) != len(self.tasks):
            raise ValueError(f"{len(self.tasks)} tasks but {len(self.rates)} rates")
        rates = [float(r) for r in self.rates]
        if any(not math.isfinite(r) or r < 0 for r in rates):
            raise ValueError(f"rates must be finite and >= 0, got {rates}")
        total = sum(rates)
        if total <= 0:
            raise ValueError("the rates sum to zero")
        self.rates = [r / total for r in rates]
        self.tasks = list(self.tasks)

    @property
    def task_names(self) -> list[str]:
        """Task names in task-id order."""
        return [t.name for t in self.tasks]

    def task_index(self, name: str) -> int:
        """The task id of ``name``.

        Raises:
            UserError: no such task in this mixture.
        """
        names = self.task_names
        if name not in names:
            raise UserError(f"no task {name!r} in mixture {self.name!r}; it has {names}")
        return names.index(name)

    @property
    def replayed(self) -> list[Any]:
        """The replay tasks stage 2 draws from (none when there is no replay or its share is
        0: the stream is then exactly the mixture's own)."""
        return list(self.replay.tasks) if self.replay and self.replay.share > 0 else []

    def stream(self) -> Mixture:
        """The mixture stage 2 samples: its tasks at ``1 - share`` of the rows, then the replay
        tasks at ``share`` (itself when nothing is replayed). Task ``i`` of the stream is task
        ``i`` of the mixture for ``i < len(self.tasks)``; the rest are replay tasks."""
        if not self.replayed:
            return self
        share = self.replay.share
        return dataclasses.replace(
            self,
            tasks=[*self.tasks, *self.replay.tasks],
            rates=[r * (1 - share) for r in self.rates] + [r * share for r in self.replay.rates],
            origins=[*self.origins, *self.replay.origins],
            replay=None,
        )

    def stream_rows(self, task_ids: list[int], shots: int) -> tuple[list[int], list[int]]:
        """Per task of :meth:`stream`: its prompt-table row and its exemplars. The mixture's
        tasks keep ``task_ids`` and ``shots`` (what the method trains with); a replay row has
        no prompt (-1) and ``replay.shots`` exemplars."""
        replayed = len(self.replayed)
        rows = [*task_ids, *[-1] * replayed]
        per_task = [shots] * len(self.tasks) + [self.replay.shots if replayed else 0] * replayed
        return rows, per_task


@dataclass(frozen=True)
class ExamplesProportional:
    """seqio's examples-proportional rate: ``min(n * scale, cap) ** (1 / temperature)``.

    Args:
        cap: upper bound on the (scaled) example count; None = no cap.
        temperature: > 0; above 1 flattens the mixture towards equal rates.
        scale: multiplies the example count before the cap.
    """

    cap: float | None = None
    temperature: float = 1.0
    scale: float = 1.0

    def __call__(self, num_examples: int) -> float:
        return rate_examples_proportional(
            num_examples, cap=self.cap, temperature=self.temperature, scale=self.scale
        )

    def describe(self) -> str:
        parts = [f"cap={self.cap:g}" if self.cap is not None else "no cap"]
        parts.append(f"temperature={self.temperature:g}")
        if self.scale != 1.0:
            parts.append(f"scale={self.scale:g}")
        return f"examples_proportional({', '.join(parts)})"


def rate_examples_proportional(
    num_examples: int, *, cap: float | None = None, temperature: float = 1.0, scale: float = 1.0
) -> float:
    """Rate of a task with ``num_examples`` training examples (seqio semantics).

    Args:
        num_examples: size of the task's train split.
        cap: upper bound after scaling; None = none.
        temperature: > 0; the rate is raised to ``1 / temperature``.
        scale: multiplies the count before the cap.

    Returns:
        ``min(num_examples * scale, cap) ** (1 / temperature)``.
    """
    value = num_examples * scale
    if cap is not None:
        value = min(value, cap)
    return float(value) ** (1.0 / temperature)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _nonneg_int(file: Path, key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UserError(f"must be an integer >= 0, got {value!r}", file=file, key=key)
    return value


def _parse_rate(file: Path, key: str, value: Any) -> float | ExamplesProportional:
    """A rate spec: a number >= 0 or ``{examples_proportional: {cap, temperature, scale}}``."""
    if _is_number(value):
        if not math.isfinite(value) or value < 0:
            raise UserError(
                f"a rate must be a finite number >= 0, got {value!r}", file=file, key=key
            )
        if value > MAX_RATE:  # rates are relative; sums of huge ones overflow to inf
            raise UserError(
                f"a rate must be <= {MAX_RATE:g} (rates are relative: scale them down), "
                f"got {value!r}",
                file=file,
                key=key,
            )
        return float(value)
    if isinstance(value, dict):
        if list(value) != ["examples_proportional"]:
            raise UserError(
                "a rate is a number or {examples_proportional: {cap, temperature}}, "
                f"got keys {list(value)}",
                file=file,
                key=key,
            )
        spec = value["examples_proportional"] or {}
        inner = f"{key}.examples_proportional"
        if not isinstance(spec, dict):
            raise UserError("must be a mapping {cap, temperature, scale}", file=file, key=inner)
        check_keys(file, inner, spec, _PROPORTIONAL_KEYS)
        cap = spec.get("cap")
        if cap is not None and (not _is_number(cap) or cap <= 0):
            raise UserError(
                f"cap must be a number > 0 or null, got {cap!r}", file=file, key=f"{inner}.cap"
            )
        for name in ("temperature", "scale"):
            v = spec.get(name, 1.0)
            if not _is_number(v) or not math.isfinite(v) or v <= 0:
                raise UserError(
                    f"must be a number > 0, got {v!r}", file=file, key=f"{inner}.{name}"
                )
        return ExamplesProportional(
            cap=None if cap is None else float(cap),
            temperature=float(spec.get("temperature", 1.0)),
            scale=float(spec.get("scale", 1.0)),
        )
    raise UserError(
        f"a rate is a number or {{examples_proportional: {{cap, temperature}}}}, got {value!r}",
        file=file,
        key=key,
    )


def _reraise_here(err: UserError, file: Path, key: str) -> UserError:
    """Attach this file and key to an error raised without them (e.g. by the catalogue)."""
    if err.file is not None:
        return err
    return type(err)(err.message, file=file, key=err.key if err.key else key)


# --------------------------------------------------------------------------------------------
# Loading


@dataclass
class _Entry:
    task: Any
    rate: float
    origin: str
    catalogue: bool


def _evaluate_rate(file: Path, key: str, spec: float | ExamplesProportional, task: Any) -> float:
    if isinstance(spec, float):
        return spec
    try:
        n = task_size(task, "train")
    except UserError as e:
        raise _reraise_here(e, file, key) from None
    try:
        rate = spec(n)
    except OverflowError:
        rate = math.inf
    if not rate <= MAX_RATE:  # a tiny temperature raises the count to a huge power
        raise UserError(
            f"the examples-proportional rate of task {task.name!r} overflows "
            f"({n} examples ** (1 / temperature {spec.temperature:g})); use a temperature >= 1 "
            "(seqio's range) or a cap",
            file=file,
            key=key,
        )
    return rate


def _catalogue_entry(file: Path, key: str, entry: dict) -> Any:
    """A catalogue (or registered) task, optionally with another template."""
    check_keys(file, key, entry, _CATALOGUE_KEYS)
    name = entry["task"]
    if not isinstance(name, str) or not name:
        raise UserError(f"must be a task name, got {name!r}", file=file, key=f"{key}.task")
    task = get_task(name, file=file, key=f"{key}.task")
    if "template" in entry:
        template = load_template(entry["template"], file=file, key=f"{key}.template")
        # A new Task object: the catalogue's own instance stays as it is for other mixtures.
        task = dataclasses.replace(task, template=template)
    if "splits" in entry:  # e.g. a selection split held out from train: {validation: {...}}
        task = with_splits(task, entry["splits"], file=file, key=f"{key}.splits")
    return task


def _inline_entry(file: Path, key: str, entry: dict) -> Any:
    if isinstance(entry.get("name"), str):  # before its data: the name alone is refused
        check_inline_name(entry["name"], file=file, key=key)
    return task_from_spec(entry, file=file, key=key, ignore=("rate",))


def _load(file: Path, stack: tuple[Path, ...]) -> tuple[dict, list[_Entry]]:
    """Parse one file (and its nested files) into its header and raw (unnormalised) entries."""
    data = read_yaml(file)
    if not isinstance(data, dict):
        kind = "an empty file" if data is None else f"a {type(data).__name__}"
        raise UserError(
            f"a mixture file is a mapping with keys {', '.join(_TOP_KEYS)}; got {kind}", file=file
        )
    check_keys(file, "", data, _TOP_KEYS)

    version = data.get("version", SCHEMA_VERSIONS[-1])
    if not isinstance(version, int) or isinstance(version, bool) or version not in SCHEMA_VERSIONS:
        raise UserError(
            f"unsupported version {version!r}; this multipromot reads version "
            f"{', '.join(map(str, SCHEMA_VERSIONS))}",
            file=file,
            key="version",
        )
    name = data.get("name", file.stem)
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"must be a non-empty string, got {name!r}", file=file, key="name")
    default_rate = _parse_rate(file, "rate", data["rate"]) if "rate" in data else 1.0

    exemplars = data.get("exemplars") or {}
    if not isinstance(exemplars, dict):
        raise UserError("must be a mapping {shots, seed}", file=file, key="exemplars")
    check_keys(file, "exemplars", exemplars, _EXEMPLAR_KEYS)
    shots = _nonneg_int(file, "exemplars.shots", exemplars.get("shots", 0))
    seed = _nonneg_int(file, "exemplars.seed", exemplars.get("seed", 0))

    if "tasks" not in data:
        raise UserError("missing: a mixture lists its tasks", file=file, key="tasks")
    entries = _task_entries(file, "tasks", data["tasks"], default_rate, stack)
    header = {"name": name, "version": version, "shots": shots, "seed": seed}
    if "replay" in data:
        header["replay"] = data["replay"]
    return header, entries


def _task_entries(
    file: Path,
    where: str,
    tasks: Any,
    default_rate: float | ExamplesProportional,
    stack: tuple[Path, ...],
) -> list[_Entry]:
    """The raw entries of one task list (``tasks`` or ``replay.tasks``)."""
    if not isinstance(tasks, list) or not tasks:
        raise UserError("must be a non-empty list of task entries", file=file, key=where)
    entries: list[_Entry] = []
    defined_here: dict[str, str] = {}
    for i, entry in enumerate(tasks):
        key = f"{where}[{i}]"
        if not isinstance(entry, dict):
            raise UserError(
                f"a task entry is a mapping (task: NAME, mixture: FILE, or an inline task with "
                f"name:), got {entry!r}",
                file=file,
                key=key,
            )
        kinds = [k for k in ("task", "mixture", "name") if k in entry]
        if len(kinds) != 1:
            raise UserError(
                "a task entry has exactly one of 'task' (catalogue), 'mixture' (nested file) or "
                f"'name' (inline task); got {kinds or list(entry)}",
                file=file,
                key=key,
            )
        if "rate" in entry:
            rate_spec = _parse_rate(file, f"{key}.rate", entry["rate"])
        else:
            rate_spec = default_rate
        if kinds[0] == "mixture":
            entries.extend(_nested_entries(file, key, entry, rate_spec, "rate" in entry, stack))
            continue
        if kinds[0] == "task":
            task = _catalogue_entry(file, key, entry)
            catalogue = "template" not in entry and "splits" not in entry
        else:
            task, catalogue = _inline_entry(file, key, entry), False
        if task.name in defined_here:
            raise UserError(
                f"duplicate task {task.name!r} (also {defined_here[task.name]})",
                file=file,
                key=key,
            )
        defined_here[task.name] = key
        rate = _evaluate_rate(file, f"{key}.rate", rate_spec, task)
        entries.append(_Entry(task, rate, f"{file}:{key}", catalogue))
    return entries


def _replay(file: Path, spec: Any, targets: list[_Entry], stack: tuple[Path, ...]) -> Replay:
    """The top file's ``replay``: ``{share, shots?, rate?, tasks}``.

    Raises:
        UserError: a share outside [0, 1), a bad shots or rate, a replay task that is also a
            fine-tuned task, defined twice, or whose train rows are also its validation or
            test rows.
    """
    if not isinstance(spec, dict):
        raise UserError("must be a mapping {share, shots, tasks}", file=file, key="replay")
    check_keys(file, "replay", spec, _REPLAY_KEYS)
    for name in ("share", "tasks"):
        if name not in spec:
            raise UserError("missing", file=file, key=f"replay.{name}")
    share = spec["share"]
    if not _is_number(share) or not 0 <= share < 1:
        raise UserError(
            f"the share of stage-2 rows that are replay rows must be a number in [0, 1), got "
            f"{share!r}",
            file=file,
            key="replay.share",
        )
    shots = _nonneg_int(file, "replay.shots", spec.get("shots", 0))
    default_rate = _parse_rate(file, "replay.rate", spec["rate"]) if "rate" in spec else 1.0
    entries = _merge(file, _task_entries(file, "replay.tasks", spec["tasks"], default_rate, stack))
    fine_tuned = {e.task.name for e in targets}
    for e in entries:
        where, _, key = e.origin.rpartition(":")  # a nested file's entry: that file and key
        if e.task.name in fine_tuned:
            raise UserError(
                f"task {e.task.name!r} is one of the mixture's fine-tuned tasks; a task is "
                "either fine-tuned or replayed",
                file=where,
                key=key,
            )
        for split in ("validation", "test"):
            if e.task.shares_rows("train", split):
                raise UserError(
                    f"task {e.task.name!r}'s train split is also its {split} split; replay "
                    "draws only rows that are never evaluated",
                    file=where,
                    key=key,
                )
    if sum(e.rate for e in entries) <= 0:
        raise UserError("all replay rates are zero", file=file, key="replay.tasks")
    return Replay(
        tasks=[e.task for e in entries],
        rates=[e.rate for e in entries],
        share=float(share),
        shots=shots,
        origins=[e.origin for e in entries],
    )


def _nested_entries(
    file: Path,
    key: str,
    entry: dict,
    rate_spec: float | ExamplesProportional,
    explicit: bool,
    stack: tuple[Path, ...],
) -> list[_Entry]:
    check_keys(file, key, entry, _NESTED_KEYS)
    target = entry["mixture"]
    if not isinstance(target, str) or not target:
        raise UserError(f"must be a file path, got {target!r}", file=file, key=f"{key}.mixture")
    if not isinstance(rate_spec, float):
        how = "this rate" if explicit else f"the default rate ({rate_spec.describe()})"
        raise UserError(
            f"a nested mixture's rate must be a number that scales its normalised rates, so "
            f"{how} cannot apply to it; give the entry a number rate",
            file=file,
            key=f"{key}.rate",
        )
    nested = (file.parent / target).resolve()
    if nested in stack or nested == file.resolve():
        chain = " -> ".join(p.name for p in (*stack, nested))
        raise UserError(f"mixtures nest in a cycle: {chain}", file=file, key=f"{key}.mixture")
    if len(stack) >= MAX_NESTING:
        raise UserError(f"mixtures nest deeper than {MAX_NESTING}", file=file, key=key)
    if not nested.is_file():
        raise UserError(f"no such mixture file {target!r}", file=file, key=f"{key}.mixture")
    _, sub = _load(nested, (*stack, nested))
    total = sum(e.rate for e in sub)
    if total <= 0:
        raise UserError("all rates of the nested mixture are zero", file=file, key=f"{key}.mixture")
    return [_Entry(e.task, rate_spec * e.rate / total, e.origin, e.catalogue) for e in sub]


def _merge(file: Path, entries: list[_Entry]) -> list[_Entry]:
    """One entry per task name: catalogue tasks reached twice add their rates (seqio)."""
    merged: dict[str, _Entry] = {}
    for e in entries:
        seen = merged.get(e.task.name)
        if seen is None:
            merged[e.task.name] = dataclasses.replace(e)
        elif seen.catalogue and e.catalogue:
            seen.rate += e.rate
        else:
            raise UserError(
                f"task {e.task.name!r} is defined twice ({seen.origin} and {e.origin}); rename one",
                file=file,
                key="tasks",
            )
    return list(merged.values())


def load_mixture(path: str | os.PathLike) -> Mixture:
    """Load and validate a mixture YAML file (see the module docstring for the format).

    Args:
        path: the mixture file.

    Returns:
        The :class:`Mixture`, rates normalised to sum to 1, tasks in file order (nested
        mixtures' tasks in place of their entry).

    Raises:
        UserError: naming the file and key, for bad YAML, unknown keys, a missing ``tasks``,
            an unknown task or template, a bad rate, a zero total rate, a nesting cycle or
            missing nested file, an unsupported version, or a task defined twice.
    """
    if not os.fspath(path):  # Path("") would be "." and fail as "is a directory"
        raise UserError(
            "no mixture file given: set the stage's mixture in the run config "
            "(stage1.mixture, stage2.mixture)",
            key="mixture",
        )
    file = Path(path)
    header, entries = _load(file, (file.resolve(),))
    entries = _merge(file, entries)
    if sum(e.rate for e in entries) <= 0:
        raise UserError("all rates are zero: nothing to sample", file=file, key="tasks")
    replay = None
    if "replay" in header:
        replay = _replay(file, header["replay"], entries, (file.resolve(),))
    return Mixture(
        name=header["name"],
        tasks=[e.task for e in entries],
        rates=[e.rate for e in entries],
        shots=header["shots"],
        exemplar_seed=header["seed"],
        version=header["version"],
        file=os.fspath(file),
        origins=[e.origin for e in entries],
        replay=replay,
    )


def tasks_fingerprint(tasks: list[Any]) -> list[dict]:
    """What each task's rows are made from: its source (local files by content), template,
    metric and split mapping, as JSON-able data.

    Args:
        tasks: tasks.

    Returns:
        One record per task.
    """
    records = []
    for task in tasks:
        template = task.template
        record = {
            "name": task.name,
            "source": source_fingerprint(task.source),
            "template": [template.id, template.jinja, template.answer_choices],
            "metric": task.metric,
            "postprocess": task.postprocess,
            "splits": task.splits,
        }
        # splits held out by hand (the automatic ones follow from the source); only when
        # there are some, so the records of tasks without them stay as they were
        held = {s: v for s, v in task.holdouts.items() if s not in task.auto_holdouts}
        if held:
            record["holdouts"] = held
        records.append(record)
    return records


def mixture_fingerprint(mixture: Mixture) -> str:
    """A sha256 of everything a mixture's rows are made from: its tasks
    (:func:`tasks_fingerprint`), the rates, the exemplar settings and its replay. A run reuses a result only
    when the fingerprint of its data is unchanged.

    Args:
        mixture: a loaded mixture.

    Returns:
        A hex digest.
    """
    record = {
        "tasks": tasks_fingerprint(mixture.tasks),
        "rates": mixture.rates,
        "shots": mixture.shots,
        "exemplar_seed": mixture.exemplar_seed,
    }
    if mixture.replay is not None:  # only then: the records of other mixtures stay as they were
        record["replay"] = {
            "tasks": tasks_fingerprint(mixture.replay.tasks),
            "rates": mixture.replay.rates,
            "share": mixture.replay.share,
            "shots": mixture.replay.shots,
        }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()
