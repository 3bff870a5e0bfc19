"""Memory per rank: stage 2 with FSDP2 on 2 processes against 1 process (torchrun, gloo, CPU).

The same `multipromot stage2` run (ProMoT mode, t5-small shape, AdamW so that the optimizer
state is 2x the parameters, global batch 8, 3 steps) is launched with
`torchrun --nproc_per_node 1` (one unsharded process) and `--nproc_per_node 2` (FSDP2 shards).
Each rank reports:

- the bytes of parameters and optimizer state it holds (its local shards: `DTensor.to_local()`);
- its resident memory (RSS) at the end of each training step (the largest is shown), and its
  peak RSS over the whole run (`ru_maxrss`: rank 0 also loads the full model before
  sharding it and gathers it again for the final export, so its peak is not a training peak).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common as C  # noqa: E402

SHAPE = "t5-small"
TASKS = ["rte", "wmt14_en_fr"]
P = 100
STEPS = 3
MiB = 2**20


def worker(config: str, out: str) -> None:
    """Run under torchrun: train, then write this rank's numbers to ``out/rank<r>.json``."""
    import resource

    import torch

    import multipromot.train.stage2 as stage2
    from multipromot.config import load_config

    captured = {}
    make_optimizer = stage2.build_stage2_optimizer

    def capture(prompted, *args, **kwargs):
        captured["optimizer"] = make_optimizer(prompted, *args, **kwargs)
        captured["model"] = prompted
        return captured["optimizer"]

    stage2.build_stage2_optimizer = capture
    stage2.Throughput = C.StepClock
    C.StepClock.rss = True
    rank = int(os.environ.get("RANK", "0"))
    stage2.finetune(load_config(config), progress=False)

    def local_bytes(t) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    optimizer = captured["optimizer"]
    params = sum(local_bytes(p) for p in captured["model"].parameters())
    state = sum(local_bytes(v) for s in optimizer.state.values() for v in s.values())
    clock = C.StepClock.last
    record = {
        "rank": rank,
        "params": params,
        "state": state,
        "train_rss": max(clock.rss_bytes),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "step_s": C.statistics.median(clock.step_times()[1:]),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


def launch(n: int, config: Path, out: Path) -> list[dict]:
    out.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={n}",
        __file__,
        "--worker",
        str(config),
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(n)]


def main() -> None:
    from multipromot.models import save_model

    machine, load = C.machine(), C.Load()
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    try:
        tok = C.tokenizer()
        model = C.t5_model(SHAPE, tok, dropout=0.1)
        save_model(model, tok, tmp / "model", name=f"bench-{SHAPE}")
        n_params = C.params_m(model)
        del model
        mixture = C.write_mixture(tmp / "data", TASKS, train=200)
        bank = C.make_bank(tmp / "model", [C.task_name(t) for t in TASKS], P, tmp / "bank")
        results = {}
        for n in (1, 2):
            config = C.stage2_config(
                tmp / f"config{n}.yaml",
                model=tmp / "model",
                bank=bank,
                mixture=mixture,
                out=tmp / f"out{n}",
                steps=STEPS,
                optimizer="adamw",
                lr=1e-4,
            )
            with C.Clock() as c:
                results[n] = launch(n, config, tmp / f"ranks{n}")
            print(f"  [{n} process(es)] {c.s:.1f} s: {results[n]}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    load.stop()
    one = results[1][0]
    rows = []
    for n, ranks in results.items():
        for r in ranks:
            held = r["params"] + r["state"]
            rows.append(
                [
                    f"{n} process{'es' if n > 1 else ''}, rank {r['rank']}",
                    r["params"] / MiB,
                    r["state"] / MiB,
                    held / MiB,
                    (one["params"] + one["state"]) / held,
                    r["train_rss"] / MiB,
                    r["peak_rss"] / MiB,
                ]
            )
    body = (
        f"Model: random-init T5 `{SHAPE}` shape ({n_params:.0f}M parameters, fp32), ProMoT "
        f"mode (P = {P}), AdamW, global batch 8 (4 per rank on 2 processes), {STEPS} steps, "
        f"torch.distributed.run with gloo on CPU, one thread per process. MiB per rank. "
        f"Parameters and optimizer state are counted bytes (exact: no interval); RSS is one "
        f"run's reading.\n\n"
        + C.table(
            [
                "run",
                "params",
                "optimizer state",
                "params + state",
                "1-process / this",
                "RSS at step ends (max)",
                "peak RSS (whole run)",
            ],
            rows,
        )
    )
    C.record("memory", "7. Memory per rank: FSDP2 on 2 processes against 1", body, machine, load)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
