"""Forward-solve cost per accepted step and per function evaluation: odeflux against torchdiffeq and torchode.

The problem is the MNIST tutorial's Neural ODE layer: the vector field
``Linear(20,10)-tanh-Linear(10,10)-tanh-Linear(10,20)-tanh`` on a ``(128, 20)`` float32 state
over ``t in [0, 1]``, under ``torch.no_grad``. Every library calls the same counting wrapper, and
all configurations are timed interleaved (see :func:`benchmarks.common.interleaved`).

    python -m benchmarks.solver_step                # writes benchmarks/results/solver_step.md
    python -m benchmarks.solver_step --rounds 20 --no-write
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import odeflux

from .common import (
    CountingField,
    Timing,
    fmt_seconds,
    interleaved,
    machine_info,
    markdown_table,
    result_document,
    set_threads,
    write_result,
)

BATCH, DIM = 128, 20
T0, T1 = 0.0, 1.0
PEERS = ("torchdiffeq", "torchode")
RESULT = Path(__file__).parent / "results" / "solver_step.md"


def tutorial_field(seed: int = 0) -> nn.Sequential:
    """The tutorial's ODE vector field (PyTorch's default init, seeded)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 20), nn.Tanh())


def initial_state(seed: int = 1) -> torch.Tensor:
    """``tanh`` of a fixed standard-normal ``(128, 20)`` draw: the range of the tutorial's encoder output."""
    g = torch.Generator().manual_seed(seed)
    return torch.tanh(torch.randn(BATCH, DIM, generator=g))


@dataclass
class Case:
    """One configuration: a timed ``solve()`` and how to read its result."""

    name: str
    method: str  # "tsit5" or "dopri5": the odeflux row of the same method is the baseline
    solve: Callable[[], Any]
    steps: Callable[[Any], tuple[int, int]]  # (accepted, attempted) from solve()'s result
    final: Callable[[Any], torch.Tensor]  # the state at T1, shape (BATCH, DIM)


def odeflux_cases(field: CountingField, y0: torch.Tensor, tol: float) -> list[Case]:
    cases = []
    for solver in (odeflux.Tsit5(), odeflux.Dopri5()):  # one instance per case: it caches its coefficients

        def solve(solver: odeflux.solvers.ExplicitRK = solver) -> odeflux.Solution:
            return odeflux.solve(field, y0, (T0, T1), solver=solver, rtol=tol, atol=tol, save_start=False)

        cases.append(
            Case(
                f"odeflux {type(solver).__name__}",
                type(solver).__name__.lower(),
                solve,
                lambda s: (s.stats.n_accepted, s.stats.n_steps),
                lambda s: s.ys[-1],
            )
        )
    return cases


def torchdiffeq_cases(field: CountingField, y0: torch.Tensor, tol: float, notes: list[str]) -> list[Case]:
    import torchdiffeq
    from torchdiffeq._impl.odeint import SOLVERS

    ts = torch.tensor([T0, T1])
    cases = []
    for method in ("dopri5", "tsit5"):
        if method not in SOLVERS:
            notes.append(f"torchdiffeq {torchdiffeq.__version__} has no `{method}` method; that row is left out.")
            continue
        cases.append(
            Case(
                f"torchdiffeq {method}",
                method,
                lambda method=method: torchdiffeq.odeint(field, y0, ts, rtol=tol, atol=tol, method=method),
                lambda _: (field.n_accepted, field.n_steps),  # from torchdiffeq's step callbacks
                lambda ys: ys[-1],
            )
        )
    return cases


