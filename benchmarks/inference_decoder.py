"""Decoder-only mixed-task generation: cached bank prompts vs prepending them vs PEFT.

A random-init Llama-shaped model and 8 bank prompts (the paper's 8 task formats, their input
lengths) drive three arms over the same shuffled requests:

- ``peft``: PEFT 0.21.2 prompt tuning (the bank exported as CAUSAL_LM adapters), one adapter at a
  time, so its batches hold one task each. Under transformers 5.24 its decoder-only generate is
  not incremental: after the first step it feeds the whole input again every step (it detects
  the prefill through ``cache_position``, which transformers 5.4+ no longer passes), so it is
  slow and its tokens differ from the others' (counted in ``rows differ``);
- ``per-task``: what one adapter at a time costs when it works: ``PromptedModel`` (prepend path)
  on PEFT's per-task batches;
- ``prepend``: ``PromptedModel.generate`` on mixed batches in ``generation.predict``'s order
  (sorted by length), every row running its P prompt positions through the model;
- ``cached``: the same batches with ``prefix_cache=True``: each task's prompt keys/values are
  computed once and handed to ``generate`` as a cache (what ``predict`` now does by default).

The arms run batch by batch in turn, so they share the machine's load. Greedy, exactly
``NEW_TOKENS`` new tokens per row; the token outputs of every arm are compared with the
prepend arm's (mismatching rows are counted and reported, not hidden). Rerun at
``NEW_TOKENS = 1`` (prefill only) as the profile: the cache removes prompt work from the
prefill only; every decoding step still attends over the P prompt keys in all arms.
"""

from __future__ import annotations

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
REPEATS = 3


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


def main() -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from multipromot.bank import PromptBank, describe_model
    from multipromot.data.collate import Collator
    from multipromot.features import item_chars
    from multipromot.models import load_model, save_model
    from multipromot.soft_prompt import PromptedModel, init_prompts

    machine = C.machine()
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

                def peft_batch(rows, gen=gen, peft=peft):
                    peft.set_adapter(names[items[rows[0]].task_id])  # one task per batch
                    b = collate([items[i] for i in rows])
                    ids = peft.generate(
                        input_ids=b["input_ids"], attention_mask=b["attention_mask"], **gen
                    )
                    return ids[:, b["input_ids"].shape[1] :].tolist()  # the new tokens only

                arms = {
                    "peft": (peft_batch, per_task),
                    "per-task": (lambda rows: prompted_batch(rows, False), per_task),
                    "prepend": (lambda rows: prompted_batch(rows, False), mixed),
                    "cached": (lambda rows: prompted_batch(rows, True), mixed),
                }
                runs = C.interleaved_batches(arms, len(items), REPEATS)
                sections.append((p, new_tokens, runs, prompted._prefixes.builds))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for p, new_tokens, runs, builds in sections:
        reference = runs["prepend"][0]["out"]
        base = C.med(runs["prepend"], "ex_per_s")
        peft_rate = C.med(runs["peft"], "ex_per_s")
        per_task_rate = C.med(runs["per-task"], "ex_per_s")
        for name in ("peft", "per-task", "prepend", "cached"):
            differ = max(sum(r["out"][i] != reference[i] for i in reference) for r in runs[name])
            rate = C.med(runs[name], "ex_per_s")
            cpu = C.med(runs[name], "ex_per_cpu_s")
            rows.append(
                [
                    p,
                    new_tokens,
                    name,
                    rate,
                    rate / peft_rate,
                    rate / per_task_rate,
                    rate / base,
                    cpu,
                    differ,
                ]
            )
        assert builds >= 1, "the cached arm never built a prefix"
    body = (
        f"Model: random-init Llama ({SHAPE}, vocab {len(tok):,}), 8 bank prompts "
        f"(P = {' and '.join(map(str, PROMPT_LENGTHS))}), {len(items)} requests ({PER_TASK} per "
        f"task, the paper's 8 task formats and input lengths, shuffled; {real:,} real input "
        f"tokens), batch {BATCH} (PEFT: per-task batches of {min(PER_TASK, BATCH)}), max input "
        f"{MAX_IN} tokens, greedy. `new tokens` = 1 is the prefill alone (the profile). "
        f"Median of {REPEATS} repeats, batches interleaved across arms; `rows differ`: rows "
        f"whose tokens differ from the prepend arm's (worst repeat).\n\n"
        + C.table(
            [
                "P",
                "new tokens",
                "arm",
                "examples/s",
                "vs PEFT",
                "vs per-task",
                "vs prepend",
                "examples per CPU-s",
                "rows differ",
            ],
            rows,
        )
    )
    C.record(
        "inference_decoder", "9. Decoder-only generation with cached bank prompts", body, machine
    )


if __name__ == "__main__":
    main()
