"""What a solve returns: saved states, dense output, statistics and a status code."""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass, field, fields
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from .kernels import arrays

if TYPE_CHECKING:
    from .solvers.tableau import Solver


class Status(enum.IntEnum):
    """How a solve ended."""

    SUCCESS = 0
    MAX_STEPS = 1  # max_steps attempted steps were taken before reaching t1
    DT_MIN = 2  # the step size fell below dtmin
    NONFINITE = 3  # the state or f produced NaN or Inf
    NEWTON_FAILED = 4  # an implicit step's Newton iteration did not converge
    LINEAR_SOLVE_FAILED = 5  # a linearly implicit (Rosenbrock) step's matrix was singular


class SolveError(RuntimeError):
    """A solve did not reach the end of its time span. ``status`` and ``solution`` say how far it got."""

    def __init__(self, message: str, status: Status, solution: Solution | None = None):
        super().__init__(message)
        self.status = status
        self.solution = solution


@dataclass
class Stats:
    """Per-solve counters. ``n_steps`` counts attempted steps (accepted plus rejected).

    The linear algebra of (linearly) implicit steps: ``n_jacobians`` (Jacobians of ``f``
    computed), ``n_factorizations`` (LU factorisations), ``n_linear_solves`` (solves with them:
    Rosenbrock stages, Newton updates, error-estimate smoothing) and ``n_newton_iterations``;
    zero for explicit solvers. A matrix-free implicit solve (``linear_solver="gmres"``) forms and
    factorises nothing: each Newton update is one linear solve of ``n_krylov_iterations`` GMRES
    steps, and ``n_jvps`` counts its Jacobian-vector products (one per GMRES step, plus one per
    restart and per error smoothing), none of them in ``n_f_evals``."""

    n_f_evals: int = 0
    n_steps: int = 0
    n_accepted: int = 0
    n_rejected: int = 0
    n_jacobians: int = 0
    n_factorizations: int = 0
    n_linear_solves: int = 0
    n_newton_iterations: int = 0
    n_krylov_iterations: int = 0
    n_jvps: int = 0

    def add(self, other: Stats) -> None:
        for fl in fields(other):
            setattr(self, fl.name, getattr(self, fl.name) + getattr(other, fl.name))


@dataclass
class BackwardStats(Stats):
    """Counters of the backward (sensitivity) pass, filled in when the backward pass runs.

    ``n_f_evals`` counts evaluations of ``f`` alone (checkpoint re-solves, backsolve's state);
    ``n_vjp_evals`` the vector-Jacobian products; the step counters are the adjoint solve's.
    """

    n_vjp_evals: int = 0
    n_checkpoints: int = 0  # forward re-solves on checkpoint intervals
    n_quadrature_points: int = 0


def times_tensor(ts: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Host times as a 1-d tensor of ``like``'s dtype and device (on the CPU through NumPy, which
    turns a short list into an array several times faster than ``torch.tensor`` does)."""
    if like.device.type == "cpu" and like.dtype in arrays.DTYPES:
        return torch.from_numpy(np.array(ts, dtype=np.float32 if like.dtype == torch.float32 else np.float64))
    return torch.tensor(ts, dtype=like.dtype, device=like.device)


class RecordRows(Sequence):
    """The first ``n`` rows of a compiled loop's record tensor as a sequence of per-step tensors,
    each made when read (a list of all of them, made at once, took a fifth of a 100-step small
    solve's host time; the compiled reverse pass reads none)."""

    def __init__(self, rows: torch.Tensor, n: int):
        self.rows, self.n = rows, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self.rows[j] for j in range(*i.indices(self.n))]
        j = i + self.n if i < 0 else i
        if not 0 <= j < self.n:
            raise IndexError(f"step {i} of {self.n}")
        return self.rows[j]


