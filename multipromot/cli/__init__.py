"""The ``multipromot`` command: the root app and error policy in :mod:`~multipromot.cli.app`,
one module per command group (``stages``: stage1/stage2/run/eval; ``route``; ``bank``;
``mixture``; ``lab``). Importing this package registers every command."""

from multipromot.cli import bank, data, lab, mixture, plan, route, stages, sweep  # noqa: F401  (register commands)
from multipromot.cli.app import app, main

app.add_typer(bank.app, name="bank", help="Manage the prompt bank.")
app.add_typer(mixture.app, name="mixture", help="Inspect mixtures.")
app.add_typer(lab.app, name="lab", help="The built-in lab tasks and lab model.")
app.add_typer(data.app, name="data", help="Dataset mirrors for offline clusters.")

__all__ = ["app", "main"]
