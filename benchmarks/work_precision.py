"""Work-precision: f evaluations against the error reached, odeflux's step-size controllers and the peers (issue 19).

Every configuration solves the same fields (same weights, same initial states, fixed seeds) over
rtol = atol in {1e-2, ..., 1e-6} (and 1e-7, 1e-8 for the float64 problems) with Tsit5 (one with
Dopri5, NeuralODE's default solver) and reports
the f evaluations spent and the max-abs error of the final state against a float64 reference
(scipy's DOP853 at rtol = atol = 1e-12 on a float64 copy of the field; 1e-9 for the piecewise
smooth convolutional field). The odeflux
configurations differ in the step-size controller and the first step (and one in the solver); torchdiffeq's dopri5
and torchode's Tsit5 (its two controllers) are the reference curves. Comparisons are made at equal
error, not at equal tolerance (see the method in the results file).

    python -m benchmarks.work_precision                # writes results/work_precision.md and one PNG per field
    python -m benchmarks.work_precision --quick        # tiny fields, two tolerances: prints only (seconds)
    python -m benchmarks.work_precision --only lotka_volterra --only van_der_pol --no-write
"""

from __future__ import annotations

import argparse
import copy
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

import odeflux
from odeflux.control import IController, PIController, StepSizeController
from odeflux.mnist.model import ConcatConv2d, dense, torch_default_init_
from odeflux.problem import make_problem
from odeflux.solution import Status

from .common import CountingField, closing_line, machine_info, markdown_table, publish, set_threads
from .provenance import code_state

RESULTS = Path(__file__).parent / "results"
RESULT = RESULTS / "work_precision.md"
PEERS = ("torchdiffeq", "torchode", "scipy", "matplotlib")
TOLS32 = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
TOLS64 = TOLS32 + (1e-7, 1e-8)
REF_TOL = 1e-12
MAX_STEPS = 100_000
GRID = 64  # error levels at which two curves are compared
MIN_OVERLAP = 0.5  # decades of common error range below which two curves are not compared


# -- controllers that odeflux does not ship: written against its StepSizeController interface -----


@dataclass
class DiffraxPID(StepSizeController):
    """diffrax's ``PIDController`` step rule (diffrax 0.7, ``_step_size_controller/pid.py``).

    With ``inv = 1/err`` and ``k`` the error order (5 for Tsit5, as diffrax's
    ``AbstractSolver.error_order`` gives for an ODE), the next step is ``dt * clip(safety *
    inv**((p+i+d)/k) * inv_prev**(-(p+2d)/k) * inv_prev2**(d/k), lo, hi)`` with ``[lo, hi] = [1,
    factormax]`` after an accepted step (an accepted step never shrinks the next) and
    ``[factormin, safety]`` after a rejected one. A step is kept when ``err < 1``; the error
    memory starts at 1 and only accepted steps enter it. diffrax's defaults: ``pcoeff=0, icoeff=1,
    dcoeff=0`` (integral only), ``safety=0.9, factormin=0.2, factormax=10``.
    """

    pcoeff: float = 0.0
    icoeff: float = 1.0
    dcoeff: float = 0.0
    safety: float = 0.9
    factormin: float = 0.2
    factormax: float = 10.0

    def init_state(self) -> tuple[float, float]:
        return 1.0, 1.0

    def propose(self, dt: float, err: float, state: tuple[float, float], order: int) -> tuple[bool, float, Any]:
        prev, prev2 = state
        if not math.isfinite(err):
            return False, dt * self.factormin, state
        keep = err < 1.0
        inv = 1.0 / err if err > 0 else math.inf
        c1 = (self.icoeff + self.pcoeff + self.dcoeff) / order
        c2 = -(self.pcoeff + 2 * self.dcoeff) / order
        c3 = self.dcoeff / order
        factor = self.safety * (inv**c1 if c1 else 1.0) * (prev**c2 if c2 else 1.0) * (prev2**c3 if c3 else 1.0)
        lo, hi = (1.0, self.factormax) if keep else (self.factormin, self.safety)
        factor = min(hi, max(lo, factor))
        if inv == 0 or math.isinf(inv):
            inv = 1.0
        return keep, dt * factor, ((inv, prev) if keep else state)


@dataclass
class LimitedPID(StepSizeController):
    """OrdinaryDiffEq's ``PIDController(beta1, beta2, beta3)`` (Söderlind 2003; Söderlind and Wang 2006).

    ``factor = limiter(inv**(beta1/k) * inv_prev**(beta2/k) * inv_prev2**(beta3/k))`` with
    ``inv = 1/max(err, eps)``, ``k = min(order, adaptive order) + 1`` (5 for Tsit5: odeflux passes 5)
    and the smooth limiter ``1 + atan(x - 1)`` (between about 0.21 and 2.57) in place of a safety
    factor and qmin/qmax; a step is accepted when ``factor >= accept_safety`` (0.81), so a step
    whose error norm is somewhat above 1 may be kept. The error memory starts at 1.
    """

    beta1: float = 1 / 6
    beta2: float = 1 / 6
    beta3: float = 0.0
    accept_safety: float = 0.81

    def init_state(self) -> tuple[float, float]:
        return 1.0, 1.0

    def propose(self, dt: float, err: float, state: tuple[float, float], order: int) -> tuple[bool, float, Any]:
        prev, prev2 = state
        if not math.isfinite(err):
            return False, dt * (1 + math.atan(-1.0)), state
        inv = 1.0 / max(err, np.finfo(np.float64).eps)
        x = inv ** (self.beta1 / order) * prev ** (self.beta2 / order) * prev2 ** (self.beta3 / order)
        factor = 1 + math.atan(x - 1)
        accept = factor >= self.accept_safety
        return accept, dt * factor, ((inv, prev) if accept else state)


