"""ProMoT's stage-2 step against standard fine-tuning's on the decoder-only lab model.

Issue 25, item 7: the RTE-like decoder demo (``configs/demo_decoder_rte.yaml``; then named
demo_decoder.yaml) took 1.7x standard fine-tuning's time for ProMoT's stage 2 with a
20-position prompt. What a step should cost more is the share of extra positions the prompt
adds (each row runs P more positions through every layer); this measures the step against that
and profiles where the time goes.

Both arms are ``stage2.setup`` runs of the demo's stage-2 settings on the lab's RTE-like task
(``mixtures/lab_rte.yaml``, 0-shot, batch 32, AdamW lr 3e-4, no label smoothing, max input 512,
target 32) and a random-init ``lab-llama`` shape (``llama-small``: 2 layers, d 128, the lab
tokenizer; the step's cost does not depend on the weights' values, so the pretrained model is
not needed): ``standard`` (no prompt) and ``promot`` (a frozen P = 20 bank prompt per row). A
step is what ``stage2.train`` does per step: draw and collate the batch, forward and backward
(``stage2._forward_backward``), clip, optimizer and scheduler step. The arms run in lockstep,
step i of both on their own draws of the same sampler (same seed: the same rows), the order
inside a pair alternating; ``--profile`` then runs torch's profiler over a few steps of each.
A third arm, ``standard + P tokens``, runs standard fine-tuning with P real token ids in front of
every row's text: the bare model on the positions of a prompted row, what the prompt's positions
alone cost. A fourth, ``promot, text logits only``, measures what skipping the logits of the
prompt positions would save (not the package's path: see ``text_logits_only``).

    .venv/bin/python benchmarks/stage2_decoder.py [--steps 40] [--profile]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common as C  # noqa: E402

SIZE = "llama-small"
P = 20
BATCH = 32
WARMUP = 2
STEPS = 40
PROFILED_STEPS = 6
MIXTURE = Path(__file__).resolve().parents[1] / "mixtures" / "lab_rte.yaml"


def config(path: Path, *, mode: str, model: Path, bank: Path, out: Path, steps: int) -> Path:
    """The RTE-like decoder demo's stage-2 settings (configs/demo_decoder_rte.yaml) without
    validation or saves."""
    cfg = {
        "seed": 0,
        "out_dir": str(out),
        "model": str(model),
        "bank": {"dir": str(bank)},
        "stage2": {
            "mixture": str(MIXTURE),
            "mode": mode,
            "optimizer": "adamw",
            "lr": 3e-4,
            "label_smoothing": 0.0,
            "steps": steps,
            "batch_size": BATCH,
            "save_every": 10**9,
            "eval_every": 0,
            "keep_best_by": "none",
            "max_input_length": 512,
            "max_target_length": 32,
            "log_every": 10**9,
            "bf16": "false",
        },
    }
    path.write_text(json.dumps(cfg, indent=1))
    return path


def with_prompt_tokens(batch: dict, count: int) -> dict:
    """``batch`` with ``count`` real token ids in front of each row's text (after its left
    padding, where a soft prompt goes), labels -100 over them: the bare model's input for the
    same positions as a prompted row."""
    import torch

    rows = len(batch["input_ids"])
    ids = torch.arange(3, 3 + count).expand(rows, count)
    mask = torch.cat([torch.ones(rows, count, dtype=torch.long), batch["attention_mask"]], 1)
    order = torch.argsort(mask, dim=1, stable=True)  # masked positions first, as PromptedModel
    labels = torch.cat([torch.full((rows, count), -100), batch["labels"]], 1)
    return {
        "input_ids": torch.cat([ids, batch["input_ids"]], 1).gather(1, order),
        "attention_mask": mask.gather(1, order),
        "labels": labels.gather(1, order),
        "task_ids": batch["task_ids"],
    }


def text_logits_only(prompted) -> None:
    """Make ``prompted`` skip the logits of the prompt positions (``logits_to_keep``): what
    that would save. Not in the package: the tied embedding's gradient then sums fewer zero
    rows and differs in the last bits (measured 4e-9), so training would not be bit for bit
    what it is."""

    def forward(input_ids, attention_mask, labels=None, task_ids=None, **kwargs):
        inputs, _, _ = prompted._model_inputs(input_ids, attention_mask, task_ids)
        return prompted.model(**inputs, logits_to_keep=input_ids.shape[1], **kwargs)

    prompted.forward = forward


def stepper(run, prompt_tokens: int = 0):
    """One stage-2 step of ``run`` per call -> (wall s, CPU s, positions run through the
    model, of which real tokens) (the loop of ``stage2.train`` without logging and saves);
    ``prompt_tokens`` real tokens go in front of every row's text."""
    import torch

    import multipromot.train.stage2 as stage2

    trainable = [p for p in run.prompted.parameters() if p.requires_grad]
    prompt = run.prompted.prompt_length if run.kind.prompted else 0

    def step() -> tuple[float, float, int, int]:
        t0, c0 = time.perf_counter(), time.process_time()
        batches = run.batches()
        if prompt_tokens:
            batches = [with_prompt_tokens(b, prompt_tokens) for b in batches]
        stage2._forward_backward(
            run.prompted, batches, decoder_only=True, label_smoothing=0.0, bf16="false"
        )
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rows = sum(len(b["input_ids"]) for b in batches)
        positions = sum(b["attention_mask"].numel() for b in batches) + prompt * rows
        real = sum(int(b["attention_mask"].sum()) for b in batches) + prompt * rows
        return wall, cpu, positions, real

    return step


