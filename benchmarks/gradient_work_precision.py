"""Gradient work-precision: the evaluations one gradient (forward + backward) takes against its error (issue 19).

For each field and rtol = atol in {1e-2, ..., 1e-6} (down to 1e-8 for the float64 fields), one
gradient of a loss of y(t1) with respect to the field's parameters, with odeflux's adjoints (with
``NeuralODE``'s solver, Dopri5: the default ``"auto"``, InterpolatingAdjoint, DirectAdjoint,
GaussAdjoint, BacksolveAdjoint; with Tsit5, ``solve()``'s solver, ``"auto"`` and
InterpolatingAdjoint; the default PI controller) and the peers' (torchdiffeq dopri5 through ``odeint_adjoint`` and through ``odeint``;
torchode Tsit5 by backpropagation with its I and PID controllers, and its joint backsolve adjoint).
Counted: f evaluations in the forward solve, f evaluations in the backward pass, and VJPs (backward
passes through f), all by one counting wrapper; the error is the gradient's relative 2-norm error
against a float64 reference (odeflux DirectAdjoint with Dopri8 at a tight tolerance, checked
against the same one decade looser). The curves are compared at equal error with
``benchmarks.work_precision``'s frontier comparison.

    python -m benchmarks.gradient_work_precision            # writes results/gradient_work_precision.md and .png
    python -m benchmarks.gradient_work_precision --quick    # tiny fields, two tolerances: prints only (seconds)
    python -m benchmarks.gradient_work_precision --only lotka_volterra --no-write
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

import odeflux
from odeflux.control import PIController

from .common import closing_line, machine_info, markdown_table, publish, set_threads
from .general import NODE_SOLVER, GradCountingField, TorchodeField
from .provenance import code_state
from .work_precision import (
    MAX_STEPS,
    Field,
    LotkaVolterra,
    Point,
    VanDerPol,
    cnf_exact,
    compare,
    lotka_volterra,
    odenet_conv,
    time_mlp_x3,
    tutorial_doubled,
    van_der_pol,
)

RESULTS = Path(__file__).parent / "results"
RESULT = RESULTS / "gradient_work_precision.md"
PEERS = ("torchdiffeq", "torchode", "scipy", "matplotlib")
CONV_BATCH = 16
VJP_WEIGHTS = (1, 2)
PLOT_MAX_ERR = 10.0  # gradients further off than this (blown-up adjoints) are left off the plot  # total = forward f + backward f + w * VJPs; w = 1 is the headline


# -- the fields: work_precision's, with learnable parameters where they had none ----------------------


class LearnableLotkaVolterra(LotkaVolterra):
    """work_precision's Lotka-Volterra with (alpha, beta, delta, gamma) one float64 parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(self.p, dtype=torch.float64))


class LearnableVanDerPol(VanDerPol):
    """work_precision's Van der Pol with mu a float64 parameter."""

    def __init__(self, mu: float = 1.0) -> None:
        super().__init__(mu)
        self.mu = nn.Parameter(torch.tensor(mu, dtype=torch.float64))


def mean_square(y: torch.Tensor) -> torch.Tensor:
    return (y**2).mean()


def cnf_nll(s: torch.Tensor) -> torch.Tensor:
    """The flow's negative log-likelihood, ``-mean(log N(z(1)) + a(1))`` (a = the integrated trace)."""
    z, a = s[:, :2], s[:, 2]
    return (0.5 * (z**2).sum(1) + math.log(2 * math.pi) - a).mean()


@dataclass
class GradField:
    fld: Field
    loss: Callable[[torch.Tensor], torch.Tensor]
    loss_text: str
    ref_tol: float
    note: str = ""
    # The reference solves the batch in this many chunks of samples and sums their gradients (each
    # weighted by its share of the batch): valid for a field that acts on each sample alone and a loss
    # that is a mean over samples; it bounds the memory of the recorded float64 graph.
    ref_chunks: int = 1
    # Tolerances looser than the field's range, where the curves would otherwise share too little
    # of the error axis to be compared (see the conv field).
    loose: tuple[float, ...] = ()

    @property
    def name(self) -> str:
        return self.fld.name


def _learnable(fld: Field, module: nn.Module, what: str) -> Field:
    return dataclasses.replace(fld, module=module, describe=f"{fld.describe}; {what} learnable")


QUICK_REF_TOL = 1e-8  # --quick: a cheap reference (the smoke run checks the plumbing, not the numbers)


