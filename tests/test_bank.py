"""PromptBank: layout, bit-exact round trips, immutability, integrity, lineage, rm rules, diff,
and PEFT export/import parity with the soft-prompt path."""

from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from filelock import FileLock
from safetensors.torch import save_file

from multipromot.bank import (
    BankEntry,
    PromptBank,
    describe_model,
    format_ref,
    parse_ref,
    validate_task_name,
)
from multipromot.bank import store as bank_module
from multipromot.errors import BankError, UserError
from multipromot.models import load_model, model_fingerprint, read_lineage, save_model
from tests.conftest import build_tiny

BASE = {"name": "models/base", "fingerprint": "f00dfeedf00dfeed"}


def _prompt(seed: int = 0, shape: tuple[int, int] = (4, 8)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


@pytest.fixture
def bank(tmp_path) -> PromptBank:
    return PromptBank(tmp_path / "prompt_bank")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """tiny-t5 saved as a base model, a fine-tuned descendant of it, and an unrelated model."""
    root = tmp_path_factory.mktemp("models")
    base, tok = build_tiny("tiny-t5", seed=0)
    base_fp = save_model(base, tok, root / "base", name="tiny-t5")
    with torch.no_grad():
        base.lm_head.weight.add_(0.01)  # "fine-tuning": new weights, same architecture
    ft_fp = save_model(base, tok, root / "finetuned", name="ft", parents=[base_fp])
    other, tok = build_tiny("tiny-t5", seed=1)
    other_fp = save_model(other, tok, root / "other", name="tiny-t5-seed1")
    return {
        "base": (root / "base", base_fp),
        "finetuned": (root / "finetuned", ft_fp),
        "other": (root / "other", other_fp),
    }


# ----------------------------------------------------------------------------- refs and names


def test_parse_ref_accepts_every_spelling():
    assert parse_ref("rte") == ("rte", None)
    assert parse_ref("rte@v2") == ("rte", 2)
    assert parse_ref("rte@2") == ("rte", 2)
    assert parse_ref("rte@v0002") == ("rte", 2)
    assert format_ref("wmt14_en_fr", 12) == "wmt14_en_fr@v0012"
    for bad in ("rte@", "rte@v0", "rte@vx", "rte@latest"):
        with pytest.raises(BankError, match="bad version"):
            parse_ref(bad)


@pytest.mark.parametrize(
    "name", ["../evil", "a/b", "", ".hidden", "a..b", "/abs", "x\\y", "index.json"]
)
def test_bad_task_names_are_refused_naming_the_name(bank, tmp_path, name):
    with pytest.raises(BankError) as err:
        bank.add(name, _prompt(), base_model=BASE)
    assert repr(name) in _one_line(err)
    assert isinstance(err.value, UserError)  # the CLI's exit-2 path
    assert not (tmp_path / "evil").exists()
    assert not (bank.root / "a").exists()
    with pytest.raises(BankError):
        bank.get(name or "@v1")


def test_good_task_names():
    for name in ("rte", "wmt14_en-fr", "super_glue.rte", "A1"):
        assert validate_task_name(name) == name


# ----------------------------------------------------------------------------- layout, round trip


def test_round_trip_is_bit_exact_and_meta_follows_the_design(bank):
    prompt = _prompt(0, (5, 8))
    fmt = {
        "template": "rte/gpt3",
        "answer_choices": ["True", "False"],
        "signature": {"pieces": ["a"]},
    }
    stage1 = {"steps": 300, "metric": "accuracy", "value": 51.5}
    entry = bank.add("rte", prompt, base_model=BASE, init="vocab", format=fmt, stage1=stage1)

    assert isinstance(entry, BankEntry)
    assert entry.ref == "rte@v0001" and entry.current
    assert entry.path == bank.root / "rte" / "v0001"
    loaded = bank.load_prompt("rte")
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded, prompt)

    meta = json.loads((entry.path / "meta.json").read_text())
    data = (entry.path / "prompt.safetensors").read_bytes()
    assert meta["task"] == "rte" and meta["version"] == 1
    assert (meta["prompt_length"], meta["dim"]) == (5, 8)
    assert meta["init"] == "vocab"
    assert meta["base_model"] == BASE
    assert meta["format"] == fmt and meta["stage1"] == stage1
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert meta["created"].endswith("Z") and meta["stage2"] == []
    assert sorted(os.listdir(entry.path)) == ["meta.json", "prompt.safetensors"]


