"""Stiff gradients: the time of ROBER's rate-constant gradient against its error, odeflux against diffrax (issue 15).

ROBER on [0, 1e5] with its three rate constants learnable (as ``log k``, float64), the loss the
mean over a few saved times and the three species of ``(log y)^2``, and its gradient with respect
to ``log k`` (one forward solve and one backward pass): odeflux's Rodas5P and Kvaerno5 with
DirectAdjoint, GaussAdjoint and InterpolatingAdjoint (and Rodas5P with ``compile=True`` under the
continuous adjoints), against diffrax's Kvaerno5 with its default adjoint
(RecursiveCheckpointAdjoint), jit, in its own process (``benchmarks.peers.diffrax_stiff_grad``),
at rtol = 1e-5 ... 1e-8 with atol = 1e-4 rtol, CPU, one thread. Error: the gradient's relative
2-norm error against scipy's Radau on the forward sensitivity equations at rtol 1e-12 (checked
against central differences of Radau solves). Timings interleaved: every round times every
configuration at every tolerance once, in a rotated order.

    python -m benchmarks.stiff_gradient              # writes results/stiff_gradient.md
    python -m benchmarks.stiff_gradient --quick      # rtol 1e-5, Rodas5P GaussAdjoint and diffrax, one repeat: prints only
    python -m benchmarks.stiff_gradient --no-diffrax --no-compile --no-write
"""

from __future__ import annotations

import argparse
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
from torch import nn

import odeflux

from .common import Timing, closing_line, fmt_seconds, machine_info, markdown_table, publish, set_threads
from .provenance import code_state
from .stiff_work_precision import Point, add_run_options, best_of, compare, diffrax_missing, run_settings

RESULTS = Path(__file__).parent / "results"
RESULT = RESULTS / "stiff_gradient.md"
PACKAGES = ("scipy", "jax", "diffrax")
REPO = Path(__file__).resolve().parents[1]
F64 = torch.float64