def _grad_fields() -> dict[str, Callable[[bool], GradField]]:
    ms = "mean(y(t1)^2)"

    def make(build: Callable[[bool], Field], ref_tol: float, loss=mean_square, loss_text=ms, note="",
             learnable: tuple[Callable[[], nn.Module], str] | None = None, chunks: int = 1,
             loose: tuple[float, ...] = ()) -> Callable[[bool], GradField]:  # fmt: skip
        def field_(quick: bool) -> GradField:
            fld = build(quick)
            if learnable is not None:
                fld = _learnable(fld, learnable[0](), learnable[1])
            return GradField(fld, loss, loss_text, QUICK_REF_TOL if quick else ref_tol, note, 1 if quick else chunks,
                             loose)  # fmt: skip

        return field_

    return {
        "tutorial_doubled": make(tutorial_doubled, 1e-12),
        "time_mlp_x3": make(time_mlp_x3, 1e-12),
        # The ReLUs make the gradient converge slowly (kinks resolved at low order): Dopri8's float64
        # gradients at 1e-6, 1e-7, 1e-8 differ by 4.7e-3 and 1.9e-3 (relative), Tsit5's at 1e-8 from Dopri8's by
        # 9.6e-4, and Dopri8 at 1e-9 would record ~5000 evaluations (~10 GB at this batch). 1e-8 is the reference.
        "odenet_conv": make(lambda q: odenet_conv(q, None if q else CONV_BATCH), 1e-8,
                            note=f"the batch is {CONV_BATCH} (work_precision's forward uses 32), to keep the float64 "
                            "reference's recorded graph and the run short. The ReLUs make the gradient converge "
                            "slowly in the tolerance (each kink is resolved at low order), so the reference is only "
                            "good to about 1e-3 here (see the check below): errors under a few 1e-3 are not "
                            "resolved and the comparison on this field rests on its loose end. The reference is "
                            "taken in 4 chunks of 4 samples (convolutions and GroupNorm act on each sample alone), "
                            "its float64 graph at 1e-8 being ~12 GB for the whole batch. From 1e-2 to 1e-6 the "
                            "gradients' errors span less than a decade, Dopri5's (the default's) lower than the "
                            "others': 1e-1 is added so that the curves share enough of the error axis to be "
                            "compared", chunks=4, loose=(1e-1,)),  # fmt: skip
        "lotka_volterra": make(lotka_volterra, 1e-13, learnable=(LearnableLotkaVolterra, "(alpha, beta, delta, gamma)")),
        "van_der_pol": make(van_der_pol, 1e-13, learnable=(LearnableVanDerPol, "mu")),
        "cnf_exact": make(cnf_exact, 1e-12, cnf_nll,
                          "the negative log-likelihood mean(|z(1)|^2/2 + log 2 pi - a(1))"),  # fmt: skip
    }


GRAD_FIELDS = _grad_fields()


def tolerances(gf: GradField, quick: bool) -> tuple[float, ...]:
    tols = gf.fld.tols
    return tols[1:4:2] if quick else gf.loose + tols


# -- one gradient ------------------------------------------------------------------------------------


@dataclass
class GradPoint(Point):
    """One gradient: ``nfe`` is the total at VJP weight 1 (forward f + backward f + VJPs)."""

    fwd: int = 0
    bwd: int = 0
    vjps: int = 0
    seconds: float = 0.0
    note: str = ""

    def total(self, w: float = 1) -> float:
        return self.fwd + self.bwd + w * self.vjps

    def weighted(self, w: float) -> Point:
        return Point(self.tol, self.total(w), self.err, self.rejected, self.failed)  # type: ignore[arg-type]

    def part(self, which: str) -> Point:
        """The forward's evaluations (``"fwd"``) or the backward's (``"bwd"``: bwd f + VJPs) as a Point."""
        n = self.fwd if which == "fwd" else self.bwd + self.vjps
        return Point(self.tol, max(n, 1), self.err, self.rejected, self.failed)

    def cell(self) -> str:
        if self.failed:
            return "failed †"
        return f"{self.fwd}+{self.bwd}+{self.vjps} / {self.err:.1e}" + (" †" if self.note else "")


def _zero(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def grad_vector(module: nn.Module) -> torch.Tensor:
    return torch.cat([
        (torch.zeros(p.numel(), dtype=torch.float64) if p.grad is None else p.grad.reshape(-1).double())
        for p in module.parameters()
    ])  # fmt: skip


def rel_err(g: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(g - ref) / torch.linalg.vector_norm(ref))


def _failure(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:160]}"


# A runner solves and returns y(t1) and a function that, after the backward pass, says anything of note.
Runner = Callable[[GradCountingField, "GradField", float], tuple[torch.Tensor, Callable[[], str]]]


def _nothing() -> str:
    return ""


def odeflux_solve(sensealg: Any, controller: Any = None, solver: Callable[[], Any] | None = None) -> Runner:
    """odeflux's solve with ``sensealg``; the solver ``NeuralODE``'s default unless given."""

    def run(cf: GradCountingField, gf: GradField, tol: float) -> torch.Tensor:
        sol = odeflux.solve(cf, gf.fld.y0, gf.fld.t_span, solver=(solver or NODE_SOLVER)(), rtol=tol, atol=tol,
                            sensealg=sensealg, save_start=False, max_steps=MAX_STEPS, controller=controller)  # fmt: skip

        def note() -> str:
            b = sol.backward_stats
            if b is None or not b.n_checkpoints:
                return ""
            return (f"{b.n_checkpoints} forward re-solve(s) in the backward pass ({b.n_f_evals} of the bwd f; "
                    "the forward's steps exceeded the adjoint's store_limit)")  # fmt: skip

        return sol.ys[-1], note

    return run


