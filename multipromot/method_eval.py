"""Scoring one method of ``run`` (and one model folder for ``eval``): the fine-tuned tasks
0-shot with their prompt, the evaluation suite k-shot with routing.

Every method is evaluated with the prompts it was made with, never "the bank's current": the
bank versions stage 1 of this run wrote (``prompt_tuning``), or the versions its stage-2 model
records in ``final/stage2.json`` (:class:`~multipromot.train.stage2_export.Stage2Record`: the
bank it trained with, or the bank stored next to its weights for the kinds that store their
own prompts). results.json names them per record.
"""

from __future__ import annotations

from pathlib import Path

from multipromot.bank import PromptBank
from multipromot.config import RunConfig, bank_dir, model_seed, resolve_path
from multipromot.data.mixtures import load_mixture
from multipromot.errors import UserError
from multipromot.eval.drift import record_drift
from multipromot.eval.specialization import language_words
from multipromot.eval.suites import (
    EVAL_MAX_INPUT_LENGTH,
    build_items,
    evaluate_finetuned,
    evaluate_suite,
    load_suite,
)
from multipromot.methods import Method
from multipromot.models import load_model, model_fingerprint
from multipromot.router import calibrated_router, router_entries
from multipromot.router.base import RouterEntry
from multipromot.soft_prompt import PromptedModel
from multipromot.train import lora, wise
from multipromot.train.checkpoint import is_complete, load_checkpoint
from multipromot.train.stage2_export import Stage2Record
from multipromot.trained import prompt_table, recorded_prompts

__all__ = [
    "method_shots",
    "prompt_shots",
    "evaluate_method",
    "score_model",
    "prompt_source",
    "curve",
]


def prompt_source(
    method: Method, model_dir: Path, cfg: RunConfig, tasks: list[str], stage1_refs: dict
) -> tuple[str, dict[str, str], dict[str, str]] | None:
    """Where a method's prompts come from: (bank directory, task -> ref, task -> sha256), or
    None (no prompts).

    A stage-2 model says itself (:func:`multipromot.trained.recorded_prompts`: its
    :class:`Stage2Record`, content checked); prompt tuning uses this run's stage-1 refs.

    Raises:
        UserError: the record names no prompt for one of ``tasks``, its bank is gone or holds
            other content under its refs, or the folder holds the unchecksummed prompt table
            of an older multipromot.
    """
    if not method.uses_prompts:
        return None
    if not method.trains:
        bank = PromptBank(bank_dir(cfg))
        refs = {t: bank.get(stage1_refs.get(t) or t).ref for t in tasks}
        return str(bank.root), refs, bank.content(refs)
    return recorded_prompts(model_dir, tasks)


def method_shots(cfg: RunConfig, method: Method, mixture=None) -> int:
    """The exemplars in front of a method's fine-tuned examples, in stage 2 and when its
    fine-tuned tasks are scored: the label's ``+Kshot``, else ``stage2.shots``, else its
    mixture header's (WiSE-FT: its source's)."""
    made = method.made
    if made.shots is not None:
        return made.shots
    if cfg.stage2.shots >= 0:
        return cfg.stage2.shots
    return (mixture or load_mixture(made.mixture)).shots


def prompt_shots(cfg: RunConfig, method: Method) -> int | None:
    """The exemplars a method's bank prompts are tuned with: its own (:func:`method_shots`),
    or the label's ``~promptJshot`` (the ablation); None for a kind without bank prompts."""
    made = method.made
    if made.spec.prompts != "bank":
        return None
    return made.prompt_shots if made.prompt_shots is not None else method_shots(cfg, made)


