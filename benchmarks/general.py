"""Gradients on vector fields odeflux was not tuned for, against torchdiffeq, torchode and diffrax.

Four workloads, one gradient (forward solve, loss, backward) per timing, the same weights, data
and tolerances in every library:

- ``mlp``: a time-dependent MLP ``Linear(65,256)-tanh-Linear(256,256)-tanh-Linear(256,64)`` on
  ``cat([y, t])``, state ``(2048, 64)`` float32, t in [0, 1], rtol = atol = 1e-4, loss the mean
  square of the final state;
- ``conv``: the ODE-Net field ``GroupNorm(32,64)-ReLU-Conv3x3(65->64)-GroupNorm-ReLU-Conv3x3(65->64)``
  with t as an extra input channel of each convolution, state ``(128, 64, 7, 7)`` float32, t in
  [0, 1], rtol = atol = 1e-3, the same loss;
- ``lv`` / ``lv-batch``: Lotka-Volterra with four learnable parameters, float64, rtol 1e-6, atol
  1e-8, t in [0, 10], 100 saved times, loss the sum of squares of the saved states; one state
  ``(2,)`` and a batch ``(256, 2)``.

Configurations: odeflux's default, ``NeuralODE``'s (its solver, Dopri5, and ``sensealg="auto"``:
which method it picks is noted), and with Tsit5 ``InterpolatingAdjoint()``, ``DirectAdjoint()`` and ``BacksolveAdjoint()``; torchdiffeq's ``odeint_adjoint`` and ``odeint``
(dopri5: torchdiffeq has no Tsit5); torchode's ``AutoDiffAdjoint`` (Tsit5); diffrax's
``RecursiveCheckpointAdjoint`` and ``BacksolveAdjoint`` under ``jax.jit`` (Tsit5), in their own
process (:mod:`benchmarks.peers.diffrax_general`). For each: median time per gradient over
interleaved rounds, forward and backward f evaluations, VJPs, and the gradient's relative error
against a float64 reference at tight tolerance.

    python -m benchmarks.general                  # writes benchmarks/results/general.md (about 7 min)
    python -m benchmarks.general --only lv        # one workload (repeatable)
    python -m benchmarks.general --quick          # smoke run: tiny sizes, 1 round, prints only
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import odeflux

from .common import (
    CountingField,
    Timing,
    closing_line,
    fmt_seconds,
    interleaved,
    machine_info,
    markdown_table,
    publish,
    set_threads,
)
from .peers import diffrax_client
from .provenance import code_state

RESULT = Path(__file__).parent / "results" / "general.md"
PACKAGES = ("torchdiffeq", "torchode", "jax", "diffrax", "equinox")
WORKLOADS = ("mlp", "conv", "lv", "lv-batch")

DEFAULT = 'odeflux "auto" (default)'
NODE_SOLVER = type(odeflux.NeuralODE(nn.Identity()).solver)  # the default is NeuralODE's, whatever it is
INTERPOLATING = "odeflux InterpolatingAdjoint"
DIRECT = "odeflux DirectAdjoint"
BACKSOLVE = "odeflux BacksolveAdjoint"
TD_ADJOINT = "torchdiffeq odeint_adjoint"
TD_ODEINT = "torchdiffeq odeint"
DFX_CHECKPOINT = "diffrax RecursiveCheckpointAdjoint (jit)"
DFX_BACKSOLVE = "diffrax BacksolveAdjoint (jit)"
DFX_ADJOINTS = {DFX_CHECKPOINT: "checkpoint", DFX_BACKSOLVE: "backsolve"}
GOAL_TD, GOAL_DFX = 0.5, 1.0


# -- the vector fields ------------------------------------------------------------------------


class TimeMLP(nn.Module):
    """``Linear(dim+1, hidden)-tanh-Linear(hidden, hidden)-tanh-Linear(hidden, dim)`` on ``cat([y, t])``.

    ``t`` may be 0-d, or one time per row of ``y`` (torchode's per-sample problems).
    """

    def __init__(self, dim: int = 64, hidden: int = 256):
        super().__init__()
        self.l1 = nn.Linear(dim + 1, hidden)
        self.l2 = nn.Linear(hidden, hidden)
        self.l3 = nn.Linear(hidden, dim)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tt = t.to(y.dtype).reshape(-1, 1).expand(y.shape[0], 1)
        h = torch.tanh(self.l1(torch.cat([y, tt], 1)))
        return self.l3(torch.tanh(self.l2(h)))


class ConvField(nn.Module):
    """The ODE-Net field: ``GroupNorm-ReLU-ConcatConv3x3-GroupNorm-ReLU-ConcatConv3x3``; each
    convolution sees a constant channel ``t`` in front of its input (``ConcatConv2d``)."""

    def __init__(self, channels: int = 64, groups: int = 32):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels + 1, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels + 1, channels, 3, padding=1)

    @staticmethod
    def _with_t(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        tt = t.to(x.dtype).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, x.shape[2], x.shape[3])
        return torch.cat([tt, x], 1)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self._with_t(t, F.relu(self.norm1(y))))
        return self.conv2(self._with_t(t, F.relu(self.norm2(h))))


class LotkaVolterra(nn.Module):
    """``x' = alpha x - beta x y``, ``y' = delta x y - gamma y`` on the last axis; four learnable parameters."""

    def __init__(self, alpha: float = 1.5, beta: float = 1.0, delta: float = 1.0, gamma: float = 3.0):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(alpha))
        self.beta = nn.Parameter(torch.tensor(beta))
        self.delta = nn.Parameter(torch.tensor(delta))
        self.gamma = nn.Parameter(torch.tensor(gamma))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, v = y[..., 0], y[..., 1]
        xv = x * v
        return torch.stack([self.alpha * x - self.beta * xv, self.delta * xv - self.gamma * v], -1)


@dataclass
class Workload:
    name: str
    description: str
    field: nn.Module
    y0: torch.Tensor
    t1: float
    rtol: float
    atol: float
    saveat: torch.Tensor | None  # None: the loss is the mean square of the final state
    reference: tuple[str, float, float]  # ("direct", rtol = atol, looser) or ("rk4", steps, fewer steps)
    torchode_mode: str  # "joint" (the batch as one problem) or "per-sample"
    jax_field: str
    rounds: int
    budget_s: float

    def loss(self, states: torch.Tensor) -> torch.Tensor:
        return states.pow(2).mean() if self.saveat is None else states.pow(2).sum()

    def loss_text(self) -> str:
        return "mean square of the final state" if self.saveat is None else "sum of squares of the saved states"


def build_workload(name: str, quick: bool) -> Workload:
    """The workload's field, with torch's default initialisation under a fixed seed, and its data."""
    torch.manual_seed(0)
    if name == "mlp":
        n = 16 if quick else 2048
        f = TimeMLP()
        y0 = torch.randn(n, 64)
        return Workload(name, f"time-dependent MLP 65->256->256->64 (t concatenated), state ({n}, 64) float32, "
                        "t in [0, 1], rtol = atol = 1e-4", f, y0, 1.0, 1e-4, 1e-4, None, ("direct", 1e-7, 1e-6),
                        "joint", "mlp", 1 if quick else 3, 75.0)  # fmt: skip
    if name == "conv":
        n = 2 if quick else 128
        f = ConvField()
        y0 = torch.randn(n, 64, 7, 7)
        return Workload(name, f"ODE-Net conv field (GroupNorm-ReLU-ConcatConv3x3 twice, 64 channels), state ({n}, "
                        "64, 7, 7) float32, t in [0, 1], rtol = atol = 1e-3", f, y0, 1.0, 1e-3, 1e-3, None,
                        ("rk4", 10, 5) if quick else ("rk4", 100, 50), "joint", "conv", 1 if quick else 3,
                        120.0)  # fmt: skip
    if name in ("lv", "lv-batch"):
        f = LotkaVolterra().double()
        if name == "lv":
            y0, shape = torch.tensor([1.0, 1.0], dtype=torch.float64), "(2,)"
        else:
            n = 4 if quick else 256
            y0, shape = 0.5 + torch.rand(n, 2, dtype=torch.float64), f"({n}, 2)"
        t1, n_save = (2.0, 20) if quick else (10.0, 100)
        saveat = torch.linspace(0.0, t1, n_save, dtype=torch.float64)
        return Workload(name, f"Lotka-Volterra, 4 learnable parameters, state {shape} float64, t in [0, {t1:g}], "
                        f"{n_save} saved times, rtol 1e-6, atol 1e-8", f, y0, t1, 1e-6, 1e-8, saveat,
                        ("direct", 1e-8, 1e-7) if quick else ("direct", 1e-10, 1e-9),
                        "joint" if name == "lv" else "per-sample", "lv", 1 if quick else 5, 30.0)  # fmt: skip
    raise ValueError(f"unknown workload {name!r}")


# -- counting ---------------------------------------------------------------------------------


class GradCountingField(CountingField):
    """A :class:`CountingField` that also counts VJPs through ``f`` (a hook on each output that
    the backward pass reaches) and torchdiffeq's adjoint steps."""

    def reset(self) -> None:
        super().reset()
        self.n_vjps = 0
        self.n_adjoint_steps = 0
        self.n_adjoint_accepted = 0

    def _count_vjp(self, grad: torch.Tensor) -> None:
        self.n_vjps += 1

    def forward(self, t: torch.Tensor, y: torch.Tensor, *args: Any) -> torch.Tensor:
        out = super().forward(t, y, *args)
        if out.requires_grad:
            out.register_hook(self._count_vjp)
        return out

    def callback_step_adjoint(self, t0: Any, y0: Any, dt: Any) -> None:
        self.n_adjoint_steps += 1

    def callback_accept_step_adjoint(self, t0: Any, y0: Any, dt: Any) -> None:
        self.n_adjoint_accepted += 1


@dataclass
class Counts:
    """Work of one gradient: f evaluations forward and backward, VJPs of f, steps accepted (rejected)."""

    fwd_f: int
    bwd_f: int
    vjps: int
    fwd_steps: tuple[int, int] | None = None
    bwd_steps: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)


