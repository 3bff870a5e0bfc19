"""Config loading: defaults, YAML + overrides, and one-line errors naming file and key."""

from pathlib import Path

import pytest

from multipromot.config import load_config
from multipromot.errors import UserError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_merge_in_order(tmp_path):
    path = write(tmp_path, "seed: 3\nstage2: {mode: standard, lr: 0.01}\n")
    cfg = load_config(path, ["stage2.lr=0.5", "stage1.steps=7"])
    assert (cfg.seed, cfg.stage2.mode, cfg.stage2.lr, cfg.stage1.steps) == (3, "standard", 0.5, 7)
    assert cfg.stage1.lr == 0.3  # the documented default survives
    assert cfg.config_file == str(path.resolve())


@pytest.mark.parametrize(
    ("text", "overrides", "file_part", "key_part"),
    [
        ("stage2: {mod: standard}\n", [], "c.yaml", "stage2.mod"),
        ("stage2: {mode: bogus}\n", [], "c.yaml", "stage2.mode"),
        ("seed: 1\n", ["stage1.steps=abc"], "<command line>", "stage1.steps"),
        ("stage2: {batch_size: -4}\n", [], "c.yaml", "stage2.batch_size"),
        ("stage2: {batch_size: 6, grad_accum: 4}\n", [], "c.yaml", "stage2.batch_size"),
        ("seed: [1\n", [], "c.yaml", "line"),
        ("- just\n- a list\n", [], "c.yaml", ""),
        ("seed: 1\n", ["no_equals_sign"], "<command line>", ""),
    ],
)
def test_bad_config_is_one_line_naming_file_and_key(tmp_path, text, overrides, file_part, key_part):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    assert file_part in message and key_part in message


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_paths_in_a_config_resolve_against_its_folder_overrides_against_the_cwd(
    tmp_path, monkeypatch
):
    """`multipromot eval /abs/configs/tiny.yaml` works from any folder (issue 14)."""
    from pathlib import Path

    from multipromot.config import load_config

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    cfg = load_config(root / "configs" / "tiny.yaml", ["stage2.mixture=mine.yaml"])
    assert cfg.stage1.mixture == str(root / "mixtures" / "lab_rte_fr.yaml")
    assert Path(cfg.stage1.mixture).is_file() and Path(cfg.eval.suite).is_file()
    assert cfg.out_dir == str(root / "runs" / "tiny")
    assert cfg.stage2.mixture == "mine.yaml"  # the command line is relative to the cwd
    assert cfg.model == "tiny-t5"  # not a path: a built-in model name stays as it is


_SHIPPED = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", _SHIPPED, ids=[p.name for p in _SHIPPED])
def test_every_shipped_offline_config_loads_with_its_mixtures_and_methods(path):
    """A config under configs/ that runs offline (a built-in model) loads, and so do its
    mixtures and every method label, as `multipromot run` would check them before training.
    The paper's configs need hub data, so only their YAML is checked."""
    import multipromot.lab  # noqa: F401  (registers the lab's built-in models)
    from multipromot.data.mixtures import load_mixture
    from multipromot.methods import parse_method
    from multipromot.models import BUILTIN_MODELS

    cfg = load_config(path)
    if cfg.model not in BUILTIN_MODELS:
        return
    for mixture in (cfg.stage1.mixture, cfg.stage2.mixture, *cfg.mixtures.values()):
        assert load_mixture(mixture).tasks
    for label in cfg.methods:
        method = parse_method(
            label,
            mixtures=cfg.mixtures,
            default_mixture=cfg.stage2.mixture,
            listed=cfg.methods,
            file=str(path),
        )
        assert method.label == label
