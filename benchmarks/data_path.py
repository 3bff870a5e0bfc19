"""Data path: sampler + exemplars + collator against what a stage-2 step consumes.

The data path is `data.batches.batches_from_draws` (MixtureSampler -> build_item with 1-shot exemplars of
the same task -> Collator), over the paper's 8 task formats with realistic lengths. The
consumer is a stage-2 step of a t5-small-shaped model (PromptedModel, P = 100 frozen prompts,
fwd + bwd + Adafactor on the model, label smoothing 0.1). Both run in this one process, on one
thread each, interleaved; the ratio of their examples/s must be >= 20.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common as C  # noqa: E402

SHAPE = "t5-small"
P = 100
BATCH = 8
DATA_BATCHES = 40
MODEL_STEPS = 1
MAX_IN, MAX_TGT = 512, 128
REPEATS = 8


def main() -> None:
    from multipromot.data.batches import batches_from_draws
    from multipromot.data.collate import Collator
    from multipromot.data.sampler import MixtureSampler
    from multipromot.soft_prompt import PromptedModel, init_prompts
    from multipromot.train.common import build_optimizer, token_loss

    machine, load = C.machine(), C.Load()
    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    try:
        mix = C.load_tasks(C.write_mixture(tmp / "data", C.PAPER8, train=500, shots=1))
        for task in mix.tasks:
            task.examples("train")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tok = C.tokenizer()
    collate = Collator(tok, decoder_only=False, max_input_length=MAX_IN, max_target_length=MAX_TGT)
    sampler = MixtureSampler(mix, seed=0)

    def batches():  # what stage 2 builds each step: the mixture's 1-shot rows, collated
        while True:
            yield from batches_from_draws(
                mix.tasks,
                sampler.take(BATCH),
                collate,
                batch_size=BATCH,
                shots=mix.shots,
                seed=mix.exemplar_seed,
            )

    stream = batches()
    next(stream)  # first batch: lazy imports

    model = C.t5_model(SHAPE, tok)
    prompted = PromptedModel(model, init_prompts(model, tok, len(mix.tasks), P), mix.task_names)
    prompted.set_trainable("model")
    prompted.train()
    optimizer = build_optimizer(
        [p for p in model.parameters() if p.requires_grad], "adafactor", 1e-3
    )
    batches = [next(stream) for _ in range(MODEL_STEPS * REPEATS)]

    def data() -> dict:
        with C.Clock() as c:
            for _ in range(DATA_BATCHES):
                next(stream)
        return {"s_per_ex": c.s / (DATA_BATCHES * BATCH), "ex_per_s": DATA_BATCHES * BATCH / c.s}

    def step() -> dict:
        with C.Clock() as c:
            for _ in range(MODEL_STEPS):
                b = batches.pop()
                dec = model.prepare_decoder_input_ids_from_labels(labels=b["labels"])
                out = prompted(
                    b["input_ids"],
                    b["attention_mask"],
                    task_ids=b["task_ids"],
                    decoder_input_ids=dec,
                )
                loss, _ = token_loss(out.logits, b["labels"], label_smoothing=0.1)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return {"s_per_ex": c.s / (MODEL_STEPS * BATCH), "ex_per_s": MODEL_STEPS * BATCH / c.s}

    runs = C.interleaved({"data path": data, "stage-2 step": step}, REPEATS)
    load.stop()
    data_rate = C.median([r["ex_per_s"] for r in runs["data path"]])
    step_rate = C.median([r["ex_per_s"] for r in runs["stage-2 step"]])
    margin = C.ratio(
        [r["s_per_ex"] for r in runs["stage-2 step"]], [r["s_per_ex"] for r in runs["data path"]]
    )
    rows = [
        ["data path (sampler + 1-shot exemplars + collator)", str(data_rate)],
        [f"stage-2 step, {SHAPE} shape, batch {BATCH}", str(step_rate)],
    ]
    body = (
        f"8 paper task formats with realistic lengths, 1-shot exemplars, max input {MAX_IN} / "
        f"target {MAX_TGT}, word-level tokenizer (`tokenizers` backend); model: random-init T5 "
        f"`{SHAPE}` shape ({C.params_m(model):.0f}M parameters), P = {P}. {REPEATS} "
        f"interleaved repeats ({DATA_BATCHES} batches of data, {MODEL_STEPS} step per "
        f"repeat); rates: median with its 95% bootstrap interval; the ratio: the step's time "
        f"per example / the data path's, summed over the repeats, with its interval.\n\n"
        + C.table(["", "examples/s, median (95% CI)"], rows)
        + f"\n\n**Ratio: the data path produces {margin} times what the step consumes** "
        f"(target >= 20x). On one CPU thread it could feed a consumer of up to "
        f"{data_rate.point / 20:,.0f} examples/s with the 20x margin."
    )
    target = C.Target(
        "5.data-path", "5. data path vs a t5-small stage-2 step's consumption", ">=", 20, margin
    )
    C.record("data_path", "5. Data path against stage-2 consumption", body, machine, load, [target])


if __name__ == "__main__":
    main()
