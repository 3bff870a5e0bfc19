"""Mixed-task inference: batched generation with a different bank prompt per row, against PEFT.

Two regimes: the paper's 8 tasks with 16 requests each (batch 16), and many tasks with few
requests each (64 tasks x 4, batch 32), where one adapter at a time can only form batches of 4.

The same bank prompts drive both sides: multipromot's `PromptedModel.from_bank` (every row
gathers its own prompt, so a batch can mix tasks) and PEFT 0.21.2 with the bank exported as
prompt-tuning adapters (`PromptBank.export_peft`, loaded with `PeftModel.from_pretrained` /
`load_adapter`; one adapter is active at a time, so its batches hold one task each). The
requests arrive shuffled across tasks; PEFT has to split them by task; multipromot's
`generation.predict` sorts them by length (`features.item_chars`: input and exemplars, targets
are empty at inference) and cuts batches that mix tasks; `PromptedModel.generate` runs the
encoder a group of rows at a time (`soft_prompt.PREFILL_POSITIONS`) and decodes the batch.
Extra arms show what each step buys: arrival order (before `predict` sorted, 8-task regime)
and the encoder on the whole batch at once (before the row groups, 64-task regime).

The arms run batch by batch in turn, the arm furthest behind next, so they share the machine's
load; repeated `--repeats` times. Greedy decoding of exactly 16 new tokens per row (a
random-init model has no meaningful EOS); the outputs of all arms must be identical, token for
token, in every repeat (asserted).

    .venv/bin/python benchmarks/inference_peft.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common as C  # noqa: E402

SHAPE = "t5-mini"
P = 100
NEW_TOKENS = 16
MAX_IN = 256
REPEATS = 5
# (label, copies of each of the paper's 8 formats, requests per task, batch, the extra arms):
# the paper's 8 tasks with many requests each, and the many-tasks regime (64 tasks, 4 requests
# each) where one adapter at a time leaves PEFT with batches of 4.
REGIMES = [
    ("8 tasks x 16 requests", 1, 16, 16, ("arrival",)),
    ("64 tasks x 4 requests", 8, 4, 32, ("one-encoder-call",)),
]
TARGETS = {
    # regime index -> (target key, what, threshold)
    0: ("3.mixed-vs-peft", "3. mixed-task generation vs PEFT, 8 tasks x 16 (wall)", 1.0),
    1: ("3b.many-tasks-vs-peft", "3b. many tasks, 64 x 4, batch 32, vs PEFT (wall)", 2.0),
}
LABELS = {
    "peft": "PEFT, one adapter at a time (per-task batches of <= {per_batch})",
    "predict": "multipromot `predict`: mixed batches sorted by length, encoder in row groups",
    "one-encoder-call": "the same batches, the encoder on the whole batch at once (before)",
    "arrival": "multipromot, mixed batches in arrival order (before `predict` sorted)",
}


def run_regime(
    tmp: Path, copies: int, per_task: int, batch: int, extra: tuple[str, ...], repeats: int
) -> tuple[str, dict, dict]:
    """One regime: (its description, runs per arm, padding per arm); asserts identical
    outputs."""
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    import multipromot.soft_prompt as soft_prompt
    from multipromot.bank import PromptBank
    from multipromot.data.collate import Collator
    from multipromot.features import item_chars
    from multipromot.models import load_model
    from multipromot.soft_prompt import PromptedModel

    model_dir = C.save_bench_model(SHAPE, tmp / "model", embed_scale=0.3)
    mix = C.load_tasks(C.write_mixture(tmp / "data", C.PAPER8, validation=per_task, copies=copies))
    names = mix.task_names
    model, tok, _ = load_model(str(model_dir))
    bank = PromptBank(C.make_bank(model_dir, names, P, tmp / "bank"))
    prompted = PromptedModel.from_bank(model, bank, names).eval()

    peft = None
    for name in names:
        adapter = bank.export_peft(name, tmp / "peft" / name)
        if peft is None:
            base_model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
            peft = PeftModel.from_pretrained(base_model, adapter, adapter_name=name)
        else:
            peft.load_adapter(adapter, adapter_name=name)
    peft.eval()

    items = C.mixed_requests(mix, per_task)  # requests arrive mixed
    collate = Collator(tok, decoder_only=False, max_input_length=MAX_IN, for_generation=True)
    gen = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1)

    def positions(batches: list[list[int]]) -> tuple[int, int]:
        """(encoder positions incl. the P prompt positions, of which real tokens)."""
        masks = [collate([items[i] for i in rows])["attention_mask"] for rows in batches]
        return sum(m.numel() + P * len(m) for m in masks), sum(
            int(m.sum()) + P * len(m) for m in masks
        )

    def prompted_batch(rows: list[int], budget: int | None = None) -> list[list[int]]:
        b = collate([items[i] for i in rows])
        saved = soft_prompt.PREFILL_POSITIONS
        soft_prompt.PREFILL_POSITIONS = budget or saved
        try:
            ids = prompted.generate(b["input_ids"], b["attention_mask"], b["task_ids"], **gen)
        finally:
            soft_prompt.PREFILL_POSITIONS = saved
        return ids.tolist()

    def peft_batch(rows: list[int]) -> list[list[int]]:
        peft.set_adapter(names[items[rows[0]].task_id])  # one task per batch
        b = collate([items[i] for i in rows])
        ids = peft.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], **gen)
        return ids[:, 1:].tolist()  # drop the decoder start token, as PromptedModel does

    arrival = [list(range(i, i + batch)) for i in range(0, len(items), batch)]
    # generation.predict's own order
    by_len = sorted(range(len(items)), key=lambda i: item_chars(items[i]), reverse=True)
    sorted_batches = [by_len[i : i + batch] for i in range(0, len(items), batch)]
    per_task_batches = [
        [i for i in range(len(items)) if items[i].task_id == t][s : s + batch]
        for t in range(len(names))
        for s in range(0, per_task, batch)
    ]
    arms = {"peft": (peft_batch, per_task_batches), "predict": (prompted_batch, sorted_batches)}
    if "one-encoder-call" in extra:
        arms["one-encoder-call"] = (lambda rows: prompted_batch(rows, 10**9), sorted_batches)
    if "arrival" in extra:
        arms["arrival"] = (prompted_batch, arrival)
    padding = {name: positions(batches) for name, (_, batches) in arms.items()}
    runs = C.interleaved_batches(arms, len(items), repeats, label=f"{len(names)} tasks, ")
    C.assert_same_outputs(runs, "peft")
    return f"{len(items)} requests over {len(names)} tasks", runs, padding


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args(argv)
    machine, load = C.machine(), C.Load()
    rows, described, targets = [], [], []
    for index, (_label, copies, per_task, batch, extra) in enumerate(REGIMES):
        tmp = Path(tempfile.mkdtemp(prefix="bench-infer-"))
        try:
            what, runs, padding = run_regime(tmp, copies, per_task, batch, extra, args.repeats)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        described.append(what)
        wall, cpu = C.speedups(runs, "peft", "s"), C.speedups(runs, "peft", "cpu")
        for name in runs:
            total, real = padding[name]
            rows.append(
                [
                    f"{copies * 8} x {per_task}, batch {batch}",
                    LABELS[name].format(per_batch=min(per_task, batch)),
                    f"{1 - real / total:.0%}",
                    C.median([r["ex_per_s"] for r in runs[name]]).point,
                    str(wall[name]),
                    str(cpu[name]),
                ]
            )
        key, what_target, threshold = TARGETS[index]
        targets.append(C.Target(key, what_target, ">=", threshold, wall["predict"]))
    load.stop()
    body = (
        f"Model: random-init T5 `{SHAPE}` shape ({C.T5_SHAPES[SHAPE]}, vocab 32,128), one bank "
        f"prompt per task (P = {P}), the paper's 8 task formats (in the many-tasks regime each "
        f"format is 8 tasks with their own data and prompt), requests shuffled across tasks: "
        f"{' and '.join(described)}. Max input {MAX_IN} tokens, greedy, {NEW_TOKENS} new "
        f"tokens per row. Outputs identical to PEFT's in every arm and repeat (asserted). "
        f"{args.repeats} repeats, batches interleaved across arms (the arm furthest behind "
        f"goes next). vs PEFT: PEFT's time / the arm's over all repeats (wall, and CPU time of "
        f"this one-thread process, which leaves out waiting for a core), 95% bootstrap "
        f"interval over the repeats.\n\n"
        + C.table(
            [
                "requests",
                "arm",
                "padded encoder positions",
                "examples/s (median)",
                "vs PEFT, wall (95% CI)",
                "vs PEFT, CPU (95% CI)",
            ],
            rows,
        )
    )
    C.record(
        "inference_peft",
        "3. Mixed-task inference against PEFT",
        body,
        machine,
        load,
        targets,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
