"""GPU benchmark (never part of the tests): stage 2 in bf16 against a plain PyTorch loop, and
FSDP2 over every GPU of the machine.

    .venv/bin/python benchmarks/gpu.py                 # on a GPU machine: ~1B T5, prints a table
    .venv/bin/python benchmarks/gpu.py --smoke         # any machine: tiny shape, 3 steps, CPU ok

Arms, each after one warm-up step, the same batches (same sampler, seed and collator):

1. **multipromot, 1 GPU**: ``stage2.finetune`` in ProMoT mode (P = 100 frozen bank prompt
   positions per row), ``stage2.bf16=true`` (autocast), Adafactor, label smoothing 0.1,
   clipping 1.0.
2. **plain loop, 1 GPU**: the same model from ``from_pretrained``, the same collated batches
   with P real token ids standing in for the soft prompt (same lengths), bf16 autocast, the
   same loss, clipping and Adafactor; no framework.
3. **multipromot FSDP2, all GPUs** (if there are 2 or more): ``torchrun --nproc_per_node
   <GPUs>`` of arm 1 with ``stage2.mixed_precision=bf16`` (bf16 parameters, fp32 reduction);
   the global batch is the same, so each GPU does 1/N of the work.

Reported per arm: median step time (with a 95% bootstrap interval over the steps), tokens/s (non-pad encoder + decoder positions, all GPUs),
MFU (6 x parameters x tokens per step / step time / peak bf16 FLOP/s of the GPUs; the peak is
looked up by device name, or taken from PEAK_TFLOPS) and peak allocated GPU memory (rank 0).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common as C  # noqa: E402

TASKS = ["rte", "wmt14_en_fr"]
P = 100
# ~1.2B parameters: T5 with d_model 2048, 12 + 12 layers, vocabulary 32,128.
C.T5_SHAPES["t5-1b"] = dict(d_model=2048, d_kv=64, d_ff=5120, num_layers=12, num_heads=32)
FULL = {"shape": "t5-1b", "batch": 16, "steps": 21, "max_in": 512, "max_tgt": 128}
SMOKE = {"shape": "t5-tiny", "batch": 4, "steps": 3, "max_in": 64, "max_tgt": 16}
# Dense bf16 peak per GPU (vendor data sheets), by a substring of the device name.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops() -> float | None:
    import torch

    if os.environ.get("PEAK_TFLOPS"):
        return float(os.environ["PEAK_TFLOPS"]) * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


class Clock(C.StepClock):
    """The stage-2 loop's throughput meter: records step ends, tokens and peak memory."""

    def __init__(self, window: int = 20):
        super().__init__(window)
        self.tokens: list[int] = []

    def update(self, tokens: int) -> float:
        _sync()
        self.tokens.append(tokens)
        return super().update(tokens)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_gb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else float("nan")


def setup(tmp: Path, s: dict) -> tuple[Path, Path, int, object]:
    from multipromot.models import save_model

    tok = C.tokenizer()
    model = C.t5_model(s["shape"], tok)
    n_params = sum(p.numel() for p in model.parameters())
    model_dir = tmp / "model"
    save_model(model, tok, model_dir, name=f"bench-{s['shape']}")
    del model
    mixture = C.write_mixture(tmp / "data", TASKS, train=400)
    bank = C.make_bank(model_dir, [C.task_name(t) for t in TASKS], P, tmp / "bank")
    config = C.stage2_config(
        tmp / "config.yaml",
        model=model_dir,
        bank=bank,
        mixture=mixture,
        out=tmp / "out",
        steps=s["steps"],
        batch_size=s["batch"],
        max_input_length=s["max_in"],
        max_target_length=s["max_tgt"],
        bf16="true",
        log_every=1,
    )
    return config, mixture, n_params, tok


def run_multipromot(config: Path, overrides: list[str] = (), prompt_positions: int = 0) -> dict:
    import multipromot.train.stage2 as stage2
    from multipromot.config import load_config

    stage2.Throughput = Clock
    _reset_peak()
    stage2.finetune(load_config(str(config), list(overrides)), progress=False)
    clock = Clock.last
    times = clock.step_times()[1:]  # the first step is a warm-up
    # The loop counts input and target positions; the P prompt positions per row that the
    # model also processes are added, so both arms count the same work.
    tokens = statistics.median(clock.tokens[1:]) + prompt_positions
    return {"times": times, "tokens": tokens, "peak_gb": _peak_gb()}


