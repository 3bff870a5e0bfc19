"""`multipromot run`: stage 1 -> stage 2 per method -> evaluation -> report, resumable.

The methods (``methods`` of the config) are labels of :mod:`multipromot.methods`' grammar:
the paper's ``pretrained``, ``prompt_tuning``, ``standard``, ``promot``, ``joint``,
``random_prompt``; the baselines beyond it ``promot_lora`` (a LoRA adapter per task instead of
a prompt; train/stage1_lora.py, train/lora.py), ``lora``, ``hft`` (train/hft.py) and
``wiseA:LABEL`` (WiSE-FT of a listed method's weights, no training; train/wise.py); with
``+Kshot`` and ``@mixture``. Shots precedence (:func:`multipromot.train.stage2.resolve_shots`):
the label's ``+Kshot``, else ``stage2.shots``, else the mixture header's ``exemplars.shots``.

Every method is evaluated with the prompts it was made with, never "the bank's current": the
bank versions stage 1 of this run wrote (``prompt_tuning``), the versions stage 2 recorded in
``final/stage2.json`` (``promot``, ``joint``'s starting point), or the table stage 2 stored next
to the weights (``joint``, ``random_prompt``); results.json names them per record.

Every finished piece leaves a file behind (the bank entries, ``methods/<m>/final``,
``methods/<m>/eval.json``), so running the same command again after a crash skips what is done
and resumes stages 1 and 2 from their latest checkpoints.

Each piece also records what it was made from (``made_from``: the model, the seed, the config
keys that change it, the bank refs and a fingerprint of the data): ``stage1.json``,
``methods/<m>/made_from.json`` (stage 2's checkpoints and ``final``) and ``methods/<m>/eval.json``.
A piece is reused only when its record equals the one the current config gives; otherwise
``reuse: redo`` (the default) does that piece again and ``reuse: strict`` stops with one line
naming what changed. report.md says per method what was reused.

Why one module of this size (~560 lines): what each method is made from, the reuse decision
and how each method is evaluated all read one :class:`~multipromot.methods.Method`, and ``run``
walks them in order.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import asdict
from pathlib import Path

from multipromot.bank import PromptBank
from multipromot.bank.entry import parse_ref
from multipromot.config import RunConfig, resolve_path
from multipromot.data.mixtures import load_mixture, mixture_fingerprint, tasks_fingerprint
from multipromot.data.tasks import get_task
from multipromot.errors import UserError
from multipromot.eval.report import terminal_summary, write_report
from multipromot.eval.suites import evaluate_finetuned, evaluate_suite, load_suite
from multipromot.fsio import write_json
from multipromot.methods import LORA_KINDS, STAGE1_KINDS, Method, parse_method
from multipromot.models import is_encoder_decoder, load_model, model_fingerprint, read_lineage
from multipromot.preflight import preflight
from multipromot.router import Router, calibrated_router
from multipromot.router.base import RouterEntry
from multipromot.soft_prompt import PromptedModel
from multipromot.train import lora, stage1_lora, stage2, wise
from multipromot.train.checkpoint import is_complete, load_checkpoint
from multipromot.train.common import read_losses
from multipromot.train.stage1 import made_from as stage1_made_from
from multipromot.train.stage1 import train_prompts

__all__ = [
    "preflight",  # re-exported from multipromot.preflight
    "run_experiment",
    "run_eval",
    "evaluate_method",
]


def _stage1(cfg: RunConfig, out: Path) -> dict[str, str]:
    """Prompt-tune the stage-1 mixture unless this run already did from the same settings;
    returns task -> bank ref of this run's stage-1 prompts."""
    done = out / "stage1.json"
    record = stage1_made_from(cfg)
    if done.exists():
        saved = _read_json(done)
        refs = saved.get("entries") if isinstance(saved, dict) else None
        changed = _changes(saved.get("made_from") if isinstance(saved, dict) else None, record)
        bank = PromptBank(cfg.bank.dir)
        if not changed and isinstance(refs, list) and all(_exists(bank, r) for r in refs):
            print(f"stage 1: reusing {', '.join(refs)}")
            return {parse_ref(ref)[0]: ref for ref in refs}
        _stale(cfg, done, "stage 1", changed or "its bank entries are missing")
    entries = train_prompts(cfg)
    write_json(done, {"entries": [e.ref for e in entries], "made_from": record})
    for e in entries:
        s1 = e.meta.get("stage1", {})
        print(
            f"stage 1: {e.ref}: {s1.get('metric')} {s1.get('value', float('nan')):.4g} "
            f"at step {s1.get('best_step')}"
        )
    return {e.task: e.ref for e in entries}