def test_non_float32_prompt_is_stored_as_float32(bank):
    prompt = _prompt(1).to(torch.bfloat16)
    bank.add("rte", prompt, base_model=BASE)
    assert torch.equal(bank.load_prompt("rte"), prompt.float())


@pytest.mark.parametrize(
    "prompt", [torch.zeros(8), torch.zeros(2, 3, 4), torch.tensor([[1.0, float("nan")]])]
)
def test_bad_tensors_are_refused(bank, prompt):
    with pytest.raises(BankError, match="rte"):
        bank.add("rte", prompt, base_model=BASE)
    assert bank.tasks() == []


def test_base_model_needs_name_and_fingerprint(bank):
    with pytest.raises(BankError, match="base_model"):
        bank.add("rte", _prompt(), base_model={"name": "x"})


def test_versions_increment_and_current_moves(bank):
    prompts = [_prompt(i) for i in range(3)]
    for i, p in enumerate(prompts, start=1):
        assert bank.add("rte", p, base_model=BASE).version == i
    bank.add("cb", _prompt(9), base_model=BASE)

    assert bank.tasks() == ["cb", "rte"]
    assert bank.versions("rte") == [1, 2, 3]
    assert bank.get("rte").ref == "rte@v0003" and bank.get("rte").current
    for ref in ("rte@v2", "rte@2", "rte@v0002"):
        assert bank.get(ref).version == 2 and not bank.get(ref).current
        assert torch.equal(bank.load_prompt(ref), prompts[1])
    index = json.loads((bank.root / "index.json").read_text())
    assert index["schema_version"] == 1
    assert index["tasks"]["rte"] == {"current": 3, "last_version": 3}
    assert [e["ref"] for e in index["entries"]] == [
        "cb@v0001",
        "rte@v0001",
        "rte@v0002",
        "rte@v0003",
    ]
    assert [e["current"] for e in index["entries"]] == [True, False, False, True]
    # one summary line per entry
    lines = (bank.root / "index.json").read_text().splitlines()
    assert sum('"ref": ' in line for line in lines) == 4 == len(lines) - 2

    assert bank.set_current("rte@v1").current
    assert bank.get("rte").version == 1
    with pytest.raises(BankError, match="rte@v0009: no such version"):
        bank.get("rte@v9")
    with pytest.raises(BankError, match="no entry for task 'sst2'"):
        bank.get("sst2")


def test_entries_are_immutable(bank):
    bank.add("rte", _prompt(0), base_model=BASE)
    v1 = bank.root / "rte" / "v0001"
    before = (v1 / "prompt.safetensors").read_bytes()
    bank.add("rte", _prompt(1), base_model=BASE)
    entry = bank.record_stage2("rte@v1", "runs/a/final")

    assert (v1 / "prompt.safetensors").read_bytes() == before  # the tensor never changes
    assert entry.stage2[0]["checkpoint"] == "runs/a/final"
    assert bank.record_stage2("rte@v1", "runs/a/final").stage2 == entry.stage2  # idempotent
    assert len(bank.record_stage2("rte@v1", "runs/b/final").stage2) == 2
    summary = {e["ref"]: e for e in json.loads((bank.root / "index.json").read_text())["entries"]}
    assert summary["rte@v0001"]["stage2_checkpoints"] == 2
    # an existing version directory is never written again: the rename refuses
    with pytest.raises(OSError):
        os.rename(bank.root / "rte" / "v0002", v1)


def test_version_numbers_are_never_reused(bank):
    bank.add("rte", _prompt(0), base_model=BASE)
    bank.add("rte", _prompt(1), base_model=BASE)
    bank.remove("rte@v2", force=True)
    assert bank.add("rte", _prompt(2), base_model=BASE).ref == "rte@v0003"
    bank.remove("rte", force=True)
    assert bank.add("rte", _prompt(3), base_model=BASE).ref == "rte@v0004"


# ----------------------------------------------------------------------------- integrity


