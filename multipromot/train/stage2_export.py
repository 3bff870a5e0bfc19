"""What stage 2 leaves behind: a model folder (``best/``, ``final/``) and its record,
``stage2.json`` (:class:`Stage2Record`, the one reader and writer of that file).

A stage-2 model folder holds, all written into a staging folder and published in one rename
(:func:`multipromot.fsio.publish_dir`), so the folder is complete or absent, never half-written:

- the weights + tokenizer + ``multipromot.json`` (lineage: the fingerprint of these weights and
  of the base model they descend from), loadable with ``from_pretrained``;
- LoRA kinds: ``adapters/`` in peft's format (``train.lora``);
- kinds whose prompts exist only here (``MethodKind.stores_prompts``: ``joint`` trained them,
  ``random_prompt`` drew them): ``prompt_bank/``, a checksummed bank of their own;
- ``stage2.json``, written last: what the model is (kind, mixture, tasks, shots, the step it
  was taken at and why) and which prompts it was trained with (bank folder and refs).

``final/`` is ``best/`` copied (when ``keep_best_by`` selected a step) or the last step
exported; the bank entries it used then record it (``bank show`` lists the models trained with
a prompt).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from multipromot.bank import PromptBank
from multipromot.errors import UserError
from multipromot.fsio import publish_dir, temp_dir_for, write_json
from multipromot.methods import MethodKind
from multipromot.models import read_lineage, record_prompts, save_model
from multipromot.soft_prompt import PromptedModel
from multipromot.train import distributed as D
from multipromot.train import lora
from multipromot.train.export import export_sharded

__all__ = ["Stage2Record", "RECORD_FILE", "PROMPT_BANK_DIR", "export_model", "finish"]

RECORD_FILE = "stage2.json"
# Inside a model folder: the prompts of the kinds that store their own, as a bank.
PROMPT_BANK_DIR = "prompt_bank"


@dataclass
class Stage2Record:
    """``stage2.json`` of a stage-2 model folder.

    Attributes:
        base_model: ``{"name", "fingerprint"}`` of the model stage 2 started from.
        parents: the base model's own lineage (fingerprints), oldest last.
        mode: the method kind (``stage2.mode``).
        mixture: the stage-2 mixture's name.
        tasks: its tasks, in task-id order.
        bank_dir: where the prompts are: an absolute bank folder, or ``prompt_bank`` (relative
            to the model folder) for the kinds that store their own; None without prompts.
        bank_refs: task -> bank ref of each task's prompt ({} without prompts).
        bank_sha256: task -> the sha256 of that prompt (what the ref named when stage 2
            trained; a recreated bank may give the same ref to another prompt). {} in the
            records of an older multipromot.
        prompt_shape: ``[tasks, P, d]`` of the prompt table, or None.
        dtype: the weights' dtype.
        shots: exemplars per stage-2 example, and ``shots_from`` what decided it;
            ``shots_kept``: per task, the exemplars its inputs kept on average within
            ``stage2.max_input_length`` (the collator drops whole exemplars that do not fit).
        step: the stage-2 step of these weights; ``selected_by`` (``metric``, ``loss`` or
            ``last``) and ``value`` say why that step.
        settings: the config sections that shape the kind (``MethodKind.settings``: ``hft``,
            ``lora``, ``sdft``), stored as top-level keys.
        replay: the stage-2 mixture's replay (``Replay.record()``: share, shots, task rates);
            {} without one. Written only when set.
        targets: ``sdft``: what the base model's rewrite did (``train.sdft.distilled``: rows
            rewritten, kept and changed per task, seconds, the cache folder); {} for the other
            kinds. Written only when set.
    """

    base_model: dict
    parents: list[str]
    mode: str
    mixture: str
    tasks: list[str]
    bank_dir: str | None
    bank_refs: dict[str, str]
    prompt_shape: list[int] | None
    dtype: str
    shots: int = 0
    shots_from: str = ""
    shots_kept: dict[str, float] = field(default_factory=dict)
    step: int = 0
    selected_by: str = "last"
    value: float | None = None
    bank_sha256: dict[str, str] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    replay: dict = field(default_factory=dict)
    targets: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        data = asdict(self)
        optional = ("replay", "targets")  # absent when empty: other records stay as they were
        data = {k: v for k, v in data.items() if k != "settings" and (k not in optional or v)}
        return {**data, **self.settings}

    def write(self, folder: str | Path) -> None:
        """Write ``folder/stage2.json`` (atomically)."""
        write_json(Path(folder) / RECORD_FILE, self.to_json(), indent=2)

    @classmethod
    def read(cls, folder: str | Path) -> Stage2Record:
        """The record of a stage-2 model folder.

        Raises:
            UserError: no ``stage2.json`` (not a stage-2 model folder), or one that is not
                valid JSON or lacks a field.
        """
        path = Path(folder) / RECORD_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError("missing: not a stage-2 model directory", file=path) from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"not valid JSON ({e})", file=path) from None
        required = (
            "base_model",
            "parents",
            "mode",
            "mixture",
            "tasks",
            "bank_dir",
            "bank_refs",
            "prompt_shape",
            "dtype",
        )
        missing = [n for n in required if n not in data] if isinstance(data, dict) else required
        if missing:
            raise UserError(f"is not a stage-2 record (no {', '.join(missing)})", file=path)
        names = [f for f in cls.__dataclass_fields__ if f != "settings"]
        known = {n: data[n] for n in names if n in data}
        settings = {k: v for k, v in data.items() if k not in names}
        return cls(**known, settings=settings)

    @staticmethod
    def exists(folder: str | Path) -> bool:
        """Whether ``folder`` is a complete stage-2 model folder (its record is written last)."""
        return (Path(folder) / RECORD_FILE).is_file()

    def prompt_bank(self, folder: str | Path) -> Path | None:
        """The bank folder of this model's prompts (a relative ``bank_dir`` is the model
        folder's own bank), or None when it was trained without prompts."""
        if not self.bank_refs or not self.bank_dir:
            return None
        bank = Path(self.bank_dir)
        return bank if bank.is_absolute() else Path(folder) / bank


