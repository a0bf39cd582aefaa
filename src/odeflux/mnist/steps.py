"""One optimisation step and what is measured around it: warm-up, accuracy, function-evaluation counts."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from . import distributed
from .data import BatchLoader
from .devices import synchronize
from .distributed import DistContext
from .optim import Optimizer

LossFn = Callable[..., torch.Tensor]
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
    synchronize(x.device)


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
        """Start counting afresh (each epoch)."""
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
        """(forward, backward, batches) summed so far, as floats for an all-reduce."""
        return [float(self.forward), float(self.backward), float(self.batches)]

    @staticmethod
    def means(totals: list[float], has_nodes: bool) -> tuple[float | None, float | None]:
        """Per-batch means of ``totals()`` (summed over ranks, which cancels in the ratio)."""
        fwd, bwd, batches = totals
        if not has_nodes or batches == 0:
            return None, None
        return fwd / batches, bwd / batches
