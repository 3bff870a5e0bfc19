"""Run every CPU benchmark in turn (`make bench`), then print each target's verdict.

Each script runs in its own process (they patch stage-loop hooks and set thread counts), one
after the other so they never compete for the 2 cores, updates its own section of
benchmarks/RESULTS.md and stores its targets' verdicts in benchmarks/targets.json. At the end
the targets of the scripts run are printed (holds / holds by the point estimate only / fails,
from each figure's 95% interval) and RESULTS.md's target table is rewritten from
targets.json. About 25-30 minutes on 2 quiet cores.

    .venv/bin/python benchmarks/run_all.py [name ...]     # e.g. run_all.py router padding
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import common as C  # noqa: E402

# In the order of RESULTS.md's sections; GPU (section 8) needs a GPU: benchmarks/gpu.py.
SCRIPTS = [
    "stage2_overhead",
    "stage1_peft",
    "inference_peft",
    "padding",
    "data_path",
    "router",
    "memory",
    "inference_decoder",
    "mixed_prompts",
    "stage2_decoder",
]
ARGS = {"stage2_decoder": ["--profile"]}  # extra arguments per script


def targets_table(stored: dict, scripts: list[str] | None = None) -> str:
    """The targets in ``stored`` (targets.json), of ``scripts`` if given, as a markdown table."""
    rows = []
    for key in sorted(stored, key=_order):
        t = stored[key]
        if scripts is not None and t["script"] not in scripts:
            continue
        estimate = C.Estimate(t["point"], t["low"], t["high"], t["n"])
        load = t.get("load") or {}
        when = t["run"].split(",", 1)[0]
        busy = load.get("others_cores", float("nan"))
        rows.append(
            [
                t["what"],
                f"{t['op']} {t['threshold']:g}",
                str(estimate),
                f"**{t['verdict']}**",
                f"{when}, {busy:.2f} other cores busy",
            ]
        )
    return C.table(["target", "wanted", "measured (95% CI)", "verdict", "run"], rows)


def _order(key: str) -> tuple:
    number = re.match(r"(\d+)", key)
    return (int(number.group(1)) if number else 99, key)


def write_targets_section(stored: dict) -> None:
    """Rewrite the target table between RESULTS.md's ``bench:targets`` markers."""
    section = (
        "<!-- bench:targets -->\n"
        + targets_table(stored)
        + "\n\nThe machine and the load of each run are in its section below.\n"
        + "<!-- /bench:targets -->\n"
    )
    text = C.RESULTS.read_text()
    pattern = re.compile(r"<!-- bench:targets -->.*?<!-- /bench:targets -->\n", re.S)
    if pattern.search(text):
        C.RESULTS.write_text(pattern.sub(lambda _: section, text))


def main(names: list[str]) -> int:
    unknown = sorted(set(names) - set(SCRIPTS))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {SCRIPTS}", file=sys.stderr)
        return 2
    start, failed = time.perf_counter(), []
    chosen = names or SCRIPTS
    for name in chosen:
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        result = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *ARGS.get(name, [])])
        print(f"=== {name}: {time.perf_counter() - t0:.0f} s, exit {result.returncode}", flush=True)
        if result.returncode != 0:
            failed.append(name)
    stored = json.loads(C.TARGETS.read_text()) if C.TARGETS.exists() else {}
    if stored:
        write_targets_section(stored)
        print("\nTargets of this run (verdict from the 95% interval):\n")
        print(targets_table(stored, [n for n in chosen if n not in failed]))
    print(
        f"\nall done in {(time.perf_counter() - start) / 60:.1f} min; results in "
        f"{C.RESULTS}" + (f"; FAILED: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
