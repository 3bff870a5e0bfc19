"""Run every CPU benchmark in turn (`make bench`) and print their tables.

Each script runs in its own process (they patch stage-loop hooks and set thread counts), one
after the other so they never compete for the 2 cores, and updates its own section of
benchmarks/RESULTS.md. Expect ~20-30 minutes on 2 shared cores (stage2_overhead about half).

    .venv/bin/python benchmarks/run_all.py [name ...]     # e.g. run_all.py router padding
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
# In the order of the items (1-7); item 8 (GPU) needs a GPU: see RESULTS.md; 9 is the
# decoder-only prefix cache (issue 15).
SCRIPTS = [
    "stage2_overhead",
    "stage1_peft",
    "inference_peft",
    "padding",
    "data_path",
    "router",
    "memory",
    "inference_decoder",
]


def main(names: list[str]) -> int:
    unknown = sorted(set(names) - set(SCRIPTS))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {SCRIPTS}", file=sys.stderr)
        return 2
    start, failed = time.perf_counter(), []
    for name in names or SCRIPTS:
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        result = subprocess.run([sys.executable, str(HERE / f"{name}.py")])
        print(f"=== {name}: {time.perf_counter() - t0:.0f} s, exit {result.returncode}", flush=True)
        if result.returncode != 0:
            failed.append(name)
    print(
        f"\nall done in {(time.perf_counter() - start) / 60:.1f} min; results in "
        f"{HERE / 'RESULTS.md'}" + (f"; FAILED: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