def _stage1_lora(cfg: RunConfig, out: Path) -> dict:
    """promot_lora's stage 1 (one adapter per task) unless this run already did it from the same
    settings; returns what its stage 2 records: the record and the adapters' files."""
    done = out / "stage1_lora.json"
    record = stage1_lora.made_from(cfg)
    folder = out / stage1_lora.ADAPTERS_FOLDER / "adapters"
    if done.exists():
        saved = _read_json(done)
        changed = _changes(saved.get("made_from") if isinstance(saved, dict) else None, record)
        files = saved.get("files") if isinstance(saved, dict) else None
        if not changed and folder.is_dir() and files == stage1_lora.adapters_fingerprint(folder):
            print(f"stage 1 (lora): reusing {folder}")
            return {"folder": str(folder), "made_from": record, "files": files}
        _stale(cfg, done, "stage 1 (lora)", changed or "its adapter files changed or are missing")
    folder, best = stage1_lora.train_adapters(cfg)
    files = stage1_lora.adapters_fingerprint(folder)
    write_json(done, {"made_from": record, "files": files, "best": best})
    for task, b in best.items():
        print(f"stage 1 (lora): {task}: {b['metric']} {b['value']:.4g} at step {b['best_step']}")
    return {"folder": str(folder), "made_from": record, "files": files}


def _read_json(path: Path):
    """A run folder's JSON record, or None when it is truncated or not JSON (it is redone)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        flat = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _changes(old, new: dict) -> str:
    """What differs between a stored ``made_from`` record and the current one, in words ("" when
    equal)."""
    if old is None:
        return "no record of what it was made from (unreadable, or from an older multipromot)"
    if old == new:
        return ""
    a, b = _flatten(old), _flatten(new)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    shown = []
    for key in keys[:3]:
        if key == "data" or key.endswith(".data") or "fingerprint" in key or "tasks" in key:
            shown.append(f"{key} (the data files, templates or rates)")
        else:
            shown.append(f"{key} {a.get(key, '(unset)')!r} -> {b.get(key, '(unset)')!r}")
    more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
    return ", ".join(shown) + more


def _stale(cfg: RunConfig, path: Path, what: str, changed: str) -> None:
    """A stored piece does not match the config: stop (``reuse=strict``) or say it is redone."""
    if cfg.reuse == "strict":
        raise UserError(
            f"was made from other settings: {changed}; use another out_dir, or reuse=redo to "
            "redo it",
            file=path,
            key="reuse",
        )
    print(f"{what}: made from other settings ({changed}); doing it again")


def _exists(bank: PromptBank, ref: str) -> bool:
    try:
        bank.get(ref)
    except UserError:
        return False
    return True


def _method_config(cfg: RunConfig, method: Method, method_dir: Path) -> RunConfig:
    """The config stage 2 runs with for one method."""
    sub = copy.deepcopy(cfg)
    sub.out_dir = str(method_dir)
    sub.stage2.mode = method.kind  # the trained kinds are exactly the stage-2 modes
    sub.stage2.mixture = method.mixture
    if method.kind == "promot_lora":  # this run's stage-1 adapters
        sub.lora.adapters = str(Path(cfg.out_dir) / stage1_lora.ADAPTERS_FOLDER / "adapters")
    if method.shots is not None:  # the label's +Kshot wins over stage2.shots and the mixture
        sub.stage2.shots = method.shots
    return sub


# stage2.* keys that do not change the trained model
_NOT_RESULT_STAGE2 = ("log_every", "resume")


def _current_refs(cfg: RunConfig, tasks: list[str], stage1_refs: dict) -> dict:
    """The bank refs a method's prompts come from now: this run's stage 1, else the bank's
    current entry (what stage 2 reads)."""
    bank = PromptBank(cfg.bank.dir)
    refs = {}
    for task in tasks:
        try:
            refs[task] = stage1_refs.get(task) or bank.get(task).ref
        except UserError:
            refs[task] = None  # stage 2 or the evaluation will say so
    return refs


def _train_record(
    cfg: RunConfig,
    method: Method,
    method_dir: Path,
    stage1_refs: dict,
    adapters: dict | None = None,
) -> dict:
    """What a method's stage-2 model is made from (see the module docstring); ``adapters``:
    promot_lora's stage-1 adapters (their record and files)."""
    s2 = asdict(_method_config(cfg, method, method_dir).stage2)
    for key in _NOT_RESULT_STAGE2:
        s2.pop(key)
    mixture = load_mixture(method.mixture)
    record = {
        "model": cfg.model,
        "seed": cfg.seed,
        "stage2": s2,
        "data": mixture_fingerprint(mixture),
    }
    if method.kind in ("promot", "joint"):  # they start from the bank's prompts
        record["bank_dir"] = str(Path(cfg.bank.dir).resolve())
        record["bank_refs"] = _current_refs(cfg, mixture.task_names, stage1_refs)
    if method.kind in LORA_KINDS:
        record["lora"] = lora.settings(cfg.lora)
    if method.kind == "promot_lora":
        record["adapters"] = {"made_from": adapters["made_from"], "files": adapters["files"]}
    if method.kind == "hft":
        record["hft"] = asdict(cfg.hft)
    return record


