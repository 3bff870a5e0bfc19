"""The lab: generated task families and a small model pretrained on them (the embedded demo).

Importing this package registers the lab generators with :mod:`multipromot.sources` and stays
light (no torch): the model side (:mod:`multipromot.lab.model`) is imported on first use of
one of its names, e.g. ``multipromot.lab.ensure_lab_model``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from multipromot.lab.tasks import DEFAULT_SIZES, FAMILIES, PRETRAIN_FAMILIES, SPLITS, generate
from multipromot.lab.world import WORLD_SEED, World, get_world

__all__ = [
    "DEFAULT_SIZES",
    "FAMILIES",
    "PRETRAIN_FAMILIES",
    "SPLITS",
    "WORLD_SEED",
    "World",
    "generate",
    "get_world",
    "register_generators",
    # from multipromot.lab.model, imported lazily
    "LabConfig",
    "ensure_lab_model",
    "evaluate_lab_model",
    "train_lab_model",
    "build_lab_tokenizer",
    "build_lab_model",
    "lab_tasks",
    "read_pretrain_record",
]

_MODEL_NAMES = {
    "LabConfig", "ensure_lab_model", "evaluate_lab_model", "train_lab_model",
    "build_lab_tokenizer", "build_lab_model", "lab_tasks", "read_pretrain_record",
}  # fmt: skip


def register_generators() -> None:
    """Register every lab family as a source generator (idempotent)."""
    from multipromot import sources
    from multipromot.lab import tasks

    for family in FAMILIES:
        if family not in sources.GENERATORS:
            sources.register_generator(family)(getattr(tasks, family))


def __getattr__(name: str) -> Any:
    if name in _MODEL_NAMES:
        return getattr(importlib.import_module("multipromot.lab.model"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


register_generators()
# models.build_builtin("lab") imports this package and then looks the name up: register the
# builtin when the models module is already loaded (importing it here would import torch).
if "multipromot.models" in sys.modules:
    importlib.import_module("multipromot.lab.model")
