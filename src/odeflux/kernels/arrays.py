"""Which tensors the NumPy kernels may read, and how: zero-copy views, and NumPy's BLAS threads.

On the tutorial's sizes (a 128 x 20 state, 10-wide layers) every torch op costs 3-6 us, mostly
dispatch and set-up, while the same matrix product through NumPy's BLAS takes about 1.3 us and
NumPy's ``tanh`` 0.6 us. The NumPy kernels (:mod:`.numpy_step`, :mod:`.dense_layers`) read the
tensors' memory through these views: nothing is copied in or out.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

DTYPES = (torch.float32, torch.float64)
#: States up to this many numbers may take the NumPy step (the tutorial's: 2560, its adjoint's 3100).
MAX_STATE_SIZE = 1 << 16
#: Above this many numbers in the widest activation, torch's kernels (and its threads) win.
MAX_ACTIVATION_SIZE = 1 << 16

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def as_array(t: torch.Tensor) -> np.ndarray:
    """The tensor's memory as an array (no copy)."""
    if t.requires_grad:
        t = t.detach()
    try:
        return t.numpy()
    except RuntimeError:  # a lazy negation or conjugation (checking first would cost every call)
        return t.resolve_neg().resolve_conj().numpy()


def _autocast_cpu() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def readable(t: torch.Tensor) -> bool:
    """Whether NumPy may stand in for torch on ``t``: a plain, dense CPU float tensor (not a
    subclass with behaviour of its own) whose memory NumPy can read (a ``torch.func`` transform's
    wrapper has none), carrying no forward-mode tangent (it would be dropped), with no CPU
    autocast about (it would compute in another precision). Checked once per solve, with
    public API only."""
    if type(t) not in _PLAIN_TYPES or t.device.type != "cpu" or t.layout != torch.strided or t.dtype not in DTYPES:
        return False
    if _autocast_cpu() or not untangled(t):
        return False
    try:
        t.data_ptr()
    except RuntimeError:  # a functorch wrapper (vmap, grad, jacrev...): no storage for NumPy to read
        return False
    return True


def untangled(t: torch.Tensor) -> bool:
    """Whether ``t`` is a plain tensor (not a subclass) carrying no forward-mode tangent: what is
    left to check of a tensor whose memory is known to be readable."""
    return type(t) in _PLAIN_TYPES and torch.autograd.forward_ad.unpack_dual(t).tangent is None


def small_state(y: torch.Tensor) -> bool:
    """Whether ``y`` is a state the NumPy kernels take: at most ``MAX_STATE_SIZE`` numbers, :func:`readable`."""
    return 0 < y.numel() <= MAX_STATE_SIZE and readable(y)


def state_applies(y: torch.Tensor) -> bool:
    """Whether ``y`` is a state for the NumPy step: :func:`small_state`, outside autograd (a graph
    through the step is the discrete adjoint's, and needs torch's ops)."""
    return not torch.is_grad_enabled() and small_state(y)


class _OneBLASThread:
    """Runs NumPy's BLAS on one thread while the block runs (nestable, restored after).

    The NumPy kernels' products are too small to gain from threads, yet some pass OpenBLAS's
    threading thresholds (an RK step's stage sums over the whole state; a stage plan's batched
    products). With torch's own thread pool active on the same cores, OpenBLAS's worker threads
    then wait on each other: measured on 2 cores with 2 torch threads, a batch-512 tutorial epoch
    took 2-3 times as long without this (benchmarks/blas_threads.py).

    The BLAS's thread count is process-wide, so the hold is taken only from the main thread,
    where a training loop runs (from any other thread it does nothing: NumPy work on the main
    thread is never slowed by a solve elsewhere), and it gives back the count it found. Needs
    ``threadpoolctl``; without it this does nothing.
    """

    def __init__(self) -> None:
        self._depth = 0
        self._libs: list | None = None
        self._saved: list[int] = []

    def _controllers(self) -> list:
        if self._libs is None:
            try:
                from threadpoolctl import ThreadpoolController

                self._libs = list(ThreadpoolController().select(user_api="blas").lib_controllers)
            except Exception:  # noqa: BLE001 (no threadpoolctl, or a BLAS it cannot drive: leave the threads alone)
                self._libs = []
        return self._libs

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if self._depth == 0:
            libs = self._controllers()
            self._saved = [lib.get_num_threads() for lib in libs]
            for lib, n in zip(libs, self._saved):
                if n != 1:
                    lib.set_num_threads(1)
        self._depth += 1

    def __exit__(self, *exc: object) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._depth -= 1
        if self._depth == 0:
            for lib, n in zip(self._libs or [], self._saved):
                if n != 1:
                    lib.set_num_threads(n)


#: ``with one_blas_thread:`` around work on the NumPy kernels (see :class:`_OneBLASThread`).
one_blas_thread = _OneBLASThread()