@dataclass(frozen=True)
class Config:
    key: str  # column header
    label: str  # legend
    make: Callable[[], StepSizeController]
    first_step: str = "hairer"
    what: str = ""
    solver: Callable[[], Any] = odeflux.Tsit5


K_TSIT5 = 5  # the order odeflux passes to a controller for Tsit5 (its error_order)
CONFIGS: tuple[Config, ...] = (
    Config("(1) PI", "(1) PIController() [default]", PIController,
           what="`PIController()`, odeflux's default: OrdinaryDiffEq's PI controller, beta1 = 7/(10k), "
                "beta2 = 2/(5k), k = 5, i.e. Gustafsson's PI.3.4 (Söderlind's PI34: (beta1, beta2) = (0.7, -0.4)/k); "
                "safety 0.9, qmin 1/5, qmax 10, the error memory floored at qoldinit = 0.1; Hairer's first step"),
    Config("(1b) PI34 qold 1e-4", "(1b) PIController(qoldinit=1e-4) [OrdinaryDiffEq]",
           lambda: PIController(qoldinit=1e-4),
           what="`PIController(qoldinit=1e-4)`: (1) with OrdinaryDiffEq's and Hairer's floor of the error memory, "
                "1e-4 (odeflux's default until this measurement): after errors far below the tolerance the step "
                "grows about 2-3x a step, against 5-10x with (1)'s"),
    Config("(1c) PI qold 1e-2", "(1c) PIController(qoldinit=1e-2)", lambda: PIController(qoldinit=1e-2),
           what="`PIController(qoldinit=1e-2)`: between the two"),
    Config("(1d) PI integral start", "(1d) PIController(integral_start=True)",
           lambda: PIController(integral_start=True),
           what="`PIController(integral_start=True)`: (1), but the first accepted step (no error memory "
                "yet) proposes the next as (2) does, dt * clamp(0.9 err^(-1/5), 0.2, 10); the PI filter after it"),
    Config("(2) I", "(2) IController()", IController,
           what="`IController()`: dt * clamp(0.9 err^(-1/5), 0.2, 10) (torchdiffeq's and torchode's defaults); "
                "Hairer's first step"),
    Config("(3) diffrax I", "(3) diffrax PIDController()", DiffraxPID,
           what="diffrax's `PIDController` rule with its default coefficients (pcoeff 0, icoeff 1, dcoeff 0: "
                "integral only), written here as a `StepSizeController` (`DiffraxPID`): like (2) except that an "
                "accepted step never shrinks the next (factor in [1, 10]), a rejected one shrinks it by at "
                "least the safety factor (factor in [0.2, 0.9]), and a step is kept only when err < 1; "
                "Hairer's first step. torchode's `IntegralController` is (2)'s rule (err < 1 to accept)"),
    Config("(4) H211PI", "(4) PIController(H211PI)",
           lambda: PIController(beta1=1 / (6 * K_TSIT5), beta2=-1 / (6 * K_TSIT5), qoldinit=1e-4),
           what="`PIController(beta1=1/(6k), beta2=-1/(6k), qoldinit=1e-4)`, k = 5: Söderlind's H211PI filter, "
                "dt_next = dt (1/err_n)^(1/(6k)) (1/err_(n-1))^(1/(6k)) (beta2 is negative in OrdinaryDiffEq's "
                "q = err^beta1 / errold^beta2 convention), with the PI controller's safety 0.9, qmin, qmax, "
                "qoldinit 1e-4 and err <= 1 to accept; Hairer's first step"),
    Config("(4b) H211PI limiter", "(4b) H211PI, limiter + accept 0.81", LimitedPID,
           what="H211PI as OrdinaryDiffEq's `PIDController(1/6, 1/6)` runs it (`LimitedPID` here): the "
                "same filter, no safety factor or qmin/qmax but the limiter 1 + atan(x - 1), and a step "
                "accepted when the limited factor is at least 0.81 (for H211PI: err_n err_(n-1) <= ~600); "
                "Hairer's first step"),
    Config("(5) I interval", "(5) IController(), first_step=interval", IController, "interval",
           what="`IController()` with `first_step=\"interval\"`: the first step tries the whole span, "
                "and after a rejection goes on from the smaller of the controller's proposal and "
                "Hairer's estimate"),
    Config("(6) PI interval", "(6) PIController(), first_step=interval", PIController, "interval",
           what="the default controller with `first_step=\"interval\"` (separates the first step's effect "
                "from the controller's)"),
    Config("(7) Dopri5 PI", "(7) Dopri5, PIController() [NeuralODE's solver]", PIController, solver=odeflux.Dopri5,
           what="Dopri5 (`NeuralODE`'s default solver, chosen by gradient_work_precision) with the default "
                "controller and Hairer's first step: the forward's side of that choice"),
    Config("(7b) Dopri5 PI integral start", "(7b) Dopri5, PIController(integral_start=True)",
           lambda: PIController(integral_start=True), solver=odeflux.Dopri5,
           what="(7) with (1d)'s controller"),
)
PEER_KEYS = ("torchdiffeq dopri5", "torchode I", "torchode PID")
PEER_WHAT = {
    "torchdiffeq dopri5": "torchdiffeq 0.2.5 `odeint(method='dopri5')`: its I controller (safety 0.9, "
    "ifactor 10, dfactor 0.2, exponent 1/5, no shrink after an accepted step), its own initial step",
    "torchode I": "torchode `Tsit5` + `IntegralController(atol, rtol)` (safety 0.9, factors [0.2, 10], "
    "exponent 1/5)",
    "torchode PID": "torchode `Tsit5` + `PIDController(pcoeff=0.2, icoeff=0.5, dcoeff=0)`, the coefficients "
    "of its `solve_ivp` (the class has no default coefficients)",
}