K = (0.04, 3e7, 1e4)
Y0 = (1.0, 0.0, 0.0)
SPAN = (0.0, 1e5)
SAVEAT = (0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
TOLS = (1e-5, 1e-6, 1e-7, 1e-8)
QUICK_TOLS = (1e-5,)
ATOL_FACTOR = 1e-4  # atol = ATOL_FACTOR * rtol
REF_RTOL, REF_ATOL = 1e-12, 1e-18
FD_H = 1e-4  # central differences in log k
MAX_STEPS = 5_000  # odeflux, forward and adjoint solves: a solve that needs more is reported as failed
DIFFRAX_MAX_STEPS = 8_192  # RecursiveCheckpointAdjoint needs a finite max_steps (its default is 4096)


# -- the problem -------------------------------------------------------------------------------------


class Rober(nn.Module):
    """ROBER's field with its rates as one float64 ``nn.Parameter`` ``log k``."""

    def __init__(self, k: Sequence[float] = K) -> None:
        super().__init__()
        self.log_k = nn.Parameter(torch.tensor(k, dtype=F64).log())

    def forward(self, t: Any, y: torch.Tensor) -> torch.Tensor:
        k = self.log_k.exp()
        y1, y2, y3 = y[0], y[1], y[2]
        r1, r2, r3 = k[0] * y1, k[1] * y2 * y2, k[2] * y2 * y3
        return torch.stack([-r1 + r3, r1 - r3 - r2, r2])


def loss_of(ys):
    """The loss of the saved states (rows: times): mean of (log y)^2; works on torch and NumPy arrays."""
    return (ys.log() ** 2).mean() if isinstance(ys, torch.Tensor) else float(np.mean(np.log(ys) ** 2))


def _rhs_sens(t: float, z: np.ndarray) -> np.ndarray:
    """ROBER and its forward sensitivities S = dy/dlog k (3 x 3, row-major after y)."""
    k1, k2, k3 = K
    y1, y2, y3 = z[:3]
    S = z[3:].reshape(3, 3)
    f = [-k1 * y1 + k3 * y2 * y3, k1 * y1 - k3 * y2 * y3 - k2 * y2 * y2, k2 * y2 * y2]
    J = np.array([[-k1, k3 * y3, k3 * y2], [k1, -k3 * y3 - 2 * k2 * y2, -k3 * y2], [0.0, 2 * k2 * y2, 0.0]])
    dfdp = np.array([[-k1 * y1, 0.0, k3 * y2 * y3], [k1 * y1, -k2 * y2 * y2, -k3 * y2 * y3], [0.0, k2 * y2 * y2, 0.0]])
    return np.concatenate([f, (J @ S + dfdp).ravel()])


def _jac_sens(t: float, z: np.ndarray) -> np.ndarray:
    """The Jacobian of :func:`_rhs_sens` (the S block's own derivative in y included)."""
    k1, k2, k3 = K
    y1, y2, y3 = z[:3]
    S = z[3:].reshape(3, 3)
    J = np.array([[-k1, k3 * y3, k3 * y2], [k1, -k3 * y3 - 2 * k2 * y2, -k3 * y2], [0.0, 2 * k2 * y2, 0.0]])
    out = np.zeros((12, 12))
    out[:3, :3] = J
    for j in range(3):  # column j of S: d/dt S[:, j] = J S[:, j] + dfdp[:, j]
        idx = [3 + 3 * i + j for i in range(3)]
        out[np.ix_(idx, idx)] = J
    # d(J S + dfdp)/dy: second derivatives of f (f is quadratic) and dfdp's y-dependence
    for j in range(3):
        s2, s3 = S[1, j], S[2, j]
        # d/dy of (J s): J's entries depend on y2, y3
        d = np.zeros((3, 3))
        d[0, 1] += k3 * s3
        d[0, 2] += k3 * s2
        d[1, 1] += -2 * k2 * s2 - k3 * s3
        d[1, 2] += -k3 * s2
        d[2, 1] += 2 * k2 * s2
        if j == 0:
            d[0, 0] += -k1
            d[1, 0] += k1
        elif j == 1:
            d[1, 1] += -2 * k2 * y2
            d[2, 1] += 2 * k2 * y2
        else:
            d[0, 1] += k3 * y3
            d[0, 2] += k3 * y2
            d[1, 1] += -k3 * y3
            d[1, 2] += -k3 * y2
        out[[3 + 3 * i + j for i in range(3)], :3] = d
    return out


def reference(rtol: float = REF_RTOL, atol: float = REF_ATOL) -> tuple[float, np.ndarray]:
    """The loss and its gradient in ``log k`` from scipy's Radau on ROBER with its forward
    sensitivities (12 equations, the analytic Jacobian)."""
    from scipy.integrate import solve_ivp

    z0 = np.concatenate([Y0, np.zeros(9)])
    r = solve_ivp(_rhs_sens, SPAN, z0, method="Radau", rtol=rtol, atol=atol, t_eval=SAVEAT, jac=_jac_sens)
    if not r.success:
        raise RuntimeError(f"the Radau sensitivity reference failed: {r.message}")
    ys, S = r.y[:3].T, r.y[3:].T.reshape(-1, 3, 3)  # (times, 3), (times, 3 species, 3 rates)
    g = np.einsum("ti,tij->j", 2 * np.log(ys) / ys, S) / ys.size
    return loss_of(ys), g


def fd_check() -> np.ndarray:
    """The gradient by central differences (step FD_H in log k) of Radau solves at rtol REF_RTOL."""
    from scipy.integrate import solve_ivp

    def loss_at(log_k):
        k = np.exp(log_k)

        def f(t, y):
            y1, y2, y3 = y
            return [-k[0] * y1 + k[2] * y2 * y3, k[0] * y1 - k[2] * y2 * y3 - k[1] * y2 * y2, k[1] * y2 * y2]

        r = solve_ivp(f, SPAN, list(Y0), method="Radau", rtol=REF_RTOL, atol=REF_ATOL, t_eval=SAVEAT)
        assert r.success, r.message
        return loss_of(r.y.T)

    base = np.log(K)
    return np.array([(loss_at(base + FD_H * e) - loss_at(base - FD_H * e)) / (2 * FD_H) for e in np.eye(3)])


def rel_err(g: Sequence[float], ref: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(g) - ref) / np.linalg.norm(ref))


