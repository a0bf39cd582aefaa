"""Where a training step of the default run spends its time (InterpolatingAdjoint, autograd VJPs, flat parameters).

Three views of the same steps of ``odeflux train``'s default configuration (the tutorial's 1350
images, batch 128, float32, rtol = atol = 1e-3, 1 torch thread as ``odeflux train`` uses):

1. a breakdown by phase, from wall-clock timers wrapped around odeflux's own functions (forward
   solve, adjoint solve, VJP calls, f evaluations, interpolation, optimiser...);
2. ``cProfile``'s functions with the most self time (Python overhead shows here);
3. ``torch.profiler``'s operators with the most self CPU time, and how many operators a step runs.

    python -m benchmarks.profile_default          # writes benchmarks/results/profile_default.md
    python -m benchmarks.profile_default --quick  # one epoch per view, prints only
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import io
import os
import pstats
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

from torch.nn import functional as F

import odeflux
import odeflux.fields
import odeflux.integrator
import odeflux.nn
import odeflux.sensitivity.base
import odeflux.sensitivity.interpolating
import odeflux.sensitivity.vjp
import odeflux.solution
from odeflux.mnist.data import BatchLoader, tutorial_split
from odeflux.mnist.model import create_model
from odeflux.mnist.optim import make_optimizer
from odeflux.mnist.steps import warmup
from odeflux.mnist.train import train_epoch

from .common import (
    closing_line,
    fmt_seconds,
    machine_info,
    markdown_table,
    publish,
    set_threads,
)
from .provenance import code_state

RESULT = Path(__file__).parent / "results" / "profile_default.md"


class Timers:
    """Inclusive wall time and calls per label; ``phase`` tells forward from backward work apart."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.phase = "outside"
        self._active: set[str] = set()  # labels being timed: a nested call of one is not counted twice
        self._undo: list[Callable[[], None]] = []

    def wrap(
        self, owner: Any, attr: str, label: str | Callable[[Timers], str], phase: str | None = None,
        outside: str | None = None,
    ) -> None:  # fmt: skip
        """Time ``owner.attr`` under ``label`` (or ``label(self)``), in ``phase`` while it runs;
        with ``outside``, only calls made outside that label's timer."""
        orig = getattr(owner, attr)
        name = (lambda: label(self)) if callable(label) else (lambda: label)
        setattr(owner, attr, functools.wraps(orig)(self._timed(orig, name, phase, outside)))
        self._undo.append(lambda: setattr(owner, attr, orig))


    def _timed(
        self, fn: Callable, name_of: Callable[[], str], phase: str | None = None, outside: str | None = None
    ) -> Callable:
        def timed(*b: Any, **kb: Any) -> Any:
            name = name_of()
            if name in self._active or outside in self._active:
                return fn(*b, **kb)
            self._active.add(name)
            before = self.phase
            if phase is not None:
                self.phase = phase
            t0 = time.perf_counter()
            try:
                return fn(*b, **kb)
            finally:
                self.total[name] += time.perf_counter() - t0
                self.calls[name] += 1
                self.phase = before
                self._active.discard(name)

        return timed

    def add(self, label: str, seconds: float) -> None:
        self.total[label] += seconds
        self.calls[label] += 1

    def restore(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


def setup(threads: int):
    set_threads(threads)
    data = tutorial_split(1500)[0]
    loader = BatchLoader(data, 128, shuffle=True, seed=0)
    model = create_model(sensealg="interpolating", vjp="autograd", params="flat")  # TrainConfig's defaults
    opt = make_optimizer(model, 1e-3)
    warmup(model, (loader.x, loader.y))
    train_epoch(model, loader, opt)  # the tutorial's first epoch, untimed
    return model, loader, opt


def phase_breakdown(model, loader, opt, epochs: int) -> tuple[str, float, float]:
    """Timers around odeflux's functions; returns the table, instrumented and plain seconds per step."""
    t_plain = time.perf_counter()
    n_plain = 0
    for _ in range(epochs):
        n_plain += len(loader)
        train_epoch(model, loader, opt)
    t_plain = (time.perf_counter() - t_plain) / n_plain

    T = Timers()
    B = odeflux.sensitivity.base
    T.wrap(odeflux.nn, "solve", "solve() call")
    T.wrap(B.AdjointRun, "forward", "forward ODE solve (AdjointRun.forward)", phase="fwd")
    T.wrap(B.AdjointRun, "backward", "adjoint solve (AdjointRun.backward)", phase="bwd")
    T.wrap(odeflux.sensitivity.rhs._PlannedRHS, "plan_step", "stage batches")
    T.wrap(odeflux.sensitivity.rhs.AdjointRHS, "__call__", "single evaluations")
    T.wrap(odeflux.kernels.dense_layers.StagePlan, "stage", "stage VJPs: lambda", outside="single evaluations")
    T.wrap(odeflux.kernels.dense_layers.StagePlan, "params_into", "stage VJPs: mu", outside="single evaluations")
    for owner, attr in ((odeflux.fields.FrozenVJP, "__call__"), (odeflux.fields.MLP, "_vjp")):
        T.wrap(owner, attr, "VJP products")
    T.wrap(odeflux.solution.DenseOutput, "at", "y(t) from the kept forward steps")
    T.wrap(B.AdjointRun, "_resolve", "forward re-solve")
    T.wrap(odeflux.nn.VectorField, "forward", lambda t: f"f evaluations ({t.phase})")
    # A solve evaluates the field through its array form (odeflux.kernels), the adjoint its rule.
    T.wrap(odeflux.fields.FrozenField, "evaluate", lambda t: f"f evaluations ({t.phase})")
    T.wrap(odeflux.integrator, "initial_step", lambda t: f"initial step size ({t.phase})")
    steps = 0
    start = time.perf_counter()
    try:
        for _ in range(epochs):
            for x, y in loader:
                t0 = time.perf_counter()
                out = model(x)
                t1 = time.perf_counter()
                loss = F.cross_entropy(out, y)
                opt.zero_grad(set_to_none=True)
                t2 = time.perf_counter()
                loss.backward()
                t3 = time.perf_counter()
                opt.step()
                t4 = time.perf_counter()
                T.add("model forward", t1 - t0)
                T.add("loss + zero_grad", t2 - t1)
                T.add("loss.backward()", t3 - t2)
                T.add("optimizer step (make_optimizer's Adam)", t4 - t3)
                steps += 1
    finally:
        T.restore()
    t_instr = (time.perf_counter() - start) / steps
    tot = {k: v / steps for k, v in T.total.items()}
    calls = {k: v / steps for k, v in T.calls.items()}
    g = tot.get
    fwd_f = g("f evaluations (fwd)", 0.0)
    rows_spec = [
        ("model forward", g("model forward"), None, 0),
        ("outer layers: flatten, Dense in/out, FlatParameters views",
         g("model forward") - g("solve() call"), None, 1),
        ("solve(): input checks, Problem, autograd.Function set-up", g("solve() call") - g("forward ODE solve (AdjointRun.forward)"), None, 1),
        ("forward ODE solve (no graph)", g("forward ODE solve (AdjointRun.forward)"), None, 1),
        ("f evaluations", fwd_f, calls.get("f evaluations (fwd)"), 2),
        ("initial step size (incl. its f evaluation)", g("initial step size (fwd)", 0.0), None, 2),
        ("solver arithmetic, error norm, controller, host syncs", g("forward ODE solve (AdjointRun.forward)") - fwd_f, None, 2),
        ("loss + zero_grad", g("loss + zero_grad"), None, 0),
        ("loss.backward()", g("loss.backward()"), None, 0),
        ("adjoint solve (AdjointRun.backward)", g("adjoint solve (AdjointRun.backward)"), None, 1),
        ("forward re-solve on checkpoint intervals (near 0 when the forward's steps were kept)",
         g("forward re-solve", 0.0), calls.get("forward re-solve"), 2),
        ("stage batches: y(t) at an adjoint step's stage times, and the field's pass over them",
         g("stage batches", 0.0), calls.get("stage batches"), 2),
        ("stage VJPs, lambda's part: v^T df/dy, one stage at a time", g("stage VJPs: lambda", 0.0),
         calls.get("stage VJPs: lambda"), 2),
        ("stage VJPs, mu's part: v^T df/dp, a step's stages at once", g("stage VJPs: mu", 0.0),
         calls.get("stage VJPs: mu"), 2),
        ("single evaluations (the interval's first; the initial step's where the try at the whole interval failed): the rule on arrays, y(t) included",
         g("single evaluations", 0.0), calls.get("single evaluations"), 2),
        ("whole VJP rule, y(t) one time at a time (where no plan applies)",
         g("VJP products", 0.0) + g("y(t) from the kept forward steps", 0.0), calls.get("VJP products"), 2),
        ("the rest: RK arithmetic, error norms, controller, VJP plumbing",
         g("adjoint solve (AdjointRun.backward)") - g("stage batches", 0.0) - g("VJP products", 0.0)
         - g("stage VJPs: lambda", 0.0) - g("stage VJPs: mu", 0.0) - g("single evaluations", 0.0)
         - g("y(t) from the kept forward steps", 0.0) - g("forward re-solve", 0.0), None, 2),
        ("autograd of the outer layers and FlatParameters, engine", g("loss.backward()") - g("adjoint solve (AdjointRun.backward)"), None, 1),
        ("optimizer step (make_optimizer's Adam)", g("optimizer step (make_optimizer's Adam)"), None, 0),
    ]  # fmt: skip
    step_total = sum(v for _, v, _, level in rows_spec if level == 0)
    rows = []
    for label, v, n, level in rows_spec:
        indent = "&nbsp;&nbsp;" * 2 * level
        text = f"**{label}**" if level == 0 else label
        rows.append(
            [f"{indent}{text}", fmt_seconds(v), f"{100 * v / step_total:.0f}%", "" if n is None else f"{n:.1f}"]
        )
    rows.append(["**step total**", fmt_seconds(step_total), "100%", ""])
    table = markdown_table(["where", "per step", "share", "calls per step"], rows, align="lrrr")
    return table, t_instr, t_plain


def cprofile_top(model, loader, opt, epochs: int, n: int = 18) -> tuple[str, int]:
    prof = cProfile.Profile()
    steps = 0
    prof.enable()
    for _ in range(epochs):
        train_epoch(model, loader, opt)
        steps += len(loader)
    prof.disable()
    st = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    items = sorted(st.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:n]  # by tottime
    for (path, line, func), (cc, nc, tt, ct, _) in items:
        where = f"{_short(path)}:{line}({func})" if line else func
        rows.append([f"`{where}`", f"{nc / steps:.0f}", fmt_seconds(tt / steps), fmt_seconds(ct / steps)])
    table = markdown_table(
        ["function", "calls per step", "self time per step", "cumulative per step"], rows, align="lrrr"
    )
    return table, steps


def _short(path: str) -> str:
    for marker in ("site-packages/", "src/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return os.path.basename(path)


def torch_ops(model, loader, opt, epochs: int, n: int = 15) -> tuple[str, float]:
    from torch.profiler import ProfilerActivity, profile

    steps = 0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(epochs):
            train_epoch(model, loader, opt)
            steps += len(loader)
    avg = prof.key_averages()
    aten = [e for e in avg if e.key.startswith("aten::")]
    total_self = sum(e.self_cpu_time_total for e in aten)
    n_ops = sum(e.count for e in aten)
    rows = []
    for e in sorted(aten, key=lambda e: e.self_cpu_time_total, reverse=True)[:n]:
        rows.append([f"`{e.key}`", f"{e.count / steps:.0f}", fmt_seconds(e.self_cpu_time_total * 1e-6 / steps),
                     f"{100 * e.self_cpu_time_total / total_self:.0f}%"])  # fmt: skip
    table = markdown_table(
        ["operator", "calls per step", "self CPU per step", "share of aten self time"], rows, align="lrrr"
    )
    return table, n_ops / steps


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_default", description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=6, help="epochs profiled per view")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (odeflux train's default: 1)")
    p.add_argument("--quick", action="store_true", help="one epoch per view, prints only")
    p.add_argument("--out", type=Path, default=RESULT, help="results file (markdown)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs = 1
    if args.epochs < 1 or args.threads < 1:
        p.error("--epochs and --threads must be >= 1")
    set_threads(args.threads)
    machine = machine_info() + f"\n- {code_state()}"
    model, loader, opt = setup(args.threads)
    breakdown, t_instr, t_plain = phase_breakdown(model, loader, opt, args.epochs)
    top_py, steps = cprofile_top(model, loader, opt, args.epochs)
    top_ops, ops_per_step = torch_ops(model, loader, opt, args.epochs)
    node = model.module.node if hasattr(model, "module") else model.node
    stats, bstats = node.last_stats, node.last_backward_stats

    parts = [
        "The default run of `odeflux train` (InterpolatingAdjoint, autograd VJPs, flat parameters, Tsit5, "
        f"rtol = atol = 1e-3, float32, batch 128 over the tutorial's 1350 images), {args.threads} torch "
        f"thread(s), after the tutorial's warm-up and one untimed epoch; each view covers {args.epochs} more "
        f"epochs ({steps} steps) as training goes on. Last forward solve: {stats.n_accepted} accepted steps, "
        f"{stats.n_f_evals} f evaluations; last adjoint solve: {bstats.n_accepted} accepted and {bstats.n_rejected} "
        f"rejected steps, {bstats.n_vjp_evals} VJP evaluations.",
        f"## 1. Phases\n\nWall-clock timers around odeflux's functions (inclusive; derived rows are differences). "
        f"Step time with the timers {fmt_seconds(t_instr)}, without {fmt_seconds(t_plain)} (plain epochs just "
        f"before): the timers add little.\n\n{breakdown}",
        f"## 2. Python functions with the most self time (cProfile)\n\ncProfile slows Python-heavy code more than "
        f"torch's kernels, so Python's share is overstated; the order is what matters.\n\n{top_py}",
        f"## 3. torch operators (torch.profiler)\n\n{ops_per_step:.0f} aten operator calls per training step "
        f"(nested calls included).\n\n{top_ops}",
        closing_line(),
    ]
    doc = publish(
        "Profile of the default training step",
        parts, machine, "benchmarks.profile_default", argv, args.out, not (args.no_write or args.quick),
    )  # fmt: skip
    return doc


if __name__ == "__main__":
    main()