def torchdiffeq_solve(adjoint: bool) -> Runner:
    def run(cf: GradCountingField, gf: GradField, tol: float) -> torch.Tensor:
        import torchdiffeq

        y0 = gf.fld.y0
        ts = torch.tensor(gf.fld.t_span, dtype=y0.dtype)
        solve = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint
        return solve(cf, y0, ts, rtol=tol, atol=tol, method="dopri5")[-1], _nothing

    return run


def torchode_solve(controller: str, adjoint: str) -> Runner:
    def run(cf: GradCountingField, gf: GradField, tol: float) -> torch.Tensor:
        import torchode as to

        y0 = gf.fld.y0
        # The whole state as one problem (one step size, one error norm), as odeflux and torchdiffeq solve it.
        term = to.ODETerm(TorchodeField(cf, tuple(y0.shape), joint=True))
        if controller == "I":
            ctrl = to.IntegralController(atol=tol, rtol=tol, term=term)
        else:  # the coefficients of torchode's solve_ivp, as in work_precision
            ctrl = to.PIDController(atol=tol, rtol=tol, pcoeff=0.2, icoeff=0.5, dcoeff=0.0, term=term)
        step = to.Tsit5(term=term)
        if adjoint == "autodiff":
            solver = to.AutoDiffAdjoint(step, ctrl, max_steps=MAX_STEPS)
        else:
            solver = to.JointBacksolveAdjoint(term, step, ctrl)
        t0, t1 = gf.fld.t_span
        problem = to.InitialValueProblem(y0.reshape(1, -1), t_start=torch.tensor([t0], dtype=y0.dtype),
                                         t_end=torch.tensor([t1], dtype=y0.dtype))  # fmt: skip
        sol = solver.solve(problem)
        if int(sol.status[0]) != 0:
            raise RuntimeError(f"torchode status {to.Status(int(sol.status[0])).name}")
        return sol.ys[0, -1].view(y0.shape), _nothing

    return run


@dataclass(frozen=True)
class Config:
    key: str
    run: Runner
    what: str
    odeflux: bool = True


