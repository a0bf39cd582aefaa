"""The NumPy step kernel: the Runge-Kutta step, its error norm and Hairer's norms on arrays.

For small CPU states outside autograd (:func:`odeflux.kernels.arrays.state_applies`) whose
right-hand side evaluates on arrays (an :class:`~odeflux.kernels.ArrayField`) or plans its steps
(a :class:`~odeflux.kernels.StepPlanner`). The stage derivatives are written into one buffer
as they come, and the arrays view the tensors' memory: nothing is copied in or out.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch

from . import ArrayField, StepPlanner
from ..control import Parts
from . import arrays
from .arrays import as_array


def coefficients(solver: Any, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``[1 | a]`` (stages x (1 + stages)), ``[1, b]`` and ``b_err`` of the tableau as arrays of
    ``dtype``, cached on the solver: with the step's start as row 0 of the stage buffer, a stage's
    state is one product with a row of the first."""
    key = ("numpy", dtype)
    cached = solver._cache.get(key)
    if cached is None:
        tab = solver.tableau
        np_dtype = np.float32 if dtype == torch.float32 else np.float64
        s = tab.stages
        a = np.zeros((s, s + 1))
        a[:, 0] = 1.0
        a[:, 1:] = tab.a_matrix()
        b = np.concatenate(([1.0], tab.b))
        err = None if tab.b_err is None else np.asarray(tab.b_err, dtype=np_dtype)
        cached = solver._cache[key] = (a.astype(np_dtype), b.astype(np_dtype), err)
    return cached


def part_rms_array(x: np.ndarray, parts: Parts | None) -> float:
    """The RMS norm of the flat array ``x``, or the largest of its blocks' (see :data:`Parts`)."""
    if parts is None or len(parts) == 1 and parts[0][0] == 0:
        return math.sqrt(float(np.dot(x, x)) / x.size)
    return max(math.sqrt(float(np.dot(x[a:b], x[a:b])) / (b - a)) for a, b in parts)


class NumpyNorms:
    """:class:`odeflux.control.HairerNorms` on arrays."""

    def __init__(self, kernel: NumpyStepKernel, y0: torch.Tensor, f0: torch.Tensor):
        self.kernel, self.parts = kernel, kernel.parts
        n = self.end = None if self.parts is None else self.parts[-1][1]
        self.y0, self.f0 = as_array(y0).reshape(-1), as_array(f0).reshape(-1)
        self.scale = np.abs(self.y0[:n]) * kernel.rtol + kernel.atol
        self.d0, self.d1 = self._rms(self.y0[:n]), self._rms(self.f0[:n])

    def _rms(self, x: np.ndarray) -> float:
        return part_rms_array(x / self.scale, self.parts)

    def change(self, t: float, h: float) -> float:
        f1 = self.kernel.evaluate_array(t, self.y0 + h * self.f0)
        return self._rms(f1[: self.end] - self.f0[: self.end])


class NumpyStepKernel:
    """Steps on NumPy arrays (see the module docstring)."""

    arrays = True

    def __init__(
        self, f: Callable[..., torch.Tensor], solver: Any, y0: torch.Tensor, rtol: float, atol: float,
        parts: Parts | None, float_time: bool, array_f: ArrayField | None, planner: StepPlanner | None,
    ):  # fmt: skip
        if not solver.tableau_steps:
            raise TypeError(f"the NumPy step kernel runs explicit tableaus only, not {type(solver).__name__}")
        self.f, self.solver, self.rtol, self.atol, self.parts = f, solver, rtol, atol, parts
        self.shape, self.dtype = y0.shape, y0.dtype
        self.float_time = float_time
        self.array_f, self.planner = array_f, planner
        self.a, self.b, self.e = coefficients(solver, y0.dtype)
        self.c = solver.tableau.c
        self.fsal = solver.tableau.fsal

    def running(self) -> Any:
        return arrays.one_blas_thread  # (looked up per solve: benchmarks/blas_threads.py swaps it)

    def time(self, t: float) -> torch.Tensor | float:
        return t if self.float_time else torch.tensor(t, dtype=self.dtype)

    def evaluate_array(self, t: float, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``f(t, x)`` of a flat array, into ``out`` (flat) if given."""
        if self.array_f is not None:
            if out is None:
                out = np.empty_like(x)
            self.array_f.evaluate(t, x, out)
            return out
        k = as_array(self.f(self.time(t), torch.from_numpy(x.reshape(self.shape)))).reshape(-1)
        if out is None:
            return k
        out[...] = k
        return out

    def evaluate(self, t: float, y: torch.Tensor) -> torch.Tensor:
        if self.array_f is None:
            return self.f(self.time(t), y)
        return torch.from_numpy(self.evaluate_array(t, as_array(y).reshape(-1)).reshape(self.shape))

    def step(self, t: float, y: torch.Tensor, dt: float, k1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        a, b, e, c = self.a, self.b, self.e, self.c
        s, shape = len(c), self.shape
        y0 = as_array(y).reshape(-1)
        X = np.empty((s + 1, y0.size), dtype=y0.dtype)  # the start, then the stage derivatives
        X[0] = y0
        X[1] = as_array(k1).reshape(-1)
        coef = a * dt
        coef[:, 0] = 1.0
        plan = self.planner.plan_step(t, dt) if self.planner is not None else None
        yi = y0
        if plan is not None:
            # A split right-hand side (an adjoint's lambda and mu): the stages compute their first
            # plan.n entries from the first plan.n of the state alone; the rest of every new stage
            # comes at the end, all at once (plan.finish).
            m = plan.n
            for i in range(1, s):
                plan.stage(i, np.dot(coef[i, : i + 1], X[: i + 1, :m]), X[i + 1, :m])
            plan.finish(X[2:, m:])
            if self.fsal:
                yi = np.dot(coef[s - 1, :s], X[:s])
        else:
            for i in range(1, s):
                yi = np.dot(coef[i, : i + 1], X[: i + 1])
                self.evaluate_array(t + c[i] * dt, yi, X[i + 1])
        K = X[1:]
        if not self.fsal:
            bb = b * dt
            bb[0] = 1.0
            yi = np.dot(bb, X)
        y1, K_t = torch.from_numpy(yi.reshape(shape)), torch.from_numpy(K.reshape((s,) + tuple(shape)))
        if e is None:
            return y1, K_t, None
        err = np.dot(e, K)
        parts = self.parts
        if parts is not None:
            n = parts[-1][1]
            err, y0, yi = err[:n], y0[:n], yi[:n]
        # ||dt e.K / (atol + rtol s)|| = |dt| / rtol * ||e.K / (atol / rtol + s)||: two passes fewer
        scale = np.maximum(np.abs(y0), np.abs(yi))
        scale += self.atol / self.rtol
        err /= scale
        return y1, K_t, abs(dt) / self.rtol * part_rms_array(err, parts)

    def norms(self, t: float, y: torch.Tensor, k: torch.Tensor) -> NumpyNorms:
        return NumpyNorms(self, y, k)

    def evaluations(self, K: torch.Tensor) -> int:
        return K.shape[0] - 1  # every stage but the first (given) is one evaluation