# -- the fields --------------------------------------------------------------------------------------


def _time(t: Any, y: torch.Tensor) -> torch.Tensor:
    """``t`` as a 0-d tensor in ``y``'s dtype (odeflux and torchdiffeq pass 0-d tensors, torchode ``(1,)``)."""
    return torch.as_tensor(t, dtype=y.dtype, device=y.device).reshape(())


class TimeMLP(nn.Module):
    """``concat(y, t) -> Linear(d+1, h), tanh, Linear(h, h), tanh, Linear(h, d)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(dim + 1, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, dim)

    def forward(self, t: Any, y: torch.Tensor) -> torch.Tensor:
        tt = _time(t, y).expand(y.shape[0], 1)
        return self.l3(torch.tanh(self.l2(torch.tanh(self.l1(torch.cat([y, tt], dim=1))))))


class ConvField(nn.Module):
    """The ODE-Net's field without its last norm: GroupNorm, ReLU, concat-t conv 3x3, twice."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(32, channels), ConcatConv2d(channels, channels)
        self.norm2, self.conv2 = nn.GroupNorm(32, channels), ConcatConv2d(channels, channels)

    def forward(self, t: Any, y: torch.Tensor) -> torch.Tensor:
        return self.conv2(t, torch.relu(self.norm2(self.conv1(t, torch.relu(self.norm1(y))))))


class LotkaVolterra(nn.Module):
    """dx = alpha x - beta x y, dy = -delta y + gamma x y (DifferentialEquations.jl's example: 1.5, 1, 3, 1)."""

    def __init__(self, alpha: float = 1.5, beta: float = 1.0, delta: float = 3.0, gamma: float = 1.0):
        super().__init__()
        self.p = (alpha, beta, delta, gamma)

    def forward(self, t: Any, y: torch.Tensor) -> torch.Tensor:
        a, b, d, g = self.p
        x, z = y[0], y[1]
        return torch.stack([a * x - b * x * z, -d * z + g * x * z])


class VanDerPol(nn.Module):
    """dx = y, dy = mu (1 - x^2) y - x."""

    def __init__(self, mu: float = 1.0):
        super().__init__()
        self.mu = mu

    def forward(self, t: Any, y: torch.Tensor) -> torch.Tensor:
        x, v = y[0], y[1]
        return torch.stack([v, self.mu * (1 - x * x) * v - x])


class ExactTraceCNF(nn.Module):
    """A 2-D continuous normalizing flow's field on ``s = (z, a)``: ``dz/dt = g(t, z)``, an MLP of
    ``concat(z, t)``, and ``da/dt = tr(dg/dz)``, the exact trace by ``torch.autograd.grad`` inside the
    field (two backward passes, one per coordinate of z), as ``examples/cnf_two_moons.py``,
    torchdiffeq's CNF example and FFJORD compute it. When the caller records no graph (a forward solve
    under ``torch.no_grad``) the trace is taken without ``create_graph`` and the output is detached, so
    that a no-grad solve stays free of graphs; under grad the trace is differentiable (``create_graph``)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 2))

    def forward(self, t: Any, s: torch.Tensor) -> torch.Tensor:
        outer = torch.is_grad_enabled()
        with torch.enable_grad():
            z = s[:, :2]
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            dz = self.net(torch.cat([z, _time(t, s).expand(s.shape[0], 1)], dim=1))
            tr = sum(
                torch.autograd.grad(dz[:, i].sum(), z, create_graph=outer, retain_graph=True)[0][:, i] for i in range(2)
            )
        out = torch.cat([dz, tr.unsqueeze(1)], dim=1)
        return out if outer else out.detach()


def two_moons(n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` points on two interleaved half circles (noise 0.08), centred and scaled by 1.6 as in
    ``examples/cnf_two_moons.py`` (drawn here with torch's generator)."""
    k = torch.rand(n, generator=g) < 0.5
    a = math.pi * torch.rand(n, generator=g)
    x = torch.where(k, torch.cos(a), 1 - torch.cos(a))
    y = torch.where(k, torch.sin(a), 0.5 - torch.sin(a))
    pts = torch.stack([x, y], 1) + 0.08 * torch.randn(n, 2, generator=g)
    return (pts - torch.tensor([0.5, 0.25])) * 1.6


