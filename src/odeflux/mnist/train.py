"""The tutorial's training loop: Adam on mean logit cross-entropy, one line per epoch.

Built for speed (it is benchmarked): the step is one function, :func:`train_step`; the batch
loop reads nothing back to the host beyond the adaptive solver's one error norm per step (the
loss is summed on the device); the timer
covers the training batches alone, as the tutorial's ``ttime`` does; accuracy is evaluated
after, in eval mode without gradients.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .model import ADAPTIVE_SOLVERS, PARAM_STRUCTURES, SENSEALGS, VJPS, create_model, trainable_parameters

DEVICES = ("auto", "cpu", "cuda")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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

    def __post_init__(self) -> None:
        choices = {
            "sensealg": SENSEALGS, "vjp": VJPS, "device": DEVICES, "params": PARAM_STRUCTURES, "solver": ADAPTIVE_SOLVERS,
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


def _is_int(v: object, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


@dataclass
class EpochResult:
    """One epoch's numbers, as the tutorial prints them."""

    epoch: int
    time_s: float  # the training batches only
    train_accuracy: float  # fractions in [0, 1]
    test_accuracy: float
    mean_loss: float  # mean over the epoch's batches

    def line(self, epochs: int) -> str:
        """The tutorial's progress line, with true percentages."""
        return (
            f"[{self.epoch}/{epochs}] \t Time {self.time_s:.2f}s \t "
            f"Training Accuracy: {100 * self.train_accuracy:.2f}% \t Test Accuracy: {100 * self.test_accuracy:.2f}%"
        )


@dataclass
class TrainResult:
    """A whole run: its configuration, device, data sizes, epochs and the trained model."""

    config: TrainConfig
    device: torch.device
    n_train: int
    n_test: int
    epochs: list[EpochResult] = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False)


class DeviceError(RuntimeError):
    """The requested device cannot be used."""


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


def make_optimizer(model: nn.Module, lr: float = 1e-3) -> torch.optim.Adam:
    """Lux's ``Adam(lr)``: betas (0.9, 0.999), eps 1e-8; fused kernels on CUDA, ``foreach`` elsewhere."""
    params = trainable_parameters(model)
    fused = all(p.is_cuda for p in params)
    kernels = {"fused": True} if fused else {"foreach": True}
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, **kernels)


Batch = tuple[torch.Tensor, torch.Tensor]


def train_step(model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer, loss_fn: LossFn = F.cross_entropy) -> torch.Tensor:
    """One optimisation step on ``batch = (x, y)``; returns the loss, detached and on the device."""
    x, y = batch
    loss = loss_fn(model(x), y)
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
    was_training = model.training
    model.eval()
    correct, total = None, 0
    for x, y in loader:
        hits = (model(x).argmax(dim=1) == y).sum()
        correct = hits if correct is None else correct + hits
        total += y.shape[0]
    model.train(was_training)
    return float(correct) / total if total else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(
    model: nn.Module, loader, optimizer: torch.optim.Optimizer, loss_fn: LossFn = F.cross_entropy
) -> tuple[float, torch.Tensor]:
    """One pass over ``loader``; returns (seconds, summed loss as a device tensor)."""
    device = next(model.parameters()).device
    model.train()
    loss_sum = torch.zeros((), device=device)
    _sync(device)
    start = time.perf_counter()
    for batch in loader:
        loss_sum += train_step(model, batch, optimizer, loss_fn)
    _sync(device)
    return time.perf_counter() - start, loss_sum


def train(config: TrainConfig | None = None, *, log: Callable[[str], None] | None = print, data=None) -> TrainResult:
    """The tutorial's run: load the data, build the model, warm up, train ``config.epochs`` epochs.

    ``data`` may give ``((x_train, y_train), (x_test, y_test))`` instead of loading MNIST.
    ``log`` receives each epoch's line (``None``: silent). ``config.threads`` sets torch's intra-op
    threads for the run (restored after). Returns the per-epoch results and the model.
    """
    config = config or TrainConfig()
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _train(config, log, data)
    finally:
        torch.set_num_threads(threads)


def _train(config: TrainConfig, log: Callable[[str], None] | None, data) -> TrainResult:
    from .data import BatchLoader, tutorial_split

    device = resolve_device(config.device)
    if data is None:
        data = tutorial_split(config.n_samples, config.train_split, data_dir=config.data_dir, dataset=config.dataset)
    (x_train, y_train), (x_test, y_test) = data
    train_loader = BatchLoader((x_train, y_train), config.batch_size, shuffle=True, seed=config.seed).to(device)
    train_eval = BatchLoader(train_loader.tensors, config.batch_size)  # same tensors, in order
    test_loader = BatchLoader((x_test, y_test), config.batch_size).to(device)

    model = create_model(
        sensealg=config.sensealg, vjp=config.vjp, solver=config.solver, rtol=config.rtol, atol=config.atol,
        params=config.params, seed=config.seed, compile=config.compile, device=device,
    )  # fmt: skip
    optimizer = make_optimizer(model, config.lr)
    loss_fn = F.cross_entropy
    warmup(model, (train_loader.x, train_loader.y), loss_fn)

    result = TrainResult(config, device, int(y_train.shape[0]), int(y_test.shape[0]), model=model)
    for epoch in range(config.epochs):
        train_loader.set_epoch(epoch)
        seconds, loss_sum = train_epoch(model, train_loader, optimizer, loss_fn)
        train_acc, test_acc = accuracy(model, train_eval), accuracy(model, test_loader)
        res = EpochResult(epoch + 1, seconds, train_acc, test_acc, float(loss_sum) / len(train_loader))
        result.epochs.append(res)
        if log is not None:
            log(res.line(config.epochs))
    return result
