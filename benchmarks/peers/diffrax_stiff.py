"""ROBER and HIRES with diffrax's Kvaerno5, for :mod:`benchmarks.stiff_work_precision`.

Reads a JSON job on stdin: ``{"problems": {name: {"tols": [[rtol, atol], ...], "saveat": [...],
"repeats": n}}}`` and prints one JSON line: per problem the compile seconds (first call, rtol and
atol are traced arguments, so one compilation per problem) and per tolerance the saved states, the
median seconds of ``repeats`` timed calls after a warm-up call, and diffrax's step counts.
float64 (x64 on), CPU, one thread; ``PIDController(rtol, atol)`` with diffrax's default gains (an
I controller); the Newton solver's Jacobian comes from JAX's autodiff (diffrax's own choice).
Imports neither torch nor odeflux.

    echo '{...}' | JAX_PLATFORMS=cpu python -m benchmarks.peers.diffrax_stiff
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)  # one CPU thread, as the torch side

import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import diffrax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

K1, K2, K3 = 0.04, 3e7, 1e4


def rober(t, y, args):
    y1, y2, y3 = y[0], y[1], y[2]
    return jnp.stack([-K1 * y1 + K3 * y2 * y3, K1 * y1 - K3 * y2 * y3 - K2 * y2 * y2, K2 * y2 * y2])


def hires(t, y, args):
    y1, y2, y3, y4, y5, y6, y7, y8 = (y[i] for i in range(8))
    return jnp.stack([
        -1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007,
        1.71 * y1 - 8.75 * y2,
        -10.03 * y3 + 0.43 * y4 + 0.035 * y5,
        8.32 * y2 + 1.71 * y3 - 1.12 * y4,
        -1.745 * y5 + 0.43 * y6 + 0.43 * y7,
        -280.0 * y6 * y8 + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
        280.0 * y6 * y8 - 1.81 * y7,
        -280.0 * y6 * y8 + 1.81 * y7,
    ])  # fmt: skip


PROBLEMS = {
    "rober": (rober, [1.0, 0.0, 0.0], (0.0, 1e5)),
    "hires": (hires, [1.0, 0, 0, 0, 0, 0, 0, 0.0057], (0.0, 321.8122)),
}


def make(name: str, saveat: list[float]):
    f, y0, (t0, t1) = PROBLEMS[name]
    y0 = jnp.asarray(y0, dtype=jnp.float64)
    ts = jnp.asarray(saveat, dtype=jnp.float64)

    @jax.jit
    def solve(rtol, atol):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(f), diffrax.Kvaerno5(), t0, t1, None, y0,
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            saveat=diffrax.SaveAt(ts=ts), max_steps=200_000,
        )  # fmt: skip
        return sol.ys, sol.stats["num_steps"], sol.stats["num_accepted_steps"], sol.stats["num_rejected_steps"], sol.result._value

    return solve


def main() -> None:
    job = json.loads(sys.stdin.read())
    out = {}
    for name, spec in job["problems"].items():
        solve = make(name, spec["saveat"])
        tols = [(jnp.float64(r), jnp.float64(a)) for r, a in spec["tols"]]
        t = time.perf_counter()
        jax.block_until_ready(solve(*tols[0]))
        compile_s = time.perf_counter() - t
        points = []
        for (r, a), (rf, af) in zip(tols, spec["tols"]):
            ys, n, acc, rej, res = jax.block_until_ready(solve(r, a))  # warm-up at this tolerance
            samples = []
            for _ in range(spec["repeats"]):
                t = time.perf_counter()
                jax.block_until_ready(solve(r, a))
                samples.append(time.perf_counter() - t)
            points.append({"rtol": rf, "atol": af, "ys": [[float(v) for v in row] for row in ys],
                           "seconds": statistics.median(samples), "samples": samples, "steps": int(n),
                           "accepted": int(acc), "rejected": int(rej), "ok": int(res) == 0})  # fmt: skip
        out[name] = {"compile_s": compile_s, "points": points}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