def _wise_record(cfg: RunConfig, method: Method, out: Path, stage1_refs: dict) -> dict:
    """WiSE-FT's model: the source method's final weights (made, or reused when their record
    matches, exactly as the source's own row), named by path, step and fingerprint."""
    source_dir = out / "methods" / method.source.label
    source_dir.mkdir(parents=True, exist_ok=True)
    made_from = _train_record(cfg, method.source, source_dir, stage1_refs)
    final, _ = _stage2(cfg, method.source, source_dir, made_from)
    return {
        "alpha": method.alpha,
        "source": method.source.label,
        "weights": str(final.resolve()),
        "step": _final_step(final, cfg.stage2.steps),
        "fingerprint": read_lineage(final).get("fingerprint"),
        "source_made_from": made_from,
    }


def _eval_record(cfg: RunConfig, method: Method, trained: dict | None, stage1_refs: dict) -> dict:
    """What a method's scores are made from: its model (``trained``, or the base model), the
    ``eval.*`` settings, the suite's and the fine-tuned tasks' data, and its prompts."""
    mixture = load_mixture(method.mixture)
    suite_path = resolve_path(cfg, cfg.eval.suite)
    suite = load_suite(suite_path)
    record = {
        "trained": trained,
        "model": cfg.model,
        "seed": cfg.seed,
        "eval": asdict(cfg.eval),
        "suite": {
            "file": str(Path(suite_path).resolve()),
            "shots": list(suite.shots),
            "examples": suite.examples,
            "split": suite.split,
            "tasks": tasks_fingerprint([get_task(n) for n in suite.task_names]),
        },
        "data": mixture_fingerprint(mixture),
    }
    if method.kind == "prompt_tuning":
        record["bank_dir"] = str(Path(cfg.bank.dir).resolve())
        record["bank_refs"] = _current_refs(cfg, mixture.task_names, stage1_refs)
    return record


def _stage2(cfg: RunConfig, method: Method, method_dir: Path, record: dict) -> tuple[Path, bool]:
    """Fine-tune for one method (resuming a killed run made from the same settings); returns its
    final model directory and whether it was reused as it was."""
    final = method_dir / "final"
    made_from = method_dir / "made_from.json"
    if (final / "multipromot.json").is_file() and _read_json(made_from) == record:
        return final, True
    if made_from.exists() or final.exists() or (method_dir / "checkpoints").exists():
        changed = _changes(_read_json(made_from), record)
        if changed:  # another config's model or checkpoints: none of it may be reused
            _stale(cfg, made_from, f"stage 2 {method.label}", changed)
            shutil.rmtree(method_dir)
            method_dir.mkdir(parents=True)
    write_json(made_from, record)
    print(f"stage 2: {method.label}")
    stage2.finetune(_method_config(cfg, method, method_dir))
    return final, False


