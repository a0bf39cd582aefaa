"""Learning-rate schedules, set before each optimiser step from the global step count."""

from __future__ import annotations

import math
from typing import Callable

from .optim import Optimizer

LR_SCHEDULES = ("constant", "cosine")


class CosineLR:
    """Cosine decay of the learning rate from its initial value to 0 over ``total`` optimiser steps,
    set before each step from the global step count (so a resumed run continues it exactly)."""

    def __init__(self, optimizer: Optimizer, base_lr: float, total: int, step: int = 0):
        self.optimizer, self.base_lr, self.total, self.count = optimizer, base_lr, max(total, 1), step

    def __call__(self) -> None:
        lr = 0.5 * self.base_lr * (1 + math.cos(math.pi * min(self.count, self.total) / self.total))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.count += 1


def make_schedule(
    name: str, optimizer: Optimizer, base_lr: float, batches_per_epoch: int, epochs: int, start_epoch: int = 0
) -> Callable[[], None] | None:
    """The ``name`` schedule (``LR_SCHEDULES``) of a run of ``epochs`` epochs resumed at
    ``start_epoch``, to call before each step; ``None`` for ``constant``."""
    if name not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {name!r}: choose one of {', '.join(LR_SCHEDULES)}")
    if name == "constant":
        return None
    return CosineLR(optimizer, base_lr, batches_per_epoch * epochs, step=batches_per_epoch * start_epoch)
