"""What every command group shares: the ``--json`` option and how JSON is printed."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

__all__ = ["JsonOpt", "print_json"]

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document (for scripts).")]


def print_json(data: Any) -> None:
    """One indented JSON document on stdout; paths and other objects as strings."""
    typer.echo(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, default=str))