def test_flipped_byte_is_a_one_line_error_naming_the_entry(bank):
    entry = bank.add("rte", _prompt(), base_model=BASE)
    path = entry.prompt_path
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the tensor payload: still a valid safetensors file
    path.write_bytes(bytes(data))

    with pytest.raises(BankError) as err:
        bank.load_prompt("rte")
    line = _one_line(err)
    assert "rte@v0001" in line and "checksum mismatch" in line and str(path) in line
    problems = bank.verify()
    assert len(problems) == 1
    assert problems[0].entry == "rte@v0001" and "checksum mismatch" in problems[0].message


def test_verify_clean_bank_and_index_drift(bank):
    bank.add("rte", _prompt(0), base_model=BASE)
    bank.add("cb", _prompt(1), base_model=BASE)
    assert bank.verify() == []

    index_path = bank.root / "index.json"
    index = json.loads(index_path.read_text())
    index["entries"] = [e for e in index["entries"] if e["task"] != "cb"]
    index["tasks"]["rte"]["current"] = 7
    index_path.write_text(json.dumps(index))
    messages = sorted(str(p) for p in bank.verify())
    assert len(messages) == 2
    assert "cb@v0001: entry on disk is missing from the index" in messages[0]
    assert "rte: current version 7 is not on disk" in messages[1]

    bank.rebuild_index()
    assert bank.verify() == []
    index_path.write_text("{not json")
    [problem] = bank.verify()
    assert "index.json: not valid JSON" in str(problem)
    bank.rebuild_index()
    assert bank.verify() == [] and bank.get("rte").current


def test_meta_inconsistent_with_its_directory(bank):
    entry = bank.add("rte", _prompt(), base_model=BASE)
    meta = json.loads(entry.meta_path.read_text())
    meta["version"] = 5
    entry.meta_path.write_text(json.dumps(meta))
    with pytest.raises(BankError, match="meta.json says rte@v5, the directory says rte@v0001"):
        bank.get("rte")


def test_symlink_out_of_the_bank_is_not_followed(bank, tmp_path):
    entry = bank.add("rte", _prompt(), base_model=BASE)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(entry.prompt_path.read_bytes())
    entry.prompt_path.unlink()
    entry.prompt_path.symlink_to(outside)
    with pytest.raises(BankError, match="outside the bank"):
        bank.load_prompt("rte")
    (bank.root / "evil").symlink_to(tmp_path, target_is_directory=True)
    assert bank.tasks() == ["rte"]  # a symlinked task dir is not an entry
    messages = [str(p) for p in bank.verify()]
    assert any("evil: is a symlink" in m for m in messages)
    assert any("outside the bank" in m for m in messages)


def test_lock_held_by_another_writer(bank):
    bank.add("rte", _prompt(0), base_model=BASE)
    other = FileLock(bank.root / ".lock")
    with other:
        slow = PromptBank(bank.root, lock_timeout=0.1)
        with pytest.raises(BankError, match="another process holds the bank lock") as err:
            slow.add("rte", _prompt(1), base_model=BASE)
        _one_line(err)
        assert slow.load_prompt("rte").shape == (4, 8)  # readers need no lock
    assert bank.versions("rte") == [1]


def test_concurrent_writers_get_distinct_versions(bank):
    """Two writers (separate lock handles, as two processes would have) never share a version."""
    bank.add("rte", _prompt(0), base_model=BASE)

    def writer(seed: int) -> list[int]:
        own = PromptBank(bank.root)
        return [own.add("rte", _prompt(seed + i), base_model=BASE).version for i in range(4)]

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(writer, [10, 20]))
    assert sorted(results[0] + results[1]) == list(range(2, 10))
    assert bank.versions("rte") == list(range(1, 10))
    assert bank.verify() == []


# ----------------------------------------------------------------------------- atomic writes


