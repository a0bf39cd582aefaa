"""Stiff work-precision: wall time against error on ROBER and HIRES, odeflux's stiff solvers and the peers (issue 15).

odeflux's Rodas5P and Kvaerno5 (and Rosenbrock23 at the loose tolerances) against scipy's Radau
and BDF and diffrax's Kvaerno5 (jit, in its own process), float64, CPU, one thread, no gradients,
at rtol = 1e-4 ... 1e-8 with atol = 1e-4 rtol. Error: the max relative error over every component
at a few saved times (the final time included) against scipy's Radau at rtol = 1e-12, atol = 1e-14.
Comparisons are made at equal error (log-log interpolation), not at equal tolerance.

    python -m benchmarks.stiff_work_precision              # writes results/stiff_work_precision.{md,png}
    python -m benchmarks.stiff_work_precision --quick      # two tolerances, one repeat: prints only
    python -m benchmarks.stiff_work_precision --no-diffrax --no-write
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

import odeflux
from odeflux.solution import Status

from .common import Timing, closing_line, fmt_seconds, machine_info, markdown_table, publish, set_threads, timeit
from .provenance import code_state

RESULTS = Path(__file__).parent / "results"
RESULT = RESULTS / "stiff_work_precision.md"
PACKAGES = ("scipy", "jax", "diffrax", "matplotlib")
REPO = Path(__file__).resolve().parents[1]
F64 = torch.float64

TOLS = (1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
QUICK_TOLS = (1e-4,)
ATOL_FACTOR = 1e-4  # atol = ATOL_FACTOR * rtol
REF_RTOL, REF_ATOL = 1e-12, 1e-14
MAX_STEPS = 5_000  # a solve that needs more is reported as failed (and not timed)
LOOSE = 1e-5  # Rosenbrock23 (order 2) only at rtol >= LOOSE
GRID = 64
MIN_OVERLAP = 0.5  # decades


# -- the problems ------------------------------------------------------------------------------------

ROBER_K = (0.04, 3e7, 1e4)


def rober(t: Any, y: torch.Tensor) -> torch.Tensor:
    k1, k2, k3 = ROBER_K
    y1, y2, y3 = y[0], y[1], y[2]
    return torch.stack([-k1 * y1 + k3 * y2 * y3, k1 * y1 - k3 * y2 * y3 - k2 * y2 * y2, k2 * y2 * y2])


def rober_np(t: float, y: np.ndarray) -> list[float]:
    k1, k2, k3 = ROBER_K
    y1, y2, y3 = y
    return [-k1 * y1 + k3 * y2 * y3, k1 * y1 - k3 * y2 * y3 - k2 * y2 * y2, k2 * y2 * y2]


def hires(t: Any, y: torch.Tensor) -> torch.Tensor:
    y1, y2, y3, y4, y5, y6, y7, y8 = (y[i] for i in range(8))
    return torch.stack([
        -1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007,
        1.71 * y1 - 8.75 * y2,
        -10.03 * y3 + 0.43 * y4 + 0.035 * y5,
        8.32 * y2 + 1.71 * y3 - 1.12 * y4,
        -1.745 * y5 + 0.43 * y6 + 0.43 * y7,
        -280.0 * y6 * y8 + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
        280.0 * y6 * y8 - 1.81 * y7,
        -280.0 * y6 * y8 + 1.81 * y7,
    ])  # fmt: skip


def hires_np(t: float, y: np.ndarray) -> list[float]:
    y1, y2, y3, y4, y5, y6, y7, y8 = y
    return [
        -1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007, 1.71 * y1 - 8.75 * y2, -10.03 * y3 + 0.43 * y4 + 0.035 * y5,
        8.32 * y2 + 1.71 * y3 - 1.12 * y4, -1.745 * y5 + 0.43 * y6 + 0.43 * y7,
        -280.0 * y6 * y8 + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7, 280.0 * y6 * y8 - 1.81 * y7,
        -280.0 * y6 * y8 + 1.81 * y7,
    ]  # fmt: skip


@dataclass(frozen=True)
class Problem:
    name: str
    title: str
    f: Callable[[Any, torch.Tensor], torch.Tensor]
    f_np: Callable[[float, np.ndarray], list[float]]
    y0: tuple[float, ...]
    span: tuple[float, float]
    saveat: tuple[float, ...]  # the last is span[1]


PROBLEMS = {
    "rober": Problem("rober", "ROBER (Robertson kinetics, 3 states)", rober, rober_np, (1.0, 0.0, 0.0), (0.0, 1e5),
                     (0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)),
    "hires": Problem("hires", "HIRES (8 states)", hires, hires_np, (1.0, 0, 0, 0, 0, 0, 0, 0.0057), (0.0, 321.8122),
                     (1.0, 10.0, 100.0, 321.8122)),
}  # fmt: skip


# -- measurements ------------------------------------------------------------------------------------


@dataclass
class Point:
    rtol: float
    err: float = math.inf  # max relative error over the saved states; inf where the solve failed
    time: Timing | None = None
    steps: int = -1  # attempted steps
    rejected: int = -1
    nfe: int = -1
    njac: int = -1
    nlu: int = -1
    failed: str = ""


def reference(prob: Problem) -> np.ndarray:
    """The states at ``prob.saveat`` from scipy's Radau at rtol = REF_RTOL, atol = REF_ATOL."""
    from scipy.integrate import solve_ivp

    r = solve_ivp(prob.f_np, prob.span, list(prob.y0), method="Radau", rtol=REF_RTOL, atol=REF_ATOL,
                  t_eval=list(prob.saveat))  # fmt: skip
    if not r.success:
        raise RuntimeError(f"the Radau reference failed on {prob.name}: {r.message}")
    return r.y.T


