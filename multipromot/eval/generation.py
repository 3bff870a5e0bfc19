"""Generation: batched generation over rows that mix tasks and prompts, then the paper's metrics.

``predict`` is the one generation path (validation in both stages and the k-shot suites use it);
``validate_tasks`` scores each fine-tuned task on its validation split.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from multipromot.data.collate import Collator
from multipromot.data.exemplars import build_item
from multipromot.data.metrics import postprocess, score
from multipromot.features import IGNORE_INDEX, Item, item_chars

__all__ = ["predict", "validate_tasks"]


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def predict(
    prompted,
    tokenizer,
    items: Sequence[Item],
    collator: Collator,
    *,
    batch_size: int = 32,
    num_beams: int = 1,
    max_new_tokens: int = 32,
    prefix_cache: bool = True,
    progress: str | None = None,
) -> list[str]:
    """Generate one output string per item; items may mix task ids (and -1 = no prompt).

    Args:
        prompted: a :class:`~multipromot.soft_prompt.PromptedModel`.
        tokenizer: decodes the generated ids.
        items: rows to complete (targets are ignored).
        collator: a collator built with ``for_generation=True``.
        batch_size: rows per generate call.
        num_beams: 1 = greedy; the paper uses 4.
        max_new_tokens: generation budget per row.
        prefix_cache: decoder-only models reuse each task's prompt keys/values across rows
            and calls (``PromptedModel.generate(prefix_cache=True)``; same outputs as
            prepending, tests/test_prefix_cache.py); ignored for seq2seq models.
        progress: a label for a progress bar over the rows (shown on a terminal only, so
            logs and tests get none); None shows nothing.

    Returns:
        The decoded outputs, special tokens removed, in item order.
    """
    was_training = prompted.training
    prompted.eval()
    device = _device(prompted)
    use_cache = prefix_cache and not prompted.is_encoder_decoder
    # Rows of similar length share a batch: a mixed-task request stream padded in arrival
    # order is half padding (benchmarks/RESULTS.md, item 3). Each row's output does not depend
    # on its batch mates, and the outputs go back in item order.
    order = sorted(range(len(items)), key=lambda i: item_chars(items[i]), reverse=True)
    outputs: list[str] = [""] * len(items)
    # disable=None: tqdm shows the bar only when stderr is a terminal
    bar = tqdm(
        total=len(items),
        desc=progress,
        unit="row",
        disable=None if progress else True,
        dynamic_ncols=True,
        leave=False,
    )
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = _to(collator([items[i] for i in rows]), device)
        ids = prompted.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            task_ids=batch["task_ids"],
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            prefix_cache=use_cache,
        )
        texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
        for i, text in zip(rows, texts, strict=True):
            outputs[i] = text
        bar.update(len(rows))
    bar.close()
    prompted.train(was_training)
    return outputs


@torch.no_grad()
def validate_tasks(
    prompted,
    tokenizer,
    tasks: Sequence,
    collator: Collator,
    *,
    examples: int = 200,
    split: str = "validation",
    with_metric: bool = True,
    task_ids: Sequence[int] | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 32,
    shots: int = 0,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Teacher-forced loss and (optionally) the task metric per task, k-shot as trained.

    Args:
        prompted: the model with its prompt table.
        tokenizer: the model's tokenizer.
        tasks: the tasks, in prompt-table order.
        collator: the training collator (its settings are reused for generation).
        examples: the first N examples of each task's split are used.
        split: the split to score.
        with_metric: also generate and compute the task's metric (0-100).
        task_ids: prompt-table row per task (default: its position; -1 = no prompt).
        shots: same-task exemplars in front of each input (what the model is trained with).
        seed: the exemplar seed.

    Returns:
        ``{task: {"loss": float, "score": float (if with_metric), "n": int}}``
    """
    was_training = prompted.training
    prompted.eval()
    decoder_only = collator.decoder_only
    gen_collator = Collator(
        tokenizer,
        decoder_only=decoder_only,
        max_input_length=collator.max_input_length,
        max_target_length=collator.max_target_length,
        for_generation=True,
    )
    device = _device(prompted)
    results: dict[str, dict[str, float]] = {}
    for i, task in enumerate(tasks):
        row = i if task_ids is None else task_ids[i]
        count = min(examples, len(task.examples(split)))  # never reads a whole hub split
        items = [
            build_item(task, i, split=split, task_id=row, shots=shots, seed=seed)
            for i in range(count)
        ]
        total, count = 0.0, 0
        for start in range(0, len(items), batch_size):
            batch = _to(collator(items[start : start + batch_size]), device)
            n = (batch["labels"] != IGNORE_INDEX).sum()
            total += prompted(**batch).loss.item() * int(n)
            count += int(n)
        result = {"loss": total / max(count, 1), "n": len(items)}
        if with_metric:
            raw = predict(
                prompted,
                tokenizer,
                items,
                gen_collator,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
            )
            preds = [postprocess(text, task.postprocess) for text in raw]
            refs = [item.gold for item in items]
            result["score"] = score(task.metric, preds, refs)
        results[task.name] = result
    prompted.train(was_training)
    return results
