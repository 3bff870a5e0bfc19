"""Where many-task generation spends its time: the profile behind RESULTS.md sections 3 and 9.

Not part of `make bench` (about 12 minutes); its figures go to RESULTS.md's "profile" section.

Seq2seq: the t5-mini and the 64 tasks x 4 requests of inference_peft.py (P = 100).

1. Per-row CPU cost against batch size, on rows of similar length (the 64 requests nearest the
   median input): the encoder alone, and generate with 1 and with 16 new tokens (their
   difference is the 15 decoding steps), with the encoder on the whole batch at once and in
   row groups (``soft_prompt.PREFILL_POSITIONS``).
2. The regime's arms split into prefill (1 new token) and decoding: PEFT (per-task batches of
   4) and predict (sorted mixed batches of 32, the encoder whole or in row groups).
3. ``PREFILL_POSITIONS`` swept: predict's arm, prefill only (the budget changes nothing else).

Decoder-only: the Llama, requests and P = 50 prompts of inference_decoder.py.

4. What the row groups of the cached path buy, 16 new tokens (the text prefilled in groups
   or as one batch); and what fewer Python steps per token would buy: the cached inputs
   decoded by a hand-written greedy loop (one model call and an argmax per token; its tokens
   asserted equal to generate's; not in the package).

Every figure is a mean over ``--repeats`` interleaved repeats with a 95% bootstrap interval;
CPU time of this one-thread process.

    .venv/bin/python benchmarks/profile_generation.py [--parts 1,2,3,4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common as C  # noqa: E402

SHAPE = "t5-mini"
P_SEQ2SEQ = 100
P_DECODER = 50
NEW_TOKENS = 16
MAX_IN = 256
BATCH_SIZES = (4, 8, 16, 32, 64)
BUDGETS = (256, 512, 1024, 2048, 4096, None)
WHOLE = 10**9  # PREFILL_POSITIONS large enough for one group: the encoder on the whole batch


def _budget(value: int | None):
    """A context that sets soft_prompt.PREFILL_POSITIONS (None: leave it)."""
    import contextlib

    import multipromot.soft_prompt as soft_prompt

    @contextlib.contextmanager
    def scope():
        saved = soft_prompt.PREFILL_POSITIONS
        soft_prompt.PREFILL_POSITIONS = saved if value is None else value
        try:
            yield
        finally:
            soft_prompt.PREFILL_POSITIONS = saved

    return scope()


def cpu_per_row(calls: dict, repeats: int) -> dict:
    """Interleave ``calls`` (name -> (fn(), rows it covers)) ``repeats`` times, the order
    reversed every other repeat; mean CPU ms per row with its interval."""
    import torch

    samples: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(repeats):
        for name in calls if r % 2 == 0 else reversed(list(calls)):
            fn, rows = calls[name]
            c0 = time.process_time()
            with torch.inference_mode():
                fn()
            samples[name].append(1e3 * (time.process_time() - c0) / rows)
        print(f"  repeat {r + 1}/{repeats}", flush=True)
    return {name: C.mean(values) for name, values in samples.items()}


def seq2seq_setup(tmp: Path):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    from multipromot.bank import PromptBank
    from multipromot.data.collate import Collator
    from multipromot.models import load_model
    from multipromot.soft_prompt import PromptedModel

    model_dir = C.save_bench_model(SHAPE, tmp / "model", embed_scale=0.3)
    mix = C.load_tasks(C.write_mixture(tmp / "data", C.PAPER8, validation=4, copies=8))
    names = mix.task_names
    model, tok, _ = load_model(str(model_dir))
    bank = PromptBank(C.make_bank(model_dir, names, P_SEQ2SEQ, tmp / "bank"))
    prompted = PromptedModel.from_bank(model, bank, names).eval()
    peft = None
    for name in names:
        adapter = bank.export_peft(name, tmp / "peft" / name)
        if peft is None:
            base = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
            peft = PeftModel.from_pretrained(base, adapter, adapter_name=name)
        else:
            peft.load_adapter(adapter, adapter_name=name)
    peft.eval()
    items = C.mixed_requests(mix, 4)
    collate = Collator(tok, decoder_only=False, max_input_length=MAX_IN, for_generation=True)
    return prompted, peft, names, items, collate


def part1(prompted, items, collate, repeats: int) -> str:
    """Per-row cost against batch size on rows of similar length."""
    lengths = [int(collate([it])["attention_mask"].sum()) for it in items]
    middle = sorted(lengths)[len(lengths) // 2]
    rows = sorted(range(len(items)), key=lambda i: (abs(lengths[i] - middle), i))[:64]
    batches = {bs: [rows[i : i + bs] for i in range(0, len(rows), bs)] for bs in BATCH_SIZES}
    collated = {
        bs: [collate([items[i] for i in b]) for b in bs_batches]
        for bs, bs_batches in batches.items()
    }
    encoder = prompted.model.get_encoder()

    def encode(bs):
        for b in collated[bs]:
            inputs, _, _ = prompted._model_inputs(
                b["input_ids"], b["attention_mask"], b["task_ids"]
            )
            encoder(**inputs)

    def generate(bs, new, budget):
        with _budget(budget):
            for b in collated[bs]:
                prompted.generate(
                    b["input_ids"],
                    b["attention_mask"],
                    b["task_ids"],
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                )

    calls = {}
    for bs in BATCH_SIZES:
        calls[("encoder", bs, "whole")] = (lambda bs=bs: encode(bs), 64)
        for new in (1, NEW_TOKENS):
            for budget, label in ((WHOLE, "whole"), (None, "groups")):
                if label == "groups" and bs * (middle + P_SEQ2SEQ) <= prompted_budget():
                    continue  # one group anyway
                calls[(f"generate {new}", bs, label)] = (
                    lambda bs=bs, new=new, budget=budget: generate(bs, new, budget),
                    64,
                )
    # The longest requests (the XSum-like ones, cut at MAX_IN): the encoder alone per batch.
    longest = sorted(range(len(items)), key=lambda i: (-lengths[i], i))[:32]
    long_sizes = (4, 8, 16, 32)
    long_batches = {
        bs: [collate([items[i] for i in longest[s : s + bs]]) for s in range(0, 32, bs)]
        for bs in long_sizes
    }

    def encode_long(bs):
        for b in long_batches[bs]:
            inputs, _, _ = prompted._model_inputs(
                b["input_ids"], b["attention_mask"], b["task_ids"]
            )
            encoder(**inputs)

    for bs in long_sizes:
        calls[("long encoder", bs)] = (lambda bs=bs: encode_long(bs), 32)
    est = cpu_per_row(calls, repeats)
    long_rows = [[bs, str(est[("long encoder", bs)])] for bs in long_sizes]
    long_width = max(int(b["attention_mask"].shape[1]) for b in long_batches[32]) + P_SEQ2SEQ
    table_rows = []
    for bs in BATCH_SIZES:
        for label in ("whole", "groups"):
            one = est.get(("generate 1", bs, label))
            full = est.get((f"generate {NEW_TOKENS}", bs, label))
            if one is None:
                continue
            table_rows.append(
                [
                    bs,
                    "whole batch" if label == "whole" else "row groups",
                    str(est[("encoder", bs, "whole")]) if label == "whole" else "-",
                    str(one),
                    str(full),
                    f"{full.point - one.point:.1f}",
                ]
            )
    return (
        f"Rows of similar length: the 64 requests nearest the median input ({middle} tokens + "
        f"P = {P_SEQ2SEQ} prompt positions). CPU ms per row, mean of {repeats} repeats (95% "
        f"CI).\n\n"
        + C.table(
            [
                "batch",
                "encoder",
                "encoder alone",
                "generate, 1 token (prefill)",
                f"generate, {NEW_TOKENS} tokens",
                f"{NEW_TOKENS - 1} decoding steps (difference)",
            ],
            table_rows,
        )
        + f"\n\nThe 32 longest requests ({long_width} positions with the prompt): the encoder "
        f"alone, CPU ms per row, mean of {repeats} repeats (95% CI).\n\n"
        + C.table(["batch", "encoder alone"], long_rows)
    )


def prompted_budget() -> int:
    import multipromot.soft_prompt as soft_prompt

    return soft_prompt.PREFILL_POSITIONS


def regime_batches(items, names):
    from multipromot.features import item_chars

    by_len = sorted(range(len(items)), key=lambda i: item_chars(items[i]), reverse=True)
    sorted_batches = [by_len[i : i + 32] for i in range(0, len(items), 32)]
    per_task = [[i for i in range(len(items)) if items[i].task_id == t] for t in range(len(names))]
    return sorted_batches, per_task


def part2(prompted, peft, names, items, collate, repeats: int) -> str:
    """The 64 x 4 regime's arms split into prefill and decoding."""
    sorted_batches, per_task = regime_batches(items, names)
    ours = [collate([items[i] for i in b]) for b in sorted_batches]
    theirs = [(names[items[b[0]].task_id], collate([items[i] for i in b])) for b in per_task]

    def run_peft(new):
        for name, b in theirs:
            peft.set_adapter(name)
            peft.generate(
                input_ids=b["input_ids"],
                attention_mask=b["attention_mask"],
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
            )

    def run_ours(new, budget):
        with _budget(budget):
            for b in ours:
                prompted.generate(
                    b["input_ids"],
                    b["attention_mask"],
                    b["task_ids"],
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                )

    calls = {}
    for new in (1, NEW_TOKENS):
        calls[("peft", new)] = (lambda new=new: run_peft(new), len(items))
        calls[("groups", new)] = (lambda new=new: run_ours(new, None), len(items))
        calls[("whole", new)] = (lambda new=new: run_ours(new, WHOLE), len(items))
    est = cpu_per_row(calls, repeats)
    rows = []
    for arm, label in (
        ("peft", "PEFT, per-task batches of 4"),
        ("whole", "predict, batches of 32, encoder on the whole batch (before)"),
        ("groups", "predict, batches of 32, encoder in row groups (now)"),
    ):
        one, full = est[(arm, 1)], est[(arm, NEW_TOKENS)]
        rows.append([label, str(one), f"{full.point - one.point:.1f}", str(full)])
    return (
        f"The 64 x 4 regime's {len(items)} requests, CPU ms per row, mean of {repeats} repeats "
        f"(95% CI).\n\n"
        + C.table(
            [
                "arm",
                "prefill (generate, 1 token)",
                f"{NEW_TOKENS - 1} decoding steps (difference)",
                f"generate, {NEW_TOKENS} tokens",
            ],
            rows,
        )
    )


