"""vLLM serving: a bank entry as the ``prompt_embeds`` a vLLM client sends.

vLLM (``--enable-prompt-embeds``) takes soft prompts only as the embeddings of the whole prompt,
``[seq, hidden]``: offline as ``{"prompt_embeds": tensor}``, through the completions API as the
base64 text of ``torch.save`` bytes. It serves decoder-only models only (no encoder-decoder
model but Whisper), so a T5 entry is refused. A client prepends the exported [P, d] tensor to
its input's token embeddings (README, "Serving with vLLM").

Written (a new directory, published whole through ``fsio``):

- ``prompt_embeds.pt``: ``torch.save`` of the prompt [P, d] in the model's dtype. This is the
  one pickle the project writes: it is the format vLLM reads (``torch.load(weights_only=True)``).
- ``prompt_embeds.b64``: the base64 text of those bytes (the completions API's encoding).
- ``vllm.json``: task, ref, dtype, shape, base model, the files' sha256.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any

from multipromot.bank.entry import export_dir
from multipromot.errors import BankError
from multipromot.fsio import publish_dir, sha256_bytes, temp_dir_for, write_durably, write_json

__all__ = ["export_vllm", "VLLM_TENSOR_FILE", "VLLM_BASE64_FILE", "VLLM_META_FILE"]

VLLM_TENSOR_FILE = "prompt_embeds.pt"
VLLM_BASE64_FILE = "prompt_embeds.b64"
VLLM_META_FILE = "vllm.json"

_DTYPES = ("float32", "float16", "bfloat16")  # torch dtypes by name


def export_vllm(
    bank: Any,
    ref: str,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    dtype: str | None = None,
) -> Path:
    """Write an entry as vLLM ``prompt_embeds`` (see the module docstring for the files).

    Args:
        bank: a :class:`~multipromot.bank.PromptBank`.
        ref: the entry (``TASK`` or ``TASK@vN``).
        out_dir: a new (or empty) directory.
        base_model_name_or_path: the served model, whose config says its family and dtype;
            default: the entry's ``base_model.name``.
        task_type: ``CAUSAL_LM`` to skip reading the base model's config (the dtype then
            defaults to float32); ``SEQ_2_SEQ_LM`` is refused.
        dtype: ``float32``, ``float16`` or ``bfloat16``; default: the base model's.

    Returns:
        The output directory.

    Raises:
        BankError: a seq2seq (encoder-decoder) base model, a base model whose config cannot be
            read (and no task type), an unknown dtype, or a non-empty ``out_dir``.
    """
    entry = bank.get(ref)
    base = base_model_name_or_path or entry.meta["base_model"].get("name") or None
    is_seq2seq, model_dtype = _family_and_dtype(base, task_type, key=entry.ref)
    if is_seq2seq:
        raise BankError(
            "is a seq2seq (encoder-decoder) prompt; vLLM serves prompt_embeds for "
            "decoder-only models only",
            key=entry.ref,
        )
    name = dtype or model_dtype
    if name not in _DTYPES:
        raise BankError(f"dtype {name!r}: use one of {', '.join(_DTYPES)}", key="dtype")
    out = export_dir(bank.root, out_dir, key=entry.ref)  # never into the bank's own folder
    import torch  # deferred: torch imports slowly (listing a bank needs none)

    prompt = bank.load_prompt(entry).to(getattr(torch, name)).contiguous()
    buffer = io.BytesIO()
    torch.save(prompt, buffer)
    data = buffer.getvalue()
    text = base64.b64encode(data)
    try:
        tmp = temp_dir_for(out)
    except OSError as e:  # e.g. a read-only or virtual file system (/proc)
        raise BankError(f"cannot be written ({e.strerror or e})", file=out, key=entry.ref) from None
    write_durably(tmp / VLLM_TENSOR_FILE, data)
    write_durably(tmp / VLLM_BASE64_FILE, text)
    write_json(
        tmp / VLLM_META_FILE,
        {
            "task": entry.task,
            "ref": entry.ref,
            "dtype": name,
            "shape": list(prompt.shape),
            "base_model": {**entry.meta["base_model"], "served_as": base},
            "files": {
                VLLM_TENSOR_FILE: sha256_bytes(data),
                VLLM_BASE64_FILE: sha256_bytes(text),
            },
            "usage": "prepend to the input's token embeddings; send as prompt_embeds",
        },
    )
    publish_dir(tmp, out)
    return out


def _family_and_dtype(base: str | None, task_type: str | None, *, key: str) -> tuple[bool, str]:
    """(is encoder-decoder, dtype name) from ``task_type`` or the base model's config."""
    if task_type is not None:
        value = task_type.upper()
        if value not in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
            raise BankError(f"task type {task_type!r}: use CAUSAL_LM or SEQ_2_SEQ_LM", key=key)
        return value == "SEQ_2_SEQ_LM", "float32"
    if not base:
        raise BankError("entry records no base model; pass --base-model", key=key)
    from transformers import AutoConfig  # deferred: transformers is heavy to import

    try:
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BankError(
            f"cannot read the base model config of {base!r} ({first}); pass --base-model",
            key=key,
        ) from None
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype_name = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return bool(getattr(config, "is_encoder_decoder", False)), dtype_name