def op_profile(steps: dict, count: int) -> str:
    """Self CPU ms per step of the top operators in each arm."""
    from torch.profiler import ProfilerActivity, profile

    per_arm = {}
    for name, step in steps.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(count):
                step()
        per_arm[name] = {e.key: e.self_cpu_time_total / 1e3 / count for e in prof.key_averages()}
    ops = set().union(*per_arm.values())
    top = sorted(ops, key=lambda k: -sum(arm.get(k, 0.0) for arm in per_arm.values()))[:14]
    rows = [[op, *(arm.get(op, 0.0) for arm in per_arm.values())] for op in top]
    rows.append(["all operators", *(sum(arm.values()) for arm in per_arm.values())])
    return C.table(["operator", *(f"{name} ms/step" for name in per_arm)], rows)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=STEPS, help="measured steps per arm")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args(argv)
    pairs = args.steps

    import multipromot.train.stage2 as stage2
    from multipromot.bank import PromptBank, describe_model
    from multipromot.config import load_config
    from multipromot.lab.model import build_lab_model, build_lab_tokenizer, lab_corpus, lab_tasks
    from multipromot.models import save_model
    from multipromot.soft_prompt import init_prompts

    machine, load = C.machine(), C.Load()
    tmp = Path(tempfile.mkdtemp(prefix="bench-stage2-decoder-"))
    try:
        tok = build_lab_tokenizer(lab_corpus(lab_tasks()))
        model = build_lab_model(tok, SIZE, seed=0)
        save_model(model, tok, tmp / "model", name="bench-lab-llama")
        bank = PromptBank(tmp / "bank")
        prompt = init_prompts(model, tok, 1, P, method="vocab", seed=0)[0]
        bank.add("lab_rte", prompt, base_model=describe_model(model, name=str(tmp / "model")))
        steps = WARMUP + pairs + (PROFILED_STEPS if args.profile else 0)
        arms = {
            "standard": "standard",
            "standard + P tokens": "standard",
            "promot": "promot",
            "promot, text logits only": "promot",
        }
        runs = {}
        for i, (name, mode) in enumerate(arms.items()):
            path = config(
                tmp / f"arm{i}.yaml",
                mode=mode,
                model=tmp / "model",
                bank=tmp / "bank",
                out=tmp / f"arm{i}",
                steps=steps,
            )
            runs[name] = stage2.setup(load_config(str(path)), progress=False)
        text_logits_only(runs["promot, text logits only"].prompted)
        step = {
            name: stepper(run, prompt_tokens=P if name == "standard + P tokens" else 0)
            for name, run in runs.items()
        }
        results = {name: [] for name in step}
        for i in range(WARMUP + pairs):
            order = list(step) if i % 2 == 0 else list(reversed(step))
            for name in order:
                results[name].append(step[name]())
            if i >= WARMUP and (i - WARMUP) % 10 == 0:
                line = ", ".join(f"{n} {r[-1][1]:.3f}" for n, r in results.items())
                print(f"  step {i - WARMUP + 1}: CPU s {line}", flush=True)
        profile = op_profile(step, PROFILED_STEPS) if args.profile else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load.stop()

    measured = {name: res[WARMUP:] for name, res in results.items()}
    std = measured["standard"]

    def versus(name: str, base: list, k: int) -> C.Estimate:
        if measured[name] is base:
            return C.REFERENCE
        return C.ratio([r[k] for r in measured[name]], [r[k] for r in base])

    positions = sum(p[2] for p in measured["promot"]) / sum(s[2] for s in std)
    real = sum(p[3] for p in measured["promot"]) / sum(s[3] for s in std)
    rows = []
    for name in measured:
        rows.append(
            [
                name,
                C.statistics.median([r[1] for r in measured[name]]),
                str(versus(name, std, 1)),
                str(versus(name, std, 0)),
                str(versus(name, measured["standard + P tokens"], 1)),
            ]
        )
    ratio = versus("promot", std, 1)
    body = (
        f"Model: random-init lab-llama `{SIZE}` shape (2 layers, d 128, lab tokenizer, vocab "
        f"{len(tok)}), the demo's stage-2 settings on lab_rte (0-shot, batch {BATCH}, AdamW). "
        f"Arms: `standard` (stage2.mode=standard), `standard + P tokens` (the same run with "
        f"{P} real token ids in front of every row's text, after its left padding: the bare "
        f"model on a prompted row's positions), `promot` (the frozen P = {P} bank prompt) "
        f"and `promot, text logits only` (promot without the logits of the prompt positions, "
        f"which carry no loss: a measurement, not the package's path, see `text_logits_only`). "
        f"{pairs} lockstep rounds of one step per arm after {WARMUP} warm-up rounds, the order "
        f"alternating; "
        f"ratios of summed times with a 95% bootstrap interval over the steps. Positions per "
        f"step (padded, as the model runs them): promot runs {positions:.3f}x standard's "
        f"({real:.3f}x counting real tokens only).\n\n"
        + C.table(
            [
                "arm",
                "CPU s per step (median)",
                "/ standard, CPU (95% CI)",
                "/ standard, wall (95% CI)",
                "/ standard + P tokens, CPU (95% CI)",
            ],
            rows,
        )
    )
    if profile:
        body += (
            f"\n\nWhere the time goes (torch profiler, self CPU time per step over "
            f"{PROFILED_STEPS} steps of each arm, one run: no interval):\n\n{profile}"
        )
    target = C.Target(
        "25.7.promot-step-vs-positions",
        f"25.7 ProMoT step / standard step, decoder lab model, P = {P} (CPU; wanted: at most "
        f"the positions' ratio, {positions:.3f})",
        "<=",
        round(positions, 3),
        ratio,
    )
    overhead = C.Target(
        "25.7.promot-step-vs-bare-model",
        f"25.7 ProMoT step / the bare model's step on the same positions (standard + {P} "
        f"tokens), decoder lab model (CPU)",
        "<=",
        1.02,
        versus("promot", measured["standard + P tokens"], 1),
    )
    C.record(
        "stage2_decoder",
        "11. ProMoT's stage-2 step on the decoder-only lab model (issue 25, item 7)",
        body,
        machine,
        load,
        [target, overhead],
        command=".venv/bin/python benchmarks/stage2_decoder.py --profile",
    )


if __name__ == "__main__":
    main(sys.argv[1:])
