"""multipromot: multi-task instruction tuning with a prompt bank (ProMoT).

The names research code needs (USER-STORIES story 3)::

    from multipromot import (PromptBank, PromptedModel, Router, load_mixture, MixtureSampler,
                             evaluate, normalized_average)
"""

from multipromot.bank import PromptBank
from multipromot.errors import BankError, UserError
from multipromot.metrics import normalized_average, specialization_rate
from multipromot.mixtures import load_mixture
from multipromot.router import Router
from multipromot.sampler import MixtureSampler
from multipromot.soft_prompt import PromptedModel
from multipromot.suites import evaluate_suite, load_suite
from multipromot.tasks import get_task

evaluate = evaluate_suite  # the k-shot suite evaluation (DESIGN's `evaluate`)

__all__ = [
    "PromptBank",
    "PromptedModel",
    "Router",
    "load_mixture",
    "MixtureSampler",
    "evaluate",
    "evaluate_suite",
    "load_suite",
    "normalized_average",
    "specialization_rate",
    "get_task",
    "UserError",
    "BankError",
]
__version__ = "0.1.0"
