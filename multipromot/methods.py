"""The method grammar of ``run``: a label in the config's ``methods`` -> :class:`Method`.

::

    pretrained              the base model, no prompt
    prompt_tuning           the base model with the bank prompts (stage 1 only)
    standard                stage 2 without prompts
    promot                  stage 2 with frozen bank prompts
    joint                   stage 2 training prompt and model together
    random_prompt           stage 2 with a fixed random prompt per task
    promot_lora             the paper's Table 11: stage 1 trains a LoRA adapter per task instead
                            of a prompt; stage 2 fine-tunes the model with each row's task
                            adapter frozen and active (``lora.*`` keys)
    lora                    stage 2 trains one LoRA adapter, the model frozen; evaluated merged
    hft                     Half Fine-Tuning: standard with a random half of the parameter
                            tensors frozen each ``hft.round_steps`` steps
    wiseA:LABEL             WiSE-FT: the weights (1 - A) * base + A * LABEL's fine-tuned
                            weights, A in [0, 1] (``wise0.5:standard``, ``wise0.3:promot@multi``),
                            evaluated as LABEL is (its prompts, its routing) with no training;
                            LABEL (standard, promot, joint, random_prompt or hft, with its own
                            ``+Kshot``/``@mixture``) must be listed in ``methods`` too: its final
                            weights are the ones interpolated, never retrained for this

``+Kshot`` adds K exemplars to every stage-2 example (``promot+1shot``) and ``@name`` picks the
stage-2 mixture from ``mixtures`` in the config (``standard@multi``); without it the method uses
``stage2.mixture``. ``@`` already picks the mixture, so WiSE-FT's weight is glued to ``wise``.

This module only says which labels exist and what they name, so ``run``
(:mod:`multipromot.experiment`), its preflight and the lm-evaluation-harness bridge read a
label the same way; what each kind trains and how it is evaluated is ``run``'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from multipromot.config import RunConfig, resolve_path
from multipromot.errors import UserError

__all__ = ["Method", "parse_method", "KINDS", "STAGE1_KINDS", "LORA_KINDS", "WISE_SOURCES"]

KINDS = (
    "pretrained",
    "prompt_tuning",
    "standard",
    "promot",
    "joint",
    "random_prompt",
    "promot_lora",
    "lora",
    "hft",
)
_METHOD = re.compile(
    r"^(?P<kind>[a-z_]+)(?:\+(?P<shots>\d+)shot)?(?:@(?P<mixture>[A-Za-z0-9_.-]+))?$"
)
# wiseA:LABEL
_WISE = re.compile(r"^wise(?P<alpha>\d+(?:\.\d+)?):(?P<source>.+)$")
# the methods whose final weights WiSE-FT interpolates: full fine-tuning of the base model
WISE_SOURCES = ("standard", "promot", "joint", "random_prompt", "hft")
LORA_KINDS = ("lora", "promot_lora")
# the kinds that need this run's stage-1 prompts
STAGE1_KINDS = ("prompt_tuning", "promot", "joint")


@dataclass(frozen=True)
class Method:
    label: str
    kind: str
    shots: int | None  # +Kshot of the label; None = stage2.shots, else the mixture's header
    mixture: str  # path of the stage-2 mixture
    alpha: float | None = None  # wise: the fine-tuned weights' share
    source: Method | None = None  # wise: the method whose fine-tuned weights are interpolated

    @property
    def trains(self) -> bool:
        return self.kind not in ("pretrained", "prompt_tuning", "wise")

    @property
    def uses_prompts(self) -> bool:
        if self.source is not None:
            return self.source.uses_prompts
        return self.kind not in ("pretrained", "standard", "hft", *LORA_KINDS)


def parse_method(label: str, cfg: RunConfig) -> Method:
    """Parse ``kind[+Kshot][@mixture]`` or ``wiseA:LABEL`` (see the module docstring).

    Raises:
        UserError: an unknown kind or mixture alias; a wise weight outside [0, 1], or a wise
            label whose LABEL is not a listed full fine-tuning method.
    """
    wise = _WISE.match(label)
    if wise:
        return _parse_wise(label, wise, cfg)
    m = _METHOD.match(label)
    if not m or m["kind"] not in KINDS:
        raise UserError(
            f"unknown method {label!r}; use one of {', '.join(KINDS)}, optionally with +Kshot "
            "and @mixture (e.g. promot+1shot@multi), or wiseA:LABEL (e.g. wise0.5:standard)",
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
    shots = int(m["shots"]) if m["shots"] is not None else None
    return Method(label, m["kind"], shots, resolve_path(cfg, mixture))


def _parse_wise(label: str, match: re.Match, cfg: RunConfig) -> Method:
    where = dict(file=cfg.config_file or None, key="methods")
    alpha = float(match["alpha"])
    if not 0 <= alpha <= 1:
        raise UserError(
            f"method {label!r}: the WiSE-FT weight must be in [0, 1], got {match['alpha']}", **where
        )
    source = parse_method(match["source"], cfg)
    if source.kind not in WISE_SOURCES:
        raise UserError(
            f"method {label!r}: WiSE-FT interpolates the weights of a full "
            f"fine-tuning method ({', '.join(WISE_SOURCES)}), not "
            f"{source.kind!r}",
            **where,
        )
    if source.label not in cfg.methods:
        raise UserError(
            f"method {label!r} interpolates {source.label!r}, which `methods` does "
            "not list; list it too (its final weights are the ones used)",
            **where,
        )
    return Method(label, "wise", source.shots, source.mixture, alpha=alpha, source=source)
