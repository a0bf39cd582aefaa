"""Small systems at compiled speed (issue 20): odeflux eager and ``compile=True`` against diffrax (jit).

Two workloads, one torch thread, JAX pinned to one core in its own process:

- ``spiral``: SciMLSensitivity's neural-ODE adjoint benchmark: ``u0 = [2, 0]`` float32, 30 saved
  times on [0, 1.5], field ``y -> Linear(2,50)-tanh-Linear(50,2)`` of ``y**3`` (torch's default
  initialisation, seed 0; the same weights sent to JAX), rtol 1e-3, atol 1e-6, loss the sum of
  squared differences to the true spiral (torchdiffeq's ode_demo: ``y' = (y**3) A`` with
  ``A = [[-0.1, 2.0], [-2.0, -0.1]]``, solved once in float64 at rtol = atol = 1e-10);
- ``lv``: :class:`benchmarks.general.LotkaVolterra` (4 learnable rates) in float64, ``y0 = [1, 1]``,
  t in [0, 10], 100 saved times, rtol 1e-6, atol 1e-8, loss the sum of squares of the saved states.

For each: a forward solve (``torch.no_grad``; ``jax.jit``) and one gradient with respect to the
field's parameters (forward, loss, backward) under odeflux's ``DirectAdjoint``,
``DirectAdjoint(recompute=True)``, ``InterpolatingAdjoint``, ``GaussAdjoint``, ``BacksolveAdjoint`` and
``ForwardSensitivity``, eager and with ``compile=True``, and diffrax's Tsit5 with
``RecursiveCheckpointAdjoint`` and ``BacksolveAdjoint``. Every configuration's loss and gradient is
checked against odeflux eager ``DirectAdjoint``. The compile cost of ``compile=True`` is the first
call in a fresh process with an empty Inductor cache (``TORCHINDUCTOR_CACHE_DIR`` a new temporary
folder: cold), and again in another fresh process on that cache (warm); from it, after how many
calls the compiled configuration pays back against the eager one.

    python -m benchmarks.small_systems               # writes benchmarks/results/small_systems.md (about 18 min)
    python -m benchmarks.small_systems --only lv     # one workload
    python -m benchmarks.small_systems --no-probes   # compile cost from this process's first calls only
    python -m benchmarks.small_systems --quick       # smoke run: eager odeflux only, 1 round, prints only
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

import odeflux

from .common import Timing, closing_line, fmt_seconds, interleaved, machine_info, markdown_table, publish, set_threads
from .general import LotkaVolterra
from .peers import diffrax_client
from .provenance import code_state

RESULT = Path(__file__).parent / "results" / "small_systems.md"
PACKAGES = ("jax", "diffrax", "equinox")
WORKLOADS = ("spiral", "lv")
REPO = Path(__file__).resolve().parents[1]

SENSEALGS: dict[str, Callable[[], Any]] = {
    "DirectAdjoint": odeflux.DirectAdjoint,
    "DirectAdjoint(recompute=True)": lambda: odeflux.DirectAdjoint(recompute=True),
    "InterpolatingAdjoint": odeflux.InterpolatingAdjoint,
    "GaussAdjoint": odeflux.GaussAdjoint,
    "BacksolveAdjoint": odeflux.BacksolveAdjoint,
    "ForwardSensitivity": odeflux.ForwardSensitivity,
}
FORWARD = "forward"  # the probe / configuration key of a forward solve
DFX = {"diffrax forward (jit)": "forward", "diffrax RecursiveCheckpointAdjoint (jit)": "checkpoint",
       "diffrax BacksolveAdjoint (jit)": "backsolve"}  # fmt: skip
REFERENCE = "odeflux eager DirectAdjoint"
TARGETS = (("spiral", "fastest", 1.0), ("spiral", "default", 2.0), ("lv", "fastest", 1.0))


# -- the workloads ----------------------------------------------------------------------------


class Spiral(nn.Module):
    """``Linear(2,50)-tanh-Linear(50,2)`` of ``y**3`` (time is ignored)."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(2, 50)
        self.l2 = nn.Linear(50, 2)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(y**3)))


class TrueSpiral(nn.Module):
    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("A", torch.tensor([[-0.1, 2.0], [-2.0, -0.1]], dtype=dtype))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (y**3) @ self.A


