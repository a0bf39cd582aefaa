"""The training loop: Adam on mean logit cross-entropy, one line per epoch; run directories,
resuming, data-parallel training under ``torchrun``.

Built for speed (it is benchmarked): the step is one function, :func:`train_step`; the batch
loop reads nothing back to the host beyond the adaptive solver's one error norm per step (the
loss is summed on the device, function evaluations are host counters); the timer covers the
training batches alone, as the tutorial's ``ttime`` does; accuracy is evaluated after, in eval
mode without gradients.

With a run directory (``run_dir``) each epoch ends by appending its record to ``metrics.jsonl``,
redrawing ``curves.png`` and writing a checkpoint (``last.pt``, the previous one kept as
``prev.pt``; see :mod:`odeflux.mnist.checkpoint`). Without one, nothing is written. A run
resumed from a checkpoint restarts at the epoch after it, with the weights, Adam's state, the
generators and the batch order restored: it ends with the same weights as a run never stopped
(same seed, same device, same number of processes).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from . import distributed
from .checkpoint import Checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .distributed import DistContext
from .model import ADAPTIVE_SOLVERS, FIRST_STEPS, PARAM_STRUCTURES, SENSEALGS, VJPS, create_model, trainable_parameters
from .optim import Adam

DEVICES = ("auto", "cpu", "cuda")
CONFIG_NAME = "config.json"
LossFn = Callable[..., torch.Tensor]
#: Test hook (never set it otherwise): ``batch:N`` SIGKILLs the process right after its N-th
#: optimisation step, ``epoch:N`` right after its N-th epoch is recorded (checkpoint complete),
#: ``checkpoint:N`` halfway through writing its N-th checkpoint. Counts are of this process, so a
#: resumed run counts from 1 again. Used by the resume tests to kill runs at exact points.
TEST_KILL_ENV = "ODEFLUX_TEST_KILL_AT"


def model_archs() -> tuple[str, ...]:
    """The architectures :func:`~odeflux.mnist.model.create_model` builds (its ``arch=`` values)."""
    from . import model as _model

    archs = getattr(_model, "ARCHS", None)
    if isinstance(archs, tuple) and archs:
        return archs
    return ("tutorial",) if "arch" not in inspect.signature(create_model).parameters else ("tutorial", "odenet")


LR_SCHEDULES = ("constant", "cosine")
Optimizer = Any  # odeflux.mnist.optim.Adam or any torch.optim optimizer


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
    deterministic: bool = False  # torch.use_deterministic_algorithms(True) for the run
    # The continuous adjoints' first step: "interval" tries each interval whole; "hairer" is
    # SciMLSensitivity's start (see odeflux.sensitivity.base.ContinuousAdjoint).
    adjoint_first_step: str = "interval"

    def __post_init__(self) -> None:
        choices = {
            "sensealg": SENSEALGS, "vjp": VJPS, "device": DEVICES, "params": PARAM_STRUCTURES, "solver": ADAPTIVE_SOLVERS,
            "arch": model_archs(), "lr_schedule": LR_SCHEDULES, "adjoint_first_step": FIRST_STEPS,
        }  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name, low in (("epochs", 1), ("batch_size", 1), ("seed", 0)):
            if not _is_int(getattr(self, name), low):
                raise ValueError(f"{name} must be an integer >= {low}, got {getattr(self, name)!r}")
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


class DeviceError(RuntimeError):
    """The requested device cannot be used."""


class DeterminismError(RuntimeError):
    """``deterministic=True`` met an operation without a deterministic implementation on this device."""


class RunDirError(RuntimeError):
    """The run directory cannot be used."""


def cuda_status() -> tuple[bool, str]:
    """Whether a CUDA GPU works (available and a tiny operation runs on it), and why not."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is available to this torch (torch.cuda.is_available() is False)"
    try:
        ok = float((torch.ones(4, device="cuda") * 2).sum()) == 8.0
    except Exception as exc:  # a broken driver or an unsupported card shows up only here
        return False, f"a CUDA GPU is visible but a test operation on it failed ({type(exc).__name__}: {exc})"
    return (True, "") if ok else (False, "a CUDA GPU is visible but computed a wrong result on a test operation")


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (which must work) or ``auto``: a working GPU if there is one, as Lux's ``gpu_device()``."""
    if name == "cpu":
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    ok, why = cuda_status()
    if ok:
        return torch.device("cuda")
    if name == "cuda":
        raise DeviceError(f"--device cuda: {why}; use --device cpu (or auto)")
    return torch.device("cpu")