# -- configurations ---------------------------------------------------------------------------


@dataclass
class Runner:
    """One configuration at fixed weights: ``step()`` takes a gradient (and returns its counts),
    ``grad()`` returns the last gradient as one float64 vector in the field's parameter order."""

    step: Callable[[], Counts | None]
    grad: Callable[[], torch.Tensor]


def _zero(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def _grad_vector(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1).double() for p in module.parameters()])


def odeflux_runner(w: Workload, sensealg: Any, field_: nn.Module | None = None, y0: torch.Tensor | None = None,
                   tol: float | None = None, solver: Callable[[], Any] = odeflux.Tsit5) -> Runner:  # fmt: skip
    f = w.field if field_ is None else field_
    y0 = w.y0 if y0 is None else y0
    rtol, atol = (w.rtol, w.atol) if tol is None else (tol, tol)
    saveat = None if w.saveat is None else w.saveat.to(y0.dtype)
    cf = GradCountingField(f)

    def step() -> Counts:
        _zero(f)
        cf.reset()
        sol = odeflux.solve(cf, y0, (0.0, w.t1), solver=solver(), rtol=rtol, atol=atol, saveat=saveat,
                            sensealg=sensealg)  # fmt: skip
        n_fwd = cf.n_calls
        w.loss(sol.ys[-1] if saveat is None else sol.ys).backward()
        s, b = sol.stats, sol.backward_stats
        c = Counts(n_fwd, cf.n_calls - n_fwd, cf.n_vjps, (s.n_accepted, s.n_rejected))
        if b is not None and b.n_steps:
            c.bwd_steps = (b.n_accepted, b.n_rejected)
        if b is not None and b.n_checkpoints:
            c.notes.append(f"{b.n_checkpoints} forward re-solve(s) in the backward pass")
        if sensealg == "auto":
            c.notes.append(f"picks {sol.sensealg!r}")
        return c

    return Runner(step, lambda: _grad_vector(f))


