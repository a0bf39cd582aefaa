"""The resume tests' kill switch: SIGKILL a training run at an exact batch, epoch or checkpoint."""

from __future__ import annotations

import os
import signal
import sys
from typing import Callable, Iterable, Iterator

from .steps import Batch

#: Test hook (never set it otherwise): ``batch:N`` SIGKILLs the process right after its N-th
#: optimisation step, ``epoch:N`` right after its N-th epoch is recorded (checkpoint complete),
#: ``checkpoint:N`` halfway through writing its N-th checkpoint. Counts are of this process, so a
#: resumed run counts from 1 again. Used by the resume tests to kill runs at exact points.
TEST_KILL_ENV = "ODEFLUX_TEST_KILL_AT"


class KillHook:
    """The :data:`TEST_KILL_ENV` test hook (inactive unless the variable is set)."""

    def __init__(self, spec: str | None):
        self.kind, self.at = None, 0
        self.batches_done = self.epochs_done = self.checkpoints_done = 0
        if not spec:
            return
        kind, _, n = spec.partition(":")
        if kind not in ("batch", "epoch", "checkpoint") or not n.isdigit() or int(n) < 1:
            raise ValueError(f"{TEST_KILL_ENV}={spec!r}: expected batch:N, epoch:N or checkpoint:N (a test hook; unset it)")
        self.kind, self.at = kind, int(n)

    @staticmethod
    def _die() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def wrap(self, batches: Iterable[Batch]) -> Iterable[Batch]:
        """``batches``, counted when the hook kills at a batch."""
        return self._counted(batches) if self.kind == "batch" else batches

    def _counted(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        for batch in batches:
            yield batch
            self.batches_done += 1  # the loop asks for the next batch: this one's step is done
            if self.batches_done == self.at:
                self._die()

    def after_epoch(self) -> None:
        """Call once an epoch is recorded (its checkpoint complete)."""
        self.epochs_done += 1
        if self.kind == "epoch" and self.epochs_done == self.at:
            self._die()

    def checkpoint_midway(self) -> Callable[[], None] | None:
        """Call before each checkpoint: what to run halfway through writing it (``None``: nothing)."""
        self.checkpoints_done += 1
        return self._die if self.kind == "checkpoint" and self.checkpoints_done == self.at else None
