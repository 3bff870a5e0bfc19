"""Statistics of one run or of a sweep of runs, from their per-item samples.

A run folder's ``results.json`` names each method's samples file (:mod:`multipromot.eval.samples`);
:func:`statistics` stacks the items of one or several runs (the seeds of a sweep cell group)
into :class:`~multipromot.eval.stats.TaskScores` and gives, per method and shots setting:

- ``norm_avg``: the unseen tasks' Norm. Avg. with its 95% interval (over items; over seeds and
  items when several runs), and ``norm_avg_random`` (BIG-bench's) when a task has a random score;
- ``tasks``: every unseen task's score with its interval;
- ``finetuned``: each fine-tuned task's 0-shot score with its interval;
- ``specialization``: the share of unseen-task outputs in the fine-tuned tasks' answer set;
- ``target_language`` and ``input_copy``: the shares of unseen-task outputs in a fine-tuned
  generation task's output language and that repeat their input (:mod:`.specialization`);
- ``differences``: each method minus each of ``eval.compare`` (Norm. Avg.), paired on the same
  seeds and items;
- ``curves`` (sweeps): Norm. Avg. per stage-2 step with its interval.

:func:`aggregate_sweep` writes a sweep's ``sweep.json``, ``sweep.md`` and plots.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from multipromot.data.metrics import score_values
from multipromot.eval.samples import read_samples
from multipromot.eval.stats import (
    CONFIDENCE,
    N_RESAMPLES,
    Estimate,
    TaskScores,
    difference,
    estimate,
)
from multipromot.fsio import write_atomic, write_json

__all__ = ["RunData", "load_run", "statistics", "statistics_markdown", "aggregate_sweep"]


class RunData:
    """One run's summaries (``results.json`` records) and per-item samples."""

    def __init__(self, records: list[dict], samples: dict[tuple, list[dict]]):
        self.records = records
        self.samples = samples

    def items(self, method: str, step: int, task: str, shots: int) -> list[dict]:
        return self.samples.get((method, step, task, shots), [])


def load_run(folder: str | Path) -> RunData:
    """A run folder's ``results.json`` and the samples files it names.

    Raises:
        FileNotFoundError: no results.json (the run has not finished).
    """
    folder = Path(folder)
    results = json.loads((folder / "results.json").read_text())
    samples: dict[tuple, list[dict]] = {}
    for path in (results.get("samples") or {}).values():
        samples.update(read_samples(folder / path))
    return RunData(results["records"], samples)


def _metric_scores(runs: Sequence[RunData], method: str, pick, task: str, shots: int):
    """TaskScores of one task over the runs (seeds), or None when some run lacks its items or
    its metric has no per-item values (then no interval is given)."""
    per_seed, metric, random = [], None, None
    for run in runs:
        record = pick(run, task, shots)
        if record is None:
            return None
        items = run.items(method, record["step"], task, record["shots"])
        if not items or any(item.get("value") is None for item in items):
            return None
        ids = [item["id"] for item in items]
        per_seed.append((ids, np.asarray([item["value"] for item in items], dtype=float)))
        metric, random = record["metric"], record.get("random")
    if len({tuple(ids) for ids, _ in per_seed}) != 1:  # seeds scored different items
        return None
    values = np.stack([v for _, v in per_seed])
    return TaskScores(values, lambda rows, m=metric: score_values(m, rows), random)


# Per-item flags of the unseen tasks' outputs, as rows of the statistics: row key -> item key.
FLAGS = {
    "specialization": "specialized",
    "target_language": "target_language",
    "input_copy": "input_copy",
}


def _flag_scores(runs: Sequence[RunData], method: str, pick, task: str, shots: int, flag: str):
    """A per-item flag (``FLAGS``) as 0/100 scores; None when an item lacks it."""
    per_seed = []
    for run in runs:
        record = pick(run, task, shots)
        items = run.items(method, record["step"], task, shots) if record else []
        if not items or any(item.get(flag) is None for item in items):
            return None
        per_seed.append([[100.0 * bool(item[flag])] for item in items])
    return TaskScores(np.asarray(per_seed, dtype=float), lambda rows: float(np.mean(rows)))


def _json(value: Estimate | None) -> dict | None:
    return value.to_json() if value is not None else None


def _selected_picker(method: str):
    """Picks each run's selected record of ``method`` for (task, shots)."""

    def pick(run: RunData, task: str, shots: int) -> dict | None:
        for r in run.records:
            if (
                r["method"] == method
                and r["selected"]
                and not r["seen"]
                and r["task"] == task
                and r["shots"] == shots
            ):
                return r
        return None

    return pick