def torchdiffeq_runner(w: Workload, adjoint: bool) -> Runner:
    import torchdiffeq

    cf = GradCountingField(w.field)
    t = torch.tensor([0.0, w.t1], dtype=w.y0.dtype) if w.saveat is None else w.saveat
    solve = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint

    def step() -> Counts:
        _zero(w.field)
        cf.reset()
        out = solve(cf, w.y0, t, rtol=w.rtol, atol=w.atol, method="dopri5")
        n_fwd = cf.n_calls
        fwd_steps = (cf.n_accepted, cf.n_steps - cf.n_accepted)
        w.loss(out[-1] if w.saveat is None else out).backward()
        c = Counts(n_fwd, cf.n_calls - n_fwd, cf.n_vjps, fwd_steps)
        if adjoint:
            c.bwd_steps = (cf.n_adjoint_accepted, cf.n_adjoint_steps - cf.n_adjoint_accepted)
        return c

    return Runner(step, lambda: _grad_vector(w.field))


class TorchodeField(nn.Module):
    """torchode's ``(batch, features)`` states as the workload's: the batch as one problem
    (``joint``: ``(1, N)``) or one problem per sample (``(B, F)``, a time per sample)."""

    def __init__(self, f: nn.Module, shape: tuple[int, ...], joint: bool):
        super().__init__()
        self.f, self.shape, self.joint = f, list(shape), joint

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.joint:
            return self.f(t, y.view(self.shape)).reshape(1, -1)
        return self.f(t, y.view([y.shape[0]] + self.shape[1:])).reshape(y.shape[0], -1)


