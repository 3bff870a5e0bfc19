"""`multipromot run`: stage 1 -> stage 2 per method -> evaluation -> report, resumable; and
`multipromot eval` of one model folder.

The methods (``methods`` of the config) are labels of :mod:`multipromot.methods`' grammar;
each kind's table entry says which stage 1 it needs, whether stage 2 trains it, and how it is
evaluated (:mod:`multipromot.method_eval`). Shots precedence
(:func:`multipromot.train.stage2.resolve_shots`): the label's ``+Kshot``, else
``stage2.shots``, else the mixture header's ``exemplars.shots``.

Every finished piece leaves a file behind (the bank entries, ``methods/<m>/final``,
``methods/<m>/eval.json``), so running the same command again after a crash skips what is done
and resumes stages 1 and 2 from their latest checkpoints. Each piece also records what it was
made from, and is reused only when that record equals the current one
(:mod:`multipromot.reuse`); report.md says per method what was reused.
"""

from __future__ import annotations

import copy
import shlex
import shutil
from dataclasses import asdict
from pathlib import Path

from multipromot.bank import PromptBank
from multipromot.bank.entry import parse_ref
from multipromot.config import RunConfig, bank_dir, model_seed, resolve_path, run_methods
from multipromot.data.mixtures import load_mixture
from multipromot.errors import UserError
from multipromot.eval.report import config_lines, read_statistics, terminal_summary, write_report
from multipromot.eval.samples import SAMPLES_FILE, samples_digest, write_samples
from multipromot.eval.suite_file import load_suite
from multipromot.fsio import json_sha256
from multipromot.method_eval import curve, evaluate_method, prompt_shots, score_model
from multipromot.methods import Method
from multipromot.models import is_encoder_decoder, load_model, read_lineage
from multipromot.preflight import check_shots, preflight
from multipromot.reuse import (
    changes,
    check_stale,
    eval_record,
    read_record,
    train_record,
    write_record,
)
from multipromot.router import calibrated_router, router_entries
from multipromot.soft_prompt import PromptedModel
from multipromot.train import lora, stage1_lora, stage2
from multipromot.train.freeze import frozen_names
from multipromot.train.metrics_log import MetricsLog
from multipromot.train.stage1 import made_from as stage1_made_from
from multipromot.train.stage1 import stage1_folder, train_prompts
from multipromot.train.stage2_export import Stage2Record
from multipromot.trained import prompt_table, recorded_prompts

__all__ = ["run_experiment", "run_eval", "evaluate_method", "torch_threads"]


