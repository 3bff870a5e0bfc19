"""``multipromot mixture ...``: inspect a mixture YAML before training on it.

``mixture show FILE`` lists the tasks with their resolved rates, train sizes and templates;
``mixture sample FILE -n 5`` prints drawn examples exactly as the model gets them (the k-shot
input with its exemplars, then the target), using the same sampler, exemplar choice and
rendering as stage 2. Both take ``--json``. Bad input raises
:class:`~multipromot.errors.UserError`, which ``multipromot.cli.main`` prints on one line with
exit status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from multipromot.cli.common import JsonOpt, print_json
from multipromot.data.exemplars import build_item, choose_exemplars
from multipromot.data.mixtures import Mixture, load_mixture
from multipromot.data.sampler import MixtureSampler
from multipromot.errors import UserError
from multipromot.features import kshot_text

__all__ = ["app", "describe_mixture", "sample_mixture"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Inspect mixtures: show tasks and rates, sample rendered examples.",
)

MAX_SAMPLE = 10_000  # examples `mixture sample` renders and prints at once (a look, not a dump)
FileArg = Annotated[Path, typer.Argument(help="Mixture YAML file.", show_default=False)]


def describe_mixture(mixture: Mixture) -> dict[str, Any]:
    """Plain data describing a mixture: header and one row per task.

    A task whose train split cannot be loaded (e.g. a hub dataset while offline) gets
    ``train_examples: None`` and the reason in ``train_error``, so ``show`` still works.

    Args:
        mixture: a loaded mixture.

    Returns:
        ``{"name", "file", "version", "shots", "exemplar_seed", "tasks": [{"id", "name",
        "rate", "train_examples", "train_error", "template", "metric", "origin"}],
        "replay": None or {"share", "shots", "tasks": [rows as above, "id" -1]}}``; a rate
        is the task's share of stage 2's rows (a replay task's within the replay share).
    """
    stream = mixture.stream()
    rows = [
        _task_row(task, i, rate, mixture.origins, i)
        for i, (task, rate) in enumerate(zip(stream.tasks, stream.rates, strict=True))
        if i < len(mixture.tasks)
    ]
    replay = None
    if mixture.replay is not None:
        share = mixture.replay.share
        replay = {
            "share": share,
            "shots": mixture.replay.shots,
            "tasks": [
                _task_row(task, -1, rate * share, mixture.replay.origins, i)
                for i, (task, rate) in enumerate(
                    zip(mixture.replay.tasks, mixture.replay.rates, strict=True)
                )
            ],
        }
    return {
        "name": mixture.name,
        "file": mixture.file,
        "version": mixture.version,
        "shots": mixture.shots,
        "exemplar_seed": mixture.exemplar_seed,
        "tasks": rows,
        "replay": replay,
    }


def _task_row(task, task_id: int, rate: float, origins: list[str], i: int) -> dict[str, Any]:
    size, error = None, None
    try:
        size = task.num_examples("train")
    except UserError as e:
        error = str(e)
    template = getattr(task, "template", None)
    return {
        "id": task_id,
        "name": task.name,
        "rate": rate,
        "train_examples": size,
        "train_error": error,
        "template": getattr(template, "id", None),
        "metric": getattr(task, "metric", None),
        "origin": origins[i] if i < len(origins) else None,
    }


def sample_mixture(
    mixture: Mixture, n: int, *, seed: int = 0, split: str = "train", shots: int | None = None
) -> list[dict[str, Any]]:
    """The first ``n`` draws of the mixture's stream, rendered as the model gets them.

    Args:
        mixture: a loaded mixture.
        n: how many examples.
        seed: the sampler seed (the run's ``seed``).
        split: which split to draw from (exemplars always come from train).
        shots: exemplars per example; default: the mixture's ``exemplars.shots``.

    Returns:
        One dict per draw: ``task``, ``task_id`` (-1 for a replay row), ``split``,
        ``example_index``, ``exemplar_indices``, ``input`` (the full k-shot input string),
        ``target``. A replay row gets ``replay.shots`` exemplars, the others ``shots``.
    """
    stream = mixture.stream()  # with its replay tasks, as stage 2 draws them
    sampler = MixtureSampler(stream, seed=seed, split=split)
    shots = mixture.shots if shots is None else shots
    task_ids, per_task = mixture.stream_rows(list(range(len(mixture.tasks))), shots)
    out = []
    for draw in sampler.take(n):
        task, k = stream.tasks[draw.task_index], per_task[draw.task_index]
        item = build_item(
            task,
            draw.example_index,
            split=split,
            shots=k,
            seed=mixture.exemplar_seed,
            task_id=task_ids[draw.task_index],
        )
        exemplar_indices = choose_exemplars(
            task, draw.example_index, k, mixture.exemplar_seed, split
        )
        out.append(
            {
                "task": task.name,
                "task_id": item.task_id,
                "split": split,
                "example_index": draw.example_index,
                "exemplar_indices": exemplar_indices,
                "input": kshot_text(item),
                "target": item.target,
            }
        )
    return out


def _percent(rate: float) -> str:
    return f"{100 * rate:.2f}%"


@app.command()
def show(file: FileArg, json_out: JsonOpt = False) -> None:
    """The tasks of a mixture with their resolved rates, train sizes, templates and metrics."""
    info = describe_mixture(load_mixture(file))
    if json_out:
        print_json(info)
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    shots = info["shots"]
    exemplars = f"{shots}-shot (exemplar seed {info['exemplar_seed']})" if shots else "0-shot"
    table = Table(
        title=escape(
            f"mixture {info['name']} ({info['file']}), version {info['version']}, {exemplars}"
        ),
        title_justify="left",
    )
    for column in ("id", "task", "rate", "train", "template", "metric", "defined in"):
        table.add_column(column, justify="right" if column in ("id", "rate", "train") else "left")
    replay = info["replay"]
    replayed = replay["tasks"] if replay else []
    for row in info["tasks"] + replayed:
        size = row["train_examples"]
        table.add_row(
            "replay" if row["id"] < 0 else str(row["id"]),
            escape(row["name"]),
            _percent(row["rate"]),
            "?" if size is None else f"{size:,}",
            escape(str(row["template"])),
            escape(str(row["metric"])),
            escape(str(row["origin"])),
        )
    console = Console(highlight=False, soft_wrap=False, width=200)
    console.print(table)
    if replay:
        console.print(
            escape(
                f"replay: {_percent(replay['share'])} of stage 2's rows are {replay['shots']}-shot "
                "train rows of the replay tasks, without a prompt; they are not fine-tuned tasks "
                "(no prompt, no validation, not scored as seen)"
            )
        )
    for row in info["tasks"] + replayed:
        if row["train_error"]:
            console.print(escape(f"{row['name']}: train size unknown: {row['train_error']}"))


@app.command()
def sample(
    file: FileArg,
    num: Annotated[
        int, typer.Option("-n", "--num", min=1, max=MAX_SAMPLE, help="How many examples.")
    ] = 5,
    seed: Annotated[int, typer.Option(help="Sampler seed (the run's seed).", min=0)] = 0,
    split: Annotated[str, typer.Option(help="Split to draw from.")] = "train",
    shots: Annotated[
        int | None, typer.Option(help="Exemplars per example (default: the mixture's).", min=0)
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Drawn examples exactly as the model gets them: k-shot input (exemplars first), target."""
    mixture = load_mixture(file)
    rows = sample_mixture(mixture, num, seed=seed, split=split, shots=shots)
    if json_out:
        print_json(rows)
        return
    # Plain echo, not rich: rich would read "[...]" in the data as markup.
    for i, row in enumerate(rows, 1):
        exemplars = ", ".join(f"train[{j}]" for j in row["exemplar_indices"]) or "none"
        typer.echo(
            f"=== {i}/{len(rows)}  task {row['task']} (id {row['task_id']})  "
            f"{row['split']}[{row['example_index']}]  exemplars: {exemplars}"
        )
        typer.echo("--- input")
        typer.echo(row["input"])
        typer.echo("--- target")
        typer.echo(row["target"])
        typer.echo("")