def torchode_runner(w: Workload, mode: str, controller: str = "integral") -> Runner:
    """``AutoDiffAdjoint`` (backpropagation through the solver) with Tsit5."""
    import torchode as to

    cf = GradCountingField(w.field)
    joint = mode == "joint" or w.y0.dim() == 1
    term = to.ODETerm(TorchodeField(cf, tuple(w.y0.shape), joint))
    if controller == "integral":
        ctrl = to.IntegralController(atol=w.atol, rtol=w.rtol, term=term)
    else:  # diffrax's PI gains, the same controller as odeflux's PIController (Hairer's 0.7/p, 0.4/p)
        ctrl = to.PIDController(atol=w.atol, rtol=w.rtol, pcoeff=0.4, icoeff=0.3, dcoeff=0.0, term=term)
    solver = to.AutoDiffAdjoint(to.Tsit5(term=term), ctrl)
    y0 = w.y0.reshape(1, -1) if joint else w.y0.reshape(w.y0.shape[0], -1)
    n = y0.shape[0]
    t_eval = None if w.saveat is None else w.saveat.expand(n, -1)
    problem = to.InitialValueProblem(y0, torch.zeros(n, dtype=y0.dtype), torch.full((n,), w.t1, dtype=y0.dtype),
                                     t_eval=t_eval)  # fmt: skip

    def step() -> Counts:
        _zero(w.field)
        cf.reset()
        sol = solver.solve(problem)
        n_fwd = cf.n_calls
        if w.saveat is None:
            states = sol.ys[:, -1].reshape(w.y0.shape)
        else:  # (problems, times, features) -> (times, *state)
            states = sol.ys.transpose(0, 1).reshape(len(w.saveat), *w.y0.shape)
        w.loss(states).backward()
        # Per-sample problems: the loop runs until the slowest sample is done.
        acc, att = int(sol.stats["n_accepted"].max()), int(sol.stats["n_steps"].max())
        return Counts(n_fwd, cf.n_calls - n_fwd, cf.n_vjps, (acc, att - acc))

    return Runner(step, lambda: _grad_vector(w.field))


