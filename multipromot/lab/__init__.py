"""The lab: generated task families and a small model pretrained on them (the embedded demo).

The lab sits on top of the library and plugs in through the public registries only: importing
it (the package root does) registers its generators as data sources, its catalogue file
(``catalogue.yaml``: one task per family) and the built-in models ``lab`` (T5) and
``lab-llama`` (decoder-only). Nothing in the
library imports the lab.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from multipromot.data.catalogue import CATALOGUE_FILES, register_catalogue_file
from multipromot.data.sources import GENERATORS, register_generator
from multipromot.lab import tasks
from multipromot.lab.tasks import DEFAULT_SIZES, FAMILIES, PRETRAIN_FAMILIES, SPLITS, generate
from multipromot.lab.world import WORLD_SEED, World, get_world
from multipromot.lazy import exports
from multipromot.models import BUILTIN_MODELS, register_builtin_dir

# The lab models' code (torch, transformers) loads when a lab model is built or these names are
# used, not when the package is imported (multipromot.lazy: start-up time).
_MODEL = "multipromot.lab.model"
__getattr__ = exports(
    globals(),
    {
        name: f"{_MODEL}:{name}"
        for name in (
            "LAB_DECODER_RECIPE",
            "LabConfig",
            "build_lab_model",
            "build_lab_tokenizer",
            "ensure_lab_model",
            "evaluate_lab_model",
            "lab_tasks",
            "read_pretrain_record",
            "train_lab_model",
        )
    },
)
if TYPE_CHECKING:
    from multipromot.lab.model import (
        LabConfig,
        build_lab_model,
        build_lab_tokenizer,
        ensure_lab_model,
        evaluate_lab_model,
        lab_tasks,
        read_pretrain_record,
        train_lab_model,
    )

__all__ = [
    "DEFAULT_SIZES",
    "FAMILIES",
    "PRETRAIN_FAMILIES",
    "SPLITS",
    "WORLD_SEED",
    "World",
    "generate",
    "get_world",
    "register",
    "LabConfig",
    "ensure_lab_model",
    "evaluate_lab_model",
    "train_lab_model",
    "build_lab_tokenizer",
    "build_lab_model",
    "lab_tasks",
    "read_pretrain_record",
]


def register() -> None:
    """Register the lab's generators, catalogue file and built-in models (idempotent: what is
    registered already stays)."""
    for family in FAMILIES:
        if family not in GENERATORS:
            register_generator(family)(getattr(tasks, family))
    register_catalogue_file(Path(__file__).with_name("catalogue.yaml"))
    # The cached lab model is rebuilt when its recorded lab version or recipe differs.
    if "lab" not in BUILTIN_MODELS:
        register_builtin_dir("lab", _ensure_lab)
    if "lab-llama" not in BUILTIN_MODELS:
        register_builtin_dir("lab-llama", _ensure_lab_llama)


def _ensure_lab(path: Path, seed: int):
    # through the package's attribute: loaded on first use (and patchable in tests)
    return sys.modules[__name__].ensure_lab_model(path, seed=seed)


def _ensure_lab_llama(path: Path, seed: int):
    lab = sys.modules[__name__]
    return lab.ensure_lab_model(path, seed=seed, size="llama-small", **lab.LAB_DECODER_RECIPE)


register()
# What the lab registered is built in: a registry reset (in tests) keeps it.
GENERATORS.mark_builtins()
CATALOGUE_FILES.mark_builtins()
BUILTIN_MODELS.mark_builtins()
