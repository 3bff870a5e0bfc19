"""multipromot: multi-task instruction tuning with a prompt bank (ProMoT).

The names research code needs (USER-STORIES stories 3 and 13)::

    from multipromot import (PromptBank, PromptedModel, Router, load_mixture, MixtureSampler,
                             evaluate, normalized_average, load_trained)

They load on first use (:mod:`multipromot.lazy`): importing the package imports neither torch
nor transformers, so a command that needs no model starts at once. Importing the package also
registers the lab (its generated tasks and the ``lab`` models) with the public registries; the
library itself never imports the lab.
"""

from typing import TYPE_CHECKING

import multipromot.lab  # noqa: F401  (registers the lab's tasks and models; light)
from multipromot.errors import BankError, UnpinnedPromptWarning, UserError
from multipromot.lazy import exports

_EXPORTS = {
    "PromptBank": "multipromot.bank:PromptBank",
    "PromptedModel": "multipromot.soft_prompt:PromptedModel",
    "Router": "multipromot.router:Router",
    "load_trained": "multipromot.trained:load_trained",
    "TrainedModel": "multipromot.trained:TrainedModel",
    "load_mixture": "multipromot.data.mixtures:load_mixture",
    "MixtureSampler": "multipromot.data.sampler:MixtureSampler",
    "evaluate": "multipromot.eval.suites:evaluate_suite",  # DESIGN's `evaluate`: k-shot suite
    "evaluate_suite": "multipromot.eval.suites:evaluate_suite",
    "load_suite": "multipromot.eval.suite_file:load_suite",
    "normalized_average": "multipromot.data.metrics:normalized_average",
    "specialization_rate": "multipromot.data.metrics:specialization_rate",
    "get_task": "multipromot.data.tasks:get_task",
}
__getattr__ = exports(globals(), _EXPORTS)

if TYPE_CHECKING:  # what the table loads, for type checkers and readers
    from multipromot.bank import PromptBank
    from multipromot.data.metrics import normalized_average, specialization_rate
    from multipromot.data.mixtures import load_mixture
    from multipromot.data.sampler import MixtureSampler
    from multipromot.data.tasks import get_task
    from multipromot.eval.suite_file import load_suite
    from multipromot.eval.suites import evaluate_suite
    from multipromot.eval.suites import evaluate_suite as evaluate
    from multipromot.router import Router
    from multipromot.soft_prompt import PromptedModel
    from multipromot.trained import TrainedModel, load_trained

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


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
