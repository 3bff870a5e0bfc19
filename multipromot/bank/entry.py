"""Bank entries as records: names and references, ``meta.json``, the model identity a prompt
was trained on, and the on-disk names. The store (:mod:`multipromot.bank.store`) reads and
writes them; nothing here touches the disk except :func:`base_model_record`, which may load a
model to fingerprint it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from multipromot.data.sources import source_fingerprint
from multipromot.data.templates import FormatSignature
from multipromot.errors import BankError
from multipromot.fsio import content_sha256, json_sha256
from multipromot.models import load_model, model_fingerprint, read_lineage

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "BankEntry",
    "BankProblem",
    "parse_ref",
    "format_ref",
    "validate_task_name",
    "describe_model",
    "base_model_record",
    "format_record",
    "definition_fingerprint",
    "check_definition",
    "signature_from_record",
    "INDEX_SCHEMA_VERSION",
    "META_SCHEMA_VERSION",
]

INDEX_SCHEMA_VERSION = 1
META_SCHEMA_VERSION = 1
INDEX_FILE = "index.json"
LOCK_FILE = ".lock"
PROMPT_FILE = "prompt.safetensors"
META_FILE = "meta.json"
TENSOR_KEY = "prompt"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_META_FILE = "multipromot_meta.json"  # provenance next to a PEFT export; PEFT ignores it
PEFT_TENSOR_KEY = "prompt_embeddings"
# each JSON file carries the sha256 of the rest of its content: a flipped byte anywhere is an
# error naming the file, never a silently different current version, format or score
INDEX_CHECKSUM_KEY = "checksum"
META_CHECKSUM_KEY = "meta_sha256"

TASK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
VERSION_DIR_RE = re.compile(r"^v(\d{4,})$")
VERSION_REF_RE = re.compile(r"^v?(\d+)$")
RESERVED_TASK_NAMES = {INDEX_FILE}
META_REQUIRED = ("task", "version", "prompt_length", "dim", "base_model", "sha256", "created")


# ----------------------------------------------------------------------------- names and refs


def validate_task_name(task: str) -> str:
    """Check that ``task`` is safe to use as a directory name inside the bank.

    Args:
        task: a task name such as ``rte`` or ``wmt14_en_fr``.

    Returns:
        the name, unchanged.

    Raises:
        BankError: the name is empty, has a path separator or ``..``, or uses other characters
            than letters, digits, ``_``, ``.`` and ``-`` (first character a letter or digit).
    """
    if not isinstance(task, str) or not TASK_RE.match(task) or ".." in task:
        raise BankError(
            "bad task name: use letters, digits, '_', '.', '-' (starting with a letter or digit), "
            "no path separators or '..'",
            key=repr(task),
        )
    if task in RESERVED_TASK_NAMES or len(task) > 128:
        raise BankError("task name is reserved or longer than 128 characters", key=repr(task))
    return task


def format_ref(task: str, version: int) -> str:
    """The canonical reference of an entry, e.g. ``rte@v0002``."""
    return f"{task}@{version_dir(version)}"


def parse_ref(ref: str) -> tuple[str, int | None]:
    """Split a reference into (task, version); version is None when the ref names the task.

    Accepted forms: ``rte`` (the task; its current version where one entry is meant),
    ``rte@v2``, ``rte@2``, ``rte@v0002``.

    Raises:
        BankError: the task name or the version is malformed.
    """
    if not isinstance(ref, str) or not ref:
        raise BankError("empty bank reference; expected TASK or TASK@vN", key=repr(ref))
    task, sep, version = ref.partition("@")
    validate_task_name(task)
    if not sep:
        return task, None
    match = VERSION_REF_RE.match(version)
    if not match or int(match.group(1)) < 1:
        raise BankError("bad version; expected TASK@vN with N >= 1 (rte@v2, rte@0002)", key=ref)
    return task, int(match.group(1))


def version_dir(version: int) -> str:
    return f"v{version:04d}"


def parse_version_dir(name: str) -> int | None:
    """Version number of a canonical ``v<NNNN>`` directory name, else None."""
    match = VERSION_DIR_RE.match(name)
    if not match or version_dir(int(match.group(1))) != name:
        return None  # "v00001" would alias v0001; only the canonical spelling is an entry
    version = int(match.group(1))
    return version if version >= 1 else None


# ----------------------------------------------------------------------------- records


def definition_fingerprint(task: Any) -> str:
    """A sha256 of what defines a task for its prompt: its source (local files: the train
    files' content, wherever they are, since a prompt learns from train and new test rows do
    not make it another task's; hub coordinates; a generator and its arguments), its template
    and answer choices. Two tasks of one name with different definitions (an inline ``rte``
    and the catalogue's) get different fingerprints, so a prompt tuned for one is refused for
    the other.

    Args:
        task: a :class:`multipromot.data.tasks.Task`.
    """

    def content_only(value: Any) -> Any:
        if isinstance(value, dict):
            if "files" in value and "format" in value:
                train = value["files"].get(task.source_split("train"), [])
                return {"train": [digest for _, digest in train], "format": value["format"]}
            return {k: content_only(v) for k, v in value.items()}
        return value

    record = {
        "source": content_only(source_fingerprint(task.source)),
        "template": task.template.jinja,
        "answer_choices": task.template.answer_choices,
    }
    return json_sha256(record)


def format_record(task: Any) -> dict:
    """An entry's ``format``: the template id, answer choices and input signature of the task a
    prompt is tuned on (what the router matches inputs against; :attr:`BankEntry.signature`
    reads it back), and the fingerprint of the task's definition
    (:func:`definition_fingerprint`; :func:`check_definition` compares it).

    Args:
        task: a :class:`multipromot.data.tasks.Task` (its ``template`` and ``answers``).
    """
    sig = task.template.signature
    return {
        "template": task.template.id,
        "answer_choices": task.answers,
        "signature": {"pieces": list(sig.pieces), "answers": sig.answers and list(sig.answers)},
        "definition": definition_fingerprint(task),
    }


def check_definition(entry: BankEntry, task: Any) -> None:
    """Refuse a prompt tuned for another definition of ``task``'s name.

    Entries without a recorded definition (imported from PEFT, or written by an older
    multipromot) are not compared.

    Raises:
        BankError: naming the entry, when its recorded definition differs.
    """
    recorded = entry.format.get("definition")
    if recorded is None or recorded == definition_fingerprint(task):
        return
    raise BankError(
        f"was tuned for another definition of task {task.name!r} (its source, template or "
        "answer choices differ, e.g. an inline task of that name elsewhere); tune a prompt "
        "for this definition (multipromot stage1) or give the task another name",
        file=entry.meta_path,
        key=entry.ref,
    )


def signature_from_record(data: Any, *, key: str | None = None) -> FormatSignature | None:
    """A signature from an entry's ``format.signature`` (or a signature object).

    Args:
        data: ``{"pieces": [...], "answers": [...] | None}``, an object with ``.pieces`` and
            ``.answers``, or None.
        key: the bank entry, for error messages.

    Returns:
        The signature, or None when ``data`` is None or has no non-blank piece (such a template
        has no literal text to recognise it by).

    Raises:
        BankError: ``data`` is not of that shape.
    """
    if data is None:
        return None
    if isinstance(data, Mapping):
        pieces, answers = data.get("pieces"), data.get("answers")
    elif hasattr(data, "pieces"):
        pieces, answers = data.pieces, getattr(data, "answers", None)
    else:
        raise BankError("format.signature must be {pieces: [...], answers: [...]}", key=key)
    if not isinstance(pieces, Sequence) or isinstance(pieces, str):
        raise BankError("format.signature.pieces must be a list of strings", key=key)
    if answers is not None and (not isinstance(answers, Sequence) or isinstance(answers, str)):
        raise BankError("format.signature.answers must be a list of strings or null", key=key)
    if not all(isinstance(p, str) for p in pieces) or not all(
        isinstance(a, str) for a in answers or ()
    ):
        raise BankError("format.signature holds a value that is not a string", key=key)
    if not any(p.strip() for p in pieces):
        return None
    return FormatSignature(pieces=tuple(pieces), answers=tuple(answers) if answers else None)


@dataclass(frozen=True)
class BankEntry:
    """One immutable version of one task's prompt.

    Attributes:
        task: the task name.
        version: the version number (1, 2, ...).
        path: the entry's directory ``<root>/<task>/v<NNNN>``.
        meta: the parsed ``meta.json``.
        current: whether this is the task's current version.
    """

    task: str
    version: int
    path: Path
    meta: dict = field(repr=False)
    current: bool = False

    @property
    def ref(self) -> str:
        """Canonical reference, e.g. ``rte@v0002``."""
        return format_ref(self.task, self.version)

    @property
    def prompt_path(self) -> Path:
        return self.path / PROMPT_FILE

    @property
    def meta_path(self) -> Path:
        return self.path / META_FILE

    @property
    def prompt_length(self) -> int:
        return int(self.meta["prompt_length"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def fingerprint(self) -> str:
        return str(self.meta["base_model"]["fingerprint"])

    @property
    def stage2(self) -> list[dict]:
        return list(self.meta.get("stage2") or [])

    @property
    def format(self) -> dict:
        """The task format the prompt was tuned on (:func:`format_record`; {} when unknown)."""
        return dict(self.meta.get("format") or {})

    @property
    def signature(self) -> FormatSignature | None:
        """The input format the router recognises this task by (None: no literal text).

        Raises:
            BankError: the entry's ``format.signature`` is malformed.
        """
        return signature_from_record(
            self.format.get("signature"), key=f"{self.task}: format.signature"
        )

    def summary(self) -> dict:
        """The entry's line in ``index.json`` and in ``bank list --json``."""
        stage1 = self.meta.get("stage1") or None
        return {
            "ref": self.ref,
            "task": self.task,
            "version": self.version,
            "current": self.current,
            "prompt_length": self.prompt_length,
            "dim": self.dim,
            "init": self.meta.get("init"),
            "base_model": self.meta["base_model"].get("name"),
            "fingerprint": self.fingerprint,
            "stage1": (
                {"metric": stage1.get("metric"), "value": stage1.get("value")} if stage1 else None
            ),
            "created": self.meta.get("created"),
            "sha256": self.meta.get("sha256"),
            "stage2_checkpoints": len(self.stage2),
        }


@dataclass(frozen=True)
class BankProblem:
    """One finding of :meth:`PromptBank.verify`; ``str()`` gives one line."""

    entry: str | None
    file: str
    message: str

    def __str__(self) -> str:
        return ": ".join(p for p in (self.file, self.entry, self.message) if p)

    def to_dict(self) -> dict:
        return {"entry": self.entry, "file": self.file, "message": self.message}


# ----------------------------------------------------------------------------- helpers


def export_dir(bank_root: str | os.PathLike, out_dir: str | os.PathLike, *, key: str) -> Path:
    """Check where an export (PEFT, vLLM) will write, before anything is written: outside the
    bank (a folder in it breaks its layout), a new or empty directory, under a folder that
    exists or can be made, and writable.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        BankError: naming ``out_dir`` and the entry.
    """
    out = Path(out_dir)
    if out.resolve().is_relative_to(Path(bank_root).resolve()):
        raise BankError(
            "is inside the prompt bank; export to a folder outside it (an adapter folder in the "
            "bank breaks its layout)",
            file=out,
            key=key,
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BankError("exists and is not an empty directory; choose a new one", file=out, key=key)
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise BankError(f"cannot be made: {parent} is a file, not a folder", file=out, key=key)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BankError(f"cannot be made: {parent} is not writable", file=out, key=key)
    return out


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def jsonable(value: Any, *, key: str) -> Any:
    """Plain JSON data from dataclasses, tuples and paths (e.g. a template's FormatSignature)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v, key=key) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v, key=key) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    torch = sys.modules.get("torch")  # a tensor exists only once torch was imported
    if torch is not None and isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # NaN/inf are not JSON; a score that was never measured is null
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise BankError(f"cannot store a {type(value).__name__} in meta.json", key=key)


def checksum_problem(data: dict, key: str) -> str | None:
    """Why ``data`` fails its embedded checksum, or None. Files written before checksums were
    added have none; they are accepted (a flip inside the key's name leaves the rest intact)."""
    if key not in data or data[key] == content_sha256(data, key):
        return None
    return "checksum mismatch: the file was modified or is corrupt"


def meta_bytes(meta: dict) -> bytes:
    meta = {**meta, META_CHECKSUM_KEY: content_sha256(meta, META_CHECKSUM_KEY)}
    return (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()


def model_dim(model: nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[-1])


def model_dir(model: nn.Module) -> str:
    name = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    return str(name or "")


def describe_model(model: nn.Module, name: str | None = None) -> dict:
    """The ``base_model`` record of a prompt trained on ``model``.

    Args:
        model: the (frozen) model the prompt was trained on.
        name: where it loads from; defaults to ``model.name_or_path``. A local directory is
            recorded as an absolute path, so the entry stays loadable from any working dir.

    Returns:
        ``{"name": ..., "fingerprint": ...}``.
    """
    name = name or model_dir(model)
    if name and Path(name).is_dir():
        name = os.fspath(Path(name).resolve())  # a relative path would break from another cwd
    return {"name": name, "fingerprint": model_fingerprint(model)}


def base_model_record(name_or_path: str) -> dict:
    """The ``base_model`` record of a model given by path, without loading it when possible.

    A directory saved by :func:`multipromot.models.save_model` carries its fingerprint; any other
    model is loaded (CPU) and fingerprinted.

    Raises:
        UserError: the model cannot be loaded.
    """
    record = read_lineage(name_or_path) if Path(name_or_path).is_dir() else {}
    if record.get("fingerprint"):
        return {"name": str(name_or_path), "fingerprint": record["fingerprint"]}
    model, _, path = load_model(str(name_or_path))
    return {"name": path, "fingerprint": model_fingerprint(model)}


def validate_base_model(base_model: dict, *, key: str) -> dict:
    if (
        not isinstance(base_model, dict)
        or not isinstance(base_model.get("name"), str)
        or not isinstance(base_model.get("fingerprint"), str)
        or not base_model["fingerprint"]
    ):
        raise BankError(
            "base_model must be {'name': <loadable path or hub id>, 'fingerprint': <str>} "
            "(see bank.describe_model)",
            key=key,
        )
    return jsonable(base_model, key=key)


def validate_prompt(prompt: torch.Tensor, *, key: str) -> torch.Tensor:
    import torch  # deferred: torch imports slowly (listing a bank needs none)

    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or 0 in prompt.shape:
        shape = tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__
        raise BankError(f"prompt must be a non-empty tensor [P, d], got {shape}", key=key)
    if not prompt.is_floating_point():
        raise BankError(f"prompt must be floating point, got {prompt.dtype}", key=key)
    prompt = prompt.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if not torch.isfinite(prompt).all():
        raise BankError("prompt has NaN or infinite values; refusing to store it", key=key)
    return prompt
