"""A run directory on disk: checked before use, rank 0's files written to it, checkpoints built and restored."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CHECKPOINT_NAME, Checkpoint, CheckpointError, is_intact, save_checkpoint, set_rng_state
from .config import TrainConfig
from .distributed import DistContext
from .fileio import atomic_write_bytes
from .metrics import CURVES_NAME, METRICS_NAME, MetricsLog, plot_learning_curves
from .optim import Optimizer

CONFIG_NAME = "config.json"


class RunDirError(RuntimeError):
    """The run directory cannot be used."""


class RunWriter:
    """Rank 0's files in a run directory: ``config.json``, ``metrics.jsonl``, ``curves.png``, checkpoints."""

    def __init__(self, run_dir: str | os.PathLike, config: TrainConfig, history: list[dict[str, Any]]):
        try:
            import matplotlib  # noqa: F401  (only checks it is there)
        except ImportError:
            raise RunDirError("the run directory's plots need matplotlib: pip install 'odeflux[app]'") from None
        self.dir = Path(run_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.dir / CONFIG_NAME, (json.dumps(asdict(config), indent=2) + "\n").encode())
            self.metrics = MetricsLog(self.dir / METRICS_NAME)
            self.metrics.reset(history)  # drops a record written after the last checkpoint
            for stale in self.dir.glob(".*.tmp-*"):  # temporary files of a killed run
                stale.unlink(missing_ok=True)
            last = self.dir / CHECKPOINT_NAME
            if last.exists() and not is_intact(last):  # resumed from prev.pt: don't rotate a bad file into its place
                os.replace(last, last.with_name(last.name + ".corrupt"))
        except OSError as exc:
            raise RunDirError(f"cannot write to the run directory {self.dir}: {exc.strerror or exc}; "
                              "pick another --run-dir") from None
        self.curves = self.dir / CURVES_NAME
        self.title = f"odeflux {config.arch} model, {config.dataset}, sensealg={config.sensealg}, seed {config.seed}"

    def epoch(self, record: dict[str, Any], history: list[dict[str, Any]], payload: dict[str, Any], midway=None) -> None:
        """Record a finished epoch: metrics line, plot, then the checkpoint (last, so that a resumed
        run never finds a checkpoint ahead of its metrics)."""
        self.metrics.append(record)
        plot_learning_curves(history, self.curves, self.title)
        save_checkpoint(self.dir, payload, _midway=midway)


def check_run_dir(run_dir: str | os.PathLike) -> Path:
    """A run directory a new run may use: not a file, and holding no checkpoint of another run."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--run-dir {path} is a file, not a directory: pick another --run-dir")
    if (path / CHECKPOINT_NAME).exists():
        raise RunDirError(f"--run-dir {path} already holds a run ({CHECKPOINT_NAME}): continue it with "
                          f"--resume {path}, or pick another --run-dir")
    return path


def checkpoint_payload(
    config: TrainConfig, epoch: int, model: nn.Module, optimizer: Optimizer,
    history: list[dict[str, Any]], rng_states: list[dict[str, Any]], ctx: DistContext,
) -> dict[str, Any]:  # fmt: skip
    """The checkpoint of a run after ``epoch`` epochs (see :mod:`odeflux.mnist.checkpoint` for the keys)."""
    from .. import __version__

    return {
        "epoch": epoch,
        "config": asdict(config),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": {"ranks": rng_states},
        "loader": {"seed": config.seed, "next_epoch": epoch},
        "history": [dict(r) for r in history],
        "world_size": ctx.world_size,
        "torch_version": str(torch.__version__),  # not TorchVersion: only plain types load safely
        "odeflux_version": __version__,
    }


def restore_checkpoint(
    ckpt: Checkpoint, config: TrainConfig, model: nn.Module, optimizer: Optimizer, ctx: DistContext
) -> tuple[int, list[dict[str, Any]]]:
    """Load a checkpoint's weights, optimizer state and generators; returns (next epoch, history)."""
    where = ckpt.path
    if ckpt.loader.get("seed") != config.seed:
        raise CheckpointError(f"{where} was trained with seed {ckpt.loader.get('seed')}, not {config.seed}: "
                              "a resumed run keeps its seed")
    try:
        model.load_state_dict(ckpt.model)
        optimizer.load_state_dict(ckpt.optimizer)
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{where} does not fit this model ({first[:160]}): resume with the configuration "
                              "it was written with") from None
    ranks = ckpt.rng.get("ranks") or []
    if ranks:
        set_rng_state(ranks[ctx.rank % len(ranks)])
    return int(ckpt.epoch), [dict(r) for r in ckpt.history]