def test_index_is_replaced_atomically(bank, monkeypatch):
    bank.add("rte", _prompt(0), base_model=BASE)
    before = (bank.root / "index.json").read_text()

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(bank_module.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        bank.record_stage2("rte", "runs/x")
    monkeypatch.undo()
    # old index intact, no temp file left next to it
    assert (bank.root / "index.json").read_text() == before
    assert sorted(p.name for p in bank.root.iterdir()) == [".lock", "index.json", "rte"]


def test_killed_while_writing_an_entry_leaves_nothing(bank, monkeypatch):
    bank.add("rte", _prompt(0), base_model=BASE)
    index_before = (bank.root / "index.json").read_text()
    real_write = bank_module.write_durably

    def killed(path, data):
        if path.name == "meta.json":
            raise KeyboardInterrupt  # the kill arrives between the tensor and the meta
        real_write(path, data)

    monkeypatch.setattr(bank_module, "write_durably", killed)
    with pytest.raises(KeyboardInterrupt):
        bank.add("rte", _prompt(1), base_model=BASE)
    monkeypatch.undo()
    assert bank.versions("rte") == [1]
    assert (bank.root / "index.json").read_text() == index_before
    assert not [p for p in bank.root.iterdir() if p.name.startswith(".tmp-")]
    assert bank.verify() == []


def test_killed_before_the_index_is_written_keeps_a_complete_entry(bank, monkeypatch):
    bank.add("rte", _prompt(0), base_model=BASE)

    def killed(self, current, last):
        raise KeyboardInterrupt

    monkeypatch.setattr(PromptBank, "_write_index", killed)
    with pytest.raises(KeyboardInterrupt):
        bank.add("rte", _prompt(1), base_model=BASE)
    monkeypatch.undo()
    # the entry is complete; the add meant to make it current, and it is
    assert torch.equal(bank.load_prompt("rte"), _prompt(1))
    assert [str(p) for p in bank.verify()] == [
        f"{bank.root / 'index.json'}: rte@v0002: entry on disk is missing from the index"
    ]
    assert bank.add("rte", _prompt(2), base_model=BASE).version == 3
    assert bank.verify() == []


# ----------------------------------------------------------------------------- lineage


def test_lineage_accepts_descendants_and_refuses_unrelated_models(bank, model_dirs):
    base_dir, base_fp = model_dirs["base"]
    ft_dir, ft_fp = model_dirs["finetuned"]
    other_dir, other_fp = model_dirs["other"]
    assert len({base_fp, ft_fp, other_fp}) == 3
    assert read_lineage(ft_dir)["lineage"] == [base_fp]

    base, _, _ = load_model(str(base_dir))
    record = describe_model(base)
    assert record == {"name": str(base_dir.resolve()), "fingerprint": base_fp}
    prompt = _prompt(0, (3, 64))
    bank.add("rte", prompt, base_model=record)

    assert torch.equal(bank.load_prompt("rte", model=base), prompt)
    finetuned, _, _ = load_model(str(ft_dir))
    assert model_fingerprint(finetuned) == ft_fp != base_fp
    assert torch.equal(bank.load_prompt("rte", model=finetuned), prompt)  # via lineage
    fresh, _ = build_tiny("tiny-t5", seed=0)  # never saved: its own fingerprint matches
    assert torch.equal(bank.load_prompt("rte", model=fresh), prompt)

    unrelated, _, _ = load_model(str(other_dir))
    with pytest.raises(BankError) as err:
        bank.load_prompt("rte", model=unrelated)
    line = _one_line(err)
    assert "rte@v0001" in line and "fingerprint mismatch" in line
    assert base_fp in line and other_fp in line
    # an explicit accept overrides; a bare accept list is checked without a model
    assert torch.equal(bank.load_prompt("rte", model=unrelated, accept=[base_fp]), prompt)
    with pytest.raises(BankError, match="fingerprint mismatch"):
        bank.load_prompt("rte", accept=[other_fp])
    assert bank.verify(model=finetuned) == []
    problems = bank.verify(model=unrelated)
    assert [p.entry for p in problems] == ["rte@v0001"] and base_fp in problems[0].message


def test_prompt_dim_must_match_the_model(bank, model_dirs):
    base_dir, base_fp = model_dirs["base"]
    base, _, _ = load_model(str(base_dir))
    bank.add("rte", _prompt(0, (3, 32)), base_model={"name": str(base_dir), "fingerprint": base_fp})
    with pytest.raises(
        BankError, match=r"rte@v0001: prompt is \[3, 32\] but the model's embeddings have d=64"
    ):
        bank.load_prompt("rte", model=base)


def test_verify_notices_a_base_model_directory_that_changed(bank, model_dirs, tmp_path):
    base_dir, base_fp = model_dirs["base"]
    other_dir, other_fp = model_dirs["other"]
    moved = tmp_path / "base_copy"
    moved.mkdir()
    (moved / "multipromot.json").write_text((other_dir / "multipromot.json").read_text())
    bank.add("rte", _prompt(), base_model={"name": str(moved), "fingerprint": base_fp})
    problems = bank.verify()
    assert len(problems) == 1
    assert f"prompt trained on {base_fp}, base model directory {moved} now holds {other_fp}" in str(
        problems[0]
    )


# ----------------------------------------------------------------------------- rm rules


def test_remove_rules(bank):
    for i in range(3):
        bank.add("rte", _prompt(i), base_model=BASE)

    removed = bank.remove("rte@v1")  # not current: fine
    assert [e.ref for e in removed] == ["rte@v0001"] and bank.versions("rte") == [2, 3]
    assert not (bank.root / "rte" / "v0001").exists()

    with pytest.raises(BankError) as err:
        bank.remove("rte@v3")
    assert _one_line(err).startswith("rte@v0003: is the current version of rte")
    assert "would move to v0002" in str(err.value)
    with pytest.raises(BankError, match="names every version of rte"):
        bank.remove("rte")
    assert bank.versions("rte") == [2, 3]

    bank.remove("rte@v3", force=True)
    assert bank.get("rte").ref == "rte@v0002"  # current moved to the newest remaining
    bank.record_stage2("rte@v2", "runs/a")
    bank.add("rte", _prompt(5), base_model=BASE)  # v4 current; v2 has a stage-2 checkpoint
    with pytest.raises(BankError, match="1 stage-2 checkpoint"):
        bank.remove("rte@v2")
    bank.remove("rte@v2", force=True)
    bank.remove("rte@v4", force=True)  # the last one: the task disappears
    assert bank.tasks() == [] and not (bank.root / "rte").exists()
    assert bank.verify() == []


def test_remove_whole_task_with_force(bank):
    bank.add("rte", _prompt(0), base_model=BASE)
    bank.add("rte", _prompt(1), base_model=BASE)
    bank.add("cb", _prompt(2), base_model=BASE)
    removed = bank.remove("rte", force=True)
    assert [e.ref for e in removed] == ["rte@v0001", "rte@v0002"]
    assert bank.tasks() == ["cb"]
    assert not [p for p in bank.root.iterdir() if p.name.startswith(".trash-")]
    with pytest.raises(BankError, match="no entry for task 'rte'"):
        bank.remove("rte@v1", force=True)


# ----------------------------------------------------------------------------- diff


def test_diff_on_known_tensors(bank):
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    bank.add("rte", a, base_model=BASE, stage1={"steps": 10, "metric": "accuracy", "value": 50.0})
    bank.add(
        "rte",
        b,
        base_model={**BASE, "fingerprint": "other"},
        stage1={"metric": "accuracy", "value": 70.0},
    )
    d = bank.diff("rte@v1", "rte")
    assert (d["a"], d["b"]) == ("rte@v0001", "rte@v0002")
    assert d["shape_a"] == d["shape_b"] == [2, 2]
    # a.b = 3, |a| = sqrt 2, |b| = sqrt 6; rows: cos 1 and 1/sqrt 2; a - b = [[-1,0],[-1,0]]
    assert d["cosine"] == pytest.approx(3 / math.sqrt(12), abs=1e-12)
    assert d["cosine_mean_per_position"] == pytest.approx((1 + 1 / math.sqrt(2)) / 2, abs=1e-12)
    assert d["l2_distance"] == pytest.approx(math.sqrt(2), abs=1e-12)
    assert d["norm_a"] == pytest.approx(math.sqrt(2)) and d["norm_b"] == pytest.approx(math.sqrt(6))
    assert d["mean_row_norm_a"] == pytest.approx(1.0)
    assert d["mean_row_norm_b"] == pytest.approx((2 + math.sqrt(2)) / 2)
    assert d["stage1_a"]["value"] == 50.0 and d["stage1_b"]["value"] == 70.0
    assert d["same_base_model"] is False
    assert bank.diff("rte@v1", "rte@v1")["cosine"] == pytest.approx(1.0)

    bank.add("cb", torch.ones(3, 2), base_model=BASE)
    mixed = bank.diff("rte@v1", "cb")
    assert mixed["cosine"] is None and mixed["l2_distance"] is None
    assert mixed["norm_b"] == pytest.approx(math.sqrt(6))


# ----------------------------------------------------------------------------- PEFT interop


def _saved_model(name: str, root):
    model, tok = build_tiny(name)
    save_model(model, tok, root / name, name=name)
    loaded, _, _ = load_model(str(root / name))
    return loaded.eval()


def _batch(is_encoder_decoder: bool):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 300, (2, 7), generator=g)
    kwargs = {"labels": torch.randint(3, 300, (2, 4), generator=g)} if is_encoder_decoder else {}
    return ids, torch.ones_like(ids), kwargs


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-gpt2"])
def test_peft_export_reproduces_the_prompted_logits(bank, tmp_path, name):
    from peft import PeftModel

    model = _saved_model(name, tmp_path)
    seq2seq = model.config.is_encoder_decoder
    p = 5
    prompt = _prompt(7, (p, 64)) * 0.5
    entry = bank.add(
        name, prompt, base_model=describe_model(model), stage1={"metric": "accuracy", "value": 60.0}
    )
    ids, mask, kwargs = _batch(seq2seq)
    with torch.no_grad():  # the prompt prepended by hand, prompt positions stripped
        embeds = torch.cat([prompt.expand(2, -1, -1), model.get_input_embeddings()(ids)], dim=1)
        full_mask = torch.ones(2, p + ids.shape[1], dtype=torch.long)
        expected = model(inputs_embeds=embeds, attention_mask=full_mask, **kwargs).logits
        expected = expected if seq2seq else expected[:, p:]

    out = bank.export_peft(entry.ref, tmp_path / "export")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING"
    assert config["task_type"] == ("SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM")
    assert (config["num_virtual_tokens"], config["token_dim"]) == (p, 64)
    assert config["num_transformer_submodules"] == 1
    assert config["base_model_name_or_path"] == str((tmp_path / name).resolve())

    base, _, _ = load_model(str(tmp_path / name))
    peft_model = PeftModel.from_pretrained(base.eval(), str(out)).eval()
    assert torch.equal(peft_model.prompt_encoder["default"].embedding.weight, prompt)
    with torch.no_grad():
        logits = peft_model(input_ids=ids, attention_mask=mask, **kwargs).logits
    # PEFT keeps the virtual-token positions in causal-LM logits; seq2seq logits are decoder-side
    assert logits.shape[1] == (kwargs["labels"].shape[1] if seq2seq else p + ids.shape[1])
    logits = logits if seq2seq else logits[:, p:]
    assert torch.allclose(logits, expected, atol=1e-5, rtol=0)

    back = bank.import_peft(out, f"{name}-copy")
    assert torch.equal(bank.load_prompt(back.ref, model=model), prompt)
    assert back.meta["base_model"] == entry.meta["base_model"]
    assert back.meta["stage1"] == {"metric": "accuracy", "value": 60.0}


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-gpt2"])
def test_peft_export_matches_prompted_model(bank, tmp_path, name):
    soft_prompt = pytest.importorskip("multipromot.soft_prompt")
    from peft import PeftModel

    model = _saved_model(name, tmp_path)
    seq2seq = model.config.is_encoder_decoder
    prompt = _prompt(8, (4, 64)) * 0.5
    bank.add("rte", prompt, base_model=describe_model(model))
    prompted = soft_prompt.PromptedModel.from_bank(model, bank, ["rte"])
    ids, mask, kwargs = _batch(seq2seq)
    with torch.no_grad():
        expected = prompted(ids, mask, task_ids=prompted.task_ids(["rte", "rte"]), **kwargs).logits
    out = bank.export_peft("rte", tmp_path / "export")
    base, _, _ = load_model(str(tmp_path / name))
    peft_model = PeftModel.from_pretrained(base.eval(), str(out)).eval()
    with torch.no_grad():
        logits = peft_model(input_ids=ids, attention_mask=mask, **kwargs).logits
    logits = logits if seq2seq else logits[:, 4:]
    assert torch.allclose(logits, expected, atol=1e-5, rtol=0)


