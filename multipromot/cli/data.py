"""``multipromot data``: where each catalogue task loads from (``check``), and writing a dataset
mirror on a machine that reaches the hub (``pull``)."""

from __future__ import annotations

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


def check_tasks(names: list[str]) -> list[dict[str, Any]]:
    """Per task: where it loads from and its rows per split, or why it cannot load.

    Args:
        names: task names.

    Returns:
        ``{"task", "source", "where", "rows": {split: n}, "error"}`` per task; ``error`` is
        None when every split loaded.
    """
    out = []
    for name in names:
        task = get_task(name)
        hub = hub_source(task)
        where = hub.where() if hub is not None else task.source.describe()
        rows, error = {}, None
        for split in SPLITS:
            try:
                rows[split] = len(task.examples(split))
            except UserError as e:
                error = error or e.message
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
def check(mirror: MirrorOpt = "", json_out: JsonOpt = False) -> None:
    """Per catalogue task: where it would load from and its rows per split, or why not."""
    if mirror:
        if not Path(mirror).is_dir():
            raise UserError("no such folder", file=mirror, key="--mirror")
        set_mirror(mirror)
    rows = check_tasks(list_tasks())
    if json_out:
        print_json(rows)
        return
    for r in rows:
        counts = " ".join(f"{s}={n}" for s, n in r["rows"].items())
        status = f"{counts}" if r["error"] is None else f"{counts}  cannot: {r['error']}"
        typer.echo(f"{r['task']:<16} {r['where']:<48} {status}".rstrip())


@app.command()
def pull(
    tasks: Annotated[list[str], typer.Argument(help="Catalogue tasks with hub sources.")],
    to: Annotated[str, typer.Option("--to", help="The mirror folder to write.")],
    json_out: JsonOpt = False,
) -> None:
    """Write the hub datasets of TASKS into a mirror folder (needs the hub)."""
    written = {name: pull_task(get_task(name), to) for name in tasks}
    if json_out:
        print_json(written)
        return
    for name, counts in written.items():
        typer.echo(f"{name}: " + " ".join(f"{s}={n}" for s, n in counts.items()))
    typer.echo(f"mirror: {to} (use it with data.mirror={to} or ${ENV_VAR})")
