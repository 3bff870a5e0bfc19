"""The ``multipromot`` command.

Every command that reads user input lets :class:`~multipromot.errors.UserError` propagate to
:func:`main`, which prints it on one line and exits with status 2 (a traceback only with
``--debug``).
"""

from __future__ import annotations

import sys

import typer

from multipromot.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Multi-task instruction tuning with a prompt bank (ProMoT).",
)


def _register_subcommands() -> None:
    """Sub-apps live next to the concept they drive; import them lazily-tolerant."""
    from multipromot import cli_bank

    app.add_typer(cli_bank.app, name="bank", help="Manage the prompt bank.")
    try:
        from multipromot import cli_mixture

        app.add_typer(cli_mixture.app, name="mixture", help="Inspect mixtures.")
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    _register_subcommands()
    try:
        app(args=argv, prog_name="multipromot", standalone_mode=False)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except typer.Exit as e:
        return e.exit_code
    except SystemExit as e:  # click usage errors
        return e.code if isinstance(e.code, int) else 1
    except Exception as e:  # click.ClickException and friends: usage errors
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return 2
        if isinstance(e, click.exceptions.Abort):
            return 130
        raise
    return 0