def rel_err(ys: np.ndarray, ref: np.ndarray) -> float:
    """max over saved times and components of |y - ref| / |ref| (every reference component is nonzero)."""
    return float(np.max(np.abs(np.asarray(ys) - ref) / np.abs(ref)))


ODEFLUX = {"odeflux Rodas5P": odeflux.Rodas5P, "odeflux Rodas5P compile": odeflux.Rodas5P,
           "odeflux Kvaerno5": odeflux.Kvaerno5, "odeflux Rosenbrock23": odeflux.Rosenbrock23}  # fmt: skip
COMPILED = {"odeflux Rodas5P compile"}  # solved with compile=True (the whole adaptive loop one compiled program)
SCIPY = {"scipy Radau": "Radau", "scipy BDF": "BDF"}
DIFFRAX = "diffrax Kvaerno5"
KEYS = (*ODEFLUX, *SCIPY, DIFFRAX)


def applies(key: str, rtol: float) -> bool:
    return key != "odeflux Rosenbrock23" or rtol >= LOOSE


def run_odeflux(prob: Problem, key: str, rtol: float, ref: np.ndarray, repeats: int) -> Point:
    y0 = torch.tensor(prob.y0, dtype=F64)
    solver = ODEFLUX[key]

    @torch.no_grad()
    def solve():
        return odeflux.solve(prob.f, y0, prob.span, solver=solver(), rtol=rtol, atol=ATOL_FACTOR * rtol,
                             saveat=list(prob.saveat), max_steps=MAX_STEPS, throw=False,
                             compile=key in COMPILED)  # fmt: skip

    sol = solve()  # the measured solve, and the timing's warm-up
    s = sol.stats
    pt = Point(rtol, steps=s.n_steps, rejected=s.n_rejected, nfe=s.n_f_evals, njac=s.n_jacobians, nlu=s.n_factorizations)
    if sol.status != Status.SUCCESS:
        pt.failed = f"{sol.status.name} at t = {float(sol.ts[-1]):.3g}" if len(sol.ts) else sol.status.name
        return pt
    pt.err = rel_err(sol.ys.numpy(), ref)
    pt.time = timeit(solve, repeats=repeats, warmup=0)
    return pt


