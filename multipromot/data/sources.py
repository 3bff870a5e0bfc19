"""Where a task's raw examples come from: the Hugging Face hub, local files, or a generator.

A source hands out one split at a time as a sequence of plain dicts (seqio's "source" step).
Hub and file sources go through ``datasets``, so large splits stay memory-mapped Arrow: the
returned sequence converts a row to a dict only when it is indexed. Generator sources return
the generator's list.

YAML forms (:func:`source_from_spec`)::

    {hub: aps/super_glue, name: rte}          # datasets.load_dataset("aps/super_glue", "rte")
    {files: data/*.jsonl, format: json, split: train}   # globs relative to the YAML file
    {files: {train: tr.csv, validation: va.csv}, format: csv}
    {generator: lab_rte, seed: 0, n_train: 500}         # a registered generator (+ its kwargs)

Hub sources also take ``revision`` and ``data_dir``; files may be json (also JSON lines),
jsonl, csv, tsv or parquet (guessed from the suffix when ``format`` is left out).

Any form may add ``filter: "label >= 0"``, a sandboxed Jinja expression over the example's
fields; examples for which it is false are dropped (SNLI marks unlabeled pairs with -1).

Why one module of this size: the three sources (hub, files, generators) share the split
mapping, the offline handling and the one-line error policy; each is ~150 lines.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import logging
import operator
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from multipromot.data.mirror import (
    DEFAULT_CONFIG,
    current_mirror,
    find_snapshot,
    snapshot_dir,
    snapshot_files,
)
from multipromot.data.templates import compile_condition
from multipromot.errors import UserError
from multipromot.fsio import sha256_file
from multipromot.registry import Registry
from multipromot.yamlio import check_keys, sub_key

__all__ = [
    "Source",
    "HubSource",
    "FileSource",
    "GeneratorSource",
    "FilteredSource",
    "Rows",
    "Subset",
    "source_from_spec",
    "register_generator",
    "get_generator",
    "list_generators",
    "reset_generators",
    "FILE_FORMATS",
    "GENERATORS",
    "split_of_file",
    "source_fingerprint",
]


@runtime_checkable
class Source(Protocol):
    """Anything that loads a split of raw examples."""

    def load(self, split: str) -> Sequence[dict]:
        """The examples of ``split`` as dicts of fields."""
        ...

    def describe(self) -> str:
        """A one-line description for listings and errors."""
        ...


class Rows(Sequence[dict]):
    """A read-only view of a ``datasets.Dataset`` whose items are plain dicts.

    Args:
        dataset: the Arrow-backed dataset; rows are converted only when read.
    """

    def __init__(self, dataset: Any):
        self._dataset = dataset

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index):  # int -> dict, slice -> list[dict]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = operator.index(index)  # samplers hand out numpy integers
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return dict(self._dataset[index])

    def __iter__(self) -> Iterator[dict]:
        # Column batches are much faster than one Arrow lookup per row.
        columns = self._dataset.column_names
        for batch in self._dataset.iter(batch_size=1000):
            size = len(batch[columns[0]]) if columns else 0
            for i in range(size):
                yield {name: batch[name][i] for name in columns}

    def column(self, name: str) -> list | None:
        """One field of every row (read as one Arrow column), or None when there is no such
        field."""
        if name not in self._dataset.column_names:
            return None
        return list(self._dataset[name])

    def __repr__(self) -> str:
        return f"Rows({len(self)} rows, columns={self._dataset.column_names})"


class Subset(Sequence[dict]):
    """Some rows of another sequence, by index."""

    def __init__(self, rows: Sequence[dict], indices: list[int]):
        self._rows = rows
        self._indices = indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._rows[i] for i in self._indices[index]]
        return self._rows[self._indices[index]]


# -- hub ---------------------------------------------------------------------------------------


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return os.environ.get("HF_HUB_OFFLINE", "0").upper() in {"1", "ON", "YES", "TRUE"}


def _quiet_datasets() -> None:
    """No "Generating ... split" bars or info lines from datasets: our progress is the one that
    matters (``--verbose`` turns them back on through the environment's usual settings)."""
    import datasets

    if os.environ.get("MULTIPROMOT_VERBOSE"):
        return
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class HubSource:
    """A dataset loaded with ``datasets.load_dataset`` (from the hub or its local cache).

    Args:
        path: the dataset id, e.g. ``"aps/super_glue"``.
        name: the config, e.g. ``"rte"``.
        revision: a branch, tag or commit (``"refs/convert/parquet"`` for script-only repos).
        data_dir: passed to ``load_dataset``.
        file: the YAML file that named this source (for error messages).
        key: its key in that file.
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        *,
        revision: str | None = None,
        data_dir: str | None = None,
        file: str | os.PathLike | None = None,
        key: str | None = None,
    ):
        self.path = path
        self.name = name
        self.revision = revision
        self.data_dir = data_dir
        self.file = os.fspath(file) if file is not None else None
        self.key = key

    def describe(self) -> str:
        """A one-line description.

        Returns:
            e.g. ``hub:aps/super_glue/rte``.
        """
        text = f"hub:{self.path}" + (f"/{self.name}" if self.name else "")
        return text + (f"@{self.revision}" if self.revision else "")

    def load(self, split: str) -> Rows:
        """Load one split.

        Args:
            split: the dataset's split name.

        Returns:
            The split's rows.

        Raises:
            UserError: the dataset, config or split cannot be loaded (one line, with what to do).
        """
        import datasets

        _quiet_datasets()
        snapshot = find_snapshot(self.path)
        if snapshot is not None:
            return self._load_snapshot(snapshot, split)
        kwargs = {"revision": self.revision, "data_dir": self.data_dir}
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        try:
            dataset = datasets.load_dataset(self.path, self.name, split=split, **kwargs)
        except Exception as exc:  # datasets raises many types; all mean "cannot load this"
            raise UserError(self._explain(exc, split), file=self.file, key=self.key) from exc
        return Rows(dataset)

    def _load_snapshot(self, snapshot: Path, split: str) -> Rows:
        """One split from a mirror folder (see :mod:`multipromot.data.mirror`)."""
        import datasets

        what = f"{self.path!r} (config {self.name or DEFAULT_CONFIG!r}, split {split!r})"
        try:
            files = snapshot_files(snapshot, self.name)
        except UserError as e:
            raise UserError(f"cannot load {what}: {e}", file=self.file, key=self.key) from None
        if split not in files:
            raise UserError(
                f"cannot load {what}: the mirror folder {snapshot} has no split {split!r} "
                f"(it has: {', '.join(sorted(files)) or 'none'})",
                file=self.file,
                key=self.key,
            )
        try:
            data_files = {split: [str(f) for f in files[split]]}
            dataset = datasets.load_dataset("parquet", data_files=data_files, split=split)
        except Exception as exc:
            raise UserError(
                f"cannot load {what} from the mirror folder {snapshot}: {_first_line(exc)}",
                file=self.file,
                key=self.key,
            ) from exc
        return Rows(dataset)

    def where(self) -> str:
        """Where :meth:`load` reads from: the mirror folder, or the hub (or its cache)."""
        snapshot = find_snapshot(self.path)
        return f"mirror {snapshot}" if snapshot is not None else "hub (or its local cache)"

    def _explain(self, exc: Exception, split: str) -> str:
        what = f"cannot load hub dataset {self.path!r}"
        what += f" (config {self.name!r}, split {split!r})" if self.name else f" (split {split!r})"
        reason = _first_line(exc)
        lowered = reason.lower()
        if "scripts are no longer supported" in lowered:
            hint = (
                "this repository only has a loading script, which datasets >= 4 refuses: add "
                "'revision: refs/convert/parquet' to the source, or use local files"
            )
        elif "unknown split" in lowered or ("config" in lowered and "not found" in lowered):
            hint = "check the config and split names (a task's 'splits' maps them)"
        elif _hub_offline() or "offline" in lowered:
            hint = (
                "it is not in the local cache and the hub is offline (HF_HUB_OFFLINE=1): "
                "download it once with HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0, or point the task "
                "at local files ({files: ..., format: ...})"
            )
        else:
            hint = "check the dataset id, config and split names"
        mirror = current_mirror()
        if mirror is not None:  # name every place that was looked at
            what += f" (the mirror {mirror} has no folder {snapshot_dir(mirror, self.path)})"
        return f"{what}: {reason}; {hint}"

    def __repr__(self) -> str:
        return f"HubSource({self.describe()!r})"


# -- local files -------------------------------------------------------------------------------

# format name -> (datasets builder, builder kwargs)
FILE_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    "json": ("json", {}),
    "jsonl": ("json", {}),
    "csv": ("csv", {}),
    "tsv": ("csv", {"delimiter": "\t"}),
    "parquet": ("parquet", {}),
}
_SUFFIX_FORMATS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
}


def _check_utf8(path: str, *, file, key) -> None:
    """Refuse a text data file that is not UTF-8 (a latin-1 export) in one line: the reader
    would fail only when the row is read, deep inside training."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise UserError(
                    f"{Path(path).name} is not UTF-8 text (byte 0x{chunk[e.start]:02x} at "
                    f"offset {offset + e.start}); save it as UTF-8",
                    file=file,
                    key=key,
                ) from None
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise UserError(
            f"{Path(path).name} ends inside a UTF-8 character", file=file, key=key
        ) from None