def run_experiment(cfg: RunConfig) -> Path:
    """Run every method of ``cfg.methods`` and write the report; returns the report path."""
    if not cfg.methods:
        raise UserError("lists no methods to run", file=cfg.config_file or None, key="methods")
    methods = run_methods(cfg)
    preflight(cfg, methods)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base, tokenizer, base_dir = load_model(cfg.model, seed=model_seed(cfg))
    if any(m.spec.adapters for m in methods):  # lora.*, before any training
        try:
            lora.check_targets(base_dir, cfg.lora)
        except UserError as e:  # the keys are the config's
            raise UserError(e.message, file=e.file or cfg.config_file or None, key=e.key) from None
    # k-shot inputs against their token budgets, before any training
    check_shots(cfg, methods, tokenizer, decoder_only=not is_encoder_decoder(base))
    if cfg.stage2.freeze_bottom:  # per method in `run`: which methods would it mean?
        raise UserError(
            "is for the stage2 command; in `run`, freeze per method with a label's ~freezeK "
            "(standard~freeze2)",
            file=cfg.config_file or None,
            key="stage2.freeze_bottom",
        )
    for method in methods:  # ~freezeK within the model's depth
        try:
            frozen_names(base, method.made.freeze)
        except UserError as e:
            raise UserError(
                f"method {method.label!r}: stage2.freeze_bottom {e.message}",
                file=cfg.config_file or None,
                key="methods",
            ) from None
    del base
    # one set of stage-1 prompts per number of exemplars its methods use them with
    stage1_refs: dict[int, dict[str, str]] = {}
    for shots in sorted({prompt_shots(cfg, m) for m in methods if m.made.spec.stage1 == "prompts"}):
        stage1_refs[shots] = _stage1(_with_stage1_shots(cfg, shots), out)
    adapters = None
    if any(m.spec.stage1 == "adapters" for m in methods):
        adapters = _stage1_lora(cfg, out)

    records: list[dict] = []
    status: dict[str, str] = {}
    # WiSE-FT rows come after the methods whose fine-tuned weights they interpolate
    for method in sorted(methods, key=lambda m: m.spec.weights == "interpolated"):
        refs = stage1_refs.get(prompt_shots(cfg, method), {})
        scored, status[method.label] = _run_method(cfg, method, out, Path(base_dir), refs, adapters)
        records += scored

    stage1_losses = {}
    for shots in stage1_refs:
        label = "prompts" if shots == 0 else f"prompts ({shots}-shot)"
        stage1_losses[label] = MetricsLog(out / stage1_folder(shots)).losses()
    if adapters:
        stage1_losses["promot_lora's adapters"] = MetricsLog(
            out / stage1_lora.ADAPTERS_FOLDER
        ).losses()
    stage2_losses = {
        m.label: MetricsLog(out / "methods" / m.label).losses() for m in methods if m.trains
    }
    report = write_report(
        records,
        out,
        title=f"multipromot run: {Path(cfg.config_file).name}",
        config=asdict(cfg),
        methods=status,
        stage1_losses=stage1_losses,
        stage2_losses=stage2_losses,
        samples={m.label: f"methods/{m.label}/{SAMPLES_FILE}" for m in methods},
        compare=cfg.eval.compare,
        produced=_produced(cfg, "run", _run_settings(cfg), records),
    )
    print(terminal_summary(records, statistics=read_statistics(out)))
    print(f"report: {report}")
    return report


def _run_method(
    cfg: RunConfig,
    method: Method,
    out: Path,
    base_dir: Path,
    stage1_refs: dict,
    adapters: dict | None,
) -> tuple[list[dict], str]:
    """One method's scores (reused when its records match, else trained or interpolated and
    scored) and the line report.md says about how they were made."""
    spec = method.spec
    method_dir = out / "methods" / method.label
    method_dir.mkdir(parents=True, exist_ok=True)
    trained = None
    if method.trains:
        trained = _train_record(cfg, method, method_dir, stage1_refs, adapters)
    elif spec.weights == "interpolated":
        trained = _wise_record(cfg, method, out, stage1_refs)
    record = eval_record(cfg, method, trained, stage1_refs)
    done, samples = method_dir / "eval.json", method_dir / SAMPLES_FILE
    if done.exists():
        saved = read_record(done) or {}
        changed = changes(saved.get("made_from"), record)
        if not changed and saved.get("samples") != samples_digest(samples):
            changed = "its per-item samples are missing or changed"
        if not changed and method.trains:  # its scores stand, but a broken model is redone
            changed = _unloadable(method_dir / "final")
        if not changed:
            made = "interpolated" if spec.weights == "interpolated" else "trained"
            print(f"{method.label}: reusing {done}")
            return saved["records"], f"reused ({made} and scored by an earlier run)"
        check_stale(cfg, done, f"evaluation of {method.label}", changed)
        done.unlink()
    if method.trains:
        model_dir, kept = _stage2(cfg, method, method_dir, trained)
        step = Stage2Record.read(model_dir).step
        status = "stage 2 reused, scored by this run" if kept else "trained and scored by this run"
        if spec.adapters is not None:
            status += f"; LoRA adapters (peft) in {model_dir / lora.ADAPTERS_DIR}"
    elif spec.weights == "interpolated":
        model_dir, step = Path(trained["weights"]), trained["step"]
        status = "interpolated and scored by this run"
    else:
        model_dir, step = base_dir, 0
        status = "scored by this run"
    print(f"evaluating {method.label} (step {step})")
    result = evaluate_method(cfg, method, model_dir, step=step, stage1_refs=stage1_refs)
    if spec.weights == "interpolated":  # which weights, in results.json
        interpolated = {k: v for k, v in trained.items() if k != "source_made_from"}
        for r in result:
            r["interpolated"] = interpolated
    if method.trains and cfg.eval.curve:
        result += curve(cfg, method, method_dir, model_dir, skip=step)
    result = write_samples(samples, result)  # the items go there, the summaries stay
    write_record(done, {"made_from": record, "records": result, "samples": samples_digest(samples)})
    return result, status