def diffrax_runner(w: Workload, server: diffrax_client.DiffraxFieldServer, adjoint: str, tmp: Path) -> Runner:
    path = tmp / f"grad-{w.name}-{adjoint}.npz"
    names = [n for n, _ in w.field.named_parameters()]
    grads: dict[str, torch.Tensor] = {}

    def step() -> Counts:
        seconds, steps, acc, rej = server.grad(adjoint, path)
        with np.load(path) as z:
            grads["v"] = torch.cat([torch.from_numpy(np.asarray(z[n], np.float64)).reshape(-1) for n in names])
        fwd, bwd, vjps = server.count(adjoint)
        c = Counts(fwd, bwd, vjps, (acc, rej))
        c.notes.append(f"compile {server.compile_s:.1f} s (both adjoints)")
        return c

    return Runner(step, lambda: grads["v"])


# -- one workload -----------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    counts: Counts | None = None
    err: float | None = None
    timing: Timing | None = None
    failure: str | None = None
    reported: list[float] | None = None  # diffrax: the server's own seconds per gradient


def failure_line(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:110]}"


def _tight_gradient(w: Workload, how: str, setting: float) -> tuple[torch.Tensor, int]:
    """The float64 gradient: odeflux DirectAdjoint at rtol = atol = ``setting``, or (``how ==
    "rk4"``) torchdiffeq's odeint_adjoint with fixed-step RK4 in ``setting`` steps; and its forward f evals."""
    f64 = GradCountingField(copy.deepcopy(w.field).double())
    y0 = w.y0.double()
    if how == "direct":
        sol = odeflux.solve(f64, y0, (0.0, w.t1), rtol=setting, atol=setting, saveat=w.saveat,
                            sensealg=odeflux.DirectAdjoint())  # fmt: skip
        states = sol.ys[-1] if w.saveat is None else sol.ys
    else:
        import torchdiffeq

        t = torch.tensor([0.0, w.t1], dtype=torch.float64) if w.saveat is None else w.saveat
        out = torchdiffeq.odeint_adjoint(f64, y0, t, method="rk4", options={"step_size": w.t1 / setting})
        states = out[-1] if w.saveat is None else out
    n_fwd = f64.n_calls
    w.loss(states).backward()
    return _grad_vector(f64), n_fwd


def reference(w: Workload) -> tuple[torch.Tensor, str]:
    """The reference gradient (float64, tight), and a second one at half the accuracy setting
    (twice the tolerance, or half the steps) whose distance from it bounds its error."""
    how, setting, looser = w.reference
    t0 = time.perf_counter()
    ref, n_fwd = _tight_gradient(w, how, setting)
    took = time.perf_counter() - t0
    check, _ = _tight_gradient(w, how, looser)
    if how == "direct":
        text = (f"odeflux DirectAdjoint (Tsit5, backpropagation through the solver), float64, rtol = atol = "
                f"{setting:g}")  # fmt: skip
        versus = f"rtol = atol = {looser:g}"
    else:
        text = (f"torchdiffeq odeint_adjoint with fixed-step RK4, {setting} steps, float64 (the field's ReLU kinks "
                "make adaptive gradients converge slowly: fixed steps converge at first order here)")  # fmt: skip
        versus = f"{looser} steps"
    text += (f": {n_fwd} forward f evaluations, {fmt_seconds(took)}; it differs from the same at {versus} by "
             f"{rel_err(check, ref):.1e} (relative)")  # fmt: skip
    return ref, text


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - ref) / torch.linalg.vector_norm(ref))