class DenseOutput:
    """The method's own interpolant over the accepted steps: ``y(t)`` anywhere in the span."""

    def __init__(
        self, solver: Solver, t_starts: list[float], dts: list[float], y0s: list[torch.Tensor],
        Ks: list[torch.Tensor], on_arrays: bool = False, record: tuple[torch.Tensor, ...] | None = None,
    ):  # fmt: skip
        self.solver = solver
        #: Where a compiled loop made these steps: its record of them, the starts, signed sizes and
        #: start states as tensors (``(C,)``, ``(C,)``, ``(C, ...)``; rows past ``len(self)`` unused).
        #: A solve asked for the steps only (``IntegrateOptions.dense_stages=False``) keeps no
        #: stages (``Ks`` empty): a compiled loop's output is then read through this record, an
        #: eager one's not at all (its caller takes the steps again).
        self.record = record
        self.t_starts = t_starts
        self.dts = dts
        self.y0s = y0s
        self.Ks = Ks
        # 2-d views of each step's start and stages, made on first use: at() is on the adjoints' hot
        # path (the torch views, or the NumPy ones for small CPU states: one kind is ever used).
        self._2d: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(dts)
        self.direction = 1.0 if (not dts or dts[0] > 0) else -1.0
        # Sorted ascending for bisection whatever the direction of integration.
        self._keys = t_starts if self.direction > 0 else [-t for t in t_starts]
        self._interp_rev = solver.tableau.interp_reversed
        # The integrator's step kernel says whether its steps were NumPy-backed (odeflux.kernels).
        self._numpy_steps = bool(y0s) and on_arrays
        # A small plain CPU state is read on NumPy at one time too, whatever made its steps (one
        # array product, no tensor op's dispatch per lookup: an adjoint's VJPs each take one).
        self._small = self._numpy_steps or (bool(y0s) and arrays.small_state(y0s[0]))
        self._np: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(dts)
        self._q: dict[int, np.ndarray] = {}  # _powers' matrices of the steps last looked up

    def __len__(self) -> int:
        return len(self.dts)

    @property
    def t0(self) -> float:
        return self.t_starts[0]

    @property
    def t1(self) -> float:
        return self.t_starts[-1] + self.dts[-1]

    def step_index(self, t: float) -> int:
        key = t if self.direction > 0 else -t
        i = bisect.bisect_right(self._keys, key) - 1
        return min(max(i, 0), len(self.dts) - 1)

    def at(self, t: float) -> torch.Tensor:
        """The state at one host time ``t`` (the adjoints' hot path: one small matmul)."""
        if self._small and not torch.is_grad_enabled():  # on NumPy (odeflux.kernels)
            return torch.from_numpy(self.at_arrays([t]).reshape(self.y0s[0].shape))
        i = self.step_index(t)
        theta = (t - self.t_starts[i]) / self.dts[i]
        y0 = self.y0s[i]
        wt = self.weights_row(theta, y0.dtype, y0.device)
        row, mat = self._views(i)
        return torch.addmm(row, wt, mat, alpha=self.dts[i]).view(y0.shape)

    def _powers(self, i: int) -> np.ndarray:
        """Step ``i``'s interpolant as a polynomial in ``theta`` with matrix coefficients,
        ``y(t) = y_i + sum_k theta^k Q_k`` (``Q = h P^T K_i``, ``(degree, state size)``; kept for
        the last few steps looked up):
        a lookup is then one product with the powers of ``theta``, no stage weights to form."""
        q = self._q.get(i)
        if q is None:
            if len(self._q) >= 4:  # the adjoints walk the steps in order: a few recent ones suffice
                del self._q[next(iter(self._q))]
            K = self._arrays(i)[1]
            PT = self.solver.tableau.interp_matrix(K.dtype)  # (degree, stages)
            q = self._q[i] = np.dot(PT, K)
            q *= self.dts[i]
        return q

    def at_arrays(self, ts: Sequence[float]) -> np.ndarray:
        """States at host times ``ts`` as one ``(len(ts), state size)`` array (small CPU states;
        see :attr:`on_arrays`): one product per forward step the times fall in."""
        idx = [self.step_index(t) for t in ts]
        deg = len(self.solver.tableau.interp[0])
        rows = []
        for t, i in zip(ts, idx):
            theta = (t - self.t_starts[i]) / self.dts[i]
            p, row = 1.0, []
            for _ in range(deg):
                p *= theta
                row.append(p)
            rows.append(row)
        y0_np = self._arrays(idx[0])[0]
        T = np.array(rows, dtype=y0_np.dtype)  # (m, degree): the powers theta^1..theta^degree
        m = len(ts)
        out = np.empty((m, y0_np.size), dtype=y0_np.dtype)
        a = 0
        while a < m:  # one product per run of times in the same forward step (the stage times: 1-3 runs)
            i, b = idx[a], a + 1
            while b < m and idx[b] == i:
                b += 1
            block = out[a:b]
            np.dot(T[a:b], self._powers(i), out=block)
            block += self._arrays(i)[0]
            a = b
        return out

    @property
    def on_arrays(self) -> bool:
        """Whether the steps are NumPy-backed (odeflux.kernels): :meth:`at_arrays` applies."""
        return self._numpy_steps

    def _arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Step ``i``'s start and stages as arrays (views, made once)."""
        if self._np[i] is None:
            K = arrays.as_array(self.Ks[i])
            self._np[i] = (arrays.as_array(self.y0s[i]).reshape(-1), K.reshape(K.shape[0], -1))
        return self._np[i]

    def _views(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step ``i``'s start ``(1, n)`` and stages ``(stages, n)`` as tensor views (made once)."""
        if self._2d[i] is None:
            K = self.Ks[i]
            self._2d[i] = (self.y0s[i].reshape(1, -1), K.reshape(K.shape[0], -1))
        return self._2d[i]

    def _weights(self, theta: float) -> list[float]:
        """``b_i(theta)`` on the host, by Horner: ``theta (c_1 + theta (c_2 + ...))``."""
        w = []
        for row in self._interp_rev:
            acc = 0.0
            for c in row:
                acc = acc * theta + c
            w.append(acc * theta)
        return w

    def weights_row(self, theta: float, dtype: torch.dtype, device: torch.device, on_host: bool | None = None) -> torch.Tensor:
        """``b_i(theta)`` as a ``(1, stages)`` tensor.

        On the CPU the polynomial is evaluated in Python and becomes one small tensor. On an
        accelerator that would be a blocking host-to-device copy (a synchronisation per adjoint
        stage), so the weights are computed there from a filled scalar instead.
        """
        if on_host is None:
            on_host = device.type == "cpu"
        if on_host:
            return torch.tensor([self._weights(theta)], dtype=dtype, device=device)
        co = self.solver.coefficients(dtype, device)
        deg = co.interp.shape[1]
        exps = torch.arange(1, deg + 1, dtype=dtype, device=device)
        return torch.full((1, deg), theta, dtype=dtype, device=device).pow_(exps) @ co.interp.T

    def evaluate(self, ts: Sequence[float]) -> torch.Tensor:
        """States at host times ``ts`` (any order), stacked as ``(len(ts), *state_shape)``."""
        lo, hi = sorted((self.t0, self.t1))
        span = hi - lo
        for t in ts:
            if not (lo - 1e-12 * max(1.0, span) <= t <= hi + 1e-12 * max(1.0, span)):
                raise ValueError(f"t={t} is outside the solved span [{lo}, {hi}]; dense output does not extrapolate")
        groups: dict[int, list[int]] = {}
        for j, t in enumerate(ts):
            groups.setdefault(self.step_index(t), []).append(j)
        y0 = self.y0s[0]
        co = self.solver.coefficients(y0.dtype, y0.device)
        parts, order = [], []
        for i, idx in groups.items():
            theta = torch.tensor([(ts[j] - self.t_starts[i]) / self.dts[i] for j in idx], dtype=y0.dtype, device=y0.device)
            w = self.solver.dense_weights(theta, co)
            parts.append(self.solver.interpolate(self.y0s[i], self.dts[i], self.Ks[i], w))
            order.extend(idx)
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        if order != sorted(order):
            out = out[torch.tensor(sorted(range(len(order)), key=order.__getitem__), device=out.device)]
        return out


@dataclass
class Solution:
    """The result of :func:`odeflux.solve`.

    ``ts`` are the saved times and ``ys`` the saved states stacked along a new first axis.
    ``sol(t)`` evaluates the dense output (when kept). ``stats`` counts the work; ``status`` says
    how the solve ended. ``backward_stats`` is filled in by the backward pass of an adjoint method.
    ``events``, ``event_t`` and ``event_y``: see :func:`odeflux.solve`'s ``event``.
    """

    ts: torch.Tensor
    ys: torch.Tensor
    stats: Stats
    status: Status = Status.SUCCESS
    message: str = ""
    dense: DenseOutput | None = field(default=None, repr=False)
    backward_stats: BackwardStats | None = None
    t_final: float | None = None
    # Set by the continuous adjoints: a differentiable sol(t) (the adjoint runs from the queried times).
    dense_fn: Callable[[list[float]], torch.Tensor] | None = field(default=None, repr=False)
    # The state's structure when it is a tuple/list/dict of tensors (odeflux.tree.TreeSpec); ys holds it.
    tree: Any = field(default=None, repr=False)
    # Solves with events (odeflux.Event): every occurrence in order, as odeflux.events.EventRecord
    # (t, y, index), and the terminal one's time and state (None when none fired).
    events: list = field(default_factory=list)
    event_t: torch.Tensor | None = None
    event_y: torch.Tensor | None = field(default=None, repr=False)
    # The sensitivity method that computed the gradients (the one sensealg="auto" picked); None
    # when the solve recorded nothing to differentiate.
    sensealg: Any = field(default=None, repr=False)
    # Per-sample solves (solve(..., batch_axis=0)): each sample's status (a (batch,) tensor of
    # Status codes), the time it reached, and its counters (Stats' names, each a (batch,) tensor);
    # ``stats`` then holds the totals and ``status`` the worst.
    statuses: torch.Tensor | None = field(default=None, repr=False)
    t_reached: torch.Tensor | None = field(default=None, repr=False)
    sample_stats: dict | None = field(default=None, repr=False)

    @property
    def success(self) -> bool:
        return self.status == Status.SUCCESS

    @property
    def y_final(self) -> Any:
        """The last saved state (in the state's structure; per sample, each sample's last saved
        state, NaN where its last saveat time was padding)."""
        if len(self.ts) == 0:
            raise ValueError("this solution saved no state: set save_end=True or pass saveat")
        if self.tree is not None:
            return _index(self.ys, -1)
        if self.statuses is not None:  # per sample: (batch, n, ...), the end of each row
            return self.ys[:, -1]
        return self.ys[-1]

    def __call__(self, t: float | Sequence[float] | torch.Tensor) -> torch.Tensor:
        """Dense output at time ``t`` (a float gives one state; a sequence or 1-d tensor a stack)."""
        if self.dense is None:
            raise ValueError(
                "this solution kept no dense output: solve with dense=True (or save_everystep=True) to call sol(t)"
            )
        if isinstance(t, torch.Tensor):
            if t.ndim > 1:
                raise ValueError(f"sol(t) takes a scalar or a 1-d tensor of times, got shape {tuple(t.shape)}")
            scalar = t.ndim == 0
            times = [float(v) for v in t.reshape(-1).tolist()]
        elif isinstance(t, (int, float)):
            scalar, times = True, [float(t)]
        else:
            scalar, times = False, [float(v) for v in t]
        if self.dense_fn is not None and torch.is_grad_enabled():
            out = self.dense_fn(times)
        else:
            out = self.dense.evaluate(times)
        if self.tree is not None:
            out = self.tree.unflatten(out, batch=(out.shape[0],))
            return _index(out, 0) if scalar else out
        return out[0] if scalar else out


def _index(tree: Any, i: int) -> Any:
    """Entry ``i`` of each tensor in a structure of stacked tensors."""
    if isinstance(tree, torch.Tensor):
        return tree[i]
    if isinstance(tree, dict):
        return {k: _index(v, i) for k, v in tree.items()}
    return type(tree)(_index(v, i) for v in tree)
