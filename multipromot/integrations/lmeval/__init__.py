"""lm-evaluation-harness model type ``multipromot`` (``pip install multipromot[lmeval]``).

Importing this package registers the model type with lm-eval's registry; the ``lm_eval``
command itself does not import third-party models, so run it through
``python -m multipromot.integrations.lmeval`` (same arguments) or ``multipromot-lm-eval``.
"""

from multipromot.integrations.lmeval.model import MultiPromotLM

__all__ = ["MultiPromotLM"]