def run_workload(w: Workload, diffrax_missing: str | None, tmp: Path, threads: int) -> tuple[list[Row], dict]:
    print(f"== {w.name}: {w.description}", flush=True)
    ref, ref_how = reference(w)
    print(f"  reference: {ref_how}", flush=True)
    makers: dict[str, Callable[[], Runner]] = {
        DEFAULT: lambda: odeflux_runner(w, "auto", solver=NODE_SOLVER),
        INTERPOLATING: lambda: odeflux_runner(w, odeflux.InterpolatingAdjoint()),
        DIRECT: lambda: odeflux_runner(w, odeflux.DirectAdjoint()),
        BACKSOLVE: lambda: odeflux_runner(w, odeflux.BacksolveAdjoint()),
        TD_ADJOINT: lambda: torchdiffeq_runner(w, adjoint=True),
        TD_ODEINT: lambda: torchdiffeq_runner(w, adjoint=False),
        torchode_name(w): lambda: torchode_runner(w, w.torchode_mode),
    }
    server = None
    info: dict[str, Any] = {"reference": ref_how}
    if diffrax_missing is None:
        data = tmp / f"{w.name}.npz"
        arrays = {f"p:{n}": p.detach().numpy() for n, p in w.field.named_parameters()}
        arrays.update(y0=w.y0.numpy(), t1=np.asarray(w.t1))
        if w.saveat is not None:
            arrays["saveat"] = w.saveat.numpy()
        np.savez(data, **arrays)
        try:
            t0 = time.perf_counter()
            # torch at 1 thread: diffrax's process pinned to one core; else JAX's default (all usable cores).
            server = diffrax_client.DiffraxFieldServer(w.jax_field, data, w.rtol, w.atol,
                                                       threads=1 if threads == 1 else 0)  # fmt: skip
            info["diffrax_start"] = (time.perf_counter() - t0, server.compile_s)
            for name, adj in DFX_ADJOINTS.items():
                makers[name] = lambda adj=adj: diffrax_runner(w, server, adj, tmp)
        except Exception as e:
            for name in DFX_ADJOINTS:
                makers[name] = lambda e=e: _raise(e)
    rows: dict[str, Row] = {}
    fns: dict[str, Callable[[], Any]] = {}
    try:
        for name, make in makers.items():
            row = rows[name] = Row(name)
            t0 = time.perf_counter()
            try:  # the first gradient: counts, error, and the warm-up
                runner = make()
                row.counts = runner.step()
                row.err = rel_err(runner.grad(), ref)
            except Exception as e:  # noqa: BLE001 - a failing configuration is a result
                row.failure = failure_line(e)
                print(f"  {name}: fails: {row.failure}", flush=True)
                traceback.print_exc()
                continue
            c = row.counts
            print(f"  {name}: first gradient {fmt_seconds(time.perf_counter() - t0)}, f evals {c.fwd_f} + {c.bwd_f}, "
                  f"VJPs {c.vjps}, error {row.err:.1e}", flush=True)  # fmt: skip
            if name in DFX_ADJOINTS:
                fns[name] = lambda adj=DFX_ADJOINTS[name]: server.time(adj)
            else:
                fns[name] = runner.step
        if fns:
            timings = interleaved(fns, rounds=w.rounds, warmup=0, budget_s=w.budget_s, min_rounds=1)
            for name, t in timings.items():
                rows[name].timing = t
            info["rounds"] = len(next(iter(timings.values())).samples)
        if server is not None:
            for name, adj in DFX_ADJOINTS.items():
                if name in rows and adj in server.reported:
                    rows[name].reported = server.reported[adj]
    finally:
        if server is not None:
            server.close()
    return list(rows.values()), info


def _raise(e: BaseException):
    raise e


def torchode_name(w: Workload) -> str:
    how = "the batch as one problem" if w.torchode_mode == "joint" else "one problem per sample"
    if w.y0.dim() == 1:
        how = "one problem"
    return f"torchode AutoDiffAdjoint ({how})"


# -- output -----------------------------------------------------------------------------------


def fmt_steps(s: tuple[int, int] | None) -> str:
    return "—" if s is None else f"{s[0]} ({s[1]})"


