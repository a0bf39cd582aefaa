"""``ScipySolver``: scipy's ``solve_ivp`` as an odeflux solver, on the CPU.

It is no step-by-step solver (``stepwise = False``): :func:`odeflux.integrator.integrate` hands it
the whole span, and it runs ``scipy.integrate.solve_ivp`` on float64 arrays, calling the torch
``f`` with tensors of the state's dtype and shape, and returns the same
:class:`~odeflux.integrator.IntegrationResult` as odeflux's own loop. What odeflux asks of an
integration maps onto scipy's options:

- ``dt0`` -> ``first_step``, ``dtmax`` -> ``max_step``, ``dtmin`` -> ``min_step`` (LSODA only);
- ``saveat`` and every saved state inside a step -> scipy's own dense output at those times;
- ``max_steps`` -> a terminal event that ends the solve after that many steps (``MAX_STEPS``);
- ``dense`` and ``on_accept`` (the continuous adjoints) -> per step, scipy's interpolant sampled
  at ``m`` equally spaced points and written as odeflux's dense output
  ``y0 + h sum_j L_j(theta) K_j`` with ``K_j = (y(t0 + j h / m) - y0) / h`` and ``L_j`` the
  Lagrange basis on ``0, 1/m, ..., 1``: exactly scipy's interpolant where that has degree at
  most ``m`` (RK23, RK45, Radau, DOP853, BDF), a degree-``m`` resampling of LSODA's;
- ``error_parts`` (an adjoint's mixed norm or seminorm) -> per-entry ``atol`` and a tighter
  ``rtol``, so that scipy's one RMS norm bounds every block's RMS norm: never looser than asked;
- failures -> an odeflux :class:`~odeflux.Status` with scipy's message.

Step-size controllers and ``first_step=`` heuristics are scipy's own; ``compile=True`` does not
apply. Gradients: scipy's steps are not recorded by autograd, so DirectAdjoint cannot
backpropagate through them; the continuous adjoints can (their backward solve runs through
scipy too).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from .tableau import ButcherTableau, Solver, VectorField

if TYPE_CHECKING:
    from ..integrator import IntegrateOptions, IntegrationResult

#: scipy.integrate.solve_ivp's methods.
METHODS = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")
# The order of each (the highest, for the variable-order BDF and LSODA).
_ORDER = {"RK45": 5, "RK23": 3, "DOP853": 8, "Radau": 5, "BDF": 5, "LSODA": 12}
# Points per step at which dense output samples scipy's interpolant: the interpolant's degree
# (BDF's at most 5), and 5 for LSODA (degree up to 12 in its Adams mode).
_SAMPLES = {"RK45": 4, "RK23": 3, "DOP853": 7, "Radau": 3, "BDF": 5, "LSODA": 5}
# The absolute tolerance of entries an error norm leaves out (a seminorm): large enough that
# they never count, finite for LSODA's weights.
_IGNORED_ATOL = 1e300

_NO_GRAPH = (
    "ScipySolver runs outside autograd, so no gradient can be backpropagated through its steps: pass "
    "sensealg=odeflux.BacksolveAdjoint() (or another continuous adjoint) rather than DirectAdjoint, and for "
    "create_graph=True use an odeflux solver such as odeflux.Tsit5()"
)

__all__ = ["METHODS", "ScipySolver", "require_cpu"]


def require_cpu(device: torch.device) -> None:
    """Refuse a state off the CPU (scipy computes on NumPy arrays)."""
    if device.type != "cpu":
        raise ValueError(
            f"ScipySolver runs on the CPU, got a state on {device}: pass y0.cpu() (and keep f on the CPU), "
            f"or use an odeflux solver such as odeflux.Tsit5() on {device.type}"
        )


def _as_float64(k: torch.Tensor) -> np.ndarray:
    """A derivative as a flat float64 array of its own (scipy may keep it)."""
    return np.array(k.detach().reshape(-1).cpu().numpy(), dtype=np.float64)


def _sampling_tableau(method: str, m: int) -> ButcherTableau:
    """The layout of a scipy step as odeflux's dense output sees it: ``K_j = (y(theta_j) - y0) / h``
    at ``theta_j = j / m``, and ``b_j(theta)`` the Lagrange basis polynomials on ``0, theta_1..m``
    (each zero at ``theta = 0``, so their coefficients start at ``theta**1``)."""
    nodes = np.arange(m + 1) / m
    coef = np.linalg.inv(np.vander(nodes, increasing=True))  # column j: L_j's coefficients, theta**0 first
    interp = tuple(tuple(float(v) for v in coef[1:, j]) for j in range(1, m + 1))
    return ButcherTableau(
        name=f"ScipySolver({method!r})", order=_ORDER[method], c=tuple(float(v) for v in nodes[1:]),
        a=tuple((0.0,) * i for i in range(m)), b=(0.0,) * (m - 1) + (1.0,), b_err=None, interp=interp,
        interp_order=m,
    )  # fmt: skip


def _block_tolerances(parts: tuple[tuple[int, int], ...], n: int, rtol: float, atol: float) -> tuple[float, np.ndarray]:
    """``(rtol, atol per entry)`` under which scipy's RMS norm over all ``n`` entries bounds the
    largest of the blocks' RMS norms (odeflux's mixed norm, :data:`odeflux.control.Parts`).

    Block ``b`` of ``n_b`` entries gets its tolerances scaled by ``w_b = sqrt(n_b / n)`` (``rtol``
    by the smallest ``w_b``, scipy's being one number): then scipy's norm squared is at least
    ``sum_b RMS_b**2``, so accepting a step (norm <= 1) accepts no block above its tolerance.
    Entries in no block get an absolute tolerance so large that they never count.
    """
    w = np.full(n, np.inf)
    for a, b in parts:
        w[a:b] = math.sqrt((b - a) / n)
    kept = np.isfinite(w)
    rtol_scaled = rtol * float(w[kept].min())
    if rtol_scaled < 100 * np.finfo(np.float64).eps:
        raise ValueError(
            f"ScipySolver: the adjoint's mixed error norm needs rtol={rtol_scaled:.3g} of scipy, below its floor: "
            "loosen the adjoint's rtol, or pass norm='rms' to the adjoint"
        )
    return rtol_scaled, np.where(kept, atol * w, _IGNORED_ATOL)


class _StepBudget:
    """A terminal event of ``solve_ivp`` that ends the solve after ``max_steps`` steps (scipy calls
    it once at ``t0`` and once after each step; once tripped it is zero at the last step's end,
    which its root finding then returns)."""

    terminal = True
    direction = 0.0  # (scipy's attribute: a zero reached from either side ends the solve)

    def __init__(self, max_steps: int, sign: float):
        self.max_steps, self.sign = max_steps, sign
        self.calls = 0
        self.t_stop: float | None = None

    def __call__(self, t: float, y: np.ndarray) -> float:
        if self.t_stop is None:
            self.calls += 1
            if self.calls > self.max_steps:  # the first call is at t0: max_steps steps taken
                self.t_stop = t
        return 1.0 if self.t_stop is None else self.sign * (self.t_stop - t)


@dataclass(eq=False)
class ScipySolver(Solver):
    """``scipy.integrate.solve_ivp`` with ``method`` (RK45, RK23, DOP853, Radau, BDF or LSODA; default
    LSODA, which switches between Adams and BDF as the problem turns stiff), CPU only.

    ``odeflux.solve(f, y0, span, solver=odeflux.ScipySolver("BDF"), rtol=..., atol=..., saveat=...)``;
    see :mod:`odeflux.solvers.scipy_solver` for how odeflux's options map onto scipy's. Gradients
    need a continuous adjoint (``sensealg=odeflux.BacksolveAdjoint()``, ...): DirectAdjoint cannot
    backpropagate through scipy. Stiff methods estimate the Jacobian by finite differences.
    """

    method: str = "LSODA"
    tableau: ButcherTableau = field(init=False, repr=False)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    stepwise: ClassVar[bool] = False
    adaptive: ClassVar[bool] = True
    fsal: ClassVar[bool] = False

    def __post_init__(self) -> None:
        by_name = {m.lower(): m for m in METHODS}
        method = by_name.get(self.method.lower()) if isinstance(self.method, str) else None
        if method is None:
            raise ValueError(f"ScipySolver: method={self.method!r} is not one of solve_ivp's: {', '.join(METHODS)}")
        self.method = method
        self.tableau = _sampling_tableau(method, _SAMPLES[method])

    @property
    def order(self) -> int:
        return _ORDER[self.method]

    @property
    def error_order(self) -> int:
        return _ORDER[self.method]

    def integrate_span(
        self, f: VectorField, y0: torch.Tensor, t0: float, t1: float, options: IntegrateOptions
    ) -> IntegrationResult:
        """The integration from ``t0`` to ``t1`` through ``solve_ivp`` (see the module docstring)."""
        from scipy.integrate import solve_ivp

        from ..control import DEFAULT_PI
        from ..integrator import IntegrationResult, _check_derivative
        from ..solution import DenseOutput, Stats, Status

        opts = options
        require_cpu(y0.device)
        if opts.compiled:
            raise ValueError("compile=True compiles odeflux's Runge-Kutta step, not scipy's: drop compile=True")
        unsupported = [
            name for name, v in (("norm=", opts.norm), ("step_times=", opts.step_times), ("jump_times=", opts.jump_times),
                                 ("perturb=True", opts.perturb), ("callbacks=", opts.callbacks)) if v
        ]  # fmt: skip
        if unsupported:
            raise ValueError(
                f"ScipySolver runs scipy's own step control, which has no {', '.join(unsupported)}: leave them out, "
                "or use an odeflux solver such as Tsit5()"
            )
        if opts.controller is not DEFAULT_PI:
            raise ValueError(
                "ScipySolver controls its own step size: leave controller= unset (dt0=, dtmin= and dtmax= reach scipy)"
            )
        shape, dtype, n = y0.shape, y0.dtype, y0.numel()
        np_dtype = np.float32 if dtype == torch.float32 else np.float64
        direction = 1.0 if t1 > t0 else -1.0

        def time(t: float) -> Any:
            return float(t) if opts.float_time else torch.full((), float(t), dtype=dtype)

        # f at the start, evaluated here rather than first inside scipy: its checks fail with a
        # clear message, and in grad mode it tells whether a graph is wanted (which scipy cannot give).
        if torch.is_grad_enabled():
            k0 = f(time(t0), y0)
            if y0.requires_grad or (isinstance(k0, torch.Tensor) and k0.requires_grad):
                raise ValueError(_NO_GRAPH)
        else:
            k0 = f(time(t0), y0)
        _check_derivative(k0, y0)
        y0_np = y0.detach().reshape(-1).to(torch.float64).numpy().copy()
        first = [_as_float64(k0)]  # served to scipy's first call
        nonfinite = [False]
        evals = [1]  # (scipy's nfev leaves out its finite-difference Jacobians' evaluations)

        def fun(t: float, y: np.ndarray) -> np.ndarray:
            if first and t == t0 and np.array_equal(y, y0_np):
                return first.pop()
            first.clear()
            yt = torch.from_numpy(np.array(y, dtype=np_dtype)).reshape(shape)  # a copy: f may keep or change it
            with torch.no_grad():
                k = f(time(t), yt)
            evals[0] += 1
            out = _as_float64(k)
            if not nonfinite[0] and not np.isfinite(out).all():
                nonfinite[0] = True
            return out

        rtol, atol = opts.rtol, opts.atol
        if opts.error_parts is not None:
            rtol, atol = _block_tolerances(opts.error_parts, n, rtol, atol)
        kw: dict[str, Any] = {}
        if opts.dt0 is not None:
            kw["first_step"] = min(abs(opts.dt0), abs(t1 - t0))
        if opts.dtmax is not None:
            kw["max_step"] = abs(opts.dtmax)
        if opts.dtmin is not None:
            if self.method != "LSODA":
                raise ValueError(f"dtmin= reaches scipy's min_step, which only LSODA has: drop dtmin for {self.method}")
            kw["min_step"] = abs(opts.dtmin)
            if _scipy_version()[:2] == (1, 17):
                warnings.warn(
                    "scipy 1.17's LSODA ignores min_step (scipy issue gh-25827): dtmin has no effect; "
                    "use scipy < 1.17 (or a release with the fix) for it to bound the steps"
                )
        want_steps = opts.dense or opts.on_accept is not None
        budget = _StepBudget(opts.max_steps, direction)
        res = solve_ivp(
            fun, (t0, t1), y0_np, method=self.method, rtol=rtol, atol=atol, events=budget,
            dense_output=want_steps or opts.saveat is not None, **kw,
        )  # fmt: skip

        steps = [float(v) for v in res.t]
        n_steps = len(steps) - 1
        Y = res.y  # (n, steps + 1): the state at each step's end, t0 first

        def state(i: int) -> torch.Tensor:
            return y0 if i == 0 else torch.from_numpy(np.ascontiguousarray(Y[:, i], dtype=np_dtype)).reshape(shape)

        if res.status == 0 or (res.status == 1 and steps[-1] == t1):
            status, message, steps[-1] = Status.SUCCESS, "", t1
        elif res.status == 1:
            status = Status.MAX_STEPS
            message = (
                f"max_steps={opts.max_steps} steps were taken and t={steps[-1]:.6g} has not reached t1={t1:.6g}: "
                "raise max_steps, loosen rtol/atol, or try a stiff method (ScipySolver('BDF'), 'Radau', 'LSODA')"
            )
        else:
            status = Status.NONFINITE if nonfinite[0] or not np.isfinite(Y[:, -1]).all() else Status.DT_MIN
            message = f"scipy's solve_ivp ({self.method}) stopped at t={steps[-1]:.6g}: {res.message}"
        t_end = steps[-1]
        y_end = state(n_steps)

        # Saved states, as odeflux's loop saves them.
        ts: list[float] = []
        ys: list[torch.Tensor] = []
        if opts.saveat is not None:
            for tau in opts.saveat:
                if direction * (tau - t0) <= 0:
                    ts.append(tau)
                    ys.append(y0)
                elif direction * (tau - t_end) < 0:
                    ts.append(tau)
                    ys.append(torch.from_numpy(np.asarray(res.sol(tau), dtype=np_dtype)).reshape(shape))
                elif tau == t_end:
                    ts.append(tau)
                    ys.append(y_end)
        else:
            if opts.save_start:
                ts.append(t0)
                ys.append(y0)
            if opts.save_everystep:
                inner = range(1, n_steps) if status == Status.SUCCESS else range(1, n_steps + 1)
                ts.extend(steps[i] for i in inner)
                ys.extend(state(i) for i in inner)
            if opts.save_end and not (ts and ts[-1] == t_end):
                ts.append(t_end)
                ys.append(y_end)

        # Each step as odeflux's dense output sees it (see _sampling_tableau).
        dense = None
        if want_steps and n_steps:
            m = self.tableau.stages
            keep = opts.dense and (
                opts.dense_budget is None or n_steps * (m + 1) * n * y0.element_size() <= opts.dense_budget
            )
            T = np.asarray(steps)
            H = np.diff(T)
            inner_t = (T[:-1, None] + H[:, None] * (np.arange(1, m) / m)).reshape(-1)
            S = res.sol(inner_t).T.reshape(n_steps, m - 1, n) if m > 1 else np.empty((n_steps, 0, n))
            starts, dts, y_starts, Ks = [], [], [], []
            for i in range(n_steps):
                ya, yb = Y[:, i], Y[:, i + 1]
                K_np = np.concatenate([S[i], yb[None]]) - ya
                K_np /= H[i]
                K = torch.from_numpy(K_np.astype(np_dtype)).reshape((m,) + tuple(shape))
                y_a, y_b = state(i), state(i + 1)
                if opts.on_accept is not None:
                    opts.on_accept(steps[i], float(H[i]), y_a, y_b, K)
                if keep:
                    starts.append(steps[i])
                    dts.append(float(H[i]))
                    y_starts.append(y_a)
                    Ks.append(K)
            if keep:
                dense = DenseOutput(self, starts, dts, y_starts, Ks, False)

        stats = Stats(n_f_evals=evals[0], n_steps=n_steps, n_accepted=n_steps, n_rejected=0)
        dt_next = abs(steps[-1] - steps[-2]) if n_steps else abs(t1 - t0)
        return IntegrationResult(ts, ys, t_end, y_end, None, dt_next, stats, status, message, dense)


def _scipy_version() -> tuple[int, ...]:
    import scipy

    return tuple(int(p) for p in scipy.__version__.split(".")[:2] if p.isdigit())
