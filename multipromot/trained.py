"""One call loads a trained model folder for research code: the model, its tokenizer, the prompt
versions it was trained with and its router (USER-STORIES story 13).

A stage-2 model folder (``methods/<m>/final``, ``best``) records in ``stage2.json``
(:class:`~multipromot.train.stage2_export.Stage2Record`) the bank its prompts come from, their
refs and their content (sha256). :func:`load_trained` loads exactly those:

- a newer version that became current in the bank since changes nothing;
- a bank recreated since, whose refs now name other prompts, is an error naming the entry
  (never a silently different prompt);
- other versions may be asked for (``refs=``, or ``refs="current"``): they are loaded, with an
  :class:`~multipromot.errors.UnpinnedPromptWarning` naming what the model records. The bank
  itself says the same when research code builds a table by hand for such a model
  (``PromptedModel.from_bank``).

``run``, ``eval`` and the lm-eval bridge read a model's prompts through
:func:`recorded_prompts` and build its table with :func:`prompt_table`, so a script and the
report agree on which prompts a model had.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from multipromot.bank import PromptBank
from multipromot.data.collate import Collator
from multipromot.data.tasks import get_task, list_tasks, local_tasks
from multipromot.errors import UnpinnedPromptWarning, UserError
from multipromot.eval.generation import predict
from multipromot.features import SEPARATOR, Item
from multipromot.methods import method_kind
from multipromot.models import is_encoder_decoder, load_model
from multipromot.router import Router, calibrated_router, router_entries
from multipromot.router.base import RouterEntry
from multipromot.soft_prompt import PromptedModel
from multipromot.train import lora
from multipromot.train.stage2_export import RECORD_FILE, Stage2Record

__all__ = ["TrainedModel", "load_trained", "recorded_prompts", "model_prompts", "prompt_table"]


@dataclass
class TrainedModel:
    """What :func:`load_trained` gives.

    Attributes:
        model: the model with its prompt table (a :class:`PromptedModel`; LoRA kinds: their
            adapted model, same interface); rows follow ``tasks``.
        tokenizer: its tokenizer.
        router: picks each input's prompt (or none); None when asked for no router or the
            model has no prompts.
        tasks: the task of each prompt-table row.
        refs: task -> the bank ref of its prompt ({} without prompts).
        sha256: task -> that prompt's content.
        bank: the bank the prompts came from, or None.
        path: the model folder.
        record: its ``stage2.json`` (None for a model stage 2 did not make).
    """

    model: Any
    tokenizer: Any
    router: Router | None
    tasks: list[str]
    refs: dict[str, str] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)
    bank: PromptBank | None = None
    path: Path | None = None
    record: Stage2Record | None = None

    def route(self, texts: Sequence[str]) -> list[str | None]:
        """The task whose prompt each input gets (None: no prompt)."""
        if self.router is None:
            return [None] * len(texts)
        return [r.task for r in self.router.route(list(texts))]

    def generate(
        self,
        texts: Sequence[str],
        *,
        tasks: Sequence[str | None] | None = None,
        max_new_tokens: int = 32,
        num_beams: int = 1,
        batch_size: int = 32,
        max_input_length: int = 512,
    ) -> list[str]:
        """Generate for each input with its routed prompt (or ``tasks``' prompts), greedily.

        An input may be a k-shot prompt in multipromot's layout (exemplars joined by
        ``features.SEPARATOR`` in front of the input): over-long ones lose whole exemplars first.

        Returns:
            One decoded output per input.
        """
        chosen = list(tasks) if tasks is not None else self.route(texts)
        rows = {name: i for i, name in enumerate(self.tasks)}
        items = []
        for text, task in zip(texts, chosen, strict=True):
            *exemplars, last = str(text).split(SEPARATOR)
            items.append(Item(rows[task] if task is not None else -1, last, "", exemplars))
        collator = Collator(
            self.tokenizer,
            decoder_only=not is_encoder_decoder(self.model.model),
            max_input_length=max_input_length,
            for_generation=True,
        )
        return predict(
            self.model,
            self.tokenizer,
            items,
            collator,
            batch_size=batch_size,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
        )


def recorded_prompts(
    model_dir: str | Path, tasks: Sequence[str] | None = None, *, bank: str | Path | None = None
) -> tuple[str, dict[str, str], dict[str, str]]:
    """The bank, refs and content a stage-2 model folder records for ``tasks`` (default: all
    its prompts), checked against the bank: ``(bank folder, task -> ref, task -> sha256)``.

    Args:
        model_dir: the model folder.
        tasks: the tasks whose prompts are wanted.
        bank: look the refs up in this bank instead of the recorded one (a moved bank); the
            content must still be the recorded one.

    Raises:
        UserError: not a stage-2 folder, no prompt recorded for one of ``tasks``, the recorded
            bank is gone, or an entry holds another prompt than the recorded one (the bank was
            recreated since).
    """
    model_dir = Path(model_dir)
    record = Stage2Record.read(model_dir)
    if (model_dir / "prompts.safetensors").is_file():
        raise UserError(
            "holds prompts.safetensors, the unchecksummed prompt table of an older "
            "multipromot; run stage 2 of this method again to store it as a bank",
            file=model_dir,
        )
    tasks = list(record.bank_refs) if tasks is None else list(tasks)
    folder = Path(bank) if bank is not None else record.prompt_bank(model_dir)
    missing = sorted(set(tasks) - set(record.bank_refs))
    if missing or folder is None:
        raise UserError(
            f"records no prompt for {', '.join(missing or tasks)}", file=model_dir / RECORD_FILE
        )
    if not folder.is_dir():
        raise UserError(
            f"names the prompt bank {folder}, which does not exist (moved or deleted?); "
            "pass the bank's new folder",
            file=model_dir / RECORD_FILE,
            key="bank_dir",
        )
    refs = {t: record.bank_refs[t] for t in tasks}
    content = {t: record.bank_sha256[t] for t in tasks if t in record.bank_sha256}
    PromptBank(folder).check_content(refs, content, record=model_dir / RECORD_FILE)
    return str(folder), refs, PromptBank(folder).content(refs)


def prompt_table(model, bank: PromptBank, tasks: Sequence[str], refs: Mapping[str, str]):
    """``model`` with the prompts ``refs`` name for ``tasks`` (row i = ``tasks[i]``).

    Raises:
        UserError: the prompts differ in length (they cannot share one table).
        BankError: from the bank: a missing, corrupt or foreign entry.
    """
    try:
        return PromptedModel.from_bank(model, bank, list(tasks), refs=dict(refs))
    except ValueError as e:  # prompts of different lengths cannot share one table
        raise UserError(str(e), file=bank.root, key="bank") from None


def load_trained(
    path: str | Path,
    *,
    bank: str | Path | None = None,
    refs: Mapping[str, str] | str | None = None,
    router: bool = True,
    seed: int = 0,
) -> TrainedModel:
    """Load a model folder with its tokenizer, its prompts and its router.

    Args:
        path: a stage-2 model folder (``methods/<m>/final``), or any model ``load_model``
            accepts (a base model gets the prompts of ``bank``, if given).
        bank: the prompt bank. For a stage-2 model: where to find the refs it records (default:
            the bank ``stage2.json`` names); their content is checked. For any other model:
            the bank whose current entries (accepted by the model's fingerprint) to load.
        refs: load other prompts than the model records: ``{task: ref}`` or ``"current"`` (the
            bank's current versions). Said with an :class:`UnpinnedPromptWarning`.
        router: build the router (signature match, then the similarity fallback calibrated
            on local tasks, as ``run`` and ``route`` do).
        seed: the seed of a built-in model and of the router's calibration.

    Returns:
        The :class:`TrainedModel`.

    Raises:
        UserError: the model or its prompts cannot be loaded (see :func:`recorded_prompts`).
    """
    hf_model, tokenizer, model_path = load_model(str(path), seed=seed)
    hf_model.eval()
    folder = Path(model_path)
    record = Stage2Record.read(folder) if Stage2Record.exists(folder) else None
    kind = method_kind(record.mode, file=folder / RECORD_FILE, key="mode") if record else None
    if kind is not None and kind.adapters == "per_task":
        return _adapted(hf_model, tokenizer, folder, record, router, seed)
    store, pinned, content = model_prompts(hf_model, folder, bank)
    if refs is not None and store is not None:
        pinned, content = _other_prompts(store, folder, pinned, content, refs)
    tasks = list(pinned)
    prompted = prompt_table(hf_model, store, tasks, pinned) if store else PromptedModel(hf_model)
    routing = None
    if router and tasks:
        known = [get_task(t) for t in tasks if t in list_tasks()]
        routing = calibrated_router(
            router_entries(store, pinned), known, negatives=local_tasks(exclude=tasks), seed=seed
        )
    return TrainedModel(prompted, tokenizer, routing, tasks, pinned, content, store, folder, record)


def model_prompts(
    hf_model, folder: str | Path, bank: str | Path | None, *, key: str = "bank"
) -> tuple[PromptBank | None, dict[str, str], dict[str, str]]:
    """A model's prompts: ``(bank, task -> ref, task -> sha256)``. A stage-2 model with prompts
    gets the ones it records (:func:`recorded_prompts`; ``bank`` only says where to find
    them); any other model the current entries of ``bank`` that it accepts (its fingerprint
    or lineage); (None, {}, {}) without a bank.

    Raises:
        UserError: ``bank`` is not a folder, or the recorded prompts cannot be loaded.
    """
    folder = Path(folder)
    record = Stage2Record.read(folder) if Stage2Record.exists(folder) else None
    if record is not None and record.bank_refs:
        where, pinned, content = recorded_prompts(folder, bank=bank)
        return PromptBank(where), pinned, content
    if bank is None or not str(bank):
        return None, {}, {}
    if not Path(bank).is_dir():
        raise UserError("no prompt bank here (not a directory)", file=bank, key=key)
    store = PromptBank(bank)
    accepted = store.accepted_fingerprints(hf_model)
    current = [e for e in store.entries() if e.current and e.fingerprint in accepted]
    pinned = {e.task: e.ref for e in sorted(current, key=lambda e: e.task)}
    return store, pinned, store.content(pinned)


def _other_prompts(store, folder, pinned: dict, content: dict, refs) -> tuple[dict, dict]:
    """The prompts asked for instead of the recorded ones, each difference said out loud."""
    if refs == "current":
        wanted = {task: store.get(task).ref for task in pinned}
    elif isinstance(refs, Mapping):
        wanted = {**pinned, **{task: store.get(ref).ref for task, ref in refs.items()}}
    else:
        raise UserError(f"must be a mapping task -> ref or 'current', got {refs!r}", key="refs")
    now = store.content(wanted)
    for task, ref in wanted.items():
        if task in content and now[task] != content[task]:
            warnings.warn(
                f"{folder}: task {task} gets {ref}, but the model was trained with "
                f"{pinned[task]} (sha256 {content[task][:12]}...); load_trained without refs "
                "loads the prompts it was trained with",
                UnpinnedPromptWarning,
                stacklevel=3,
            )
    return wanted, now


def _adapted(hf_model, tokenizer, folder: Path, record: Stage2Record, router: bool, seed: int):
    """A LoRA kind with an adapter per task (``promot_lora``): the task adapters on the
    weights, routed by each task's template signature."""
    tasks = list(record.tasks)
    adapted = lora.load_adapters(hf_model, folder / lora.ADAPTERS_DIR, tasks).eval()
    routing = None
    if router:
        known = [get_task(t) for t in tasks if t in list_tasks()]
        entries = [RouterEntry(t.name, t.template.signature) for t in known]
        routing = calibrated_router(entries, known, negatives=local_tasks(exclude=tasks), seed=seed)
    return TrainedModel(adapted, tokenizer, routing, tasks, path=folder, record=record)
