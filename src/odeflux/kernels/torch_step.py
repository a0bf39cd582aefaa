"""The generic step kernel: every step on torch's ops, for any field, device and autograd mode."""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from ..control import Parts, error_ratio, part_rms
from ..solvers.tableau import Solver, Stepper

VectorField = Callable[[Any, torch.Tensor], torch.Tensor]


def rk_step_with_error(
    solver: Stepper, f: VectorField, t: torch.Tensor, y: torch.Tensor, dt: float, k: torch.Tensor, co: Any,
    rtol: float, atol: float, parts: Parts | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """One step of ``solver`` (an explicit Runge-Kutta solver, or an integration's
    :class:`~odeflux.solvers.tableau.Stepper`) and its scaled error norm (``None`` if fixed-step).

    Pure tensor code with no host synchronisation: this is what ``torch.compile`` traces.
    """
    y1, err, K = solver.step(f, t, y, dt, k, co)
    if err is None:
        return y1, K, None
    if torch.is_grad_enabled():
        with torch.no_grad():
            e = error_ratio(err, y, y1, rtol, atol, parts)
    else:
        e = error_ratio(err, y, y1, rtol, atol, parts)
    return y1, K, e


_COMPILED_STEP: Callable | None = None


def compiled_step() -> Callable:
    """:func:`rk_step_with_error` under ``torch.compile(fullgraph=True)``, built once per process."""
    global _COMPILED_STEP
    if _COMPILED_STEP is None:
        _COMPILED_STEP = torch.compile(rk_step_with_error, fullgraph=True)
    return _COMPILED_STEP


class TorchNorms:
    """:class:`odeflux.control.HairerNorms` on tensors."""

    def __init__(self, kernel: TorchStepKernel, y0: torch.Tensor, f0: torch.Tensor):
        self.kernel, self.y0, self.f0, self.parts = kernel, y0.detach(), f0.detach(), kernel.parts
        self.end = None if self.parts is None else self.parts[-1][1]
        yf, ff = self.y0.reshape(-1)[: self.end], self.f0.reshape(-1)[: self.end]
        self.scale = yf.abs().mul(kernel.rtol).add_(kernel.atol)
        self.d0, self.d1 = part_rms([yf / self.scale, ff / self.scale], self.parts)

    def change(self, t: float, h: float) -> float:
        f1 = self.kernel.evaluate(t, torch.add(self.y0, self.f0, alpha=h))
        df = (f1 - self.f0).reshape(-1)[: self.end]
        return part_rms([df / self.scale], self.parts)[0]


class TorchStepKernel:
    """Steps on torch's ops (:func:`rk_step_with_error`; compiled with ``compiled=True``), through
    the solver's stepper for this integration (:meth:`~odeflux.solvers.tableau.Solver.stepper`:
    a multistep method's history lives there, never on the solver)."""

    arrays = False

    def __init__(
        self, f: VectorField, solver: Solver, y0: torch.Tensor, rtol: float, atol: float, parts: Parts | None,
        float_time: bool, compiled: bool,
    ):  # fmt: skip
        self.f, self.solver, self.rtol, self.atol, self.parts = f, solver, rtol, atol, parts
        self.dtype, self.device = y0.dtype, y0.device
        self.co = solver.coefficients(y0.dtype, y0.device)
        self.float_time = float_time
        if compiled and not solver.tableau_steps:
            raise ValueError(
                f"compile=True compiles the Runge-Kutta step; {type(solver).__name__} takes others: drop compile=True"
            )
        self.stepper = solver.stepper(rtol, atol)
        self._step = compiled_step() if compiled else rk_step_with_error

    def running(self) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    def time(self, t: float) -> torch.Tensor | float:
        return t if self.float_time else torch.full((), t, dtype=self.dtype, device=self.device)

    def evaluate(self, t: float, y: torch.Tensor) -> torch.Tensor:
        return self.f(self.time(t), y)

    def step(self, t: float, y: torch.Tensor, h: float, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return self._step(self.stepper, self.f, self.time(t), y, h, k, self.co, self.rtol, self.atol, self.parts)

    def evaluations(self, K: torch.Tensor) -> int:
        return self.stepper.evaluations(K)

    def norms(self, t: float, y: torch.Tensor, k: torch.Tensor) -> TorchNorms:
        with torch.no_grad():
            return TorchNorms(self, y, k)