def _with_stage1_shots(cfg: RunConfig, shots: int) -> RunConfig:
    """The config whose stage 1 tunes prompts with ``shots`` exemplars."""
    sub = copy.deepcopy(cfg)
    sub.stage1.shots = shots
    return sub


def _stage1(cfg: RunConfig, out: Path) -> dict[str, str]:
    """Prompt-tune the stage-1 mixture (with ``stage1.shots`` exemplars) unless this run
    already did from the same settings; returns task -> bank ref of those prompts."""
    done = out / f"{stage1_folder(cfg.stage1.shots)}.json"
    record = stage1_made_from(cfg)
    bank = PromptBank(bank_dir(cfg))
    if done.exists():
        saved = read_record(done) or {}
        refs = saved.get("entries")
        changed = changes(saved.get("made_from"), record) or _entries_changed(
            bank, refs, saved.get("sha256")
        )
        if not changed:
            print(f"stage 1: reusing {', '.join(refs)}")
            return {parse_ref(ref)[0]: ref for ref in refs}
        check_stale(cfg, done, "stage 1", changed)
    shared = _stage1_in_bank(cfg, record)
    if shared is not None:
        refs = list(shared.values())
        write_record(done, {"entries": refs, "sha256": _content(bank, refs), "made_from": record})
        print(f"stage 1: reusing {', '.join(shared.values())} (made from the same settings)")
        return shared
    entries = train_prompts(cfg)
    refs = [e.ref for e in entries]
    write_record(done, {"entries": refs, "sha256": _content(bank, refs), "made_from": record})
    for e in entries:
        s1 = e.meta.get("stage1", {})
        print(
            f"stage 1: {e.ref}: {s1.get('metric')} {s1.get('value', float('nan')):.4g} "
            f"at step {s1.get('best_step')}"
        )
    return {e.task: e.ref for e in entries}


def _stage1_in_bank(cfg: RunConfig, record: dict) -> dict[str, str] | None:
    """Task -> ref of bank entries another run made from exactly ``record`` (their stage-1
    record keeps its digest): how the cells of a sweep that differ only after stage 1 share
    it. The newest such entry per task; None unless every task of the mixture has one."""
    digest = json_sha256(record)
    tasks = load_mixture(resolve_path(cfg, cfg.stage1.mixture)).task_names
    found: dict[str, str] = {}
    for entry in PromptBank(bank_dir(cfg)).entries(problems=[]):
        if entry.task in tasks and (entry.meta.get("stage1") or {}).get("made_from") == digest:
            found[entry.task] = entry.ref  # entries come by task, then version: the newest wins
    return {task: found[task] for task in tasks} if set(found) == set(tasks) else None


def _stage1_lora(cfg: RunConfig, out: Path) -> dict:
    """promot_lora's stage 1 (one adapter per task) unless this run already did it from the same
    settings; returns what its stage 2 records: the record and the adapters' files."""
    done = out / "stage1_lora.json"
    record = stage1_lora.made_from(cfg)
    folder = out / stage1_lora.ADAPTERS_FOLDER / "adapters"
    if done.exists():
        saved = read_record(done) or {}
        changed = changes(saved.get("made_from"), record)
        files = saved.get("files")
        if not changed and folder.is_dir() and files == stage1_lora.adapters_fingerprint(folder):
            print(f"stage 1 (lora): reusing {folder}")
            return {"folder": str(folder), "made_from": record, "files": files}
        check_stale(
            cfg, done, "stage 1 (lora)", changed or "its adapter files changed or are missing"
        )
    folder, best = stage1_lora.train_adapters(cfg)
    files = stage1_lora.adapters_fingerprint(folder)
    write_record(done, {"made_from": record, "files": files, "best": best})
    for task, b in best.items():
        print(f"stage 1 (lora): {task}: {b['metric']} {b['value']:.4g} at step {b['best_step']}")
    return {"folder": str(folder), "made_from": record, "files": files}


