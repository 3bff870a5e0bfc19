"""The methods ``run`` compares: one table entry per kind (:data:`KINDS`), and the label grammar.

Every "does this kind ...?" question in the package is answered by its :class:`MethodKind`
entry (what stage 2 trains, where the prompts come from, which adapters, which stage 1, one
process or sharded, whether WiSE-FT may interpolate it); no other module compares a kind with a
string. Adding a kind is one entry here plus its training code.

A label in a config's ``methods`` is ``kind[+Kshot][~modifier...][@mixture]`` or
``wiseA:LABEL``:

- ``+Kshot`` adds K same-task exemplars to every stage-2 example (``promot+1shot``); its bank
  prompts are then tuned with K exemplars too, and its fine-tuned tasks scored K-shot;
- ``~promptJshot`` uses prompts tuned with J exemplars instead (``promot+1shot~prompt0shot``:
  the ablation of a prompt tuned 0-shot and used 1-shot); ``~freezeK`` keeps the embeddings
  and the bottom K blocks frozen through stage 2 (``standard~freeze2``);
- ``@name`` picks the stage-2 mixture from the config's ``mixtures`` (``standard@multi``);
  without it the method uses ``stage2.mixture``;
- ``wiseA:LABEL`` is WiSE-FT: the weights ``(1 - A) * base + A * LABEL's`` fine-tuned weights,
  A in [0, 1] (``wise0.5:standard``), evaluated as LABEL is (its prompts, its routing) with no
  training; LABEL must be a kind with ``wise_source`` and be listed in ``methods`` too (its final
  weights are the ones interpolated, never retrained for this). ``@`` already picks the
  mixture, so WiSE-FT's weight is glued to ``wise``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from multipromot.errors import UserError

__all__ = [
    "MethodKind",
    "KINDS",
    "STAGE2_MODES",
    "Method",
    "parse_method",
    "method_kind",
    "MAX_SHOTS",
    "MIN_SHOTS_KEPT",
]


@dataclass(frozen=True)
class MethodKind:
    """What one kind of method is. Every field answers one question other modules ask.

    Attributes:
        name: the kind, as written in a method label and in ``stage2.mode``.
        summary: one line for ``--help`` and the docs' methods table.
        weights: which weights are evaluated: ``base`` (the model as loaded), ``stage2`` (this
            method's fine-tuned ``final/``) or ``interpolated`` (WiSE-FT of another method's).
        trainable: what stage 2 trains: ``model``, ``both`` (the model and the prompt table),
            ``adapters`` (a LoRA adapter, the model frozen); None: no stage 2.
        prompts: the prompt table a row gets: ``none``, ``bank`` (the stage-1 prompts of the
            bank, frozen unless ``trainable`` is ``both``) or ``random`` (a fixed random
            prompt per task, drawn by stage 2).
        adapters: LoRA adapters: None, ``shared`` (one new adapter on every row, merged into
            the weights for evaluation) or ``per_task`` (stage 1's adapter of each row's task,
            frozen, routed by format at evaluation).
        stage1: which stage 1 ``run`` does for it first: None, ``prompts`` (one soft prompt
            per task into the bank) or ``adapters`` (one LoRA adapter per task).
        single_process: trains in one process only (no FSDP2, no streamed export).
        wise_source: WiSE-FT may interpolate its final weights with the base model's (a full
            fine-tuning of the base model's own parameters).
        freezing: None, or ``half_per_round`` (Half Fine-Tuning: a random half of the
            parameter tensors frozen in each round of ``hft.round_steps`` steps).
        targets: what stage 2 trains towards: ``data`` (each task's own targets) or
            ``self_distilled`` (SDFT: the base model's rewrite of each target, kept where it
            scores as correct against it; train/sdft.py).
        settings: the config sections besides ``stage2`` that shape its weights (recorded in
            ``stage2.json`` and in what ``run`` compares before reusing a model).
    """

    name: str
    summary: str
    weights: str = "stage2"
    trainable: str | None = "model"
    prompts: str = "none"
    adapters: str | None = None
    stage1: str | None = None
    single_process: bool = False
    wise_source: bool = False
    freezing: str | None = None
    targets: str = "data"
    settings: tuple[str, ...] = ()

    @property
    def trains(self) -> bool:
        """Whether stage 2 runs for it (it is a ``stage2.mode``)."""
        return self.trainable is not None

    @property
    def prompted(self) -> bool:
        """Whether rows carry a soft prompt (a task id into a prompt table)."""
        return self.prompts != "none"

    @property
    def stores_prompts(self) -> bool:
        """Whether its prompts exist only next to its weights (trained or drawn in stage 2),
        stored there as a bank of their own (``final/prompt_bank``)."""
        return self.prompts == "random" or self.trainable == "both"

    @property
    def routed(self) -> bool:
        """Whether evaluation routes each input to a task's prompt or adapter (or none)."""
        return self.prompted or self.adapters == "per_task"


_TABLE = (
    MethodKind("pretrained", "the base model, no prompt", weights="base", trainable=None),
    MethodKind(
        "prompt_tuning",
        "the base model with this run's stage-1 prompts (stage 1 only)",
        weights="base",
        trainable=None,
        prompts="bank",
        stage1="prompts",
    ),
    MethodKind(
        "standard",
        "stage 2 without prompts (plain multi-task fine-tuning)",
        wise_source=True,
    ),
    MethodKind(
        "promot",
        "stage 2 with each row's frozen stage-1 prompt (ProMoT)",
        prompts="bank",
        stage1="prompts",
        wise_source=True,
    ),
    MethodKind(
        "joint",
        "stage 2 training the stage-1 prompts and the model together",
        trainable="both",
        prompts="bank",
        stage1="prompts",
        wise_source=True,
    ),
    MethodKind(
        "random_prompt",
        "stage 2 with a fixed random prompt per task (the paper's ablation)",
        prompts="random",
        wise_source=True,
    ),
    MethodKind(
        "promot_lora",
        "stage 1 trains a LoRA adapter per task instead of a prompt; stage 2 fine-tunes the "
        "model with each row's adapter frozen (the paper's Table 11)",
        adapters="per_task",
        stage1="adapters",
        single_process=True,
        settings=("lora",),
    ),
    MethodKind(
        "lora",
        "stage 2 trains one LoRA adapter, the model frozen; evaluated merged",
        trainable="adapters",
        adapters="shared",
        single_process=True,
        settings=("lora",),
    ),
    MethodKind(
        "hft",
        "Half Fine-Tuning: standard with a random half of the parameter tensors frozen in each "
        "round of hft.round_steps steps",
        single_process=True,
        wise_source=True,
        freezing="half_per_round",
        settings=("hft",),
    ),
    MethodKind(
        "sdft",
        "Self-Distilled Fine-Tuning: standard on the base model's own rewrite of each target "
        "(shown the example as a demonstration), kept where it scores as correct",
        wise_source=True,
        targets="self_distilled",
        settings=("sdft",),
    ),
    MethodKind(
        "wise",
        "WiSE-FT (label wiseA:LABEL): (1 - A) x base + A x LABEL's fine-tuned weights, no training",
        weights="interpolated",
        trainable=None,
    ),
)

KINDS: dict[str, MethodKind] = {kind.name: kind for kind in _TABLE}
# The kinds stage 2 trains: the values of ``stage2.mode``.
STAGE2_MODES = tuple(name for name, kind in KINDS.items() if kind.trains)
# Exemplars per input (a label's +Kshot, stage2.shots, eval.shots): more fit no input length
# this runs with.
MAX_SHOTS = 64
# A method whose k-shot inputs keep fewer than this share of their K exemplars within
# stage2.max_input_length (the collator drops the rest) is refused before training: its label
# (promot+65shot) would misstate what it trained with.
MIN_SHOTS_KEPT = 0.5


def method_kind(name: str, *, file: str | None = None, key: str = "stage2.mode") -> MethodKind:
    """The entry of a stage-2 mode.

    Raises:
        UserError: ``name`` is not a kind that stage 2 trains.
    """
    kind = KINDS.get(name)
    if kind is None or not kind.trains:
        raise UserError(
            f"must be one of {', '.join(STAGE2_MODES)}, got {name!r}", file=file, key=key
        )
    return kind


@dataclass(frozen=True)
class Method:
    """One label of ``methods``, parsed.

    Attributes:
        label: as written (``promot+1shot@multi``).
        kind: the :class:`MethodKind` entry's name.
        shots: the label's ``+Kshot``; None = ``stage2.shots``, else the mixture's header.
        mixture: the path of its stage-2 mixture.
        alpha: WiSE-FT: the fine-tuned weights' share.
        source: WiSE-FT: the method whose fine-tuned weights are interpolated.
        prompt_shots: ``~promptJshot``: the exemplars its bank prompts were tuned with; None =
            its own shots (a prompt is tuned with the exemplars it is used with).
        freeze: ``~freezeK``: the embeddings and bottom K blocks stay frozen (0: none).
    """

    label: str
    kind: str
    shots: int | None
    mixture: str
    alpha: float | None = None
    source: Method | None = None
    prompt_shots: int | None = None
    freeze: int = 0

    @property
    def spec(self) -> MethodKind:
        """Its kind's table entry."""
        return KINDS[self.kind]

    @property
    def made(self) -> Method:
        """The method whose weights, prompts and routing it is evaluated with (WiSE-FT: its
        source; every other method: itself)."""
        return self.source or self

    @property
    def trains(self) -> bool:
        return self.spec.trains

    @property
    def identity(self) -> tuple:
        """What makes two labels the same method (``wise0.5:standard`` and
        ``wise0.50:standard``; ``promot+1shot`` and ``promot+01shot``)."""
        source = self.source.identity if self.source is not None else None
        return (
            self.kind,
            self.shots,
            self.mixture,
            self.alpha,
            source,
            self.prompt_shots,
            self.freeze,
        )

    @property
    def uses_prompts(self) -> bool:
        return self.made.spec.prompted


_METHOD = re.compile(
    r"^(?P<kind>[a-z_]+)(?:\+(?P<shots>\d+)shot)?(?P<modifiers>(?:~[a-z0-9]+)*)"
    r"(?:@(?P<mixture>[A-Za-z0-9_.-]+))?$"
)
_PROMPT_SHOTS = re.compile(r"^prompt(?P<shots>\d+)shot$")
_FREEZE = re.compile(r"^freeze(?P<blocks>\d+)$")
_WISE = re.compile(r"^wise(?P<alpha>\d+(?:\.\d+)?):(?P<source>.+)$")


def parse_method(
    label: str,
    *,
    mixtures: Mapping[str, str],
    default_mixture: str,
    listed: Sequence[str],
    file: str | None = None,
) -> Method:
    """Parse ``kind[+Kshot][@mixture]`` or ``wiseA:LABEL`` (see the module docstring).

    Args:
        label: the label.
        mixtures: the config's ``mixtures`` (alias -> resolved path).
        default_mixture: the resolved ``stage2.mixture``, for labels without ``@``.
        listed: every label of the config's ``methods`` (a WiSE-FT source must be one).
        file: the config file, for errors.

    Raises:
        UserError: an unknown kind or mixture alias, +Kshot above :data:`MAX_SHOTS`; a
            wise weight outside [0, 1], or a wise label whose LABEL is not a listed method of
            a kind with ``wise_source``.
    """
    where = dict(file=file, key="methods")
    wise = _WISE.match(label)
    if wise:
        alpha = float(wise["alpha"])
        if not 0 <= alpha <= 1:
            raise UserError(
                f"method {label!r}: the WiSE-FT weight must be in [0, 1], got {wise['alpha']}",
                **where,
            )
        source = parse_method(
            wise["source"],
            mixtures=mixtures,
            default_mixture=default_mixture,
            listed=listed,
            file=file,
        )
        if not source.spec.wise_source:
            sources = ", ".join(k.name for k in _TABLE if k.wise_source)
            raise UserError(
                f"method {label!r}: WiSE-FT interpolates the weights of a full fine-tuning "
                f"method ({sources}), not {source.kind!r}",
                **where,
            )
        if source.label not in listed:
            raise UserError(
                f"method {label!r} interpolates {source.label!r}, which `methods` does not "
                "list; list it too (its final weights are the ones used)",
                **where,
            )
        return Method(label, "wise", source.shots, source.mixture, alpha=alpha, source=source)
    m = _METHOD.match(label)
    if not m or m["kind"] not in KINDS or m["kind"] == "wise":
        kinds = ", ".join(name for name in KINDS if name != "wise")
        raise UserError(
            f"unknown method {label!r}; use one of {kinds}, optionally with +Kshot, "
            "~promptJshot or ~freezeK and @mixture (e.g. promot+1shot@multi), or wiseA:LABEL "
            "(e.g. wise0.5:standard)",
            **where,
        )
    alias = m["mixture"]
    if alias is None:
        mixture = default_mixture
    elif alias in mixtures:
        mixture = mixtures[alias]
    else:
        raise UserError(
            f"method {label!r} names mixture {alias!r}, which `mixtures` does not define", **where
        )
    shots = int(m["shots"]) if m["shots"] is not None else None
    if shots is not None and shots > MAX_SHOTS:
        raise UserError(
            f"method {label!r}: +Kshot must be at most {MAX_SHOTS}, got {shots}", **where
        )
    prompt_shots, freeze = _modifiers(label, KINDS[m["kind"]], m["modifiers"], where)
    return Method(label, m["kind"], shots, mixture, prompt_shots=prompt_shots, freeze=freeze)


def _modifiers(label: str, kind: MethodKind, text: str, where: dict) -> tuple[int | None, int]:
    """``~promptJshot`` (a kind with bank prompts uses prompts tuned with J exemplars instead of
    its own number: the ablation of tuning and using them differently) and ``~freezeK`` (the
    embeddings and the bottom K blocks stay frozen through stage 2)."""
    prompt_shots, freeze = None, 0
    for modifier in [part for part in text.split("~") if part]:
        shots, blocks = _PROMPT_SHOTS.match(modifier), _FREEZE.match(modifier)
        if shots and kind.prompts == "bank":
            prompt_shots = int(shots["shots"])
            if prompt_shots > MAX_SHOTS:
                raise UserError(
                    f"method {label!r}: ~promptJshot must be at most {MAX_SHOTS}", **where
                )
        elif (
            blocks and kind.trainable in ("model", "both") and not (kind.freezing or kind.adapters)
        ):
            freeze = int(blocks["blocks"])
        elif shots or blocks:
            what = "its bank prompts" if shots else "a full fine-tuning of the model"
            raise UserError(
                f"method {label!r}: ~{modifier} needs {what}, which {kind.name} does not have",
                **where,
            )
        else:
            raise UserError(
                f"method {label!r}: unknown modifier ~{modifier}; use ~promptJshot or ~freezeK",
                **where,
            )
    return prompt_shots, freeze
