"""Stage 1: prompt tuning. The model is frozen; one soft prompt per task of the mixture.

All tasks train in one run, each row gathering its own task's prompt, so a prompt's gradient
comes only from its own rows. By default (``stage1.batching=task``) the rows are cut into
batches of one task and similar length: a mixture of short and long formats padded together
wastes about half of every batch (benchmarks/RESULTS.md, item 2). Each task is validated on
its own metric every ``eval_every`` steps and the best step's prompt (per task) goes to the
bank.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from multipromot.bank import BankEntry, PromptBank, describe_model
from multipromot.config import RunConfig, resolve_path
from multipromot.data.batches import batches_from_draws
from multipromot.data.collate import Collator
from multipromot.data.mixtures import load_mixture
from multipromot.data.sampler import MixtureSampler
from multipromot.errors import UserError
from multipromot.eval.generation import validate_tasks
from multipromot.models import is_encoder_decoder, load_model
from multipromot.soft_prompt import PromptedModel, init_prompts
from multipromot.train.common import MetricsLogger, Throughput, build_optimizer, lr_schedule

__all__ = ["train_prompts", "batch_stream", "format_record"]


@dataclass
class _Best:
    """The best validation result seen so far for one task."""

    value: float
    step: int
    metric: str
    prompt: torch.Tensor


def _better(new: float, old: float, higher_is_better: bool) -> bool:
    return new > old if higher_is_better else new < old


def train_prompts(cfg: RunConfig, *, progress: bool = True) -> list[BankEntry]:
    """Train one soft prompt per task of ``cfg.stage1.mixture`` and add them to the bank.

    Args:
        cfg: the run config (``model``, ``seed``, ``bank.dir``, ``stage1.*``, ``out_dir``).
        progress: show a progress bar.

    Returns:
        The new bank entries, one per task, in mixture order.

    Raises:
        UserError: a bad mixture, model or config value.
    """
    s1 = cfg.stage1
    torch.manual_seed(cfg.seed)
    model, tokenizer, model_path = load_model(cfg.model, seed=cfg.seed)
    mixture = load_mixture(resolve_path(cfg, s1.mixture))
    tasks = mixture.tasks
    decoder_only = not is_encoder_decoder(model)

    texts = None
    if s1.init == "text":
        texts = [s1.init_text or " ".join(t.answers or [t.name]) for t in tasks]
    prompts = init_prompts(
        model, tokenizer, len(tasks), s1.prompt_length, method=s1.init, texts=texts, seed=cfg.seed
    )
    prompted = PromptedModel(model, prompts, [t.name for t in tasks])
    prompted.set_trainable("prompt")
    model.eval()  # the model is frozen: no dropout noise on the prompt's gradient

    optimizer = build_optimizer([prompted.prompts], s1.optimizer, s1.lr, s1.weight_decay)
    scheduler = lr_schedule(optimizer, warmup_steps=s1.warmup_steps, total_steps=s1.steps)
    collator = Collator(
        tokenizer,
        decoder_only=decoder_only,
        max_input_length=s1.max_input_length,
        max_target_length=s1.max_target_length,
    )
    sampler = MixtureSampler(mixture, seed=cfg.seed)
    batches = batch_stream(tasks, sampler, collator, s1.batch_size, by_task=s1.batching == "task")

    out_dir = Path(cfg.out_dir) / "stage1"
    logger = MetricsLogger(out_dir)
    speed = Throughput()
    best: dict[str, _Best] = {}
    select = "score" if s1.select_by == "metric" else "loss"

    def validate(step: int) -> None:
        """Score every task; keep each task's best prompt so far (step 0 = the initial prompt)."""
        results = validate_tasks(
            prompted, tokenizer, tasks, collator, examples=s1.eval_examples,
            with_metric=select == "score",
        )  # fmt: skip
        logger.log({"stage": 1, "step": step, "validation": results})
        for i, task in enumerate(tasks):
            value = results[task.name][select]
            if task.name not in best or _better(value, best[task.name].value, select == "score"):
                name = task.metric if select == "score" else "loss"
                best[task.name] = _Best(value, step, name, prompted.prompts[i].detach().clone())

    validate(0)
    bar = tqdm(range(1, s1.steps + 1), desc="stage 1", disable=not progress, dynamic_ncols=True)
    for step in bar:
        batch = next(batches)
        loss = prompted(**batch).loss
        if not torch.isfinite(loss):
            raise UserError(
                f"non-finite loss ({loss.item()}) at step {step}; no prompt of this run was "
                "written to the bank (lower stage1.lr or check the data)",
                key="stage1",
            )
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        tokens_per_s = speed.update(int(batch["attention_mask"].sum()))
        if step % s1.log_every == 0 or step == s1.steps:
            bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_per_s:,.0f}")
            logger.log({"stage": 1, "step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                        "tokens_per_s": tokens_per_s}, step=step)  # fmt: skip
        if step % s1.eval_every == 0 or step == s1.steps:
            validate(step)
    logger.close()
    return _write_to_bank(cfg, tasks, best, model, model_path, s1)


def batch_stream(tasks, sampler, collator, batch_size: int, *, by_task: bool) -> Iterator[dict]:
    """Endless stage-1 batches, 0-shot. With ``by_task``, 32 batches' worth of rows are drawn
    at a time and cut into batches of one task and similar length (a frozen model's prompt gets
    its gradient from its own rows whatever shares the batch; the rows and the rates are the
    sampler's, only their order inside a window moves)."""
    rows = 32 * batch_size if by_task else batch_size
    while True:
        yield from batches_from_draws(
            tasks, sampler.take(rows), collator, batch_size=batch_size,
            order="task" if by_task else "drawn",
        )  # fmt: skip


def format_record(task) -> dict:
    """The bank entry's ``format``: what the router matches inputs against."""
    sig = task.template.signature
    return {
        "template": task.template.id,
        "answer_choices": task.answers,
        "signature": {"pieces": list(sig.pieces), "answers": sig.answers and list(sig.answers)},
    }


def _write_to_bank(cfg, tasks, best, model, model_path, s1) -> list[BankEntry]:
    bank = PromptBank(cfg.bank.dir)
    base = describe_model(model, name=model_path)
    entries = []
    for task in tasks:
        b = best[task.name]
        entries.append(
            bank.add(
                task.name,
                b.prompt,
                base_model=base,
                init=s1.init,
                format=format_record(task),
                stage1={
                    "steps": s1.steps,
                    "best_step": b.step,
                    "metric": b.metric,
                    "value": b.value,
                },
            )
        )
    return entries