def export_model(
    prompted,
    build: Callable[[], PromptedModel],
    tokenizer,
    dest: Path,
    record: Stage2Record,
    kind: MethodKind,
    *,
    shard_bytes: int | None = None,
) -> None:
    """Write the model folder ``dest`` (see the module docstring); a collective under FSDP.

    By default the shards are gathered into one CPU copy on rank 0 (``save_pretrained``);
    with ``shard_bytes`` (``stage2.export_shard_size``) the weights stream out tensor by
    tensor into sharded safetensors + an index (:mod:`multipromot.train.export`).

    Args:
        prompted: the (possibly sharded) PromptedModel or LoRA-adapted model.
        build: builds the same structure unsharded (for the gathered copy).
        tokenizer: saved next to the weights.
        dest: the folder to (re)place.
        record: its ``stage2.json`` (the own prompt bank's refs are filled in here).
        kind: the method kind's table entry.
        shard_bytes: stream sharded safetensors of at most this size.
    """
    name = f"stage2:{record.mode}:{record.mixture}"
    parents = [record.base_model["fingerprint"], *record.parents]
    staging = temp_dir_for(dest) if D.is_main() else None
    prompts = None
    if shard_bytes is not None:
        export_sharded(
            prompted.model,
            tokenizer,
            staging,
            max_shard_bytes=shard_bytes,
            name=name,
            parents=parents,
        )
        plain = None
        if kind.stores_prompts:  # the full table on rank 0 (gathered: a collective)
            prompts = dict(D.iter_full_tensors(prompted, ["prompts"])).get("prompts")
    else:
        plain = D.gather_full_model(prompted, build) if D.is_distributed() else prompted
        if kind.stores_prompts and plain is not None:
            prompts = plain.prompts.detach()

    def write() -> None:
        try:
            if kind.adapters is not None:  # weights + the adapters in peft's format
                lora.export(
                    plain,
                    tokenizer,
                    staging,
                    name=name,
                    parents=parents,
                    merge=kind.adapters == "shared",
                )
            elif shard_bytes is None:
                save_model(plain.model, tokenizer, staging, name=name, parents=parents)
            if kind.stores_prompts:
                record.bank_dir = PROMPT_BANK_DIR
                record.bank_refs = _own_prompt_bank(prompts, staging, dest, record)
                record.bank_sha256 = PromptBank(staging / PROMPT_BANK_DIR).content(record.bank_refs)
            if record.bank_refs:  # the bank warns when other prompts are loaded for it
                record_prompts(
                    staging,
                    {
                        t: {"ref": ref, "sha256": record.bank_sha256.get(t)}
                        for t, ref in record.bank_refs.items()
                    },
                )
            record.write(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        publish_dir(staging, dest)

    D.on_rank0(write)


def _own_prompt_bank(prompts: torch.Tensor, staging: Path, dest: Path, record: Stage2Record):
    """Store the prompt table in ``staging/prompt_bank`` (one entry per task, trained on the
    weights next to it, named by their final folder ``dest``); returns task -> ref."""
    bank = PromptBank(staging / PROMPT_BANK_DIR)
    base = {"name": str(dest.resolve()), "fingerprint": read_lineage(staging)["fingerprint"]}
    refs = {}
    for i, task in enumerate(record.tasks):
        entry = bank.add(
            task,
            prompts[i].detach(),
            base_model=base,
            init=record.mode,
            extra={"stage2_mode": record.mode, "mixture": record.mixture},
        )
        refs[task] = entry.ref
    return refs


def finish(
    out: Path,
    best_step: int | None,
    export_last: Callable[[Path], None],
    *,
    bank_dir: str | None,
    bank_refs: dict[str, str],
) -> Path:
    """Make ``out/final``: ``best/`` copied when a step was selected, else ``export_last``
    (which exports the current weights to the folder it is given); then note in the bank
    entries stage 2 started from (``bank_dir``, ``bank_refs``) that ``final`` was trained
    with them. Returns ``final``."""
    final = out / "final"
    if best_step is not None and Stage2Record.exists(out / "best"):
        D.on_rank0(_copy_dir, out / "best", final)
    else:
        export_last(final)

    def note_use() -> None:
        bank = PromptBank(bank_dir)
        for ref in bank_refs.values():
            bank.record_stage2(ref, final.resolve())

    if bank_refs:
        D.on_rank0(note_use)
    return final


def _copy_dir(src: Path, dst: Path) -> None:
    """Replace ``dst`` by a copy of ``src``; a kill leaves the old ``dst`` or the new one."""
    tmp = temp_dir_for(dst)
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    publish_dir(tmp, dst)
