"""What a run reports: one epoch's numbers (the tutorial's line, the metrics record) and the whole run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import TrainConfig


@dataclass
class EpochResult:
    """One epoch's numbers, as the tutorial prints them, and the work the ODE layers did."""

    epoch: int
    time_s: float  # the training batches only
    train_accuracy: float  # fractions in [0, 1]
    test_accuracy: float
    mean_loss: float  # mean over the epoch's batches
    # Mean function evaluations per batch of the model's NeuralODE layers (None: the model has none).
    # Backward: f and vector-Jacobian evaluations of the adjoint pass (DirectAdjoint: one VJP per
    # forward evaluation). Under DDP, per process's share of a batch, averaged over the processes.
    f_evals_forward: float | None = None
    f_evals_backward: float | None = None
    lr: float | None = None

    def line(self, epochs: int) -> str:
        """The tutorial's progress line, with true percentages."""
        return (
            f"[{self.epoch}/{epochs}] \t Time {self.time_s:.2f}s \t "
            f"Training Accuracy: {100 * self.train_accuracy:.2f}% \t Test Accuracy: {100 * self.test_accuracy:.2f}%"
        )

    def record(self) -> dict[str, Any]:
        """The epoch's metrics record (a line of ``metrics.jsonl``)."""
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> EpochResult:
        """The epoch of a metrics record (fields it does not know are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})


@dataclass
class TrainResult:
    """A whole run: its configuration, device, data sizes, epochs and the trained model."""

    config: TrainConfig
    device: torch.device
    n_train: int
    n_test: int
    epochs: list[EpochResult] = field(default_factory=list)  # a resumed run's include the earlier ones
    model: nn.Module | None = field(default=None, repr=False)
    run_dir: Path | None = None
    start_epoch: int = 0  # epochs already done when this process started (resumed runs)
