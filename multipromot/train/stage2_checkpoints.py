"""Stage 2's checkpoints folder as one object: where a run resumes from, saving (in the
training thread, or in the background with ``stage2.async_save``) and pruning to
``stage2.keep_last``.

The rules it keeps: pruning runs only once the checkpoint it keeps is published (a background
save is waited for first); the latest checkpoint and the best step's are never pruned; every
save, a preemption and the end of training wait for a background save in flight.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from multipromot.train import distributed as D
from multipromot.train.checkpoint import (
    BackgroundCheckpointer,
    latest_checkpoint,
    prune_checkpoints,
    resolve_resume,
    save_checkpoint,
)

__all__ = ["Checkpoints"]


class Checkpoints:
    """``<out_dir>/checkpoints`` of one stage-2 run.

    Args:
        root: the checkpoints folder.
        keep_last: checkpoints kept (0: all).
        async_save: write in a background thread while training goes on.
        protected: the steps pruning must keep besides the latest (the best step so far).
    """

    def __init__(
        self,
        root: Path,
        *,
        keep_last: int,
        async_save: bool,
        protected: Callable[[], set[int]] = set,
    ):
        self.root = Path(root)
        self.keep_last = keep_last
        self.async_save = async_save
        self.protected = protected
        self._background: BackgroundCheckpointer | None = None

    def resume_point(self, resume: str) -> Path | None:
        """The checkpoint a run continues from (``stage2.resume``; see
        :func:`multipromot.train.checkpoint.resolve_resume`), decided on rank 0."""
        return D.on_rank0(resolve_resume, self.root, resume)

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def save(self, step: int, **state) -> Path:
        """Write ``step_<step>`` (a collective: every rank calls it); ``state``: the arguments
        of :func:`multipromot.train.checkpoint.save_checkpoint` after ``step``."""
        self.settle()  # a background save still in flight: published (and pruned) first
        if not self.async_save:
            path = save_checkpoint(self.root, step, **state)
            self._prune()
            return path
        if self._background is None:  # dcp's CPU group: created once, collectively
            self._background = BackgroundCheckpointer()
        return self._background.save(self.root, step, **state)

    def settle(self) -> None:
        """Wait for the background save in flight, if any, then prune."""
        if self._background is not None and self._background.wait() is not None:
            self._prune()

    def _prune(self) -> None:
        D.on_rank0(prune_checkpoints, self.root, self.keep_last, self.protected())