@dataclass
class Field:
    name: str
    title: str
    describe: str
    module: nn.Module  # odeflux gets it as it is; the peers through a counting wrapper
    y0: torch.Tensor
    t_span: tuple[float, float]
    autonomous: bool = False  # a module of y alone (the tutorial's nn.Sequential)
    ref_tol: float = REF_TOL  # the reference's rtol = atol

    @property
    def tols(self) -> tuple[float, ...]:
        return TOLS64 if self.y0.dtype == torch.float64 else TOLS32

    def call(self, module: nn.Module, t: Any, y: torch.Tensor) -> torch.Tensor:
        return module(y) if self.autonomous else module(t, y)


def tutorial_doubled(quick: bool) -> Field:
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(dense(20, 10, g), nn.Tanh(), dense(10, 10, g), nn.Tanh(), dense(10, 20, g), nn.Tanh())
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.mul_(2.0)
    batch = 8 if quick else 128
    y0 = torch.tanh(torch.randn(batch, 20, generator=torch.Generator().manual_seed(1)))
    return Field("tutorial_doubled", "(a) the tutorial's field, weights doubled",
                 f"`Linear(20,10)-tanh-Linear(10,10)-tanh-Linear(10,20)-tanh` as an `nn.Sequential` (the tutorial's "
                 f"Lux init: Glorot-uniform weights, zero biases, seed 0; every weight then doubled), state "
                 f"`tanh(randn({batch}, 20))` (seed 1) float32, t in [0, 1]",
                 net, y0, (0.0, 1.0), autonomous=True)  # fmt: skip


def time_mlp(quick: bool, scale: float = 1.0) -> Field:
    net = torch_default_init_(TimeMLP(64, 256), torch.Generator().manual_seed(2))
    with torch.no_grad():
        for m in (net.l1, net.l2, net.l3):
            m.weight.mul_(scale)
    batch = 16 if quick else 512
    y0 = torch.randn(batch, 64, generator=torch.Generator().manual_seed(3))
    desc = (f"`concat(y, t) -> Linear(65,256), tanh, Linear(256,256), tanh, Linear(256,64)` (PyTorch's default "
            f"init, seed 2{'' if scale == 1 else f'; every weight then multiplied by {scale:g}'}), state "
            f"`randn({batch}, 64)` (seed 3) float32, t in [0, 1]")  # fmt: skip
    if scale == 1:
        return Field("time_mlp", "(b) a time-dependent MLP", desc, net, y0, (0.0, 1.0))
    return Field(f"time_mlp_x{scale:g}", f"(b') the time-dependent MLP, weights x{scale:g}", desc, net, y0, (0.0, 1.0))


def time_mlp_x3(quick: bool) -> Field:
    """(b) at its default init is so smooth that one step reaches float32's floor at every tolerance;
    tripled weights give it a curve (errors from ~1e-3 down to the floor), as (a) doubles its weights."""
    return time_mlp(quick, 3.0)


def odenet_conv(quick: bool, batch: int | None = None) -> Field:
    net = torch_default_init_(ConvField(64), torch.Generator().manual_seed(4))
    batch = batch or (2 if quick else 32)
    y0 = torch.randn(batch, 64, 7, 7, generator=torch.Generator().manual_seed(5))
    # The ReLUs make f only piecewise smooth: every pre-activation crossing zero is a kink in y'' that
    # each step across it resolves at low order, so DOP853 needs ~2.5x the evaluations per decade of
    # tolerance here and its error is ~100x its tolerance. 1e-9 (about 2e-7 off) keeps the reference
    # two decades below the smallest error measured at a bearable cost.
    return Field("odenet_conv", "(c) the ODE-Net's convolutional field",
                 f"`GroupNorm(32,64)-ReLU-Conv2d(65,64,3,pad 1; t as a channel)-GroupNorm(32,64)-ReLU-Conv2d(65,64,3,"
                 f"pad 1; t as a channel)` (PyTorch's default init, seed 4), state `randn({batch}, 64, 7, 7)` (seed 5) "
                 f"float32, t in [0, 1]", net, y0, (0.0, 1.0), ref_tol=1e-7 if quick else 1e-9)  # fmt: skip


def lotka_volterra(quick: bool) -> Field:
    return Field("lotka_volterra", "(d) Lotka-Volterra",
                 "dx/dt = 1.5 x - x y, dy/dt = -3 y + x y (alpha 1.5, beta 1, delta 3, gamma 1 as in "
                 "DifferentialEquations.jl's example), y0 = (1, 1) float64, t in [0, 10]",
                 LotkaVolterra(), torch.tensor([1.0, 1.0], dtype=torch.float64), (0.0, 10.0))  # fmt: skip


def van_der_pol(quick: bool) -> Field:
    return Field("van_der_pol", "(e) Van der Pol",
                 "dx/dt = v, dv/dt = mu (1 - x^2) v - x with mu = 1, y0 = (2, 0) float64, t in [0, 10]",
                 VanDerPol(1.0), torch.tensor([2.0, 0.0], dtype=torch.float64), (0.0, 10.0))  # fmt: skip


CNF_SCALE = 4.0


