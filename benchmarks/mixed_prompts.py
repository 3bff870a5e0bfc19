"""Mixed-prompt batches against same-prompt batches: what serving many prompts in one batch costs.

Multi-adapter servers quote this figure (Punica: a batch of different adapters runs about as
fast as a batch of one; vLLM's multi-LoRA costs 8-24%). Here: the same rows, in the same
batches (so the same token count, position for position), generated twice: once with each
row's own bank prompt (8 different prompts per batch), once with every row on the first task's
prompt. For a seq2seq T5 (prompt in front of the encoder input, encoder in row groups) and a
decoder-only Llama (cached prompt prefixes, as ``generation.predict`` runs it). Target: mixed
>= 0.9x the same-prompt speed.

The two arms alternate batch by batch (order reversed every other repeat), ``--repeats`` times;
the ratio is same-prompt time / mixed time over all repeats with a 95% bootstrap interval over
the repeats. The mixed arm's tokens must equal those of the same rows generated one task at a
time (asserted), and each arm's tokens are the same in every repeat (asserted).

    .venv/bin/python benchmarks/mixed_prompts.py [--repeats 10]
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
P = 50
PER_TASK = 8
BATCH = 16
NEW_TOKENS = 16
MAX_IN = 256
REPEATS = 10


def family_runs(tmp: Path, decoder_only: bool, repeats: int) -> tuple[dict, int, int]:
    """(runs per arm, rows, real input tokens) for one model family."""
    import torch
    from inference_decoder import llama_model

    from multipromot.bank import PromptBank, describe_model
    from multipromot.data.collate import Collator
    from multipromot.features import item_chars
    from multipromot.models import load_model, save_model
    from multipromot.soft_prompt import PromptedModel, init_prompts

    tok = C.tokenizer()
    model_dir = tmp / "model"
    if decoder_only:
        save_model(llama_model(tok), tok, model_dir, name="bench-llama")
    else:
        C.save_bench_model(SHAPE, model_dir, embed_scale=0.3)
    mix = C.load_tasks(C.write_mixture(tmp / "data", C.PAPER8, validation=PER_TASK))
    names = mix.task_names
    model, tok, _ = load_model(str(model_dir))
    model.eval()
    bank = PromptBank(tmp / "bank")
    table = init_prompts(model, tok, len(names), P, method="vocab", seed=0)
    base = describe_model(model, name=str(model_dir))
    for name, prompt in zip(names, table, strict=True):
        bank.add(name, prompt, base_model=base)
    prompted = PromptedModel.from_bank(model, bank, names).eval()

    items = C.mixed_requests(mix, PER_TASK)
    collate = Collator(tok, decoder_only=decoder_only, max_input_length=MAX_IN, for_generation=True)
    by_len = sorted(range(len(items)), key=lambda i: item_chars(items[i]), reverse=True)
    batches = [by_len[i : i + BATCH] for i in range(0, len(items), BATCH)]
    gen = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)

    def generate(rows: list[int], same: bool) -> list[list[int]]:
        b = collate([items[i] for i in rows])
        task_ids = torch.zeros_like(b["task_ids"]) if same else b["task_ids"]
        return prompted.generate(
            b["input_ids"], b["attention_mask"], task_ids, prefix_cache=decoder_only, **gen
        ).tolist()

    arms = {
        "mixed": (lambda rows: generate(rows, False), batches),
        "same": (lambda rows: generate(rows, True), batches),
    }
    label = "decoder-only, " if decoder_only else "seq2seq, "
    runs = C.interleaved_batches(arms, len(items), repeats, label=label)
    for name in arms:  # each arm's tokens are the same in every repeat
        C.assert_same_outputs({name: runs[name]}, name)
    # The mixed batches' tokens equal one task at a time's.
    with torch.inference_mode():
        for t in range(len(names)):
            rows = [i for i in range(len(items)) if items[i].task_id == t]
            for i, out in zip(rows, generate(rows, False), strict=True):
                assert runs["mixed"][0]["out"][i] == out, f"row {i} differs from its task alone"
    real = sum(int(collate([items[i] for i in rows])["attention_mask"].sum()) for rows in batches)
    return runs, len(items), real


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args(argv)
    machine, load = C.machine(), C.Load()
    rows, targets = [], []
    for decoder_only in (False, True):
        tmp = Path(tempfile.mkdtemp(prefix="bench-mixed-"))
        try:
            runs, count, real = family_runs(tmp, decoder_only, args.repeats)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        family = "decoder-only Llama, cached prompts" if decoder_only else f"seq2seq T5 {SHAPE}"
        wall = C.ratio([r["s"] for r in runs["same"]], [r["s"] for r in runs["mixed"]])
        cpu = C.ratio([r["cpu"] for r in runs["same"]], [r["cpu"] for r in runs["mixed"]])
        rows.append(
            [
                family,
                f"{count} rows, {real:,} real input tokens",
                C.median([r["ex_per_s"] for r in runs["same"]]).point,
                C.median([r["ex_per_s"] for r in runs["mixed"]]).point,
                str(wall),
                str(cpu),
            ]
        )
        key = "decoder" if decoder_only else "seq2seq"
        targets.append(
            C.Target(
                f"10.mixed-vs-same-prompt-{key}",
                f"10. mixed vs same-prompt batches, {family} (wall)",
                ">=",
                0.9,
                wall,
            )
        )
    load.stop()
    body = (
        f"8 bank prompts (P = {P}) over the paper's 8 task formats, {PER_TASK} requests per task, "
        f"sorted by length into batches of {BATCH} (each batch mixes several tasks), greedy, "
        f"{NEW_TOKENS} new tokens per row; the same-prompt arm runs the very same batches with "
        f"every row on the first task's prompt. {args.repeats} repeats, the arms alternating "
        f"batch by batch; mixed / same: same-prompt time / mixed time over all repeats, 95% "
        f"bootstrap interval over the repeats. Mixed tokens equal one task at a time's "
        f"(asserted).\n\n"
        + C.table(
            [
                "model",
                "rows",
                "same prompt examples/s (median)",
                "mixed examples/s (median)",
                "mixed / same, wall (95% CI)",
                "mixed / same, CPU (95% CI)",
            ],
            rows,
        )
    )
    C.record(
        "mixed_prompts",
        "10. Mixed-prompt batches against same-prompt batches",
        body,
        machine,
        load,
        targets,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