def prompt_refs(
    method: Method, model_dir: Path, cfg: RunConfig, tasks: list[str], stage1_refs: dict
) -> tuple[str, dict[str, str]] | None:
    """Where a method's prompts come from: (bank directory, task -> ref), or None (no prompts).

    A stage-2 model says itself (``stage2.json``: the refs it trained with, or the bank stored
    next to its weights); prompt tuning uses this run's stage-1 refs, or the current entries
    when evaluating a model without a record (``multipromot eval`` of a base model).
    """
    if not method.uses_prompts:
        return None
    info_path = model_dir / "stage2.json"
    info = _read_record(info_path) if method.trains or info_path.is_file() else {}
    if info.get("bank_refs") or method.trains:
        if (model_dir / "prompts.safetensors").is_file():
            raise UserError(
                "holds prompts.safetensors, the unchecksummed prompt table of an older "
                "multipromot; run stage 2 of this method again to store it as a bank",
                file=model_dir,
            )
        bank_dir = Path(info.get("bank_dir") or cfg.bank.dir)
        if not bank_dir.is_absolute():
            bank_dir = model_dir / bank_dir
        refs = info.get("bank_refs") or {}
        missing = sorted(set(tasks) - set(refs))
        if missing:
            raise UserError(f"records no prompt for {', '.join(missing)}", file=info_path)
        return str(bank_dir), {t: refs[t] for t in tasks}
    bank = PromptBank(cfg.bank.dir)
    return cfg.bank.dir, {t: stage1_refs.get(t) or bank.get(t).ref for t in tasks}


def _read_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError("missing: not a stage-2 model directory", file=path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"not valid JSON ({e})", file=path) from None


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
    """Score one method: fine-tuned tasks 0-shot with their prompt, the suite k-shot with routing.

    Args:
        cfg: the run config (``eval.*``, ``bank.dir``).
        method: what to evaluate.
        model_dir: the model (and tokenizer) directory.
        step: the stage-2 step these weights come from.
        checkpoint: a stage-2 checkpoint whose weights (and prompts) replace ``model_dir``'s.
        selected: these are the weights the method reports (best-on-target), not a curve point.
        stage1_refs: task -> ref of this run's stage-1 prompts (``prompt_tuning``).

    Returns:
        Flat records (see :mod:`multipromot.eval.report`) tagged with the method and step.
    """
    ev = cfg.eval
    made = method.source or method  # wise: evaluated as the method whose weights it holds
    model, tokenizer, _ = load_model(str(model_dir), seed=cfg.seed)
    model.eval()
    if method.alpha is not None:
        _interpolate(cfg, model, Path(model_dir), method.alpha)
    decoder_only = not is_encoder_decoder(model)
    mixture = load_mixture(method.mixture)
    tasks = [t.name for t in mixture.tasks]
    suite = load_suite(resolve_path(cfg, ev.suite))
    source = prompt_refs(made, Path(model_dir), cfg, tasks, stage1_refs or {})
    refs: dict[str, str] = {}
    if method.kind in LORA_KINDS:
        prompted = _adapted(cfg, method, model, Path(model_dir), checkpoint, tasks)
    elif source is None:
        prompted = PromptedModel(model)
    else:
        bank = PromptBank(source[0])
        refs = source[1]
        try:
            prompted = PromptedModel.from_bank(model, bank, tasks, refs=refs)
        except ValueError as e:  # prompts of different lengths cannot share one table
            raise UserError(str(e), file=bank.root, key="stage2.mixture") from None
    if checkpoint is not None and method.kind not in LORA_KINDS:
        load_checkpoint(checkpoint, model=prompted, restore_rng=False)
    rows = {t: i for i, t in enumerate(tasks)} if source is not None else {}
    router = None
    if method.kind == "promot_lora":  # each task's adapter on its rows, routed by format
        rows = {t: i for i, t in enumerate(tasks)}
        if ev.router:  # (a task whose template has no signature is never routed to)
            router = Router([RouterEntry(t.name, t.template.signature) for t in mixture.tasks])
    if source is not None and ev.router:
        others = [get_task(t.name) for t in suite.tasks]
        router = calibrated_router(bank, mixture.tasks, refs=refs, negatives=others, seed=cfg.seed)
    # Format specialization: outputs that fall in a fine-tuned classification task's label set.
    answers = sorted({a for t in mixture.tasks for a in (t.answers or [])})
    progress = method.label if selected else f"{method.label} (step {step})"
    common = dict(
        decoder_only=decoder_only,
        num_beams=ev.num_beams,
        batch_size=ev.batch_size,
        max_new_tokens=ev.max_new_tokens,
        progress=progress,
    )
    records = evaluate_finetuned(
        prompted, tokenizer, mixture.tasks, rows, examples=ev.examples, **common
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
        seed=cfg.seed,
        **common,
    )
    for r in unseen:
        r["seen"] = False
    records += unseen
    shots = _read_record(Path(model_dir) / "stage2.json").get("shots") if made.trains else 0
    for r in records:
        r.update(
            method=method.label, step=step, selected=selected, bank_refs=refs, train_shots=shots
        )
    return records