def cnf_exact(quick: bool) -> Field:
    """At PyTorch's default init the flow is so smooth that every tolerance ends at float32's floor
    (as (b) does); weights x4 give it a curve from ~2e-2 down to ~4e-6 (measured with the default)."""
    net = torch_default_init_(ExactTraceCNF(32), torch.Generator().manual_seed(6))
    with torch.no_grad():
        for m in net.net:
            if isinstance(m, nn.Linear):
                m.weight.mul_(CNF_SCALE)
    batch = 16 if quick else 256
    x = two_moons(batch, torch.Generator().manual_seed(7))
    s0 = torch.cat([x, torch.zeros(batch, 1)], dim=1)
    return Field("cnf_exact", "(f) a 2-D CNF, exact trace",
                 f"the flow of `examples/cnf_two_moons.py`: state `(z, a)`, dz/dt = `Linear(3,32), tanh, Linear(32,32), "
                 f"tanh, Linear(32,2)` of `concat(z, t)` (PyTorch's default init, seed 6; every weight then multiplied "
                 f"by {CNF_SCALE:g}), da/dt = tr(dg/dz) exactly, by `torch.autograd.grad` inside the field (one backward "
                 f"pass per coordinate of z); z(0) = {batch} two-moons points (seed 7), a(0) = 0, float32, t in [0, 1]",
                 net, s0, (0.0, 1.0))  # fmt: skip


FIELDS: dict[str, Callable[[bool], Field]] = {
    "tutorial_doubled": tutorial_doubled,
    "time_mlp": time_mlp,
    "time_mlp_x3": time_mlp_x3,
    "odenet_conv": odenet_conv,
    "lotka_volterra": lotka_volterra,
    "van_der_pol": van_der_pol,
    "cnf_exact": cnf_exact,
}


# -- the solves --------------------------------------------------------------------------------------


@dataclass
class Point:
    tol: float
    nfe: int
    err: float  # inf where the solve failed
    rejected: int = -1
    failed: str = ""  # why the solve did not reach t1

    def cell(self) -> str:
        return f"{self.nfe} / failed ({self.failed})" if self.failed else f"{self.nfe} / {self.err:.1e}"


@torch.no_grad()
def reference(fld: Field, tol: float = REF_TOL) -> tuple[torch.Tensor, int]:
    """y(t1) from scipy's DOP853 at rtol = atol = ``tol`` on a float64 copy of the field (numpy wrapper)."""
    from scipy.integrate import DOP853

    f64 = copy.deepcopy(fld.module).double()
    shape = tuple(fld.y0.shape)

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        yt = torch.from_numpy(np.ascontiguousarray(y)).view(shape)
        return fld.call(f64, torch.tensor(t, dtype=torch.float64), yt).reshape(-1).numpy()

    t0, t1 = fld.t_span
    solver = DOP853(rhs, t0, fld.y0.double().reshape(-1).numpy().copy(), t1, rtol=tol, atol=tol)
    while solver.status == "running":
        solver.step()
    if solver.status != "finished":
        raise RuntimeError(f"the DOP853 reference failed on {fld.name}: {solver.status}")
    return torch.from_numpy(solver.y.copy()).view(shape), solver.nfev


def _err(final: torch.Tensor, ref: torch.Tensor) -> float:
    return float((final.detach().double() - ref).abs().max())


@torch.no_grad()
def run_odeflux(fld: Field, cfg: Config, tol: float, ref: torch.Tensor) -> Point:
    problem, _ = make_problem(
        fld.module, fld.y0, fld.t_span, cfg.solver(), None, None, tol, tol, None, False, False, True, None,
        None, None, None, MAX_STEPS, cfg.make(), False,
    )  # fmt: skip
    res = problem.integrate(first_step=cfg.first_step)
    if res.status != Status.SUCCESS:  # recorded, not raised: a controller that loses the solution is a result
        return Point(tol, res.stats.n_f_evals, math.inf, res.stats.n_rejected, f"{res.status.name} at t={res.t:.3g}")
    return Point(tol, res.stats.n_f_evals, _err(res.y, ref), res.stats.n_rejected)


@torch.no_grad()
def check_solve_path(fld: Field, tol: float) -> None:
    """The benchmark's path (make_problem + integrate, which takes first_step) is solve()'s: same
    evaluations, same answer."""
    sol = odeflux.solve(fld.module, fld.y0, fld.t_span, rtol=tol, atol=tol, save_start=False)
    problem, _ = make_problem(
        fld.module, fld.y0, fld.t_span, odeflux.Tsit5(), None, None, tol, tol, None, False, False, True, None,
        None, None, None, MAX_STEPS, PIController(), False,
    )  # fmt: skip
    res = problem.integrate(first_step="hairer")
    if sol.stats.n_f_evals != res.stats.n_f_evals or not torch.equal(sol.ys[-1], res.y):
        raise AssertionError(f"{fld.name}: solve() and make_problem().integrate() differ ({sol.stats} vs {res.stats})")