ODE_PI = PIController(qoldinit=1e-4)  # OrdinaryDiffEq's floor of the PI controller's error memory
_S = NODE_SOLVER.__name__
CONFIGS: tuple[Config, ...] = (
    Config("odeflux auto [default]", odeflux_solve("auto"),
           f"`odeflux.NeuralODE`'s defaults: {_S}, `PIController()`, `sensealg=\"auto\"`: on "
           "these fields (an explicit Runge-Kutta solver) `DirectAdjoint(recompute=True, graph_budget=512 MiB)` "
           "(the solve recorded whole while its graph is estimated within the budget, as it is on every field "
           "here: `DirectAdjoint()`'s gradient and evaluations; past the budget the forward's steps retaken one at "
           "a time in the backward pass) where the state and parameters have more than 100 entries, "
           "`DirectAdjoint()` on the small Lotka-Volterra and Van der Pol problems"),
    Config("odeflux auto integral start", odeflux_solve("auto", PIController(integral_start=True)),
           "the default but for the forward's controller: `PIController(integral_start=True)`, whose first "
           "accepted step (no error memory yet) proposes the next as the integral controller does"),
    Config("odeflux Tsit5 auto", odeflux_solve("auto", solver=odeflux.Tsit5),
           "the same with Tsit5, `odeflux.solve()`'s default solver (`NeuralODE`'s until this measurement)"),
    Config("odeflux Interpolating", odeflux_solve(odeflux.InterpolatingAdjoint()),
           f"`InterpolatingAdjoint()` ({_S}, as every odeflux configuration below), `NeuralODE`'s default before "
           "`\"auto\"`: (lambda, mu) solved backwards with the forward's solver, y(t) from the forward's stored "
           "steps; adjoint rtol/atol = the forward's, mixed norm (the largest block RMS), the adjoint solve's first "
           "step Hairer's estimate (its default `first_step=\"continue\"` on one interval); forward: the default "
           "`PIController()` (error memory floored at qoldinit = 0.1); backward: the adjoints' default, "
           "OrdinaryDiffEq's `PIController(qoldinit=1e-4)`"),
    Config("odeflux Interpolating Tsit5", odeflux_solve(odeflux.InterpolatingAdjoint(), solver=odeflux.Tsit5),
           "Interpolating with Tsit5 (as measured before NeuralODE's solver became Dopri5)"),
    Config("odeflux Interpolating qold 1e-4", odeflux_solve(odeflux.InterpolatingAdjoint(controller=ODE_PI), ODE_PI),
           "Interpolating but with OrdinaryDiffEq's `PIController(qoldinit=1e-4)` forward too (odeflux's default "
           "forward and backward until an earlier measurement)"),
    Config("odeflux Interpolating bwd qold 0.1", odeflux_solve(odeflux.InterpolatingAdjoint(controller=PIController())),
           "Interpolating but for the adjoint solve's controller: `PIController()` (the forward's default, its "
           "error memory floored at 0.1) in place of OrdinaryDiffEq's"),
    Config("odeflux Interpolating forward", odeflux_solve(odeflux.InterpolatingAdjoint(first_step="forward")),
           "Interpolating but for the adjoint's first step: `first_step=\"forward\"`, the larger of the forward's "
           "last two steps in place of Hairer's estimate"),
    Config("odeflux Direct qold 1e-4", odeflux_solve(odeflux.DirectAdjoint(), ODE_PI),
           "`DirectAdjoint()` (backpropagation through the recorded solve, as the default does on these fields) "
           "with `PIController(qoldinit=1e-4)`"),
    Config("odeflux Gauss", odeflux_solve(odeflux.GaussAdjoint()),
           "`GaussAdjoint()`: lambda backwards, the parameter integral by Gauss-Legendre quadrature per adjoint step"),
    Config("odeflux Backsolve", odeflux_solve(odeflux.BacksolveAdjoint()),
           "`BacksolveAdjoint()`: y solved backwards with (lambda, mu)"),
    Config("torchdiffeq odeint_adjoint", torchdiffeq_solve(True),
           "torchdiffeq 0.2.5 `odeint_adjoint(method='dopri5')`, its defaults (adjoint tolerances = the forward's, "
           "its mixed norm over (t, y, adj_y, adj_params))", False),
    Config("torchdiffeq odeint", torchdiffeq_solve(False),
           "torchdiffeq 0.2.5 `odeint(method='dopri5')`, backpropagation through the solve", False),
    Config("torchode I autodiff", torchode_solve("I", "autodiff"),
           "torchode `AutoDiffAdjoint(Tsit5, IntegralController)`: backpropagation through the solve", False),
    Config("torchode PID autodiff", torchode_solve("PID", "autodiff"),
           "torchode `AutoDiffAdjoint(Tsit5, PIDController(pcoeff=0.2, icoeff=0.5))` (its solve_ivp's coefficients)",
           False),
    Config("torchode I backsolve", torchode_solve("I", "backsolve"),
           "torchode `JointBacksolveAdjoint(term, Tsit5, IntegralController)`: y and the adjoint solved backwards "
           "as one joint problem with the forward's controller (torchode's `BacksolveAdjoint` takes VJPs by "
           "`torch.func.vmap` per sample, which the counting hooks cannot see and the CNF's inner "
           "`autograd.grad` cannot run under)", False),
)
DEFAULT = CONFIGS[0].key
ODEINT_ADJOINT = "torchdiffeq odeint_adjoint"
DISCRETE = ("odeflux Direct qold 1e-4",)
CONTINUOUS = tuple(c.key for c in CONFIGS if c.odeflux and "auto" not in c.key and "Direct" not in c.key)
PEER_KEYS = tuple(c.key for c in CONFIGS if not c.odeflux)


def run_config(cfg: Config, gf: GradField, tol: float, ref: torch.Tensor, cf: GradCountingField | None = None,
               ) -> GradPoint:  # fmt: skip
    module = gf.fld.module
    if cf is None:
        cf = GradCountingField(module, autonomous=gf.fld.autonomous)
    cf.reset()
    _zero(module)
    start = time.perf_counter()
    try:
        y1, note = cfg.run(cf, gf, tol)
        n_fwd = cf.n_calls
        gf.loss(y1).backward()
        what = note()
    except Exception as e:  # a method that fails at a tolerance is a result, recorded not raised
        return GradPoint(tol, cf.n_calls + cf.n_vjps, math.inf, failed=_failure(e), fwd=cf.n_calls, vjps=cf.n_vjps)
    seconds = time.perf_counter() - start
    g = grad_vector(module)
    err = rel_err(g, ref) if torch.isfinite(g).all() else math.inf
    bwd = cf.n_calls - n_fwd
    return GradPoint(tol, n_fwd + bwd + cf.n_vjps, err, fwd=n_fwd, bwd=bwd, vjps=cf.n_vjps, seconds=seconds, note=what)


