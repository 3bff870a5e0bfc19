"""``multipromot bank ...``: list, show, verify, rm, diff, export and import prompt-bank entries.

Every command takes ``--bank DIR`` (default ``prompt_bank``) and ``--json`` (one JSON document
on stdout, for scripts). Bad input raises :class:`~multipromot.errors.UserError` /
:class:`~multipromot.errors.BankError`, which ``multipromot.cli.main`` prints on one line with
exit status 2; ``bank verify`` prints one line per problem and exits 2 when it finds any.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from multipromot.bank import BankEntry, PromptBank, base_model_record, parse_ref
from multipromot.bank.vllm import VLLM_META_FILE, export_vllm
from multipromot.cli.common import JsonOpt, print_json
from multipromot.errors import BankError
from multipromot.models import load_model

__all__ = ["app"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Manage the prompt bank: list, show, verify, rm, diff, export, import.",
)

BankOpt = Annotated[str, typer.Option("--bank", help="Prompt bank directory.")]
DEFAULT_BANK = "prompt_bank"


EXCHANGE_FORMATS = ("peft",)
EXPORT_FORMATS = (*EXCHANGE_FORMATS, "vllm")  # vllm: export only (prompt_embeds for a server)


def _check_format(fmt: str, formats: tuple[str, ...] = EXCHANGE_FORMATS) -> str:
    # checked here, not by a click Choice, so that a typo is one line + exit 2 like any other
    # bad input
    if fmt not in formats:
        raise BankError(f"unknown format {fmt!r}; supported: {', '.join(formats)}", key="--format")
    return fmt


def _console() -> Console:
    # created per call so that output follows the current sys.stdout (tests capture it)
    return Console(highlight=False, soft_wrap=False)


def _open_bank(bank: str) -> PromptBank:
    """A bank that must already exist (a typo in --bank is an error, not an empty listing)."""
    root = Path(bank)
    if not root.is_dir():
        raise BankError("no prompt bank here (not a directory); pass --bank DIR", file=root)
    return PromptBank(root)


def _score(stage1: dict | None) -> str:
    if not stage1 or stage1.get("value") is None:
        return "-"
    value = stage1["value"]
    shown = f"{value:.4g}" if isinstance(value, (int, float)) else str(value)
    return f"{stage1.get('metric') or 'score'} {shown}"


@app.command("list")
def list_entries(
    bank: BankOpt = DEFAULT_BANK,
    all_versions: Annotated[
        bool, typer.Option("--all", help="Every version, not only the current one per task.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Every task with its current version, prompt length, base model, stage-1 score, date.
    Unreadable entries (a checksum, shape or NaN in the tensor too) are flagged on stderr
    (exit status 1); the healthy ones are listed."""
    problems: list = []
    entries = _open_bank(bank).entries(problems=problems, check_prompts=True)
    try:
        _list(bank, entries, all_versions, json_out)
    finally:
        for p in problems:
            typer.echo(f"bad entry {p}; `multipromot bank verify` says more", err=True)
    if problems:
        raise typer.Exit(1)


def _list(bank: str, entries: list, all_versions: bool, json_out: bool) -> None:
    shown = entries if all_versions else [e for e in entries if e.current]
    if json_out:
        print_json([e.summary() for e in shown])
        return
    if not shown:
        typer.echo(f"{bank}: no entries")
        return
    counts = {e.task: 0 for e in entries}
    for e in entries:
        counts[e.task] += 1
    table = Table(title=f"prompt bank {bank}")
    for column in ("task", "version", "versions", "P x d", "base model", "stage 1", "created"):
        table.add_column(column)
    for e in shown:
        s = e.summary()
        version = s["ref"].split("@")[1] + (" *" if e.current and all_versions else "")
        table.add_row(
            e.task,
            version,
            str(counts[e.task]),
            f"{e.prompt_length} x {e.dim}",
            str(s["base_model"]),
            _score(e.meta.get("stage1")),
            str(s["created"] or "-")[:16].replace("T", " "),
        )
    _console().print(table)


