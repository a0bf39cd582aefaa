"""A training run's settings: :class:`TrainConfig`, its validation, and the model it describes."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from .devices import DEVICES
from .model import ADAPTIVE_SOLVERS, ARCHS, FIRST_STEPS, PARAM_STRUCTURES, SENSEALGS, VJPS, create_model
from .schedule import LR_SCHEDULES


@dataclass
class TrainConfig:
    """Everything the tutorial varies; the defaults are its first run."""

    sensealg: str = "interpolating"
    vjp: str = "autograd"
    device: str = "auto"
    params: str = "flat"
    epochs: int = 9
    batch_size: int = 128
    n_samples: int | str = 1500
    train_split: float = 0.9
    lr: float = 1e-3
    lr_schedule: str = "constant"  # "cosine": lr decays to 0 over all batches of all epochs
    seed: int = 0
    rtol: float = 1e-3
    atol: float = 1e-3
    solver: str = "tsit5"
    data_dir: str | None = None
    dataset: str = "mnist"
    compile: bool = False
    # One intra-op thread: the ops here are tiny (a 128 x 20 state), so parallel regions cost more
    # than they save, and on a busy machine each one can wait milliseconds for a second core.
    threads: int | None = 1
    arch: str = "tutorial"  # create_model's arch: "tutorial" or "odenet"
    width: int | None = None  # the ODE-Net's channels (None: create_model's default); odenet only
    pooled_head: bool = False  # the ODE-Net with Chen et al.'s pooled head; odenet only
    deterministic: bool = False  # torch.use_deterministic_algorithms(True) for the run
    # The continuous adjoints' first step: "interval" tries each interval whole; "hairer" is
    # SciMLSensitivity's start (see odeflux.sensitivity.base.ContinuousAdjoint).
    adjoint_first_step: str = "interval"
    # Each image's ODE its own problem (solve(..., batch_axis=0)); any sensealg (continuous adjoints: vjp autograd or func).
    per_sample: bool = False

    def __post_init__(self) -> None:
        choices = {
            "sensealg": SENSEALGS, "vjp": VJPS, "device": DEVICES, "params": PARAM_STRUCTURES,
            "solver": ADAPTIVE_SOLVERS, "arch": ARCHS, "lr_schedule": LR_SCHEDULES, "adjoint_first_step": FIRST_STEPS,
        }  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name, low in (("epochs", 1), ("batch_size", 1), ("seed", 0)):
            if not _is_int(getattr(self, name), low):
                raise ValueError(f"{name} must be an integer >= {low}, got {getattr(self, name)!r}")
        if self.width is not None and not _is_int(self.width, 1):
            raise ValueError(f"width must be a positive integer or None, got {self.width!r}")
        if not isinstance(self.pooled_head, bool):
            raise ValueError(f"pooled_head must be True or False, got {self.pooled_head!r}")
        if self.arch != "odenet" and (self.width is not None or self.pooled_head):
            raise ValueError(f"width and pooled_head apply to arch='odenet' only, not arch={self.arch!r}: "
                             "leave them unset or set arch='odenet'")
        if self.threads is not None and not _is_int(self.threads, 1):
            raise ValueError(f"threads must be a positive integer or None, got {self.threads!r}")
        if self.n_samples != "all" and not _is_int(self.n_samples, 2):
            raise ValueError(f'n_samples must be an integer >= 2 or "all", got {self.n_samples!r}')
        if not 0.0 < self.train_split < 1.0:
            raise ValueError(f"train_split must lie strictly between 0 and 1, got {self.train_split!r}")
        for name in ("lr", "rtol", "atol"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be positive and finite, got {v!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from :func:`dataclasses.asdict` output (as checkpoints store it); missing fields
        take their defaults, unknown ones are a ``ValueError``."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown config fields {', '.join(unknown)} (written by a newer odeflux?)")
        return cls(**values)


def _is_int(v: object, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def build_model(config: TrainConfig, device: torch.device | str | None = None) -> nn.Module:
    """``config``'s model, freshly initialised from its seed."""
    return create_model(
        arch=config.arch, width=config.width, pooled_head=config.pooled_head, sensealg=config.sensealg,
        vjp=config.vjp, solver=config.solver, rtol=config.rtol, atol=config.atol, params=config.params,
        seed=config.seed, compile=config.compile, device=device, adjoint_first_step=config.adjoint_first_step,
        per_sample=config.per_sample,
    )  # fmt: skip