def reference(gf: GradField, tol: float) -> tuple[torch.Tensor, int]:
    """The float64 gradient by odeflux's DirectAdjoint with Dopri8 at rtol = atol = ``tol`` on a
    float64 copy of the field (float32 weights cast exactly); and its forward f evaluations."""
    f64 = copy.deepcopy(gf.fld.module).double()
    cf = GradCountingField(f64, autonomous=gf.fld.autonomous)
    y0 = gf.fld.y0.double()
    for part in y0.chunk(gf.ref_chunks) if gf.ref_chunks > 1 else (y0,):
        sol = odeflux.solve(cf, part, gf.fld.t_span, solver=odeflux.Dopri8(), rtol=tol, atol=tol,
                            sensealg=odeflux.DirectAdjoint(), save_start=False, max_steps=10 * MAX_STEPS)  # fmt: skip
        (gf.loss(sol.ys[-1]) * (part.shape[0] / y0.shape[0])).backward()  # the gradients accumulate
    return grad_vector(f64), cf.n_calls


# -- one field ---------------------------------------------------------------------------------------


@dataclass
class FieldResult:
    gf: GradField
    curves: dict[str, list[GradPoint]] = field(default_factory=dict)
    ref_nfe: int = 0
    ref_check: float = math.nan
    ref_norm: float = math.nan
    seconds: float = 0.0
    # per VJP weight: {config: ratio vs the default}, the best peer, {config: ratio vs the best peer}
    vs_default: dict[float, dict[str, tuple[float, float] | None]] = field(default_factory=dict)
    best_peer: dict[float, str | None] = field(default_factory=dict)
    vs_peer: dict[float, dict[str, tuple[float, float] | None]] = field(default_factory=dict)

    def summarise(self) -> None:
        for w in VJP_WEIGHTS:
            curves = {k: [p.weighted(w) for p in c] for k, c in self.curves.items()}
            base = curves[DEFAULT]
            self.vs_default[w] = {k: compare(c, base) for k, c in curves.items()}
            peers = [(v[0], k) for k, v in self.vs_default[w].items() if k in PEER_KEYS and v is not None]
            self.best_peer[w] = best = min(peers)[1] if peers else None
            self.vs_peer[w] = {} if best is None else {k: compare(c, curves[best]) for k, c in curves.items()}


def run_field(gf: GradField, tols: Sequence[float], configs: Sequence[Config]) -> FieldResult:
    start = time.perf_counter()
    out = FieldResult(gf)
    ref, out.ref_nfe = reference(gf, gf.ref_tol)
    ref_loose, _ = reference(gf, 10 * gf.ref_tol)
    out.ref_check = rel_err(ref_loose, ref)
    out.ref_norm = float(torch.linalg.vector_norm(ref))
    for cfg in configs:
        # One wrapper of the field per configuration, and one gradient made first and not counted:
        # the counts are a training loop's steady state (odeflux's default measures the graph of
        # one evaluation of a field the first time it meets it, once per field and state shape).
        cf = GradCountingField(gf.fld.module, autonomous=gf.fld.autonomous)
        run_config(cfg, gf, tols[0], ref, cf)
        out.curves[cfg.key] = [run_config(cfg, gf, tol, ref, cf) for tol in tols]
        print(f"  {gf.name} {cfg.key}: " + ", ".join(p.cell() for p in out.curves[cfg.key]), flush=True)
    out.seconds = time.perf_counter() - start
    out.summarise()
    return out


# -- output ------------------------------------------------------------------------------------------


def _ratio(v: tuple[float, float] | None) -> str:
    return "–" if v is None else f"{v[0]:.2f}"


def _gm(xs: Sequence[float]) -> str:
    return "–" if not xs else f"{math.exp(sum(math.log(x) for x in xs) / len(xs)):.2f}"


def field_section(r: FieldResult) -> str:
    gf, keys = r.gf, list(r.curves)
    first = r.curves[keys[0]]
    rows = [[f"{p.tol:g}"] + [r.curves[k][i].cell() for k in keys] for i, p in enumerate(first)]
    table = markdown_table(["rtol = atol", *keys], rows, align="r" * (len(keys) + 1))
    detail = []
    for k in keys:
        pts = r.curves[k]
        ok = [p for p in pts if not p.failed]
        cells = [k]
        for w in VJP_WEIGHTS:
            vd, vp = r.vs_default[w].get(k), r.vs_peer[w].get(k)
            cells += [_ratio(vd), "–" if vd is None else f"{vd[1]:.1f}", _ratio(vp)]
        cells += [sum(p.fwd for p in ok), sum(p.bwd for p in ok), sum(p.vjps for p in ok),
                  f"{sum(p.seconds for p in ok):.2f}", sum(1 for p in pts if p.failed)]  # fmt: skip
        detail.append(cells)
    headers = ["configuration"]
    for w in VJP_WEIGHTS:
        headers += [f"÷ default (w={w})", "over (decades)", f"÷ {r.best_peer[w] or 'best peer (none)'} (w={w})"]
    headers += ["fwd f, all tols", "bwd f, all tols", "VJPs, all tols", "seconds, all tols", "failed"]
    detail_table = markdown_table(headers, detail, align="l" + "r" * (len(headers) - 1))
    notes = [f"{k} at {p.tol:g}: {p.note}" for k in keys for p in r.curves[k] if p.note]
    notes += [f"{k} at {p.tol:g}: failed, {p.failed}" for k in keys for p in r.curves[k] if p.failed]
    notes_text = ("\n\n† and failures:\n" + "\n".join(f"- {n}." for n in notes)) if notes else ""
    return (
        f"## {gf.fld.title}\n\n{gf.fld.describe}. Loss: {gf.loss_text}"
        + (f"; {gf.note}" if gf.note else "")
        + f". Reference gradient ({sum(p.numel() for p in gf.fld.module.parameters())} parameters, 2-norm "
        f"{r.ref_norm:.3g}): odeflux DirectAdjoint + Dopri8 at rtol = atol = {gf.ref_tol:g} in float64 ({r.ref_nfe} "
        f"forward evaluations{'' if gf.ref_chunks == 1 else f' over {gf.ref_chunks} chunks'}); at {10 * gf.ref_tol:g} it differs by {r.ref_check:.1e} (relative). {r.seconds:.0f} s.\n\n"
        "Each cell: forward f evaluations + backward f evaluations + VJPs / the gradient's relative 2-norm error.\n\n"
        f"{table}{notes_text}\n\nAt equal gradient error (total = fwd f + bwd f + w × VJPs; the best peer is picked per "
        f"weighting):\n\n{detail_table}"
    )


