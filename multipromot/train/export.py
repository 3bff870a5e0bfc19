"""Export a (sharded) stage-2 model as sharded safetensors + an index, without gathering it.

``stage2.export_shard_size: 5GB`` writes ``final/`` (and ``best/``) the way ``save_pretrained``
writes a large model: ``model-00001-of-0000N.safetensors`` files of at most that size (one
tensor bigger than the limit gets a file of its own) and ``model.safetensors.index.json``
mapping every weight to its file, next to ``config.json``, the tokenizer and the lineage record.
``from_pretrained`` loads it as it loads any hub checkpoint.

Under FSDP the weights are all-gathered one tensor at a time and rank 0 keeps at most one file's
worth in memory (:func:`~multipromot.train.distributed.iter_full_tensors`), so a model larger
than one rank's memory can still be exported. Tensors keep the training dtype (the dtype the
sharded parameters have; mixed precision only casts the gathered compute copies).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from multipromot.fsio import publish_dir, temp_dir_for, write_durably
from multipromot.models import LINEAGE_FILE, model_fingerprint
from multipromot.train import distributed as D

__all__ = ["INDEX_FILE", "export_sharded", "export_names"]

INDEX_FILE = "model.safetensors.index.json"


def export_names(model: nn.Module) -> list[str]:
    """The state-dict names to store: every parameter once (a tied weight under its first
    name, as ``save_pretrained`` does; ``from_pretrained`` ties it again) and the persistent
    buffers."""
    first = {name for name, _ in model.named_parameters()}
    every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return [name for name in model.state_dict() if name in first or name not in every]


def export_sharded(
    model: nn.Module, tokenizer, dest: Path, *, max_shard_bytes: int, name: str, parents: list[str]
) -> str:
    """Write ``model`` (a transformers model, sharded or not) to ``dest`` in shards.

    A collective under FSDP: every rank calls it; only rank 0 writes.

    Args:
        model: the transformers model (``PromptedModel.model``).
        tokenizer: saved next to the weights.
        dest: the directory to (re)place atomically.
        max_shard_bytes: the largest file to write (a bigger single tensor gets its own).
        name: the lineage record's name.
        parents: fingerprints of the models this one descends from.

    Returns:
        The model's fingerprint (every rank).
    """
    fingerprint = model_fingerprint(model)  # a collective too: samples every gathered tensor
    tmp = temp_dir_for(dest) if D.is_main() else None
    shards: list[list[str]] = []
    weight_map: dict[str, int] = {}
    current: dict[str, torch.Tensor] = {}
    size = total = 0
    error: BaseException | None = None
    # Every rank must take part in every tensor's all-gather: a write that fails on rank 0
    # (disk full) is kept until the loop ends, then raised on every rank, instead of leaving
    # the other ranks waiting in the next collective.
    for key, tensor in D.iter_full_tensors(model, export_names(model)):
        if error is not None:
            continue
        try:
            nbytes = tensor.numel() * tensor.element_size()
            if current and size + nbytes > max_shard_bytes:
                _write_shard(tmp, len(shards), current)
                shards.append(list(current))
                current, size = {}, 0
            current[key] = tensor.contiguous()
            size += nbytes
            total += nbytes
            weight_map[key] = len(shards)
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            error = e

    def finish() -> None:
        if error is not None:
            raise error
        if current:
            _write_shard(tmp, len(shards), current)
            shards.append(list(current))
        _finish(
            model,
            tokenizer,
            tmp,
            dest,
            shards,
            weight_map,
            total,
            {"name": name, "fingerprint": fingerprint, "lineage": list(parents)},
        )

    try:
        D.on_rank0(finish)  # rank 0's error, if any, is raised on every rank
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return fingerprint


def _shard_file(i: int, n: int | None) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n else f"part-{i:05d}.safetensors"


def _write_shard(tmp: Path, i: int, tensors: dict[str, torch.Tensor]) -> None:
    # The final name needs the shard count, known only at the end: renamed in _finish.
    save_file(tensors, str(tmp / _shard_file(i, None)), metadata={"format": "pt"})


def _finish(model, tokenizer, tmp: Path, dest: Path, shards, weight_map, total, lineage) -> None:
    n = len(shards)
    for i in range(n):
        (tmp / _shard_file(i, None)).rename(tmp / _shard_file(i, n))
    index = {
        "metadata": {"total_size": total},
        "weight_map": {key: _shard_file(i, n) for key, i in sorted(weight_map.items())},
    }
    write_durably(tmp / INDEX_FILE, json.dumps(index, indent=2).encode())
    model.config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    write_durably(tmp / LINEAGE_FILE, json.dumps(lineage, indent=2).encode())
    dest.parent.mkdir(parents=True, exist_ok=True)
    publish_dir(tmp, dest)
