"""Sharded, atomic, exactly resumable training checkpoints.

A checkpoint is a directory ``<root>/step_<N>/``:

- ``.metadata`` + ``__<rank>_0.distcp``: model and optimizer state written by
  ``torch.distributed.checkpoint`` (dcp), each rank its own shards; it loads into any world
  size, sharded or not, because keys are the model's parameter names.
- ``trainer_state.json``: step, world size, scheduler, the sampler state of every rank, the
  Python and NumPy RNG states of every rank, and what the caller adds (loss history, best
  metric, bank entries used).
- ``rng.safetensors``: the torch (and CUDA) RNG state of every rank.

Elastic resume: a checkpoint written by N ranks loads into M. dcp reshards the model and the
optimizer by parameter name; the sampler's global stream position is the same for every rank
count (rank ``r`` of ``W`` draws positions ``r, r + W, ...``), so each new rank continues at
its own first position after it (:func:`reshard_sampler_state`). RNG: ranks below N restore
rank ``r``'s saved torch/CUDA/Python/NumPy states; new ranks start from a seed derived from
(step, rank). Data order needs no RNG, so only dropout draws differ from a run that never
changed size (and they already differ between world sizes).

Atomicity: everything is written into ``step_<N>.tmp``; only when every rank has finished does
rank 0 rename it to ``step_<N>`` and then point ``<root>/latest`` at it with ``os.replace``. A
kill at any moment leaves the previous checkpoint complete and ``latest`` naming a complete
checkpoint (or, between the rename and the pointer update, the previous one); leftover ``.tmp``
directories are never read and are removed by the next save.

Asynchronous saves (:class:`BackgroundCheckpointer`, ``stage2.async_save``): the step's state is
copied to CPU memory (dcp's staging) and captured (sampler, RNG, trainer state) at once, then
a thread writes the shards while training continues; only once every rank's shards are on
disk does rank 0 write the trainer state and checksums and publish, exactly as above. At most
one save is in flight: the next save, a preemption and the end of training wait for it, so
the ``.tmp`` directory of a save being written is never cleared, and pruning only ever sees
published checkpoints. A kill while a save is in flight leaves the previous checkpoint as
``latest``.

Loading never runs code from the checkpoint: JSON and safetensors are data; dcp loads its tensor
files with ``torch.load(weights_only=True)`` and, here, its non-tensor values too (dcp's default
planner would unpickle them in full); dcp's ``.metadata`` is a pickle, read here with an
unpickler that only builds dcp's own metadata classes. Still, treat a checkpoint directory from
someone else like any other input you did not make.

Why one module of this size: writing and the safe reading of sharded checkpoints (checksums,
restricted unpickler) must stay together: a format change touches both.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from multipromot.errors import UserError
from multipromot.fsio import fsync_dir, sha256_file, write_atomic, write_durably
from multipromot.train import distributed as dist_utils

__all__ = [
    "LATEST_FILE",
    "TRAINER_STATE_FILE",
    "save_checkpoint",
    "load_checkpoint",
    "read_trainer_state",
    "latest_checkpoint",
    "resolve_resume",
    "is_complete",
    "verify_checkpoint",
    "prune_checkpoints",
    "reshard_sampler_state",
    "BackgroundCheckpointer",
]

LATEST_FILE = "latest"
TRAINER_STATE_FILE = "trainer_state.json"
RNG_FILE = "rng.safetensors"
CHECKSUMS_FILE = "checksums.json"  # sha256 of every other file, plus its own
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


# -- finding checkpoints ---------------------------------------------------------------------


def is_complete(path: str | os.PathLike) -> bool:
    """A published checkpoint: named ``step_<N>`` with dcp metadata and the trainer state."""
    path = Path(path)
    return (
        _STEP_DIR.match(path.name) is not None
        and (path / ".metadata").is_file()
        and (path / TRAINER_STATE_FILE).is_file()
        and (path / CHECKSUMS_FILE).is_file()
    )


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The checkpoint ``<root>/latest`` names, or else the highest complete ``step_<N>``.

    The fallback covers a kill between publishing a re-saved step and updating the pointer.
    """
    root = Path(root)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        name = pointer.read_bytes().decode("utf-8", errors="replace").strip()
        if _STEP_DIR.match(name) and is_complete(root / name):  # a bare name: no path escapes
            return root / name
    steps = [p for p in root.glob("step_*") if is_complete(p)] if root.is_dir() else []
    return max(steps, key=lambda p: int(p.name.split("_")[1]), default=None)


