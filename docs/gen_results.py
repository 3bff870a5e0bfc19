"""The tables of docs/results/ are generated from sweep aggregates kept in docs/results/data/.

    python docs/gen_results.py import NAME SWEEP_DIR   # keep SWEEP_DIR/sweep.json as data/NAME.json
                                                      # (and its curves as img/NAME_curves.png)
    python docs/gen_results.py import-lab NAME "COMMAND" MODEL_DIR...
                                                      # keep lab models' lab_pretrain.json records
                                                      # (how they were built, their 1-shot scores)
    python docs/gen_results.py                         # rewrite every table from its data file

A page holds a table between ``<!-- table: NAME VIEW -->`` and ``<!-- end table -->``; the text
between the markers is replaced, the prose around it is kept by hand. Views:

- ``main``: per method and shots, Norm. Avg., the fine-tuned tasks and the specialization, each
  with its 95% interval, then the paired differences (what ``sweep.md`` shows); ``rows``: the
  same without the differences; ``differences:METHOD/BASELINE,...`` (or
  ``differences:BASELINE,...``: every method against each): those paired differences only;
- ``regime``: one row per value of the swept key: the fine-tuned task's score of prompt tuning,
  standard fine-tuning and ProMoT, and their unseen Norm. Avg. at the first shots setting, with
  the paired difference ProMoT - standard;
- ``tradeoff``: per method, its fine-tuned-task score, the unseen Norm. Avg. it kept and its
  drift from the base model (mean and range over seeds), and Spearman's rank correlation of the
  drift with what is kept;
- ``lab``: (an ``import-lab`` file) one row per lab model: seed, steps, first and last loss,
  training time and threads, its 1-shot test score on every family, and the lowest score among
  the pretraining families.

Every table opens with the command that made the data, its date and commit, and the counts
behind each figure; tests/test_docs.py fails when a page's table and its data disagree.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DATA = RESULTS / "data"
IMAGES = RESULTS / "img"
_TABLE = re.compile(r"(<!-- table: (\S+) (\S+) -->\n)(.*?)(<!-- end table -->)", re.S)


def import_sweep(name: str, sweep_dir: str) -> Path:
    """Keep a sweep's aggregate (without the per-step curves, kept as a picture instead)."""
    summary = json.loads((Path(sweep_dir) / "sweep.json").read_text())
    for group in summary["groups"]:
        group["statistics"].pop("curves", None)
    DATA.mkdir(parents=True, exist_ok=True)
    path = DATA / f"{name}.json"
    path.write_text(json.dumps(summary, indent=1) + "\n")
    for plot in ("curves", "tradeoff", "drift"):
        picture = Path(sweep_dir) / f"sweep_{plot}.png"
        if picture.is_file():
            IMAGES.mkdir(parents=True, exist_ok=True)
            shutil.copy(picture, IMAGES / f"{name}_{plot}.png")
    return path


def import_lab(name: str, command: str, model_dirs: list[str]) -> Path:
    """Keep the ``lab_pretrain.json`` of lab models built by ``command`` (the recipe, losses,
    times and 1-shot scores :func:`~multipromot.lab.model.ensure_lab_model` recorded)."""
    from multipromot.lab.model import read_pretrain_record

    records = []
    for model_dir in model_dirs:
        record = read_pretrain_record(model_dir)
        if not record.get("one_shot_test_scores"):
            raise SystemExit(f"{model_dir}: no lab_pretrain.json with 1-shot scores")
        records.append(record)
    kept = {"command": command, "models": records}
    DATA.mkdir(parents=True, exist_ok=True)
    path = DATA / f"{name}.json"
    path.write_text(json.dumps(kept, indent=1) + "\n")
    return path


def _header(summary: dict) -> list[str]:
    commit = summary.get("git_commit") or "unknown"
    lines = [
        "```",
        summary.get("command", "(command not recorded)"),
        "```",
        "",
        f"Made {summary.get('finished', '?')} at commit `{commit}`; seeds "
        f"{summary['seeds']} ({summary['base_model']}).",
        "",
    ]
    if summary.get("cells_seconds"):
        lines[-2] += f" The cells ran in {summary['cells_seconds'] / 60:.0f} min."
    if summary.get("threads_per_cell"):
        lines[-2] += (
            f" Each cell ran with {summary['threads_per_cell']} torch thread(s) (CPU training"
            " repeats to the bit only at the same count)."
        )
    again = summary.get("aggregated")
    if again:  # the same cells, aggregated again (other baselines for the differences)
        lines += [
            f"Aggregated again {again['date']} at commit `{again['git_commit']}`:",
            "",
            "```",
            again["command"],
            "```",
            "",
        ]
    return lines


