"""``bank export --format vllm``: the prompt_embeds a vLLM client sends, checked through transformers.

vLLM cannot run here; what it does with ``prompt_embeds`` is run the decoder on the given
embeddings at positions 0..n-1, which is what these tests do with the exported tensor prepended
to the input's token embeddings, against PromptedModel's logits.
"""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch

from multipromot.bank import PromptBank, describe_model
from multipromot.bank.vllm import VLLM_BASE64_FILE, VLLM_META_FILE, VLLM_TENSOR_FILE
from multipromot.cli import main
from multipromot.models import load_model, save_model
from multipromot.soft_prompt import PromptedModel
from tests.conftest import build_tiny

P = 5


def _run(capsys, *args: str) -> tuple[int, str, str]:
    status = main(["bank", *args])
    out = capsys.readouterr()
    return status, out.out, out.err


def _bank_with(tmp_path, name: str, dtype: torch.dtype = torch.float32):
    """A saved tiny model (in ``dtype``) and a bank holding one prompt trained on it."""
    model, tok = build_tiny(name)
    model_dir = tmp_path / name
    save_model(model.to(dtype), tok, model_dir, name=name)
    model, tok, _ = load_model(str(model_dir))
    model.eval()
    store = PromptBank(tmp_path / "pb")
    prompt = torch.randn(
        P, model.get_input_embeddings().weight.shape[1], generator=torch.Generator().manual_seed(3)
    )
    store.add("rte", prompt, base_model=describe_model(model))
    return model, tok, store


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_exported_prompt_embeds_reproduce_prompted_logits(capsys, tmp_path, name):
    model, tok, store = _bank_with(tmp_path, name)
    out_dir = tmp_path / "served"
    status, out, err = _run(
        capsys,
        "export",
        "rte",
        "--format",
        "vllm",
        str(out_dir),
        "--bank",
        str(store.root),
        "--json",
    )
    assert status == 0, err
    info = json.loads(out)
    assert info["ref"] == "rte@v0001" and info["dtype"] == "float32" and info["shape"] == [P, 64]
    data = (out_dir / VLLM_TENSOR_FILE).read_bytes()
    assert base64.b64decode((out_dir / VLLM_BASE64_FILE).read_bytes()) == data
    meta = json.loads((out_dir / VLLM_META_FILE).read_text())
    assert (
        meta["task"] == "rte" and meta["base_model"]["fingerprint"] == store.get("rte").fingerprint
    )
    # What the vLLM server does with the bytes (weights_only: tensors only, as vLLM loads them).
    prompt = torch.load(io.BytesIO(data), weights_only=True)
    assert prompt.dtype == torch.float32 and torch.equal(prompt, store.load_prompt("rte"))

    # The client: prompt embeddings in front of the input's token embeddings, positions 0..n-1.
    ids = torch.tensor([tok("route me", add_special_tokens=False)["input_ids"]])
    sent = torch.cat([prompt[None], model.get_input_embeddings()(ids)], dim=1)
    with torch.no_grad():
        served = model(inputs_embeds=sent).logits[:, P:]
        prompted = PromptedModel.from_bank(model, store, ["rte"])
        ref = prompted(ids, torch.ones_like(ids), task_ids=torch.tensor([0])).logits
    assert served.shape == ref.shape
    assert (served - ref).abs().max() < 1e-5
    # Without the prompt the logits differ: the comparison can fail.
    with torch.no_grad():
        bare = model(input_ids=ids).logits
    assert (bare - ref).abs().max() > 1e-3


def test_export_keeps_the_model_dtype(capsys, tmp_path):
    _, _, store = _bank_with(tmp_path, "tiny-llama", dtype=torch.bfloat16)
    out_dir = tmp_path / "served"
    status, out, err = _run(
        capsys, "export", "rte", "--format", "vllm", str(out_dir), "--bank", str(store.root)
    )
    assert status == 0, err
    assert "bfloat16 5 x 64" in out
    prompt = torch.load(out_dir / VLLM_TENSOR_FILE, weights_only=True)
    assert prompt.dtype == torch.bfloat16
    assert torch.equal(prompt, store.load_prompt("rte").to(torch.bfloat16))


def test_t5_entry_is_refused_with_one_line(capsys, tmp_path):
    _, _, store = _bank_with(tmp_path, "tiny-t5")
    out_dir = tmp_path / "served"
    status, _, err = _run(
        capsys, "export", "rte", "--format", "vllm", str(out_dir), "--bank", str(store.root)
    )
    assert status == 2
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "rte@v0001" in lines[0] and "encoder-decoder" in lines[0] and "vLLM" in lines[0]
    assert not out_dir.exists()


def test_vllm_is_an_export_format_only(capsys, tmp_path):
    _, _, store = _bank_with(tmp_path, "tiny-gpt2")
    status, _, err = _run(
        capsys,
        "import",
        str(tmp_path),
        "--format",
        "vllm",
        "--task",
        "x",
        "--bank",
        str(store.root),
    )
    assert status == 2 and "error: " in err and "'vllm'" in err
