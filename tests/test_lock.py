"""Reproducible installs: `make` installs the versions of requirements.lock; every dependency
of pyproject (and of the extras make installs) is pinned there and installed at its pin."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
MAKE_EXTRAS = ("dev", "lmeval", "wandb")  # as the Makefile's setup installs them


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            pins[_name(name)] = pinned
    return pins


def test_every_dependency_make_installs_is_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in MAKE_EXTRAS:
        wanted += project["optional-dependencies"][extra]
    make = (ROOT / "Makefile").read_text()
    assert f'-e ".[{",".join(MAKE_EXTRAS)}]"' in make and "-c requirements.lock" in make
    missing = sorted(
        {_name(r) for r in wanted} - set(_locked()) - {"torch"}
    )  # torch: constraints.txt
    assert missing == []


def test_installed_versions_are_the_locked_ones():
    drift = []
    for name, pinned in _locked().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue  # locked for an extra this environment does not have
        if installed != pinned:
            drift.append(f"{name}: installed {installed}, locked {pinned}")
    assert drift == []  # run `make lock` after changing a dependency on purpose