def _estimate(value: dict | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    sign = "+" if signed else ""
    return f"{value['value']:{sign}.1f} [{value['low']:{sign}.1f}, {value['high']:{sign}.1f}]"


def _main(summary: dict, differences=None) -> str:
    """The intervals table and the paired differences (those ``differences`` keeps: a
    predicate on one, or all), per group."""
    from multipromot.eval.aggregate import statistics_markdown

    lines = _header(summary)
    for group in summary["groups"]:
        if len(summary["groups"]) > 1:
            lines += [f"**{group['label']}**", ""]
        stats = dict(group["statistics"])
        if differences is not None:
            stats["differences"] = [d for d in stats["differences"] if differences(d)]
        lines.append(statistics_markdown(stats).rstrip())
        lines.append("")
    return "\n".join(lines)


def _differences(summary: dict, which: str) -> str:
    """Only the paired differences: ``which`` is ``METHOD/BASELINE,...`` pairs, or baselines
    (every method against each)."""
    from multipromot.eval.aggregate import statistics_markdown

    wanted = which.split(",")
    pairs = {tuple(w.split("/", 1)) for w in wanted if "/" in w}
    baselines = {w for w in wanted if "/" not in w}
    lines = []
    for group in summary["groups"]:
        kept = [
            d
            for d in group["statistics"]["differences"]
            if (d["method"], d["baseline"]) in pairs or d["baseline"] in baselines
        ]
        table = statistics_markdown({**group["statistics"], "differences": kept})
        lines.append(table[table.index("Paired differences") :].rstrip())
        lines.append("")
    return "\n".join(lines)


def _regime(summary: dict) -> str:
    (key,) = summary["axes"]
    lines = _header(summary)
    header = [
        key,
        "prompt tuning (target)",
        "standard (target)",
        "ProMoT (target)",
        "standard Norm. Avg.",
        "ProMoT Norm. Avg.",
        "ProMoT - standard",
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group in summary["groups"]:
        stats = group["statistics"]
        shots = min(r["shots"] for r in stats["rows"])
        rows = {r["method"]: r for r in stats["rows"] if r["shots"] == shots}

        def target(method: str, rows: dict = rows) -> str:
            row = rows.get(method)
            return _estimate(next(iter(row["finetuned"].values()))) if row else "—"

        wanted = ("promot", "standard", shots)
        diffs = [
            d["norm_avg"]
            for d in stats["differences"]
            if (d["method"], d["baseline"], d["shots"]) == wanted
        ]
        cells = [
            str(group["values"][key]),
            target("prompt_tuning"),
            target("standard"),
            target("promot"),
            _estimate(rows.get("standard", {}).get("norm_avg")),
            _estimate(rows.get("promot", {}).get("norm_avg")),
            _estimate(diffs[0] if diffs else None, signed=True),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    first = summary["groups"][0]["statistics"]
    items = next(r["norm_avg"] for r in first["rows"] if r["norm_avg"])
    lines += [
        "",
        f"Norm. Avg. at {shots} shot(s) over {items['seeds']} seeds x {items['items']} items of "
        "the unseen tasks; the target over the fine-tuned task's test items; 95% intervals.",
    ]
    return "\n".join(lines) + "\n"


def _tradeoff(summary: dict) -> str:
    """Per method: its fine-tuned-task score, its unseen Norm. Avg. minus pretrained's in the
    same cell, and its drift from the base model, each the mean over the seeds with the range;
    then how well the drift ranks what is kept (Spearman over every method and seed)."""
    trade = summary["tradeoff"]
    lines = _header(summary)
    shots = sorted({k for p in trade["points"] for k in p["kept"]}, key=int)
    header = ["method", "seeds", "target"] + [f"kept, {k}-shot" for k in shots] + ["KL"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def spread(values: list, digits: int = 1) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "—"
        mean = sum(values) / len(values)
        return f"{mean:.{digits}f} ({min(values):.{digits}f} to {max(values):.{digits}f})"

    methods = list(dict.fromkeys(p["method"] for p in trade["points"]))
    for method in methods:
        mine = [p for p in trade["points"] if p["method"] == method]
        cells = [method, str(len(mine)), spread([p["target"] for p in mine])]
        cells += [spread([p["kept"].get(k) for p in mine]) for k in shots]
        cells.append(spread([p["kl"] for p in mine], digits=2))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "target: the mean score of the method's fine-tuned tasks; kept: its unseen Norm. Avg. "
        "minus the pretrained model's in the same cell (0 = kept all); KL: KL(base || model) "
        "per target token on the fine-tuned tasks' test inputs; each a mean over the seeds "
        "(min to max).",
    ]
    for label, per_shots in trade["spearman_kl_kept"].items():
        for k, rho in per_shots.items():
            lines.append(
                f"Spearman rank correlation of KL with kept ({label}, {k}-shot): "
                f"{rho['rho']:+.2f} over {rho['points']} method-seed points."
            )
    return "\n".join(lines) + "\n"


def _lab(kept: dict) -> str:
    """One row per lab model: how it was built and its 1-shot test scores."""
    models = kept["models"]
    families = list(models[0]["one_shot_test_scores"])
    unseen = set(models[0]["unseen_in_pretraining"])
    recipe = {k: v for k, v in models[0]["config"].items() if k not in ("seed", "shot_weights")}
    lines = ["```", kept["command"], "```", ""]
    lines += [f"Lab version {models[0]['lab_version']}; recipe: `{json.dumps(recipe)}`.", ""]
    header = ["seed", "steps", "loss", "train s (threads)"] + families + ["lowest pretrained"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in models:
        scores = model["one_shot_test_scores"]
        cells = [
            str(model["config"]["seed"]),
            str(model["config"]["steps"]),
            f"{model['loss_first']:.2f} -> {model['loss_last']:.3f}",
            f"{model['train_seconds']:.0f} ({model.get('torch_threads', '?')})",
        ]
        cells += [f"{scores[f]:.1f}" for f in families]
        cells.append(f"{min(v for f, v in scores.items() if f not in unseen):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    examples = models[0]["config"]["eval_examples"]
    lines += [
        "",
        f"1-shot scores on {examples} test items per family (accuracy, exact match, BLEU or "
        f"ROUGE-2, 0-100); left out of pretraining: {', '.join(sorted(unseen))}. Loss: the "
        "mean of the first and last 5% of steps.",
    ]
    return "\n".join(lines) + "\n"


VIEWS = {
    "main": _main,
    "rows": lambda summary: _main(summary, differences=lambda d: False),
    "regime": _regime,
    "tradeoff": _tradeoff,
    "lab": _lab,
}
# ``differences:METHOD/BASELINE,...`` or ``differences:BASELINE,...``: the paired differences only


def _view(summary: dict, view: str) -> str:
    name, _, argument = view.partition(":")
    if name == "differences":
        return _differences(summary, argument)
    return VIEWS[view](summary)


def render(page: Path) -> str:
    """``page`` with every generated table rendered from its data file."""

    def table(match: re.Match) -> str:
        name, view = match.group(2), match.group(3)
        summary = json.loads((DATA / f"{name}.json").read_text())
        return match.group(1) + _view(summary, view).rstrip() + "\n" + match.group(5)

    return _TABLE.sub(table, page.read_text())


def pages() -> list[Path]:
    return sorted(p for p in RESULTS.glob("*.md") if _TABLE.search(p.read_text()))


def main(argv: list[str]) -> int:
    if argv[:1] == ["import"] and len(argv) == 3:
        print(f"kept {import_sweep(argv[1], argv[2])}")
    elif argv[:1] == ["import-lab"] and len(argv) >= 4:
        print(f"kept {import_lab(argv[1], argv[2], argv[3:])}")
    elif argv:
        print(__doc__)
        return 2
    for page in pages():
        page.write_text(render(page))
        print(f"wrote the tables of {page.relative_to(RESULTS.parent.parent)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(RESULTS.parent.parent))
    sys.exit(main(sys.argv[1:]))
