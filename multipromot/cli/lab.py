"""``multipromot lab ...``: the embedded lab tasks and the lab model.

``lab tasks`` lists the lab families with their split sizes, metric, answer set and one rendered
example; ``lab pretrain`` builds the lab model into a directory (by default the cache that
``model: lab`` loads from) and prints its 1-shot scores; ``lab eval`` scores an existing model
directory k-shot on the lab test splits. Bad input raises
:class:`~multipromot.errors.UserError`, which ``multipromot.cli.main`` prints on one line with
exit status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from multipromot.cli.common import JsonOpt, print_json
from multipromot.data.tasks import get_task
from multipromot.errors import UserError
from multipromot.lab import FAMILIES, PRETRAIN_FAMILIES, SPLITS
from multipromot.lab.model import (
    LAB_DECODER_RECIPE,
    LAB_DECODER_SIZES,
    PRETRAIN_RECORD,
    ensure_lab_model,
    evaluate_lab_model,
    lab_tasks,
    read_pretrain_record,
)
from multipromot.models import default_cache_dir, load_model

__all__ = ["app", "describe_lab_tasks", "default_lab_path"]

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="The lab: generated task families and the small pretrained lab model.",
)

SeedOpt = Annotated[int, typer.Option("--seed", help="Model init, batch order and task seed.")]


def default_lab_path(seed: int = 0, size: str = "small") -> Path:
    """Where ``model: lab`` (or ``lab-llama`` for a decoder size) is cached:
    ``<cache>/models/lab-seed<seed>``, as ``load_model`` finds it."""
    name = "lab-llama" if size in LAB_DECODER_SIZES else "lab"
    return default_cache_dir() / "models" / f"{name}-seed{seed}"


def describe_lab_tasks() -> list[dict[str, Any]]:
    """One row per lab family: sizes, metric, answers, whether pretraining saw it, an example.

    Returns:
        ``[{"name", "sizes": {split: n}, "metric", "postprocess", "answers", "pretraining",
        "example": {"input", "target"}}]``.
    """
    rows = []
    for name in FAMILIES:
        task = get_task(name)
        source, target = task.render(task.examples("train")[0])
        rows.append(
            {
                "name": name,
                "sizes": {split: task.num_examples(split) for split in SPLITS},
                "metric": task.metric,
                "postprocess": task.postprocess,
                "answers": task.answers,
                "pretraining": name in PRETRAIN_FAMILIES,
                "example": {"input": source, "target": target},
            }
        )
    return rows


@app.command("tasks")
def tasks_cmd(as_json: JsonOpt = False) -> None:
    """List the lab task families: sizes, metric, answer set and one rendered example."""
    rows = describe_lab_tasks()
    if as_json:
        print_json(rows)
        return
    for row in rows:
        sizes = " / ".join(f"{row['sizes'][s]} {s}" for s in SPLITS)
        answers = " | ".join(row["answers"]) if row["answers"] else "free text"
        seen = "" if row["pretraining"] else "  (left out of lab pretraining)"
        typer.echo(f"{row['name']}: {sizes}; {row['metric']}; answers: {answers}{seen}")
        typer.echo(f"    {row['example']['input']} ||| {row['example']['target']}")


def _score_table(scores: dict[str, float]) -> str:
    width = max(map(len, scores), default=0)
    return "\n".join(f"  {name:<{width}}  {value:6.1f}" for name, value in scores.items())


@app.command("pretrain")
def pretrain_cmd(
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Model directory (default: the cache `model: lab` uses)."),
    ] = None,
    steps: Annotated[
        int | None, typer.Option("--steps", help="Optimizer steps (default: the recipe's).")
    ] = None,
    seed: SeedOpt = 0,
    size: Annotated[
        str,
        typer.Option(
            "--size", help="small (the demo's), llama-small (`lab-llama`'s) or a micro one."
        ),
    ] = "small",
    threads: Annotated[
        int | None, typer.Option("--threads", help="torch CPU threads (default: torch's).")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Build even if the directory holds a model.")
    ] = False,
    hold_out: Annotated[
        list[str] | None,
        typer.Option(
            "--hold-out",
            help="Also leave this family out of pretraining, as lab_rte is (repeatable; "
            "needs --out: the cached built-in keeps its recipe).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Pretrain the lab model (about 10 minutes on 2 cores) and print its 1-shot scores."""
    if threads is not None:
        if threads < 1:
            raise UserError(f"must be >= 1, got {threads}", key="--threads")
        torch.set_num_threads(threads)
    path = Path(out) if out is not None else default_lab_path(seed, size)
    # the decoder lab model's own recipe, as `model: lab-llama` builds it
    recipe = dict(LAB_DECODER_RECIPE) if size in LAB_DECODER_SIZES else {}
    if steps is not None:
        recipe["steps"] = steps
    if hold_out:
        if out is None:  # else the built-in's cache would be rebuilt without the family
            raise UserError("needs --out (a directory of its own)", key="--hold-out")
        unknown = sorted(set(hold_out) - set(PRETRAIN_FAMILIES))
        if unknown:
            raise UserError(f"not a pretraining family: {unknown[0]}", key="--hold-out")
        recipe["families"] = tuple(f for f in PRETRAIN_FAMILIES if f not in hold_out)
        weights = recipe.get("family_weights", {})
        recipe["family_weights"] = {f: w for f, w in weights.items() if f not in hold_out}
    record_file = path / PRETRAIN_RECORD
    before = record_file.stat().st_mtime_ns if record_file.is_file() else None
    ensure_lab_model(
        path,
        seed=seed,
        size=size,
        device=device,
        rebuild=rebuild,
        progress=not as_json,
        **recipe,
    )
    reused = before is not None and record_file.stat().st_mtime_ns == before
    record = read_pretrain_record(path)
    if as_json:
        print_json({"path": str(path), **record})
        return
    if reused:
        typer.echo(f"{path} already holds a lab model (pass --rebuild to build it again)")
    scores = record.get("one_shot_test_scores", {})
    typer.echo(f"lab model: {path}")
    if record:
        typer.echo(
            f"{record['parameters']:,} parameters, {record['config']['steps']} steps, "
            f"loss {record['loss_first']:.3f} -> {record['loss_last']:.3f}, "
            f"{record['train_seconds']:.0f} s training"
        )
    if scores:
        typer.echo("1-shot test scores (0-100; lab_rte was left out of pretraining):")
        typer.echo(_score_table(scores))


@app.command("eval")
def eval_cmd(
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Model directory (default: the cached lab model)."),
    ] = None,
    shots: Annotated[int, typer.Option("--shots", help="Exemplars per item.")] = 1,
    examples: Annotated[int, typer.Option("--examples", help="Test items per family.")] = 100,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
) -> None:
    """Score a model directory k-shot on every lab family's test split."""
    if shots < 0 or examples < 1:
        raise UserError("need --shots >= 0 and --examples >= 1", key="--shots")
    path = Path(model) if model is not None else default_lab_path(seed)
    if not path.is_dir():
        raise UserError("no such model directory (run `multipromot lab pretrain`)", file=path)
    loaded, tokenizer, _ = load_model(str(path))
    scores = evaluate_lab_model(
        loaded, tokenizer, lab_tasks(), shots=shots, examples=examples, seed=seed
    )
    if as_json:
        print_json({"model": str(path), "shots": shots, "scores": scores})
        return
    typer.echo(f"{shots}-shot test scores of {path}:")
    typer.echo(_score_table(scores))