def _content(bank: PromptBank, refs: list[str]) -> dict[str, str]:
    """ref -> sha256 of each entry: what stage1.json keeps next to the refs."""
    return {ref: str(bank.get(ref).meta["sha256"]) for ref in refs}


def _entries_changed(bank: PromptBank, refs, content) -> str:
    """Why this run's stage-1 entries can no longer be reused ("" when they can): one is
    missing, or holds another prompt than the one stage 1 wrote (a recreated bank repeats
    refs)."""
    if not isinstance(refs, list) or not isinstance(content, dict):
        return "no record of its bank entries' content (from an older multipromot)"
    for ref in refs:
        try:
            entry = bank.get(ref)
        except UserError:
            return f"its bank entry {ref} is missing"
        if entry.meta["sha256"] != content.get(ref):
            return (
                f"its bank entry {ref} holds another prompt than the one it wrote (the bank was "
                "recreated or the entry replaced)"
            )
    return ""


def _method_config(cfg: RunConfig, method: Method, method_dir: Path) -> RunConfig:
    """The config stage 2 runs with for one method."""
    sub = copy.deepcopy(cfg)
    sub.out_dir = str(method_dir)
    sub.stage2.mode = method.kind  # the kinds that train are exactly the stage-2 modes
    sub.stage2.mixture = method.mixture
    if method.spec.stage1 == "adapters":  # this run's stage-1 adapters
        sub.lora.adapters = str(Path(cfg.out_dir) / stage1_lora.ADAPTERS_FOLDER / "adapters")
    if method.shots is not None:  # the label's +Kshot wins over stage2.shots and the mixture
        sub.stage2.shots = method.shots
    if method.prompt_shots is not None:  # ~promptJshot: prompts tuned with other exemplars
        sub.stage2.prompt_shots = method.prompt_shots
    sub.stage2.freeze_bottom = method.made.freeze
    if not cfg.sdft.cache:  # sdft's rewritten targets: one cache for the run's sdft methods
        sub.sdft.cache = str(Path(cfg.out_dir) / "sdft_targets")
    return sub


def _train_record(
    cfg: RunConfig, method: Method, method_dir: Path, stage1_refs: dict, adapters=None
) -> dict:
    stage2_keys = asdict(_method_config(cfg, method, method_dir).stage2)
    return train_record(cfg, method, stage2_keys, stage1_refs, adapters)


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
        "step": Stage2Record.read(final).step,
        "fingerprint": read_lineage(final).get("fingerprint"),
        "source_made_from": made_from,
    }


def _stage2(cfg: RunConfig, method: Method, method_dir: Path, record: dict) -> tuple[Path, bool]:
    """Fine-tune for one method (resuming a killed run made from the same settings); returns its
    final model directory and whether it was reused as it was."""
    final = method_dir / "final"
    made_from = method_dir / "made_from.json"
    same = read_record(made_from) == record
    if Stage2Record.exists(final) and same:
        broken = _unloadable(final)
        if not broken:
            return final, True
        check_stale(cfg, made_from, f"stage 2 {method.label}", broken)
        shutil.rmtree(method_dir)
        method_dir.mkdir(parents=True)
    if made_from.exists() or final.exists() or (method_dir / "checkpoints").exists():
        changed = changes(read_record(made_from), record)
        if changed:  # another config's model or checkpoints: none of it may be reused
            check_stale(cfg, made_from, f"stage 2 {method.label}", changed)
            shutil.rmtree(method_dir)
            method_dir.mkdir(parents=True)
    write_record(made_from, record)
    print(f"stage 2: {method.label}")
    label = method.label if method.shots is not None else None  # what decided its shots
    sub = _method_config(cfg, method, method_dir)
    # the prompts this run tuned for the method (with its exemplars), not the bank's newest
    sub.bank.refs = {task: ref for task, ref in (record.get("bank_refs") or {}).items() if ref}
    stage2.finetune(sub, label=label)
    return final, False


