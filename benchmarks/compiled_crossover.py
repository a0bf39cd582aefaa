"""Where ``compile=True`` pays: compiled DirectAdjoint (and the compiled loop) against the eager paths by state size.

``sensealg="auto"`` with ``compile=True`` picks DirectAdjoint as two compiled programs (the loop
forward, the reverse pass) while the state has at most ``COMPILED_DIRECT_LIMIT`` entries
(:mod:`odeflux.sensitivity.auto`). A compiled program saves the dispatch of each small op; on a
large state the ops are matrix products that eager PyTorch already runs at full speed, and the
compiled reverse pass recomputes each step's stages, so compiling stops paying somewhere. This
finds where: one gradient (forward solve, loss, backward) of an ``nn.Sequential`` field of ``y``
as a user writes it, ``Linear(d, 32)-tanh-Linear(32, d)`` on a ``(B, d)`` float32 state (``d = 4``,
``B`` growing) and the MNIST tutorial's ``Linear(20,10)-tanh-Linear(10,10)-tanh-Linear(10,20)-tanh``
on a ``(128, 20)`` state, each passed as itself (so eager odeflux takes its fastest path for a
dense ``Sequential``: the hand-written VJP rule), and once more wrapped in a module of ``(t, y)``
(the generic path: products through the autograd engine), Tsit5, rtol 1e-3, atol 1e-6, 10 saved times on [0, 1], the
loss the mean square of the saved states; eager DirectAdjoint, eager InterpolatingAdjoint
(``NeuralODE``'s default) and DirectAdjoint with ``compile=True``, timed in interleaved rounds at
one torch thread. The compile time of each compiled size is its first call less a steady one.
Then the forward solve alone, outside autograd: eager, ``compile=True`` and the compiled loop.

    python -m benchmarks.compiled_crossover              # writes results/compiled_crossover.md (about 6 min)
    python -m benchmarks.compiled_crossover --no-write
    python -m benchmarks.compiled_crossover --quick      # smoke run: the smallest workload, prints only
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import odeflux
from odeflux.sensitivity.auto import COMPILED_DIRECT_LIMIT

from .common import closing_line, interleaved, machine_info, markdown_table, publish, set_threads
from .peers.torch_tutorial import TimeField  # (net of y as a module of (t, y): no array forms, the generic path)
from .provenance import code_state

RESULT = Path(__file__).parent / "results" / "compiled_crossover.md"
BATCHES = (1, 8, 64, 512)
#: The compiled programs themselves (DirectAdjoint(hand_written=False): a dense Sequential's
#: hand-written reverse pass is not taken), and what compile=True with sensealg="auto" runs.
COMPILED, AUTO = "compiled programs", "compile=True, sensealg=\"auto\""
CONFIGS = ("eager DirectAdjoint", "eager InterpolatingAdjoint", COMPILED, AUTO)
#: The forward solves: a dense Sequential eager, with compile=True, and in a module of (t, y) (no array forms).
LOOP = "the compiled loop (in a module of (t, y))"
FORWARD = ("eager", "compile=True", LOOP)


def workloads() -> list[tuple[str, nn.Module, torch.Tensor]]:
    out = []
    for B in BATCHES:
        torch.manual_seed(0)
        seq = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 4))
        out.append((f"MLP 4-32-4, state ({B}, 4)", seq, torch.randn(B, 4)))
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(20, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 20), nn.Tanh())
    out.append(("tutorial field, state (128, 20)", seq, torch.randn(128, 20)))
    out.append(("tutorial field in a module of (t, y), state (128, 20)", TimeField(seq), torch.randn(128, 20)))
    return out


def gradient(f: nn.Module, y0: torch.Tensor, config: str) -> Callable[[], Any]:
    sensealg = {"eager InterpolatingAdjoint": odeflux.InterpolatingAdjoint(), "eager DirectAdjoint": odeflux.DirectAdjoint(),
                COMPILED: odeflux.DirectAdjoint(hand_written=False), AUTO: "auto"}[config]  # fmt: skip
    saveat = torch.linspace(0.0, 1.0, 10)

    def call():
        f.zero_grad()
        sol = odeflux.solve(f, y0, (0.0, 1.0), saveat=saveat, rtol=1e-3, atol=1e-6, sensealg=sensealg,
                            compile=config in (COMPILED, AUTO))  # fmt: skip
        sol.ys.square().mean().backward()
        return sol

    return call


def forward_rows(quick: bool, rounds: int) -> list[list[str]]:
    """The forward solve outside autograd (``torch.no_grad()``) of each dense ``Sequential``:
    eager (its NumPy kernel), ``compile=True`` (the same kernel: see odeflux.kernels), and the
    compiled loop, which it takes when wrapped in a module of ``(t, y)``."""
    rows = []
    saveat = torch.linspace(0.0, 1.0, 10)
    for name, f, y0 in [w for w in workloads() if isinstance(w[1], nn.Sequential)][: 1 if quick else None]:
        def solve(field: nn.Module, compile: bool) -> Callable[[], Any]:
            def call():
                with torch.no_grad():
                    return odeflux.solve(field, y0, (0.0, 1.0), saveat=saveat, rtol=1e-3, atol=1e-6, compile=compile)
            return call

        fns = {"eager": solve(f, False), "compile=True": solve(f, True)}
        if not quick:
            fns[LOOP] = solve(TimeField(f), True)
        for fn in fns.values():
            fn()
        t = interleaved(fns, rounds=2 if quick else rounds, warmup=2, budget_s=30.0, min_rounds=2)
        loop = t.get(LOOP)
        rows.append([name, *(str(t.get(c, "—")) for c in FORWARD),
                     "—" if loop is None else f"{loop.median / t['eager'].median:.2f}"])  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compiled_crossover", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="the smallest workload, 2 rounds, eager and auto; prints only")
    p.add_argument("--out", type=Path, default=RESULT, help="results file (markdown)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    set_threads(1)
    start = time.perf_counter()
    rows, summary = [], {}
    for name, f, y0 in workloads()[: 1 if args.quick else None]:
        fns, first = {}, {}
        # (--quick leaves the compiled programs out: they take 15-25 s to build with a cold cache.)
        configs = [c for c in CONFIGS if not (args.quick and c == COMPILED)]
        for config in configs:
            fns[config] = gradient(f, y0, config)
            t = time.perf_counter()
            sol = fns[config]()
            first[config] = time.perf_counter() - t
        steps = sol.stats.n_steps
        timings = interleaved(fns, rounds=2 if args.quick else args.rounds, warmup=2, budget_s=60.0, min_rounds=2)
        compiled = timings[COMPILED].median if COMPILED in timings else math.nan
        best_eager = min(timings[c].median for c in CONFIGS[:2])
        summary[name] = (compiled / best_eager, timings[AUTO].median / best_eager)
        compile_s = first.get(COMPILED, math.nan) - compiled
        rows.append([name, y0.numel(), steps, *(str(timings.get(c, "—")) for c in CONFIGS),
                     *(f"{r:.2f}" for r in summary[name]), f"{compile_s:.1f}"])  # fmt: skip
    table = markdown_table(["workload", "state entries", "steps", *(f"{c}: median [min–max]" for c in CONFIGS),
                            "compiled programs ÷ best eager", "auto ÷ best eager", "compile s"], rows,
                           align="lrrllllrrr")  # fmt: skip
    verdict = (
        "`compile=True` with `sensealg=\"auto\"` takes DirectAdjoint up to `COMPILED_DIRECT_LIMIT` = "
        f"{COMPILED_DIRECT_LIMIT} state entries (odeflux.sensitivity.auto): the compiled programs, or, for a field "
        "with a hand-written VJP rule on a small CPU state (a dense `Sequential` passed as itself), that field's "
        "eager reverse pass. Workloads where auto is slower than the best eager method: "
        + (", ".join(n for n, (_, a) in summary.items() if a > 1.05) or "none") + " (5 % allowed for noise)."
    )
    forward = markdown_table(["workload", *(f"{c}: median [min–max]" for c in FORWARD), "compiled loop ÷ eager"],
                             forward_rows(args.quick, args.rounds), align="llllr")  # fmt: skip
    forward_what = (
        "The forward solve alone, outside autograd (`torch.no_grad()`), each dense `Sequential` passed as itself: "
        "eager (its NumPy kernel), `compile=True` (which keeps that kernel), and the compiled loop, which the same "
        "field takes when wrapped in a module of `(t, y)` (no array forms)."
    )
    what = __doc__.split("\n\n")[1].replace("\n", " ")
    publish("Where compile=True pays", [what, table, verdict, forward_what, forward, closing_line(start)],
            machine_info() + f"\n- {code_state()}", "benchmarks.compiled_crossover", argv, args.out,
            write=not (args.no_write or args.quick))  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
