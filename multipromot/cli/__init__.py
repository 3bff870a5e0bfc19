"""The ``multipromot`` command: the root app and error policy in :mod:`~multipromot.cli.app`,
one module per command group (``stages``: stage1/stage2/run/eval; ``route``; ``plan``;
``sweep``; ``bank``; ``mixture``; ``lab``; ``data``).

A command imports only its own module, when it runs (:data:`COMMANDS`, through
:mod:`multipromot.lazy`): ``--help``, ``mixture show`` or ``bank list`` never import the
training code, torch or transformers, so they start at once. ``--help`` lists the commands
from the table's one-line summaries (a test keeps them equal to each command's own help).
"""

from __future__ import annotations

import sys

import typer

from multipromot.cli import app as root
from multipromot.lazy import load

__all__ = ["app", "main", "COMMANDS", "full_app"]

app = root.app

# name -> (module, one-line summary); in the order `--help` and the reference list them.
# A module registers its commands on the root app when imported; a group (``group: True``)
# is the module's own Typer, added under the name.
COMMANDS: dict[str, tuple[str, str]] = {
    "plan": (
        "multipromot.cli.plan",
        "Per-rank parameters, gradients, optimizer state and activations of stage 2, with and "
        "without activation checkpointing, and whether they fit.",
    ),
    "route": ("multipromot.cli.route", "Which bank prompt (or none) each input gets, and why."),
    "stage1": (
        "multipromot.cli.stages",
        "Prompt-tune every task of stage1.mixture into the bank (the model stays frozen).",
    ),
    "stage2": (
        "multipromot.cli.stages",
        "Fine-tune the model on stage2.mixture with frozen bank prompts (torchrun = FSDP2).",
    ),
    "run": (
        "multipromot.cli.stages",
        "Stage 1 -> stage 2 per method -> evaluation -> report (re-run to resume).",
    ),
    "eval": (
        "multipromot.cli.stages",
        "k-shot evaluation of `model` (a base model or a stage-2 final/), router on or off.",
    ),
    "sweep": (
        "multipromot.cli.sweep",
        "Run a grid of `run` cells (the swept values x the seeds), then write sweep.json, "
        "sweep.md and the plots.",
    ),
}
GROUPS: dict[str, tuple[str, str]] = {
    "bank": ("multipromot.cli.bank", "Manage the prompt bank."),
    "mixture": ("multipromot.cli.mixture", "Inspect mixtures."),
    "lab": ("multipromot.cli.lab", "The built-in lab tasks and lab model."),
    "data": ("multipromot.cli.data", "Dataset mirrors for offline clusters."),
}
_ORDER = [*COMMANDS, *GROUPS]


def _load(name: str) -> None:
    """Import the module of command ``name`` (its commands register on :data:`app`)."""
    if name in COMMANDS:
        load(COMMANDS[name][0])
    elif not any(g.name == name for g in app.registered_groups):
        module, summary = GROUPS[name]
        app.add_typer(load(module).app, name=name, help=summary)
    # the table's order, whichever command was loaded first in this process
    app.registered_commands.sort(key=lambda c: _ORDER.index(c.name or c.callback.__name__))
    app.registered_groups.sort(key=lambda g: _ORDER.index(g.name))


def _listing() -> typer.Typer:
    """A root app whose commands are the table's summaries (no module imported): what
    ``multipromot --help``, a bare ``multipromot`` and an unknown command answer."""
    listing = typer.Typer(
        add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help=root.HELP
    )
    listing.callback()(_unloaded_root)
    for name, (_, summary) in COMMANDS.items():
        listing.command(name=name, help=summary)(_unloaded)
    for name, (_, summary) in GROUPS.items():
        listing.add_typer(typer.Typer(), name=name, help=summary)
    return listing


def _unloaded() -> None:  # never runs: a named command loads its module first
    raise AssertionError("placeholder command")


def _unloaded_root() -> None:  # a group, as the root app is
    pass


def full_app() -> typer.Typer:
    """The root app with every command loaded (the generated reference reads it)."""
    for name in _ORDER:
        _load(name)
    return app


def main(argv: list[str] | None = None) -> int:
    """Entry point (``multipromot``, ``python -m multipromot``): loads the command ``argv``
    names, then runs it under the one error policy (:func:`multipromot.cli.app.main`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    name = next((a for a in argv if not a.startswith("-")), None)
    if name in COMMANDS or name in GROUPS:
        _load(name)
        return root.main(argv)
    return root.main(argv, command=_listing())
