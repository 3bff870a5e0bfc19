"""The report of a run: the paper-style table, curves over stage-2 steps, and every number as JSON.

Input is a list of flat records, one per (method, stage-2 step, task, shots)::

    {"method": "promot", "step": 1000, "task": "lab_cb", "shots": 1, "metric": "accuracy",
     "score": 41.0, "specialization": 12.0, "prompt": None, "seen": False}

``seen`` marks a fine-tuned task (scored 0-shot with its own prompt); every other record is an
unseen task scored in context. ``step`` is the stage-2 step the model was evaluated at (0 for the
pretrained model); the main table uses each method's last step, the curves use all of them.
Optional keys: ``random`` (the task's random-guess score, for the BIG-bench-normalized average)
and whatever else the evaluation added (``n``, ``prompted``); they are kept in results.json.

Files (:func:`write_report`), all written atomically (temp file + ``os.replace``, so a crash never
leaves half a report)::

    report.md            title, the table, the plots, how the run was produced
    results.json         {"title", "summary", "records", "config"}
    norm_avg.png         unseen-task Norm. Avg. vs stage-2 step, one line per method, and
                         below it the training losses (stage 2 per method, stage 1)
    specialization.png   mean specialization rate vs stage-2 step, one line per method

The PNGs (the shape of the paper's Figures 1 and 2, one panel per shots setting) are written only
when the records span more than one step. When no method was evaluated at more than one step
(``eval.curve=false``) each panel is a bar per method at its selected step instead of lines.

Why one module of this size: the table, the terminal summary, the plots and report.md all
read the same flat records; splitting would spread one schema over several files.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from multipromot.data.metrics import normalized_average
from multipromot.eval.aggregate import RunData, statistics, statistics_markdown
from multipromot.eval.samples import read_samples
from multipromot.eval.stats import Estimate
from multipromot.fsio import write_atomic

__all__ = [
    "REQUIRED_KEYS",
    "final_records",
    "summary",
    "drift_summary",
    "format_table",
    "terminal_summary",
    "plot_figures",
    "write_plots",
    "write_report",
    "config_lines",
    "read_statistics",
]

REQUIRED_KEYS = ("method", "task", "shots", "score")
_MISSING = "—"


# --------------------------------------------------------------------------------------------
# Records


def _normalize(records: Iterable[dict]) -> list[dict]:
    """Records with defaults filled in (step 0, not seen, no specialization), duplicates refused."""
    out, keys = [], set()
    for i, record in enumerate(records):
        missing = [k for k in REQUIRED_KEYS if k not in record]
        if missing:
            raise ValueError(f"record {i} lacks {missing}: {record}")
        full = {
            "step": 0,
            "metric": "",
            "specialization": None,
            "prompt": None,
            "seen": False,
            "random": 0.0,
            **record,
        }
        full["step"] = int(full["step"] or 0)
        key = (full["method"], full["step"], full["task"], full["shots"])
        if key in keys:
            # Two scores for one cell would make every average ambiguous.
            raise ValueError(f"two records for method, step, task, shots = {key}")
        keys.add(key)
        out.append(full)
    return out


def _ordered(values: Iterable[Any]) -> list[Any]:
    """Distinct values in first-seen order."""
    return list(dict.fromkeys(values))


def _methods(records: list[dict], baseline: str) -> list[str]:
    """Methods in first-seen order, the baseline first (it is the column the others compare to)."""
    methods = _ordered(r["method"] for r in records)
    if baseline in methods:
        methods.remove(baseline)
        methods.insert(0, baseline)
    return methods


def final_records(records: Iterable[dict]) -> list[dict]:
    """The records each method reports (what the main table shows).

    That is the records marked ``selected`` (the best-on-target model stage 2 kept) where a
    method has them, else those of its last step.

    Args:
        records: flat records (see the module docstring).

    Returns:
        The reported records of every method, defaults filled in.

    Raises:
        ValueError: a record lacks a required key, or two records share a cell.
    """
    records = _normalize(records)
    selected = {r["method"]: r["step"] for r in records if r.get("selected")}
    last: dict[str, int] = {}
    for r in records:
        last[r["method"]] = max(last.get(r["method"], r["step"]), r["step"])
    return [r for r in records if r["step"] == selected.get(r["method"], last[r["method"]])]


def _unseen_point(rows: list[dict]) -> dict:
    """Norm. Avg. and mean specialization of one (method, step, shots) group of unseen records."""
    scores = {r["task"]: float(r["score"]) for r in rows}
    random = {r["task"]: float(r["random"] or 0.0) for r in rows}
    special = [float(r["specialization"]) for r in rows if r["specialization"] is not None]
    return {
        "norm_avg": normalized_average(scores),
        "norm_avg_random": normalized_average(scores, random),
        "specialization": sum(special) / len(special) if special else None,
        "tasks": sorted(scores),
    }


def _unseen_points(records: list[dict]) -> dict[tuple[str, int, int], dict]:
    """``{(method, step, shots): point}`` over the unseen records."""
    groups: dict[tuple[str, int, int], list[dict]] = {}
    for r in records:
        if not r["seen"]:
            groups.setdefault((r["method"], r["step"], r["shots"]), []).append(r)
    return {key: _unseen_point(rows) for key, rows in groups.items()}


# --------------------------------------------------------------------------------------------
# Summary


def summary(records: Iterable[dict], baseline: str = "pretrained") -> dict:
    """The numbers of the main table, at each method's last step.

    Args:
        records: flat records (see the module docstring).
        baseline: the method the others are compared to (the paper compares to pretrained).

    Returns:
        ``{"baseline", "methods", "shots", "unseen_tasks", "seen_tasks", "unseen", "finetuned"}``
        where ``unseen`` has one row per method x shots::

            {"method", "step", "shots", "norm_avg" (paper: plain mean of the 0-100 scores),
             "diff" (norm_avg - the baseline's at the same shots; None without a baseline),
             "norm_avg_random" (BIG-bench normalized against each task's random score),
             "specialization" (mean over unseen tasks, None if not measured), "tasks"}

        and ``finetuned`` one row per method x fine-tuned task x shots:
        ``{"method", "step", "task", "shots", "metric", "score"}``.

    Raises:
        ValueError: a record lacks a required key, two records share a cell, or a score is
            outside 0-100.
    """
    records = list(records)
    final = final_records(records)
    methods = _methods(final, baseline)
    points = _unseen_points(final)
    base = {shots: p for (m, _, shots), p in points.items() if m == baseline}
    unseen = []
    for method in methods:
        for (m, step, shots), p in sorted(points.items(), key=lambda kv: kv[0][2]):
            if m != method:
                continue
            diff = p["norm_avg"] - base[shots]["norm_avg"] if shots in base else None
            unseen.append({"method": m, "step": step, "shots": shots, **p, "diff": diff})
    finetuned = [
        {k: r[k] for k in ("method", "step", "task", "shots", "metric", "score")}
        for method in methods
        for r in final
        if r["seen"] and r["method"] == method
    ]
    result = {
        "baseline": baseline,
        "methods": methods,
        "shots": sorted({r["shots"] for r in final if not r["seen"]}),
        "unseen_tasks": _ordered(r["task"] for r in final if not r["seen"]),
        "seen_tasks": _ordered(r["task"] for r in final if r["seen"]),
        "unseen": unseen,
        "finetuned": finetuned,
    }
    drift = drift_summary(_normalize(records), methods)  # every evaluated step
    if drift:  # only when measured: summaries of runs without it stay as they were
        result["drift"] = drift
    return result


def _mean_kl(rows: list[dict]) -> float | None:
    """The mean over tokens of the records' drift (each record's mean weighted by its tokens)."""
    measured = [r["drift"] for r in rows if (r.get("drift") or {}).get("kl") is not None]
    tokens = sum(d["tokens"] for d in measured)
    return sum(d["kl"] * d["tokens"] for d in measured) / tokens if tokens else None


def drift_summary(records: Iterable[dict], methods: list[str] | None = None) -> list[dict]:
    """Per method and evaluated step, the drift from the base model (``drift`` of the records,
    :mod:`multipromot.eval.drift`): the mean KL(base || model) over the target tokens of its
    fine-tuned tasks (``finetuned``) and of the unseen tasks per shots setting (``unseen``).
    [] when no record measured it.

    Returns:
        ``[{"method", "step", "selected" (the step the method reports), "finetuned",
        "unseen": {shots: kl}, "direction"}]``.
    """
    records = list(records)
    reported = {(r["method"], r["step"]) for r in final_records(records)}
    records = [r for r in records if r.get("drift")]
    if not records:
        return []
    order = methods or _ordered(r["method"] for r in records)
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], int(r.get("step") or 0)), []).append(r)
    rows = []
    for (method, step), members in sorted(
        groups.items(), key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order else 0, kv[0])
    ):
        shots = sorted({r["shots"] for r in members if not r.get("seen")})
        rows.append(
            {
                "method": method,
                "step": step,
                "selected": (method, step) in reported,
                "finetuned": _mean_kl([r for r in members if r.get("seen")]),
                "unseen": {
                    k: _mean_kl([r for r in members if not r.get("seen") and r["shots"] == k])
                    for k in shots
                },
                "direction": members[0]["drift"].get("direction"),
            }
        )
    return rows


# --------------------------------------------------------------------------------------------
# Tables


def _num(value: float | None) -> str:
    return _MISSING if value is None else f"{value:.1f}"


def _signed(value: float) -> str:
    return f"{value:+.1f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    align = ["---"] + ["---:"] * (len(header) - 1)  # numbers right-aligned, labels left
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _point_row(label: str, columns: list[tuple[str, int]], point: dict, key: str) -> list[str]:
    """One summary row (``norm_avg_random``, ``specialization``) across the method x shots columns."""
    return [label] + [_num(point[col][key]) if col in point else _MISSING for col in columns]


def _avg_row(columns: list[tuple[str, int]], point: dict, baseline: str) -> list[str]:
    """The Norm. Avg. row: each value with its difference to the baseline in brackets."""
    cells = [f"**Norm. Avg.** (+/- vs {baseline})"]
    for method, shots in columns:
        p = point.get((method, shots))
        if p is None:
            cells.append(_MISSING)
        elif method == baseline or p["diff"] is None:
            cells.append(_num(p["norm_avg"]))
        else:
            cells.append(f"{_num(p['norm_avg'])} ({_signed(p['diff'])})")
    return cells


def _finetuned_rows(final: list[dict], columns: list[tuple[str, int]], shots: list[int]) -> list:
    """One row per fine-tuned task and shot count it was scored at."""
    seen = {(r["method"], r["task"], r["shots"]): r for r in final if r["seen"]}
    rows = []
    for task in _ordered(r["task"] for r in final if r["seen"]):
        metric = next(r["metric"] for r in final if r["seen"] and r["task"] == task)
        for k_seen in sorted({k for (_, t, k) in seen if t == task}):
            cells = [f"{task} ({metric}, fine-tuned, {k_seen}-shot)"]
            for method, k in columns:
                r = seen.get((method, task, k_seen))
                # A score at a shot count that has no column of its own (0-shot) is one number
                # per model: it fills each shots column of its method.
                fits = k_seen == k or k_seen not in shots
                cells.append(_num(r["score"]) if r is not None and fits else _MISSING)
            rows.append(cells)
    return rows


def format_table(records: Iterable[dict], baseline: str = "pretrained") -> str:
    """The paper-style markdown table at each method's last step.

    Rows: each unseen task (its metric in brackets); ``Norm. Avg.`` with the difference to the
    baseline in brackets; ``Norm. Avg. above random`` when some task has a random baseline; the
    mean specialization rate; then each fine-tuned task. Columns: method x shots. A fine-tuned
    task scored 0-shot fills every shots column of its method (it is one number per model).

    Args:
        records: flat records (see the module docstring).
        baseline: the method the differences refer to.

    Returns:
        The markdown table.
    """
    final = final_records(records)
    s = summary(final, baseline)
    shots = s["shots"] or sorted({r["shots"] for r in final})
    columns = [(m, k) for m in s["methods"] for k in shots]
    header = ["Task"] + [f"{m} {k}-shot" for m, k in columns]
    unseen = {(r["method"], r["task"], r["shots"]): r for r in final if not r["seen"]}
    point = {(u["method"], u["shots"]): u for u in s["unseen"]}

    rows = []
    for task in s["unseen_tasks"]:
        metric = next(r["metric"] for r in final if r["task"] == task and not r["seen"])
        values = [unseen.get((m, task, k)) for m, k in columns]
        rows.append([f"{task} ({metric})"] + [_num(v and v["score"]) for v in values])
    if s["unseen_tasks"]:
        rows.append(_avg_row(columns, point, baseline))
        if any(r["random"] for r in final if not r["seen"]):
            rows.append(_point_row("Norm. Avg. above random", columns, point, "norm_avg_random"))
        label = "Specialization (% in fine-tuned answer set)"
        rows.append(_point_row(label, columns, point, "specialization"))
    rows += _finetuned_rows(final, columns, shots)
    return _markdown(header, rows)


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def terminal_summary(
    records: Iterable[dict], baseline: str = "pretrained", statistics: dict | None = None
) -> str:
    """A compact plain-text table for the end of ``multipromot run``: one line per method x shots.

    Columns: method, shots, unseen Norm. Avg. (and its 95% interval, given ``statistics``),
    its difference to the baseline, mean specialization rate, then each fine-tuned task's score
    (0-shot, with its prompt).

    Args:
        records: flat records (see the module docstring).
        baseline: the method the differences refer to.
        statistics: the run's statistics (:func:`read_statistics`), for the interval column.

    Returns:
        The table as text (no colours, no box drawing), with a line saying what the interval
        is and how many items stand behind each Norm. Avg.
    """
    s = summary(records, baseline)
    seen = s["seen_tasks"]
    intervals = {
        (row["method"], row["shots"]): row["norm_avg"] for row in (statistics or {}).get("rows", [])
    }
    header = ["method", "shots", "Norm.Avg", "95% interval", f"vs {baseline}", "spec.%", *seen]
    ft: dict[tuple[str, str], float] = {}
    for f in sorted(s["finetuned"], key=lambda f: f["shots"] != 0):  # the 0-shot score first
        ft.setdefault((f["method"], f["task"]), f["score"])
    rows = []
    for method in s["methods"]:
        own = [u for u in s["unseen"] if u["method"] == method]
        tail = [_num(ft.get((method, t))) for t in seen]
        if not own:  # scored on the fine-tuned tasks only
            rows.append([method, _MISSING, _MISSING, _MISSING, _MISSING, _MISSING, *tail])
        for u in own:
            diff = _MISSING if u["diff"] is None or method == baseline else _signed(u["diff"])
            avg, spec = _num(u["norm_avg"]), _num(u["specialization"])
            interval = intervals.get((method, u["shots"]))
            span = f"[{interval['low']:.1f}, {interval['high']:.1f}]" if interval else _MISSING
            rows.append([method, str(u["shots"]), avg, span, diff, spec, *tail])
    table = _text_table(header, rows)
    known = [v for v in intervals.values() if v]
    if known:
        counts = Estimate(**known[0]).counts()
        table += (
            f"\n95% interval: bootstrap over the test items ({counts} per Norm. Avg.); "
            "paired differences in report.md"
        )
    return table


# --------------------------------------------------------------------------------------------
# Files


def _figure(
    points: dict[tuple[str, int, int], dict],
    methods: list[str],
    key: str,
    ylabel: str,
    title: str,
    *,
    curves: bool,
    losses: list[tuple[str, str, dict[str, list]]] = (),
):
    """One figure: ``key`` per shots setting (a panel each), then the training-loss panels.

    With ``curves`` (some method was evaluated at several stage-2 steps) each such method is a
    line over steps and a method evaluated once a dashed reference level; without, every
    method was evaluated once and each panel is a bar per method at its selected step (no
    line that would pretend to be a curve). ``losses`` are (panel title, x label,
    {series: [(step, loss)]}) drawn below, one panel each. A method keeps its colour, marker
    and hatch in every panel.

    Returns:
        A matplotlib Figure, or None when nothing was measured for ``key``.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg on save

    shots = sorted({k for (_, _, k), p in points.items() if p[key] is not None})
    if not shots:
        return None
    losses = [panel for panel in losses if any(len(pts) for pts in panel[2].values())]
    rows, cols = (2 if losses else 1), max(len(shots), len(losses))
    fig = Figure(figsize=(4.5 * cols, 3.6 * rows), layout="constrained")
    steps = [step for (_, step, _) in points]
    span = (min(steps), max(steps))
    for i, k in enumerate(shots):
        ax = fig.add_subplot(rows, cols, i + 1)
        if curves:
            _draw_curves(ax, points, methods, key, k, span)
            ax.set_title(f"{title}, {k}-shot")
            ax.set_xlabel("stage-2 step")
        else:
            _draw_bars(ax, points, methods, key, k)
            ax.set_title(f"{title}, {k}-shot (one evaluation each)")
            ax.set_xlabel("selected step of each method (eval.curve=false)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if curves:  # bars are named on their axis
            ax.legend(fontsize="small")
    for i, (panel_title, xlabel, series) in enumerate(losses):
        ax = fig.add_subplot(rows, cols, cols + i + 1)
        others = 0  # series that are no method (stage 1's): black, one dash pattern each
        for name, pts in series.items():
            if not pts:
                continue
            if name in methods:
                style = {**_style(methods.index(name)), "linestyle": "-"}
            else:
                style = dict(color="black", linestyle=("-", "--", ":")[others % 3])
                others += 1
            ax.plot(
                *zip(*sorted(pts), strict=True),
                label=name,
                marker=style.get("marker"),
                markevery=max(1, len(pts) // 8),
                markersize=4,
                color=style["color"],
                linestyle=style["linestyle"],
            )
        ax.set_title(panel_title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss (mean per target token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def _style(j: int) -> dict:
    """Method ``j``'s colour and marker, the same in every panel and file."""
    return dict(color=_COLORS[j % len(_COLORS)], marker=_MARKERS[j % len(_MARKERS)])


def _series(points: dict, method: str, key: str, k: int) -> list[tuple[int, float]]:
    return sorted(
        (step, p[key])
        for (m, step, kk), p in points.items()
        if m == method and kk == k and p[key] is not None
    )


def _draw_curves(ax, points: dict, methods: list[str], key: str, k: int, span) -> None:
    for j, method in enumerate(methods):
        line = _series(points, method, key, k)
        style = _style(j)
        if len(line) == 1:  # one evaluation (the pretrained model): a reference level
            ax.hlines(
                line[0][1],
                *span,
                linestyles=_DASHES[j % len(_DASHES)],
                color=style["color"],
                label=f"{method} (step {line[0][0]})",
            )
        elif line:
            ax.plot(*zip(*line, strict=True), markersize=4, label=method, **style)


def _draw_bars(ax, points: dict, methods: list[str], key: str, k: int) -> None:
    ticks, names = [], []
    for j, method in enumerate(methods):
        line = _series(points, method, key, k)
        if not line:
            continue
        step, value = line[-1]
        x = len(ticks)
        ax.bar(
            x,
            value,
            color=_COLORS[j % len(_COLORS)],
            hatch=_HATCHES[j % len(_HATCHES)],
            edgecolor="black",
            label=f"{method} (step {step})",
        )
        ticks.append(x)
        names.append(f"{method}\n(step {step})")
    ax.set_xticks(ticks, names, fontsize="small")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


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
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_DASHES = ("--", ":", "-.", (0, (5, 1, 1, 1)))
_HATCHES = ("", "//", "..", "xx", "\\\\", "oo", "--", "++")


def _with_step0(records: list[dict]) -> list[dict]:
    """Curves start at step 0: a stage-2 method without a step-0 evaluation gets the points of
    the method evaluated with the same weights and prompts before stage 2 (the base model with
    no prompts is ``pretrained``'s; with the same bank versions, ``prompt_tuning``'s)."""
    by_method: dict[str, list[dict]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    starts = {}
    for rows in by_method.values():
        if {r["step"] for r in rows} == {0}:  # evaluated at the base weights only
            refs = rows[0].get("bank_refs") or {}
            starts.setdefault(json.dumps(refs, sort_keys=True), rows)
    out = list(records)
    for method, rows in by_method.items():
        steps = {r["step"] for r in rows}
        if len(steps) < 2 or 0 in steps:
            continue
        refs = json.dumps(rows[0].get("bank_refs") or {}, sort_keys=True)
        for r in starts.get(refs, []):
            if not r.get("seen"):
                out.append({**r, "method": method, "selected": False})
    return out


def _loss_panels(
    stage1_losses: dict[str, list] | None, stage2_losses: dict[str, list] | None
) -> list:
    panels = []
    if stage2_losses:
        panels.append(("Stage-2 training loss", "stage-2 step", stage2_losses))
    if stage1_losses:  # (empty series and panels are left out when drawn)
        panels.append(("Stage-1 training loss (all tasks)", "stage-1 step", stage1_losses))
    return panels


def plot_figures(
    records: Iterable[dict],
    *,
    stage1_losses: dict[str, list] | None = None,
    stage2_losses: dict[str, list] | None = None,
) -> dict:
    """The figures of :func:`write_plots`, as matplotlib Figures (file name -> Figure).

    Args:
        records: flat records (see the module docstring).
        stage1_losses: per kind of stage 1 (prompts, promot_lora's adapters), its (step,
            training loss) points.
        stage2_losses: per method, stage 2's (step, training loss) points.

    Returns:
        ``norm_avg.png`` (with the training-loss panels below its own) and
        ``specialization.png`` when specialization was measured; empty when every record is
        from one step.
    """
    records = _normalize(records)
    if len({r["step"] for r in records}) < 2:
        return {}
    evaluated: dict[str, set] = {}
    for r in records:
        evaluated.setdefault(r["method"], set()).add(r["step"])
    curves = any(len(steps) > 1 for steps in evaluated.values())
    points = _unseen_points(_with_step0(records) if curves else records)
    methods = _ordered(r["method"] for r in records)
    losses = _loss_panels(stage1_losses, stage2_losses)
    plots = {
        "norm_avg.png": ("norm_avg", "Norm. Avg. (0-100)", "Unseen tasks", losses),
        "specialization.png": (
            "specialization",
            "% in fine-tuned answer set",
            "Specialization",
            [],
        ),
    }
    figures = {}
    for name, (key, ylabel, title, panels) in plots.items():
        fig = _figure(points, methods, key, ylabel, title, curves=curves, losses=panels)
        if fig is not None:
            figures[name] = fig
    return figures


def write_plots(
    records: Iterable[dict],
    out_dir: str | os.PathLike,
    *,
    stage1_losses: dict[str, list] | None = None,
    stage2_losses: dict[str, list] | None = None,
) -> list[str]:
    """The curves over stage-2 steps (or, when each method was evaluated once, a bar per
    method) and the training losses, when the records span more than one step.

    Args:
        records: flat records (see the module docstring).
        out_dir: where the PNGs go.
        stage1_losses: per kind of stage 1, its (step, training loss) points
            (``metrics.jsonl``).
        stage2_losses: per method, stage 2's (step, training loss) points.

    Returns:
        The file names written (``norm_avg.png``, ``specialization.png`` when specialization
        was measured), relative to ``out_dir``; empty for a single step.
    """
    written = []
    for name, fig in plot_figures(
        records, stage1_losses=stage1_losses, stage2_losses=stage2_losses
    ).items():
        write_atomic(Path(out_dir) / name, _png(fig))
        written.append(name)
    return written


# Config keys worth a line in "how this was produced" (dotted paths into the config dict).
_CONFIG_LINES = (
    ("model", "model"),
    ("seed", "seed"),
    ("methods", "methods"),
    ("stage1.mixture", "stage 1 mixture"),
    ("stage1.steps", "stage 1 steps"),
    ("stage1.prompt_length", "prompt length"),
    ("stage1.lr", "stage 1 lr"),
    ("stage2.mixture", "stage 2 mixture"),
    ("stage2.steps", "stage 2 steps"),
    ("stage2.lr", "stage 2 lr"),
    ("stage2.batch_size", "stage 2 batch size"),
    ("eval.suite", "eval suite"),
    ("eval.shots", "shots"),
    ("eval.examples", "examples per task"),
    ("eval.num_beams", "beam width"),
    ("eval.router", "router"),
    ("bank.dir", "prompt bank"),
)


def _lookup(config: dict, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def config_lines(config: dict) -> list[tuple[str, Any]]:
    """The config's keys worth a line in "how this was produced" (``_CONFIG_LINES``), as
    (label, value), unset ones left out."""
    lines = []
    for dotted, label in _CONFIG_LINES:
        value = _lookup(config, dotted)
        if value not in (None, "", []):
            lines.append((label, value))
    return lines


def _provenance(config: dict | None, produced: dict | None) -> list[str]:
    """How the report was made: the command as typed (with its overrides, from the folder it
    ran in), the settings actually used and the prompts, each with what made it.

    ``produced`` (from the command that wrote the report) is ``{"command", "settings":
    [[label, value]], "prompts": [{"ref", "sha256", "bank", "made"}]}``; without it the
    config's own keys are shown."""
    lines = ["## How this was produced", ""]
    if produced:
        lines += ["```", produced["command"], "```", ""]
        lines += [f"- {label}: `{value}`" for label, value in produced.get("settings", [])]
        prompts = produced.get("prompts") or []
        if prompts:
            lines += ["", "Prompts (bank entries, by content):", ""]
            for p in prompts:
                lines.append(
                    f"- `{p['ref']}` (sha256 `{str(p['sha256'])[:12]}`, bank `{p['bank']}`): "
                    f"{p['made']}"
                )
        return [*lines, "", "The full config and every record are in `results.json`.", ""]
    if not config:
        return [*lines, "No run config was recorded.", ""]
    if config.get("config_file"):
        lines += [f"`multipromot run {config['config_file']}`", ""]
    lines += [f"- {label}: `{value}`" for label, value in config_lines(config)]
    lines += ["", "The full config and every record are in `results.json`.", ""]
    return lines


def _notes(records: list[dict]) -> list[str]:
    """What a reader must know to read the numbers: fine-tuned tasks scored on the split that
    also selected their prompt and step, and k-shot inputs that kept fewer exemplars than
    their label says (the rest did not fit the input budget)."""
    notes = []
    same = sorted(
        {
            (r["task"], r["split"])
            for r in records
            if r.get("seen") and r.get("selected_on_scored_split")
        }
    )
    for task, split in same:
        notes.append(
            f"`{task}` is scored on `{split}`, the split that also selected its stage-1 prompt "
            "and the stage-2 step (best on target): its fine-tuned score is optimistic. A "
            "mixture entry `splits: {validation: {from: train, size: N}}` holds out a "
            "selection split instead."
        )
    short: dict[tuple, list[float]] = {}
    for r in records:
        kept, shots = r.get("exemplars_kept"), r.get("shots") or 0
        if kept is not None and shots and kept < shots:
            short.setdefault((r["task"], shots), []).append(kept)
    for (task, shots), kept in sorted(short.items()):
        notes.append(
            f"`{task}` {shots}-shot: {min(kept):.2f}-{max(kept):.2f} exemplars per input on "
            "average (the rest did not fit the input budget)"
            if min(kept) != max(kept)
            else f"`{task}` {shots}-shot: {kept[0]:.2f} exemplars per input on average (the "
            "rest did not fit the input budget)"
        )
    if not notes:
        return []
    return ["## Notes", "", *[f"- {note}" for note in notes], ""]


def _method_lines(records: list[dict], methods: dict[str, str] | None) -> list[str]:
    """Per method: where its numbers come from (this run or an earlier one), the stage-2 step
    and training shots of the weights, and the bank versions of its prompts."""
    lines = ["## Methods", ""]
    seen: dict[str, dict] = {}
    for r in records:
        if r.get("selected", True) and r["method"] not in seen:
            seen[r["method"]] = r
    for label in _ordered(r["method"] for r in records):
        r = seen.get(label, {})
        wise = r.get("interpolated")
        if wise:  # WiSE-FT: no stage 2 of its own; the step is its source's
            parts = [
                f"{wise['alpha']:g} x {wise['source']}'s stage-2 step {wise['step']} weights "
                f"+ {1 - wise['alpha']:g} x the base"
            ]
        elif r.get("step"):
            parts = [f"stage-2 step {r['step']}"]
        else:
            parts = ["base weights"]
        if r.get("train_shots"):
            kept = r.get("train_shots_kept") or {}
            short = {t: k for t, k in kept.items() if k < r["train_shots"]}
            parts.append(
                f"trained {r['train_shots']}-shot"
                + (
                    " (exemplars kept on average: "
                    + ", ".join(f"{t} {k:.2f}" for t, k in sorted(short.items()))
                    + "; the rest did not fit stage2.max_input_length)"
                    if short
                    else ""
                )
            )
        replay = r.get("train_replay")
        if replay:
            parts.append(
                f"replay: {100 * replay['share']:g}% of stage 2's rows were "
                f"{replay['shots']}-shot train rows of " + ", ".join(replay["tasks"])
            )
        targets = r.get("train_targets")
        if targets:
            shares = ", ".join(
                f"{task} {t['rows']} rewritten, {t['share_kept']:.1f}% kept "
                f"({t['share_changed']:.1f}% changed)"
                for task, t in targets.get("tasks", {}).items()
            )
            made = "reused" if targets.get("reused") else f"{targets.get('seconds')} s"
            parts.append(f"self-distilled targets (base model's rewrites, {made}): {shares}")
        refs = r.get("bank_refs") or {}
        parts.append("prompts " + ", ".join(sorted(refs.values())) if refs else "no prompts")
        if methods and label in methods:
            parts.append(methods[label])
        lines.append(f"- `{label}`: " + "; ".join(parts))
    return [*lines, ""]


def _drift_lines(rows: list[dict]) -> list[str]:
    """report.md's drift table: each method at its selected step."""
    rows = [r for r in rows if r["selected"]]
    if not rows:
        return []
    shots = sorted({k for r in rows for k in r["unseen"]})
    header = ["method", "step", "fine-tuned tasks", *[f"unseen {k}-shot" for k in shots]]

    def kl(value: float | None) -> str:
        return _MISSING if value is None else f"{value:.4f}"

    body = [
        [r["method"], str(r["step"]), kl(r["finetuned"]), *[kl(r["unseen"].get(k)) for k in shots]]
        for r in rows
    ]
    return [
        "## Drift from the base model",
        "",
        f"Mean {rows[0]['direction']} per target token (nats) of the next-token distributions, "
        "teacher-forced on the first eval.drift_examples held-out items of each task and their "
        "references, each row with the prompt it was scored with; 0 = the base model's "
        'distributions. The forward KL that "RL\'s Razor" relates to forgetting. Every '
        "evaluated step is in results.json (summary.drift).",
        "",
        _markdown(header, body),
        "",
    ]


def write_report(
    records: Iterable[dict],
    out_dir: str | os.PathLike,
    *,
    title: str,
    config: dict | None = None,
    baseline: str = "pretrained",
    methods: dict[str, str] | None = None,
    stage1_losses: dict[str, list] | None = None,
    stage2_losses: dict[str, list] | None = None,
    samples: dict[str, str] | None = None,
    compare: Iterable[str] = (),
    produced: dict | None = None,
) -> Path:
    """Write ``report.md``, ``results.json`` and (over several steps) the PNG curves.

    Args:
        records: flat records (see the module docstring).
        out_dir: the run's output directory.
        title: the report's heading.
        config: the run config as a plain dict (for the provenance section and results.json).
        baseline: the method the differences refer to.
        methods: per method, whether its numbers were made by this run or reused.
        stage1_losses: per kind of stage 1, its (step, training loss) points, for the loss
            panel.
        stage2_losses: per method, stage 2's (step, training loss) points.
        samples: per method, its samples file (relative to ``out_dir``): the per-item values
            the intervals and paired differences are computed from.
        compare: the methods every other one is compared with (``eval.compare``).
        produced: how the numbers were made, from the command that made them: the command
            line as typed, the settings and the prompts actually used (see ``_provenance``);
            without it the config's keys are shown.

    Returns:
        The path of ``report.md``.

    Raises:
        ValueError: malformed records (see :func:`summary`).
    """
    out = Path(out_dir)
    records = [dict(r) for r in records]
    s = summary(records, baseline)
    plots = write_plots(records, out, stage1_losses=stage1_losses, stage2_losses=stage2_losses)
    lines = [f"# {title}", ""]
    lines += [
        "## Results (each method at its selected stage-2 step: best on its fine-tuned tasks)",
        "",
        format_table(records, baseline),
        "",
        "Unseen tasks are scored in context (k-shot, exemplars from their train split); "
        "Norm. Avg. is the mean of their 0-100 scores (the paper's), with the difference to "
        f"{baseline} in brackets. Specialization is the share of unseen-task outputs that fall "
        "in the fine-tuned task's answer set. Fine-tuned tasks are scored 0-shot with their "
        "own prompt.",
        "",
    ]
    stats = None
    if samples:
        items: dict[tuple, list[dict]] = {}
        for path in samples.values():
            items.update(read_samples(out / path))
        stats = statistics([RunData(records, items)], list(compare))
        lines += ["## Intervals and paired differences", "", statistics_markdown(stats)]
    lines += _method_lines(records, methods)
    lines += _drift_lines(s.get("drift") or [])
    if plots:
        lines += [
            "## Plots",
            "",
            "Unseen tasks over stage-2 steps (a bar per method when each was evaluated at "
            "one step only)"
            + (", with the training losses below." if stage1_losses or stage2_losses else "."),
            "",
        ]
        lines += [f"![{name[:-4]}]({name})" for name in plots]
        lines.append("")
    lines += _notes(records)
    lines += _provenance(config, produced)
    results = {
        "title": title,
        "summary": s,
        "records": records,
        "config": config,
        "produced": produced,
        "samples": samples or {},
        "statistics": stats,
    }
    write_atomic(out / "results.json", (json.dumps(results, indent=2) + "\n").encode())
    path = out / "report.md"
    write_atomic(path, "\n".join(lines).encode())
    return path


def read_statistics(out_dir: str | os.PathLike) -> dict | None:
    """The statistics :func:`write_report` stored in ``out_dir/results.json`` (None if none)."""
    results = json.loads((Path(out_dir) / "results.json").read_text())
    return results.get("statistics")