def _resolve_patterns(
    patterns: str | Sequence[str], base_dir: Path, *, file, key: str | None
) -> list[str]:
    if isinstance(patterns, str):
        patterns = [patterns]
    found: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise UserError("file patterns must be non-empty strings", file=file, key=key)
        path = Path(pattern).expanduser()
        if not path.is_absolute():
            path = base_dir / path
        matches = sorted(glob.glob(str(path), recursive=True))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise UserError(
                f"no files match {pattern!r} (looked in {base_dir})", file=file, key=key
            )
        found.extend(m for m in matches if m not in found)
    return found


# Split names in file names, as ``datasets`` infers them: the word alone or between separators
# (``train.jsonl``, ``rte-dev.jsonl``, ``test-00000.parquet``). Folder names are not read: a
# run's folder (``tests/``, ``eval_runs/``) says nothing about the files in it.
_SPLIT_WORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_SEP = r"(?:^|[-._ 0-9])"
_SPLIT_PATTERNS = {
    split: re.compile(_SEP + "(?:" + "|".join(words) + ")" + r"(?=$|[-._ 0-9])", re.IGNORECASE)
    for split, words in _SPLIT_WORDS.items()
}


def split_of_file(path: str | os.PathLike) -> str | None:
    """The split a file's name says it holds, or None.

    Args:
        path: a data file.

    Returns:
        ``train``, ``validation`` or ``test``; None when the name names no split or several.
    """
    name = Path(path).name.split(".")[0]
    found = {split for split, pattern in _SPLIT_PATTERNS.items() if pattern.search(name)}
    return found.pop() if len(found) == 1 else None