def _interpolate(cfg: RunConfig, model, final: Path, alpha: float) -> None:
    """WiSE-FT in place: ``model`` (loaded from ``final``) moves to ``(1 - alpha) * base +
    alpha * model``; the base must be the one ``final`` was fine-tuned from."""
    base, _, _ = load_model(cfg.model, seed=cfg.seed)
    made_from = _read_record(final / "stage2.json").get("base_model", {}).get("fingerprint")
    if made_from != model_fingerprint(base):
        raise UserError(
            f"was fine-tuned from another base model than {cfg.model!r} (fingerprint "
            f"{made_from}); WiSE-FT needs the same base",
            file=final,
        )
    wise.interpolate(model, base, alpha)


def _adapted(
    cfg: RunConfig, method: Method, model, final: Path, checkpoint: Path | None, tasks: list[str]
):
    """A LoRA method's model for evaluation. promot_lora: ``final``'s weights with the task
    adapters (a row gets its task's, or none); lora: the merged weights of ``final``, or, for a
    checkpoint, its base with the adapter as trained at that step, merged."""
    if method.kind == "promot_lora":
        adapted = lora.load_adapters(model, final / lora.ADAPTERS_DIR, tasks)
        if checkpoint is not None:
            load_checkpoint(checkpoint, model=adapted, restore_rng=False)
        return adapted.eval()
    if checkpoint is None:
        return PromptedModel(model)
    base_name = _read_record(final / "stage2.json")["base_model"]["name"]
    base, _, _ = load_model(base_name, seed=cfg.seed)
    adapted = lora.load_adapters(base, final / lora.ADAPTERS_DIR, None)
    load_checkpoint(checkpoint, model=adapted, restore_rng=False)
    return PromptedModel(adapted.model.merge_and_unload().eval())


def _final_step(final: Path, default: int) -> int:
    """The step ``final/`` was taken at (stage 2 keeps the best validated step)."""
    info = final / "stage2.json"
    return int(json.loads(info.read_text()).get("step", default)) if info.is_file() else default


def _curve(cfg: RunConfig, method: Method, method_dir: Path, final: Path, skip: int) -> list[dict]:
    """Evaluate every complete stage-2 checkpoint: the curves over steps (paper Fig. 1/2)."""
    checkpoints = [p for p in (method_dir / "checkpoints").glob("step_*") if is_complete(p)]
    records = []
    for path in sorted(checkpoints, key=lambda p: int(p.name.split("_")[1])):
        step = int(path.name.split("_")[1])
        if step != skip:  # the selected model is evaluated already
            print(f"evaluating {method.label} at checkpoint step {step} (curve)")
            records += evaluate_method(
                cfg, method, final, step=step, checkpoint=path, selected=False
            )
    return records


