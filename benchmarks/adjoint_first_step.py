"""The continuous adjoints' first step per interval, counted: backward steps, VJPs and gradient error.

One `InterpolatingAdjoint` gradient per `first_step` (``"continue"``, the default; ``"hairer"``;
``"interval"``; ``"forward"``) on the small systems of benchmarks/small_systems.py (the spiral, 30
saved times; Lotka-Volterra, 100 saved times), counts from ``sol.backward_stats``, the gradient's
relative 2-norm error against DirectAdjoint at rtol 1e-9 / atol 1e-10; and the steps alone on the
neural fields of benchmarks/general.py (one interval, a mean loss). Counts only: no timing.

    python -m benchmarks.adjoint_first_step            # writes results/adjoint_first_step.md
    python -m benchmarks.adjoint_first_step --no-write
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import odeflux

from .common import closing_line, machine_info, markdown_table, publish, set_threads
from .provenance import code_state
from . import general
from .small_systems import build_workload, grad_vector

RESULT = Path(__file__).parent / "results" / "adjoint_first_step.md"
FIRST_STEPS = ("continue", "hairer", "interval", "forward")


def gradient(w, sensealg, rtol: float | None = None, atol: float | None = None):
    w.field.zero_grad()
    sol = odeflux.solve(w.field, w.y0, (float(w.ts[0]), float(w.ts[-1])), saveat=w.ts, rtol=rtol or w.rtol,
                        atol=atol or w.atol, sensealg=sensealg)  # fmt: skip
    w.loss(sol).backward()
    return grad_vector(w.field), sol


def counts(name: str, first: str, sol) -> list[str]:
    """A table row's workload, first step and step and VJP counts."""
    b, s = sol.backward_stats, sol.stats
    return [name, f'`"{first}"`' + (" (default)" if first == "continue" else ""), f"{s.n_accepted} ({s.n_rejected})",
            f"{b.n_accepted} ({b.n_rejected})", str(b.n_vjp_evals)]  # fmt: skip


def rows_for(name: str, quick: bool) -> list[list[str]]:
    w = build_workload(name, quick)
    ref, _ = gradient(w, odeflux.DirectAdjoint(), 1e-9, 1e-10)
    rows = []
    for first in FIRST_STEPS:
        g, sol = gradient(w, odeflux.InterpolatingAdjoint(first_step=first))
        err = float(torch.linalg.vector_norm(g - ref) / torch.linalg.vector_norm(ref))
        rows.append(counts(name, first, sol) + [f"{err:.2e}"])
    return rows


def neural_rows(name: str, quick: bool) -> list[list[str]]:
    """benchmarks/general.py's ``name`` workload (a mean loss of y(1)): steps and VJPs per first step."""
    w = general.build_workload(name, quick)
    rows = []
    for first in FIRST_STEPS:
        w.field.zero_grad()
        sol = odeflux.solve(w.field, w.y0, (0.0, w.t1), rtol=w.rtol, atol=w.atol,
                            sensealg=odeflux.InterpolatingAdjoint(first_step=first))  # fmt: skip
        w.loss(sol.ys[-1]).backward()
        rows.append(counts(name, first, sol))
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.adjoint_first_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the shortened workloads; prints only")
    p.add_argument("--out", type=Path, default=RESULT, help="results file (markdown)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    set_threads(1)
    start = time.perf_counter()
    rows = [r for name in ("spiral", "lv") for r in rows_for(name, args.quick)]
    table = markdown_table(["workload", "first_step", "forward steps (rejected)", "backward steps (rejected)", "VJPs",
                            "gradient rel. error"], rows, align="llrrrr")  # fmt: skip
    neural = markdown_table(["workload", "first_step", "forward steps (rejected)", "backward steps (rejected)", "VJPs"],
                            [r for name in ("mlp", "conv") for r in neural_rows(name, args.quick)], align="llrrr")
    what = (
        "One `InterpolatingAdjoint()` gradient per adjoint `first_step` on benchmarks/small_systems.py's "
        "workloads (the spiral: 30 saved times, float32, rtol 1e-3, atol 1e-6; Lotka-Volterra: 100 saved "
        "times, float64, rtol 1e-6, atol 1e-8), the forward solve with odeflux's default controller. "
        "Backward steps and VJPs from `sol.backward_stats`; the error is the gradient's relative 2-norm "
        "difference from DirectAdjoint at rtol 1e-9, atol 1e-10."
    )
    neural_what = (
        "The neural fields of benchmarks/general.py (`mlp`: a time-dependent MLP on a (2048, 64) state at "
        "rtol = atol = 1e-4; `conv`: the ODE-Net's conv field on (128, 64, 7, 7) at 1e-3), one interval, the loss "
        "the mean square of y(1): an adjoint far below `atol`. Steps and VJPs only (their gradient errors are in "
        "benchmarks/results/general.md and gradient_work_precision.md)."
    )
    publish("The continuous adjoints' first step: counts", [what, table, neural_what, neural, closing_line(start)],
            machine_info() + f"\n- {code_state()}", "benchmarks.adjoint_first_step", argv, args.out,
            write=not (args.no_write or args.quick))  # fmt: skip
    return {}


if __name__ == "__main__":
    main()