def _command(cfg: RunConfig, command: str) -> str:
    """The command line that made a report, as typed: the config and every ``key=value``
    override, run from the folder it ran in (relative paths resolve there)."""
    parts = ["multipromot", command, *([cfg.config_file] if cfg.config_file else [])]
    line = shlex.join([*parts, *cfg.overrides])
    return f"cd {shlex.quote(cfg.workdir)} && {line}" if cfg.workdir else line


def _run_settings(cfg: RunConfig) -> list[tuple[str, object]]:
    """``run``'s settings worth a line: the config's keys, the bank as resolved."""
    settings = [(k, v) for k, v in config_lines(asdict(cfg)) if k != "prompt bank"]
    # CPU kernels sum in an order that depends on the thread count, so training is repeatable
    # to the bit only at the same count (a sweep's --jobs N gives each cell cores / N)
    threads = f"{torch_threads()} (this command; a reused piece records none)"
    return [*settings, ("prompt bank", bank_dir(cfg)), ("torch threads", threads)]


def torch_threads() -> int:
    """The threads torch's CPU kernels use in this process."""
    import torch  # heavy: only a run that trains or scores gets here

    return torch.get_num_threads()


def _eval_settings(cfg: RunConfig, model_dir, bank) -> list[tuple[str, object]]:
    """``eval``'s settings: the model as its stage-2 record describes it (kind, mixture, step,
    shots it was trained with), what was scored and how, and where its prompts came from."""
    settings: list[tuple[str, object]] = [("model", cfg.model)]
    if Stage2Record.exists(model_dir):
        record = Stage2Record.read(model_dir)
        settings += [
            ("base model", record.base_model.get("name")),
            ("fine-tuned as", f"{record.mode} on mixture {record.mixture}"),
            ("stage-2 step", f"{record.step} (selected by {record.selected_by})"),
            ("trained shots", f"{record.shots} ({record.shots_from or 'recorded'})"),
        ]
    settings += [
        ("tasks scored 0-shot", resolve_path(cfg, cfg.stage2.mixture)),
        ("eval suite", resolve_path(cfg, cfg.eval.suite)),
        ("shots", cfg.eval.shots),
        ("examples per task", cfg.eval.examples),
        ("beam width", cfg.eval.num_beams),
        ("prompts", "yes" if cfg.eval.prompts else "none"),
        ("router", cfg.eval.router if cfg.eval.prompts else False),
    ]
    if bank is not None:
        settings.append(("prompt bank", str(bank)))
    return settings


def _produced(cfg: RunConfig, command: str, settings: list, records: list[dict]) -> dict:
    """How a report's numbers were made (``eval.report``'s ``produced``): the command line,
    the settings actually used, and every prompt the records name (by bank, ref and content)
    with how the bank entry says it was made."""
    prompts: dict[tuple, dict] = {}
    for r in records:
        for task, ref in (r.get("bank_refs") or {}).items():
            sha = (r.get("bank_sha256") or {}).get(task)
            key = (r.get("bank_dir"), ref, sha)
            if ref and key not in prompts:
                prompts[key] = {"ref": ref, "sha256": sha, "bank": r.get("bank_dir"), "made": ""}
    for (bank, ref, _), info in prompts.items():
        info["made"] = _how_made(bank, ref)
    listed = sorted(prompts.values(), key=lambda p: (p["ref"], str(p["bank"])))
    return {"command": _command(cfg, command), "settings": settings, "prompts": listed}


def _how_made(bank, ref: str) -> str:
    """How a bank entry says its prompt was made: the stage-1 settings it was tuned with, or
    the stage-2 kind that trained or drew it."""
    try:
        entry = PromptBank(bank).get(ref)
    except UserError as e:
        return f"cannot be read now ({e.message})"
    stage1 = entry.meta.get("stage1") or {}
    made = stage1.get("settings")
    if made:
        keys = ("lr", "steps", "prompt_length", "init", "optimizer", "batch_size")
        tuned = ", ".join(f"stage1.{k}={made[k]}" for k in keys if k in made)
        best = (
            f"; best step {stage1.get('best_step')}: {stage1.get('metric')} {stage1.get('value')}"
        )
        return f"tuned with {tuned} on {made.get('model')} (seed {made.get('seed')}){best}"
    extra = entry.meta.get("extra") or {}
    if extra.get("stage2_mode"):
        return f"made by stage 2 ({extra['stage2_mode']}); stored next to the model's weights"
    if stage1:
        return f"stage 1: {stage1.get('steps')} steps (its settings were not recorded)"
    return f"init {entry.meta.get('init')} (not made by stage 1 here: imported or older)"


