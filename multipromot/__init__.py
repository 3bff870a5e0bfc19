"""multipromot: multi-task instruction tuning with a prompt bank (ProMoT).

The names research code needs (USER-STORIES story 3)::

    from multipromot import (PromptBank, PromptedModel, Router, load_mixture, MixtureSampler,
                             evaluate, normalized_average)

Importing the package also registers the lab (its generated tasks and the ``lab`` model) with
the public registries; the library itself never imports the lab.
"""

import multipromot.lab  # noqa: F401  (registers the lab's tasks and model)
from multipromot.bank import PromptBank
from multipromot.data.metrics import normalized_average, specialization_rate
from multipromot.data.mixtures import load_mixture
from multipromot.data.sampler import MixtureSampler
from multipromot.data.tasks import get_task
from multipromot.errors import BankError, UnpinnedPromptWarning, UserError
from multipromot.eval.suites import evaluate_suite, load_suite
from multipromot.router import Router
from multipromot.soft_prompt import PromptedModel
from multipromot.trained import TrainedModel, load_trained

evaluate = evaluate_suite  # the k-shot suite evaluation (DESIGN's `evaluate`)

__all__ = [
    "PromptBank",
    "PromptedModel",
    "Router",
    "load_trained",
    "TrainedModel",
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
    "UnpinnedPromptWarning",
]
__version__ = "0.1.0"
