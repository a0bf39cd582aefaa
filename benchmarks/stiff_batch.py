"""A batch of independent stiff systems: per-sample Rodas5P against the joint batch and scipy.

``B`` Robertson systems (ROBER, float64, y0 = (1, 0, 0), t in [0, 1e5], rtol 1e-6, atol 1e-10), the
sample ``b``'s three rate constants scaled by one factor log-spaced in [0.3, 3]: the batch solved
per sample (``solve(..., solver=Rodas5P(), batch_axis=0)``: each system its own steps and its own
3 x 3 Jacobian), eagerly and with ``compile=True``; as one joint ODE of ``3 B`` states (one step
size, one ``3B x 3B`` Jacobian); and by scipy's Radau and BDF one system at a time (a Python loop
of ``solve_ivp``, each with its exact Jacobian). Error: the largest over samples and saved times of
``|y - ref| / (atol + rtol |ref|)``, against Radau at rtol 1e-12, atol 1e-14; time: a forward solve
(no gradients), one torch thread.

    python -m benchmarks.stiff_batch            # writes benchmarks/results/stiff_batch.md
    python -m benchmarks.stiff_batch --quick    # smoke run (B = 2, no compile=True), prints only
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import odeflux

from .common import closing_line, fmt_seconds, interleaved, machine_info, markdown_table, publish
from .provenance import code_state
from .stiff_work_precision import ROBER_K

RESULT = Path(__file__).parent / "results" / "stiff_batch.md"
T1, RTOL, ATOL = 1e5, 1e-6, 1e-10


class Rober(nn.Module):
    """ROBER with one set of rate constants per sample (``k``: ``(B, 3)``), on ``(B, 3)`` states."""

    def __init__(self, k: torch.Tensor):
        super().__init__()
        self.register_buffer("k", k)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k1, k2, k3 = self.k.unbind(-1)
        a, b, c = y.unbind(-1)
        return torch.stack([-k1 * a + k3 * b * c, k1 * a - k2 * b * b - k3 * b * c, k2 * b * b], -1)


class JointRober(nn.Module):
    """The same batch as one ODE of ``3 B`` states (a flat vector)."""

    def __init__(self, k: torch.Tensor):
        super().__init__()
        self.f = Rober(k)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.f(t, y.reshape(-1, 3)).reshape(-1)


def _scipy(k: np.ndarray, method: str, ts: np.ndarray, rtol: float, atol: float) -> np.ndarray:
    from scipy.integrate import solve_ivp

    k1, k2, k3 = k

    def f(t, y):
        a, b, c = y
        return [-k1 * a + k3 * b * c, k1 * a - k2 * b * b - k3 * b * c, k2 * b * b]

    def jac(t, y):
        a, b, c = y
        return [[-k1, k3 * c, k3 * b], [k1, -2 * k2 * b - k3 * c, -k3 * b], [0.0, 2 * k2 * b, 0.0]]

    sol = solve_ivp(f, (0.0, T1), [1.0, 0.0, 0.0], method=method, rtol=rtol, atol=atol, jac=jac, t_eval=ts)
    assert sol.success, sol.message
    return sol.y.T


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stiff_batch", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="B = 2, one round, no compile=True, nothing written")
    p.add_argument("--batch", type=int, action="append", help="batch sizes (repeatable; default 16 and 64)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    sizes = [2] if args.quick else (args.batch or [16, 64])
    rounds = 1 if args.quick else args.rounds
    ts = np.array([1e-2, 1.0, 1e2, 1e4, T1])
    tt = torch.tensor(ts, dtype=torch.float64)
    rows, time_rows = [], []
    for B in sizes:
        scale = torch.logspace(np.log10(0.3), np.log10(3.0), B, dtype=torch.float64)
        k = torch.tensor(ROBER_K, dtype=torch.float64) * scale[:, None]
        y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64).expand(B, 3).clone()
        ref = np.stack([_scipy(k[b].numpy(), "Radau", ts, 1e-12, 1e-14) for b in range(B)])
        f, joint = Rober(k), JointRober(k)
        tol = dict(rtol=RTOL, atol=ATOL)

        def per_sample(compile: bool):
            with torch.no_grad():
                return odeflux.solve(f, y0, (0.0, T1), solver=odeflux.Rodas5P(), saveat=tt, batch_axis=0, compile=compile, **tol)

        def joint_solve():
            with torch.no_grad():
                return odeflux.solve(joint, y0.reshape(-1), (0.0, T1), solver=odeflux.Rodas5P(), saveat=tt, **tol)

        def scipy_loop(method: str):
            return np.stack([_scipy(k[b].numpy(), method, ts, RTOL, ATOL) for b in range(B)])

        def error(ys: np.ndarray) -> float:
            return float(np.max(np.abs(ys - ref) / (ATOL + RTOL * np.abs(ref))))

        configs = {
            "odeflux Rodas5P, per sample": lambda: per_sample(False),
            "odeflux Rodas5P, per sample, compile=True": lambda: per_sample(True),
            f"odeflux Rodas5P, joint ({3 * B} states)": joint_solve,
            "scipy Radau, one system at a time": lambda: scipy_loop("Radau"),
            "scipy BDF, one system at a time": lambda: scipy_loop("BDF"),
        }
        if args.quick:  # (compiling takes tens of seconds: the smoke run leaves it out)
            configs = {n: fn for n, fn in configs.items() if "compile" not in n}
        first, outs = {}, {}
        for name, fn in configs.items():  # the first call of each: its compilation, where it has one
            t = time.perf_counter()
            outs[name] = fn()
            first[name] = time.perf_counter() - t
        timings = interleaved(configs, rounds=rounds, warmup=0, min_rounds=rounds)
        base = timings["odeflux Rodas5P, per sample"].median
        for name in configs:
            out = outs[name]
            if isinstance(out, np.ndarray):
                err, steps, iters = error(out), "—", "—"
            else:
                # (the joint solve saves (n, 3B): to (B, n, 3) as the per-sample one saves)
                ys = out.ys if out.sample_stats is not None else out.ys.reshape(len(ts), B, 3).transpose(0, 1)
                err = error(ys.numpy())
                if out.sample_stats is not None:
                    s = out.sample_stats["n_steps"]
                    steps, iters = f"{int(s.sum())} ({int(s.min())}–{int(s.max())} a sample)", int(s.max())
                else:
                    steps, iters = f"{out.stats.n_steps} (the batch's)", out.stats.n_steps
            rows.append([B, name, steps, iters, f"{err:.2g}"])
            time_rows.append([B, name, str(timings[name]), f"{timings[name].median / base:.2f}", fmt_seconds(first[name])])
    parts = [
        __doc__.split("\n\n")[1].replace("\n", " ") + " Per sample, each system takes the steps of its own solve "
        "(tests/test_per_sample_stiff.py checks this against single solves); the joint batch takes as many steps as "
        "its hardest system, each with a dense Jacobian of all its states.",
        "## Steps and error\n\n*steps*: attempted steps summed over the systems (per sample) or the joint solve's; "
        "*loop iterations*: how many times the batch advances (per sample: its slowest system's steps); *error*: "
        "the largest error over systems and saved times in units of the tolerance asked (1: one tolerance).\n\n"
        + markdown_table(["B", "configuration", "steps", "loop iterations", "error"], rows),
        "## Time\n\nMedian [min–max] over interleaved rounds after a first call (its time in the last column: "
        "compilation where `compile=True`), and the ratio to the eager per-sample solve.\n\n"
        + markdown_table(["B", "configuration", "time", "÷ per sample", "first call"], time_rows),
        closing_line(start),
    ]
    publish("A batch of independent stiff systems: per-sample Rodas5P (issues 15, 16)", parts,
            machine_info("scipy") + f"\n- {code_state()}", "benchmarks.stiff_batch", argv, RESULT, write=not args.quick)  # fmt: skip
    return {"rows": rows}


if __name__ == "__main__":
    main()