@torch.no_grad()
def run_peer(fld: Field, key: str, tol: float, ref: torch.Tensor) -> Point:
    counting = CountingField(fld.module, autonomous=fld.autonomous)
    t0, t1 = fld.t_span
    y0 = fld.y0
    if key == "torchdiffeq dopri5":
        import torchdiffeq

        ts = torch.tensor([t0, t1], dtype=y0.dtype)
        try:
            out = torchdiffeq.odeint(counting, y0, ts, rtol=tol, atol=tol, method="dopri5")
        except (AssertionError, RuntimeError) as e:  # torchdiffeq's underflow and max-steps checks
            return Point(tol, counting.n_calls, math.inf, -1, f"{type(e).__name__}: {str(e)[:40]}")
        return Point(tol, counting.n_calls, _err(out[-1], ref), counting.n_steps - counting.n_accepted)
    import torchode as to

    shape = tuple(y0.shape)

    def joint(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # One problem of the whole state (one step size, one error norm), as odeflux and torchdiffeq solve it.
        return counting(t, y.view(shape)).reshape(1, -1)

    term = to.ODETerm(joint)
    if key == "torchode I":
        ctrl = to.IntegralController(atol=tol, rtol=tol, term=term)
    else:
        ctrl = to.PIDController(atol=tol, rtol=tol, pcoeff=0.2, icoeff=0.5, dcoeff=0.0, term=term)
    solver = to.AutoDiffAdjoint(to.Tsit5(term=term), ctrl, max_steps=MAX_STEPS)
    problem = to.InitialValueProblem(
        y0.reshape(1, -1), t_start=torch.tensor([t0], dtype=y0.dtype), t_end=torch.tensor([t1], dtype=y0.dtype)
    )
    sol = solver.solve(problem)
    rejected = int(sol.stats["n_steps"][0] - sol.stats["n_accepted"][0])
    if int(sol.status[0]) != 0:
        return Point(tol, counting.n_calls, math.inf, rejected, f"{to.Status(int(sol.status[0])).name}")
    return Point(tol, counting.n_calls, _err(sol.ys[0, -1].view(shape), ref), rejected)


# -- comparing curves at equal error -----------------------------------------------------------------


def frontier(points: Sequence[Point]) -> list[tuple[float, float]]:
    """The curve's work-precision frontier as ``(log10 err, log10 nfe)``, err ascending: the points no
    other point of the same curve beats on both counts (fewer or as many evaluations and a smaller error)."""
    best = math.inf
    front = []
    for p in sorted(points, key=lambda p: (p.nfe, p.err)):
        if math.isfinite(p.err) and p.err < best:
            best = p.err
            front.append((math.log10(max(p.err, 1e-300)), math.log10(p.nfe)))
    return sorted(front)


def compare(a: Sequence[Point], b: Sequence[Point]) -> tuple[float, float] | None:
    """Geometric mean over the common error range of ``nfe_a(e) / nfe_b(e)``, each curve's log nfe
    interpolated linearly in log err along its frontier, at GRID log-spaced errors; and that range in
    decades. ``None`` when the ranges overlap by less than MIN_OVERLAP decades."""
    fa, fb = frontier(a), frontier(b)
    if not (fa and fb):
        return None
    lo, hi = max(fa[0][0], fb[0][0]), min(fa[-1][0], fb[-1][0])
    if hi - lo < MIN_OVERLAP:
        return None
    grid = np.linspace(lo, hi, GRID)
    la = np.interp(grid, [x for x, _ in fa], [y for _, y in fa])
    lb = np.interp(grid, [x for x, _ in fb], [y for _, y in fb])
    return float(10 ** np.mean(la - lb)), hi - lo


@dataclass
class FieldResult:
    fld: Field
    curves: dict[str, list[Point]] = field(default_factory=dict)
    ref_nfe: int = 0
    ref_check: float = math.nan  # |DOP853 at ref_tol - DOP853 at 10 ref_tol|
    seconds: float = 0.0
    best_peer: str | None = None
    vs_default: dict[str, tuple[float, float] | None] = field(default_factory=dict)
    vs_peer: dict[str, tuple[float, float] | None] = field(default_factory=dict)

    def summarise(self) -> None:
        base = self.curves[CONFIGS[0].key]
        self.vs_default = {k: compare(c, base) for k, c in self.curves.items()}
        peers = [(v[0], k) for k, v in self.vs_default.items() if k in PEER_KEYS and v is not None]
        self.best_peer = min(peers)[1] if peers else None
        if self.best_peer is not None:
            bp = self.curves[self.best_peer]
            self.vs_peer = {k: compare(c, bp) for k, c in self.curves.items()}


def run_field(fld: Field, peers: bool, tols: Sequence[float], quick: bool) -> FieldResult:
    start = time.perf_counter()
    out = FieldResult(fld)
    ref, out.ref_nfe = reference(fld, fld.ref_tol)
    ref_loose, _ = reference(fld, fld.ref_tol * 10)
    out.ref_check = _err(ref_loose, ref)  # what one decade of reference tolerance changes
    check_solve_path(fld, tols[len(tols) // 2])
    for cfg in CONFIGS:
        out.curves[cfg.key] = [run_odeflux(fld, cfg, tol, ref) for tol in tols]
    if peers:
        for key in PEER_KEYS:
            out.curves[key] = [run_peer(fld, key, tol, ref) for tol in tols]
    out.seconds = time.perf_counter() - start
    out.summarise()
    return out


# -- output ------------------------------------------------------------------------------------------


def _ratio(v: tuple[float, float] | None) -> str:
    return "–" if v is None else f"{v[0]:.2f}"


def field_section(r: FieldResult) -> str:
    fld = r.fld
    keys = list(r.curves)
    rows = []
    for i, pt in enumerate(r.curves[keys[0]]):
        rows.append([f"{pt.tol:g}"] + [r.curves[k][i].cell() for k in keys])
    table = markdown_table(["rtol = atol", *keys], rows, align="r" * (len(keys) + 1))
    ratios = [e.err / e.tol for k in keys for e in r.curves[k] if not e.failed]
    default_ratios = [p.err / p.tol for p in r.curves[CONFIGS[0].key] if not p.failed]
    detail_rows = []
    for k in keys:
        vd, vp = r.vs_default.get(k), r.vs_peer.get(k)
        rej = sum(max(p.rejected, 0) for p in r.curves[k])
        detail_rows.append([k, _ratio(vd), "–" if vd is None else f"{vd[1]:.1f}", _ratio(vp),
                            "–" if vp is None else f"{vp[1]:.1f}", sum(p.nfe for p in r.curves[k]), rej])  # fmt: skip
    detail = markdown_table(
        ["configuration", "NFE ÷ (1) at equal error", "over (decades)", f"NFE ÷ {r.best_peer}", "over (decades)",
         "NFE, all tolerances", "rejected steps, all tolerances"],
        detail_rows, align="lrrrrrr",
    )  # fmt: skip
    return (
        f"## {fld.title}\n\n{fld.describe}. Reference: DOP853 at rtol = atol = {fld.ref_tol:g} ({r.ref_nfe} "
        f"evaluations; DOP853 at {10 * fld.ref_tol:g} differs from it by {r.ref_check:.1e}). Each cell: f "
        "evaluations / max-abs error of the "
        f"final state. Error ÷ tolerance over all cells: {min(ratios):.2g} to {max(ratios):.2g} (default "
        f"configuration: {min(default_ratios):.2g} to {max(default_ratios):.2g}). Best peer here: "
        f"{r.best_peer}. {r.seconds:.0f} s.\n\n{table}\n\n{detail}\n\n"
        f"![{fld.name}](work_precision_{fld.name}.png)"
    )


def summary_section(results: Sequence[FieldResult]) -> str:
    keys = [c.key for c in CONFIGS] + [k for k in PEER_KEYS if any(k in r.curves for r in results)]
    rows = []
    for k in keys:
        vd = [r.vs_default.get(k) for r in results]
        vp = [r.vs_peer.get(k) for r in results]
        gd = [v[0] for v in vd if v is not None]
        gp = [v[0] for v in vp if v is not None]
        rows.append([k, *(f"{_ratio(a)} / {_ratio(b)}" for a, b in zip(vd, vp)),
                     f"{_gm(gd)} / {_gm(gp)}"])  # fmt: skip
    headers = ["configuration", *(r.fld.name for r in results), "geometric mean over fields"]
    best = []
    for r in results:
        cands = [(v[0], k) for k, v in r.vs_default.items() if v is not None and k not in PEER_KEYS]
        if len(cands) < 2:
            errs = [p.err for c in r.curves.values() for p in c if not p.failed]
            cheapest = {k: min(p.nfe for p in c if not p.failed) for k, c in r.curves.items()}
            low = min(cheapest.values())
            best.append(
                f"{r.fld.name}: no equal-error comparison, every solve ends between {min(errs):.1e} and "
                f"{max(errs):.1e} (float32's floor); the cheapest solves take {low} evaluations ("
                + ", ".join(k for k, v in cheapest.items() if v == low)
                + f"), the default's cheapest {cheapest[CONFIGS[0].key]}"
            )
            continue
        b = min(cands)
        best.append(f"{r.fld.name}: {b[1]} ({b[0]:.2f} × the default's evaluations"
                    + (f", {r.vs_peer[b[1]][0]:.2f} × {r.best_peer}'s" if r.vs_peer.get(b[1]) else "") + ")")
    honesty = []
    for k in keys:
        cells = []
        for r in results:
            pts = r.curves.get(k, [])
            fails = sum(1 for p in pts if p.failed)
            worst = max((p.err / p.tol for p in pts if not p.failed), default=math.nan)
            cells.append(f"{worst:.2g}" + (f" ({fails} failed)" if fails else ""))
        honesty.append([k, *cells])
    return (
        "## Summary: f evaluations at equal error\n\nEach cell: the configuration's f evaluations at equal error "
        "÷ the default configuration (1)'s / ÷ the best peer's on that field (the peer with the fewest "
        "evaluations at equal error against (1); named in each field's section); below 1 is fewer. "
        "The last column is the geometric mean over the fields.\n\n"
        + markdown_table(headers, rows, align="l" + "r" * (len(headers) - 1))
        + "\n\nFewest evaluations at equal error among odeflux's configurations: " + "; ".join(best) + "."
        + "\n\nHow far the error ends above the tolerance asked: the largest error ÷ tol over each field's "
        "tolerances (max-abs error of y(t1) against the reference, tol = rtol = atol; the tolerance bounds each "
        "step's estimated local error, so a global error above it is expected, and how far above depends on the "
        "controller):\n\n"
        + markdown_table(["configuration", *(r.fld.name for r in results)], honesty, align="l" + "r" * len(results))
    )


def _gm(xs: Sequence[float]) -> str:
    return "–" if not xs else f"{math.exp(sum(math.log(x) for x in xs) / len(xs)):.2f}"


_MARKERS = ("o", "h", "p", "s", "^", "v", "<", ">", "D", "P", "d", "X")
STYLE = {c.key: (f"C{i}", _MARKERS[i], "-") for i, c in enumerate(CONFIGS)} | {
    PEER_KEYS[0]: ("0.35", "x", "--"), PEER_KEYS[1]: ("0.55", "+", "--"), PEER_KEYS[2]: ("0.2", "*", ":"),
}  # fmt: skip


def plot(r: FieldResult, target: Path | io.BytesIO) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    labels = {c.key: c.label for c in CONFIGS}
    fig, ax = plt.subplots(figsize=(7.0, 4.6), dpi=90)
    for k, pts in r.curves.items():
        color, marker, ls = STYLE[k]
        pts = sorted((p for p in pts if not p.failed), key=lambda p: -p.tol)
        ax.plot([p.err for p in pts], [p.nfe for p in pts], ls, color=color, marker=marker, ms=4, lw=1.1,
                label=labels.get(k, k))  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"max-abs error of y(t1) (against float64 DOP853 at {r.fld.ref_tol:g})")
    ax.set_ylabel("f evaluations")
    tols = [p.tol for p in next(iter(r.curves.values()))]
    ax.set_title(f"{r.fld.title}: work-precision, rtol = atol = {max(tols):g} … {min(tols):g}", fontsize=9)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=6.5, loc="best", ncol=2)
    fig.tight_layout()
    fig.savefig(target, format="png")
    plt.close(fig)


def method_section(peers: bool) -> str:
    lines = [
        "Work against accuracy for the forward solve: every configuration uses Tsit5 but (7) (torchdiffeq: dopri5) and "
        "solves each field at rtol = atol = tol for each tolerance, under `torch.no_grad`, one torch thread "
        "(so reductions, and with them the counts, are reproducible). The same module (same weights, same "
        "initial state) goes to every library; f evaluations are odeflux's `stats.n_f_evals` (checked equal to "
        "`odeflux.solve()`'s for the default on each field) and, for the peers, the calls counted by one "
        "wrapper module (`benchmarks.common.CountingField`). The odeflux configurations run through "
        "`odeflux.problem.make_problem(...).integrate(first_step=...)`, the path `solve()` takes, because "
        "`solve()` does not take `first_step`. torchode solves the whole state as one `(1, N)` problem (one "
        "step size and error norm, as odeflux and torchdiffeq do), not per sample.",
        "**Error**: the max-abs error of the final state y(t1) against a reference: scipy's DOP853 at rtol = "
        f"atol = {REF_TOL:g} (1e-9 for the convolutional field, see its section) on a float64 copy of the same "
        "field (float32 weights cast exactly), called through a numpy wrapper; each section gives how much one "
        "decade looser a reference moves. For the float32 fields the error therefore includes float32 round-off "
        "(about 1e-7 relative per operation), which sets a floor that tight tolerances cannot go below.",
        "**Equal-error comparison**: a curve's *frontier* is its points that no other point of the same curve "
        "beats on both counts (as many or fewer evaluations and a smaller error; a tighter tolerance that costs "
        "more and ends up less accurate is dominated). Along the frontier, log10(NFE) is interpolated linearly "
        f"in log10(error). Two curves are compared over the error range both frontiers cover, at {GRID} "
        "log-spaced errors; the figure is the geometric mean of the ratio of their evaluations there, i.e. "
        "10^mean(log10 NFE_a(e) - log10 NFE_b(e)). Below 1: fewer evaluations for the same accuracy. Each "
        "comparison's common range is given in decades; a range under about one decade rests on one or two "
        f"segments, and below {MIN_OVERLAP} decade(s) no figure is given (–). Outside the common range nothing "
        "is extrapolated (a curve that reaches smaller errors "
        "gets no credit for them here).",
        "**Configurations**:\n" + "\n".join(f"- {c.key}: {c.what}." for c in CONFIGS),
    ]
    if peers:
        lines.append("**Peers** (reference curves):\n" + "\n".join(f"- {k}: {PEER_WHAT[k]}." for k in PEER_KEYS))
    return "\n\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.work_precision", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", choices=list(FIELDS), help="run just these fields (repeatable)")
    p.add_argument("--no-peers", action="store_true", help="odeflux's configurations only")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: reproducible counts)")
    p.add_argument("--quick", action="store_true", help="tiny states, two tolerances; prints only (seconds)")
    p.add_argument("--out", type=Path, default=RESULT, help="results file (markdown); the PNGs go beside it")
    p.add_argument("--no-write", action="store_true", help="print only (no markdown, no PNGs)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be >= 1")
    write = not (args.no_write or args.quick)
    set_threads(args.threads)
    machine = machine_info(*PEERS) + f"\n- {code_state()}"
    start = time.perf_counter()
    results = []
    for name in args.only or FIELDS:
        fld = FIELDS[name](args.quick)
        tols = fld.tols[1:4:2] if args.quick else fld.tols
        r = run_field(fld, not args.no_peers, tols, args.quick)
        print(f"{name}: {r.seconds:.1f} s", flush=True)
        results.append(r)
        if write:
            plot(r, args.out.parent / f"work_precision_{name}.png")
        else:
            plot(r, io.BytesIO())  # the plotting code runs in a smoke run too
    parts = [method_section(not args.no_peers), summary_section(results), *(field_section(r) for r in results)]
    parts.append(closing_line(start))
    publish("Work-precision: f evaluations at equal error (issue 19)", parts, machine, "benchmarks.work_precision",
            argv, args.out, write=write)  # fmt: skip
    return {}


if __name__ == "__main__":
    main()