def summary_section(results: Sequence[FieldResult]) -> str:
    keys = [c.key for c in CONFIGS if any(c.key in r.curves for r in results)]
    parts = []
    for w in VJP_WEIGHTS:
        rows = []
        for k in keys:
            vp = [r.vs_peer[w].get(k) for r in results]
            vd = [r.vs_default[w].get(k) for r in results]
            rows.append([k, *(f"{_ratio(a)} / {_ratio(b)}" for a, b in zip(vd, vp)),
                         f"{_gm([v[0] for v in vd if v])} / {_gm([v[0] for v in vp if v])}"])  # fmt: skip
        best = ", ".join(f"{r.gf.name}: {r.best_peer[w]}" for r in results)
        parts.append(
            f"### Total = forward f + backward f + {w} × VJPs\n\nEach cell: evaluations at equal gradient error ÷ "
            f"odeflux's default's / ÷ the best peer's on that field (below 1: fewer). Best peer per field: {best}.\n\n"
            + markdown_table(["configuration", *(r.gf.name for r in results), "geometric mean"], rows,
                             align="l" + "r" * (len(results) + 1))  # fmt: skip
        )
    goal_rows = []
    for r in results:
        v = r.vs_peer[1].get(DEFAULT)
        ods = [(vv[0], k) for k, vv in r.vs_peer[1].items() if vv is not None and k not in PEER_KEYS]
        bo = min(ods) if ods else None
        best = r.best_peer[1]
        parts_ = ["–", "–"]
        if best is not None and DEFAULT in r.curves:
            parts_ = [_ratio(compare([p.part(w) for p in r.curves[DEFAULT]], [p.part(w) for p in r.curves[best]]))
                      for w in ("fwd", "bwd")]  # fmt: skip
        goal_rows.append([r.gf.name, best or "–", _ratio(v), "–" if v is None else f"{v[1]:.1f}",
                          "–" if v is None else ("yes" if v[0] <= 1.0 else "**no**"), *parts_,
                          "–" if bo is None else f"{bo[1]} ({bo[0]:.2f})"])  # fmt: skip
    goal = markdown_table(
        ["field", "best peer (w = 1)", "default ÷ best peer", "over (decades)", "≤ 1?", "forward part ÷ best peer's",
         "backward part ÷ best peer's", "best odeflux adjoint (÷ best peer)"],
        goal_rows, align="llrrlrrl",
    )  # fmt: skip
    # The continuous adjoints against odeint_adjoint (issue 19: an adjoint solve needs at most its
    # evaluations at equal gradient error): the whole gradient, and the backward part alone.
    cont = [k for k in keys if k in CONTINUOUS]
    adj_rows = []
    for k in cont:
        cells, whole = [], []
        for r in results:
            if k not in r.curves or ODEINT_ADJOINT not in r.curves:
                cells.append("–")
                continue
            a, b = r.curves[k], r.curves[ODEINT_ADJOINT]
            v = compare([p.weighted(1) for p in a], [p.weighted(1) for p in b])
            vb = compare([p.part("bwd") for p in a], [p.part("bwd") for p in b])
            if v is not None:
                whole.append(v[0])
            cells.append(f"{_ratio(v)} / {_ratio(vb)}")
        adj_rows.append([k, *cells, _gm(whole)])
    adjoint = markdown_table(["configuration", *(r.gf.name for r in results), "geometric mean (whole)"], adj_rows,
                             align="l" + "r" * (len(results) + 1))  # fmt: skip
    return (
        "## Summary: evaluations per gradient at equal error\n\nGoal (issue 19): at equal gradient error odeflux "
        "needs at most the best peer's evaluations on every field (geometric mean over the curve), forward + "
        "backward. With VJPs weighted 1. The *forward part* and *backward part* columns split the default's "
        "total: its forward f evaluations, and its bwd f + VJPs, each against the best peer's same part at equal "
        "gradient error (each part's curve compared on its own; a peer that backpropagates through its solve has "
        "VJPs only in its backward part):\n\n" + goal + "\n\n" + "\n\n".join(parts)
        + "\n\n### The continuous adjoints against torchdiffeq's `odeint_adjoint`\n\nGoal (issue 19): an adjoint "
        "solve needs at most `odeint_adjoint`'s evaluations at equal gradient error. Each cell: the whole gradient's "
        "evaluations (w = 1) / the backward part's alone (bwd f + VJPs), each ÷ `odeint_adjoint`'s at equal "
        "gradient error (below 1: fewer):\n\n" + adjoint
    )