def _splits_by_name(paths: list[str], split: str, explicit: bool, *, file, key) -> dict:
    """One glob's files by split. A glob over ``train``/``validation``/``test`` files must not
    put every file into one split: the splits are taken from the names, as ``datasets`` does,
    and a glob that mixes named and unnamed files, or names another split than an explicit
    ``split``, is refused."""
    named = {m: split_of_file(m) for m in paths}
    kinds = {s for s in named.values() if s is not None}
    if not kinds or kinds == {split}:
        return {split: paths}
    safe = "give the files per split: files: {train: ..., validation: ..., test: ...}"
    if explicit:
        other = next(m for m, s in named.items() if s is not None and s != split)
        raise UserError(
            f"split is {split!r} but the glob matches {Path(other).name}, a "
            f"{named[other]} file; {safe}",
            file=file,
            key=key,
        )
    unnamed = [m for m, s in named.items() if s is None]
    if unnamed:
        raise UserError(
            f"the glob matches files of several splits and {Path(unnamed[0]).name}, whose name "
            f"says no split; {safe}",
            file=file,
            key=key,
        )
    grouped: dict[str, list[str]] = {}
    for m in paths:
        grouped.setdefault(named[m], []).append(m)
    return grouped


class FileSource:
    """Local JSON lines / JSON / CSV / TSV / Parquet files, read by ``datasets``' builders.

    Args:
        files: a glob or list of globs (one split, named by ``split``), or a mapping
            ``{split: glob(s)}``.
        format: ``json`` (also JSON lines), ``jsonl``, ``csv``, ``tsv`` or ``parquet``.
        split: the split name when ``files`` is not a mapping.
        infer_splits: when ``files`` is not a mapping and matches files named for different
            splits (``train.jsonl``, ``dev.jsonl``, ``test.jsonl``), take the splits from the
            names; otherwise such a glob is refused unless it names only ``split``'s files.
        base_dir: relative globs are resolved against it (the YAML file's directory);
            default: the current directory.
        file: the YAML file that named this source (for error messages).
        key: its key in that file.

    Raises:
        UserError: an unknown format or a glob that matches no file.
    """

    def __init__(
        self,
        files: str | Sequence[str] | Mapping[str, str | Sequence[str]],
        format: str,
        *,
        split: str = "train",
        infer_splits: bool = False,
        base_dir: str | os.PathLike | None = None,
        file: str | os.PathLike | None = None,
        key: str | None = None,
    ):
        self.file = os.fspath(file) if file is not None else None
        self.key = key
        if format not in FILE_FORMATS:
            raise UserError(
                f"unknown file format {format!r} (known: {', '.join(FILE_FORMATS)})",
                file=file,
                key=f"{key}.format" if key else "format",
            )
        self.format = format
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        spec = files if isinstance(files, Mapping) else {split: files}
        files_key = f"{key}.files" if key else "files"
        if isinstance(files, Mapping):
            self.files: dict[str, list[str]] = {
                str(name): _resolve_patterns(patterns, base, file=file, key=f"{files_key}.{name}")
                for name, patterns in spec.items()
            }
        else:
            paths = _resolve_patterns(files, base, file=file, key=files_key)
            self.files = _splits_by_name(paths, split, not infer_splits, file=file, key=files_key)

    def describe(self) -> str:
        """A one-line description.

        Returns:
            e.g. ``files:json:train=2 files``.
        """
        counts = ", ".join(f"{split}={len(paths)} files" for split, paths in self.files.items())
        return f"files:{self.format}:{counts}"

    def load(self, split: str) -> Rows:
        """Load one split.

        Args:
            split: a split named in ``files``.

        Returns:
            The split's rows.

        Raises:
            UserError: no files for the split, or a file the builder cannot parse.
        """
        import datasets

        if split not in self.files:
            raise UserError(
                f"no files for split {split!r} (this source has: {', '.join(self.files)})",
                file=self.file,
                key=self.key,
            )
        builder, options = FILE_FORMATS[self.format]
        if self.format != "parquet":
            for path in self.files[split]:
                _check_utf8(path, file=self.file, key=self.key)
        try:
            _quiet_datasets()
            with _quiet_datasets_errors():
                dataset = datasets.load_dataset(
                    builder, data_files={split: self.files[split]}, split=split, **options
                )
        except Exception as exc:  # parse errors arrive as several exception types
            raise UserError(
                f"cannot read {self.format} files for split {split!r} "
                f"({self.files[split][0]}{' ...' if len(self.files[split]) > 1 else ''}): "
                f"{_parse_reason(exc)}",
                file=self.file,
                key=self.key,
            ) from exc
        return Rows(dataset)

    def __repr__(self) -> str:
        return f"FileSource({self.describe()!r})"


