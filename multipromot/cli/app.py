"""The root ``multipromot`` command and its one error policy.

Every command that reads user input lets :class:`~multipromot.errors.UserError` propagate to
:func:`main`, which prints it on one line and exits with status 2 (a traceback only with
``--debug``). Under torchrun every rank exits with that status, and only the first process of
each node prints (:func:`~multipromot.errors.reports_errors`): one line, not one
per rank. The commands themselves live one module per group and register on :data:`app`
when :mod:`multipromot.cli` is imported.
"""

from __future__ import annotations

import sys

import typer

from multipromot.errors import UserError, reports_errors

__all__ = ["app", "main", "CONFIG_ARG", "OVERRIDES_ARG", "HELP"]

HELP = "Multi-task instruction tuning with a prompt bank (ProMoT)."
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help=HELP,
)


@app.callback()
def _root() -> None:
    # A group, not a single command, whatever commands are loaded (a command's module is
    # imported only when it runs: multipromot.cli).
    pass


CONFIG_ARG = typer.Argument(..., help="Run config (YAML).")
OVERRIDES_ARG = typer.Argument(None, help="key=value overrides, e.g. stage2.mode=standard.")


def _error(line: str) -> None:
    if reports_errors():
        print(line, file=sys.stderr)


def main(argv: list[str] | None = None, *, command: typer.Typer | None = None) -> int:
    """Run ``command`` (default: :data:`app`) on ``argv``; returns the exit status (2 for bad
    input or usage). :func:`multipromot.cli.main` loads the command ``argv`` names first."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    try:
        # Without standalone mode typer turns Ctrl-C into a *returned* 130 (not an exception).
        status = (command or app)(args=argv, prog_name="multipromot", standalone_mode=False)
    except KeyboardInterrupt:
        status = 130
    except UserError as e:
        if debug:
            raise
        _error(f"error: {e}")
        return 2
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        return 130
    except typer.TyperException as e:  # typer's bundled click: usage errors, bad options
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        _error(f"error: {' '.join(message.split())} (see multipromot --help)")
        return 2
    except OSError as e:  # e.g. disk full while writing: not bad input, but no traceback either
        if debug:
            raise
        _error(f"error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}")
        return 1
    if status == 130:
        _error(
            "interrupted: finished stages, bank entries and stage-1 and stage-2 checkpoints are "
            "kept; run the same command again to continue"
        )
        return 130
    return status if isinstance(status, int) else 0  # a command's typer.Exit(n)