def evaluate_method(
    cfg: RunConfig,
    method: Method,
    model_dir: str | Path,
    *,
    step: int,
    checkpoint: Path | None = None,
    selected: bool = True,
    stage1_refs: dict | None = None,
) -> list[dict]:
    """Score one method: fine-tuned tasks with their prompt and the exemplars the method was
    fine-tuned with, the suite k-shot with routing.

    Args:
        cfg: the run config (``eval.*``, ``bank.dir``).
        method: what to evaluate.
        model_dir: the model (and tokenizer) directory.
        step: the stage-2 step these weights come from.
        checkpoint: a stage-2 checkpoint whose weights (and prompts) replace ``model_dir``'s.
        selected: these are the weights the method reports (best-on-target), not a curve point.
        stage1_refs: task -> ref of this run's stage-1 prompts tuned with the method's
            exemplars (``prompt_tuning``).

    Returns:
        Flat records (see :mod:`multipromot.eval.report`) tagged with the method and step.
    """
    made = method.made  # WiSE-FT: evaluated as the method whose weights it holds
    spec = made.spec
    model_dir = Path(model_dir)
    model, tokenizer, _ = load_model(str(model_dir), seed=cfg.seed)
    model.eval()
    if method.alpha is not None:
        _interpolate(cfg, model, model_dir, method.alpha)
    mixture = load_mixture(method.mixture)
    tasks = mixture.task_names
    source = prompt_source(made, model_dir, cfg, tasks, stage1_refs or {})
    refs, content = (source[1], source[2]) if source is not None else ({}, {})
    if spec.adapters is not None:
        prompted = _adapted(cfg, made, model, model_dir, checkpoint, tasks)
    elif source is None:
        prompted = PromptedModel(model)
    else:
        bank = PromptBank(source[0])
        bank.check_definitions(refs, mixture.tasks)
        prompted = prompt_table(model, bank, tasks, refs)
    if checkpoint is not None and spec.adapters is None:
        load_checkpoint(checkpoint, model=prompted, restore_rng=False)
    rows, router = {}, None
    if spec.routed:  # each task's prompt or adapter on its rows, routed by format
        rows = {t: i for i, t in enumerate(tasks)}
        router = _router(cfg, mixture, source) if cfg.eval.router else None
    record = Stage2Record.read(model_dir) if made.trains else None
    shots, kept = (record.shots, record.shots_kept) if record else (0, {})
    label = method.label if selected else f"{method.label} (step {step})"
    records = score_model(
        cfg,
        prompted,
        tokenizer,
        mixture,
        rows=rows,
        router=router,
        progress=label,
        finetuned_shots=method_shots(cfg, method, mixture),
        base=_base(cfg, method, prompted) if cfg.eval.drift_examples else None,
    )
    for r in records:
        r.update(
            method=method.label,
            step=step,
            selected=selected,
            bank_refs=refs,
            bank_sha256=content,
            bank_dir=source[0] if source is not None else None,
            train_shots=shots,
            train_shots_kept=kept,
            prompt_shots=prompt_shots(cfg, method),
        )
        if record is not None and record.replay:  # general rows stage 2 mixed in
            r["train_replay"] = record.replay
        if record is not None and record.targets:  # sdft: what the rewrite did
            r["train_targets"] = {k: v for k, v in record.targets.items() if k != "folder"}
    return records


def _base(cfg: RunConfig, method: Method, prompted) -> PromptedModel:
    """The base model drift is measured from, bare: the model ``run`` starts from (a method
    that scores the base weights is compared with those same weights)."""
    if method.made.spec.weights == "base":
        return PromptedModel(prompted.model)
    model, _, _ = load_model(cfg.model, seed=model_seed(cfg))
    device = next(prompted.parameters()).device
    return PromptedModel(model.eval()).to(device)


def _router(cfg: RunConfig, mixture, source: tuple[str, dict] | None):
    """The one router builder (:func:`multipromot.router.calibrated_router`) over the method's
    prompts (``source``), or over its tasks' own formats for adapters without a bank."""
    others = load_suite(resolve_path(cfg, cfg.eval.suite)).resolved_tasks()
    if source is not None:
        entries = router_entries(PromptBank(source[0]), source[1])
    else:
        entries = [RouterEntry(t.name, t.template.signature) for t in mixture.tasks]
    return calibrated_router(entries, mixture.tasks, negatives=others, seed=cfg.seed)