def _unloadable(final: Path) -> str:
    """Why a finished stage-2 model cannot be used as it is ("" when it can): its record is
    unreadable, or the prompts it records cannot be loaded (their bank is gone, or holds other
    content under their refs). Such a model is made again, never reused."""
    try:
        if Stage2Record.read(final).bank_refs:
            recorded_prompts(final)
    except UserError as e:
        return f"its model {final} cannot be loaded: {e}"
    return ""


def run_eval(cfg: RunConfig) -> Path:
    """`multipromot eval`: score ``cfg.model`` (a base model or a stage-2 ``final/``) on the
    fine-tuned tasks of ``stage2.mixture`` and the suite ``eval.suite``. With ``eval.prompts``
    each of those tasks gets its prompt: the versions a stage-2 model records, else the bank's
    current ones; with ``eval.router`` the suite's inputs are routed among them.

    Returns:
        The report path (``<out_dir>/eval/report.md``).
    """
    preflight(cfg, command="eval")
    model, tokenizer, model_dir = load_model(cfg.model, seed=model_seed(cfg))
    model.eval()
    check_shots(cfg, [], tokenizer, decoder_only=not is_encoder_decoder(model))
    mixture = load_mixture(resolve_path(cfg, cfg.stage2.mixture))
    tasks = mixture.task_names
    trained = Stage2Record.exists(model_dir)
    step = Stage2Record.read(model_dir).step if trained else 0
    rows, router, refs, content, prompted = {}, None, {}, {}, PromptedModel(model)
    where = None
    if cfg.eval.prompts:
        if trained and Stage2Record.read(model_dir).bank_refs:
            where, refs, content = recorded_prompts(Path(model_dir), tasks)
        else:
            where = bank_dir(cfg)
            refs = {t: PromptBank(where).get(t).ref for t in tasks}
            content = PromptBank(where).content(refs)
        bank = PromptBank(where)
        bank.check_definitions(refs, mixture.tasks)
        prompted = prompt_table(model, bank, tasks, refs)
        rows = {t: i for i, t in enumerate(tasks)}
        if cfg.eval.router:
            others = load_suite(resolve_path(cfg, cfg.eval.suite)).resolved_tasks()
            router = calibrated_router(
                router_entries(bank, refs), mixture.tasks, negatives=others, seed=cfg.seed
            )
    label = Path(cfg.model).name or cfg.model
    base = None
    if cfg.eval.drift_examples:  # a stage-2 model drifts from the base its record names
        base = PromptedModel(model)
        if trained:
            base_model, _, _ = load_model(Stage2Record.read(model_dir).base_model["name"])
            base = PromptedModel(base_model.eval())
    records = score_model(
        cfg, prompted, tokenizer, mixture, rows=rows, router=router, progress=label, base=base
    )
    record = Stage2Record.read(model_dir) if trained else None
    shots, kept = (record.shots, record.shots_kept) if record else (0, {})
    for r in records:
        r.update(
            method=label,
            step=step,
            selected=True,
            bank_refs=refs,
            bank_sha256=content,
            bank_dir=str(where) if refs else None,
            train_shots=shots,
            train_shots_kept=kept,
        )
    out = Path(cfg.out_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    records = write_samples(out / SAMPLES_FILE, records)
    report = write_report(
        records,
        out,
        title=f"multipromot eval: {cfg.model}",
        config=asdict(cfg),
        samples={label: SAMPLES_FILE},
        compare=cfg.eval.compare,
        produced=_produced(cfg, "eval", _eval_settings(cfg, model_dir, where), records),
    )
    print(terminal_summary(records, statistics=read_statistics(out)))
    print(f"report: {report}")
    return report