def _finetuned_picker(method: str):
    """Picks each run's selected record of ``method`` on a fine-tuned task (one per task, at
    the shots the method was fine-tuned with)."""

    def pick(run: RunData, task: str, shots: int) -> dict | None:
        for r in run.records:
            if r["method"] == method and r["selected"] and r["seen"] and r["task"] == task:
                return r
        return None

    return pick


def _step_picker(method: str, step: int):
    def pick(run: RunData, task: str, shots: int) -> dict | None:
        for r in run.records:
            if (
                r["method"] == method
                and r["step"] == step
                and not r["seen"]
                and r["task"] == task
                and r["shots"] == shots
            ):
                return r
        return None

    return pick


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def _group(runs: Sequence[RunData], method: str, pick, shots: int, unseen: list[str]):
    scores = {t: _metric_scores(runs, method, pick, t, shots) for t in unseen}
    return None if any(s is None for s in scores.values()) else scores


def statistics(runs: Sequence[RunData], compare: Sequence[str] = (), curves: bool = False) -> dict:
    """The statistics of one run (one element) or of the seeds of a sweep cell group.

    Returns:
        ``{"seeds", "confidence", "resamples", "rows": [...], "differences": [...],
        "curves": [...]}`` (see the module docstring); an interval is None where per-item
        values are missing (a metric that is not a per-item mean nor corpus BLEU).
    """
    records = runs[0].records
    methods = _ordered(r["method"] for r in records)
    unseen = _ordered(r["task"] for r in records if not r["seen"])
    seen = _ordered(r["task"] for r in records if r["seen"])
    shots_list = _ordered(r["shots"] for r in records if not r["seen"])
    rows, differences, curve_rows, groups = [], [], [], {}
    for method in methods:
        pick = _selected_picker(method)
        for shots in shots_list:
            scores = _group(runs, method, pick, shots, unseen)
            groups[method, shots] = scores
            row = {"method": method, "shots": shots}
            row["norm_avg"] = _json(estimate(scores, average="plain")) if scores else None
            with_random = scores and any(s.random for s in scores.values())
            row["norm_avg_random"] = (
                _json(estimate(scores, average="above_random")) if with_random else None
            )
            row["tasks"] = {t: _json(estimate({t: s})) for t, s in (scores or {}).items()}
            for name, flag in FLAGS.items():
                flags = {t: _flag_scores(runs, method, pick, t, shots, flag) for t in unseen}
                ok = all(s is not None for s in flags.values())
                row[name] = _json(estimate(flags, average="plain")) if ok else None
            row["finetuned"] = {}
            for task in seen:  # scored with the exemplars the method was fine-tuned with
                task_scores = _metric_scores(runs, method, _finetuned_picker(method), task, 0)
                row["finetuned"][task] = (
                    _json(estimate({task: task_scores})) if task_scores else None
                )
            rows.append(row)
    for baseline in [b for b in compare if b in methods]:
        for method in [m for m in methods if m != baseline]:
            for shots in shots_list:
                a, b = groups.get((method, shots)), groups.get((baseline, shots))
                value = difference(a, b, average="plain") if a and b else None
                differences.append(
                    {
                        "method": method,
                        "baseline": baseline,
                        "shots": shots,
                        "norm_avg": _json(value),
                    }
                )
    if curves:
        for method in methods:
            steps = sorted({r["step"] for r in records if r["method"] == method})
            for shots in shots_list:
                for step in steps:
                    scores = _group(runs, method, _step_picker(method, step), shots, unseen)
                    if scores:
                        value = estimate(scores, average="plain")
                        curve_rows.append(
                            {
                                "method": method,
                                "shots": shots,
                                "step": step,
                                "norm_avg": _json(value),
                            }
                        )
    return {
        "seeds": len(runs),
        "confidence": CONFIDENCE,
        "resamples": N_RESAMPLES,
        "interval": "bootstrap (scipy.stats.bootstrap, BCa): items of each task resampled"
        + (", and seeds" if len(runs) > 1 else ""),
        "rows": rows,
        "differences": differences,
        "curves": curve_rows,
    }


