"""PEFT interop: a bank entry as a prompt-tuning adapter that ``peft.PeftModel`` loads, and
back. The bank's own files stay the source of truth; exports carry the entry's meta in a side
file PEFT ignores, so an import restores the provenance.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from multipromot.bank.entry import (
    PEFT_CONFIG_FILE,
    PEFT_META_FILE,
    PEFT_TENSOR_KEY,
    PEFT_WEIGHTS_FILE,
    BankEntry,
    export_dir,
    validate_task_name,
)
from multipromot.errors import BankError
from multipromot.fsio import temp_dir_for, write_durably
from multipromot.models import read_lineage

__all__ = ["export_peft", "import_peft"]

# The functions take the bank (a multipromot.bank.store.PromptBank) as an argument: the store
# calls them from its methods, so this module cannot import it.


def export_peft(
    bank: Any,
    ref: str,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Write an entry as a PEFT prompt-tuning adapter that ``PeftModel.from_pretrained`` loads.

    Writes ``adapter_config.json`` (peft's own ``PromptTuningConfig``: P virtual tokens,
    token_dim d, one transformer submodule, i.e. the prompt goes on the encoder input
    only, as in the bank), ``adapter_model.safetensors`` with ``prompt_embeddings`` [P, d],
    and ``multipromot_meta.json`` (the entry's meta, which :meth:`import_peft` reads back).

    Args:
        ref: the entry.
        out_dir: a new (or empty) directory.
        base_model_name_or_path: recorded in the adapter config; default: the entry's
            ``base_model.name``.
        task_type: ``SEQ_2_SEQ_LM`` or ``CAUSAL_LM``; default: read from the base model's
            config (``is_encoder_decoder``).

    Returns:
        the output directory.

    Raises:
        BankError: bad entry, a non-empty ``out_dir``, or a task type that cannot be told.
    """
    from peft import PromptTuningConfig, TaskType  # deferred: peft imports slowly

    entry = bank.get(ref)
    prompt = bank.load_prompt(entry)
    base = base_model_name_or_path or entry.meta["base_model"].get("name") or None
    task_type = _peft_task_type(task_type, base, key=entry.ref)
    out = export_dir(bank.root, out_dir, key=entry.ref)
    config = PromptTuningConfig(
        task_type=TaskType(task_type),
        num_virtual_tokens=entry.prompt_length,
        token_dim=entry.dim,
        num_transformer_submodules=1,  # encoder-side prompt only, as PromptedModel does
        base_model_name_or_path=base,
        inference_mode=True,  # what PeftModel.save_pretrained writes
    )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir_for(out)  # the umask's mode (mkdtemp's 0700 hid the export from others)
    except OSError as e:  # e.g. a read-only or virtual file system (/proc)
        raise BankError(f"cannot be written ({e.strerror or e})", file=out, key=entry.ref) from None
    try:
        config.save_pretrained(os.fspath(tmp))
        # bytes written through fsio (save_file makes the file 0600, whatever the umask)
        from safetensors.torch import save as save_safetensors  # deferred: imports torch

        weights = save_safetensors({PEFT_TENSOR_KEY: prompt}, metadata={"format": "pt"})
        write_durably(tmp / PEFT_WEIGHTS_FILE, weights)
        meta = json.dumps({**entry.meta, "exported_from": entry.ref}, indent=2)
        write_durably(tmp / PEFT_META_FILE, meta.encode())
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def import_peft(
    bank: Any,
    adapter_dir: str | os.PathLike,
    task: str,
    *,
    base_model: dict | None = None,
    init: str | None = None,
    format: dict | None = None,
    stage1: dict | None = None,
) -> BankEntry:
    """Read a PEFT prompt-tuning adapter into a new version of ``task``.

    Only safetensors weights are read (``adapter_model.bin`` is refused: never unpickle).
    For a seq2seq adapter saved with two transformer submodules, PEFT's prompt tuning only
    ever prepends the first P rows (encoder side), so those are imported.

    Args:
        adapter_dir: the adapter directory.
        task: the bank task to add a version to.
        base_model: ``{"name", "fingerprint"}``; default: from ``multipromot_meta.json`` if
            the adapter was exported by multipromot, else from the adapter config's
            ``base_model_name_or_path`` when that is a directory saved by multipromot.
        init, format, stage1: as in :meth:`add`; default from ``multipromot_meta.json``.

    Returns:
        the new entry.

    Raises:
        BankError: not a prompt-tuning adapter, pickled weights, wrong shapes, or an
            unknown base model.
    """
    src = Path(adapter_dir)
    validate_task_name(task)
    config_path = src / PEFT_CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise BankError("no adapter_config.json; not a PEFT adapter directory", file=src) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BankError(f"not valid JSON ({e})", file=config_path) from None
    if not isinstance(config, dict):
        raise BankError(f"must be a JSON object, not a {type(config).__name__}", file=config_path)
    if config.get("peft_type") != "PROMPT_TUNING":
        raise BankError(
            f"peft_type is {config.get('peft_type')!r}; only PROMPT_TUNING adapters hold a soft prompt",
            file=config_path,
            key="peft_type",
        )
    weights = src / PEFT_WEIGHTS_FILE
    if not weights.is_file():
        pickled = (
            " (adapter_model.bin is pickled; multipromot never unpickles)"
            if (src / "adapter_model.bin").exists()
            else ""
        )
        raise BankError(f"no adapter_model.safetensors{pickled}", file=src)
    try:
        from safetensors.torch import load as load_safetensors_bytes  # deferred: imports torch

        tensors = load_safetensors_bytes(weights.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise BankError(f"not a readable safetensors file ({e})", file=weights) from None
    if PEFT_TENSOR_KEY not in tensors:
        raise BankError(f"no 'prompt_embeddings' tensor (found {sorted(tensors)})", file=weights)
    embeddings = tensors[PEFT_TENSOR_KEY]
    p, d = config.get("num_virtual_tokens"), config.get("token_dim")
    submodules = config.get("num_transformer_submodules") or 1
    if embeddings.dim() != 2 or tuple(embeddings.shape) != (p * submodules, d):
        raise BankError(
            f"prompt_embeddings is {tuple(embeddings.shape)}, the config says "
            f"[{p} x {submodules}, {d}]",
            file=weights,
        )
    prompt = embeddings[:p]
    sidecar = _read_sidecar(src / PEFT_META_FILE)
    if base_model is None:
        base_model = sidecar.get("base_model") or _base_model_from_config(config, config_path)
    width = _model_width((base_model or {}).get("name"))
    if width is not None and width != prompt.shape[1]:
        raise BankError(
            f"the prompt is {prompt.shape[1]} wide, the base model "
            f"{base_model['name']} embeds tokens in {width}",
            file=weights,
        )
    return bank.add(
        task,
        prompt,
        base_model=base_model,
        init=init or sidecar.get("init") or f"peft:{config.get('prompt_tuning_init', 'RANDOM')}",
        format=format if format is not None else sidecar.get("format"),
        stage1=stage1 if stage1 is not None else sidecar.get("stage1"),
        extra={
            "imported_from": os.fspath(src.resolve()),
            "peft_exported_from": sidecar.get("exported_from"),
        },
    )


def _model_width(name: str | None) -> int | None:
    """The embedding width of a local model directory (from its config.json), or None when it
    is not a local model (nothing is downloaded to check)."""
    config_file = Path(name) / "config.json" if name else None
    if config_file is None or not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    for key in ("d_model", "hidden_size", "n_embd"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def _peft_task_type(task_type: str | None, base: str | None, *, key: str) -> str:
    """SEQ_2_SEQ_LM or CAUSAL_LM, given or read from the base model's config."""
    aliases = {
        "seq2seq": "SEQ_2_SEQ_LM",
        "seq_2_seq_lm": "SEQ_2_SEQ_LM",
        "causal": "CAUSAL_LM",
        "causal_lm": "CAUSAL_LM",
    }
    if task_type is not None:
        value = aliases.get(task_type.lower(), task_type.upper())
        if value not in ("SEQ_2_SEQ_LM", "CAUSAL_LM"):
            raise BankError(f"task type {task_type!r}: use SEQ_2_SEQ_LM or CAUSAL_LM", key=key)
        return value
    if not base:
        raise BankError(
            "entry records no base model; pass a task type (SEQ_2_SEQ_LM or CAUSAL_LM)", key=key
        )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BankError(
            f"cannot read the base model config of {base!r} ({first}); pass --base-model or a "
            "task type (SEQ_2_SEQ_LM or CAUSAL_LM)",
            key=key,
        ) from None
    return "SEQ_2_SEQ_LM" if getattr(config, "is_encoder_decoder", False) else "CAUSAL_LM"


def _read_sidecar(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BankError(f"not valid JSON ({e})", file=path) from None
    return meta if isinstance(meta, dict) else {}


def _base_model_from_config(config: dict, config_path: Path) -> dict:
    name = config.get("base_model_name_or_path")
    record = read_lineage(name) if name and Path(name).is_dir() else {}
    if not record.get("fingerprint"):
        raise BankError(
            f"cannot tell the fingerprint of base model {name!r}; pass base_model "
            "(CLI: --base-model PATH)",
            file=config_path,
            key="base_model_name_or_path",
        )
    return {"name": name, "fingerprint": record["fingerprint"]}
