"""What every routing strategy shares: the decision record (:class:`Route`), a bank task as the
router sees it (:class:`RouterEntry`), the strategy protocol, and the first strategy (the caller
named the task)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from multipromot.data.templates import FormatSignature
from multipromot.errors import UserError

__all__ = ["Route", "RouterEntry", "RouteStrategy", "ExplicitTask"]


@dataclass(frozen=True)
class Route:
    """The router's decision for one input.

    Attributes:
        task: the bank task whose prompt to prepend, or None for no prompt.
        reason: one line saying which strategy decided and why.
        score: the strategy's confidence: 1.0 for explicit and signature decisions, the cosine
            similarity for the similarity fallback, 0.0 when nothing matched.
    """

    task: str | None
    reason: str
    score: float

    def to_json(self, text: str | None = None) -> dict:
        """The decision as ``multipromot route --json`` prints it.

        Args:
            text: the routed input.

        Returns:
            ``{"input": text, "task": task or None, "reason": ..., "score": ...}``.
        """
        return {"input": text, "task": self.task, "reason": self.reason, "score": self.score}


@dataclass
class RouterEntry:
    """One bank task as the router sees it.

    Attributes:
        task: the task name.
        signature: its input format (``Template.signature``), or None if unknown.
        examples: its validation inputs (0-shot), for the similarity fallback and to learn
            whether the template starts and ends with a literal piece.
    """

    task: str
    signature: FormatSignature | None = None
    examples: list[str] = field(default_factory=list)


@runtime_checkable
class RouteStrategy(Protocol):
    """One way of deciding. Return a :class:`Route` to decide an input, None to pass it on."""

    name: str

    def decide(self, texts: Sequence[str], requested: Sequence[str | None]) -> list[Route | None]:
        """Decide the inputs this strategy can.

        Args:
            texts: the inputs still undecided.
            requested: the caller's explicit task per input (None = let the router decide).

        Returns:
            One entry per input: a Route, or None to leave it to the next strategy.
        """
        ...


class ExplicitTask:
    """Strategy 1: a task the caller named wins, if the bank has it."""

    name = "explicit"

    def __init__(self, tasks: Sequence[str]):
        self.tasks = frozenset(tasks)

    def decide(self, texts: Sequence[str], requested: Sequence[str | None]) -> list[Route | None]:
        """See :class:`RouteStrategy`.

        Raises:
            UserError: a requested task is not in the bank.
        """
        routes: list[Route | None] = []
        for task in requested:
            if task is None:
                routes.append(None)
            elif task not in self.tasks:
                known = ", ".join(sorted(self.tasks)) or "none"
                raise UserError(f"task is not in the router's bank (tasks: {known})", key=task)
            else:
                routes.append(Route(task, "explicit: named by the caller", 1.0))
        return routes