def run_scipy(prob: Problem, key: str, rtol: float, ref: np.ndarray, repeats: int) -> Point:
    from scipy.integrate import solve_ivp

    def solve():
        return solve_ivp(prob.f_np, prob.span, list(prob.y0), method=SCIPY[key], rtol=rtol, atol=ATOL_FACTOR * rtol,
                         t_eval=list(prob.saveat))  # fmt: skip  (no jac: finite differences, as odeflux gets none)

    r = solve()
    # scipy counts no steps; its accepted steps are the grid it would save without t_eval: one more solve.
    pt = Point(rtol, nfe=r.nfev, njac=r.njev, nlu=r.nlu)
    if not r.success:
        pt.failed = r.message[:60]
        return pt
    pt.steps = len(solve_ivp(prob.f_np, prob.span, list(prob.y0), method=SCIPY[key], rtol=rtol,
                             atol=ATOL_FACTOR * rtol).t) - 1  # fmt: skip
    pt.err = rel_err(r.y.T, ref)
    pt.time = timeit(solve, repeats=repeats, warmup=0)
    return pt


def diffrax_missing() -> str | None:
    missing = [m for m in ("jax", "diffrax") if importlib.util.find_spec(m) is None]
    return f"{', '.join(missing)} not installed" if missing else None


def run_diffrax(probs: Sequence[Problem], tols: Sequence[float], refs: dict[str, np.ndarray], repeats: int,
                timeout: float = 300.0) -> tuple[dict[str, list[Point]], dict[str, float], float]:  # fmt: skip
    """All problems and tolerances in one ``benchmarks.peers.diffrax_stiff`` process: the points per
    problem, the compile seconds per problem, and the process's wall seconds."""
    job = {"problems": {p.name: {"tols": [[r, ATOL_FACTOR * r] for r in tols], "saveat": list(p.saveat),
                                 "repeats": repeats} for p in probs}}  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "benchmarks.peers.diffrax_stiff"], input=json.dumps(job), cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"diffrax_stiff exited with {out.returncode}: {' | '.join(out.stderr.strip().splitlines()[-3:])}")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    points, compile_s = {}, {}
    for p in probs:
        d = data[p.name]
        compile_s[p.name] = d["compile_s"]
        pts = []
        for q in d["points"]:
            pt = Point(q["rtol"], steps=q["steps"], rejected=q["rejected"])
            if not q["ok"]:
                pt.failed = "diffrax result not successful"
            else:
                pt.err = rel_err(np.asarray(q["ys"]), refs[p.name])
                pt.time = Timing.from_samples(q["samples"])
            pts.append(pt)
        points[p.name] = pts
    return points, compile_s, wall


# -- comparing curves at equal error -----------------------------------------------------------------


def frontier(points: Sequence[Point]) -> list[tuple[float, float]]:
    """``(log10 err, log10 seconds)`` of the points no other point of the curve beats on both counts."""
    best = math.inf
    front = []
    for p in sorted((p for p in points if p.time is not None and math.isfinite(p.err)), key=lambda p: (p.time.median, p.err)):
        if p.err < best:
            best = p.err
            front.append((math.log10(max(p.err, 1e-300)), math.log10(p.time.median)))
    return sorted(front)


def compare(a: Sequence[Point], b: Sequence[Point]) -> tuple[float, float] | None:
    """Geometric mean over the common error range of ``time_a(e) / time_b(e)`` (log time interpolated
    linearly in log error along each frontier, at GRID errors) and that range in decades; ``None``
    below MIN_OVERLAP decades of overlap."""
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