@contextlib.contextmanager
def _quiet_datasets_errors() -> Iterator[None]:
    """datasets logs a parse error itself before raising it; the UserError says it once."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _parse_reason(exc: BaseException) -> str:
    """The first line of the most telling exception in the chain: datasets wraps the parser's
    error ("JSON parse error: ... in row 8") in a generic DatasetGenerationError."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__name__ != "DatasetGenerationError":
            return _first_line(current)
        current = current.__cause__ or current.__context__
    return _first_line(exc)


# -- generators --------------------------------------------------------------------------------

Generator = Callable[..., list[dict]]
# name -> generator; add with register_generator (multipromot.lab registers the lab families).
GENERATORS: Registry[Generator] = Registry("generator")


def register_generator(name: str, *, replace: bool = False) -> Callable[[Generator], Generator]:
    """Decorator: make ``fn(split: str, seed: int, **kwargs) -> list[dict]`` a source.

    Args:
        name: the name YAML uses (``source: {generator: NAME}``).
        replace: allow replacing another generator registered under ``name``.

    Returns:
        The decorator (it returns the function unchanged).

    Raises:
        UserError: (from the decorator) another generator has that name and ``replace`` is
            False.
    """

    def add(fn: Generator) -> Generator:
        return GENERATORS.register(name, fn, replace=replace)

    return add


