"""Corrupted files: random byte flips and truncations in every kind of prompt-bank file and
training-checkpoint file are errors of one line naming the file; a wrong prompt (or a wrong
checkpoint value) is never used silently.

Every trial copies a pristine bank (or checkpoint), damages one file, and loads everything the
way the framework does. A trial passes when loading fails with a one-line error naming the
damaged file, or when the damage changed nothing that is read (a whitespace byte that JSON
ignores, a flipped letter in the name of a checksum field) and every loaded value is identical.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from reliability import tally

from multipromot.bank import PromptBank
from multipromot.bank.entry import INDEX_CHECKSUM_KEY, META_CHECKSUM_KEY
from multipromot.cli import main
from multipromot.errors import UserError

BASE = {"name": "models/base", "fingerprint": "f00dfeedf00dfeed"}
BANK_FILES = ["rte/v0001/prompt.safetensors", "rte/v0001/meta.json", "index.json"]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """Two tasks, three versions, current rolled back to v1 (so a flipped ``current`` would
    pick another real prompt), a stage-2 record, a format signature and a stage-1 score."""
    root = tmp_path_factory.mktemp("corruption") / "bank"
    bank = PromptBank(root)
    gen = torch.Generator().manual_seed(0)
    fmt = {
        "template": "rte/gpt3",
        "answer_choices": ["True", "False"],
        "signature": {"pieces": ["question:", "True or False?"], "answers": ["True", "False"]},
    }
    for seed in range(2):
        bank.add(
            "rte",
            torch.randn(12, 16, generator=gen),
            base_model=BASE,
            format=fmt,
            stage1={"steps": 100, "metric": "accuracy", "value": 61.5 + seed},
        )
    bank.add("cb", torch.randn(12, 16, generator=gen), base_model=BASE)
    bank.set_current("rte@v1")
    bank.record_stage2("rte@v1", "runs/x/final")
    assert bank.verify() == []
    return root


def _load_everything(root: Path) -> dict:
    """What the framework reads from a bank: current refs, every entry's meta and tensor."""
    bank = PromptBank(root)
    return {
        "current": {task: bank.get(task).ref for task in bank.tasks()},
        "meta": {e.ref: e.meta for e in bank.entries()},
        "prompts": {e.ref: bank.load_prompt(e) for e in bank.entries()},
        "index": bank.read_index(),
    }


def _same(a: dict, b: dict) -> bool:
    return (
        a["current"] == b["current"]
        and a["meta"] == b["meta"]
        and a["prompts"].keys() == b["prompts"].keys()
        and all(torch.equal(a["prompts"][k], b["prompts"][k]) for k in a["prompts"])
    )


def _corrupt(path: Path, rng: random.Random, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        del data[rng.randrange(len(data)) :]
    else:  # 1-3 bytes replaced by other random bytes
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(data))
            data[i] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))


def _harmless(original: bytes, damaged: bytes, checksum_key: str | None) -> bool:
    """The damage changed nothing a reader uses: same JSON content, up to whitespace and the
    name of the checksum field."""
    try:
        a, b = json.loads(original), json.loads(damaged)
    except (ValueError, UnicodeDecodeError):
        return False
    if checksum_key and isinstance(b, dict):
        value = a.pop(checksum_key, None)
        b = {k: v for k, v in b.items() if v != value}
    return a == b


