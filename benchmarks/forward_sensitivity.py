"""ForwardSensitivity against DirectAdjoint and the continuous adjoints, and where it stops paying.

Two parts, one gradient (forward solve, loss, ``backward()``) per timing, float64, Tsit5:

- ``lv``: benchmarks/general.py's ``lv`` workload: Lotka-Volterra with 4 learnable rates, state
  (2,), t in [0, 10], 100 saved times, rtol 1e-6, atol 1e-8, loss the sum of squares of the
  saved states;
- ``mlp``: ``Linear(4, w)-tanh-Linear(w, 4)`` fields of growing width ``w`` (state (4,), its
  ``9w + 4`` parameters differentiated), t in [0, 1], 20 saved times, same tolerances and loss:
  whether and where ForwardSensitivity's cost, which grows with the number of parameters,
  crosses the adjoints' (what ``sensealg="auto"`` picks for small problems,
  :data:`odeflux.sensitivity.SMALL_LIMIT`).

Each gradient's relative error is against DirectAdjoint at rtol = atol = 1e-11.

    python -m benchmarks.forward_sensitivity            # writes benchmarks/results/forward_sensitivity.md
    python -m benchmarks.forward_sensitivity --quick    # smoke run, prints only
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import odeflux

from .common import closing_line, fmt_seconds, interleaved, machine_info, markdown_table, publish
from .general import LotkaVolterra
from .provenance import code_state

RESULT = Path(__file__).parent / "results" / "forward_sensitivity.md"
WIDTHS = (2, 4, 8, 16, 32, 64)


def methods() -> dict[str, Callable[[], Any]]:
    return {
        "ForwardSensitivity()": lambda: odeflux.ForwardSensitivity(),
        "ForwardSensitivity(tangents='forward')": lambda: odeflux.ForwardSensitivity(tangents="forward"),
        "ForwardSensitivity(tangents='reverse')": lambda: odeflux.ForwardSensitivity(tangents="reverse"),
        "ForwardSensitivity(seminorm=True)": lambda: odeflux.ForwardSensitivity(seminorm=True),
        "DirectAdjoint()": lambda: odeflux.DirectAdjoint(),
        "InterpolatingAdjoint()": lambda: odeflux.InterpolatingAdjoint(),
        "GaussAdjoint()": lambda: odeflux.GaussAdjoint(),
        "BacksolveAdjoint()": lambda: odeflux.BacksolveAdjoint(),
    }


def gradient(f: nn.Module, y0: torch.Tensor, t1: float, saveat: torch.Tensor, sensealg: Any, tol=(1e-6, 1e-8)):
    """One gradient of the sum of squares of the saved states; ``(grad, sol)``."""
    params = list(f.parameters())
    for p in params:
        p.grad = None
    sol = odeflux.solve(f, y0, (0.0, t1), rtol=tol[0], atol=tol[1], saveat=saveat, sensealg=sensealg)
    sol.ys.pow(2).sum().backward()
    return torch.cat([p.grad.reshape(-1) for p in params]), sol


def case(f: nn.Module, y0: torch.Tensor, t1: float, saveat: torch.Tensor, rounds: int, budget: float, names):
    ref, _ = gradient(f, y0, t1, saveat, odeflux.DirectAdjoint(), (1e-11, 1e-11))
    made = methods()
    rows, fns = {}, {}
    for name in names:
        alg = made[name]()
        g, sol = gradient(f, y0, t1, saveat, alg)
        err = float(torch.linalg.vector_norm(g - ref) / torch.linalg.vector_norm(ref))
        rows[name] = (sol.stats.n_f_evals, sol.stats.n_accepted, sol.stats.n_rejected, err)
        fns[name] = lambda alg=alg: gradient(f, y0, t1, saveat, alg)
    timings = interleaved(fns, rounds=rounds, warmup=1, budget_s=budget, min_rounds=min(3, rounds))
    return rows, timings


def mlp_field(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 4)).double()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.forward_sensitivity", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny settings, one round, nothing written")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    machine = machine_info() + f"\n- {code_state()}"
    start = time.perf_counter()
    rounds = 1 if args.quick else args.rounds
    parts = [
        "One gradient per timing: forward solve, the loss (sum of squares of the saved states), `backward()`; "
        "Tsit5, float64, the same weights for every method; median [min–max] over interleaved rounds. "
        "**The CPU is shared with other agents' jobs (2 cores, 4 agents): absolute times are noisy; compare "
        "within a table.** *f evals*: the forward solve's evaluations (for ForwardSensitivity, of the augmented "
        "field: each carries the tangents); *rel. error*: 2-norm relative error of the parameters' gradient "
        "against DirectAdjoint at rtol = atol = 1e-11."
    ]

    # -- Lotka-Volterra (benchmarks/general.py's lv) --------------------------------------------
    t1, n_save = (2.0, 20) if args.quick else (10.0, 100)
    f = LotkaVolterra().double()
    y0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    saveat = torch.linspace(0.0, t1, n_save, dtype=torch.float64)
    names = list(methods())
    rows, timings = case(f, y0, t1, saveat, rounds, 15.0 if args.quick else 60.0, names)
    base = timings["DirectAdjoint()"].median
    table = [
        [name, str(timings[name]), f"{base / timings[name].median:.2f}", r[0], f"{r[1]} ({r[2]})", f"{r[3]:.1e}"]
        for name, r in rows.items()
    ]
    parts.append(
        f"## lv: Lotka-Volterra, 4 learnable rates, state (2,), t in [0, {t1:g}], {n_save} saved times, "
        "rtol 1e-6, atol 1e-8\n\n"
        + markdown_table(["method", "gradient", "DirectAdjoint ÷ this", "f evals", "steps (rejected)", "rel. error"], table)
        + "\n\ndiffrax is not rerun here (its JAX server takes a JIT compilation per field and the CPU is shared); "
        "benchmarks/results/general.md measured the same `lv` workload with diffrax's BacksolveAdjoint under "
        "`jax.jit` at about 2 ms per gradient (2026-12-06 07:21 UTC, same machine)."
    )

    # -- MLP of growing width: the crossover ---------------------------------------------------
    sweep = ["ForwardSensitivity(tangents='forward')", "ForwardSensitivity(tangents='reverse')", "DirectAdjoint()",
             "InterpolatingAdjoint()", "GaussAdjoint()"]  # fmt: skip
    widths = (2, 16) if args.quick else WIDTHS
    y0m = torch.linspace(-1.0, 1.0, 4, dtype=torch.float64)
    savem = torch.linspace(0.0, 1.0, 20, dtype=torch.float64)
    table = []
    for w in widths:
        fm = mlp_field(w)
        n_p = sum(q.numel() for q in fm.parameters())
        rows, timings = case(fm, y0m, 1.0, savem, rounds, 10.0 if args.quick else 40.0, sweep)
        fastest_fwd = min(timings[s].median for s in sweep[:2])
        fastest_adj = min(timings[s].median for s in sweep[2:])
        table.append(
            [w, n_p, 4 + n_p] + [fmt_seconds(timings[s].median) for s in sweep]
            + [f"{fastest_adj / fastest_fwd:.2f}", f"{max(rows[s][3] for s in sweep):.1e}"]
        )  # fmt: skip
        print(table[-1], flush=True)
    parts.append(
        "## mlp: Linear(4, w)-tanh-Linear(w, 4), state (4,), its 9w + 4 parameters, t in [0, 1], 20 saved times, "
        "rtol 1e-6, atol 1e-8\n\nMedian gradient times. *adjoints ÷ forward*: the fastest of DirectAdjoint, "
        "InterpolatingAdjoint and GaussAdjoint over the faster ForwardSensitivity (above 1: forward sensitivities "
        "pay). *worst rel. error*: the largest among the five methods.\n\n"
        + markdown_table(["w", "params", "states + params"] + sweep + ["adjoints ÷ forward", "worst rel. error"], table)
    )
    parts.append(closing_line(start))
    publish("ForwardSensitivity: forward sensitivities against the adjoints", parts, machine,
            "benchmarks.forward_sensitivity", argv, RESULT, write=not args.quick)  # fmt: skip
    return {}


if __name__ == "__main__":
    main()