def test_peft_import_without_multipromot_sidecar(bank, tmp_path, model_dirs):
    base_dir, base_fp = model_dirs["base"]
    bank.add("rte", _prompt(0, (3, 64)), base_model={"name": str(base_dir), "fingerprint": base_fp})
    out = bank.export_peft("rte", tmp_path / "export")
    (out / "multipromot_meta.json").unlink()  # as if PEFT itself had saved it
    entry = bank.import_peft(out, "rte")
    assert entry.ref == "rte@v0002"
    assert entry.meta["base_model"] == {"name": str(base_dir), "fingerprint": base_fp}
    assert entry.meta["init"] == "peft:RANDOM"
    assert torch.equal(bank.load_prompt("rte@v2"), bank.load_prompt("rte@v1"))


def test_peft_import_of_a_two_submodule_seq2seq_adapter_keeps_the_encoder_rows(bank, tmp_path):
    src = tmp_path / "adapter"
    src.mkdir()
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "SEQ_2_SEQ_LM",
        "num_virtual_tokens": 3,
        "token_dim": 8,
        "num_transformer_submodules": 2,
    }
    (src / "adapter_config.json").write_text(json.dumps(config))
    table = _prompt(0, (6, 8))
    save_file({"prompt_embeddings": table}, str(src / "adapter_model.safetensors"))
    entry = bank.import_peft(src, "rte", base_model=BASE)
    assert torch.equal(bank.load_prompt(entry.ref), table[:3])


