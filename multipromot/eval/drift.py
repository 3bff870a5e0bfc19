"""Drift from the base model: how far an evaluated model's next-token distributions moved.

For a scored (task, shots) record, the first ``eval.drift_examples`` of its items are
teacher-forced through the evaluated model (each row with the prompt it was scored with: its
own prompt on a fine-tuned task, the router's choice on a suite task) and through the base
model (bare), on the item's input and its reference target. At every target position both
give a next-token distribution; the record's drift is

    KL(base || model) = sum_v p_base(v) log(p_base(v) / p_model(v)),

averaged over all target tokens of those items.

Why this direction: it is the forward KL that "RL's Razor" (Shenfeld et al., 2025) finds to
predict forgetting, E_x[KL(pi_0 || pi)] with pi_0 the base policy, measured on the new task.
It weighs each token by how likely the base model found it, so it grows when the tuned model
drops mass from what the base model would say (the in-context answers it can lose), rather
than when it puts mass on tokens the base model ignored. It is >= 0, and exactly 0 for a model
compared with itself.

Costs two teacher-forced forward passes per item (no generation): a few dozen items per task
keep it small next to the scoring.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from multipromot.data.collate import Collator
from multipromot.features import IGNORE_INDEX, Item

__all__ = ["DIRECTION", "kl_from_base", "record_drift"]

DIRECTION = "KL(base || model)"


@torch.no_grad()
def kl_from_base(
    prompted,
    base,
    tokenizer,
    items: Sequence[Item],
    *,
    decoder_only: bool,
    batch_size: int = 32,
    max_input_length: int = 512,
    max_target_length: int = 128,
) -> dict:
    """The mean KL(base || model) over the target tokens of ``items``.

    Args:
        prompted: the evaluated :class:`~multipromot.soft_prompt.PromptedModel`; each item
            gets the prompt row its ``task_id`` names (-1: none).
        base: the base model as a PromptedModel; it sees every row bare.
        tokenizer: the shared tokenizer.
        items: the rows, with their reference targets.
        decoder_only: the collator's layout.
        batch_size: rows per forward.
        max_input_length, max_target_length: the collator's budgets.

    Returns:
        ``{"kl": mean over target tokens (None without items), "items", "tokens"}``.
    """
    collator = Collator(
        tokenizer,
        decoder_only=decoder_only,
        max_input_length=max_input_length,
        max_target_length=max_target_length,
    )
    total, tokens = 0.0, 0
    was = prompted.training, base.training
    prompted.eval()
    base.eval()
    for start in range(0, len(items), batch_size):
        batch = collator(list(items[start : start + batch_size]))
        labels = batch["labels"]
        extra = {}
        if not decoder_only:  # teacher forcing: the decoder reads the reference
            extra["decoder_input_ids"] = prompted.model.prepare_decoder_input_ids_from_labels(
                labels=labels
            )
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        ids = batch["task_ids"]
        tuned = prompted(**_on({**inputs, "task_ids": ids, **extra}, prompted))
        bare = base(**_on({**inputs, **extra}, base), task_ids=None)
        logits_model, logits_base = tuned.logits.float().cpu(), bare.logits.float().cpu()
        if decoder_only:  # position t predicts token t + 1
            logits_model, logits_base = logits_model[:, :-1], logits_base[:, :-1]
            labels = labels[:, 1:]
        mask = labels.ne(IGNORE_INDEX)
        # float64: a KL near 0 is a difference of nearly equal sums; >= 0 up to rounding
        log_base = torch.log_softmax(logits_base[mask].double(), dim=-1)
        log_model = torch.log_softmax(logits_model[mask].double(), dim=-1)
        kl = (log_base.exp() * (log_base - log_model)).sum(dim=-1).clamp_min(0.0)
        total += float(kl.sum())
        tokens += int(mask.sum())
    prompted.train(was[0])
    base.train(was[1])
    return {"kl": total / tokens if tokens else None, "items": len(items), "tokens": tokens}


def _on(tensors: dict, module) -> dict:
    device = next(module.parameters()).device
    return {k: v.to(device) for k, v in tensors.items()}


def record_drift(
    record: dict,
    prompted,
    base,
    tokenizer,
    *,
    items: Sequence[Item],
    rows: dict[str, int],
    examples: int,
    decoder_only: bool,
    batch_size: int,
    max_input_length: int,
    max_target_length: int,
) -> dict:
    """The drift of one scored record: its first ``examples`` items (``items``, in the order
    scored), each with the prompt row it was scored with (the record's per-item ``prompt``)."""
    scored = record.get("items") or []
    chosen = list(items[:examples])
    for item, row in zip(chosen, scored, strict=False):
        item.task_id = rows.get(row.get("prompt"), -1) if row.get("prompt") else -1
    value = kl_from_base(
        prompted,
        base,
        tokenizer,
        chosen,
        decoder_only=decoder_only,
        batch_size=batch_size,
        max_input_length=max_input_length,
        max_target_length=max_target_length,
    )
    return {"direction": DIRECTION, **value}