def workload_table(rows: list[Row]) -> str:
    base = {r.name: r for r in rows}.get(DEFAULT)
    out = []
    for r in rows:
        if r.failure:
            out.append([r.name, f"fails: {r.failure}", "—", "—", "—", "—", "—", "—", "—", ""])
            continue
        c, t = r.counts, r.timing
        ratio = f"{base.timing.median / t.median:.2f}" if base and base.timing and t else "—"
        notes = list(c.notes)
        if r.reported:
            med = float(np.median(r.reported))
            notes.append(f"in-process {fmt_seconds(med)} (timed here with the pipe's round trip)")
        out.append([r.name, str(t) if t else "—", ratio, c.fwd_f, c.bwd_f, c.vjps, fmt_steps(c.fwd_steps),
                    fmt_steps(c.bwd_steps), f"{r.err:.1e}", "; ".join(notes)])  # fmt: skip
    headers = ["configuration", "gradient: median [min–max]", "odeflux default ÷ this", "fwd f evals", "bwd f evals",
               "VJPs", "fwd steps acc (rej)", "bwd steps acc (rej)", "grad rel. error", "notes"]  # fmt: skip
    return markdown_table(headers, out, align="llrrrrllrl")


def diffrax_seconds(r: Row) -> float:
    """diffrax's own seconds per gradient (the server's clock, without the pipe), median."""
    return float(np.median(r.reported)) if r.reported else r.timing.median