# -- the configurations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    solver: Callable[[], Any]
    sensealg: Callable[[], Any]
    compile: bool = False


CONFIGS = {
    "Rodas5P DirectAdjoint": Config(odeflux.Rodas5P, odeflux.DirectAdjoint),
    "Rodas5P GaussAdjoint": Config(odeflux.Rodas5P, odeflux.GaussAdjoint),
    "Rodas5P InterpolatingAdjoint": Config(odeflux.Rodas5P, odeflux.InterpolatingAdjoint),
    "Rodas5P GaussAdjoint compile": Config(odeflux.Rodas5P, odeflux.GaussAdjoint, True),
    "Rodas5P InterpolatingAdjoint compile": Config(odeflux.Rodas5P, odeflux.InterpolatingAdjoint, True),
    "Kvaerno5 DirectAdjoint": Config(odeflux.Kvaerno5, odeflux.DirectAdjoint),
    "Kvaerno5 GaussAdjoint": Config(odeflux.Kvaerno5, odeflux.GaussAdjoint),
    "Kvaerno5 InterpolatingAdjoint": Config(odeflux.Kvaerno5, odeflux.InterpolatingAdjoint),
}
QUICK_CONFIGS = ("Rodas5P GaussAdjoint",)
DIFFRAX = "diffrax Kvaerno5 (RecursiveCheckpointAdjoint)"


def odeflux_gradient(cfg: Config, rtol: float) -> tuple[float, np.ndarray, Any]:
    """One gradient: the loss, d loss / d log k, and the solution (for its counts)."""
    model = Rober()
    sol = odeflux.solve(model, torch.tensor(Y0, dtype=F64), SPAN, solver=cfg.solver(), rtol=rtol,
                        atol=ATOL_FACTOR * rtol, saveat=list(SAVEAT), sensealg=cfg.sensealg(), max_steps=MAX_STEPS,
                        compile=cfg.compile)  # fmt: skip
    loss = loss_of(sol.ys)
    loss.backward()
    return float(loss.detach()), model.log_k.grad.numpy().copy(), sol


@dataclass
class GradPoint(Point):
    backward_steps: int = -1
    grad: tuple[float, ...] = ()


