"""Shared fixtures: tiny models built from config (no downloads), isolated caches."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the OpenMP threads
# spin against other processes: one thread measured 2.3x faster for a stage-1 run here.
torch.set_num_threads(1)

TINY_MODELS = ["tiny-t5", "tiny-gpt2", "tiny-llama"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Built-in models and caches go to a per-session temp dir, never ~/.cache."""
    cache = tmp_path_factory.getbasetemp() / "multipromot-cache"
    monkeypatch.setenv("MULTIPROMOT_CACHE", str(cache))
    torch.manual_seed(0)


def build_tiny(name: str, seed: int = 0):
    """A tiny model (2 layers, dim 64, dropout 0) and its byte tokenizer, in eval mode."""
    from multipromot.models import build_builtin

    model, tok = build_builtin(name, seed)
    model.eval()
    return model, tok


@pytest.fixture(params=TINY_MODELS)
def tiny(request):
    """Each tiny model family in turn: (name, model, tokenizer)."""
    model, tok = build_tiny(request.param)
    return request.param, model, tok
