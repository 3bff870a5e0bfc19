"""Loading models and tokenizers: hub ids, local directories, and built-in models built here.

A built-in model (``tiny-t5``, ``tiny-gpt2``, ``tiny-llama``, and ``lab``, which
:mod:`multipromot.lab` registers) is built with a fixed seed and saved as an ordinary
``from_pretrained`` directory in the cache before anything trains on it, so every bank entry's
``base_model.name`` points at something loadable.

Lineage: a model directory written by multipromot carries ``multipromot.json`` with the model's
own fingerprint and the fingerprints of the models it was fine-tuned from. The bank accepts a
prompt trained on any model in that lineage.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from multipromot.errors import UserError
from multipromot.fsio import publish_dir, temp_dir_for, write_atomic, write_durably
from multipromot.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "BUILTIN_MODELS",
    "register_builtin",
    "register_builtin_dir",
    "build_builtin",
    "load_model",
    "save_model",
    "model_fingerprint",
    "read_lineage",
    "record_prompts",
    "is_encoder_decoder",
    "default_cache_dir",
]

LINEAGE_FILE = "multipromot.json"

# name -> ensure(path, seed): makes ``path`` hold that built-in model (building it if needed)
BUILTIN_MODELS: Registry[Callable[[Path, int], object]] = Registry("built-in model")
# name -> builder(seed) -> (model, tokenizer), for the built-ins that are built in memory
_BUILDERS: Registry[Callable[[int], tuple[nn.Module, object]]] = Registry("built-in model")


def register_builtin(name: str, *, replace: bool = False):
    """Decorator: ``fn(seed) -> (model, tokenizer)`` becomes the built-in model ``name``, built in
    memory with a fixed seed and saved into the cache the first time it is loaded.

    Raises:
        UserError: (from the decorator) the name is taken and ``replace`` is False.
    """

    def wrap(fn):
        def ensure(path: Path, seed: int) -> None:
            if not (path / LINEAGE_FILE).is_file():
                model, tok = fn(seed)
                save_model(model, tok, path, name=name)

        BUILTIN_MODELS.register(name, ensure, replace=replace)
        _BUILDERS.register(name, fn, replace=replace)
        return fn

    return wrap


def register_builtin_dir(
    name: str, ensure: Callable[[Path, int], object], *, replace: bool = False
) -> None:
    """Register a built-in model that manages its own cache directory: ``ensure(path, seed)``
    makes ``path`` hold the model (e.g. the lab model, rebuilt when its recipe changes).

    Raises:
        UserError: the name is taken and ``replace`` is False.
    """
    BUILTIN_MODELS.register(name, ensure, replace=replace)


def _byte_tokenizer():
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()  # needs no files; len(tok) == 384


@register_builtin("tiny-t5")
def _tiny_t5(seed: int):
    import torch  # deferred: torch imports slowly (start-up of every command)
    from transformers import T5Config, T5ForConditionalGeneration

    tok = _byte_tokenizer()
    config = T5Config(
        vocab_size=len(tok),
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config), tok


@register_builtin("tiny-gpt2")
def _tiny_gpt2(seed: int):
    import torch  # deferred: torch imports slowly (start-up of every command)
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = _byte_tokenizer()
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=1024,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config), tok


@register_builtin("tiny-llama")
def _tiny_llama(seed: int):
    import torch  # deferred: torch imports slowly (start-up of every command)
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tok


# The tiny models are built in: a registry reset keeps them (multipromot.lab adds its own).
BUILTIN_MODELS.mark_builtins()
_BUILDERS.mark_builtins()


def build_builtin(name: str, seed: int = 0):
    """Build a built-in model and its tokenizer in memory (random init, fixed seed).

    Raises:
        UserError: no built-in model built in memory has that name (with close names).
    """
    return _BUILDERS.lookup(name)(seed)


def default_cache_dir() -> Path:
    """Where built-in models are saved: $MULTIPROMOT_CACHE or ~/.cache/multipromot."""
    return Path(os.environ.get("MULTIPROMOT_CACHE", Path.home() / ".cache" / "multipromot"))


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's architecture and weights.

    Every parameter contributes a strided sample of at most 65,536 values, so a 1B-parameter
    model hashes in well under a second while any realistic change of weights, embedding size or
    vocabulary changes the fingerprint.
    """
    import torch  # deferred: torch imports slowly (start-up of every command)

    h = hashlib.sha256()
    cfg = model.config
    for key in ("model_type", "vocab_size", "d_model", "hidden_size", "n_embd"):
        h.update(f"{key}={getattr(cfg, key, None)};".encode())
    for name, tensor in sorted(model.state_dict().items()):
        if hasattr(tensor, "full_tensor"):  # a DTensor under FSDP: hash the whole value
            tensor = tensor.full_tensor()
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // 65536)
        sample = flat[::stride].to(torch.float32).cpu().contiguous()
        h.update(f"{name}:{tuple(tensor.shape)};".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def read_lineage(model_dir: str | os.PathLike) -> dict:
    """The lineage record of a directory saved by :func:`save_model` ({} if there is none)."""
    path = Path(model_dir) / LINEAGE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"not valid JSON ({e.msg})", file=path) from None