def test_peft_import_refusals(bank, tmp_path):
    src = tmp_path / "adapter"
    src.mkdir()
    with pytest.raises(BankError, match="no adapter_config.json"):
        bank.import_peft(src, "rte", base_model=BASE)
    (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(BankError, match="only PROMPT_TUNING"):
        bank.import_peft(src, "rte", base_model=BASE)
    config = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3, "token_dim": 8}
    (src / "adapter_config.json").write_text(json.dumps(config))
    (src / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(BankError, match="never unpickles"):
        bank.import_peft(src, "rte", base_model=BASE)
    save_file({"prompt_embeddings": torch.zeros(4, 8)}, str(src / "adapter_model.safetensors"))
    with pytest.raises(BankError, match=r"is \(4, 8\), the config says \[3 x 1, 8\]"):
        bank.import_peft(src, "rte", base_model=BASE)
    save_file({"prompt_embeddings": torch.zeros(3, 8)}, str(src / "adapter_model.safetensors"))
    with pytest.raises(BankError, match="cannot tell the fingerprint of base model None"):
        bank.import_peft(src, "rte")
    with pytest.raises(BankError, match="'a/b'"):
        bank.import_peft(src, "a/b", base_model=BASE)
    assert bank.tasks() == []


def test_export_refuses_a_non_empty_directory_and_unknown_task_type(bank, tmp_path):
    bank.add("rte", _prompt(0), base_model=BASE)  # BASE's name is not a loadable model
    with pytest.raises(BankError, match="cannot read the base model config"):
        bank.export_peft("rte", tmp_path / "out")
    out = bank.export_peft("rte", tmp_path / "out", task_type="causal")
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    with pytest.raises(BankError, match="not an empty directory"):
        bank.export_peft("rte", out, task_type="CAUSAL_LM")
    with pytest.raises(BankError, match="use SEQ_2_SEQ_LM or CAUSAL_LM"):
        bank.export_peft("rte", tmp_path / "out2", task_type="classification")


def test_a_nan_prompt_with_valid_checksums_is_refused_on_load_and_by_verify(tmp_path):
    """Checksums only prove the bytes are unchanged: a NaN prompt written with matching
    checksums loaded and passed `verify`."""
    import json as _json

    from safetensors.torch import save as _save

    from multipromot.bank.entry import meta_bytes
    from multipromot.fsio import sha256_bytes

    bank = PromptBank(tmp_path / "bank")
    entry = bank.add("rte", torch.ones(4, 8), base_model=BASE)
    poisoned = torch.ones(4, 8)
    poisoned[1, 2] = float("nan")
    data = _save({"prompt": poisoned})
    entry.prompt_path.write_bytes(data)
    meta = _json.loads(entry.meta_path.read_text())
    meta["sha256"] = sha256_bytes(data)
    entry.meta_path.write_bytes(meta_bytes(meta))
    with pytest.raises(BankError, match="NaN or infinite"):
        bank.load_prompt("rte")
    problems = [str(p) for p in bank.verify()]
    assert any("NaN or infinite" in p for p in problems), problems
    with pytest.raises(BankError, match="NaN or infinite"):  # and at add
        bank.add("rte", poisoned, base_model=BASE)