def build_model(config: TrainConfig, device: torch.device | str | None = None) -> nn.Module:
    """``config``'s model, freshly initialised from its seed."""
    kwargs: dict[str, Any] = dict(
        sensealg=config.sensealg, vjp=config.vjp, solver=config.solver, rtol=config.rtol, atol=config.atol,
        params=config.params, seed=config.seed, compile=config.compile, device=device,
        adjoint_first_step=config.adjoint_first_step,
    )  # fmt: skip
    if config.arch != "tutorial":  # create_model without arch= builds the tutorial's
        kwargs["arch"] = config.arch
    return create_model(**kwargs)


def make_optimizer(model: nn.Module, lr: float = 1e-3) -> Adam:
    """Lux's ``Adam(lr)``: betas (0.9, 0.999), eps 1e-8. :class:`odeflux.mnist.optim.Adam` runs
    ``torch.optim.Adam``'s fused kernel without importing ``torch._dynamo`` (1.3 s of start-up)."""
    return Adam(trainable_parameters(model), lr=lr, betas=(0.9, 0.999), eps=1e-8)


Batch = tuple[torch.Tensor, torch.Tensor]


def train_step(model: nn.Module, batch: Batch, optimizer: Optimizer, loss_fn: LossFn = F.cross_entropy) -> torch.Tensor:
    """One optimisation step on ``batch = (x, y)``; returns the loss, detached and on the device."""
    x, y = batch
    loss = loss_fn(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def ddp_train_step(
    model: nn.Module, batch: Batch, optimizer: Optimizer, ctx: DistContext, loss_fn: LossFn = F.cross_entropy
) -> torch.Tensor:
    """One data-parallel step on the global ``batch``: this rank's contiguous share of it.

    The share's loss is ``world_size * sum(per-sample losses) / len(batch)``: DDP averages the
    ranks' gradients, which then equal the gradient of the global batch's mean loss however the
    batch splits. A rank whose share is empty (a last batch smaller than the world) runs one
    sample with weight zero, since every rank must take part in every backward pass. ``loss_fn``
    must take ``reduction="sum"``. Returns the weighted loss, detached: its sum over the ranks
    divided by ``world_size`` is the global batch's mean loss.
    """
    x, y = batch
    n = int(y.shape[0])
    start, stop = distributed.shard_bounds(n, ctx.rank, ctx.world_size)
    if stop > start:
        xs, ys, weight = x[start:stop], y[start:stop], ctx.world_size / n
    else:
        xs, ys, weight = x[:1], y[:1], 0.0
    loss = loss_fn(model(xs), ys, reduction="sum") * weight
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def warmup(model: nn.Module, batch: Batch, loss_fn: LossFn = F.cross_entropy) -> None:
    """The tutorial's warm-up: a forward and backward pass on one image, weights untouched."""
    x, y = batch
    loss = loss_fn(model(x[:1]), y[:1])
    loss.backward()
    model.zero_grad(set_to_none=True)
    _sync(x.device)


@torch.no_grad()
def accuracy(model: nn.Module, loader) -> float:
    """The fraction of correctly classified samples, in eval mode, one host read at the end."""
    correct, total = _count_correct(model, loader)
    return float(correct) / total if total else float("nan")


@torch.no_grad()
def _count_correct(model: nn.Module, loader) -> tuple[torch.Tensor | int, int]:
    was_training = model.training
    model.eval()
    correct, total = None, 0
    for x, y in loader:
        hits = (model(x).argmax(dim=1) == y).sum()
        correct = hits if correct is None else correct + hits
        total += y.shape[0]
    model.train(was_training)
    return (0 if correct is None else correct), total


def sharded_accuracy(model: nn.Module, data: Batch, batch_size: int, ctx: DistContext) -> float:
    """:func:`accuracy` of ``data = (x, y)`` with each rank evaluating its contiguous share; the
    counts are summed over the ranks (one all-reduce)."""
    from .data import BatchLoader

    x, y = data
    start, stop = distributed.shard_bounds(int(y.shape[0]), ctx.rank, ctx.world_size)
    if stop > start:
        correct, total = _count_correct(model, BatchLoader((x[start:stop], y[start:stop]), batch_size))
    else:
        correct, total = 0, 0
    counts = torch.stack([torch.as_tensor(correct, device=x.device).to(torch.float64),
                          torch.tensor(float(total), dtype=torch.float64, device=x.device)])  # fmt: skip
    distributed.all_reduce_sum(counts, ctx)
    c, t = counts.tolist()
    return c / t if t else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FEvalCounter:
    """Sums the function evaluations of a model's :class:`~odeflux.NeuralODE` layers over batches.

    The solver's counters are host integers, so :meth:`add` costs no device synchronisation.
    Call it after each step's backward pass (the adjoint's counters fill in during it).
    """

    def __init__(self, model: nn.Module):
        from ..nn import NeuralODE
        from ..sensitivity import DirectAdjoint

        nodes = [m for m in model.modules() if isinstance(m, NeuralODE)]
        self.nodes = [(m, isinstance(m.sensealg, DirectAdjoint)) for m in nodes]
        self.reset()

    def reset(self) -> None:
        self.forward = self.backward = self.batches = 0

    def add(self, backward: bool = True) -> None:
        """Count the last forward (and, with ``backward``, its backward) pass of every layer."""
        for node, direct in self.nodes:
            stats = node.last_stats
            if stats is None:
                continue
            self.forward += stats.n_f_evals
            if backward:
                if direct:  # backpropagation through the solve: one VJP per recorded evaluation
                    self.backward += stats.n_f_evals
                else:
                    bstats = getattr(node, "last_backward_stats", None)
                    if bstats is not None:
                        self.backward += bstats.n_f_evals + bstats.n_vjp_evals
        self.batches += 1

    def totals(self) -> list[float]:
        return [float(self.forward), float(self.backward), float(self.batches)]

    @staticmethod
    def means(totals: list[float], has_nodes: bool) -> tuple[float | None, float | None]:
        """Per-batch means of ``totals()`` (summed over ranks, which cancels in the ratio)."""
        fwd, bwd, batches = totals
        if not has_nodes or batches == 0:
            return None, None
        return fwd / batches, bwd / batches


def train_epoch(
    model: nn.Module,
    loader,
    optimizer: Optimizer,
    loss_fn: LossFn = F.cross_entropy,
    *,
    ctx: DistContext | None = None,
    counter: FEvalCounter | None = None,
    batches: Iterable[Batch] | None = None,
    before_step: Callable[[], None] | None = None,
) -> tuple[float, torch.Tensor]:
    """One pass over ``loader`` (or ``batches``, the same batches wrapped, e.g. in a progress bar).

    Returns (seconds, summed loss as a device tensor). With a multi-process ``ctx`` each batch is
    a global batch and the step is :func:`ddp_train_step`; the sum is then this rank's share
    (sum it over the ranks and divide by the world size for the global one).
    """
    device = next(model.parameters()).device
    model.train()
    loss_sum = torch.zeros((), device=device)
    dist = ctx is not None and ctx.enabled
    _sync(device)
    start = time.perf_counter()
    for batch in loader if batches is None else batches:
        if before_step is not None:  # a learning-rate schedule
            before_step()
        if dist:
            loss_sum += ddp_train_step(model, batch, optimizer, ctx, loss_fn)
        else:
            loss_sum += train_step(model, batch, optimizer, loss_fn)
        if counter is not None:
            counter.add()
    _sync(device)
    return time.perf_counter() - start, loss_sum


class _KillHook:
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
        return self._counted(batches) if self.kind == "batch" else batches

    def _counted(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        for batch in batches:
            yield batch
            self.batches_done += 1  # the loop asks for the next batch: this one's step is done
            if self.batches_done == self.at:
                self._die()

    def after_epoch(self) -> None:
        self.epochs_done += 1
        if self.kind == "epoch" and self.epochs_done == self.at:
            self._die()

    def checkpoint_midway(self) -> Callable[[], None] | None:
        self.checkpoints_done += 1
        return self._die if self.kind == "checkpoint" and self.checkpoints_done == self.at else None


class RunWriter:
    """Rank 0's files in a run directory: ``config.json``, ``metrics.jsonl``, ``curves.png``, checkpoints."""

    def __init__(self, run_dir: str | os.PathLike, config: TrainConfig, history: list[dict[str, Any]]):
        from .checkpoint import CHECKPOINT_NAME, atomic_write_bytes, is_intact
        from .metrics import CURVES_NAME, METRICS_NAME, MetricsLog

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
        from .metrics import plot_learning_curves

        self.metrics.append(record)
        plot_learning_curves(history, self.curves, self.title)
        save_checkpoint(self.dir, payload, _midway=midway)


def check_run_dir(run_dir: str | os.PathLike) -> Path:
    """A run directory a new run may use: not a file, and holding no checkpoint of another run."""
    from .checkpoint import CHECKPOINT_NAME

    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise RunDirError(f"--run-dir {path} is a file, not a directory: pick another --run-dir")
    if (path / CHECKPOINT_NAME).exists():
        raise RunDirError(f"--run-dir {path} already holds a run ({CHECKPOINT_NAME}): continue it with "
                          f"--resume {path}, or pick another --run-dir")
    return path


def train(
    config: TrainConfig | None = None,
    *,
    log: Callable[[str], None] | None = print,
    data=None,
    run_dir: str | os.PathLike | None = None,
    resume: Checkpoint | str | os.PathLike | None = None,
    progress: bool = False,
) -> TrainResult:
    """The tutorial's run: load the data, build the model, warm up, train ``config.epochs`` epochs.

    ``data`` may give ``((x_train, y_train), (x_test, y_test))`` instead of loading MNIST.
    ``log`` receives each epoch's line (``None``: silent). ``config.threads`` sets torch's intra-op
    threads for the run (restored after). ``run_dir``: where metrics, plots and checkpoints go
    (``None``: nowhere). ``resume``: a checkpoint (or its file or run directory) to continue from;
    its config is used unless ``config`` is given, and its run directory unless ``run_dir`` is.
    ``progress``: a progress bar per epoch on stderr (tqdm). Under ``torchrun`` (``RANK`` etc. set)
    the processes train data-parallel and only rank 0 logs and writes. Returns the per-epoch
    results and the model.
    """
    ckpt = resume if isinstance(resume, Checkpoint) or resume is None else load_checkpoint(resume)
    if config is None:
        config = TrainConfig.from_dict(ckpt.config) if ckpt is not None else TrainConfig()
    if ckpt is not None and run_dir is None:
        run_dir = ckpt.run_dir
    ctx = distributed.launch_context()
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        result = _train(config, log, data, run_dir, ckpt, progress, ctx)
        distributed.barrier(ctx)  # no rank tears the group down while another still talks to it
        return result
    finally:
        torch.set_num_threads(threads)
        if torch.are_deterministic_algorithms_enabled() != was_deterministic:
            # Only when changed: the call imports torch._inductor, two seconds of start-up.
            torch.use_deterministic_algorithms(was_deterministic)
        distributed.shutdown(ctx)


def _set_deterministic(device_name: str) -> None:
    if device_name != "cpu":  # cuBLAS reads this when its handle is created: before the first GPU matmul
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def _train(
    config: TrainConfig, log, data, run_dir, ckpt: Checkpoint | None, progress: bool, ctx: DistContext
) -> TrainResult:
    from .data import BatchLoader, tutorial_split

    if config.deterministic:
        _set_deterministic(config.device)
    device = distributed.setup(ctx, resolve_device(config.device))
    hook = _KillHook(os.environ.get(TEST_KILL_ENV))
    torch.manual_seed(config.seed)  # the global generators, for models that draw from them
    if data is None:
        data = tutorial_split(config.n_samples, config.train_split, data_dir=config.data_dir, dataset=config.dataset)
    (x_train, y_train), (x_test, y_test) = data
    train_loader = BatchLoader((x_train, y_train), config.batch_size, shuffle=True, seed=config.seed).to(device)
    train_eval = BatchLoader(train_loader.tensors, config.batch_size)  # same tensors, in order
    test_loader = BatchLoader((x_test, y_test), config.batch_size).to(device)

    model = build_model(config, device)
    optimizer = make_optimizer(model, config.lr)
    loss_fn = F.cross_entropy
    warmup(model, (train_loader.x, train_loader.y), loss_fn)

    history: list[dict[str, Any]] = []
    start_epoch = 0
    if ckpt is not None:
        start_epoch, history = _restore(ckpt, config, model, optimizer, ctx)
    net = distributed.wrap(model, ctx, device)
    writer = RunWriter(run_dir, config, history) if run_dir is not None and ctx.is_main else None

    result = TrainResult(config, device, int(y_train.shape[0]), int(y_test.shape[0]), model=model,
                         run_dir=None if run_dir is None else Path(run_dir), start_epoch=start_epoch)  # fmt: skip
    result.epochs = [EpochResult.from_record(r) for r in history]
    counter = FEvalCounter(model)
    schedule = None
    if config.lr_schedule == "cosine":
        n = len(train_loader)
        schedule = CosineLR(optimizer, config.lr, n * config.epochs, step=n * start_epoch)
    bar = _progress_bar if progress and ctx.is_main else None
    try:
        for epoch in range(start_epoch, config.epochs):
            train_loader.set_epoch(epoch)
            counter.reset()
            batches = hook.wrap(train_loader)
            if bar is not None:
                batches = bar(batches, len(train_loader), f"epoch {epoch + 1}/{config.epochs}")
            seconds, loss_sum = train_epoch(
                net, train_loader, optimizer, loss_fn, ctx=ctx, counter=counter, batches=batches, before_step=schedule
            )
            if ctx.enabled:
                totals = torch.tensor([float(loss_sum), *counter.totals()], dtype=torch.float64, device=device)
                loss_total, *evals = distributed.all_reduce_sum(totals, ctx).tolist()
                mean_loss = loss_total / ctx.world_size / len(train_loader)
                train_acc = sharded_accuracy(model, train_loader.tensors, config.batch_size, ctx)
                test_acc = sharded_accuracy(model, test_loader.tensors, config.batch_size, ctx)
            else:
                evals = counter.totals()
                mean_loss = float(loss_sum) / len(train_loader)
                train_acc, test_acc = accuracy(model, train_eval), accuracy(model, test_loader)
            fwd, bwd = FEvalCounter.means(evals, bool(counter.nodes))
            res = EpochResult(epoch + 1, seconds, train_acc, test_acc, mean_loss, fwd, bwd, optimizer.param_groups[0]["lr"])
            result.epochs.append(res)
            history.append(res.record())
            if log is not None and ctx.is_main:
                log(res.line(config.epochs))
            if run_dir is not None:
                states = distributed.all_gather_objects(rng_state(), ctx)
                if writer is not None:
                    payload = _payload(config, epoch + 1, model, optimizer, history, states, ctx)
                    writer.epoch(res.record(), history, payload, hook.checkpoint_midway())
            hook.after_epoch()
    except RuntimeError as exc:
        if config.deterministic and "deterministic" in str(exc):
            first = str(exc).strip().splitlines()[0]
            raise DeterminismError(f"--deterministic on {device.type}: {first} Run without --deterministic, "
                                   "or on --device cpu") from None
        raise
    return result


def _progress_bar(batches: Iterable[Batch], total: int, desc: str) -> Iterable[Batch]:
    from tqdm import tqdm

    return tqdm(batches, total=total, desc=desc, unit="batch", leave=False, file=sys.stderr, dynamic_ncols=True)


def _payload(
    config: TrainConfig, epoch: int, model: nn.Module, optimizer: Optimizer,
    history: list[dict[str, Any]], rng_states: list[dict[str, Any]], ctx: DistContext,
) -> dict[str, Any]:  # fmt: skip
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


def _restore(
    ckpt: Checkpoint, config: TrainConfig, model: nn.Module, optimizer: Optimizer, ctx: DistContext
) -> tuple[int, list[dict[str, Any]]]:
    """Load a checkpoint's weights, optimizer state and generators; returns (next epoch, history)."""
    from .checkpoint import CheckpointError

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