def reset_generators() -> None:
    """Forget generators registered outside the multipromot package (for tests).

    The package's own (lab) generators stay: ``multipromot.lab`` registers them once, when the
    package is imported, and marks them as the built-ins.
    """
    GENERATORS.reset()


def list_generators() -> list[str]:
    """Names of the registered generators.

    Returns:
        Sorted names.
    """
    return GENERATORS.names()


def get_generator(
    name: str, *, file: str | os.PathLike | None = None, key: str | None = None
) -> Generator:
    """A registered generator.

    Args:
        name: the generator name.
        file: for error messages.
        key: for error messages.

    Returns:
        The generator function.

    Raises:
        UserError: no generator by that name (with close matches).
    """
    return GENERATORS.lookup(name, file=file, key=key)


class GeneratorSource:
    """Examples made by a registered generator ``fn(split, seed, **kwargs) -> list[dict]``.

    Args:
        name: the generator name.
        seed: passed to the generator.
        file: for error messages.
        key: for error messages.
        **kwargs: passed to the generator.

    Raises:
        UserError: unknown generator.
    """

    def __init__(
        self,
        name: str,
        seed: int = 0,
        *,
        file: str | os.PathLike | None = None,
        key: str | None = None,
        **kwargs: Any,
    ):
        self.name = name
        self.seed = seed
        self.kwargs = kwargs
        self.file = os.fspath(file) if file is not None else None
        self.key = key
        self._fn = get_generator(name, file=file, key=key)

    def describe(self) -> str:
        """A one-line description.

        Returns:
            e.g. ``generator:lab_rte(seed=0, n=100)``.
        """
        args = ", ".join([f"seed={self.seed}", *(f"{k}={v!r}" for k, v in self.kwargs.items())])
        return f"generator:{self.name}({args})"

    def load(self, split: str) -> list[dict]:
        """Generate one split.

        Args:
            split: the split name, passed to the generator.

        Returns:
            The generated examples.

        Raises:
            UserError: the generator rejects the YAML's arguments or returns something other
                than a list of dicts.
        """
        try:
            out = self._fn(split, self.seed, **self.kwargs)
        except TypeError as exc:
            if "argument" not in str(exc):
                raise
            raise UserError(
                f"generator {self.name!r} rejected its arguments: {exc}",
                file=self.file,
                key=self.key,
            ) from exc
        if not isinstance(out, list) or not all(isinstance(row, dict) for row in out):
            raise UserError(
                f"generator {self.name!r} must return a list of dicts, got {type(out).__name__}",
                file=self.file,
                key=self.key,
            )
        return out

    def __repr__(self) -> str:
        return f"GeneratorSource({self.describe()!r})"