def torchode_cases(field: CountingField, y0: torch.Tensor, tol: float) -> list[Case]:
    import torchode as to

    def adjoint(f: Callable, method: type) -> Any:
        term = to.ODETerm(f)
        # solve_ivp's default controller gains, at this benchmark's tolerances.
        ctrl = to.PIDController(atol=tol, rtol=tol, pcoeff=0.2, icoeff=0.5, dcoeff=0.0, term=term)
        return to.AutoDiffAdjoint(method(term=term), ctrl)

    def per_sample_steps(sol: Any) -> tuple[int, int]:
        # The loop runs until the slowest sample is done: its iterations are what f is called for.
        return int(sol.stats["n_accepted"].max()), int(sol.stats["n_steps"].max())

    def joint(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return field(t, y.view(BATCH, DIM)).view(1, BATCH * DIM)

    def problem(y: torch.Tensor) -> Any:
        return to.InitialValueProblem(y, torch.full((y.shape[0],), T0), torch.full((y.shape[0],), T1))

    cases = []
    yj = y0.reshape(1, BATCH * DIM)
    for method in (to.Tsit5, to.Dopri5):
        solver = adjoint(joint, method)
        cases.append(
            Case(
                f"torchode {method.__name__} (joint)",
                method.__name__.lower(),
                lambda solver=solver: solver.solve(problem(yj)),
                per_sample_steps,
                lambda s: s.ys[0, -1].view(BATCH, DIM),
            )
        )
    solver = adjoint(field, to.Tsit5)
    cases.append(
        Case(
            "torchode Tsit5 (per-sample)",
            "tsit5",
            lambda: solver.solve(problem(y0)),
            per_sample_steps,
            lambda s: s.ys[:, -1],
        )
    )
    return cases


def torchode_jit_note(net: nn.Module) -> str:
    """Whether torchode's TorchScript path works here (tried once per process: scripting a class twice fails)."""
    import torchode as to

    term = to.ODETerm(_ScriptableField(net))
    ctrl = to.PIDController(atol=1e-3, rtol=1e-3, pcoeff=0.2, icoeff=0.5, dcoeff=0.0, term=term)
    try:
        torch.jit.script(to.AutoDiffAdjoint(to.Tsit5(term=term), ctrl))
    except Exception as e:  # torchode's TorchScript support breaks on some torch releases
        first = (str(e).strip().splitlines() or [""])[0]
        return (
            f"torchode's `torch.jit.script(AutoDiffAdjoint(...))` fails on torch {torch.__version__} "
            f"({type(e).__name__}: {first[:60]}...); no scripted row."
        )
    return "torchode's `torch.jit.script` path works on this torch but is not timed (the counting wrapper is not scriptable)."


class _ScriptableField(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y)


@torch.no_grad()
def reference_final(net: nn.Module, y0: torch.Tensor) -> torch.Tensor:
    """y(T1) from torchdiffeq's dopri8 in float64 at rtol = atol = 1e-10 (independent of odeflux)."""
    import copy

    import torchdiffeq

    net64 = copy.deepcopy(net).double()
    return torchdiffeq.odeint(lambda t, y: net64(y), y0.double(), torch.tensor([T0, T1], dtype=torch.float64),
                              rtol=1e-10, atol=1e-10, method="dopri8")[-1]  # fmt: skip


def run_tolerance(
    net: nn.Module, y0: torch.Tensor, tol: float, rounds: int, warmup: int, budget_s: float
) -> tuple[str, int, list[str]]:
    """Time every case at one tolerance; return the markdown table, the rounds done and notes."""
    field = CountingField(net, autonomous=True)
    notes: list[str] = []
    cases = odeflux_cases(field, y0, tol) + torchdiffeq_cases(field, y0, tol, notes) + torchode_cases(field, y0, tol)
    ref = reference_final(net, y0)

    counts: dict[str, tuple[int, int, int, float]] = {}
    with torch.no_grad():
        for c in cases:  # one untimed run each for the counts and the accuracy
            field.reset()
            out = c.solve()
            accepted, attempted = c.steps(out)
            err = float((c.final(out).double() - ref).abs().max())
            counts[c.name] = (accepted, attempted, field.n_calls, err)
        timings = interleaved({c.name: c.solve for c in cases}, rounds=rounds, warmup=warmup, budget_s=budget_s)

    base = {c.method: c.name for c in cases if c.name.startswith("odeflux")}
    rows = []
    for c in cases:
        t: Timing = timings[c.name]
        accepted, attempted, nf, err = counts[c.name]
        b = base[c.method]
        b_nf = counts[b][2]
        per_step, per_f = t.median / accepted, t.median / nf
        rows.append([
            c.name, str(t), f"{accepted} ({attempted - accepted})", nf, fmt_seconds(per_step), fmt_seconds(per_f),
            f"{t.median / timings[b].median:.2f} ({t.lo / timings[b].lo:.2f})",
            f"{per_f / (timings[b].median / b_nf):.2f}", f"{err:.1e}",
        ])  # fmt: skip
    headers = [
        "configuration", "solve: median [min–max]", "accepted (rejected) steps", "f evals", "per accepted step",
        "per f eval", "solve ÷ odeflux: median (min)", "per f eval ÷ odeflux", "max abs error",
    ]  # fmt: skip
    done = len(next(iter(timings.values())).samples)
    return markdown_table(headers, rows, align="lllrrrrrr"), done, notes


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m benchmarks.solver_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=200, help="timed rounds; each runs every configuration once")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs of each configuration first")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--budget", type=float, default=40.0, help="seconds of timed rounds per tolerance at most")
    p.add_argument("--tol", type=float, action="append", help="rtol = atol; repeat for several (default 1e-3 1e-6)")
    p.add_argument("--out", type=Path, default=RESULT, help="results file (markdown)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.threads < 1 or not args.budget > 0:
        p.error("--rounds and --threads must be >= 1, --warmup >= 0, --budget > 0")
    tols = args.tol or [1e-3, 1e-6]
    if any(not (tol > 0) for tol in tols):
        p.error(f"--tol must be positive, got {tols}")
    set_threads(args.threads)
    machine = machine_info(*PEERS)

    net, y0 = tutorial_field(), initial_state()
    parts = [
        "Forward solve of the MNIST tutorial's Neural ODE layer: vector field "
        "`Linear(20,10)-tanh-Linear(10,10)-tanh-Linear(10,20)-tanh` (seed 0), state `tanh(randn(128, 20))` "
        f"float32 (seed 1), t in [0, 1], `torch.no_grad`, {args.threads} torch thread(s). Timings: interleaved "
        f"rounds (each runs every configuration once, in rotated order) after {args.warmup} warm-up runs of each; "
        f"up to {args.rounds} rounds or {args.budget:g} s per tolerance.",
        "Each library keeps its own step-size controller: odeflux its default `PIController()` (OrdinaryDiffEq's PI controller, its error memory floored at 0.1), torchdiffeq "
        "its I controller, torchode `PIDController(pcoeff=0.2, icoeff=0.5)` (its `solve_ivp` default). "
        "*joint*: torchode solves the batch as one `(1, 2560)` problem (one step size and error norm for the "
        "whole batch, as odeflux and torchdiffeq do); *per-sample*: torchode's own mode, 128 problems with their "
        "own step sizes, steps counted for the slowest sample. f evals are counted by one wrapper module for all. "
        "÷ odeflux: time relative to odeflux with the same method (Tsit5 rows to odeflux Tsit5, dopri5 rows to "
        "odeflux Dopri5), from the medians (and from the minima, the least disturbed runs); above 1 is slower "
        "than odeflux; per f eval divides each solve time by its own f evals, so step-count differences "
        "between controllers cancel. Max abs error: final state against torchdiffeq dopri8 "
        "in float64 at rtol = atol = 1e-10 (float32 round-off alone is about 1e-6 here).",
        "At the tutorial's tolerance a solve is only 2-3 steps, so per-solve set-up (input checks, the initial "
        "step size, one extra f eval) weighs on *per accepted step*; the tighter tolerance takes more steps. "
        "torchdiffeq's dopri5 may step past t1 and interpolate back; odeflux and torchode end their last step "
        "on t1.",
    ]
    notes = [torchode_jit_note(net)]
    load, cores = os.getloadavg()[0], len(os.sched_getaffinity(0))
    if load > 0.5 * cores:
        notes.append(
            f"The machine was busy when this run started (1-minute load {load:.1f} on {cores} cores): medians "
            "and maxima carry other processes' noise; the minima are the least disturbed runs."
        )
    for tol in tols:
        table, done, tol_notes = run_tolerance(net, y0, tol, args.rounds, args.warmup, args.budget)
        label = " (the tutorial's tolerance)" if tol == 1e-3 else ""
        parts.append(f"## rtol = atol = {tol:g}{label}\n\n{done} rounds.\n\n{table}")
        notes += [n for n in tol_notes if n not in notes]
    if notes:
        parts.append("Notes:\n" + "\n".join(f"- {n}" for n in notes))
    body = "\n\n".join(parts)
    doc = result_document("Solver step cost: odeflux vs torchdiffeq vs torchode", body, machine=machine)
    print(doc)
    if not args.no_write:
        print(f"written to {write_result(args.out, doc)}")
    return doc


if __name__ == "__main__":
    main()