@app.command("show")
def show(
    ref: Annotated[str, typer.Argument(help="TASK (current version) or TASK@vN.")],
    bank: BankOpt = DEFAULT_BANK,
    json_out: JsonOpt = False,
) -> None:
    """The meta of one entry and the stage-2 checkpoints trained with it."""
    store = _open_bank(bank)
    entry = store.get(ref)
    versions = [
        {"ref": e.ref, "current": e.current, "created": e.meta.get("created")}
        for e in store.entries(entry.task)
    ]
    if json_out:
        print_json(
            {
                "ref": entry.ref,
                "current": entry.current,
                "path": str(entry.path),
                "meta": entry.meta,
                "versions": versions,
            }
        )
        return
    console = _console()
    table = Table(title=f"{entry.ref}" + (" (current)" if entry.current else ""), show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    for key in ("task", "version", "prompt_length", "dim", "init", "created", "sha256"):
        table.add_row(key, str(entry.meta.get(key)))
    base = entry.meta["base_model"]
    table.add_row("base model", f"{base.get('name')} (fingerprint {base.get('fingerprint')})")
    fmt = entry.format
    table.add_row("template", str(fmt.get("template", "-")))
    table.add_row("answer choices", str(fmt.get("answer_choices", "-")))
    stage1 = entry.meta.get("stage1") or {}
    table.add_row(
        "stage 1", f"{_score(stage1)} after {stage1.get('steps', '?')} steps" if stage1 else "-"
    )
    table.add_row("path", str(entry.path))
    table.add_row(
        "versions", ", ".join(v["ref"] + (" (current)" if v["current"] else "") for v in versions)
    )
    console.print(table)
    stage2 = entry.stage2
    if not stage2:
        console.print("stage-2 checkpoints: none")
        return
    checkpoints = Table(title="stage-2 checkpoints trained with it")
    checkpoints.add_column("checkpoint", overflow="fold")
    checkpoints.add_column("recorded")
    for item in stage2:
        checkpoints.add_row(str(item.get("checkpoint")), str(item.get("recorded", "")))
    console.print(checkpoints)


@app.command("verify")
def verify(
    bank: BankOpt = DEFAULT_BANK,
    model: Annotated[
        str | None,
        typer.Option(
            "--model", help="Also check every entry's fingerprint against this model (path)."
        ),
    ] = None,
    fix: Annotated[
        bool, typer.Option("--fix", help="Rebuild index.json from disk first (needs the lock).")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Check every checksum, meta.json, the index, and the base models' fingerprints."""
    store = _open_bank(bank)
    if fix:
        store.rebuild_index()
    loaded = None
    if model is not None:
        loaded, _, _ = load_model(model)
    problems = store.verify(model=loaded)
    count = len(store.entries()) if not problems else None
    if json_out:
        print_json({"ok": not problems, "problems": [p.to_dict() for p in problems]})
    else:
        for problem in problems:
            typer.echo(str(problem))
        if not problems:
            typer.echo(f"{bank}: {count} entries, all checks passed")
    if problems:
        raise BankError(f"{len(problems)} problem(s) found", file=bank)


@app.command("rm")
def remove(
    ref: Annotated[str, typer.Argument(help="TASK@vN (one version) or TASK (every version).")],
    bank: BankOpt = DEFAULT_BANK,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Also remove the current version, a whole task, or a prompt that stage-2 "
            "checkpoints were trained with.",
        ),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Remove one version; never the current one (or a whole task) unless --force."""
    store = _open_bank(bank)
    task, _ = parse_ref(ref)
    removed = store.remove(ref, force=force)
    current = store.current_version(task)
    now = store.get(task).ref if current is not None else None
    if json_out:
        print_json({"removed": [e.ref for e in removed], "current": {task: now}})
        return
    for entry in removed:
        typer.echo(f"removed {entry.ref}")
    typer.echo(f"{task}: current is now {now}" if now else f"{task}: no entries left")


@app.command("diff")
def diff(
    a: Annotated[str, typer.Argument(help="First entry (TASK or TASK@vN).")],
    b: Annotated[str, typer.Argument(help="Second entry.")],
    bank: BankOpt = DEFAULT_BANK,
    json_out: JsonOpt = False,
) -> None:
    """How two prompts differ: cosine (flattened, per position), norms, distance, scores."""
    result = _open_bank(bank).diff(a, b)
    if json_out:
        print_json(result)
        return

    def num(value) -> str:
        return "-" if value is None else f"{value:.4f}"

    table = Table(title=f"{result['a']} vs {result['b']}")
    table.add_column("")
    table.add_column(result["a"])
    table.add_column(result["b"])
    table.add_row("shape", str(result["shape_a"]), str(result["shape_b"]))
    table.add_row("norm", num(result["norm_a"]), num(result["norm_b"]))
    table.add_row("mean row norm", num(result["mean_row_norm_a"]), num(result["mean_row_norm_b"]))
    table.add_row("stage 1", _score(result["stage1_a"]), _score(result["stage1_b"]))
    console = _console()
    console.print(table)
    console.print(
        f"cosine {num(result['cosine'])}, mean cosine per position "
        f"{num(result['cosine_mean_per_position'])}, L2 distance {num(result['l2_distance'])}"
        + ("" if result["same_base_model"] else "; trained on different base models")
    )


@app.command("export")
def export(
    ref: Annotated[str, typer.Argument(help="TASK (current version) or TASK@vN.")],
    out_dir: Annotated[Path, typer.Argument(help="New directory to write.")],
    fmt: Annotated[str, typer.Option("--format", help="Output format: peft or vllm.")] = "peft",
    base_model: Annotated[
        str | None,
        typer.Option(
            "--base-model",
            help="Base model path/id for the adapter config (default: the entry's base model).",
        ),
    ] = None,
    task_type: Annotated[
        str | None,
        typer.Option(
            "--task-type", help="SEQ_2_SEQ_LM or CAUSAL_LM (default: read from the base model)."
        ),
    ] = None,
    bank: BankOpt = DEFAULT_BANK,
    json_out: JsonOpt = False,
) -> None:
    """Write an entry as a PEFT prompt-tuning adapter (PeftModel.from_pretrained loads it),
    or with --format vllm as the prompt_embeds a vLLM client sends (decoder-only models)."""
    _check_format(fmt, EXPORT_FORMATS)
    store = _open_bank(bank)
    entry: BankEntry = store.get(ref)
    if fmt == "vllm":
        out = export_vllm(
            store, entry.ref, out_dir, base_model_name_or_path=base_model, task_type=task_type
        )
        info = {"ref": entry.ref, "format": fmt, "out_dir": str(out)}
        info.update(json.loads((out / VLLM_META_FILE).read_text()))
        if json_out:
            print_json(info)
            return
        typer.echo(
            f"exported {entry.ref} to {out} (vLLM prompt_embeds {info['dtype']} "
            f"{' x '.join(map(str, info['shape']))}, base {info['base_model']['served_as']})"
        )
        return
    out = store.export_peft(
        entry.ref, out_dir, base_model_name_or_path=base_model, task_type=task_type
    )
    config = json.loads((out / "adapter_config.json").read_text())
    info = {
        "ref": entry.ref,
        "format": fmt,
        "out_dir": str(out),
        "task_type": config["task_type"],
        "base_model_name_or_path": config["base_model_name_or_path"],
    }
    if json_out:
        print_json(info)
        return
    typer.echo(
        f"exported {entry.ref} to {out} (PEFT prompt tuning, {config['task_type']}, "
        f"{entry.prompt_length} virtual tokens x {entry.dim}, base {info['base_model_name_or_path']})"
    )


@app.command("import")
def import_(
    adapter_dir: Annotated[Path, typer.Argument(help="A PEFT prompt-tuning adapter directory.")],
    task: Annotated[str, typer.Option("--task", help="Bank task to add a version to.")],
    fmt: Annotated[str, typer.Option("--format", help="Input format: peft.")] = "peft",
    base_model: Annotated[
        str | None,
        typer.Option(
            "--base-model",
            help="Path of the model the prompt was trained on (default: from the adapter).",
        ),
    ] = None,
    bank: BankOpt = DEFAULT_BANK,
    json_out: JsonOpt = False,
) -> None:
    """Read a PEFT prompt-tuning adapter into a new version of TASK (it becomes current)."""
    _check_format(fmt)
    if not adapter_dir.is_dir():
        raise BankError("not a directory", file=adapter_dir)
    record = base_model_record(base_model) if base_model is not None else None
    # unlike the other commands, import may create the bank
    entry = PromptBank(bank).import_peft(adapter_dir, task, base_model=record)
    if json_out:
        print_json(entry.summary())
        return
    typer.echo(
        f"imported {adapter_dir} as {entry.ref} ({entry.prompt_length} x {entry.dim}, "
        f"base {entry.meta['base_model']['name']}, format {fmt})"
    )