@dataclass
class Workload:
    name: str
    description: str
    field: nn.Module
    y0: torch.Tensor
    ts: torch.Tensor
    rtol: float
    atol: float
    target: torch.Tensor  # the loss is sum((ys - target)**2)
    rounds: int
    budget_s: float

    def solve(self, sensealg: Any = None, compile: bool = False, y0: torch.Tensor | None = None):
        return odeflux.solve(self.field, self.y0 if y0 is None else y0, (float(self.ts[0]), float(self.ts[-1])), saveat=self.ts,
                             rtol=self.rtol, atol=self.atol, sensealg=sensealg, compile=compile)  # fmt: skip

    def loss(self, sol) -> torch.Tensor:
        return (sol.ys - self.target).pow(2).sum()


def build_workload(name: str, quick: bool = False) -> Workload:
    torch.manual_seed(0)
    if name == "spiral":
        f = Spiral()
        y0 = torch.tensor([2.0, 0.0])
        ts = torch.linspace(0.0, 1.5, 30)
        with torch.no_grad():
            true = odeflux.solve(TrueSpiral(torch.float64), y0.double(), (0.0, 1.5), saveat=ts.double(), rtol=1e-10,
                                 atol=1e-10).ys.float()  # fmt: skip
        return Workload(name, "SciMLSensitivity's spiral: u0 = [2, 0] float32, 30 saved times on [0, 1.5], "
                        "Linear(2,50)-tanh-Linear(50,2) of y**3 (2 x 50 + 50 + 50 x 2 + 2 = 252 parameters), "
                        "rtol 1e-3, atol 1e-6, loss sum((ys - true spiral)**2)", f, y0, ts, 1e-3, 1e-6, true,
                        1 if quick else 30, 60.0)  # fmt: skip
    if name == "lv":
        f = LotkaVolterra().double()
        y0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
        t1, n = (2.0, 20) if quick else (10.0, 100)  # (the smoke run: a fifth of the span and of the steps)
        ts = torch.linspace(0.0, t1, n, dtype=torch.float64)
        return Workload(name, "Lotka-Volterra (benchmarks.general.LotkaVolterra, 4 learnable rates) float64, "
                        f"y0 = [1, 1], t in [0, {t1:g}], {n} saved times, rtol 1e-6, atol 1e-8, loss sum(ys**2)", f,
                        y0, ts, 1e-6, 1e-8, torch.zeros(n, 2, dtype=torch.float64), 1 if quick else 30,
                        90.0)  # fmt: skip
    raise ValueError(f"unknown workload {name!r}")


def grad_vector(f: nn.Module) -> torch.Tensor:
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1).double()
                      for p in f.parameters()])  # fmt: skip


# -- odeflux configurations -------------------------------------------------------------------


def sensealg_key(sensealg: Any) -> str:
    """The configuration key of the method ``sensealg="auto"`` picked."""
    if isinstance(sensealg, odeflux.DirectAdjoint) and sensealg.recompute:
        # (Within its graph budget the solve is recorded as DirectAdjoint() records it: a small
        # system's whole graph is far below the budget.)
        return "DirectAdjoint" if sensealg.graph_budget else "DirectAdjoint(recompute=True)"
    return type(sensealg).__name__


def base_key(key: str) -> str:
    """The sensitivity method (or FORWARD) of a configuration key."""
    return key


def config_name(compiled: bool, key: str) -> str:
    return f"odeflux {'compiled' if compiled else 'eager'} {key}"


@dataclass
class Check:
    """What the first (untimed) call of a configuration gave."""

    loss: float
    grad: torch.Tensor | None
    steps: str


def odeflux_call(w: Workload, key: str, compiled: bool) -> tuple[Callable[[], Any], Callable[[], Check]]:
    """``(call, check)``: ``call()`` runs the configuration once; ``check()`` runs it and reports."""
    if key == FORWARD:

        def call():
            with torch.no_grad():
                sol = w.solve(compile=compiled)
                return sol, w.loss(sol)

        def check() -> Check:
            sol, loss = call()
            s = sol.stats
            return Check(float(loss.detach()), None, f"{s.n_steps} ({s.n_rejected})")

        return call, check

    make = SENSEALGS[base_key(key)]
    y0 = w.y0

    def call():
        w.field.zero_grad(set_to_none=True)
        sol = w.solve(make(), compile=compiled, y0=y0)
        loss = w.loss(sol)
        loss.backward()
        return sol, loss

    def check() -> Check:
        sol, loss = call()
        s, b = sol.stats, sol.backward_stats
        steps = f"{s.n_steps} ({s.n_rejected})"
        if b is not None and b.n_steps:
            steps += f" + bwd {b.n_steps} ({b.n_rejected})"
        return Check(float(loss.detach()), grad_vector(w.field), steps)

    return call, check


