"""Mixed-task inference: batched generation with a different bank prompt per row, against PEFT.

Two regimes: the paper's 8 tasks with 16 requests each (batch 16), and many tasks with few
requests each (64 tasks x 4, batch 32), where one adapter at a time can only form batches of 4.

The same bank prompts drive both sides: multipromot's `PromptedModel.from_bank` (every row
gathers its own prompt, so a batch can mix tasks) and PEFT 0.21.2 with the bank exported as
prompt-tuning adapters (`PromptBank.export_peft`, loaded with `PeftModel.from_pretrained` /
`load_adapter`; one adapter is active at a time, so its batches hold one task each). The
requests arrive shuffled across tasks; PEFT has to split them by task; multipromot's
`generation.predict` sorts them by length (`features.item_chars`: input and exemplars, targets
are empty at inference) and cuts batches that mix tasks. A third arm keeps them in arrival order
(what `predict` did before it sorted), to show what the sorting buys.

The arms run batch by batch in turn (PEFT batch 1, mixed batch 1, sorted batch 1, PEFT batch
2, ...), so they share the machine's load. Greedy decoding of exactly 16 new tokens per row
(a random-init model has no meaningful EOS);
the outputs of all arms must be identical, token for token (asserted).
"""

from __future__ import annotations

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
REPEATS = 3
# (label, copies of each of the paper's 8 formats, requests per task, batch): the paper's 8
# tasks with many requests each, and the many-tasks regime (64 tasks, 4 requests each) where
# one adapter at a time leaves PEFT with batches of 4.
REGIMES = [("8 tasks x 16 requests", 1, 16, 16), ("64 tasks x 4 requests", 8, 4, 32)]


def run_regime(tmp: Path, copies: int, per_task: int, batch: int) -> tuple[str, list[list]]:
    """One regime: (its description, its table rows); asserts identical outputs."""
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

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

    def prompted_batch(rows: list[int]) -> list[list[int]]:
        b = collate([items[i] for i in rows])
        return prompted.generate(b["input_ids"], b["attention_mask"], b["task_ids"], **gen).tolist()

    def peft_batch(rows: list[int]) -> list[list[int]]:
        peft.set_adapter(names[items[rows[0]].task_id])  # one task per batch
        b = collate([items[i] for i in rows])
        ids = peft.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], **gen)
        return ids[:, 1:].tolist()  # drop the decoder start token, as PromptedModel does

    arrival = [list(range(i, i + batch)) for i in range(0, len(items), batch)]
    # generation.predict's own order
    by_len = sorted(range(len(items)), key=lambda i: item_chars(items[i]), reverse=True)
    per_task_batches = [
        [i for i in range(len(items)) if items[i].task_id == t][s : s + batch]
        for t in range(len(names))
        for s in range(0, per_task, batch)
    ]
    arms = {
        "peft": (peft_batch, per_task_batches),
        "mixed": (prompted_batch, arrival),
        "mixed+sorted": (
            prompted_batch,
            [by_len[i : i + batch] for i in range(0, len(items), batch)],
        ),
    }
    padding = {name: positions(batches) for name, (_, batches) in arms.items()}
    runs = C.interleaved_batches(arms, len(items), REPEATS, label=f"{len(names)} tasks, ")

    reference = runs["peft"][0]["out"]
    for name, results in runs.items():
        for res in results:
            same = sum(res["out"][i] == reference[i] for i in reference)
            assert same == len(reference), f"{name}: {len(reference) - same} rows differ from PEFT"
    peft_rates = {k: C.med(runs["peft"], k) for k in ("ex_per_s", "ex_per_cpu_s")}
    rows = []
    for name, label in (
        ("peft", f"PEFT, one adapter at a time (per-task batches of <= {min(per_task, batch)})"),
        ("mixed+sorted", "multipromot `predict`: mixed batches sorted by length"),
        ("mixed", "multipromot, mixed batches in arrival order (before `predict` sorted)"),
    ):
        rate, cpu_rate = C.med(runs[name], "ex_per_s"), C.med(runs[name], "ex_per_cpu_s")
        total, real = padding[name]
        rows.append(
            [
                f"{len(names)} x {per_task}, batch {batch}",
                label,
                f"{1 - real / total:.0%}",
                rate,
                rate / peft_rates["ex_per_s"],
                cpu_rate,
                cpu_rate / peft_rates["ex_per_cpu_s"],
            ]
        )
    return f"{len(items)} requests over {len(names)} tasks", rows


def main() -> None:
    machine = C.machine()
    rows, described = [], []
    for _label, copies, per_task, batch in REGIMES:
        tmp = Path(tempfile.mkdtemp(prefix="bench-infer-"))
        try:
            what, regime_rows = run_regime(tmp, copies, per_task, batch)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        described.append(what)
        rows += regime_rows
    body = (
        f"Model: random-init T5 `{SHAPE}` shape ({C.T5_SHAPES[SHAPE]}, vocab 32,128), one bank "
        f"prompt per task (P = {P}), the paper's 8 task formats (in the many-tasks regime each "
        f"format is 8 tasks with their own data and prompt), requests shuffled across tasks: "
        f"{' and '.join(described)}. Max input {MAX_IN} tokens, greedy, {NEW_TOKENS} new "
        f"tokens per row. Outputs identical to PEFT's in every arm and repeat (asserted). "
        f"Median of {REPEATS} repeats, batches interleaved across arms; per CPU-s: per second "
        f"of this process's CPU time (one thread), less sensitive to the other jobs on the "
        f"machine.\n\n"
        + C.table(
            [
                "requests",
                "arm",
                "padded encoder positions",
                "examples/s",
                "vs PEFT",
                "examples per CPU-s",
                "vs PEFT",
            ],
            rows,
        )
    )
    C.record("inference_peft", "3. Mixed-task inference against PEFT", body, machine)


if __name__ == "__main__":
    main()
