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


CONFIG_ARG = typer.Argument(..., help="Run config (YAML).")
OVERRIDES_ARG = typer.Argument(None, help="key=value overrides, e.g. stage2.mode=standard.")


@app.command()
def stage1(config: str = CONFIG_ARG, overrides: list[str] = OVERRIDES_ARG) -> None:
    """Prompt-tune every task of stage1.mixture into the bank (the model stays frozen)."""
    from multipromot.config import load_config
    from multipromot.stage1 import train_prompts

    cfg = load_config(config, overrides or [])
    entries = train_prompts(cfg)
    for entry in entries:
        s1 = entry.meta.get("stage1", {})
        print(
            f"{entry.ref}  P={entry.meta['prompt_length']}  "
            f"{s1.get('metric')}={s1.get('value', float('nan')):.4g} (step {s1.get('best_step')})"
        )
    print(f"bank: {cfg.bank.dir}")


@app.command()
def stage2(config: str = CONFIG_ARG, overrides: list[str] = OVERRIDES_ARG) -> None:
    """Fine-tune the model on stage2.mixture with frozen bank prompts (torchrun = FSDP2)."""
    from multipromot.config import load_config
    from multipromot.stage2 import finetune

    cfg = load_config(config, overrides or [])
    out = finetune(cfg)
    print(f"stage 2 done: {out}")


@app.command()
def run(config: str = CONFIG_ARG, overrides: list[str] = OVERRIDES_ARG) -> None:
    """Stage 1 -> stage 2 per method -> evaluation -> report (re-run to resume)."""
    from multipromot.config import load_config
    from multipromot.experiment import run_experiment

    run_experiment(load_config(config, overrides or []))


_registered = False


def _register_subcommands() -> None:
    """Add the sub-apps once (each lives next to the concept it drives)."""
    global _registered
    if _registered:
        return
    from multipromot import cli_bank, cli_lab, cli_mixture

    app.add_typer(cli_bank.app, name="bank", help="Manage the prompt bank.")
    app.add_typer(cli_mixture.app, name="mixture", help="Inspect mixtures.")
    app.add_typer(cli_lab.app, name="lab", help="The built-in lab tasks and lab model.")
    _registered = True


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input or usage)."""
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
    except typer.Abort:
        return 130
    except typer.TyperException as e:  # typer's bundled click: usage errors, bad options
        e.show()
        return 2
    return 0