# -- compile probes: a fresh process per measurement -----------------------------------------


def probe(workload: str, key: str, repeats: int = 5) -> dict[str, float]:
    """In this (fresh) process: the first call of the compiled configuration, the second, and the
    median of ``repeats`` more; also the eager configuration's median, for the payback."""
    set_threads(1)
    w = build_workload(workload)
    call, _ = odeflux_call(w, key, compiled=True)
    out = {}
    t0 = time.perf_counter()
    call()
    out["first"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    call()
    out["second"] = time.perf_counter() - t0
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    out["steady"] = float(np.median(samples))
    return out


def run_probe(workload: str, key: str, cache_dir: str, timeout: float = 600.0) -> dict[str, float]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, PYTHONPATH=os.pathsep.join(
        [str(REPO / "src"), str(REPO), os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "benchmarks.small_systems", "--probe", f"{workload}:{key}"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip
    wall = time.perf_counter() - t0
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("probe ")]
    if out.returncode != 0 or not lines:
        tail = " | ".join((out.stderr or out.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"probe {workload}:{key} failed (status {out.returncode}): {tail}")
    first, second, steady = (float(x) for x in lines[-1].split()[1:4])
    warns = sorted({ln.strip() for ln in out.stderr.splitlines() if "Warning" in ln})
    return {"first": first, "second": second, "steady": steady, "process": wall, "warnings": warns}


# -- diffrax ----------------------------------------------------------------------------------


class DiffraxSmallServer(diffrax_client.DiffraxFieldServer):
    """A ``diffrax_small serve`` process: ``compile()`` besides ``time(what)`` and ``grad(what, path)``."""

    def __init__(self, workload: str, data: Path, rtol: float, atol: float, threads: int = 1, timeout: float = 600.0):
        super().__init__(workload, data, rtol, atol, threads, timeout=timeout, module="benchmarks.peers.diffrax_small")

    def compile(self) -> dict[str, float]:
        return dict(zip(("forward", "checkpoint", "backsolve"), (float(s) for s in self._command("compile"))))


# -- one workload -----------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    kind: str  # "forward" or "gradient"
    key: str  # FORWARD, a sensealg's name, or diffrax's function
    compiled: bool = False
    timing: Timing | None = None  # seconds per call (diffrax: its process's own clock)
    steps: str = "—"
    loss_diff: float | None = None
    grad_diff: float | None = None
    first_call: float | None = None  # seconds of the first call in the benchmark's process
    cold: dict | None = None  # probe results (fresh process, empty cache)
    warm: dict | None = None  # (fresh process, the cold probe's cache)
    failure: str | None = None
    notes: list[str] = field(default_factory=list)


def rel(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    if isinstance(a, torch.Tensor):
        return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))
    return abs(a - b) / abs(b) if b else abs(a - b)


def failure_line(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:140]}"


def run_workload(w: Workload, args: argparse.Namespace, tmp: Path) -> tuple[list[Row], dict]:
    print(f"== {w.name}: {w.description}", flush=True)
    info: dict[str, Any] = {}
    keys = [FORWARD, *SENSEALGS]
    modes = [False] if args.quick or args.no_compile else [False, True]
    rows: dict[str, Row] = {}
    fns: dict[str, Callable[[], Any]] = {}
    ref: Check | None = None
    ref_loss: float | None = None
    caught: list[str] = []
    for compiled in modes:
        for key in keys:
            name = config_name(compiled, key)
            row = rows[name] = Row(name, "forward" if key == FORWARD else "gradient", key, compiled)
            call, check = odeflux_call(w, key, compiled)
            with warnings.catch_warnings(record=True) as ws:
                warnings.simplefilter("always")
                try:
                    t0 = time.perf_counter()
                    c = check()
                    row.first_call = time.perf_counter() - t0
                except Exception as e:  # noqa: BLE001 - a failing configuration is a result
                    row.failure = failure_line(e)
                    print(f"  {name}: fails: {row.failure}", flush=True)
                    traceback.print_exc()
            for wm in ws:
                msg = f"{wm.category.__name__}: {str(wm.message).splitlines()[0][:500]}"
                row.notes.append(msg)
                caught.append(f"{name}: {msg}")
            if row.failure:
                continue
            row.steps = c.steps
            if name == config_name(False, FORWARD):
                ref_loss = c.loss
            if name == REFERENCE:
                ref = c
            if ref_loss is not None:
                row.loss_diff = rel(c.loss, ref_loss)
            if c.grad is not None and ref is not None:
                row.grad_diff = rel(c.grad, ref.grad)
            print(f"  {name}: first call {fmt_seconds(row.first_call)}, steps {row.steps}, loss {c.loss:.8g}"
                  + (f", grad rel. diff {row.grad_diff:.1e}" if row.grad_diff is not None else ""), flush=True)  # fmt: skip
            fns[name] = call
    info["warnings"] = caught
    # NeuralODE's default is sensealg="auto": which method it picks here, eager and compiled.
    info["auto"] = (sensealg_key(w.solve("auto").sensealg),
                    sensealg_key(w.solve("auto", compile=True).sensealg) if True in modes else None)

    server = None
    if args.dfx_missing is None:
        data = tmp / f"{w.name}.npz"
        arrays = {f"p:{n}": p.detach().numpy() for n, p in w.field.named_parameters()}
        np.savez(data, y0=w.y0.numpy(), ts=w.ts.numpy(), data=w.target.numpy(), **arrays)
        try:
            t0 = time.perf_counter()
            server = DiffraxSmallServer(w.name, data, w.rtol, w.atol, threads=1)
            compile_s = server.compile()
            info["diffrax_start"] = time.perf_counter() - t0
            names = [n for n, _ in w.field.named_parameters()]
            for name, what in DFX.items():
                row = rows[name] = Row(name, "forward" if what == "forward" else "gradient", what)
                row.first_call = compile_s[what]
                path = tmp / f"{w.name}-{what}.npz"
                _, steps, acc, rej = server.grad(what, path)
                row.steps = f"{steps} ({rej})"
                with np.load(path) as z:
                    row.loss_diff = rel(float(z["loss"]), ref_loss) if ref_loss is not None else None
                    if what != "forward" and ref is not None:
                        g = torch.cat([torch.from_numpy(np.asarray(z[f"g:{n}"], np.float64)).reshape(-1)
                                       for n in names])  # fmt: skip
                        row.grad_diff = rel(g, ref.grad)
                print(f"  {name}: first call {fmt_seconds(row.first_call)}, steps {row.steps}", flush=True)
                fns[name] = lambda what=what: server.time(what)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            info["diffrax_note"] = f"failed: {failure_line(e)}"
            for name in DFX:
                rows.pop(name, None)
                fns.pop(name, None)
    try:
        timings = interleaved(fns, rounds=w.rounds, warmup=0 if args.quick else 2, budget_s=w.budget_s, min_rounds=1)
        for name, t in timings.items():
            rows[name].timing = t
        info["rounds"] = len(next(iter(timings.values())).samples) if timings else 0
        if server is not None:
            for name, what in DFX.items():
                if name in rows and what in server.reported:  # the server's own clock, without the pipe
                    rows[name].timing = Timing.from_samples(server.reported[what])
    finally:
        if server is not None:
            server.close()

    if args.probes and not args.quick and not args.no_compile:
        for key in keys:
            row = rows.get(config_name(True, key))
            if row is None or row.failure:
                continue
            cache = tempfile.mkdtemp(prefix="inductor-cold-", dir=tmp)
            try:
                row.cold = run_probe(w.name, key, cache)
                row.warm = run_probe(w.name, key, cache)
                print(f"  {row.name}: first call cold {row.cold['first']:.1f} s, warm {row.warm['first']:.1f} s",
                      flush=True)  # fmt: skip
            except Exception as e:  # noqa: BLE001
                row.notes.append(f"compile probe failed: {failure_line(e)}")
                print(f"  {row.name}: probe fails: {e}", flush=True)
    return list(rows.values()), info


# -- output -----------------------------------------------------------------------------------


def ms(t: Timing | None) -> str:
    if t is None:
        return "—"
    return f"{t.median * 1e3:.3g} [{t.lo * 1e3:.3g}–{t.hi * 1e3:.3g}]"


def fastest_dfx(rows: list[Row], kind: str) -> Row | None:
    c = [r for r in rows if r.name in DFX and r.kind == kind and r.timing]
    return min(c, key=lambda r: r.timing.median) if c else None


def fmt_diff(x: float | None) -> str:
    return "—" if x is None else f"{x:.1e}"


def compile_cost(r: Row) -> tuple[float | None, float | None]:
    """Seconds the first call costs beyond a steady one: (cold, warm) from the probes, else
    (this process's first call, None)."""
    if r.cold is not None:
        return r.cold["first"] - r.cold["steady"], (r.warm["first"] - r.warm["steady"]) if r.warm else None
    if r.first_call is not None and r.timing is not None:
        return r.first_call - r.timing.median, None
    return None, None


def fmt_compile(r: Row) -> str:
    if r.name in DFX:
        return f"{r.first_call:.2f} (first call)" if r.first_call is not None else "—"
    if not r.compiled:
        return "—"
    cold, warm = compile_cost(r)
    if r.cold is None:
        return "—" if cold is None else f"{cold:.1f} (in-process first call)"
    return f"{cold:.1f} cold / {warm:.1f} warm" if warm is not None else f"{cold:.1f} cold"


def workload_table(rows: list[Row], tol: float) -> str:
    fwd_best, grad_best = fastest_dfx(rows, "forward"), fastest_dfx(rows, "gradient")
    by = {r.name: r for r in rows}
    out = []
    for r in rows:
        if r.failure:
            notes = "; ".join(dict.fromkeys(r.notes))
            out.append([r.name, f"fails: {r.failure}", "—", "—", "—", "—", "—", "—", notes])
            continue
        best = fwd_best if r.kind == "forward" else grad_best
        ratio = f"{r.timing.median / best.timing.median:.2f}" if r.timing and best else "—"
        notes = list(dict.fromkeys(r.notes))
        eager = by.get(config_name(False, base_key(r.key))) if r.compiled else None
        if eager is not None and not eager.failure and eager.steps.split(" + ")[0] != r.steps.split(" + ")[0]:
            notes.append(f"forward steps differ from eager's ({eager.steps.split(' + ')[0]})")
        if r.grad_diff is not None and r.grad_diff > tol and r.name not in DFX:
            notes.insert(0, f"**wrong gradient** (differs from {REFERENCE} by more than {tol:g})")
        fwd, grad = (ms(r.timing), "—") if r.kind == "forward" else ("—", ms(r.timing))
        out.append([r.name, fwd, grad, ratio, r.steps, fmt_diff(r.loss_diff), fmt_diff(r.grad_diff), fmt_compile(r),
                    "; ".join(notes)])  # fmt: skip
    headers = ["configuration", "forward ms: median [min–max]", "gradient ms: median [min–max]",
               "÷ diffrax's fastest (same kind)", "steps (rejected)", "loss rel. diff", "grad rel. diff",
               "compile s", "notes"]  # fmt: skip
    return markdown_table(headers, out, align="lllrlrrll")


def payback_table(rows: list[Row], tol: float) -> str:
    by = {r.name: r for r in rows}
    out = []
    for r in rows:
        if not r.compiled or r.failure or r.timing is None:
            continue
        eager = by.get(config_name(False, base_key(r.key)))
        if eager is None or eager.timing is None:
            continue
        wrong = r.grad_diff is not None and r.grad_diff > tol
        saved = eager.timing.median - r.timing.median
        cells = [r.name, ms(r.timing), ms(eager.timing)]
        for s in compile_cost(r):
            if s is None:
                cells.append("—")
            elif wrong:
                cells.append(f"{s:.1f} s: — (wrong gradient)")
            elif saved <= 0:
                cells.append(f"{s:.1f} s: never (not faster)")
            else:
                cells.append(f"{s:.1f} s: {math.ceil(s / saved):,} calls")
        if r.cold is None:
            cells.append("")
        else:
            cells.append(f"fresh process {r.cold['process']:.1f} s cold, {r.warm['process']:.1f} s warm")
        out.append(cells)
    headers = ["compiled configuration", "compiled ms", "eager ms", "compile cost cold: payback",
               "compile cost warm: payback", "probe processes (start-up, first call, 6 more)"]  # fmt: skip
    return markdown_table(headers, out, align="llllll")


def targets(all_rows: dict[str, list[Row]], tols: dict[str, float],
            autos: dict[str, tuple[str, str | None]]) -> tuple[str, list[dict]]:  # fmt: skip
    """Issue 20's targets from the rows; ``autos``: per workload, the keys of the methods
    ``sensealg="auto"`` (``NeuralODE``'s default) picks eagerly and with ``compile=True``."""
    out, data = [], []
    for wname, which, goal in TARGETS:
        rows = all_rows.get(wname)
        if rows is None:
            continue
        dfx = fastest_dfx(rows, "gradient")
        ok = [r for r in rows if r.kind == "gradient" and r.name not in DFX and r.timing and not r.failure
              and r.grad_diff is not None and r.grad_diff <= tols[wname]]  # fmt: skip
        if which == "default":
            # NeuralODE's default: sensealg="auto"'s pick, eager and with compile=True.
            eager, compiled = autos.get(wname, (None, None))
            ok = [r for r in ok if (not r.compiled and r.key == eager) or (r.compiled and r.key == compiled)]
            label = (f"{wname}: NeuralODE's default adjoint (sensealg=\"auto\", which picks {eager or '—'} eagerly, "
                     f"{compiled or '—'} with compile=True here) ÷ diffrax's fastest gradient")
        else:
            label = f"{wname}: odeflux's fastest gradient ÷ diffrax's fastest gradient"
        mine = min(ok, key=lambda r: r.timing.median) if ok else None
        if mine is None or dfx is None:
            value, verdict = "—", "not measured"
        else:
            ratio = mine.timing.median / dfx.timing.median
            value = f"{ratio:.2f} ({mine.name} {ms(mine.timing)} ms ÷ {dfx.name} {ms(dfx.timing)} ms)"
            verdict = "met" if ratio <= goal else "not met"
            data.append({"workload": wname, "which": which, "ratio": ratio, "goal": goal, "met": ratio <= goal})
        out.append([label, f"≤ {goal:g}", value, verdict])
    return markdown_table(["target (issue 20)", "goal", "measured", "verdict"], out, align="lrll"), data


# -- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.small_systems", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", choices=WORKLOADS, help="just this workload (repeatable)")
    p.add_argument("--rounds", type=int, help="timed rounds per workload (default 30, within a 60 s budget)")
    p.add_argument("--no-probes", dest="probes", action="store_false",
                   help="no fresh-process compile probes (compile cost from this process's first calls)")
    p.add_argument("--no-compile", action="store_true", help="leave out the compile=True configurations")
    p.add_argument("--no-diffrax", action="store_true", help="leave diffrax out")
    p.add_argument("--quick", action="store_true", help="smoke run: eager odeflux only, 1 round, prints only")
    p.add_argument("--out", type=Path, default=RESULT, help="results file (markdown)")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--probe", help=argparse.SUPPRESS)  # WORKLOAD:KEY, internal: one compile probe
    args = p.parse_args(argv)
    if args.probe:
        wname, key = args.probe.split(":")
        r = probe(wname, key)
        print(f"probe {r['first']:.6f} {r['second']:.6f} {r['steady']:.6f}", flush=True)
        return r
    set_threads(1)
    # This process compiles too (its first calls are reported): on an Inductor cache of its own.
    own_cache = tempfile.TemporaryDirectory(prefix="small-systems-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = own_cache.name
    machine = machine_info(*PACKAGES) + f"\n- {code_state()}"
    start = time.perf_counter()
    if args.quick or args.no_diffrax:
        args.dfx_missing = "left out (--quick)" if args.quick else "left out (--no-diffrax)"
    else:
        args.dfx_missing = diffrax_client.available()
    names = args.only or list(WORKLOADS)
    all_rows: dict[str, list[Row]] = {}
    tols: dict[str, float] = {}
    autos: dict[str, tuple[str, str | None]] = {}
    parts_w = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            w = build_workload(name, args.quick)
            if args.rounds is not None and not args.quick:
                w.rounds = args.rounds
            tols[name] = 100 * w.rtol
            t0 = time.perf_counter()
            rows, info = run_workload(w, args, Path(tmp))
            all_rows[name] = rows
            if "auto" in info:
                autos[name] = info["auto"]
            extra = ""
            if "diffrax_start" in info:
                extra += (f" diffrax's process started and compiled its three functions in "
                          f"{info['diffrax_start']:.1f} s.")
            if "diffrax_note" in info:
                extra += f" diffrax: {info['diffrax_note']}."
            text = (f"## {name}: {w.description}\n\nTimed rounds: {info.get('rounds', 0)} (after the untimed first call "
                    f"of each configuration, which gave the steps, loss and gradient); workload "
                    f"{time.perf_counter() - t0:.0f} s.{extra}\n\n{workload_table(rows, tols[name])}")  # fmt: skip
            if any(r.compiled for r in rows):
                text += ("\n\nCompile cost and payback (compile cost: the first call less a steady call; payback: "
                         "that cost ÷ the time saved per call against the same configuration eager):\n\n"
                         + payback_table(rows, tols[name]))  # fmt: skip
            if info["warnings"]:
                text += "\n\nWarnings raised in this process:\n\n" + "\n".join(
                    f"- {m}" for m in dict.fromkeys(info["warnings"]))
            parts_w.append(text)
    goal_table, goal_data = targets(all_rows, tols, autos)
    parts = [
        "Each timing is one call: a forward solve under `torch.no_grad()` (diffrax: the jitted loss), or one "
        "gradient with respect to the field's parameters (forward solve, loss, backward; diffrax: the jitted "
        "`value_and_grad`). Tsit5 everywhere; odeflux's default PI controller, diffrax's `PIDController(rtol, atol)` "
        "(its default gains, an I controller), so the two take different steps. One torch thread; JAX in its own "
        "process pinned to one core (XLA's CPU client), idle while torch runs and the other way round; diffrax's "
        "times are its process's own clock, without the pipe. Rounds are interleaved (every configuration once "
        "per round, rotated order): median [min–max] in ms.",
        "Columns: *÷ diffrax's fastest*: this median ÷ diffrax's fastest of the same kind (forward or gradient); "
        "*steps (rejected)*: steps attempted by the forward solve (+ the backward solve's, for continuous "
        "adjoints), from `sol.stats` / `sol.backward_stats` (diffrax: `num_steps`, `num_rejected_steps`); "
        f"*loss rel. diff*, *grad rel. diff*: relative 2-norm difference from {REFERENCE} (the forward rows: "
        "from odeflux eager's loss); diffrax's differ at the tolerance level since its steps differ; a gradient "
        "further than 100 × rtol from the reference is marked wrong and is left out of the targets. *compile s*: "
        "for `compile=True`, the first call less a steady call in a fresh process with an empty Inductor cache "
        "(`TORCHINDUCTOR_CACHE_DIR` a new folder: cold) and in another fresh process on that cache (warm); for "
        "diffrax, the first call of each jitted function (tracing and XLA compilation; JAX's persistent "
        "compilation cache is off).",
        "With `compile=True` a solve outside autograd (the forward rows, ForwardSensitivity's augmented solve, the "
        "continuous adjoints' forward passes without dense output) runs its whole loop as one compiled program; "
        "under autograd (DirectAdjoint) each step is compiled and the loop stays on the host. ForwardSensitivity "
        "takes forward-mode tangents under `compile=True`.",
        "## Targets\n\nRatios of median times per gradient, diffrax's from its own clock; only gradients that "
        f"agree with {REFERENCE} count.\n\n{goal_table}",
        *parts_w,
    ]
    if args.dfx_missing:
        parts.append(f"diffrax: {args.dfx_missing}.")
    parts.append(closing_line(start))
    publish("Small systems at compiled speed (issue 20)", parts, machine, "benchmarks.small_systems", argv, args.out,
            not (args.no_write or args.quick))  # fmt: skip
    own_cache.cleanup()
    return {"rows": all_rows, "goals": goal_data}


if __name__ == "__main__":
    main()
