"""``multipromot route``: which bank prompt (or none) each input gets, and why; ``--eval``
measures the router on held-out inputs."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from multipromot.bank import PromptBank
from multipromot.cli.app import app
from multipromot.data.mixtures import load_mixture
from multipromot.data.tasks import get_task, list_tasks, local_tasks
from multipromot.errors import UserError
from multipromot.eval.suite_file import load_suite, routing_sets
from multipromot.models import load_model
from multipromot.router import calibrated_router, evaluate_routing, router_entries


@app.command()
def route(
    texts: list[str] = typer.Argument(None, help="Inputs to route."),
    bank_dir: str = typer.Option("prompt_bank", "--bank", help="Prompt bank directory."),
    model: str = typer.Option(None, "--model", help="Only prompts this model accepts (lineage)."),
    file: str = typer.Option(None, "--file", help="Route every line of this file."),
    evaluate: bool = typer.Option(False, "--eval", help="Measure routing on held-out inputs."),
    examples: int = typer.Option(100, min=1, help="--eval: inputs per task and shots setting."),
    mixture: str = typer.Option(
        None,
        "--mixture",
        help="A mixture that defines the bank's tasks (inline tasks too): their held-out "
        "inputs for --eval, and the calibration of those without a signature.",
    ),
    suite: str = typer.Option(
        None,
        "--suite",
        help="--eval: an evaluation suite (inline tasks too) whose tasks are the other-format "
        "inputs, instead of every local task: how often the router leaves them unprompted.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Which bank prompt (or none) each input gets, and why."""

    if not Path(bank_dir).is_dir():
        raise UserError("no prompt bank here (not a directory)", file=bank_dir, key="--bank")
    # the inputs first: a bad --file is named before the model and the tasks are loaded
    inputs = [] if evaluate else [*(texts or []), *(_read_lines(file) if file is not None else [])]
    if not evaluate and not inputs:
        raise UserError("give inputs to route, --file F, or --eval", key="route")
    if suite is not None and not evaluate:
        raise UserError("--suite goes with --eval (the held-out tasks it measures)", key="--suite")
    defined = {t.name: t for t in load_mixture(mixture).tasks} if mixture is not None else {}
    others = load_suite(suite).resolved_tasks() if suite is not None else None
    bank = PromptBank(bank_dir)
    if model is not None:
        bank = _accepted_view(bank, model)
    names = sorted({e.task for e in bank.entries()})
    known = {n: defined.get(n) or get_task(n) for n in names if n in defined or n in list_tasks()}
    negatives = others if others is not None else local_tasks(exclude=names)
    router = calibrated_router(router_entries(bank), list(known.values()), negatives=negatives)
    if evaluate:
        print(_route_eval(router, known, negatives, examples, as_json))
        return
    routes = router.route(inputs)
    if as_json:
        print(json.dumps([r.to_json(t) for t, r in zip(inputs, routes, strict=True)], indent=1))
        return
    for text, r in zip(inputs, routes, strict=True):
        short = text if len(text) <= 60 else text[:57] + "..."
        print(f"{r.task or '(none)':<16} {r.score:6.3f}  {r.reason}  | {short!r}")


def _read_lines(file: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file (one input each)."""
    path = Path(file)
    if not path.is_file():
        raise UserError("no such file", file=file)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = "\0"
    if "\0" in text:
        raise UserError("not a UTF-8 text file with one input per line", file=file, key="--file")
    return [line for line in text.splitlines() if line.strip()]


def _accepted_view(bank, model: str):
    """The bank's entries whose prompt the model accepts (its fingerprint or lineage)."""

    loaded, _, _ = load_model(model)
    accepted = bank.accepted_fingerprints(loaded)

    class View:
        def entries(self):
            return [e for e in bank.entries() if e.fingerprint in accepted]

    return View()


def _route_eval(router, known: dict, negatives: list, examples: int, as_json: bool) -> str:
    """Route held-out inputs of the bank's tasks (catalogue tasks, or those ``--mixture``
    defines) and of the other-format tasks (``--suite``'s, or every other local task)."""
    unknown = [t for t in router.tasks if t not in known]
    if unknown:
        raise UserError(
            f"bank task {unknown[0]!r} is not a catalogue or registered task, so its held-out "
            "inputs cannot be rendered; give its definition with --mixture (the mixture that "
            "defines it, inline tasks too)",
            key="--eval",
        )
    positives, others = routing_sets(
        [known[t] for t in router.tasks],
        [t for t in negatives if t.name not in known],
        examples=examples,
    )
    result = evaluate_routing(router, positives, others)
    if as_json:
        return json.dumps(result, indent=1)
    return (
        f"bank-task inputs routed to their task: {result['positive_rate']:.1f}% "
        f"of {result['n_positives']}\n"
        f"other-format inputs routed to none:    {result['negative_rate']:.1f}% "
        f"of {result['n_negatives']} (incl. 1- and 4-shot prompts of other tasks)"
    )