# -- filtering ---------------------------------------------------------------------------------


class FilteredSource:
    """Another source, keeping only the examples for which a Jinja expression is true.

    Args:
        source: the source to filter.
        condition: a Jinja expression over the example's fields, e.g. ``label >= 0``; it runs
            in the same sandbox as templates.
        file: for error messages.
        key: for error messages.

    Raises:
        UserError: the expression does not parse.
    """

    def __init__(
        self,
        source: Source,
        condition: str,
        *,
        file: str | os.PathLike | None = None,
        key: str | None = None,
    ):
        self.source = source
        self.condition = condition
        self.file = os.fspath(file) if file is not None else None
        self.key = key
        self._test = compile_condition(condition, file=file, key=key)

    def describe(self) -> str:
        """A one-line description.

        Returns:
            The inner source's description and the condition.
        """
        return f"{self.source.describe()} where {self.condition}"

    def load(self, split: str) -> Sequence[dict]:
        """Load ``split`` from the inner source and keep the matching examples.

        Args:
            split: the split name.

        Returns:
            The kept examples (a view; rows are not copied).

        Raises:
            UserError: the condition fails on an example (e.g. a missing field).
        """
        rows = self.source.load(split)
        keep = [i for i, row in enumerate(rows) if self._test(row)]
        return Subset(rows, keep)

    def __repr__(self) -> str:
        return f"FilteredSource({self.describe()!r})"


# -- YAML --------------------------------------------------------------------------------------

_HUB_KEYS = {"hub", "name", "revision", "data_dir", "filter"}
_FILE_KEYS = {"files", "format", "split", "filter"}
_COMMON_KEYS = {"filter"}