def _n_worse(results: Sequence[FieldResult], key: str) -> tuple[int, int]:
    """At how many of the (field, tolerance) pairs both solved the ``key`` configuration's gradient
    error is above odeint_adjoint's, and of how many."""
    n_worse = n_all = 0
    for r in results:
        if key in r.curves and ODEINT_ADJOINT in r.curves:
            for a, b in zip(r.curves[key], r.curves[ODEINT_ADJOINT]):
                if not (a.failed or b.failed):
                    n_all += 1
                    n_worse += a.err > b.err
    return n_worse, n_all


def accuracy_section(results: Sequence[FieldResult]) -> str:
    """Per tolerance: the default's gradient error against odeint_adjoint's (goal: no worse)."""
    rows, n_worse, n_all = [], 0, 0
    for r in results:
        if DEFAULT not in r.curves or ODEINT_ADJOINT not in r.curves:
            continue
        for a, b in zip(r.curves[DEFAULT], r.curves[ODEINT_ADJOINT]):
            if a.failed or b.failed:
                verdict = "–"
            else:
                n_all += 1
                worse = a.err > b.err
                n_worse += worse
                verdict = "**worse**" if worse else "no worse"
            rows.append([r.gf.name, f"{a.tol:g}", "failed" if a.failed else f"{a.err:.2e}",
                         "failed" if b.failed else f"{b.err:.2e}",
                         "–" if a.failed or b.failed else f"{a.err / b.err:.2f}", verdict,
                         "–" if a.failed else f"{a.total():.0f}", "–" if b.failed else f"{b.total():.0f}"])  # fmt: skip
    return (
        "## Gradient error per tolerance: odeflux's default against torchdiffeq's odeint_adjoint\n\nGoal (issue 19): "
        "at each tolerance the default adjoint's gradient error (against the float64 reference) is no worse than "
        f"`odeint_adjoint`'s. The default is worse at {n_worse} of {n_all} (field, tolerance) pairs. The other "
        "odeflux adjoints, counted the same way: "
        + "; ".join(f"{c.key}: worse at {w} of {n}" for c in CONFIGS
                    if c.odeflux and c.key not in (DEFAULT, *DISCRETE) for w, n in [_n_worse(results, c.key)] if n)
        + ".\n\n"
        + markdown_table(["field", "rtol = atol", "default error", "odeint_adjoint error", "default ÷ odeint_adjoint",
                          "verdict", "default total evals (w=1)", "odeint_adjoint total evals (w=1)"],
                         rows, align="lrrrrlrr")  # fmt: skip
    )


_ODEFLUX_STYLE = [("C4", "P", "-"), ("C6", "X", "--"), ("C4", "P", ":"), ("C0", "o", "-"), ("C5", "o", ":"), ("C0", "o", "--"),
                  ("C0", "o", "-."), ("C0", "o", ":"), ("C1", "s", ":"), ("C2", "^", "-"), ("C3", "v", "-")]
_PEER_STYLE = [("0.3", "x", "--"), ("0.5", "+", "--"), ("0.15", "*", ":"), ("0.6", "D", ":"), ("0.4", "<", "-.")]
STYLE = dict(zip([c.key for c in CONFIGS if c.odeflux], _ODEFLUX_STYLE)) | dict(zip(PEER_KEYS, _PEER_STYLE))


def plot(results: Sequence[FieldResult], target: Path | io.BytesIO) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    n = len(results)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.0 * cols, 3.9 * rows), dpi=80, squeeze=False)
    for ax, r in zip(axes.flat, results):
        for k, pts in r.curves.items():
            color, marker, ls = STYLE[k]
            pts = sorted((p for p in pts if not p.failed and p.err <= PLOT_MAX_ERR), key=lambda p: -p.tol)
            ax.plot([p.err for p in pts], [p.total() for p in pts], ls, color=color, marker=marker, ms=4, lw=1.1,
                    label=k)  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(r.gf.fld.title, fontsize=9)
        ax.set_xlabel(f"gradient relative error (points above {PLOT_MAX_ERR:g} left off)", fontsize=8)
        ax.set_ylabel("fwd f + bwd f + VJPs", fontsize=8)
        ax.grid(True, which="both", lw=0.3, alpha=0.5)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=7)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(target, format="png")
    plt.close(fig)


