"""Report: Norm. Avg. and differences on hand-written records, the tables, files and plots.

Records (unseen tasks cb and qa, fine-tuned task rte; steps 100 and 200 for the fine-tuned
methods, 0 for pretrained). At each method's last step, 1-shot:

    method      cb    qa    Norm. Avg.  diff    specialization (cb, qa)
    pretrained  40    20    30.0         0.0    0, 0      -> 0.0
    standard    15     0     7.5       -22.5    80, 100   -> 90.0
    promot      45    25    35.0        +5.0    10, 20    -> 15.0

4-shot adds 10 to every score (Norm. Avg. +10, same differences).
"""

from __future__ import annotations

import json

import pytest
from matplotlib.image import imread

from multipromot.eval.report import (
    final_records,
    format_table,
    summary,
    terminal_summary,
    write_plots,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rec(method, step, task, shots, score, spec=None, seen=False, metric="accuracy", random=0.0):
    return {
        "method": method,
        "step": step,
        "task": task,
        "shots": shots,
        "metric": metric,
        "score": score,
        "specialization": spec,
        "prompt": None,
        "seen": seen,
        "random": random,
    }


def _records() -> list[dict]:
    rows = []
    # (method, step, cb, qa, spec cb, spec qa, rte)
    table = [
        ("pretrained", 0, 40, 20, 0, 0, 50),
        ("standard", 100, 30, 10, 60, 70, 80),
        ("standard", 200, 15, 0, 80, 100, 90),
        ("promot", 100, 42, 22, 5, 5, 85),
        ("promot", 200, 45, 25, 10, 20, 88),
    ]
    for method, step, cb, qa, s_cb, s_qa, rte in table:
        for k, plus in ((1, 0), (4, 10)):
            rows.append(_rec(method, step, "cb", k, cb + plus, s_cb, random=50.0))
            rows.append(_rec(method, step, "qa", k, qa + plus, s_qa, metric="exact_match"))
        rows.append(_rec(method, step, "rte", 0, rte, seen=True))
    return rows


def test_final_records_are_each_methods_last_step():
    final = final_records(_records())
    assert {(r["method"], r["step"]) for r in final} == {
        ("pretrained", 0),
        ("standard", 200),
        ("promot", 200),
    }
    assert len(final) == 3 * 5


def test_summary_norm_avg_differences_and_specialization():
    s = summary(_records())
    assert s["methods"] == ["pretrained", "standard", "promot"]
    assert s["shots"] == [1, 4]
    assert s["unseen_tasks"] == ["cb", "qa"] and s["seen_tasks"] == ["rte"]
    got = {
        (u["method"], u["shots"]): (u["norm_avg"], u["diff"], u["specialization"])
        for u in s["unseen"]
    }
    assert got == {
        ("pretrained", 1): (30.0, 0.0, 0.0),
        ("pretrained", 4): (40.0, 0.0, 0.0),
        ("standard", 1): (7.5, -22.5, 90.0),
        ("standard", 4): (17.5, -22.5, 90.0),
        ("promot", 1): (35.0, 5.0, 15.0),
        ("promot", 4): (45.0, 5.0, 15.0),
    }
    # BIG-bench normalisation, cb random 50: promot 1-shot cb 45 -> -10, qa 25 -> 25: mean 7.5.
    promot_1 = next(u for u in s["unseen"] if (u["method"], u["shots"]) == ("promot", 1))
    assert promot_1["norm_avg_random"] == pytest.approx(7.5)
    assert promot_1["step"] == 200 and promot_1["tasks"] == ["cb", "qa"]
    assert [(f["method"], f["task"], f["shots"], f["score"]) for f in s["finetuned"]] == [
        ("pretrained", "rte", 0, 50),
        ("standard", "rte", 0, 90),
        ("promot", "rte", 0, 88),
    ]


def test_summary_without_the_baseline_has_no_differences():
    s = summary([r for r in _records() if r["method"] != "pretrained"])
    assert {u["diff"] for u in s["unseen"]} == {None}
    by_standard = summary(_records(), baseline="standard")
    assert by_standard["methods"][0] == "standard"  # the baseline leads the columns
    pretrained_1 = next(u for u in by_standard["unseen"] if u["method"] == "pretrained")
    assert pretrained_1["diff"] == pytest.approx(22.5)


def test_markdown_table_content():
    lines = format_table(_records()).splitlines()
    assert lines[0] == (
        "| Task | pretrained 1-shot | pretrained 4-shot | standard 1-shot | standard 4-shot "
        "| promot 1-shot | promot 4-shot |"
    )
    assert lines[1] == "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    assert lines[2:] == [
        "| cb (accuracy) | 40.0 | 50.0 | 15.0 | 25.0 | 45.0 | 55.0 |",
        "| qa (exact_match) | 20.0 | 30.0 | 0.0 | 10.0 | 25.0 | 35.0 |",
        "| **Norm. Avg.** (+/- vs pretrained) | 30.0 | 40.0 | 7.5 (-22.5) | 17.5 (-22.5) "
        "| 35.0 (+5.0) | 45.0 (+5.0) |",
        # cb rescaled against random 50 (40 -> -20, 15 -> -70, 45 -> -10), qa unchanged.
        "| Norm. Avg. above random | 0.0 | 15.0 | -35.0 | -20.0 | 7.5 | 22.5 |",
        "| Specialization (% in fine-tuned answer set) | 0.0 | 0.0 | 90.0 | 90.0 | 15.0 | 15.0 |",
        "| rte (accuracy, fine-tuned, 0-shot) | 50.0 | 50.0 | 90.0 | 90.0 | 88.0 | 88.0 |",
    ]


