"""Data-parallel training under ``torchrun``: who this process is, its share of a batch, collectives.

``torchrun`` (``python -m torch.distributed.run``) exports ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` (and the rendezvous address) to each process it starts; :func:`launch_context`
reads them. With a world of more than one process, :func:`setup` starts the process group:
gloo on the CPU, NCCL on CUDA with one GPU per process (``cuda:LOCAL_RANK``).

Every rank iterates over the same global batches (same seed, same epoch) and takes a contiguous
share of each (:func:`shard_bounds`: sizes differ by at most one); the training step weighs its
loss so that DDP's gradient average equals the gradient of the global batch's mean loss, however
unevenly the batch splits (see :func:`odeflux.mnist.steps.ddp_train_step`).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

__all__ = [
    "DistContext", "DistributedError", "SINGLE", "all_gather_objects", "all_reduce_sum", "launch_context",
    "setup", "shard_bounds", "shutdown", "wrap",
]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_started: list[bool] = []  # non-empty while a process group started by setup() is up


class DistributedError(RuntimeError):
    """The launch environment or the process group is unusable."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: ``rank`` of ``world_size``, GPU index ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """More than one process: gradients and metrics are reduced across them."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0, the one that prints and writes files."""
        return self.rank == 0


SINGLE = DistContext()


def launch_context(environ: Mapping[str, str] | None = None) -> DistContext:
    """The job as ``torchrun`` describes it in ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; a single
    process when none is set. A partial or malformed set is a :class:`DistributedError`."""
    env = os.environ if environ is None else environ
    present = [k for k in _ENV if k in env]
    if not present:
        return SINGLE
    if len(present) != len(_ENV):
        missing = [k for k in _ENV if k not in env]
        raise DistributedError(f"{', '.join(present)} set but {', '.join(missing)} not: launch with torchrun "
                               "(python -m torch.distributed.run), or unset them for a single process")  # fmt: skip
    values = {}
    for k in _ENV:
        try:
            values[k] = int(env[k])
        except ValueError:
            raise DistributedError(f"{k}={env[k]!r} is not an integer: launch with torchrun, or unset it") from None
    rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
    if world < 1 or not 0 <= rank < world or local < 0:
        raise DistributedError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} do not describe a job "
                               "(need 0 <= RANK < WORLD_SIZE, LOCAL_RANK >= 0): launch with torchrun")
    return DistContext(rank, world, local)


def setup(ctx: DistContext, device: torch.device, timeout_s: float = 600.0) -> torch.device:
    """Start the process group for ``ctx`` (nothing for a single process); returns this rank's
    device: ``cuda:LOCAL_RANK`` when ``device`` is CUDA, else ``device``."""
    if not ctx.enabled:
        return device
    import torch.distributed as dist

    if device.type == "cuda":
        n = torch.cuda.device_count()
        if ctx.local_rank >= n:
            raise DistributedError(f"LOCAL_RANK={ctx.local_rank} but only {n} CUDA device(s): start at most {n} "
                                   "processes per node (--nproc_per_node), or use --device cpu")
        torch.cuda.set_device(ctx.local_rank)
        device = torch.device("cuda", ctx.local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed: run a single process")
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
            _started.append(True)
        except (ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DistributedError(f"cannot start the {backend} process group ({first}): launch with torchrun "
                                   "--standalone, or unset RANK/WORLD_SIZE/LOCAL_RANK") from None
    return device


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (a no-op for one process). Called only on the way out of a run that
    succeeded: after a failure the other ranks may never arrive."""
    if ctx.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()


def shutdown(ctx: DistContext) -> None:
    """End the process group if :func:`setup` started it (one started by the caller is left alone)."""
    if ctx.enabled and _started:
        import torch.distributed as dist

        _started.clear()
        if dist.is_initialized():
            dist.destroy_process_group()


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous share of ``n`` items: the first ``n % world_size``
    ranks take one more than the rest (a share may be empty when ``n < world_size``)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def wrap(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` when there are several processes, else itself."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (a no-op for one process); returns it."""
    if ctx.enabled:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` for one process)."""
    if not ctx.enabled:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out