def run_plain(model_dir: Path, mixture: Path, tok, s: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForSeq2SeqLM
    from transformers.optimization import Adafactor

    from multipromot.data.collate import Collator
    from multipromot.data.exemplars import build_item
    from multipromot.data.sampler import MixtureSampler

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mix = C.load_tasks(mixture)
    sampler = MixtureSampler(mix, seed=0)
    collate = Collator(
        tok, decoder_only=False, max_input_length=s["max_in"], max_target_length=s["max_tgt"]
    )
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).to(device)
    model.train()
    opt = Adafactor(
        model.parameters(), lr=1e-3, relative_step=False, scale_parameter=True, warmup_init=False
    )
    _reset_peak()
    times, tokens = [], []
    for _ in range(s["steps"]):
        b = collate(
            [
                build_item(mix.tasks[d.task_index], d.example_index, task_id=d.task_index)
                for d in sampler.take(s["batch"])
            ]
        )
        rows = b["input_ids"].shape[0]
        prompt = torch.arange(3, 3 + P).expand(rows, P)
        ids = torch.cat([prompt, b["input_ids"]], 1).to(device)
        mask = torch.cat([torch.ones(rows, P, dtype=torch.long), b["attention_mask"]], 1).to(device)
        labels = b["labels"].to(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(
                input_ids=ids, attention_mask=mask, decoder_input_ids=model._shift_right(labels)
            ).logits
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, label_smoothing=0.1
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync()
        times.append(time.perf_counter() - t0)
        tokens.append(int(mask.sum()) + int(labels.ne(-100).sum()))
    return {"times": times[1:], "tokens": statistics.median(tokens[1:]), "peak_gb": _peak_gb()}


def run_fsdp(config: Path, gpus: int, tmp: Path) -> dict:
    """Arm 3 in a torchrun child (this script with --fsdp-worker); rank 0 writes its result."""
    result = tmp / "fsdp.json"
    env = {**os.environ, "GPU_BENCH_RESULT": str(result)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={gpus}",
        __file__,
        "--fsdp-worker",
        str(config),
    ]
    env["GPU_BENCH_PROMPT_POSITIONS"] = str(
        P * json.loads(config.read_text())["stage2"]["batch_size"]
    )
    subprocess.run(cmd, env=env, check=True)
    return json.loads(result.read_text())


def fsdp_worker(config: str) -> None:
    out = run_multipromot(
        Path(config),
        ["stage2.mixed_precision=bf16", f"out_dir={Path(config).parent / 'out-fsdp'}"],
        int(os.environ["GPU_BENCH_PROMPT_POSITIONS"]),
    )
    if os.environ.get("RANK", "0") == "0":
        Path(os.environ["GPU_BENCH_RESULT"]).write_text(json.dumps(out))


def main(argv: list[str]) -> int:
    import torch

    if argv[:1] == ["--fsdp-worker"]:
        fsdp_worker(argv[1])
        return 0
    s = SMOKE if "--smoke" in argv else FULL
    if s is FULL and not torch.cuda.is_available():
        print("no GPU: run with --smoke to check the script, or on a GPU machine", file=sys.stderr)
        return 2
    gpus = torch.cuda.device_count()
    peak = peak_flops()
    load = C.Load()
    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    try:
        config, mixture, n_params, tok = setup(tmp, s)
        arms = {"multipromot, 1 GPU": (run_multipromot(config, [], P * s["batch"]), 1)}
        arms["plain loop, 1 GPU"] = (run_plain(tmp / "model", mixture, tok, s), 1)
        if gpus >= 2:
            arms[f"multipromot FSDP2, {gpus} GPUs"] = (run_fsdp(config, gpus, tmp), gpus)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for name, (r, n) in arms.items():
        step = C.median(r["times"])
        mfu = 6 * n_params * r["tokens"] / step.point / (peak * n) if peak else float("nan")
        rows.append(
            [
                name,
                str(step),
                f"{r['tokens'] / step.point:,.0f}",
                f"{100 * mfu:.1f}%",
                f"{r['peak_gb']:.2f}",
            ]
        )
    device = torch.cuda.get_device_name(0) if gpus else "CPU"
    print(
        f"{s['shape']} ({n_params / 1e9:.2f}B parameters), batch {s['batch']}, P={P}, "
        f"input <= {s['max_in']}, target <= {s['max_tgt']}, bf16; device: {device} x {gpus}"
    )
    print(f"{C.machine()}; {load.line()}")
    print(C.table(["arm", "step s, median (95% CI)", "tokens/s", "MFU", "peak GB (rank 0)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
