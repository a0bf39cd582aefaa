"""Where a small system's compiled gradient spends its time (issue 20): the two compiled programs
against the host's work around them.

The spiral and Lotka-Volterra workloads of :mod:`benchmarks.small_systems`, one gradient with
``DirectAdjoint()`` and ``compile=True`` (the forward loop and the reverse pass, each one compiled
program), one torch thread. Wall-clock timers wrapped around odeflux's own functions and around
Inductor's compiled code (``CompiledFxGraph.__call__``) split each gradient into: the programs'
generated code; the call of each program less that code (dynamo's and AOTAutograd's wrappers,
the guards, the arguments); building the problem; the rest of the host's work (evaluating ``f`` at
``t0``, reading the outcome, autograd's engine, the loss). The timers add a few microseconds a
call, so the gradient is timed without them too.

    python -m benchmarks.profile_small          # writes benchmarks/results/profile_small.md
    python -m benchmarks.profile_small --quick  # fewer rounds, prints only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

import odeflux
import odeflux.compiled.program
import odeflux.compiled.reverse
import odeflux.integrator

from .common import closing_line, machine_info, markdown_table, publish, set_threads
from .profile_default import Timers
from .provenance import code_state
from .small_systems import WORKLOADS, build_workload

RESULT = Path(__file__).parent / "results" / "profile_small.md"


def gradient_call(name: str) -> Callable[[], Any]:
    w = build_workload(name)

    def call() -> Any:
        w.field.zero_grad(set_to_none=True)
        sol = w.solve(odeflux.DirectAdjoint(), compile=True)
        w.loss(sol).backward()
        return sol

    return call


def median_ms(call: Callable[[], Any], rounds: int, number: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(number):
            call()
        times.append((time.perf_counter() - t) / number)
    times.sort()
    return times[len(times) // 2] * 1e3


SOLVE, BACKWARD = "odeflux.solve(...)", "loss.backward()"
FWD_CALL, REV_CALL = "forward program's call", "reverse program's call"
FWD_CODE, REV_CODE = "forward program: Inductor's code", "reverse program: Inductor's code"
PROBLEM = "building the problem (make_problem)"
START = "f at t0 (eager, its output checked)"
FINISH = "reading the forward's outcome (_finish)"
ARGS, CHOICE = "the forward program's arguments (LoopProgram._run)", "choosing the step kernel and the program"


def instrument(timers: Timers) -> None:
    from torch._inductor.output_code import CompiledFxGraph

    from odeflux.kernels.torch_step import TorchStepKernel

    timers.wrap(odeflux, "solve", SOLVE)
    timers.wrap(torch.Tensor, "backward", BACKWARD)
    timers.wrap(sys.modules["odeflux.solve"], "make_problem", PROBLEM)  # (the module, not the function)
    timers.wrap(TorchStepKernel, "evaluate", START)
    timers.wrap(odeflux.compiled.program, "_run", FWD_CALL)
    timers.wrap(odeflux.compiled.reverse, "reverse_pass", REV_CALL)
    timers.wrap(odeflux.compiled.program.LoopProgram, "_finish", FINISH)
    timers.wrap(odeflux.compiled.program.LoopProgram, "_run", ARGS)
    timers.wrap(odeflux.integrator, "choose_step_kernel", CHOICE)
    timers.wrap(odeflux.integrator, "compiled_loop", CHOICE)
    timers.wrap(CompiledFxGraph, "__call__", lambda t: FWD_CODE if FWD_CALL in t._active else REV_CODE)


def profile(name: str, rounds: int, number: int) -> tuple[str, dict[str, float]]:
    call = gradient_call(name)
    sol = call()  # compiles (or reads Inductor's cache)
    for _ in range(5):
        call()
    plain = median_ms(call, rounds, number)
    timers = Timers()
    instrument(timers)
    try:
        for _ in range(5):
            call()
        timers.total.clear()
        timers.calls.clear()
        n = rounds * number
        t0 = time.perf_counter()
        for _ in range(n):
            call()
        timed = (time.perf_counter() - t0) / n * 1e3
    finally:
        timers.restore()
    labels = (SOLVE, BACKWARD, PROBLEM, START, FWD_CALL, REV_CALL, FINISH, FWD_CODE, REV_CODE, ARGS, CHOICE)
    per = {k: timers.total.get(k, 0.0) / n * 1e3 for k in labels}
    rows = [
        [FWD_CODE, per[FWD_CODE]],
        [REV_CODE, per[REV_CODE]],
        ["forward program's call less its code (dynamo, AOTAutograd, the arguments)", per[FWD_CALL] - per[FWD_CODE]],
        ["reverse program's call less its code (dynamo, AOTAutograd, the arguments)", per[REV_CALL] - per[REV_CODE]],
        [PROBLEM, per[PROBLEM]],
        [START, per[START]],
        [FINISH, per[FINISH]],
        [CHOICE, per[CHOICE]],
        [ARGS + " less the call", per[ARGS] - per[FWD_CALL]],
        ["the rest of odeflux.solve (its checks, the sensitivity method's run, autograd.Function, the Solution)",
         per[SOLVE] - per[PROBLEM] - per[START] - per[ARGS] - per[FINISH] - per[CHOICE]],
        ["the rest of loss.backward() (autograd's engine, the reverse run's arguments)", per[BACKWARD] - per[REV_CALL]],
        ["outside both (zero_grad, the loss, the timers' own cost)", timed - per[SOLVE] - per[BACKWARD]],
    ]  # fmt: skip
    table = markdown_table(
        ["part of one gradient", "ms", "share"],
        [[k, f"{v:.3f}", f"{100 * v / timed:.0f} %"] for k, v in rows]
        + [["total (with the timers)", f"{timed:.3f}", "100 %"]],
        align="lrr",
    )  # fmt: skip
    s = sol.stats
    text = (
        f"## {name}\n\n{build_workload(name).description}; {s.n_steps} steps ({s.n_rejected} rejected).\n\n"
        f"One gradient without the timers: {plain:.3f} ms (median of {rounds} rounds of {number}).\n\n{table}"
    )
    return text, {"plain": plain, "programs": per[FWD_CODE] + per[REV_CODE], "timed": timed}


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_small", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=15, help="rounds per timing")
    p.add_argument("--number", type=int, default=20, help="gradients per round")
    p.add_argument("--quick", action="store_true", help="3 rounds of 5, prints only")
    p.add_argument("--out", type=Path, default=RESULT, help="results file (markdown)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.number = 3, 5
    start = time.perf_counter()
    set_threads(1)
    machine = machine_info() + f"\n- {code_state()}"
    parts = [__doc__.split("\n\n")[1].replace("\n", " ")]
    for name in WORKLOADS:
        text, _ = profile(name, args.rounds, args.number)
        parts.append(text)
    parts.append(closing_line(start))
    return publish(
        "Profile of a small system's compiled gradient", parts, machine, "benchmarks.profile_small", argv, args.out,
        not (args.no_write or args.quick),
    )  # fmt: skip


if __name__ == "__main__":
    main()