def best_of(curves: dict[str, list[Point]], keys: Sequence[str]) -> str | None:
    """The curve among ``keys`` that is fastest at equal error against the others (fewest wins of theirs)."""
    keys = [k for k in keys if k in curves and frontier(curves[k])]
    if not keys:
        return None
    if len(keys) == 1:
        return keys[0]
    score = {}
    for k in keys:  # geometric mean of its time ratio against each other curve it overlaps
        rs = [v[0] for o in keys if o != k and (v := compare(curves[k], curves[o])) is not None]
        score[k] = math.exp(sum(math.log(r) for r in rs) / len(rs)) if rs else math.inf
    return min(keys, key=lambda k: score[k])


# -- the run -----------------------------------------------------------------------------------------


@dataclass
class ProblemResult:
    prob: Problem
    curves: dict[str, list[Point]] = field(default_factory=dict)
    ref_check: float = math.nan
    seconds: float = 0.0
    compile_s: dict[str, float] = field(default_factory=dict)  # the untimed first solve of a compiled configuration


def run_problem(prob: Problem, tols: Sequence[float], ref: np.ndarray, repeats: int, compiled: bool = True) -> ProblemResult:
    start = time.perf_counter()
    out = ProblemResult(prob)
    from scipy.integrate import solve_ivp

    loose = solve_ivp(prob.f_np, prob.span, list(prob.y0), method="Radau", rtol=10 * REF_RTOL, atol=10 * REF_ATOL,
                      t_eval=list(prob.saveat))  # fmt: skip
    out.ref_check = rel_err(loose.y.T, ref)  # what one decade of reference tolerance changes
    keys = [k for k in ODEFLUX if compiled or k not in COMPILED]
    for key in keys:  # one untimed loose solve first: torch's first-call costs (and compilation) stay out of the curves
        first = time.perf_counter()
        with torch.no_grad():
            odeflux.solve(prob.f, torch.tensor(prob.y0, dtype=F64), prob.span, solver=ODEFLUX[key](), rtol=1e-3,
                          atol=ATOL_FACTOR * 1e-3, max_steps=MAX_STEPS, throw=False, compile=key in COMPILED)  # fmt: skip
        if key in COMPILED:
            out.compile_s[key] = time.perf_counter() - first
    for key in keys:
        out.curves[key] = [run_odeflux(prob, key, r, ref, repeats) for r in tols if applies(key, r)]
        print(f"  {prob.name} {key}: {time.perf_counter() - start:.0f} s", flush=True)
    for key in SCIPY:
        out.curves[key] = [run_scipy(prob, key, r, ref, repeats) for r in tols]
    out.seconds = time.perf_counter() - start
    return out


def _cell_time(p: Point) -> str:
    return "–" if p.time is None else f"{fmt_seconds(p.time.median)} [{fmt_seconds(p.time.lo)}–{fmt_seconds(p.time.hi)}]"


def _n(v: int) -> str:
    return "–" if v < 0 else str(v)


def problem_section(r: ProblemResult, diffrax_note: str) -> str:
    rows = []
    for key, pts in r.curves.items():
        for p in pts:
            err = f"failed: {p.failed}" if p.failed else f"{p.err:.2e}"
            per = "–" if p.time is None or p.steps <= 0 else fmt_seconds(p.time.median / p.steps)
            rows.append([key, f"{p.rtol:g}", err, _cell_time(p), _n(p.steps), per, _n(p.rejected), _n(p.nfe), _n(p.njac),
                         _n(p.nlu)])  # fmt: skip
    table = markdown_table(["configuration", "rtol", "max rel. error", "time: median [min–max]", "steps", "time / step",
                            "rejected", "f evals", "Jacobians", "LU"], rows, align="llrrrrrrrr")  # fmt: skip
    p = r.prob
    return (
        f"## {p.title}\n\nOn [{p.span[0]:g}, {p.span[1]:g}], saved at t = {', '.join(f'{t:g}' for t in p.saveat)}. "
        f"Radau at rtol {10 * REF_RTOL:g}, atol {10 * REF_ATOL:g} differs from the reference by {r.ref_check:.1e} "
        f"(max relative). torch and scipy configurations: {r.seconds:.0f} s"
        + "".join(f" (the first, untimed solve of {k}, its compilation included: {v:.1f} s)" for k, v in r.compile_s.items())
        + f". {diffrax_note}\n\n{table}"
    )


