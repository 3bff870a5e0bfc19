"""Decoder-only mixed-task generation: cached bank prompts vs prepending them vs one task at a time.

A random-init Llama-shaped model and 8 bank prompts (the paper's 8 task formats, their input
lengths) drive these arms over the same shuffled requests:

- ``per-task``: one task at a time, as one adapter at a time serves it: ``PromptedModel``
  (prepend path) on per-task batches. The fair stand-in for PEFT: PEFT 0.21.2's own
  decoder-only generate under transformers 5.24 is not incremental (after the first step it
  feeds the whole input again every step; it detects the prefill through ``cache_position``,
  which transformers 5.4+ no longer passes), so it is slow and its tokens differ; it runs once,
  untimed, to count the rows that differ;
- ``prepend``: ``PromptedModel.generate`` on mixed batches in ``generation.predict``'s order
  (sorted by length), every row running its P prompt positions through the model;
- ``cached``: the same batches with ``prefix_cache=True`` (what ``predict`` does): each task's
  prompt keys/values computed once, the text prefilled in groups of rows of similar length;
- ``cached, before``: the cached path as it was before the row groups: the whole batch
  prefilled at once (``soft_prompt.PREFILL_POSITIONS`` large).

The arms run batch by batch in turn (the arm furthest behind next), so they share the machine's
load, ``--repeats`` times. Greedy, exactly ``NEW_TOKENS`` new tokens per row; every arm's tokens
must equal the prepend arm's in every repeat (asserted). Rerun at ``NEW_TOKENS = 1`` (prefill
only) as the profile.

    .venv/bin/python benchmarks/inference_decoder.py [--repeats 8]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common as C  # noqa: E402

SHAPE = dict(
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
)
PROMPT_LENGTHS = (50, 100)
PER_TASK = 8
BATCH = 16
NEW_TOKENS = 16
MAX_IN = 256
REPEATS = 8
ARMS = ("per-task", "prepend", "cached", "cached, before")


def llama_model(tok, seed: int = 0):
    """A random-init LlamaForCausalLM of SHAPE over the benchmark tokenizer (no download)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=2048,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
        **SHAPE,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args(argv)

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import multipromot.soft_prompt as soft_prompt
    from multipromot.bank import PromptBank, describe_model
    from multipromot.data.collate import Collator
    from multipromot.features import item_chars
    from multipromot.models import load_model, save_model
    from multipromot.soft_prompt import PromptedModel, init_prompts

    machine, load = C.machine(), C.Load()
    tmp = Path(tempfile.mkdtemp(prefix="bench-decoder-"))
    sections = []
    try:
        tok = C.tokenizer()
        model_dir = tmp / "model"
        save_model(llama_model(tok), tok, model_dir, name="bench-llama")
        mix = C.load_tasks(C.write_mixture(tmp / "data", C.PAPER8, validation=PER_TASK))
        names = mix.task_names
        model, tok, _ = load_model(str(model_dir))
        model.eval()
        items = C.mixed_requests(mix, PER_TASK)  # requests arrive mixed
        collate = Collator(tok, decoder_only=True, max_input_length=MAX_IN, for_generation=True)
        by_len = sorted(range(len(items)), key=lambda i: item_chars(items[i]), reverse=True)
        mixed = [by_len[i : i + BATCH] for i in range(0, len(items), BATCH)]
        per_task = [
            [i for i in range(len(items)) if items[i].task_id == t][s : s + BATCH]
            for t in range(len(names))
            for s in range(0, PER_TASK, BATCH)
        ]
        real = sum(int(collate([items[i] for i in rows])["attention_mask"].sum()) for rows in mixed)
        padded = sum(collate([items[i] for i in rows])["attention_mask"].numel() for rows in mixed)

        for p in PROMPT_LENGTHS:
            bank = PromptBank(tmp / f"bank{p}")
            table = init_prompts(model, tok, len(names), p, method="vocab", seed=0)
            base = describe_model(model, name=str(model_dir))
            for name, prompt in zip(names, table, strict=True):
                bank.add(name, prompt, base_model=base)
            prompted = PromptedModel.from_bank(model, bank, names).eval()
            peft = None
            for name in names:
                adapter = bank.export_peft(name, tmp / f"peft{p}" / name)
                if peft is None:
                    base_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
                    peft = PeftModel.from_pretrained(base_model, adapter, adapter_name=name)
                else:
                    peft.load_adapter(adapter, adapter_name=name)
            peft.eval()
            for new_tokens in (NEW_TOKENS, 1):
                gen = dict(
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    num_beams=1,
                )

                def prompted_batch(rows, cached, gen=gen, prompted=prompted):
                    b = collate([items[i] for i in rows])
                    return prompted.generate(
                        b["input_ids"],
                        b["attention_mask"],
                        b["task_ids"],
                        prefix_cache=cached,
                        **gen,
                    ).tolist()

                def before(rows, prompted_batch=prompted_batch):
                    """The cached path before the row groups: one prefill for the batch."""
                    budget = soft_prompt.PREFILL_POSITIONS
                    soft_prompt.PREFILL_POSITIONS = 10**9
                    try:
                        return prompted_batch(rows, True)
                    finally:
                        soft_prompt.PREFILL_POSITIONS = budget

                arms = {
                    "per-task": (lambda rows: prompted_batch(rows, False), per_task),
                    "prepend": (lambda rows: prompted_batch(rows, False), mixed),
                    "cached": (lambda rows: prompted_batch(rows, True), mixed),
                    "cached, before": (before, mixed),
                }
                runs = C.interleaved_batches(arms, len(items), args.repeats, label=f"P={p}, ")
                C.assert_same_outputs(runs, "prepend")
                peft_differ = None
                if new_tokens == NEW_TOKENS:  # PEFT once, untimed: how many rows differ
                    reference = runs["prepend"][0]["out"]
                    peft_differ = 0
                    for rows in per_task:
                        peft.set_adapter(names[items[rows[0]].task_id])
                        b = collate([items[i] for i in rows])
                        with torch.inference_mode():
                            ids = peft.generate(
                                input_ids=b["input_ids"], attention_mask=b["attention_mask"], **gen
                            )
                        new = ids[:, b["input_ids"].shape[1] :].tolist()
                        peft_differ += sum(
                            reference[i] != o for i, o in zip(rows, new, strict=True)
                        )
                sections.append((p, new_tokens, runs, peft_differ, prompted._prefixes.builds))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load.stop()

    rows, targets, peft_notes = [], [], []
    for p, new_tokens, runs, peft_differ, builds in sections:
        assert builds >= 1, "the cached arm never built a prefix"
        wall, cpu = C.speedups(runs, "per-task", "s"), C.speedups(runs, "per-task", "cpu")
        prepend = C.speedups(runs, "prepend", "s")
        for name in ARMS:
            rows.append(
                [
                    p,
                    new_tokens,
                    name,
                    C.median([r["ex_per_s"] for r in runs[name]]).point,
                    str(wall[name]),
                    str(cpu[name]),
                    str(prepend[name]),
                ]
            )
        if peft_differ is not None:
            peft_notes.append(f"{peft_differ} of {len(items)} rows at P = {p}")
        if p == 50 and new_tokens == NEW_TOKENS:
            targets.append(
                C.Target(
                    "9.decoder-cached-vs-per-task",
                    "9. decoder-only cached prompts vs one task at a time, P = 50 (wall)",
                    ">=",
                    1.5,
                    wall["cached"],
                )
            )
    body = (
        f"Model: random-init Llama ({SHAPE}, vocab {len(tok):,}), 8 bank prompts "
        f"(P = {' and '.join(map(str, PROMPT_LENGTHS))}), {len(items)} requests ({PER_TASK} per "
        f"task, the paper's 8 task formats and input lengths, shuffled; {real:,} real input "
        f"tokens, {padded:,} positions in the mixed batches), batch {BATCH} (one task at a "
        f"time: per-task batches of {min(PER_TASK, BATCH)}), max input {MAX_IN} tokens, greedy. "
        f"`new tokens` = 1 is the prefill alone (the profile). {args.repeats} repeats, batches "
        f"interleaved across arms; speed-ups are the other arm's time / this arm's over all "
        f"repeats, with 95% bootstrap intervals over the repeats. Every arm's tokens equal the "
        f"prepend arm's in every repeat (asserted). PEFT's own generate (one untimed pass; see "
        f"the module docstring) differs from them in {', '.join(peft_notes)}.\n\n"
        + C.table(
            [
                "P",
                "new tokens",
                "arm",
                "examples/s (median)",
                "vs per-task, wall (95% CI)",
                "vs per-task, CPU (95% CI)",
                "vs prepend, wall (95% CI)",
            ],
            rows,
        )
    )
    C.record(
        "inference_decoder",
        "9. Decoder-only generation with cached bank prompts",
        body,
        machine,
        load,
        targets,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
