"""``python -m multipromot.integrations.lmeval ARGS``: the ``lm_eval`` command with the
``multipromot`` model type registered (``lm_eval`` has no plugin discovery for models).

Example::

    python -m multipromot.integrations.lmeval --model multipromot \\
        --model_args pretrained=runs/demo/methods/promot/final,router=true \\
        --tasks lab_rte_lmeval --include_path eval/lm_eval
"""

from __future__ import annotations

import sys

from lm_eval.__main__ import cli_evaluate

import multipromot.integrations.lmeval  # noqa: F401  (registers the "multipromot" model type)

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    """Run lm-eval's command line with ``argv`` (default: this process's arguments)."""
    if argv is not None:
        # lm-eval's parser reads sys.argv itself (it inserts the default "run" subcommand).
        sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