ODEFLUX_KEYS = tuple(ODEFLUX)
PEER_GROUPS = {"scipy (best of Radau, BDF)": tuple(SCIPY), DIFFRAX: (DIFFRAX,)}


def summary_section(results: Sequence[ProblemResult]) -> str:
    rows = []
    lines = []
    for r in results:
        ob = best_of(r.curves, ODEFLUX_KEYS)
        for group, keys in PEER_GROUPS.items():
            pb = best_of(r.curves, keys)
            if ob is None or pb is None:
                rows.append([r.prob.name, ob or "–", group, pb or "not measured", "–", "–"])
                continue
            v = compare(r.curves[ob], r.curves[pb])
            rows.append([r.prob.name, ob, group, pb, "–" if v is None else f"{v[0]:.2f}",
                         "–" if v is None else f"{v[1]:.1f}"])  # fmt: skip
        for k in (k for k in ODEFLUX_KEYS if k in r.curves):
            v = {pk: compare(r.curves[k], r.curves[pk]) for pk in (*SCIPY, DIFFRAX) if pk in r.curves}
            cells = ", ".join(f"{pk} {x[0]:.2f} ({x[1]:.1f} dec.)" for pk, x in v.items() if x is not None)
            lines.append(f"- {r.prob.name}, {k}: {cells or 'no overlap with any peer'}")
    fails = [f"{r.prob.name} {k} at rtol {p.rtol:g} ({p.failed})" for r in results for k, pts in r.curves.items()
             for p in pts if p.failed]  # fmt: skip
    per_step = []
    for r in results:
        cells = []
        for k, pts in r.curves.items():
            v = [p.time.median / p.steps for p in pts if p.time is not None and p.steps > 0]
            if v:
                cells.append(f"{k} {fmt_seconds(float(np.median(v)))}")
        per_step.append(f"- {r.prob.name}: " + ", ".join(cells))
    return (
        "## Summary: time at equal error\n\nodeflux's best curve (fastest at equal error among its solvers) against "
        "the best peer curve of each group: the geometric mean over their common error range of the ratio "
        "time_odeflux(e) / time_peer(e), each curve's log time interpolated linearly in log error along its "
        "frontier; above 1 odeflux is slower. (–: the curves overlap by less than "
        f"{MIN_OVERLAP} decade of error.)\n\n"
        + markdown_table(["problem", "odeflux's best", "against", "peer's best", "time ratio at equal error",
                          "over (decades of error)"], rows, align="lllllr")  # fmt: skip
        + "\n\nEvery odeflux solver against every peer (time ratio, common range):\n\n" + "\n".join(lines)
        + "\n\nMedian time per attempted step over the tolerances (scipy: per accepted step):\n\n" + "\n".join(per_step)
        + "\n\nFailed solves: " + ("; ".join(fails) if fails else "none") + "."
    )


STYLE = {
    "odeflux Rodas5P": ("C0", "o", "-"), "odeflux Rodas5P compile": ("C4", "o", "-."), "odeflux Kvaerno5": ("C1", "s", "-"), "odeflux Rosenbrock23": ("C2", "^", "-"),
    "scipy Radau": ("0.35", "x", "--"), "scipy BDF": ("0.55", "+", "--"), DIFFRAX: ("C3", "D", ":"),
}  # fmt: skip