def test_table_marks_missing_cells_and_skips_the_random_row_without_baselines():
    records = [r for r in _records() if not (r["method"] == "promot" and r["task"] == "qa")]
    for r in records:
        r["random"] = 0.0
    table = format_table(records)
    assert "| qa (exact_match) | 20.0 | 30.0 | 0.0 | 10.0 | — | — |" in table
    assert "above random" not in table
    # promot's Norm. Avg. now covers cb only: 45 (+15 vs pretrained's 30 over cb and qa).
    assert "| 45.0 (+15.0) | 55.0 (+15.0) |" in table


def test_terminal_summary():
    lines = terminal_summary(_records()).splitlines()
    header = ["method", "shots", "Norm.Avg", "95%", "interval", "vs", "pretrained", "spec.%", "rte"]
    assert lines[0].split() == header
    assert [line.split() for line in lines[2:]] == [
        ["pretrained", "1", "30.0", "—", "—", "0.0", "50.0"],
        ["pretrained", "4", "40.0", "—", "—", "0.0", "50.0"],
        ["standard", "1", "7.5", "—", "-22.5", "90.0", "90.0"],
        ["standard", "4", "17.5", "—", "-22.5", "90.0", "90.0"],
        ["promot", "1", "35.0", "—", "+5.0", "15.0", "88.0"],
        ["promot", "4", "45.0", "—", "+5.0", "15.0", "88.0"],
    ]
    # With the run's statistics, the interval and the count of items behind it are shown.
    interval = {"value": 35.0, "low": 30.1, "high": 39.9, "seeds": 1, "items": 200}
    stats = {"rows": [{"method": "promot", "shots": 1, "norm_avg": interval}]}
    with_stats = terminal_summary(_records(), statistics=stats).splitlines()
    assert with_stats[6].split()[:5] == ["promot", "1", "35.0", "[30.1,", "39.9]"]
    assert with_stats[-1].startswith("95% interval: bootstrap over the test items (200 items")


def test_bad_records_are_refused():
    with pytest.raises(ValueError, match="lacks"):
        summary([{"method": "m", "task": "t", "shots": 1}])
    with pytest.raises(ValueError, match="two records"):
        summary([_rec("m", 1, "t", 1, 5.0), _rec("m", 1, "t", 1, 6.0)])