def _cell(value: dict | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return Estimate(**value).text(signed=signed)


def statistics_markdown(stats: dict) -> str:
    """The intervals table and the paired differences, as report.md and sweep.md show them."""
    rows = stats["rows"]
    if not rows:
        return ""
    finetuned = _ordered(t for r in rows for t in r["finetuned"])
    counts = next((Estimate(**r["norm_avg"]).counts() for r in rows if r["norm_avg"]), "")
    # the generation-task measures only where a run measured them (after a generation task)
    extra = [f for f in ("target_language", "input_copy") if any(r.get(f) for r in rows)]
    names = {"target_language": "target lang.%", "input_copy": "input copy%"}
    header = ["method", "shots", "Norm. Avg.", *finetuned, "spec.%", *[names[f] for f in extra]]
    lines = [
        f"95% intervals ({stats['interval']}, {stats['resamples']} resamples); Norm. Avg. over "
        f"{counts} per method and shots.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in rows:
        cells = [r["method"], str(r["shots"]), _cell(r["norm_avg"])]
        cells += [_cell(r["finetuned"].get(t)) for t in finetuned]
        cells.append(_cell(r["specialization"]))
        cells += [_cell(r.get(f)) for f in extra]
        lines.append("| " + " | ".join(cells) + " |")
    if stats["differences"]:
        lines += ["", "Paired differences of Norm. Avg. (same seeds and items):", ""]
        lines += ["| difference | shots | Norm. Avg. | counts |", "|---|---|---|---|"]
        for d in stats["differences"]:
            value = d["norm_avg"]
            counts = Estimate(**value).counts() if value else "—"
            lines.append(
                f"| {d['method']} - {d['baseline']} | {d['shots']} | "
                f"{_cell(value, signed=True)} | {counts} |"
            )
    return "\n".join(lines) + "\n"


def aggregate_sweep(
    out_dir: Path,
    cells: Sequence[dict],
    *,
    axes: dict[str, list[str]],
    seeds: Sequence[int],
    description: str,
    compare: Sequence[str],
    meta: dict | None = None,
) -> Path:
    """Read every cell's run, group the cells by their swept values (the seeds of a group are
    its samples), and write ``sweep.json``, ``sweep.md`` and ``sweep_curves.png``.

    Args:
        out_dir: the sweep folder.
        cells: ``{"name", "values", "seed", "folder"}`` per cell.
        axes: the swept keys and their values.
        seeds: the seeds.
        description: how base model and training seeds relate (printed in sweep.md).
        compare: the baselines of the paired differences.
        meta: how the sweep was made (command, date, commit, wall times), kept in sweep.json.

    Returns:
        The path of ``sweep.md``.
    """
    groups: dict[str, list[dict]] = {}
    for cell in cells:
        label = ", ".join(f"{k}={v}" for k, v in cell["values"].items()) or "all cells"
        groups.setdefault(label, []).append(cell)
    summary = {
        **(meta or {}),
        "axes": axes,
        "seeds": list(seeds),
        "base_model": description,
        "groups": [],
    }
    for label, members in groups.items():
        runs = [load_run(cell["folder"]) for cell in members]
        stats = statistics(runs, compare, curves=True)
        summary["groups"].append(
            {
                "values": members[0]["values"],
                "label": label,
                "cells": [c["name"] for c in members],
                "statistics": stats,
            }
        )
    summary["tradeoff"] = tradeoff(groups)
    write_json(out_dir / "sweep.json", summary, indent=1)
    plots = _plot_sweep(out_dir, summary)
    plots += plot_tradeoff(out_dir, summary["tradeoff"])
    threads = (meta or {}).get("threads_per_cell")
    ran = f"; each cell ran with {threads} torch thread(s)" if threads else ""
    text = [f"# Sweep: {len(cells)} cells", "", f"Seeds {list(seeds)}; {description}{ran}.", ""]
    if meta and meta.get("command"):
        text += ["Made by:", "", "```", meta["command"], "```", ""]
    text += [f"![{name[:-4]}]({name})" for name in plots] + [""]
    for group in summary["groups"]:
        text += [f"## {group['label']}", "", f"Cells: {', '.join(group['cells'])}", ""]
        text.append(statistics_markdown(group["statistics"]))
    path = out_dir / "sweep.md"
    write_atomic(path, "\n".join(text).encode())
    return path


_COLORS = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:red",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
    "tab:gray",
)


def _plot_sweep(out_dir: Path, summary: dict) -> list[str]:
    """``sweep_curves.png`` (Norm. Avg. over stage-2 steps: the mean over seeds, the 95%
    interval as a band; a panel per group and shots setting) and, per swept key,
    ``sweep_<key>.png`` (each method's selected Norm. Avg. against the key's values, with its
    interval). Returns the files written."""
    import io

    from matplotlib.figure import Figure  # no pyplot: no global backend state

    groups = summary["groups"]
    methods = _ordered(r["method"] for g in groups for r in g["statistics"]["rows"])
    shots = _ordered(r["shots"] for g in groups for r in g["statistics"]["rows"])
    written = []

    def save(fig, name: str) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        write_atomic(out_dir / name, buf.getvalue())
        written.append(name)

    fig = Figure(figsize=(4.8 * len(shots), 3.4 * len(groups)), layout="constrained")
    for gi, group in enumerate(groups):
        for si, k in enumerate(shots):
            ax = fig.add_subplot(len(groups), len(shots), gi * len(shots) + si + 1)
            for j, method in enumerate(methods):
                points = sorted(
                    (c["step"], c["norm_avg"])
                    for c in group["statistics"]["curves"]
                    if c["method"] == method and c["shots"] == k and c["norm_avg"]
                )
                if not points:
                    continue
                steps = [p[0] for p in points]
                mean = [p[1]["value"] for p in points]
                low, high = [p[1]["low"] for p in points], [p[1]["high"] for p in points]
                color = _COLORS[j % len(_COLORS)]
                ax.plot(steps, mean, marker="o", markersize=3, color=color, label=method)
                ax.fill_between(steps, low, high, color=color, alpha=0.15)
            ax.set_title(f"{group['label']}, {k}-shot", fontsize="small")
            ax.set_xlabel("stage-2 step")
            ax.set_ylabel("unseen Norm. Avg. (95% interval)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="x-small")
    save(fig, "sweep_curves.png")
    for key, values in summary["axes"].items():
        fig = Figure(figsize=(4.8 * len(shots), 3.6), layout="constrained")
        for si, k in enumerate(shots):
            ax = fig.add_subplot(1, len(shots), si + 1)
            for j, method in enumerate(methods):
                xs, ys, errors = [], [], [[], []]
                for group in groups:
                    row = next(
                        (
                            r
                            for r in group["statistics"]["rows"]
                            if r["method"] == method and r["shots"] == k
                        ),
                        None,
                    )
                    if row is None or not row["norm_avg"]:
                        continue
                    est = row["norm_avg"]
                    xs.append(
                        values.index(str(group["values"][key])) + 0.03 * (j - len(methods) / 2)
                    )
                    ys.append(est["value"])
                    errors[0].append(est["value"] - est["low"])
                    errors[1].append(est["high"] - est["value"])
                if xs:
                    ax.errorbar(
                        xs,
                        ys,
                        yerr=errors,
                        fmt="o",
                        capsize=3,
                        color=_COLORS[j % len(_COLORS)],
                        label=method,
                    )
            ax.set_xticks(range(len(values)), values)
            ax.set_xlabel(key)
            ax.set_ylabel("unseen Norm. Avg. (95% interval)")
            ax.set_title(f"{k}-shot", fontsize="small")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="x-small")
        save(fig, f"sweep_{key}.png")
    return written


# -- the trade-off of each method and seed: fine-tuned-task score, drift, kept Norm. Avg. --------


def _selected_points(results: dict) -> dict[str, dict]:
    """Per method of one run's results.json: the mean score of its fine-tuned tasks, its
    unseen Norm. Avg. per shots, and its drift (KL(base || model), mean over the fine-tuned
    tasks' target tokens), at the step it reports."""
    records = [r for r in results["records"] if r.get("selected", True)]
    points: dict[str, dict] = {}
    for method in _ordered(r["method"] for r in records):
        own = [r for r in records if r["method"] == method]
        seen = [r for r in own if r["seen"]]
        unseen: dict[int, list[float]] = {}
        for r in own:
            if not r["seen"]:
                unseen.setdefault(r["shots"], []).append(float(r["score"]))
        drift = [r["drift"] for r in seen if (r.get("drift") or {}).get("kl") is not None]
        tokens = sum(d["tokens"] for d in drift)
        points[method] = {
            "target": float(np.mean([r["score"] for r in seen])) if seen else None,
            "norm_avg": {k: float(np.mean(v)) for k, v in unseen.items()},
            "kl": sum(d["kl"] * d["tokens"] for d in drift) / tokens if tokens else None,
        }
    return points


def tradeoff(groups: dict[str, list[dict]]) -> dict:
    """The trade-off of every method and seed, as ``sweep.json`` keeps it: per cell and method,
    its fine-tuned-task score (``target``, the mean over its fine-tuned tasks), its unseen Norm.
    Avg. minus pretrained's in the same cell per shots (``kept``: 0 = kept all of it), and its
    drift from the base model on the fine-tuned tasks (``kl``, KL(base || model) per target
    token, when the runs measured it); and per group and shots, Spearman's rank correlation of
    ``kl`` with ``kept`` over the points that have both (``{"rho", "points"}``; the pretrained
    model's own points, 0 and 0 by construction, are left out)."""
    from scipy.stats import spearmanr  # scipy is heavy: only an aggregate needs it

    points = []
    for label, members in groups.items():
        for cell in members:
            folder = Path(cell["folder"])
            if not (folder / "results.json").is_file():
                continue
            per_method = _selected_points(json.loads((folder / "results.json").read_text()))
            base = per_method.get("pretrained")
            for method, point in per_method.items():
                kept = {}
                for k, value in point["norm_avg"].items():
                    ref = base["norm_avg"].get(k) if base else None
                    kept[str(k)] = value - ref if ref is not None else None
                points.append(
                    {
                        "group": label,
                        "seed": cell["seed"],
                        "method": method,
                        "target": point["target"],
                        "kept": kept,
                        "kl": point["kl"],
                    }
                )
    correlation: dict[str, dict] = {}
    for label in groups:
        shots = sorted({k for p in points if p["group"] == label for k in p["kept"]}, key=int)
        for k in shots:
            pairs = [
                (p["kl"], p["kept"][k])
                for p in points
                if p["group"] == label
                and p["method"] != "pretrained"
                and p["kl"] is not None
                and p["kept"].get(k) is not None
            ]
            if len({x for x, _ in pairs}) >= 3 and len({y for _, y in pairs}) >= 2:
                rho = float(spearmanr([x for x, _ in pairs], [y for _, y in pairs]).statistic)
                correlation.setdefault(label, {})[k] = {"rho": rho, "points": len(pairs)}
    return {"points": points, "spearman_kl_kept": correlation}


def plot_tradeoff(out_dir: Path, trade: dict) -> list[str]:
    """``sweep_tradeoff.png``: per group (row) and shots setting (column), one point per method
    and seed of :func:`tradeoff`: its fine-tuned-task score (x) against its unseen Norm. Avg.
    minus pretrained's in the same cell (y). A method only "keeps more" than another at equal
    target accuracy. ``sweep_drift.png``: the same y against the drift from the base model on
    the fine-tuned tasks (when the runs measured it), with Spearman's rank correlation in each
    panel's title. Returns the files written."""
    import io

    from matplotlib.figure import Figure  # no pyplot: no global backend state

    rows = trade["points"]
    if not rows:
        return []
    labels = _ordered(r["group"] for r in rows)
    methods = _ordered(r["method"] for r in rows)
    shots = sorted({k for r in rows for k in r["kept"]}, key=int)
    written = []
    for name, xkey, xlabel in (
        ("sweep_tradeoff.png", "target", "fine-tuned-task score (mean over its tasks)"),
        ("sweep_drift.png", "kl", "KL(base || model) on the fine-tuned tasks (nats/token)"),
    ):
        if not any(r[xkey] is not None for r in rows if r["method"] != "pretrained"):
            continue
        fig = Figure(figsize=(4.8 * len(shots) + 2, 3.8 * len(labels)), layout="constrained")
        for gi, label in enumerate(labels):
            for si, k in enumerate(shots):
                ax = fig.add_subplot(len(labels), len(shots), gi * len(shots) + si + 1)
                for j, method in enumerate(methods):
                    mine = [
                        r
                        for r in rows
                        if (r["group"], r["method"]) == (label, method)
                        and r[xkey] is not None
                        and r["kept"].get(k) is not None
                    ]
                    if mine:
                        ax.scatter(
                            [r[xkey] for r in mine],
                            [r["kept"][k] for r in mine],
                            s=22,
                            color=_COLORS[j % len(_COLORS)],
                            # past the colours, a new marker: every method stays distinct
                            marker="o^sD"[j // len(_COLORS) % 4],
                            label=method,
                        )
                title = f"{label}, {k}-shot"
                rho = trade["spearman_kl_kept"].get(label, {}).get(k)
                if xkey == "kl" and rho:
                    title += f": Spearman {rho['rho']:+.2f} over {rho['points']} points"
                ax.set_title(title, fontsize="small")
                ax.set_xlabel(xlabel)
                ax.set_ylabel("unseen Norm. Avg. - pretrained's (same seed)")
                ax.axhline(0.0, color="gray", linewidth=0.8)
                ax.grid(alpha=0.3)
                if si == len(shots) - 1:  # one legend per row, beside the points
                    ax.legend(fontsize="x-small", loc="center left", bbox_to_anchor=(1.02, 0.5))
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        write_atomic(out_dir / name, buf.getvalue())
        written.append(name)
    return written