def plot(results: Sequence[ProblemResult], target: Path | io.BytesIO) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.0 * len(results), 4.6), dpi=90, squeeze=False)
    for ax, r in zip(axes[0], results):
        for k, pts in r.curves.items():
            pts = sorted((p for p in pts if p.time is not None), key=lambda p: -p.rtol)
            if not pts:
                continue
            color, marker, ls = STYLE[k]
            ax.plot([p.err for p in pts], [p.time.median for p in pts], ls, color=color, marker=marker, ms=4, lw=1.1, label=k)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("max relative error at the saved times (vs Radau at rtol 1e-12)")
        ax.set_ylabel("wall time per solve, s (median)")
        ax.set_title(f"{r.prob.title}: rtol {max(TOLS):g} … {min(TOLS):g}, atol = {ATOL_FACTOR:g} rtol", fontsize=9)
        ax.grid(True, which="both", lw=0.3, alpha=0.5)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(target, format="png")
    plt.close(fig)


def method_section(repeats: int, diffrax_line: str) -> str:
    return "\n\n".join([
        "Work against accuracy on two standard stiff problems, float64, CPU, one thread everywhere (torch "
        "`set_num_threads(1)`; JAX with XLA's CPU multithreading off), no gradients (`torch.no_grad`). Each "
        f"configuration solves each problem at rtol in {{{', '.join(f'{t:g}' for t in TOLS)}}} with atol = "
        f"{ATOL_FACTOR:g} × rtol (as the ROBER tests in tests/test_rosenbrock.py; OrdinaryDiffEq's ROBER "
        "benchmark uses atol = 1e-3 rtol), saving the states at a few times (each problem's section lists them).",
        "**Error**: the max relative error |y − y_ref| / |y_ref| over every component at every saved time (the "
        f"final time included), against scipy's Radau at rtol = {REF_RTOL:g}, atol = {REF_ATOL:g} (every reference "
        "component is nonzero there). It includes ROBER's small y2 (about 1e-7 at t = 1e5), which a loose atol "
        "leaves inaccurate: that is what atol = 1e-4 rtol asks for.",
        f"**Time**: the median of {repeats} timed solves (`benchmarks.common.timeit`, garbage collector paused), "
        "after the solve that measured the error (its warm-up); brackets give min–max. The machine is shared, so "
        "single timings carry noise of tens of percent. **Steps**: attempted steps (odeflux: `stats.n_steps`, "
        "with `n_rejected`; diffrax: `num_steps`, `num_rejected_steps`); for scipy, which counts no steps, the "
        "accepted steps of the same solve without `t_eval`. f evals, Jacobians and LU factorisations are each "
        "library's own counts (scipy: `nfev`, which includes its finite-difference Jacobians' evaluations; "
        "`njev`, `nlu`).",
        "**Jacobians**: nobody is given one. odeflux builds it by autograd through the torch field; scipy by "
        "finite differences (`jac=None`); diffrax by JAX's autodiff (its default). odeflux's solvers run with "
        f"`max_steps = {MAX_STEPS}` and `throw=False`: a solve that needs more is reported as failed, not timed.",
        "**Configurations**: odeflux Rodas5P (Rosenbrock, order 5(4)), odeflux Rodas5P compile (the same with "
        "`compile=True` under `torch.no_grad`: the whole adaptive loop, each step with a fresh Jacobian, one "
        "compiled program (`torch.while_loop`, Inductor's C++ wrapper); the compilation happens in an untimed "
        "first solve), odeflux Kvaerno5 (ESDIRK, order 5(4), "
        f"Newton), odeflux Rosenbrock23 (order 2(3), only at rtol ≥ {LOOSE:g}), scipy `solve_ivp` Radau "
        "(order 5) and BDF (orders 1–5), all through `odeflux.solve(f, y0, span, solver=..., rtol, atol, "
        "saveat)` / `scipy.integrate.solve_ivp(..., t_eval=saveat)`. " + diffrax_line,
        "**At equal error**: each curve's frontier (the points no other point of the same curve beats in both "
        "time and error) is interpolated, log10(time) linear in log10(error); two curves are compared at "
        f"{GRID} errors over the range both cover, and the figure is 10^mean(log10 t_a − log10 t_b). Nothing is "
        "extrapolated: a curve that reaches smaller errors gets no credit for them here.",
    ])  # fmt: skip


