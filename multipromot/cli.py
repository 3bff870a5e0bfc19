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
    import os

    from multipromot.config import load_config
    from multipromot.stage2 import finetune

    cfg = load_config(config, overrides or [])
    out = finetune(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line, not one per rank
        print(f"stage 2 done: {out}")


@app.command()
def run(config: str = CONFIG_ARG, overrides: list[str] = OVERRIDES_ARG) -> None:
    """Stage 1 -> stage 2 per method -> evaluation -> report (re-run to resume)."""
    from multipromot.config import load_config
    from multipromot.experiment import run_experiment

    run_experiment(load_config(config, overrides or []))


@app.command()
def route(
    texts: list[str] = typer.Argument(None, help="Inputs to route."),
    bank_dir: str = typer.Option("prompt_bank", "--bank", help="Prompt bank directory."),
    model: str = typer.Option(None, "--model", help="Only prompts this model accepts (lineage)."),
    file: str = typer.Option(None, "--file", help="Route every line of this file."),
    evaluate: bool = typer.Option(False, "--eval", help="Measure routing on held-out inputs."),
    examples: int = typer.Option(100, help="--eval: inputs per task and shots setting."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Which bank prompt (or none) each input gets, and why."""
    import json
    from pathlib import Path

    from multipromot.bank import PromptBank
    from multipromot.router import Router

    bank = PromptBank(bank_dir)
    if model is not None:
        bank = _accepted_view(bank, model)
    router = Router.from_bank(bank)
    if evaluate:
        print(_route_eval(router, examples, as_json))
        return
    inputs = list(texts or [])
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise UserError("no such file", file=file)
        inputs += [line for line in path.read_text().splitlines() if line.strip()]
    if not inputs:
        raise UserError("give inputs to route, --file F, or --eval", key="route")
    routes = router.route(inputs)
    if as_json:
        print(json.dumps([r.to_json(t) for t, r in zip(inputs, routes, strict=True)], indent=1))
        return
    for text, r in zip(inputs, routes, strict=True):
        short = text if len(text) <= 60 else text[:57] + "..."
        print(f"{r.task or '(none)':<16} {r.score:6.3f}  {r.reason}  | {short!r}")


def _accepted_view(bank, model: str):
    """The bank's entries whose prompt the model accepts (its fingerprint or lineage)."""
    from multipromot.models import load_model

    loaded, _, _ = load_model(model)
    accepted = bank.accepted_fingerprints(loaded)

    class View:
        def entries(self):
            return [e for e in bank.entries() if e.fingerprint in accepted]

    return View()


def _route_eval(router, examples: int, as_json: bool) -> str:
    """Route held-out inputs of the bank's tasks and of every other built-in task."""
    import json

    from multipromot.router import evaluate_routing
    from multipromot.suites import routing_sets
    from multipromot.tasks import get_task, list_tasks

    bank_tasks = [get_task(t) for t in router.tasks]
    others = [get_task(t) for t in list_tasks() if t.startswith("lab_") and t not in router.tasks]
    positives, negatives = routing_sets(bank_tasks, others, examples=examples)
    result = evaluate_routing(router, positives, negatives)
    if as_json:
        return json.dumps(result, indent=1)
    return (
        f"bank-task inputs routed to their task: {result['positive_rate']:.1f}% "
        f"of {result['n_positives']}\n"
        f"other-format inputs routed to none:    {result['negative_rate']:.1f}% "
        f"of {result['n_negatives']} (incl. 1- and 4-shot prompts of other tasks)"
    )


@app.command(name="eval")
def eval_(config: str = CONFIG_ARG, overrides: list[str] = OVERRIDES_ARG) -> None:
    """k-shot evaluation of `model` (a base model or a stage-2 final/), router on or off."""
    from multipromot.config import load_config
    from multipromot.experiment import run_eval

    run_eval(load_config(config, overrides or []))


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
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        print(f"error: {' '.join(message.split())} (see multipromot --help)", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. disk full while writing: not bad input, but no traceback either
        if debug:
            raise
        print(
            f"error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}",
            file=sys.stderr,
        )
        return 1
    return 0