class DiffraxServer:
    """``benchmarks.peers.diffrax_stiff_grad`` as a server, so its timings interleave with torch's."""

    def __init__(self, tols: Sequence[float], timeout: float = 600.0) -> None:
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        self.start = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.peers.diffrax_stiff_grad"], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
        job = {"saveat": list(SAVEAT), "span": list(SPAN), "y0": list(Y0), "k": list(K),
               "tols": [[r, ATOL_FACTOR * r] for r in tols], "max_steps": DIFFRAX_MAX_STEPS}  # fmt: skip
        self.compile_s = self.ask(json.dumps(job))["compile_s"]

    def ask(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        out = self.proc.stdout.readline()
        if not out:
            raise RuntimeError(f"diffrax_stiff_grad ended (exit status {self.proc.poll()})")
        return json.loads(out)

    def close(self) -> float:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
        return time.perf_counter() - self.start


# -- the run -----------------------------------------------------------------------------------------


@dataclass
class Run:
    curves: dict[str, list[GradPoint]] = field(default_factory=dict)
    first_s: dict[str, float] = field(default_factory=dict)  # untimed first gradient (compilation included)
    rounds: int = 0


def measure(keys: Sequence[str], tols: Sequence[float], ref: np.ndarray, repeats: int, server: DiffraxServer | None) -> Run:
    run = Run()
    for key in keys:  # an untimed loose gradient first: torch's first-call costs (and compilation) stay out
        t = time.perf_counter()
        try:
            odeflux_gradient(CONFIGS[key], max(tols))
        except odeflux.SolveError:
            pass
        run.first_s[key] = time.perf_counter() - t
    items: list[tuple[str, int]] = []
    for key in keys:  # the measured gradient of each point (its error, counts), and its warm-up
        pts = []
        for i, rtol in enumerate(tols):
            pt = GradPoint(rtol)
            try:
                _, g, sol = odeflux_gradient(CONFIGS[key], rtol)
            except (odeflux.SolveError, RuntimeError) as e:
                pt.failed = str(e).split(":")[0][:40] + (" (MAX_STEPS)" if "MAX_STEPS" in str(e) else "")
            else:
                s = sol.stats
                pt.steps, pt.rejected, pt.nfe, pt.njac, pt.nlu = (s.n_steps, s.n_rejected, s.n_f_evals, s.n_jacobians,
                                                                  s.n_factorizations)  # fmt: skip
                bs = getattr(sol, "backward_stats", None)
                pt.backward_steps = bs.n_steps if bs is not None else -1
                pt.err, pt.grad = rel_err(g, ref), tuple(float(v) for v in g)
                items.append((key, i))
            pts.append(pt)
        run.curves[key] = pts
        print(f"  measured {key}", flush=True)
    if server is not None:
        pts = []
        for i, rtol in enumerate(tols):
            q = server.ask(f"point {i}")
            pt = GradPoint(rtol, steps=q["steps"], rejected=q["rejected"])
            if q["ok"]:
                pt.err, pt.grad = rel_err(q["grad"], ref), tuple(q["grad"])
                items.append((DIFFRAX, i))
            else:
                pt.failed = "diffrax result not successful"
            pts.append(pt)
        run.curves[DIFFRAX] = pts
    samples: dict[tuple[str, int], list[float]] = {it: [] for it in items}
    for r in range(repeats):  # interleaved: each round every point once, one place further along each round
        k = r % len(items) if items else 0
        for key, i in items[k:] + items[:k]:
            if key == DIFFRAX:
                samples[(key, i)] += server.ask(f"time {i} 1")["samples"]
            else:
                t = time.perf_counter()
                odeflux_gradient(CONFIGS[key], tols[i])
                samples[(key, i)].append(time.perf_counter() - t)
        run.rounds = r + 1
        print(f"  round {r + 1}/{repeats}", flush=True)
    for (key, i), s in samples.items():
        run.curves[key][i].time = Timing.from_samples(s)
    return run


# -- the report --------------------------------------------------------------------------------------


def _n(v: int) -> str:
    return "–" if v < 0 else str(v)


def _cell_time(p: Point) -> str:
    return "–" if p.time is None else f"{fmt_seconds(p.time.median)} [{fmt_seconds(p.time.lo)}–{fmt_seconds(p.time.hi)}]"


def points_table(run: Run) -> str:
    rows = []
    for key, pts in run.curves.items():
        for p in pts:
            err = f"failed: {p.failed}" if p.failed else f"{p.err:.2e}"
            rows.append([key, f"{p.rtol:g}", err, _cell_time(p), _n(p.steps), _n(p.rejected), _n(p.backward_steps),
                         _n(p.nfe), _n(p.njac), _n(p.nlu)])  # fmt: skip
    return markdown_table(["configuration", "rtol", "gradient rel. error", "time: median [min–max]", "forward steps",
                           "rejected", "adjoint steps", "forward f evals", "forward Jacobians", "forward LU"], rows,
                          align="llrrrrrrrr")  # fmt: skip


def summary(run: Run) -> str:
    keys = [k for k in run.curves if k != DIFFRAX]
    lines = []
    for k in keys:
        v = compare(run.curves[k], run.curves[DIFFRAX]) if DIFFRAX in run.curves else None
        lines.append(f"- {k}: " + ("no overlap of error ranges with diffrax (or not measured)" if v is None else
                                   f"{v[0]:.1f}x diffrax over {v[1]:.1f} decades of gradient error"))  # fmt: skip
    best = best_of(run.curves, keys)
    head = ""
    if best is not None and DIFFRAX in run.curves:
        v = compare(run.curves[best], run.curves[DIFFRAX])
        head = (f"odeflux's fastest at equal gradient error: **{best}**, "
                + ("with no overlap with diffrax's error range" if v is None else
                   f"**{v[0]:.1f}x diffrax's time** (geometric mean over {v[1]:.1f} decades of gradient error)")
                + ".\n\n")  # fmt: skip
    per_tol = []
    for i, rtol in enumerate(TOLS if all(len(p) == len(TOLS) for p in run.curves.values()) else ()):
        cells = []
        for k in run.curves:
            p = run.curves[k][i]
            if p.time is not None:
                cells.append(f"{k} {fmt_seconds(p.time.median)}")
        per_tol.append(f"- rtol {rtol:g}: " + ", ".join(cells))
    fails = [f"{k} at rtol {p.rtol:g} ({p.failed})" for k, pts in run.curves.items() for p in pts if p.failed]
    return ("## Summary: gradient time at equal gradient error\n\n" + head
            + "Each odeflux configuration against diffrax: the geometric mean over their common range of gradient "
            "error of time_odeflux(e) / time_diffrax(e) (log time interpolated linearly in log error along each "
            "curve's frontier, as in stiff_work_precision.md; nothing extrapolated):\n\n" + "\n".join(lines)
            + ("\n\nAt equal tolerance (median seconds):\n\n" + "\n".join(per_tol) if per_tol else "")
            + "\n\nFailed gradients: " + ("; ".join(fails) if fails else "none") + ".")  # fmt: skip


def method_section(tols: Sequence[float], rounds: int, ref_loss: float, ref: np.ndarray, checks: dict[str, float],
                   diffrax_line: str, first_s: dict[str, float]) -> str:  # fmt: skip
    return "\n\n".join([
        "**Problem**: ROBER (Robertson's kinetics, k = (0.04, 3e7, 1e4), y0 = (1, 0, 0)) on "
        f"[{SPAN[0]:g}, {SPAN[1]:g}], float64, CPU, one thread everywhere (torch `set_num_threads(1)`; JAX with "
        "XLA's CPU multithreading off). The field owns `log k` as its parameter (in both libraries), and the loss "
        f"is the mean over the saved times t = {', '.join(f'{t:g}' for t in SAVEAT)} and the three species of "
        "(log y)^2: every species counts by its relative change, ROBER's small y2 (1e-5 to 1e-7) as much as y1. "
        f"The gradient is d loss / d log k (= k · d loss / dk), 3 numbers; at the true rates it is "
        f"({', '.join(f'{v:.6g}' for v in ref)}), the loss {ref_loss:.6g}. Tolerances: rtol in "
        f"{{{', '.join(f'{t:g}' for t in tols)}}}, atol = {ATOL_FACTOR:g} × rtol, the same for the forward and the "
        "adjoint solves.",
        "**Error**: ‖g − g_ref‖₂ / ‖g_ref‖₂. **Reference**: scipy's Radau on ROBER together with its forward "
        f"sensitivity equations (dS/dt = J S + ∂f/∂log k, 12 equations, analytic Jacobian) at rtol {REF_RTOL:g}, "
        f"atol {REF_ATOL:g}, the gradient then by the chain rule at the saved times. Checked: the same at rtol "
        f"{10 * REF_RTOL:g} differs by {checks['decade']:.1e}; central differences (step {FD_H:g} in log k) of the "
        f"loss from Radau solves at rtol {REF_RTOL:g} differ by {checks['fd']:.1e} (their own truncation and "
        "round-off: the error floor of that check, not of the reference).",
        f"**Time**: one gradient = forward solve + loss + backward pass, from building the model to `.grad`; the "
        f"median of {rounds} interleaved rounds (each round times every configuration at every tolerance once, "
        "the order rotated one place per round, so bursts of load on this shared 2-core machine hit all alike; "
        "single timings carry tens of percent of noise); brackets give min–max. Before the rounds, each configuration's gradient at each tolerance is "
        "computed once untimed (it gives the error and counts and is the warm-up), and each configuration first "
        f"takes one untimed gradient at rtol {max(tols):g} (torch's first-call costs; compile=True's compilation: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in first_s.items()) + ").",
        "**odeflux configurations** (`odeflux.solve(model, y0, span, solver=..., rtol, atol, saveat, "
        f"sensealg=..., max_steps={MAX_STEPS})`, the Jacobian by autograd): Rodas5P and Kvaerno5, each with "
        "DirectAdjoint (backpropagation through the solver's steps, their Jacobians and LU solves), GaussAdjoint "
        "and InterpolatingAdjoint (continuous adjoints whose backward systems the same method solves). "
        "`compile=True` under autograd: the forward solve of a continuous adjoint runs without a graph, so its "
        "Rosenbrock steps with a fresh Jacobian are compiled (one graph per step, the loop on the host; not the "
        "whole compiled loop, which needs `torch.no_grad()` around the solve); the adjoint's backward solve "
        "(JacobianSource Jacobians) and every DirectAdjoint step (a recorded graph) run eagerly, so "
        "`compile=True` is measured with GaussAdjoint and InterpolatingAdjoint only. A forward or adjoint solve "
        f"that needs more than {MAX_STEPS} steps is reported as failed (SolveError), not timed.",
        diffrax_line,
        "**At equal error**: as stiff_work_precision.md: each curve's frontier (points no other point of the "
        "curve beats in both time and error), log10(time) interpolated linearly in log10(error), the two curves "
        "compared over the error range both cover (at least 0.5 decade).",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stiff_gradient", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", choices=list(CONFIGS), help="just these odeflux configurations")
    add_run_options(p, RESULT, f"rtol {QUICK_TOLS}, {', '.join(QUICK_CONFIGS)} and diffrax, one round; prints only")
    args = p.parse_args(argv)
    write, repeats, tols = run_settings(p, args, TOLS, QUICK_TOLS)
    keys = list(QUICK_CONFIGS if args.quick else (args.only or CONFIGS))
    if args.no_compile:
        keys = [k for k in keys if not CONFIGS[k].compile]
    set_threads(1)
    machine = machine_info(*PACKAGES) + f"\n- {code_state()}"
    start = time.perf_counter()
    ref_loss, ref = reference()
    checks = {"decade": rel_err(reference(10 * REF_RTOL, 10 * REF_ATOL)[1], ref),
              "fd": math.nan if args.quick else rel_err(fd_check(), ref)}  # fmt: skip
    print(f"reference: loss {ref_loss:.10g}, gradient {ref.tolist()}, checks {checks}", flush=True)

    why = "left out (--no-diffrax)" if args.no_diffrax else diffrax_missing()
    server = None
    if why is None:
        try:
            server = DiffraxServer(tols)
        except (RuntimeError, ValueError, OSError) as e:
            why = f"failed: {str(e)[:200]}"
    try:
        run = measure(keys, tols, ref, repeats, server)
    finally:
        wall = server.close() if server is not None else 0.0
    if server is not None:
        diffrax_line = (f"**diffrax**: `Kvaerno5` with `PIDController(rtol, atol)` (its default gains), "
                        "`SaveAt(ts=saveat)`, `adjoint=RecursiveCheckpointAdjoint()` (its default), "
                        f"`max_steps={DIFFRAX_MAX_STEPS}`, the Newton Jacobian by JAX's autodiff; one "
                        "`jax.jit(jax.value_and_grad(loss))` with rtol and atol traced, so one compilation "
                        f"({server.compile_s:.1f} s, excluded) serves every tolerance; in its own process "
                        "(`benchmarks.peers.diffrax_stiff_grad`, a server whose timed calls the rounds interleave with "
                        f"torch's; the seconds are its own `perf_counter` around `block_until_ready`; {wall:.0f} s in "
                        "all). Its first call at each tolerance is untimed.")  # fmt: skip
    else:
        diffrax_line = f"**diffrax**: not measured ({why})."
    print(f"diffrax: {why or 'measured'}", flush=True)
    parts = [method_section(tols, run.rounds, ref_loss, ref, checks, diffrax_line, run.first_s), summary(run),
             "## Every point\n\n" + points_table(run), closing_line(start)]  # fmt: skip
    publish("Stiff gradients: ROBER's rate-constant gradient, time at equal gradient error (issue 15)", parts,
            machine, "benchmarks.stiff_gradient", argv, args.out, write=write)  # fmt: skip
    return {}


if __name__ == "__main__":
    main()