def add_run_options(p: argparse.ArgumentParser, result: Path, quick_help: str) -> None:
    """The options the stiff benchmarks share (this one and :mod:`benchmarks.stiff_gradient`):
    timing rounds, diffrax or the compiled configurations left out, a smoke run, the results file."""
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per point (median; default 3)")
    p.add_argument("--no-diffrax", action="store_true", help="leave diffrax out")
    p.add_argument("--no-compile", action="store_true", help="leave the compile=True configurations out")
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", type=Path, default=result, help="results file (markdown; a PNG, if any, beside it)")
    p.add_argument("--no-write", action="store_true", help="print only")


def run_settings(
    p: argparse.ArgumentParser, args: argparse.Namespace, tols: Sequence[float], quick_tols: Sequence[float]
) -> tuple[bool, int, Sequence[float]]:  # fmt: skip
    """``(write, repeats, tols)`` from :func:`add_run_options`' options (a smoke run writes nothing)."""
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return not (args.no_write or args.quick), 1 if args.quick else args.repeats, quick_tols if args.quick else tols


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stiff_work_precision", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", choices=list(PROBLEMS), help="run just these problems (repeatable)")
    add_run_options(p, RESULT, f"rtol {QUICK_TOLS}, one repeat, diffrax on ROBER only, no compile=True; prints only")
    args = p.parse_args(argv)
    write, repeats, tols = run_settings(p, args, TOLS, QUICK_TOLS)
    set_threads(1)
    machine = machine_info(*PACKAGES) + f"\n- {code_state()}"
    start = time.perf_counter()
    probs = [PROBLEMS[n] for n in (args.only or PROBLEMS)]
    refs = {pr.name: reference(pr) for pr in probs}
    results = []
    for pr in probs:
        r = run_problem(pr, tols, refs[pr.name], repeats, compiled=not (args.no_compile or args.quick))
        print(f"{pr.name}: {r.seconds:.1f} s", flush=True)
        results.append(r)

    notes = {pr.name: "" for pr in probs}
    why = "left out (--no-diffrax)" if args.no_diffrax else diffrax_missing()
    if why is None:
        dprobs = [pr for pr in probs if pr.name == "rober"] if args.quick else probs
        try:
            pts, compile_s, wall = run_diffrax(dprobs, tols[:1] if args.quick else tols, refs, repeats)
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as e:
            why = f"failed: {str(e)[:200]}"
        else:
            for r in results:
                if r.prob.name in pts:
                    r.curves[DIFFRAX] = pts[r.prob.name]
                    notes[r.prob.name] = (f"diffrax: compilation {compile_s[r.prob.name]:.1f} s (first call, excluded "
                                          "from the times; rtol and atol are traced, so one compilation serves all).")
            diffrax_line = (f"diffrax `Kvaerno5` with `PIDController(rtol, atol)` (its default gains), "
                            f"`SaveAt(ts=saveat)`, one `jax.jit` function per problem, run in its own process "
                            f"(`benchmarks.peers.diffrax_stiff`, {wall:.0f} s in all, start-up and compilations "
                            "included); each tolerance is called once untimed before its timed calls.")  # fmt: skip
    if why is not None:
        diffrax_line = f"diffrax Kvaerno5: not measured ({why})."
    print(f"diffrax: {why or 'measured'}", flush=True)

    if write:
        plot(results, args.out.parent / "stiff_work_precision.png")
    else:
        plot(results, io.BytesIO())  # the plotting code runs in a smoke run too
    parts = [method_section(repeats, diffrax_line), summary_section(results),
             *(problem_section(r, notes[r.prob.name]) for r in results)]  # fmt: skip
    if write:
        parts.append("![work-precision](stiff_work_precision.png)")
    parts.append(closing_line(start))
    publish("Stiff work-precision: wall time at equal error (issue 15)", parts, machine,
            "benchmarks.stiff_work_precision", argv, args.out, write=write)  # fmt: skip
    return {}


if __name__ == "__main__":
    main()