def resolve_resume(root: str | os.PathLike, resume: str) -> Path | None:
    """Which checkpoint a run continues from.

    Args:
        root: the run's checkpoint directory.
        resume: ``""`` = the latest one if there is one, else start fresh; ``latest`` = the
            latest one, which must exist; anything else = that checkpoint directory.

    Returns:
        The checkpoint directory, or None to start fresh.

    Raises:
        UserError: ``latest`` with no checkpoint, or a path that is not a complete checkpoint.
    """
    if resume == "":
        return latest_checkpoint(root)
    if resume == "latest":
        found = latest_checkpoint(root)
        if found is None:
            raise UserError(f"no checkpoint to resume from in {root}", key="stage2.resume")
        return found
    path = Path(resume)
    if not is_complete(path):
        raise UserError(
            f"{resume} is not a complete checkpoint (a step_<N> directory with .metadata and "
            f"{TRAINER_STATE_FILE})",
            key="stage2.resume",
        )
    return path


def prune_checkpoints(
    root: str | os.PathLike, keep_last: int, protect: set[int] = ()
) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints of ``root``.

    Never deleted: the one ``latest`` names, and the steps in ``protect`` (the best step so
    far). ``keep_last <= 0`` keeps everything. Call on rank 0 after a save.

    Returns:
        The deleted checkpoint directories.
    """
    root = Path(root)
    if keep_last <= 0 or not root.is_dir():
        return []
    steps = sorted(
        (p for p in root.glob("step_*") if is_complete(p)), key=lambda p: int(p.name.split("_")[1])
    )
    latest = latest_checkpoint(root)
    keep = set(steps[-keep_last:]) | {latest} | {root / f"step_{s}" for s in protect}
    removed = []
    for path in steps:
        if path not in keep:
            # Renamed first: a kill midway leaves a .old directory (cleared by the next
            # save), never a half-deleted step_<N> that looks complete.
            old = path.with_name(path.name + ".old")
            os.replace(path, old)
            shutil.rmtree(old, ignore_errors=True)
            removed.append(path)
    return removed


def read_trainer_state(path: str | os.PathLike) -> dict:
    """The JSON trainer state of a checkpoint.

    Raises:
        UserError: missing or unreadable.
    """
    file = Path(path) / TRAINER_STATE_FILE
    try:
        state = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read the trainer state ({e})", file=file) from None
    if state.get("format") != FORMAT_VERSION:
        raise UserError(f"unknown checkpoint format {state.get('format')!r}", file=file)
    return state


# -- saving ----------------------------------------------------------------------------------


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    sampler=None,
    state: dict | None = None,
) -> Path:
    """Write ``<root>/step_<step>`` atomically and point ``<root>/latest`` at it.

    A collective: every rank calls it with its own (sharded) model, optimizer and sampler.

    Args:
        root: the run's checkpoint directory.
        step: the number of optimizer steps taken.
        model: the (possibly FSDP-sharded) model.
        optimizer: its optimizer.
        scheduler: an LR scheduler (its ``state_dict`` must be JSON-able, as LambdaLR's is).
        sampler: anything with a JSON-able ``state_dict()``; every rank's is kept.
        state: more JSON-able trainer state (loss history, best metric, bank entries, ...).

    Returns:
        The published checkpoint directory.
    """
    root, tmp, final = _prepare_dirs(root, step)
    tensors = _state_tensors(model, optimizer)
    with _quiet_single_process():
        dcp.save(tensors, storage_writer=FileSystemWriter(tmp), no_dist=_no_dist())
    trainer, ranks = _trainer_state(step, scheduler, sampler, state)
    dist_utils.on_rank0(_write_trainer_files, tmp, trainer, ranks)
    dist_utils.on_rank0(_publish, root, tmp, final)
    return final


class BackgroundCheckpointer:
    """Writes checkpoints while training continues (``torch.distributed.checkpoint.async_save``).

    :meth:`save` is the collective :func:`save_checkpoint` is, but returns once the state is
    copied to CPU memory; a thread writes the shards, then (on rank 0) the trainer state and
    checksums, and publishes. At most one save is in flight: :meth:`save` first waits for the
    previous one, and :meth:`wait` must be called before a preemption exit or the end of
    training. Under a process group, the background writes talk over a gloo group of their
    own, so they never interleave with the training's collectives.

    The staged copy costs host memory the size of this rank's model and optimizer shards.
    """

    def __init__(self) -> None:
        # dcp's async_save needs a CPU backend; created once, collectively, on every rank.
        self._group = dist_utils.new_cpu_group()
        if _no_dist():
            # dcp's thread says on every save that it assumes one process (as the synchronous
            # path's _quiet_single_process hides): we know.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        self._pending: Future | None = None

    def save(
        self,
        root: str | os.PathLike,
        step: int,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler=None,
        sampler=None,
        state: dict | None = None,
    ) -> Path:
        """Start writing ``<root>/step_<step>``; the arguments are :func:`save_checkpoint`'s.

        Returns:
            The directory the checkpoint will have once :meth:`wait` returns.
        """
        self.wait()  # its .tmp directory would otherwise be cleared as stale below
        root, tmp, final = _prepare_dirs(root, step)
        tensors = _state_tensors(model, optimizer)
        trainer, ranks = _trainer_state(step, scheduler, sampler, state)
        with _quiet_single_process():
            written = dcp.async_save(
                tensors,
                storage_writer=FileSystemWriter(tmp),
                process_group=self._group,
                no_dist=_no_dist(),
            )

        def finish() -> Path:
            written.result()
            # dcp.save ends in a collective: once rank 0's write returns, every rank's shards
            # and the metadata are on disk.
            if dist_utils.is_main():
                _write_trainer_files(tmp, trainer, ranks)
                _publish(root, tmp, final)
            return final

        thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending = thread.submit(finish)
        thread.shutdown(wait=False)  # the thread ends once finish() returns
        return final

    def wait(self) -> Path | None:
        """Wait for the save in flight; its published directory, or None if there was none.
        A collective under a process group (every rank learns whether rank 0 published).

        Raises:
            Whatever the background write raised (a full disk, ...).
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        try:
            result, error = pending.result(), None
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            result, error = None, e

        def outcome() -> Path:
            if error is not None:
                raise error
            return result

        # Only rank 0 writes the trainer state and publishes: its outcome is every rank's (a
        # failed shard write already fails on every rank: dcp's save is a collective).
        shared = dist_utils.on_rank0(outcome)
        if error is not None:
            raise error
        return shared


def _prepare_dirs(root: str | os.PathLike, step: int) -> tuple[Path, Path, Path]:
    """(root, the ``.tmp`` directory to write into, the final ``step_<N>`` name)."""
    root = Path(root)
    tmp = root / f"step_{step}.tmp"
    dist_utils.on_rank0(_fresh_tmp_dir, root, tmp)
    return root, tmp, root / f"step_{step}"


def _state_tensors(model: nn.Module, optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    tensors: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        tensors["optim"] = get_optimizer_state_dict(model, optimizer)
    return tensors


def _trainer_state(step: int, scheduler, sampler, state: dict | None) -> tuple[dict, list | None]:
    """The JSON trainer state and every rank's sampler and RNG states (on rank 0): a
    collective, taken at the moment of the save."""
    ranks = dist_utils.gather_object(_local_state(sampler))
    trainer = {
        **(state or {}),
        "format": FORMAT_VERSION,
        "step": int(step),
        "world_size": dist_utils.world_size(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
    }
    # A snapshot (a background save writes it later, while the loss history keeps growing).
    return json.loads(json.dumps(trainer)), ranks


def _no_dist() -> bool:
    return not dist_utils.is_distributed()


@contextlib.contextmanager
def _quiet_single_process():
    # dcp warns on every call without a process group that it assumes one process: we know.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fresh_tmp_dir(root: Path, tmp: Path) -> None:
    # Leftovers of killed saves are never read; clear them so they cannot pile up.
    if root.is_dir():
        for stale in [*root.glob("step_*.tmp"), *root.glob("step_*.old")]:
            shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)


def _local_state(sampler) -> dict:
    """This rank's sampler position and RNG states (gathered to rank 0 for writing)."""
    np_state = np.random.get_state()
    return {
        "sampler": sampler.state_dict() if sampler is not None else None,
        "python": _jsonable_random_state(random.getstate()),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def _jsonable_random_state(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _write_trainer_files(tmp: Path, trainer: dict, ranks: list[dict]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    rng = []
    for r, local in enumerate(ranks):
        tensors[f"rank{r}.torch"] = local["torch"]
        tensors[f"rank{r}.numpy_keys"] = local["numpy"]["keys"]
        if local["cuda"] is not None:
            tensors[f"rank{r}.cuda"] = local["cuda"]
        numpy_rest = {k: v for k, v in local["numpy"].items() if k != "keys"}
        rng.append({"python": local["python"], "numpy": numpy_rest})
    trainer = {**trainer, "sampler": [local["sampler"] for local in ranks], "rng": rng}
    save_file(tensors, str(tmp / RNG_FILE))
    write_durably(tmp / TRAINER_STATE_FILE, json.dumps(trainer, indent=1).encode())
    _write_checksums(tmp)


def _write_checksums(tmp: Path) -> None:
    """Hash every file of the checkpoint (all ranks' shards are written by now: dcp.save is a
    collective), so a flipped byte anywhere is caught before it is loaded."""
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.name != CHECKSUMS_FILE}
    body = json.dumps(files, sort_keys=True)
    record = {"files": files, "sha256": hashlib.sha256(body.encode()).hexdigest()}
    write_atomic(tmp / CHECKSUMS_FILE, json.dumps(record, indent=1).encode())


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Check every file of a checkpoint against its recorded sha256.

    Raises:
        UserError: a missing, extra-damaged or altered file, named in one line.
    """
    path = Path(path)
    record_file = path / CHECKSUMS_FILE
    try:
        record = json.loads(record_file.read_bytes().decode())
        files = record["files"]
        body = json.dumps(files, sort_keys=True)
        intact = hashlib.sha256(body.encode()).hexdigest() == record["sha256"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(
            f"unreadable checksum record ({type(e).__name__})", file=record_file
        ) from None
    if not intact:
        raise UserError("checksum record does not match its own content", file=record_file)
    for name, expected in files.items():
        file = path / name
        if "/" in name or name.startswith("..") or not file.is_file():
            raise UserError("missing from the checkpoint", file=file)
        if sha256_file(file) != expected:
            raise UserError("checksum mismatch: the file changed after it was saved", file=file)


def _publish(root: Path, tmp: Path, final: Path) -> None:
    """Rename the finished ``.tmp`` into place, then move the ``latest`` pointer to it."""
    old = None
    if final.exists():  # the same step saved again after resuming from an earlier checkpoint
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(root)
    write_atomic(root / LATEST_FILE, f"{final.name}\n".encode())
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- loading ---------------------------------------------------------------------------------


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    sampler=None,
    restore_rng: bool = True,
) -> dict:
    """Load a checkpoint into freshly built objects; continue exactly where it was saved.

    A collective: every rank calls it. The model and optimizer load into any world size
    (sharded or not). With the same world size the sampler and RNG states continue exactly;
    with another, a :class:`~multipromot.data.sampler.MixtureSampler` continues the same
    global stream and the RNG follows the module docstring's rule. Pass only ``model``
    (``restore_rng=False``) to read the weights alone.

    Args:
        path: a ``step_<N>`` directory.
        model: the model, built like the one that was saved (sharded or not).
        optimizer: its optimizer, freshly built (its state is created, then overwritten).
        scheduler: its LR scheduler.
        sampler: its sampler (this rank's state is restored).
        restore_rng: restore this rank's torch, CUDA, Python and NumPy RNG states.

    Returns:
        The trainer state (``step``, and whatever was saved with ``state=``).

    Raises:
        UserError: an unreadable checkpoint, or a different world size where it matters.
    """
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(path)
    verify_checkpoint(path)
    trainer = read_trainer_state(path)
    saved_world = int(trainer["world_size"])
    same_world = saved_world == dist_utils.world_size()
    sampler_state = None
    if sampler is not None:  # checked before the collective load, so a refusal is clean
        sampler_state = (
            trainer["sampler"][dist_utils.rank()]
            if same_world
            else reshard_sampler_state(trainer["sampler"], sampler, path)
        )
    _check_metadata(path)
    tensors: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        tensors["optim"] = get_optimizer_state_dict(model, optimizer)
    try:
        with _quiet_single_process():
            dcp.load(
                tensors,
                storage_reader=_SafeReader(path),
                planner=_SafeLoadPlanner(),
                no_dist=_no_dist(),
            )
    except CheckpointException as e:  # dcp gathers every rank's failure into one of these
        exc = next(iter(e.failures.values()))[0]
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(
            f"cannot load the checkpoint ({type(exc).__name__}: {first})", file=path
        ) from None
    set_model_state_dict(model, tensors["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, tensors["optim"])
    if scheduler is not None and trainer.get("scheduler") is not None:
        scheduler.load_state_dict(trainer["scheduler"])
    if sampler is not None:
        sampler.load_state_dict(sampler_state)
    if restore_rng:
        if dist_utils.rank() < saved_world:
            _restore_rng(path, trainer, dist_utils.rank())
        else:
            _seed_new_rank(int(trainer["step"]), dist_utils.rank())
    return trainer


def reshard_sampler_state(saved: list[dict], sampler, path: Path | None = None) -> dict:
    """This rank's sampler state continuing a stream that ``len(saved)`` ranks were drawing.

    Every saved rank drew the same number of rows per step, so rank ``r`` stood at global
    position ``P + r`` with ``P`` rank 0's position: ``P`` is where the stream continues. A
    one-rank copy of ``sampler``'s stream, loaded at ``P``, walks ``sampler.rank`` positions
    on to give this rank's first position and the per-task counts there.

    Args:
        saved: every saved rank's ``state_dict()``, in rank order.
        sampler: this rank's freshly built MixtureSampler (its mixture, seed, split, rank and
            world size are the new layout).
        path: the checkpoint, for error messages.

    Returns:
        A state for ``sampler.load_state_dict``.

    Raises:
        UserError: the saved ranks do not stand at consecutive positions of one stream.
    """
    start = int(saved[0]["position"])
    for r, state in enumerate(saved):
        if int(state["position"]) != start + r or int(state["world_size"]) != len(saved):
            raise UserError(
                f"cannot reshard the data stream: rank {r} stood at position "
                f"{state['position']}, expected {start + r}",
                file=path,
                key="stage2.resume",
            )
    one = type(sampler)(
        sampler.mixture, seed=sampler.seed, rank=0, world_size=1, split=sampler.split
    )
    one.load_state_dict({**saved[0], "rank": 0, "world_size": 1})
    one.take(sampler.rank)
    return {**one.state_dict(), "rank": sampler.rank, "world_size": sampler.world_size}


def _seed_new_rank(step: int, rank: int) -> None:
    # A rank the checkpoint did not have: a seed fixed by (step, rank), so resuming the same
    # checkpoint with the same world size twice gives the same run.
    seed = (step * 1_000_003 + rank) % 2**32
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _restore_rng(path: Path, trainer: dict, rank: int) -> None:
    tensors = load_file(str(path / RNG_FILE))
    torch.set_rng_state(tensors[f"rank{rank}.torch"])
    if torch.cuda.is_available() and f"rank{rank}.cuda" in tensors:
        torch.cuda.set_rng_state(tensors[f"rank{rank}.cuda"])
    saved = trainer["rng"][rank]
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    keys = tensors[f"rank{rank}.numpy_keys"].numpy().astype(np.uint32)
    np_rest = saved["numpy"]
    np.random.set_state(
        ("MT19937", keys, np_rest["pos"], np_rest["has_gauss"], np_rest["cached_gaussian"])
    )


class _MetadataUnpickler(pickle.Unpickler):
    """Builds dcp's metadata classes and nothing else (no functions, no arbitrary objects)."""

    _ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata",)
    _ALLOWED = {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.distributed.checkpoint.planner", "LoadItemType"),
        ("torch.distributed.checkpoint.planner", "WriteItemType"),
        ("torch.serialization", "_get_layout"),  # maps "torch.strided" to the layout object
        ("torch", "Size"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PureWindowsPath"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str):
        allowed = (
            module in self._ALLOWED_MODULES
            or (module, name) in self._ALLOWED
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_metadata(path: Path):
    with open(path, "rb") as f:
        return _MetadataUnpickler(f).load()


def _check_metadata(path: Path) -> None:
    """Read ``.metadata`` safely once up front, so a bad one is one clear error, not an
    exception wrapped by dcp's collective machinery."""
    file = path / ".metadata"
    try:
        _read_metadata(file)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise UserError(f"unreadable checkpoint metadata ({e})", file=file) from None


class _SafeLoadPlanner(DefaultLoadPlanner):
    """dcp's load planner, reading the non-tensor values (optimizer step counts, param groups)
    with ``torch.load(weights_only=True)``; dcp's own planner unpickles them in full."""

    def load_bytes(self, read_item, value) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class _SafeReader(FileSystemReader):
    """dcp's file reader with the metadata pickle read by :class:`_MetadataUnpickler`."""

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        metadata = _read_metadata(Path(self.path) / name)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