def test_write_report_files_and_round_trip(tmp_path):
    records = _records()
    config = {
        "config_file": "configs/tiny.yaml",
        "model": "tiny-t5",
        "seed": 0,
        "eval": {"suite": "eval/tiny.yaml", "shots": [1, 4]},
    }
    path = write_report(records, tmp_path, title="Tiny run", config=config)
    assert path == tmp_path / "report.md"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "norm_avg.png",
        "report.md",
        "results.json",
        "specialization.png",
    ]

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["records"] == records
    assert results["summary"] == summary(records)
    assert results["config"] == config and results["title"] == "Tiny run"

    text = path.read_text()
    assert text.startswith("# Tiny run\n")
    assert format_table(records) in text
    assert "![norm_avg](norm_avg.png)" in text and "![specialization](specialization.png)" in text
    assert "`multipromot run configs/tiny.yaml`" in text and "- model: `tiny-t5`" in text

    for name in ("norm_avg.png", "specialization.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC)
        image = imread(tmp_path / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300  # 2 subplots


def test_single_step_writes_no_plots(tmp_path):
    records = [r for r in _records() if r["step"] in (0, 200)]
    for r in records:
        r["step"] = 0
    assert write_plots(records, tmp_path) == []
    write_report(records, tmp_path, title="One step")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "results.json"]
    text = (tmp_path / "report.md").read_text()
    assert ".png" not in text and "No run config was recorded." in text


def test_no_specialization_plot_without_measurements(tmp_path):
    records = _records()
    for r in records:
        r["specialization"] = None
    assert write_plots(records, tmp_path) == ["norm_avg.png"]


def test_curves_start_at_step_0_from_the_same_weights_and_prompts():
    """A stage-2 curve had no step-0 point: the collapse from the pretrained model was not
    visible. A method gets the step-0 points of the method evaluated with the same base weights
    and the same prompts (none: pretrained; the same bank versions: prompt_tuning)."""
    from multipromot.eval.report import _unseen_points, _with_step0

    refs = {"rte": "rte@v0001"}
    records = [
        _rec("pretrained", 0, "cb", 1, 40.0),
        {**_rec("prompt_tuning", 0, "cb", 1, 42.0), "bank_refs": refs},
        _rec("standard", 2, "cb", 1, 20.0),
        _rec("standard", 4, "cb", 1, 10.0),
        {**_rec("promot", 2, "cb", 1, 39.0), "bank_refs": refs},
        {**_rec("promot", 4, "cb", 1, 38.0), "bank_refs": refs},
        {**_rec("promot@other", 2, "cb", 1, 30.0), "bank_refs": {"rte": "rte@v0002"}},
        {**_rec("promot@other", 4, "cb", 1, 31.0), "bank_refs": {"rte": "rte@v0002"}},
    ]
    points = _unseen_points(_with_step0(records))
    assert points[("standard", 0, 1)]["norm_avg"] == 40.0  # the pretrained model
    assert points[("promot", 0, 1)]["norm_avg"] == 42.0  # base weights with its prompts
    assert ("promot@other", 0, 1) not in points  # no evaluation with those prompts: no point
    assert final_records(_with_step0(records)) == final_records(records)  # the table is unchanged


LOSSES = {
    "standard": [(50, 2.0), (100, 1.5), (150, 1.2), (200, 1.0)],
    "promot": [(50, 2.2), (100, 1.9), (150, 1.7), (200, 1.6)],
}
STAGE1 = {"prompts": [(10, 3.0), (20, 2.5)], "promot_lora's adapters": [(10, 4.0), (20, 3.1)]}


def _panels(fig) -> dict:
    return {ax.get_title(): ax for ax in fig.axes}


def test_curves_have_a_training_loss_panel_and_a_style_per_method(tmp_path):
    from multipromot.eval.report import plot_figures

    records = _records()
    figures = plot_figures(records, stage1_losses=STAGE1, stage2_losses=LOSSES)
    panels = _panels(figures["norm_avg.png"])
    assert set(panels) == {
        "Unseen tasks, 1-shot",
        "Unseen tasks, 4-shot",
        "Stage-2 training loss",
        "Stage-1 training loss (all tasks)",
    }
    # the loss panels hold the logged losses, per method and for stage 1
    lines = {line.get_label(): line for line in panels["Stage-2 training loss"].get_lines()}
    for method, points in LOSSES.items():
        assert list(zip(*lines[method].get_data(), strict=True)) == points
    stage1 = panels["Stage-1 training loss (all tasks)"].get_lines()
    # one line per kind of stage 1 (prompts, promot_lora's adapters), told apart by dashes
    assert {line.get_label(): list(zip(*line.get_data(), strict=True)) for line in stage1} == STAGE1
    assert len({line.get_linestyle() for line in stage1}) == 2
    # the curves: one line per trained method, each with its own colour and marker (the same
    # in the loss panel), starting at step 0; pretrained is a labelled reference level
    curve = {line.get_label(): line for line in panels["Unseen tasks, 1-shot"].get_lines()}
    assert set(curve) == {"standard", "promot"}
    assert len({line.get_color() for line in curve.values()}) == 2
    assert len({line.get_marker() for line in curve.values()}) == 2
    for method in ("standard", "promot"):
        assert curve[method].get_color() == lines[method].get_color()
        assert curve[method].get_xdata()[0] == 0
    legend = [t.get_text() for t in panels["Unseen tasks, 1-shot"].get_legend().get_texts()]
    assert "pretrained (step 0)" in legend
    assert "Stage-1" not in " ".join(_panels(figures["specialization.png"]))  # losses once
    written = write_plots(records, tmp_path, stage1_losses=STAGE1, stage2_losses=LOSSES)
    assert written == ["norm_avg.png", "specialization.png"]
    assert (
        imread(tmp_path / "norm_avg.png").shape[0]
        > imread(tmp_path / "specialization.png").shape[0]
    )


def test_one_evaluation_per_method_is_bars_not_curves(tmp_path):
    """eval.curve=false: each method evaluated once. No lines joining points that are not a
    curve: a bar per method at its selected step, and the titles say so."""
    from multipromot.eval.report import plot_figures

    records = [r for r in _records() if r["step"] in (0, 200)]
    figures = plot_figures(records, stage2_losses=LOSSES)
    panels = _panels(figures["norm_avg.png"])
    bars = panels["Unseen tasks, 1-shot (one evaluation each)"]
    assert bars.get_lines() == [] and "eval.curve=false" in bars.get_xlabel()
    heights = {c.get_label(): c.patches[0].get_height() for c in bars.containers}
    assert heights == {
        "pretrained (step 0)": 30.0,
        "standard (step 200)": 7.5,
        "promot (step 200)": 35.0,
    }
    assert len({p.get_facecolor() for p in bars.patches}) == 3
    ticks = [t.get_text() for t in bars.get_xticklabels()]
    assert ticks == ["pretrained\n(step 0)", "standard\n(step 200)", "promot\n(step 200)"]
    assert "Stage-2 training loss" in panels  # the losses are curves: drawn as ever
    path = write_report(records, tmp_path, title="No curve", stage2_losses=LOSSES)
    assert (tmp_path / "norm_avg.png").read_bytes().startswith(PNG_MAGIC)
    assert "a bar per method when each was evaluated at one step only" in path.read_text()
