"""Stage-2 overhead: a multipromot stage-2 training step against a plain PyTorch loop.

multipromot: `stage2.finetune(cfg)` in ProMoT mode (bank prompts frozen, P = 100 per row), one
process, on the paper's stage-2 mixture (RTE + WMT14 En-Fr formats, realistic lengths), batch
8, Adafactor lr 1e-3 (scaled by each weight's RMS), label smoothing 0.1, grad-norm clipping
1.0, dropout 0.1. Each step's time
is taken where the loop reports its throughput, so it covers everything the loop does per step:
sampling, exemplars, collation, prompt gathering, forward, loss, backward, clipping, optimizer,
scheduler, logging.

Plain: the same model loaded with `from_pretrained`, the same batches already collated (the
data path is free for it), with P extra real tokens in front of every input instead of a soft
prompt (same sequence lengths), the same loss, clipping and Adafactor; no framework at all.

The two loops run in lockstep in one process: after every multipromot step (from the loop's
throughput hook) one plain step runs, so both see the same machine load. The first step of
each is a warm-up and is dropped; the ratio is that of the median step times.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common as C  # noqa: E402

SHAPE = "t5-small"  # t5-base is ~4x the time per step: too slow for 2 shared cores
TASKS = ["rte", "wmt14_en_fr"]
P = 100
BATCH = 8
STEPS = 7
MAX_IN, MAX_TGT = 512, 128


class Lockstep(C.StepClock):
    """The stage-2 loop's throughput meter, used to run one plain step after every multipromot
    step, so the two alternate step by step under the same machine load. Records wall time and
    this process's CPU time per step (one thread: CPU time is the work done, without the time
    spent waiting for a core that other jobs hold)."""

    plain_step = None  # set by main: a callable that runs one plain step -> (wall s, cpu s)

    def __init__(self, window: int = 20):
        import time

        super().__init__(window)
        self.resumed = (self.start, time.process_time())
        self.ours: list[tuple[float, float]] = []
        self.plain: list[tuple[float, float]] = []

    def update(self, tokens: int) -> float:
        import time

        wall, cpu = self.resumed
        self.ours.append((time.perf_counter() - wall, time.process_time() - cpu))
        self.plain.append(Lockstep.plain_step())
        self.resumed = (time.perf_counter(), time.process_time())
        return 0.0


def plain_batches(mixture: Path, tok) -> list[dict]:
    """The batches the stage-2 run draws (same sampler, seed and collator), with P token ids
    standing in for the soft prompt."""
    import torch

    from multipromot.data.collate import Collator
    from multipromot.data.exemplars import build_item
    from multipromot.data.sampler import MixtureSampler

    mix = C.load_tasks(mixture)
    sampler = MixtureSampler(mix, seed=0)
    collate = Collator(tok, decoder_only=False, max_input_length=MAX_IN, max_target_length=MAX_TGT)
    batches = []
    for _ in range(STEPS):
        b = collate([build_item(mix.tasks[d.task_index], d.example_index, task_id=d.task_index)
                     for d in sampler.take(BATCH)])  # fmt: skip
        prompt = torch.arange(3, 3 + P).expand(BATCH, P)
        b["input_ids"] = torch.cat([prompt, b["input_ids"]], 1)
        b["attention_mask"] = torch.cat(
            [torch.ones(BATCH, P, dtype=torch.long), b["attention_mask"]], 1
        )
        del b["task_ids"]
        batches.append(b)
    return batches


def plain_loop(model_dir: Path, batches: list[dict]):
    """One step of the plain loop per call, over ``batches``; returns its time."""
    import time

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForSeq2SeqLM
    from transformers.optimization import Adafactor

    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    model.train()
    # stage 2's Adafactor: steps scaled by each weight's RMS (T5 fine-tuning)
    opt = Adafactor(model.parameters(), lr=1e-3, relative_step=False, scale_parameter=True,
                    warmup_init=False)  # fmt: skip
    pending = iter(batches)

    def step() -> tuple[float, float]:
        b = next(pending)
        t0, c0 = time.perf_counter(), time.process_time()
        labels = b["labels"]
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       decoder_input_ids=model._shift_right(labels)).logits  # fmt: skip
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                               label_smoothing=0.1)  # fmt: skip
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, time.process_time() - c0

    return step


def main() -> None:
    import multipromot.train.stage2 as stage2
    from multipromot.config import load_config
    from multipromot.models import save_model

    machine = C.machine()
    tmp = Path(tempfile.mkdtemp(prefix="bench-stage2-"))
    try:
        model_dir = tmp / "model"
        tok = C.tokenizer()
        model = C.t5_model(SHAPE, tok, dropout=0.1)
        save_model(model, tok, model_dir, name=f"bench-{SHAPE}")
        n_params = C.params_m(model)
        del model
        mixture = C.write_mixture(tmp / "data", TASKS, train=400)
        bank = C.make_bank(model_dir, TASKS, P, tmp / "bank")
        config = C.stage2_config(tmp / "config.yaml", model=model_dir, bank=bank,
                                 mixture=mixture, out=tmp / "out", steps=STEPS,
                                 batch_size=BATCH, max_input_length=MAX_IN,
                                 max_target_length=MAX_TGT)  # fmt: skip
        batches = plain_batches(mixture, tok)
        Lockstep.plain_step = plain_loop(model_dir, batches)
        stage2.Throughput = Lockstep
        stage2.finetune(load_config(str(config)), progress=False)
        clock = Lockstep.last
        for i, (ours, plain) in enumerate(zip(clock.ours, clock.plain, strict=True)):
            print(f"  step {i + 1}: multipromot {ours[0]:.3f} s (cpu {ours[1]:.3f}), "
                  f"plain {plain[0]:.3f} s (cpu {plain[1]:.3f})", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # the first step of each loop is a warm-up
    rows = []
    for k, what in ((1, "CPU time"), (0, "wall time")):
        ours = [t[k] for t in clock.ours[1:]]
        plain = [t[k] for t in clock.plain[1:]]
        pairs = sorted(o / p for o, p in zip(ours, plain, strict=True))
        rows.append([what, C.statistics.median(plain), C.statistics.median(ours),
                     C.statistics.median(pairs), f"{pairs[0]:.2f}-{pairs[-1]:.2f}"])  # fmt: skip
    positions = sum(b["attention_mask"].numel() + b["labels"].numel() for b in batches)
    positions /= len(batches)
    body = (
        f"Model: random-init T5 `{SHAPE}` shape ({n_params:.0f}M parameters; t5-base would be "
        f"~4x slower per step, too slow for this shared 2-core machine), dropout 0.1, batch "
        f"{BATCH} of the RTE + WMT14 En-Fr formats, P = {P} prompt positions per row "
        f"({positions:.0f} encoder + decoder positions per batch on average), Adafactor "
        f"lr 1e-3 scaled by each weight's RMS, label smoothing 0.1, clipping 1.0, fp32. The "
        f"loops run in lockstep, one "
        f"plain step after every multipromot step (a hook in the stage-2 loop's throughput "
        f"meter); {STEPS - 1} step pairs (warm-up step dropped). CPU time (one thread) is "
        f"the work each loop does; wall time also counts waiting for a core held by other "
        f"jobs.\n\n"
        + C.table(
            [
                "per step",
                "plain s (median)",
                "multipromot s (median)",
                "multipromot / plain (median of pairs)",
                "pair range",
            ],
            rows,
        )  # fmt: skip
    )
    C.record("stage2_overhead", "1. Stage-2 overhead against a plain loop", body, machine)


if __name__ == "__main__":
    main()