def goals(all_rows: dict[str, list[Row]]) -> tuple[str, list[dict]]:
    out, data = [], []
    for wname, rows in all_rows.items():
        by = {r.name: r for r in rows}
        d = by.get(DEFAULT)
        dfx = [by[n] for n in DFX_ADJOINTS if n in by and by[n].timing]
        fastest_dfx = min(dfx, key=diffrax_seconds) if dfx else None
        for label, peer, goal in (
            (f"÷ {TD_ADJOINT}", by.get(TD_ADJOINT), GOAL_TD),
            ("÷ diffrax's fastest" + (f" ({fastest_dfx.name}, in-process time)" if fastest_dfx else ""), fastest_dfx,
             GOAL_DFX),
        ):  # fmt: skip
            if d is None or d.timing is None:
                value, verdict = "—", "not measured" + (f" (odeflux fails: {d.failure})" if d and d.failure else "")
            elif peer is None or peer.timing is None:
                why = "failed" if peer is not None and peer.failure else "not run"
                value, verdict = "—", f"not measured (peer {why})"
            else:
                peer_s = diffrax_seconds(peer) if peer.name in DFX_ADJOINTS else peer.timing.median
                ratio = d.timing.median / peer_s
                value, verdict = f"{ratio:.2f}", "met" if ratio <= goal else "not met"
                data.append({"workload": wname, "peer": peer.name, "ratio": ratio, "goal": goal, "met": ratio <= goal})
            out.append([wname, f"{DEFAULT} {label}", value, f"≤ {goal:g}", verdict])
    return markdown_table(["workload", "ratio of medians", "value", "goal", "verdict"], out, align="llrll"), data


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.general", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", choices=WORKLOADS, help="run just these workloads (repeatable)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--rounds", type=int, help="timed rounds at most (default: 3 for mlp/conv, 5 for lv; "
                   "each workload also stops timing after its time budget, 75-120 s for mlp/conv, 30 s for lv)")
    p.add_argument("--note", help="a sentence for the results file about the conditions of this run")
    p.add_argument("--no-diffrax", action="store_true", help="leave diffrax out")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 1 round, prints only")
    p.add_argument("--out", type=Path, default=RESULT, help="results file (markdown)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.threads < 1 or (args.rounds is not None and args.rounds < 1):
        p.error("--threads and --rounds must be >= 1")
    set_threads(args.threads)
    machine = machine_info(*PACKAGES) + f"\n- {code_state()}"
    start = time.perf_counter()
    names = args.only or list(WORKLOADS)
    diffrax_missing = "left out (--no-diffrax)" if args.no_diffrax else diffrax_client.available()

    all_rows: dict[str, list[Row]] = {}
    parts_w: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            w = build_workload(name, args.quick)
            if args.rounds is not None and not args.quick:
                w.rounds = args.rounds
            t0 = time.perf_counter()
            missing = diffrax_missing
            if args.quick and name != "lv" and not missing:
                missing = "left out of --quick runs except for lv (JAX start-up and compilation take long)"
            rows, info = run_workload(w, missing, Path(tmp), args.threads)
            if missing and not diffrax_missing:
                info["diffrax_note"] = missing
            all_rows[name] = rows
            took = time.perf_counter() - t0
            extra = ""
            if "diffrax_note" in info:
                extra = f" diffrax: {info['diffrax_note']}."
            if "diffrax_start" in info:
                s, c = info["diffrax_start"]
                extra = f" diffrax's process started in {s:.1f} s, {c:.1f} s of it compiling both gradients."
            parts_w.append(
                f"## {name}: {w.description}\n\nLoss: {w.loss_text()}. Reference gradient: {info['reference']}. "
                f"Timed rounds: {info.get('rounds', 0)} (after the untimed first gradient of each configuration, "
                f"which gave the counts and the error); workload {took:.0f} s.{extra}\n\n{workload_table(rows)}"
            )
    goal_table, goal_data = goals(all_rows)
    parts = [
        "One gradient per timing: forward solve, the loss, `backward()` (or `jax.value_and_grad`), at fixed "
        f"weights (torch's default initialisation, seed 0, the same arrays sent to JAX), {args.threads} torch "
        f"thread(s); JAX (XLA's CPU client, {'pinned to one core' if args.threads == 1 else 'all usable cores'}) "
        "in its own process, idle while torch runs and the "
        "other way round. Methods: Tsit5 in odeflux (its PI controller) but for its default, `NeuralODE`'s "
        f"({NODE_SOLVER.__name__}), torchode (`IntegralController`) and "
        "diffrax (`PIDController` with its default gains, an I controller); torchdiffeq has no Tsit5, so dopri5 "
        "there (default controller). Same rtol and atol everywhere, adjoint solves included (each library's "
        "default: the forward's). The whole state is one ODE with one RMS error norm everywhere, except "
        "torchode on `lv-batch`: one problem per sample (its native batching: each sample its own steps and "
        "norm), about 6× faster there than the batch as one problem when this benchmark was written; torchode "
        "runs eagerly, as `torch.jit.script` of its solver fails on this torch (an internal assertion) and "
        "`torch.compile` of `solve` fails in Inductor. diffrax's conv field runs on NHWC states (XLA's CPU "
        "convolutions in NCHW were 5× slower); weights, data and gradients are exchanged in torch's layouts.",
        *([f"**Note on this run**: {args.note}"] if args.note else []),
        "Columns: *gradient* median [min–max] seconds over interleaved rounds (every configuration once per round, "
        "rotated order); *odeflux default ÷ this* (below 1: odeflux's default is faster); *fwd f evals* in the "
        "forward solve; *bwd f evals* evaluations of f during the backward pass (including the one inside each "
        "VJP an adjoint takes, and forward re-solves; 0 for backpropagation through the recorded solve); *VJPs* "
        "backward passes through f (for torch: a hook on every f output the backward pass reaches; for diffrax: "
        "a `jax.custom_vjp` wrapper's backward rule, in a separate instrumented run); steps accepted (rejected) "
        "from each library's statistics (torchode: the slowest problem's); *grad rel. error*: 2-norm relative "
        "error of the gradient with respect to all the field's parameters against the reference.",
        "## Goals\n\nodeflux's default adjoint (`NeuralODE`'s `sensealg=\"auto\"`) against torchdiffeq's `odeint_adjoint` "
        f"(goal ≤ {GOAL_TD:g}) and against diffrax's faster adjoint (goal ≤ {GOAL_DFX:g}), ratio of median "
        "times per gradient (diffrax's: the time its process measures, without the pipe's round trip)."
        f"\n\n{goal_table}",
        *parts_w,
    ]
    if diffrax_missing:
        parts.append(f"diffrax: {diffrax_missing}.")
    parts.append(closing_line(start))
    publish("General vector fields: gradients against torchdiffeq, torchode and diffrax", parts, machine,
            "benchmarks.general", argv, args.out, not (args.no_write or args.quick))  # fmt: skip
    return {"rows": all_rows, "goals": goal_data}


if __name__ == "__main__":
    main()