def score_model(
    cfg: RunConfig,
    prompted,
    tokenizer,
    mixture,
    *,
    rows: dict[str, int],
    router=None,
    progress: str = "",
    finetuned_shots: int = 0,
    base=None,
) -> list[dict]:
    """The scores of one model: ``mixture``'s tasks with ``finetuned_shots`` exemplars (each
    with its row's prompt, if it has one) and the suite ``eval.suite`` k-shot, each input
    routed by ``router`` (or given no prompt). Records are tagged ``seen`` (a fine-tuned
    task) or not. With ``base`` (the base model, a PromptedModel) and ``eval.drift_examples``,
    each record also gets its ``drift`` from the base model (:mod:`multipromot.eval.drift`).
    Only the mixture's own tasks are scored as fine-tuned: its replay tasks are not."""
    ev = cfg.eval
    suite = load_suite(resolve_path(cfg, ev.suite))
    # Format specialization: outputs that fall in a fine-tuned classification task's label set.
    answers = sorted({a for t in mixture.tasks for a in (t.answers or [])})
    # ... and, after a generation task, outputs in its output language (eval/specialization.py)
    language = language_words(mixture.tasks) or None
    common = dict(
        decoder_only=not prompted.is_encoder_decoder,
        num_beams=ev.num_beams,
        batch_size=ev.batch_size,
        max_new_tokens=ev.max_new_tokens,
        progress=progress,
    )
    records = evaluate_finetuned(
        prompted,
        tokenizer,
        mixture.tasks,
        rows,
        examples=ev.examples,
        shots=finetuned_shots,
        seed=cfg.seed,
        **common,
    )
    for r in records:
        r["seen"] = True
    unseen = evaluate_suite(
        prompted,
        tokenizer,
        suite,
        shots=ev.shots or None,
        examples=ev.examples,
        router=router,
        prompt_rows=rows,
        specialization_answers=answers or None,
        language=language,
        seed=cfg.seed,
        **common,
    )
    for r in unseen:
        r["seen"] = False
    if base is not None and ev.drift_examples:
        count = min(ev.drift_examples, ev.examples)
        fine_tuned = {t.name: t for t in mixture.tasks}
        others = {t.name: t for t in suite.resolved_tasks()}
        for r in records + unseen:
            task = fine_tuned[r["task"]] if r["seen"] else others[r["task"]]
            split = "test" if r["seen"] else suite.split  # as evaluate_finetuned / _suite
            r["drift"] = record_drift(
                r,
                prompted,
                base,
                tokenizer,
                items=build_items(task, r["shots"], examples=count, split=split, seed=cfg.seed),
                rows=rows,
                examples=count,
                decoder_only=common["decoder_only"],
                batch_size=ev.batch_size,
                max_input_length=EVAL_MAX_INPUT_LENGTH,
                max_target_length=cfg.stage2.max_target_length,
            )
    return records + unseen


def _interpolate(cfg: RunConfig, model, final: Path, alpha: float) -> None:
    """WiSE-FT in place: ``model`` (loaded from ``final``) moves to ``(1 - alpha) * base +
    alpha * model``; the base must be the one ``final`` was fine-tuned from."""
    base, _, _ = load_model(cfg.model, seed=model_seed(cfg))
    made_from = Stage2Record.read(final).base_model.get("fingerprint")
    if made_from != model_fingerprint(base):
        raise UserError(
            f"was fine-tuned from another base model than {cfg.model!r} (fingerprint "
            f"{made_from}); WiSE-FT needs the same base",
            file=final,
        )
    wise.interpolate(model, base, alpha)


def _adapted(cfg: RunConfig, method: Method, model, final: Path, checkpoint, tasks: list[str]):
    """A LoRA kind's model for evaluation. ``per_task``: ``final``'s weights with the task
    adapters (a row gets its task's, or none); ``shared``: the merged weights of ``final``, or,
    for a checkpoint, its base with the adapter as trained at that step, merged."""
    if method.spec.adapters == "per_task":
        adapted = lora.load_adapters(model, final / lora.ADAPTERS_DIR, tasks)
        if checkpoint is not None:
            load_checkpoint(checkpoint, model=adapted, restore_rng=False)
        return adapted.eval()
    if checkpoint is None:
        return PromptedModel(model)
    base, _, _ = load_model(Stage2Record.read(final).base_model["name"], seed=cfg.seed)
    adapted = lora.load_adapters(base, final / lora.ADAPTERS_DIR, None)
    load_checkpoint(checkpoint, model=adapted, restore_rng=False)
    return PromptedModel(adapted.model.merge_and_unload().eval())


def curve(cfg: RunConfig, method: Method, method_dir: Path, final: Path, skip: int) -> list[dict]:
    """Evaluate every complete stage-2 checkpoint but step ``skip`` (the selected model, scored
    already): the curves over steps (paper Fig. 1/2)."""
    checkpoints = [p for p in (method_dir / "checkpoints").glob("step_*") if is_complete(p)]
    records = []
    for path in sorted(checkpoints, key=lambda p: int(p.name.split("_")[1])):
        step = int(path.name.split("_")[1])
        if step != skip:
            print(f"evaluating {method.label} at checkpoint step {step} (curve)")
            records += evaluate_method(
                cfg, method, final, step=step, checkpoint=path, selected=False
            )
    return records