def run_experiment(cfg: RunConfig) -> Path:
    """Run every method of ``cfg.methods`` and write the report; returns the report path."""
    if not cfg.methods:
        raise UserError("lists no methods to run", file=cfg.config_file or None, key="methods")
    methods = [parse_method(label, cfg) for label in cfg.methods]
    preflight(cfg, methods)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, _, base_dir = load_model(cfg.model, seed=cfg.seed)
    if any(m.kind in LORA_KINDS for m in methods):  # lora.target_modules, before any training
        lora.check_targets(base_dir, cfg.lora)
    stage1_refs: dict[str, str] = {}
    if any(m.kind in STAGE1_KINDS for m in methods):
        stage1_refs = _stage1(cfg, out)
    adapters = None
    if any(m.kind == "promot_lora" for m in methods):
        adapters = _stage1_lora(cfg, out)

    records: list[dict] = []
    status: dict[str, str] = {}
    # WiSE-FT rows come after the methods whose fine-tuned weights they interpolate
    for method in sorted(methods, key=lambda m: m.kind == "wise"):
        method_dir = out / "methods" / method.label
        method_dir.mkdir(parents=True, exist_ok=True)
        trained = (
            _train_record(cfg, method, method_dir, stage1_refs, adapters) if method.trains else None
        )
        if method.kind == "wise":
            trained = _wise_record(cfg, method, out, stage1_refs)
        record = _eval_record(cfg, method, trained, stage1_refs)
        done = method_dir / "eval.json"
        if done.exists():
            saved = _read_json(done)
            made_from = saved.get("made_from") if isinstance(saved, dict) else None
            changed = _changes(made_from, record)
            if not changed:
                records += saved["records"]
                made = "interpolated" if method.kind == "wise" else "trained"
                status[method.label] = f"reused ({made} and scored by an earlier run)"
                print(f"{method.label}: reusing {done}")
                continue
            _stale(cfg, done, f"evaluation of {method.label}", changed)
            done.unlink()
        if method.trains:
            model_dir, kept = _stage2(cfg, method, method_dir, trained)
            step = _final_step(model_dir, cfg.stage2.steps)
            status[method.label] = (
                "stage 2 reused, scored by this run" if kept else "trained and scored by this run"
            )
            if method.kind in LORA_KINDS:
                status[method.label] += f"; LoRA adapters (peft) in {model_dir / lora.ADAPTERS_DIR}"
        elif method.kind == "wise":
            model_dir, step = Path(trained["weights"]), trained["step"]
            status[method.label] = "interpolated and scored by this run"
        else:
            model_dir, step = Path(base_dir), 0
            status[method.label] = "scored by this run"
        print(f"evaluating {method.label} (step {step})")
        result = evaluate_method(cfg, method, model_dir, step=step, stage1_refs=stage1_refs)
        if method.kind == "wise":  # which weights, in results.json
            interpolated = {k: v for k, v in trained.items() if k != "source_made_from"}
            for r in result:
                r["interpolated"] = interpolated
        if method.trains and cfg.eval.curve:
            result += _curve(cfg, method, method_dir, model_dir, skip=step)
        write_json(done, {"made_from": record, "records": result})
        records += result

    stage1_losses = {}
    if stage1_refs:
        stage1_losses["prompts"] = read_losses(out / "stage1")
    if adapters:
        stage1_losses["promot_lora's adapters"] = read_losses(out / stage1_lora.ADAPTERS_FOLDER)
    stage2_losses = {m.label: read_losses(out / "methods" / m.label) for m in methods if m.trains}
    report = write_report(
        records,
        out,
        title=f"multipromot run: {Path(cfg.config_file).name}",
        config=_config_dict(cfg),
        methods=status,
        stage1_losses=stage1_losses,
        stage2_losses=stage2_losses,
    )
    print(terminal_summary(records))
    print(f"report: {report}")
    return report


def run_eval(cfg: RunConfig) -> Path:
    """`multipromot eval`: score ``cfg.model`` (a base model or a stage-2 ``final/``) on the
    fine-tuned tasks of ``stage2.mixture`` and the suite ``eval.suite``, with the bank prompts of
    those tasks when ``eval.prompts`` is on and the router when ``eval.router`` is on.

    Returns:
        The report path (``<out_dir>/eval/report.md``).
    """
    preflight(cfg, command="eval")
    kind = "prompt_tuning" if cfg.eval.prompts else "pretrained"  # base weights, bank prompts
    method = Method(
        label=Path(cfg.model).name or cfg.model,
        kind=kind,
        shots=None,
        mixture=resolve_path(cfg, cfg.stage2.mixture),
    )
    _, _, model_dir = load_model(cfg.model, seed=cfg.seed)
    info = Path(model_dir) / "stage2.json"
    step = int(json.loads(info.read_text()).get("step", 0)) if info.is_file() else 0
    records = evaluate_method(cfg, method, model_dir, step=step)
    out = Path(cfg.out_dir) / "eval"
    report = write_report(
        records, out, title=f"multipromot eval: {cfg.model}", config=_config_dict(cfg)
    )
    print(terminal_summary(records))
    print(f"report: {report}")
    return report


def _config_dict(cfg: RunConfig) -> dict:
    from dataclasses import asdict

    return asdict(cfg)
