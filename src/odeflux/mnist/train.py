"""The training loop: epochs of Adam steps, one line each; run directories, resuming, data-parallel under ``torchrun``.

Built for speed (it is benchmarked): the step is one function, :func:`~odeflux.mnist.steps.train_step`;
the batch loop reads nothing back to the host beyond the adaptive solver's one error norm per step
(the loss is summed on the device, function evaluations are host counters); the timer covers the
training batches alone, as the tutorial's ``ttime`` does; accuracy is evaluated after, in eval
mode without gradients.

With a run directory (``run_dir``) each epoch ends by appending its record to ``metrics.jsonl``,
redrawing ``curves.png`` and writing a checkpoint (``last.pt``, the previous one kept as
``prev.pt``; see :mod:`odeflux.mnist.rundir`). Without one, nothing is written. A run
resumed from a checkpoint restarts at the epoch after it, with the weights, Adam's state, the
generators and the batch order restored: it ends with the same weights as a run never stopped
(same seed, same device, same number of processes).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from . import distributed
from .checkpoint import Checkpoint, load_checkpoint, rng_state
from .config import TrainConfig, build_model
from .data import BatchLoader, tutorial_split
from .devices import DeterminismError, resolve_device, set_deterministic, synchronize
from .distributed import DistContext
from .killhook import TEST_KILL_ENV, KillHook
from .optim import Optimizer, make_optimizer
from .results import EpochResult, TrainResult
from .rundir import RunWriter, checkpoint_payload, restore_checkpoint
from .schedule import make_schedule
from .steps import Batch, FEvalCounter, LossFn, accuracy, ddp_train_step, sharded_accuracy, train_step, warmup


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
    synchronize(device)
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
    synchronize(device)
    return time.perf_counter() - start, loss_sum


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


def _train(
    config: TrainConfig, log, data, run_dir, ckpt: Checkpoint | None, progress: bool, ctx: DistContext
) -> TrainResult:
    if config.deterministic:
        set_deterministic(config.device)
    device = distributed.setup(ctx, resolve_device(config.device))
    hook = KillHook(os.environ.get(TEST_KILL_ENV))
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
        start_epoch, history = restore_checkpoint(ckpt, config, model, optimizer, ctx)
    net = distributed.wrap(model, ctx, device)
    writer = RunWriter(run_dir, config, history) if run_dir is not None and ctx.is_main else None

    result = TrainResult(config, device, int(y_train.shape[0]), int(y_test.shape[0]), model=model,
                         run_dir=None if run_dir is None else Path(run_dir), start_epoch=start_epoch)  # fmt: skip
    result.epochs = [EpochResult.from_record(r) for r in history]
    counter = FEvalCounter(model)
    schedule = make_schedule(config.lr_schedule, optimizer, config.lr, len(train_loader), config.epochs, start_epoch)
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
                    payload = checkpoint_payload(config, epoch + 1, model, optimizer, history, states, ctx)
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
