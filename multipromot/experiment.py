"""`multipromot run`: stage 1 -> stage 2 per method -> evaluation -> report, resumable.

A method names what the paper compares::

    pretrained              the base model, no prompt
    prompt_tuning           the base model with the bank prompts (stage 1 only)
    standard                stage 2 without prompts
    promot                  stage 2 with frozen bank prompts
    joint                   stage 2 training prompt and model together
    random_prompt           stage 2 with a fixed random prompt per task

``+Kshot`` adds K exemplars to every stage-2 example (``promot+1shot``) and ``@name`` picks the
stage-2 mixture from ``mixtures`` in the config (``standard@multi``); without it the method uses
``stage2.mixture``.

Every finished piece leaves a file behind (the bank entries, ``methods/<m>/final``,
``methods/<m>/eval.json``), so running the same command again after a crash skips what is done
and resumes stage 2 from its latest checkpoint.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from multipromot.bank import PromptBank
from multipromot.config import RunConfig, resolve_path
from multipromot.errors import UserError
from multipromot.mixtures import load_mixture
from multipromot.models import is_encoder_decoder, load_model
from multipromot.report import terminal_summary, write_report
from multipromot.router import Router
from multipromot.soft_prompt import PromptedModel
from multipromot.suites import evaluate_finetuned, evaluate_suite, load_suite

__all__ = ["Method", "parse_method", "run_experiment", "run_eval", "evaluate_method"]

KINDS = ("pretrained", "prompt_tuning", "standard", "promot", "joint", "random_prompt")
_METHOD = re.compile(
    r"^(?P<kind>[a-z_]+)(?:\+(?P<shots>\d+)shot)?(?:@(?P<mixture>[A-Za-z0-9_.-]+))?$"
)


@dataclass(frozen=True)
class Method:
    label: str
    kind: str
    shots: int
    mixture: str  # path of the stage-2 mixture

    @property
    def trains(self) -> bool:
        return self.kind not in ("pretrained", "prompt_tuning")

    @property
    def uses_prompts(self) -> bool:
        return self.kind != "pretrained" and self.kind != "standard"


def parse_method(label: str, cfg: RunConfig) -> Method:
    """Parse ``kind[+Kshot][@mixture]`` (see the module docstring).

    Raises:
        UserError: an unknown kind or mixture alias.
    """
    m = _METHOD.match(label)
    if not m or m["kind"] not in KINDS:
        raise UserError(
            f"unknown method {label!r}; use one of {', '.join(KINDS)}, optionally with +Kshot "
            "and @mixture (e.g. promot+1shot@multi)",
            file=cfg.config_file or None,
            key="methods",
        )
    alias = m["mixture"]
    if alias is None:
        mixture = cfg.stage2.mixture
    elif alias in cfg.mixtures:
        mixture = cfg.mixtures[alias]
    else:
        raise UserError(
            f"method {label!r} names mixture {alias!r}, which `mixtures` does not define",
            file=cfg.config_file or None,
            key="methods",
        )
    return Method(label, m["kind"], int(m["shots"] or 0), resolve_path(cfg, mixture))


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    os.replace(tmp, path)


def _stage1(cfg: RunConfig, out: Path) -> None:
    """Prompt-tune the stage-1 mixture unless this run already did (its refs are recorded)."""
    from multipromot.stage1 import train_prompts

    done = out / "stage1.json"
    if done.is_file():
        refs = json.loads(done.read_text())["entries"]
        bank = PromptBank(cfg.bank.dir)
        if all(_exists(bank, ref) for ref in refs):
            print(f"stage 1: reusing {', '.join(refs)}")
            return
    entries = train_prompts(cfg)
    _write_json(done, {"entries": [e.ref for e in entries]})


def _exists(bank: PromptBank, ref: str) -> bool:
    try:
        bank.get(ref)
    except UserError:
        return False
    return True


def _stage2(cfg: RunConfig, method: Method, method_dir: Path) -> Path:
    """Fine-tune for one method (resuming a killed run); returns its final model directory."""
    from multipromot.stage2 import finetune

    final = method_dir / "final"
    if (final / "multipromot.json").is_file():
        return final
    sub = copy.deepcopy(cfg)
    sub.out_dir = str(method_dir)
    sub.stage2.mode = method.kind  # the trained kinds are exactly the stage-2 modes
    sub.stage2.mixture = method.mixture
    sub.stage2.shots = method.shots  # resume="" continues from this method's latest checkpoint
    print(f"stage 2: {method.label}")
    finetune(sub)
    return final


def _load_prompts(method: Method, model, model_dir: Path, bank: PromptBank, tasks: list[str]):
    """The prompt table a method evaluates with, in ``tasks`` order (None: no prompts)."""
    if not method.uses_prompts:
        return None
    saved = model_dir / "prompts.safetensors"
    if method.trains and saved.is_file():  # joint / random_prompt keep their own table
        from safetensors import safe_open

        with safe_open(str(saved), framework="pt") as f:
            names = json.loads(f.metadata()["tasks"])
            table = f.get_tensor("prompts")
        return table[[names.index(t) for t in tasks]]
    return torch.stack([bank.load_prompt(task, model=model) for task in tasks])


def evaluate_method(
    cfg: RunConfig,
    method: Method,
    model_dir: str | Path,
    *,
    step: int,
    checkpoint: Path | None = None,
    selected: bool = True,
) -> list[dict]:
    """Score one method: fine-tuned tasks 0-shot with their prompt, the suite k-shot with routing.

    Args:
        cfg: the run config (``eval.*``, ``bank.dir``).
        method: what to evaluate.
        model_dir: the model (and tokenizer) directory.
        step: the stage-2 step these weights come from.
        checkpoint: a stage-2 checkpoint whose weights (and prompts) replace ``model_dir``'s.
        selected: these are the weights the method reports (best-on-target), not a curve point.

    Returns:
        Flat records (see :mod:`multipromot.report`) tagged with the method and step.
    """
    ev = cfg.eval
    model, tokenizer, _ = load_model(str(model_dir), seed=cfg.seed)
    model.eval()
    decoder_only = not is_encoder_decoder(model)
    mixture = load_mixture(method.mixture)
    tasks = [t.name for t in mixture.tasks]
    bank = PromptBank(cfg.bank.dir)
    table = _load_prompts(method, model, Path(model_dir), bank, tasks)
    prompted = PromptedModel(model, table, tasks if table is not None else None)
    if checkpoint is not None:
        from multipromot.checkpoint import load_checkpoint

        load_checkpoint(checkpoint, model=prompted, restore_rng=False)
    rows = {t: i for i, t in enumerate(tasks)} if table is not None else {}
    router = None
    if table is not None and ev.router:
        router = Router.from_bank(_BankView(bank, tasks))
    # Format specialization: outputs that fall in a fine-tuned classification task's label set.
    answers = sorted({a for t in mixture.tasks for a in (t.answers or [])})
    common = dict(decoder_only=decoder_only, num_beams=ev.num_beams, batch_size=ev.batch_size,
                  max_new_tokens=ev.max_new_tokens)  # fmt: skip
    records = evaluate_finetuned(
        prompted, tokenizer, mixture.tasks, rows, examples=ev.examples, **common
    )
    for r in records:
        r["seen"] = True
    suite = load_suite(resolve_path(cfg, ev.suite))
    unseen = evaluate_suite(
        prompted, tokenizer, suite, shots=ev.shots or None, examples=ev.examples, router=router,
        prompt_rows=rows, specialization_answers=answers or None, seed=cfg.seed, **common,
    )  # fmt: skip
    for r in unseen:
        r["seen"] = False
    records += unseen
    for r in records:
        r.update(method=method.label, step=step, selected=selected)
    return records


def _final_step(final: Path, default: int) -> int:
    """The step ``final/`` was taken at (stage 2 keeps the best validated step)."""
    info = final / "stage2.json"
    return int(json.loads(info.read_text()).get("step", default)) if info.is_file() else default


def _curve(cfg: RunConfig, method: Method, method_dir: Path, final: Path, skip: int) -> list[dict]:
    """Evaluate every complete stage-2 checkpoint: the curves over steps (paper Fig. 1/2)."""
    from multipromot.checkpoint import is_complete

    checkpoints = [p for p in (method_dir / "checkpoints").glob("step_*") if is_complete(p)]
    records = []
    for path in sorted(checkpoints, key=lambda p: int(p.name.split("_")[1])):
        step = int(path.name.split("_")[1])
        if step != skip:  # the selected model is evaluated already
            records += evaluate_method(
                cfg, method, final, step=step, checkpoint=path, selected=False
            )
    return records


class _BankView:
    """The bank restricted to the tasks a model was fine-tuned on (the router's candidates)."""

    def __init__(self, bank: PromptBank, tasks: list[str]):
        self.bank, self.tasks = bank, set(tasks)

    def entries(self):
        return [e for e in self.bank.entries() if e.task in self.tasks]


def run_experiment(cfg: RunConfig) -> Path:
    """Run every method of ``cfg.methods`` and write the report; returns the report path."""
    if not cfg.methods:
        raise UserError("lists no methods to run", file=cfg.config_file or None, key="methods")
    methods = [parse_method(label, cfg) for label in cfg.methods]
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(m.kind in ("prompt_tuning", "promot", "joint") for m in methods):
        _stage1(cfg, out)
    _, _, base_dir = load_model(cfg.model, seed=cfg.seed)

    records: list[dict] = []
    for method in methods:
        method_dir = out / "methods" / method.label
        method_dir.mkdir(parents=True, exist_ok=True)
        done = method_dir / "eval.json"
        if done.is_file():
            records += json.loads(done.read_text())
            continue
        if method.trains:
            model_dir = _stage2(cfg, method, method_dir)
            step = _final_step(model_dir, cfg.stage2.steps)
        else:
            model_dir, step = Path(base_dir), 0
        result = evaluate_method(cfg, method, model_dir, step=step)
        if method.trains and cfg.eval.curve:
            result += _curve(cfg, method, method_dir, model_dir, skip=step)
        _write_json(done, result)
        records += result

    report = write_report(records, out, title=f"multipromot run: {Path(cfg.config_file).name}",
                          config=_config_dict(cfg))  # fmt: skip
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
    kind = "prompt_tuning" if cfg.eval.prompts else "pretrained"  # base weights, bank prompts
    method = Method(label=Path(cfg.model).name or cfg.model, kind=kind, shots=0,
                    mixture=resolve_path(cfg, cfg.stage2.mixture))  # fmt: skip
    _, _, model_dir = load_model(cfg.model, seed=cfg.seed)
    info = Path(model_dir) / "stage2.json"
    step = int(json.loads(info.read_text()).get("step", 0)) if info.is_file() else 0
    records = evaluate_method(cfg, method, model_dir, step=step)
    out = Path(cfg.out_dir) / "eval"
    report = write_report(records, out, title=f"multipromot eval: {cfg.model}",
                          config=_config_dict(cfg))  # fmt: skip
    print(terminal_summary(records))
    print(f"report: {report}")
    return report


def _config_dict(cfg: RunConfig) -> dict:
    from dataclasses import asdict

    return asdict(cfg)