def part3(prompted, names, items, collate, repeats: int) -> str:
    """predict's prefill at each PREFILL_POSITIONS."""
    sorted_batches, _ = regime_batches(items, names)
    ours = [collate([items[i] for i in b]) for b in sorted_batches]

    def run(budget):
        with _budget(budget if budget is not None else WHOLE):
            for b in ours:
                prompted.generate(
                    b["input_ids"],
                    b["attention_mask"],
                    b["task_ids"],
                    max_new_tokens=1,
                    min_new_tokens=1,
                    do_sample=False,
                )

    est = cpu_per_row({b: (lambda b=b: run(b), len(items)) for b in BUDGETS}, repeats)
    rows = [[b if b is not None else "whole batch", str(est[b])] for b in BUDGETS]
    return (
        f"predict's prefill (generate, 1 token) on the 64 x 4 regime's sorted batches of 32, CPU "
        f"ms per row, mean of {repeats} repeats (95% CI).\n\n"
        + C.table(["PREFILL_POSITIONS", "prefill ms per row"], rows)
    )


def part4(tmp: Path, repeats: int) -> str:
    """The cached decoder path with and without its row groups, and decoded by hand."""
    import torch
    from inference_decoder import PER_TASK, llama_model

    import multipromot.soft_prompt as soft_prompt
    from multipromot.bank import PromptBank, describe_model
    from multipromot.data.collate import Collator
    from multipromot.features import item_chars
    from multipromot.models import load_model, save_model
    from multipromot.soft_prompt import PromptedModel, init_prompts

    tok = C.tokenizer()
    save_model(llama_model(tok), tok, tmp / "llama", name="bench-llama")
    mix = C.load_tasks(C.write_mixture(tmp / "ddata", C.PAPER8, validation=PER_TASK))
    names = mix.task_names
    model, tok, _ = load_model(str(tmp / "llama"))
    model.eval()
    bank = PromptBank(tmp / "dbank")
    table = init_prompts(model, tok, len(names), P_DECODER, method="vocab", seed=0)
    for name, prompt in zip(names, table, strict=True):
        bank.add(name, prompt, base_model=describe_model(model, name=str(tmp / "llama")))
    prompted = PromptedModel.from_bank(model, bank, names).eval()
    items = C.mixed_requests(mix, PER_TASK)
    collate = Collator(tok, decoder_only=True, max_input_length=MAX_IN, for_generation=True)
    by_len = sorted(range(len(items)), key=lambda i: item_chars(items[i]), reverse=True)
    mixed = [collate([items[i] for i in by_len[s : s + 16]]) for s in range(0, len(items), 16)]
    per_task = [collate([it for it in items if it.task_id == t]) for t in range(len(names))]

    def run(batches, cached, budget=None):
        with _budget(budget):
            for b in batches:
                prompted.generate(
                    b["input_ids"],
                    b["attention_mask"],
                    b["task_ids"],
                    prefix_cache=cached,
                    max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS,
                    do_sample=False,
                )

    def own_loop(batches) -> list:
        """The cached path's inputs, then greedy decoding by hand: one model call and an
        argmax per token, none of generate's per-step work (its logits processors, stopping
        criteria, input preparation). A measurement only: the package keeps generate."""
        out = []
        for b in batches:
            inputs = prompted._cached_inputs(
                b["input_ids"], b["attention_mask"], b["task_ids"], {"max_new_tokens": NEW_TOKENS}
            )
            key = next(
                k for k in inputs if k not in ("inputs_embeds", "attention_mask", "position_ids")
            )  # the cache's name
            cache, mask, positions = inputs[key], inputs["attention_mask"], inputs["position_ids"]
            done = cache.get_seq_length()
            logits = prompted.model(
                inputs_embeds=inputs["inputs_embeds"][:, done:],
                attention_mask=mask,
                position_ids=positions[:, done:],
                use_cache=True,
                **{key: cache},
            ).logits
            token, position, tokens = logits[:, -1].argmax(-1), positions[:, -1:], []
            for _ in range(NEW_TOKENS - 1):
                tokens.append(token)
                mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
                position = position + 1
                logits = prompted.model(
                    input_ids=token[:, None],
                    attention_mask=mask,
                    position_ids=position,
                    use_cache=True,
                    **{key: cache},
                ).logits
                token = logits[:, -1].argmax(-1)
            tokens.append(token)
            out.append(torch.stack(tokens, 1))
        return out

    with torch.inference_mode():  # the hand loop gives generate's very tokens
        for b, got in zip(mixed, own_loop(mixed), strict=True):
            ref = prompted.generate(
                b["input_ids"],
                b["attention_mask"],
                b["task_ids"],
                prefix_cache=True,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
            )
            assert torch.equal(got, ref), "the hand loop's tokens differ from generate's"

    copies = {"s": 0.0, "calls": 0}
    real_layers = soft_prompt._PrefixStore.layers

    def timed_layers(self, *args, **kwargs):
        c0 = time.process_time()
        try:
            return real_layers(self, *args, **kwargs)
        finally:
            copies["s"] += time.process_time() - c0
            copies["calls"] += 1

    calls = {
        "per-task": (lambda: run(per_task, False), len(items)),
        "cached": (lambda: run(mixed, True), len(items)),
        "one prefill for the batch (before)": (lambda: run(mixed, True, budget=WHOLE), len(items)),
        "cached, greedy by hand (not in the package)": (lambda: own_loop(mixed), len(items)),
    }
    run(mixed, True)  # the prefixes, built once
    soft_prompt._PrefixStore.layers = timed_layers
    try:
        est = cpu_per_row(calls, repeats)
    finally:
        soft_prompt._PrefixStore.layers = real_layers
    base = est["per-task"].point
    rows = [[name, str(e), f"{base / e.point:.2f}"] for name, e in est.items()]
    return (
        f"The decoder-only requests of section 9 (P = {P_DECODER}, batches of 16, {NEW_TOKENS} "
        f"new tokens), CPU ms per row, mean of {repeats} repeats (95% CI). Gathering each "
        f"row's prefix keys and values into the batch's cache (a copy per row) took "
        f"{1e3 * copies['s'] / max(copies['calls'], 1):.2f} ms per batch.\n\n"
        + C.table(["cached path", "ms per row", "per-task / this"], rows)
    )


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="1,2,3,4")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    parts = {int(p) for p in args.parts.split(",")}
    machine, load = C.machine(), C.Load()
    tmp = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    sections = []
    try:
        if parts & {1, 2, 3}:
            prompted, peft, names, items, collate = seq2seq_setup(tmp)
            if 1 in parts:
                sections.append(
                    (
                        "1. Per-row cost against batch size (seq2seq)",
                        part1(prompted, items, collate, args.repeats),
                    )
                )
            if 2 in parts:
                sections.append(
                    (
                        "2. The 64 x 4 regime's arms: prefill and decoding",
                        part2(prompted, peft, names, items, collate, args.repeats),
                    )
                )
            if 3 in parts:
                sections.append(
                    (
                        "3. Row-group budget (PREFILL_POSITIONS)",
                        part3(prompted, names, items, collate, args.repeats),
                    )
                )
        if 4 in parts:
            sections.append(("4. The decoder-only cached path", part4(tmp, args.repeats)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load.stop()
    body = "\n\n".join(f"**{title}.** {text}" for title, text in sections)
    C.record(
        "profile_generation",
        "12. Profile: where many-task generation spends its time",
        body,
        machine,
        load,
        command=f".venv/bin/python benchmarks/profile_generation.py --parts {args.parts}",
    )


if __name__ == "__main__":
    main(sys.argv[1:])
