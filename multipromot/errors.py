"""User-facing errors: one line naming the file and the key or entry, exit status 2."""

from __future__ import annotations

import os

__all__ = ["UserError", "BankError", "UnpinnedPromptWarning", "reports_errors"]


class UserError(Exception):
    """Bad input from the user: a config, mixture, template, data file, bank entry or argument.

    The CLI prints ``error: <file>: <key>: <message>`` on one line and exits with status 2.

    Args:
        message: what is wrong and, where it helps, what to do.
        file: the file the bad input came from, if any.
        key: the key, task, or bank entry (``task@v0002``) inside that file, if any.
    """

    def __init__(
        self, message: str, *, file: str | os.PathLike | None = None, key: str | None = None
    ):
        self.message = " ".join(str(message).split())  # always one line
        self.file = os.fspath(file) if file is not None else None
        self.key = key
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [p for p in (self.file, self.key) if p]
        return ": ".join([*parts, self.message])


class BankError(UserError):
    """A prompt-bank entry that is missing, corrupt, or does not fit the model."""


class UnpinnedPromptWarning(UserWarning):
    """A trained model gets other prompts than the ones it was trained with (the bank's current
    versions, or versions asked for by hand): allowed, and said out loud."""


def reports_errors() -> bool:
    """True on the process that prints a command's error line: a plain run, or under torchrun
    the first process of each node (``LOCAL_RANK`` 0; on one node that is rank 0).

    Every rank meets the same bad input and raises the same error, so one line per node's log
    is enough; a node-local problem (a file missing on one node) still reaches that node's
    log. Read from the environment: the process group may be gone by the time the error
    reaches the command line.
    """
    return os.environ.get("LOCAL_RANK", "0").strip() in ("", "0")
