"""``multipromot data``: where each catalogue task loads from (``check``), and writing a dataset
mirror on a machine that reaches the hub (``pull``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from multipromot.cli.common import JsonOpt, print_json
from multipromot.data.mirror import ENV_VAR, set_mirror, write_snapshot
from multipromot.data.sources import HubSource
from multipromot.data.tasks import Task, get_task, hub_source, list_tasks
from multipromot.errors import UserError

__all__ = ["app", "check_tasks", "pull_task"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Dataset mirrors: check where tasks load from, pull hub datasets into a mirror.",
)

SPLITS = ("train", "validation", "test")
MirrorOpt = Annotated[
    str, typer.Option("--mirror", help="Mirror folder (default: $MULTIPROMOT_DATA_MIRROR).")
]


CHECK_ROWS = 8  # rows per split rendered with the task's template: its fields must be there


def check_tasks(names: list[str]) -> list[dict[str, Any]]:
    """Per task: where it loads from and its rows per split, or why it cannot load. The first
    rows of each split are rendered with the task's template, so data whose columns are not
    the template's fields (another dataset stored under the task's name) is found here.

    Args:
        names: task names.

    Returns:
        ``{"task", "source", "where", "rows": {split: n}, "error"}`` per task; ``error`` is
        None when every split loaded and rendered.
    """
    out = []
    for name in names:
        task = get_task(name)
        hub = hub_source(task)
        where = hub.where() if hub is not None else task.source.describe()
        rows, error = {}, None
        for split in SPLITS:
            try:
                examples = task.examples(split)
                rows[split] = len(examples)
                for i in range(min(CHECK_ROWS, len(examples))):
                    task.render(examples[i])
            except UserError as e:
                error = error or f"{split}: {e.message}"
        out.append(
            {
                "task": name,
                "source": task.source.describe(),
                "where": where,
                "rows": rows,
                "error": error,
            }
        )
    return out


def _check_mirror_folder(to: str) -> None:
    """``--to`` names a folder that exists or can be made, and is writable.

    Raises:
        UserError: naming ``--to``.
    """
    path = Path(to).resolve()
    if path.exists() and not path.is_dir():
        raise UserError("is a file, not a folder", file=to, key="--to")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"cannot be made: {parent} is a file", file=to, key="--to")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot be written: {parent} is not writable", file=to, key="--to")


def _hub_split(source: HubSource, split: str) -> Any:
    """One split straight from the hub (or its cache), never from a mirror."""
    import datasets  # deferred: datasets imports slowly

    kwargs = {"revision": source.revision, "data_dir": source.data_dir}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return datasets.load_dataset(source.path, source.name, split=split, **kwargs)


def pull_task(
    task: Task, to: str | Path, *, load: Callable[[HubSource, str], Any] = _hub_split
) -> dict[str, int]:
    """Write the hub splits of ``task`` into the mirror ``to`` (the repository layout).

    Args:
        task: a task whose source is a hub dataset.
        to: the mirror folder.
        load: ``(source, split) -> datasets.Dataset``; the hub by default (tests pass local
            data: nothing may download in tests).

    Returns:
        Rows written per source split.

    Raises:
        UserError: the task has no hub source, or no split of it could be loaded.
    """
    hub = hub_source(task)
    if hub is None:
        raise UserError(f"is not a hub dataset ({task.source.describe()})", key=task.name)
    loaded, reasons = {}, []
    for split in sorted({task.source_split(s) for s in SPLITS}):
        try:
            loaded[split] = load(hub, split)
        except Exception as e:  # datasets raises many types; a split may just not exist
            reasons.append(f"{split}: {str(e).strip().splitlines()[0] if str(e).strip() else e}")
    if not loaded:
        raise UserError(f"no split could be loaded ({'; '.join(reasons)})", key=task.name)
    write_snapshot(to, hub.path, hub.name, loaded)
    return {split: len(rows) for split, rows in loaded.items()}


@app.command()
def check(
    tasks: Annotated[
        list[str] | None, typer.Argument(help="Tasks to check (default: every catalogue task).")
    ] = None,
    mirror: MirrorOpt = "",
    json_out: JsonOpt = False,
) -> None:
    """Per task: where it would load from and its rows per split, or why not (its rows
    rendered with its template). Exit status 1 when a task cannot load."""
    if mirror:
        if not Path(mirror).is_dir():
            raise UserError("no such folder", file=mirror, key="--mirror")
        set_mirror(mirror)
    for name in tasks or []:
        get_task(name, key="data check")  # a typo is one line, before anything loads
    rows = check_tasks(list(tasks) if tasks else list_tasks())
    failed = [r["task"] for r in rows if r["error"] is not None]
    if json_out:
        print_json(rows)
    else:
        for r in rows:
            counts = " ".join(f"{s}={n}" for s, n in r["rows"].items())
            status = f"{counts}" if r["error"] is None else f"{counts}  cannot: {r['error']}"
            typer.echo(f"{r['task']:<16} {r['where']:<48} {status}".rstrip())
    if failed:
        typer.echo(f"{len(failed)} of {len(rows)} tasks cannot load: {', '.join(failed)}", err=True)
        raise typer.Exit(1)


@app.command()
def pull(
    tasks: Annotated[list[str], typer.Argument(help="Catalogue tasks with hub sources.")],
    to: Annotated[str, typer.Option("--to", help="The mirror folder to write.")],
    json_out: JsonOpt = False,
) -> None:
    """Write the hub datasets of TASKS into a mirror folder (needs the hub)."""
    # every name and the folder first: nothing is downloaded for a command that would fail
    resolved = {name: get_task(name, key="data pull") for name in tasks}
    for name, task in resolved.items():
        if hub_source(task) is None:
            raise UserError(f"is not a hub dataset ({task.source.describe()})", key=name)
    _check_mirror_folder(to)
    written = {name: pull_task(task, to) for name, task in resolved.items()}
    if json_out:
        print_json(written)
        return
    for name, counts in written.items():
        typer.echo(f"{name}: " + " ".join(f"{s}={n}" for s, n in counts.items()))
    typer.echo(f"mirror: {to} (use it with data.mirror={to} or ${ENV_VAR})")