def _check_str(value: Any, what: str, *, file, key, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        raise UserError(f"{what} must be a non-empty string", file=file, key=key)


def _guess_format(files: Any) -> str | None:
    first = files
    while isinstance(first, Mapping | list | tuple) and first:
        first = next(iter(first.values())) if isinstance(first, Mapping) else first[0]
    if isinstance(first, str):
        return _SUFFIX_FORMATS.get(Path(first).suffix.lower())
    return None


def source_from_spec(
    spec: Mapping[str, Any],
    *,
    file: str | os.PathLike | None = None,
    key: str | None = None,
) -> Source:
    """Build a source from its YAML form (see the module docstring).

    Args:
        spec: ``{hub: ..., name: ...}``, ``{files: ..., format: ..., split: ...}`` or
            ``{generator: ..., seed: ..., **kwargs}``; each may add ``filter``.
        file: the YAML file (relative globs are resolved against its directory).
        key: the spec's key in that file, e.g. ``tasks[2].source``.

    Returns:
        The source.

    Raises:
        UserError: a malformed spec, unknown keys, no matching files, an unknown generator;
            each names file and key.
    """
    if not isinstance(spec, Mapping):
        raise UserError(
            "a source is a mapping: {hub: ...}, {files: ..., format: ...} or {generator: ...}",
            file=file,
            key=key,
        )
    builders = {"hub": _hub_from_spec, "files": _files_from_spec, "generator": _generator_from_spec}
    given = [name for name in builders if name in spec]
    if len(given) != 1:
        raise UserError(
            "a source needs exactly one of 'hub', 'files' or 'generator'"
            + (f" (got {', '.join(given)})" if given else ""),
            file=file,
            key=key,
        )
    source = builders[given[0]](spec, file=file, key=key)
    condition = spec.get("filter")
    if condition is not None:
        _check_str(condition, "'filter'", file=file, key=sub_key(key, "filter"))
        source = FilteredSource(source, condition, file=file, key=sub_key(key, "filter"))
    return source


def _hub_from_spec(spec: Mapping[str, Any], *, file, key) -> HubSource:
    check_keys(file, key, spec, sorted(_HUB_KEYS), what="a hub source")
    for name in ("hub", "name", "revision", "data_dir"):
        _check_str(
            spec.get(name), f"'{name}'", file=file, key=sub_key(key, name), optional=name != "hub"
        )
    return HubSource(
        spec["hub"],
        spec.get("name"),
        revision=spec.get("revision"),
        data_dir=spec.get("data_dir"),
        file=file,
        key=key,
    )


def _files_from_spec(spec: Mapping[str, Any], *, file, key) -> FileSource:
    check_keys(file, key, spec, sorted(_FILE_KEYS), what="a files source")
    files = spec["files"]
    valid = isinstance(files, str) or (isinstance(files, list | Mapping) and len(files) > 0)
    if not valid:
        raise UserError(
            "'files' must be a glob, a list of globs, or {split: glob(s)}",
            file=file,
            key=sub_key(key, "files"),
        )
    fmt = spec.get("format") or _guess_format(files)
    if fmt is None:
        raise UserError(
            f"'format' is missing and cannot be guessed (one of: {', '.join(FILE_FORMATS)})",
            file=file,
            key=sub_key(key, "format"),
        )
    _check_str(fmt, "'format'", file=file, key=sub_key(key, "format"))
    split = spec.get("split", "train")
    _check_str(split, "'split'", file=file, key=sub_key(key, "split"))
    if "split" in spec and isinstance(files, Mapping):
        raise UserError(
            "'split' does not go with files given per split", file=file, key=sub_key(key, "split")
        )
    base_dir = Path(file).resolve().parent if file is not None else None
    infer = "split" not in spec and not isinstance(files, Mapping)
    return FileSource(
        files, fmt, split=split, infer_splits=infer, base_dir=base_dir, file=file, key=key
    )


def _generator_from_spec(spec: Mapping[str, Any], *, file, key) -> GeneratorSource:
    name = spec["generator"]
    _check_str(name, "'generator'", file=file, key=sub_key(key, "generator"))
    seed = spec.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError("'seed' must be an integer", file=file, key=sub_key(key, "seed"))
    kwargs = {str(k): v for k, v in spec.items() if k not in {"generator", "seed"} | _COMMON_KEYS}
    reserved = sorted({"file", "key"} & set(kwargs))
    if reserved:
        raise UserError(
            f"generator arguments may not be named {reserved[0]!r}",
            file=file,
            key=sub_key(key, reserved[0]),
        )
    return GeneratorSource(name, seed, file=file, key=sub_key(key, "generator"), **kwargs)


def source_fingerprint(source: Any) -> Any:
    """What a source's examples are made from, as JSON-able data: the content hash of every
    local file, the hub coordinates, the generator and its arguments, a filter's condition.
    Two sources with the same fingerprint hand out the same rows (a hub dataset without a
    pinned ``revision`` may still change upstream).

    Args:
        source: any source.

    Returns:
        A JSON-able description.
    """
    if isinstance(source, FileSource):
        files = {s: [[p, sha256_file(p)] for p in paths] for s, paths in source.files.items()}
        return {"files": files, "format": source.format}
    if isinstance(source, HubSource):
        return {
            "hub": source.path,
            "name": source.name,
            "revision": source.revision,
            "data_dir": source.data_dir,
        }
    if isinstance(source, GeneratorSource):
        return {"generator": source.name, "seed": source.seed, "kwargs": repr(source.kwargs)}
    if isinstance(source, FilteredSource):
        return {"filter": source.condition, "source": source_fingerprint(source.source)}
    return {"source": repr(source)}