def _bank_trials(pristine: Path, tmp_path: Path, trials: int, seed: int) -> dict:
    rng = random.Random(seed)
    expected = _load_everything(pristine)
    counts: Counter = Counter()
    for trial in range(trials):
        name = BANK_FILES[trial % len(BANK_FILES)]
        how = "truncate" if (trial // len(BANK_FILES)) % 2 else "flip"
        root = tmp_path / f"t{trial}"
        shutil.copytree(pristine, root)
        path = root / name
        original = path.read_bytes()
        _corrupt(path, rng, how)
        try:
            loaded = _load_everything(root)
        except UserError as e:
            text = str(e)
            assert "\n" not in text and str(path) in text, (name, how, text)
            counts[f"{name} {how}: one-line error naming the file"] += 1
            # `bank verify` finds it too
            assert any(p.file == str(path) for p in PromptBank(root).verify()), (name, how)
        else:
            key = {"index.json": INDEX_CHECKSUM_KEY}.get(name, META_CHECKSUM_KEY)
            assert _harmless(original, path.read_bytes(), key), (name, how, "used silently")
            assert _same(loaded, expected), (name, how, "a different value was used silently")
            counts[f"{name} {how}: harmless (content unchanged)"] += 1
        shutil.rmtree(root)
    return dict(counts)


def test_bank_file_corruption_is_detected(pristine, tmp_path):
    counts = _bank_trials(pristine, tmp_path, trials=60, seed=0)
    tally.record(
        "bank_corruption_fast",
        fault="random byte flips (1-3 bytes) and truncations of prompt.safetensors, "
        "meta.json, index.json",
        trials=60,
        survived=60,
        data_lost=0,
        outcomes=counts,
    )
    detected = sum(v for k, v in counts.items() if "error" in k)
    assert detected >= 55  # harmless flips (whitespace) are rare


@pytest.mark.slow
def test_bank_file_corruption_is_detected_stress(pristine, tmp_path):
    counts = _bank_trials(pristine, tmp_path, trials=1200, seed=1)
    tally.record(
        "bank_corruption_stress",
        fault="random byte flips (1-3 bytes) and truncations of prompt.safetensors, "
        "meta.json, index.json",
        trials=1200,
        survived=1200,
        data_lost=0,
        outcomes=counts,
    )


@pytest.mark.parametrize(
    "name, where",
    [(BANK_FILES[0], None), (BANK_FILES[1], b'"random"'), (BANK_FILES[2], b'"rte@v0002"')],
)
def test_bank_verify_command_names_the_damaged_file(pristine, tmp_path, capsys, name, where):
    root = tmp_path / "bank"
    shutil.copytree(pristine, root)
    path = root / name
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if where is None else data.index(where) + 2  # tensor payload / a value
    data[at] ^= 0x20
    path.write_bytes(bytes(data))
    assert main(["bank", "verify", "--bank", str(root)]) == 2
    out, err = capsys.readouterr()
    assert str(path) in out and "Traceback" not in out + err
    assert err.strip().count("\n") == 0 and err.startswith("error: ")
    # and using the entry fails with one line naming the file
    assert main(["bank", "diff", "rte@v1", "rte@v2", "--bank", str(root)]) == 2
    _, err = capsys.readouterr()
    assert str(path) in err and err.strip().count("\n") == 0


def test_flipped_current_version_is_not_used_silently(pristine, tmp_path):
    """The one index value that picks a prompt: rte's current is v1; a corrupted digit that
    makes it v2 (also on disk) must not quietly hand out v2's prompt."""
    root = tmp_path / "bank"
    shutil.copytree(pristine, root)
    path = root / "index.json"
    text = path.read_text()
    assert '"rte": {"current": 1,' in text
    path.write_text(text.replace('"rte": {"current": 1,', '"rte": {"current": 2,'))
    with pytest.raises(UserError, match="checksum mismatch") as err:
        PromptBank(root).get("rte")
    assert str(path) in str(err.value)
    # verify --fix rebuilds the index from disk; then everything reads again
    PromptBank(root).rebuild_index()
    assert PromptBank(root).verify() == []


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def pristine_checkpoint(tmp_path_factory) -> Path:
    from test_checkpoint import _train, _trainer

    from multipromot.train.checkpoint import save_checkpoint

    model, optimizer, scheduler, sampler = _trainer()
    _train(model, optimizer, scheduler, sampler, 3)
    root = tmp_path_factory.mktemp("checkpoint")
    return save_checkpoint(
        root / "ckpts", 3, model=model, optimizer=optimizer, scheduler=scheduler, sampler=sampler
    )


def _load_checkpoint_everything(path: Path) -> dict:
    """Everything a resume reads: weights, optimizer state, schedule, sampler, RNG."""
    import random as pyrandom

    import numpy as np
    from test_checkpoint import _trainer

    from multipromot.train.checkpoint import load_checkpoint

    model, optimizer, scheduler, sampler = _trainer(seed=1)
    trainer = load_checkpoint(
        path, model=model, optimizer=optimizer, scheduler=scheduler, sampler=sampler
    )
    optim = optimizer.state_dict()["state"]
    return {
        "tensors": {
            **{f"model.{k}": v.clone() for k, v in model.state_dict().items()},
            **{
                f"optim.{i}.{k}": v.clone()
                for i, s in optim.items()
                for k, v in s.items()
                if isinstance(v, torch.Tensor)
            },
            "rng.torch": torch.get_rng_state(),
        },
        "plain": {
            "trainer": json.dumps(trainer, sort_keys=True, default=str),
            "sampler": sampler.position,
            "scheduler": scheduler.state_dict(),
            "python": pyrandom.getstate(),
            "numpy": np.random.get_state()[1].tolist(),
        },
    }


def _same_checkpoint(a: dict, b: dict) -> bool:
    return (
        a["plain"] == b["plain"]
        and a["tensors"].keys() == b["tensors"].keys()
        and all(torch.equal(a["tensors"][k], b["tensors"][k]) for k in a["tensors"])
    )


def _checkpoint_outcome(path: Path, damaged: Path, expected: dict) -> str:
    try:
        loaded = _load_checkpoint_everything(path)
    except UserError as e:
        if "\n" in str(e):
            return "error of several lines"
        return (
            "one-line error naming the file"
            if str(damaged) in str(e)
            else ("one-line error naming the checkpoint, not the file")
        )
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 (dcp raises BaseException subclasses)
        return f"raw {type(e).__name__} (traceback, not one line)"
    return "loaded, identical" if _same_checkpoint(loaded, expected) else "loaded DIFFERENT values"


def _payload_flip(path: Path) -> None:
    """Flip a byte well inside the file's payload (tensor bytes or JSON values)."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * 0.9)] ^= 0x10
    path.write_bytes(bytes(data))


def _weight_flip(path: Path) -> None:
    """Flip a byte inside the stored bytes of the model's first weight matrix."""
    from test_checkpoint import _trainer

    from multipromot.train.checkpoint import load_checkpoint

    model, *_ = _trainer(seed=1)
    load_checkpoint(path.parent, model=model, restore_rng=False)
    weight = model.state_dict()["0.weight"].numpy().tobytes()
    data = bytearray(path.read_bytes())
    at = data.find(weight)
    assert at >= 0
    data[at + len(weight) // 2] ^= 0x10
    path.write_bytes(bytes(data))


CHECKPOINT_DAMAGE = {
    ".metadata truncated": (".metadata", lambda p: p.write_bytes(p.read_bytes()[:100])),
    "trainer_state.json truncated": (
        "trainer_state.json",
        lambda p: p.write_bytes(p.read_bytes()[:100]),
    ),
    ".metadata unpickles to a bad structure": (".metadata", lambda p: p.write_bytes(b"}]]s.")),
    "__0_0.distcp weight byte flipped": ("__0_0.distcp", _weight_flip),
    "__0_0.distcp truncated": ("__0_0.distcp", lambda p: p.write_bytes(p.read_bytes()[:1000])),
    "trainer_state.json not UTF-8": (
        "trainer_state.json",
        lambda p: p.write_bytes(p.read_bytes()[:50] + b"\xff" + p.read_bytes()[51:]),
    ),
    "rng.safetensors tensor byte flipped": ("rng.safetensors", _payload_flip),
}


@pytest.mark.parametrize("damage", list(CHECKPOINT_DAMAGE))
def test_checkpoint_file_damage_is_one_line_naming_the_file(pristine_checkpoint, tmp_path, damage):
    expected = _load_checkpoint_everything(pristine_checkpoint)
    name, corrupt = CHECKPOINT_DAMAGE[damage]
    copy = tmp_path / pristine_checkpoint.name
    shutil.copytree(pristine_checkpoint, copy)
    corrupt(copy / name)
    assert _checkpoint_outcome(copy, copy / name, expected) == "one-line error naming the file"


@pytest.mark.parametrize(
    "garbage",
    [b"", b"step_99\n", b"../../etc\n", b"step_3/../../x\n", b"\xff\xfe"],
)
def test_a_bad_latest_pointer_falls_back_to_a_complete_checkpoint(
    pristine_checkpoint, tmp_path, garbage
):
    from multipromot.train.checkpoint import latest_checkpoint

    root = tmp_path / "ckpts"
    shutil.copytree(pristine_checkpoint.parent, root)
    (root / "latest").write_bytes(garbage)
    assert latest_checkpoint(root) == root / "step_3"


@pytest.mark.slow
def test_checkpoint_corruption_random_trials(pristine_checkpoint, tmp_path):
    expected = _load_checkpoint_everything(pristine_checkpoint)
    names = sorted(p.name for p in pristine_checkpoint.iterdir())
    rng = random.Random(3)
    counts: Counter = Counter()
    trials = 400
    for trial in range(trials):
        name = names[trial % len(names)]
        how = "truncate" if (trial // len(names)) % 2 else "flip"
        copy = tmp_path / f"t{trial}" / pristine_checkpoint.name
        shutil.copytree(pristine_checkpoint, copy)
        original = (copy / name).read_bytes()
        _corrupt(copy / name, rng, how)
        outcome = _checkpoint_outcome(copy, copy / name, expected)
        if outcome.startswith("loaded") and _harmless(original, (copy / name).read_bytes(), None):
            outcome = "harmless (content unchanged)"
        counts[f"{name} {how}: {outcome}"] += 1
        shutil.rmtree(copy.parent)
    bad = sum(
        v
        for k, v in counts.items()
        if not k.endswith(("naming the file", "harmless (content unchanged)", "identical"))
    )
    tally.record(
        "checkpoint_corruption_stress",
        fault="random byte flips and truncations of every checkpoint file",
        trials=trials,
        survived=trials - bad,
        data_lost=0,
        silently_wrong_values=sum(v for k, v in counts.items() if "DIFFERENT" in k),
        outcomes=dict(counts),
    )
    assert bad == 0, counts