def record_prompts(model_dir: str | os.PathLike, prompts: dict[str, dict]) -> None:
    """Add to a model directory's lineage the prompts it was trained with, ``{task: {"ref",
    "sha256"}}``: the bank warns when another prompt is loaded for such a model
    (:class:`~multipromot.errors.UnpinnedPromptWarning`).

    Raises:
        UserError: the directory has no lineage record (not saved by :func:`save_model`).
    """
    path = Path(model_dir) / LINEAGE_FILE
    record = read_lineage(model_dir)
    if not record:
        raise UserError("no lineage record to add the prompts to", file=path)
    record["prompts"] = {task: dict(pin) for task, pin in prompts.items()}
    write_atomic(path, json.dumps(record, indent=2).encode())


def _quiet_transformers() -> None:
    """Our own progress output is the one that matters; hide transformers' per-file bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def save_model(
    model: nn.Module, tokenizer, out_dir: str | os.PathLike, *, name: str, parents: list[str] = ()
) -> str:
    """Save weights + tokenizer + lineage so that ``from_pretrained(out_dir)`` loads them.

    Written to a temporary sibling and renamed, so a kill leaves no half-written directory.

    Returns:
        the model's fingerprint.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _quiet_transformers()
    fingerprint = model_fingerprint(model)
    tmp = temp_dir_for(out_dir)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        record = {"name": name, "fingerprint": fingerprint, "lineage": list(parents)}
        write_durably(tmp / LINEAGE_FILE, json.dumps(record, indent=2).encode())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, out_dir)
    return fingerprint


def load_pretrained(path: str, dtype: torch.dtype | None = None):
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
    )

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot load model {path!r} ({first}); with the hub offline, use a local directory "
            "or a built-in model (tiny-t5, tiny-gpt2, tiny-llama, lab)",
            key="model",
        ) from None
    _quiet_transformers()
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        model = auto.from_pretrained(path, **kwargs)
    except pickle.UnpicklingError as e:  # weights_only=True refused a pickled payload
        first = str(e).strip().splitlines()[0] if str(e).strip() else "refused"
        raise UserError(
            f"refusing to load pickled weights ({first}); use safetensors", file=path, key="model"
        ) from None
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def load_model(
    spec: str, *, cache_dir: str | os.PathLike | None = None, seed: int = 0, dtype=None
) -> tuple[nn.Module, object, str]:
    """Load ``spec``: a built-in model name, a local directory, or a hub id.

    A built-in model is built once and saved under ``cache_dir`` (default
    :func:`default_cache_dir`), then always loaded from there.

    Returns:
        (model, tokenizer, path) where ``path`` is what ``from_pretrained`` loads.

    Raises:
        UserError: the model cannot be found or loaded.
    """
    if spec in BUILTIN_MODELS:
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = cache / "models" / f"{spec}-seed{seed}"
        BUILTIN_MODELS.lookup(spec)(path, seed)
        model, tok = load_pretrained(str(path), dtype)
        return model, tok, str(path)
    model, tok = load_pretrained(spec, dtype)
    return model, tok, spec
