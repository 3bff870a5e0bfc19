"""Padding waste: stage-2 training steps with and without length grouping.

A realistic length mix (RTE, XSum and TriviaQA-like lengths, equal rates) goes through the same
stage-2 step (PromptedModel with frozen prompts, fwd + bwd + Adafactor on the model) cut into
micro-batches two ways:

- drawn order (no grouping);
- `batches.group_by_length` (key: characters), which is what `stage2.group_by_length=true`
  does: it sorts each step's rows (here the paper's global batch of 64, micro-batches of 8)
  before cutting them into micro-batches.

Reported: the share of padded positions (encoder incl. the P prompt positions, plus decoder),
non-pad text tokens/s (medians over interleaved repeats) and the loss per example, computed
with frozen weights for every example under each batching (it must not change).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common as C  # noqa: E402

SHAPE = "t5-tiny"
TASKS = ["rte", "xsum", "trivia_qa"]
P = 100
MICRO = 8
STEP = 64  # the paper's batch 64: one grouping window
STEPS = 2
MAX_IN, MAX_TGT = 512, 64
REPEATS = 6


def main() -> None:
    import torch
    import torch.nn.functional as F

    from multipromot.data.batches import group_by_length
    from multipromot.data.collate import Collator
    from multipromot.data.exemplars import build_item
    from multipromot.data.sampler import MixtureSampler
    from multipromot.soft_prompt import PromptedModel, init_prompts
    from multipromot.train.common import build_optimizer, token_loss

    machine, load = C.machine(), C.Load()
    tmp = Path(tempfile.mkdtemp(prefix="bench-padding-"))
    try:
        mix = C.load_tasks(C.write_mixture(tmp / "data", TASKS, train=400))
        for task in mix.tasks:
            task.examples("train")  # read the files before they go
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tok = C.tokenizer()
    model = C.t5_model(SHAPE, tok)
    prompts = init_prompts(model, tok, len(TASKS), P, method="vocab")
    prompted = PromptedModel(model, prompts, mix.task_names)
    prompted.set_trainable("model")
    collate = Collator(tok, decoder_only=False, max_input_length=MAX_IN, max_target_length=MAX_TGT)
    draws = MixtureSampler(mix, seed=0).take(STEPS * STEP)
    items = [
        build_item(mix.tasks[d.task_index], d.example_index, task_id=d.task_index) for d in draws
    ]

    def cut(window: int | None):
        if window is None:
            out = [items[i : i + MICRO] for i in range(0, len(items), MICRO)]
        else:
            out = group_by_length(items, MICRO, window=window)
        return [collate(b) for b in out]

    arms = {"none": cut(None), "step": cut(STEP)}
    real = sum(
        int(b["attention_mask"].sum()) + int((b["labels"] != -100).sum()) for b in arms["none"]
    )

    def positions(batches) -> int:
        return sum(
            b["attention_mask"].numel() + P * len(b["input_ids"]) + b["labels"].numel()
            for b in batches
        )

    optimizer = build_optimizer(
        [p for p in model.parameters() if p.requires_grad], "adafactor", 1e-3
    )

    def train(batches) -> dict:
        prompted.train()
        with C.Clock() as c:
            for b in batches:
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
        return {"s": c.s, "tok_per_s": real / c.s}

    @torch.no_grad()
    def per_example_loss(batches) -> list[float]:
        prompted.eval()
        losses = {}
        for b in batches:
            logits = prompted(**b).logits
            nll = F.cross_entropy(
                logits.transpose(1, 2), b["labels"], ignore_index=-100, reduction="none"
            )
            rows = (nll.sum(1) / (b["labels"] != -100).sum(1)).tolist()
            # identify a row by its tokens: the same example wherever it was batched
            for ids, mask, loss in zip(b["input_ids"], b["attention_mask"], rows, strict=True):
                losses[tuple(ids[mask.bool()].tolist())] = loss
        return [losses[k] for k in sorted(losses)]

    reference = per_example_loss(arms["none"])
    loss_diff = {
        name: max(abs(a - b) for a, b in zip(per_example_loss(bs), reference, strict=True))
        for name, bs in arms.items()
    }
    mean_loss = sum(reference) / len(reference)
    runs = C.interleaved({name: (lambda bs=bs: train(bs)) for name, bs in arms.items()}, REPEATS)

    load.stop()
    drawn = [r["s"] for r in runs["none"]]
    speed = {name: C.ratio(drawn, [r["s"] for r in res]) for name, res in runs.items()}
    rows = []
    for name, label in (
        ("none", "drawn order (stage 2 default)"),
        (
            "step",
            f"group_by_length within each step of {STEP} rows (stage2.group_by_length=true)",
        ),
    ):
        rows.append(
            [
                label,
                len(arms[name]),
                f"{1 - real / positions(arms[name]):.0%}",
                C.median([r["tok_per_s"] for r in runs[name]]).point,
                str(speed[name]),
                f"{loss_diff[name]:.1e}",
            ]
        )
    target = C.Target(
        "4.padding",
        "4. padding: non-pad tokens/s with group_by_length vs drawn order (wall)",
        ">=",
        1.5,
        speed["step"],
    )
    body = (
        f"Stage-2 step on a random-init T5 `{SHAPE}` shape ({C.T5_SHAPES[SHAPE]}, vocab 32,128), "
        f"full fine-tuning (Adafactor, label smoothing 0.1) with frozen prompts (P = {P}); "
        f"{len(items)} examples = {STEPS} steps of {STEP} rows in micro-batches of {MICRO}; "
        f"tasks {', '.join(TASKS)} at equal rates (input lengths ~63 / ~440 / ~19 tokens), "
        f"max input {MAX_IN} / target {MAX_TGT}. Padded share counts encoder positions "
        f"(with the prompt's) and decoder positions. Loss per example: frozen weights, each "
        f"example's mean token loss, max difference to drawn order over all {len(items)} "
        f"examples (mean loss {mean_loss:.3f}). {REPEATS} interleaved repeats; vs drawn order: "
        f"its time / this arm's over all repeats (the same real tokens), with a 95% bootstrap "
        f"interval over the repeats.\n\n"
        + C.table(
            [
                "batching",
                "micro-batches",
                "padded positions",
                "non-pad tokens/s (median)",
                "vs drawn order (95% CI)",
                "max loss diff per example",
            ],
            rows,
        )
    )
    C.record(
        "padding",
        "4. Padding waste with and without length grouping",
        body,
        machine,
        load,
        [target],
    )


if __name__ == "__main__":
    main()