def method_section() -> str:
    return "\n\n".join([
        "One gradient per (field, configuration, tolerance): the forward solve from t0 to t1 at rtol = atol = tol, "
        "the loss of y(t1), `backward()`; one torch thread (reproducible counts), the same module, weights and "
        "initial state for every library. Every library gets the field through one counting wrapper "
        "(`benchmarks.general.GradCountingField`, odeflux included, so that odeflux sees a generic module as the "
        "peers do; one wrapper per configuration and field, with one gradient at the loosest tolerance made first "
        "and not counted, so the counts are a training loop's steady state: odeflux's default measures the graph of "
        "one evaluation the first time it meets a field and state shape): *fwd f* is the calls of f during the forward solve, *bwd f* those during the backward pass "
        "(the f evaluation inside each autograd VJP an adjoint takes, backsolve's state, re-solves), *VJPs* the "
        "backward passes through f's output (a hook on each output that the backward pass reaches; "
        "backpropagation through a solve has one per recorded evaluation and no bwd f). For the CNF a VJP is a "
        "double backward (the field already differentiates itself).",
        "**Weighting**: the headline total is fwd f + bwd f + 1 × VJPs, i.e. one unit per call of f and one per "
        "backward pass through it, so an autograd VJP inside an adjoint costs 2 (its f call and its backward). A "
        "backward pass through a dense layer takes about twice the forward's multiply-adds, so the tables also "
        "give the comparison with VJPs weighted 2; the three counts are given separately in each field's table.",
        "**Error**: the relative 2-norm error of the gradient with respect to all the field's parameters, "
        "||g - g_ref|| / ||g_ref||, against a float64 reference: odeflux's DirectAdjoint (backpropagation through "
        "the solve, exact for the discrete solution) with Dopri8 on a float64 copy of the field (float32 weights "
        "cast exactly) at a tight tolerance; each section says how much the same at a ten times looser tolerance "
        "differs. For the float32 fields the error includes float32 round-off, a floor that tight tolerances "
        "cannot pass.",
        "**Equal-error comparison**: `benchmarks.work_precision.compare` (each curve's frontier, log10 total "
        "evaluations interpolated linearly in log10 error, the geometric mean of the ratio over the error range "
        "both curves cover; no figure when they share less than half a decade). The best peer on a field is the "
        "peer curve with the fewest evaluations at equal error against odeflux's default.",
        f"**Configurations** (odeflux: {_S}, `NeuralODE`'s default, but where Tsit5 is named; default "
        "`PIController()`, adjoint solves at the forward's tolerances):\n"
        + "\n".join(f"- {c.key}: {c.what}." for c in CONFIGS),
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gradient_work_precision",
                                description=__doc__.split("\n\n")[0])  # fmt: skip
    p.add_argument("--only", action="append", choices=list(GRAD_FIELDS), help="run just these fields (repeatable)")
    p.add_argument("--no-peers", action="store_true", help="odeflux's adjoints only")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: reproducible counts)")
    p.add_argument("--quick", action="store_true", help="tiny states, two tolerances; prints only (seconds)")
    p.add_argument("--out", type=Path, default=RESULT, help="results file (markdown); the PNG goes beside it")
    p.add_argument("--no-write", action="store_true", help="print only (no markdown, no PNG)")
    args = p.parse_args(argv)
    if args.threads < 1:
        p.error("--threads must be >= 1")
    write = not (args.no_write or args.quick)
    set_threads(args.threads)
    machine = machine_info(*PEERS) + f"\n- {code_state()}"
    configs = [c for c in CONFIGS if c.odeflux or not args.no_peers]
    start = time.perf_counter()
    results = []
    for name in args.only or GRAD_FIELDS:
        gf = GRAD_FIELDS[name](args.quick)
        r = run_field(gf, tolerances(gf, args.quick), configs)
        print(f"{name}: {r.seconds:.1f} s", flush=True)
        results.append(r)
    plot(results, args.out.with_suffix(".png") if write else io.BytesIO())
    parts = [method_section(), summary_section(results), accuracy_section(results)]
    parts += [field_section(r) for r in results]
    parts.append("![gradient work-precision](gradient_work_precision.png)")
    parts.append(closing_line(start))
    publish("Gradient work-precision: evaluations per gradient at equal error (issue 19)", parts, machine,
            "benchmarks.gradient_work_precision", argv, args.out, write=write)  # fmt: skip
    return {"results": results}


if __name__ == "__main__":
    main()
