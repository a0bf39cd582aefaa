"""ROBER's rate-constant gradient with diffrax's Kvaerno5, for :mod:`benchmarks.stiff_gradient`.

A server: reads one JSON job line on stdin, ``{"saveat": [...], "span": [t0, t1], "y0": [...],
"k": [k1, k2, k3], "tols": [[rtol, atol], ...], "max_steps": n}``, compiles one
``jax.jit(jax.value_and_grad(loss))`` (rtol and atol traced, so one compilation serves every
tolerance) and prints ``{"compile_s": ...}``; then per command line ``point I`` it prints the loss,
the gradient with respect to ``log k`` and the step counts at tolerance ``I`` (that call is also
the point's warm-up), and per ``time I N`` the seconds of ``N`` calls, each a JSON line, until
``quit``. The loss is the mean over the saved times and the three species of ``(log y)^2`` (as
:mod:`benchmarks.stiff_gradient`'s torch side); diffrax differentiates with its default adjoint,
``RecursiveCheckpointAdjoint`` (backpropagation through the solver's operations with recursive
checkpointing). float64, CPU, one thread; ``PIDController(rtol, atol)`` with diffrax's default
gains; the Newton solver's Jacobian from JAX's autodiff. Imports neither torch nor odeflux.

    JAX_PLATFORMS=cpu python -m benchmarks.peers.diffrax_stiff_grad
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)  # one CPU thread, as the torch side

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import diffrax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from .jax_serve import commands  # noqa: E402


def rober(t, y, log_k):
    k = jnp.exp(log_k)
    y1, y2, y3 = y[0], y[1], y[2]
    r1, r2, r3 = k[0] * y1, k[1] * y2 * y2, k[2] * y2 * y3
    return jnp.stack([-r1 + r3, r1 - r3 - r2, r2])


def make(job: dict):
    y0 = jnp.asarray(job["y0"], dtype=jnp.float64)
    ts = jnp.asarray(job["saveat"], dtype=jnp.float64)
    t0, t1 = job["span"]

    def loss(log_k, rtol, atol):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(rober), diffrax.Kvaerno5(), t0, t1, None, y0, args=log_k,
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            saveat=diffrax.SaveAt(ts=ts), max_steps=job["max_steps"],
            adjoint=diffrax.RecursiveCheckpointAdjoint(),  # diffrax's default, said explicitly
            throw=False,
        )  # fmt: skip
        stats = (sol.stats["num_steps"], sol.stats["num_rejected_steps"], sol.result._value)
        return jnp.mean(jnp.log(sol.ys) ** 2), stats

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def main() -> None:
    job = json.loads(sys.stdin.readline())
    fn = make(job)
    log_k = jnp.log(jnp.asarray(job["k"], dtype=jnp.float64))
    tols = [(jnp.float64(r), jnp.float64(a)) for r, a in job["tols"]]
    t = time.perf_counter()
    jax.block_until_ready(fn(log_k, *tols[0]))
    print(json.dumps({"compile_s": time.perf_counter() - t}), flush=True)
    for cmd in commands():
        i = int(cmd[1])
        if cmd[0] == "point":
            (loss, (n, rej, res)), g = jax.block_until_ready(fn(log_k, *tols[i]))
            print(json.dumps({"loss": float(loss), "grad": [float(v) for v in g], "steps": int(n), "rejected": int(rej),
                              "ok": int(res) == 0}), flush=True)  # fmt: skip
        elif cmd[0] == "time":
            samples = []
            for _ in range(int(cmd[2])):
                t = time.perf_counter()
                jax.block_until_ready(fn(log_k, *tols[i]))
                samples.append(time.perf_counter() - t)
            print(json.dumps({"samples": samples}), flush=True)


if __name__ == "__main__":
    main()
