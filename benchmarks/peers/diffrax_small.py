"""Issue 20's small systems in diffrax/JAX: a jitted forward solve and jitted gradients, served over a pipe.

Two fields, the same as :mod:`benchmarks.small_systems` builds in torch (the weights come from
there, as arrays named like the torch module's parameters):

- ``spiral``: ``Dense(2,50,tanh)(y**3) -> Dense(50,2)`` (SciMLSensitivity's neural-ODE benchmark);
- ``lv``: Lotka-Volterra ``x' = alpha x - beta x y``, ``y' = delta x y - gamma y``.

Tsit5, ``PIDController(rtol, atol)`` (diffrax's default gains: an I controller), ``SaveAt(ts=...)``;
the loss is the sum of squared differences of the saved states to ``data`` (zeros when the file
has none). Three ``jax.jit`` functions: the forward solve (the loss), and the loss's gradient
with respect to the field's parameters under ``RecursiveCheckpointAdjoint`` (diffrax's default)
and ``BacksolveAdjoint``. Imports neither torch nor odeflux.

    python -m benchmarks.peers.diffrax_small serve --workload spiral --data p.npz --rtol 1e-3 --atol 1e-6 [--threads 1]

The ``.npz`` holds ``y0``, ``ts``, optionally ``data``, and the parameters as ``p:<name>``;
float64 arrays switch on JAX's x64 mode. ``serve`` prints ``ready``, then answers one command a line:

- ``compile``: the first call of each function, timed (tracing and XLA compilation; JAX's
  persistent cache is off); ``done <forward s> <checkpoint s> <backsolve s>``;
- ``time WHAT`` (``forward``, ``checkpoint`` or ``backsolve``): one call; ``done <seconds>``;
- ``grad WHAT PATH``: one call, its loss (and gradient) saved to ``PATH`` (``.npz``);
  ``done <seconds> <steps> <accepted steps> <rejected steps>``;
- ``quit``.
"""

from __future__ import annotations

import time

import numpy as np

from . import jax_serve

from .diffrax_general import lv_field

FUNCTIONS = ("forward", "checkpoint", "backsolve")


def spiral_field(jnp):
    def f(t, y, p):
        h = jnp.tanh((y**3) @ p["l1.weight"].T + p["l1.bias"])
        return h @ p["l2.weight"].T + p["l2.bias"]

    return f


class Problem:
    def __init__(self, workload: str, data: dict, rtol: float, atol: float):
        import diffrax
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp, self.dfx = jax, jnp, diffrax
        self.y0 = jnp.asarray(data["y0"])
        self.ts = jnp.asarray(data["ts"])
        self.target = jnp.asarray(data["data"]) if "data" in data else jnp.zeros((len(data["ts"]), *data["y0"].shape),
                                                                                  data["y0"].dtype)  # fmt: skip
        self.params = {k[2:]: jnp.asarray(v) for k, v in data.items() if k.startswith("p:")}
        self.rtol, self.atol = rtol, atol
        self.field = {"spiral": spiral_field, "lv": lv_field}[workload](jnp)
        self.fns = {
            "forward": jax.jit(lambda p: self._loss(p, "checkpoint")),
            "checkpoint": jax.jit(jax.value_and_grad(lambda p: self._loss(p, "checkpoint"), has_aux=True)),
            "backsolve": jax.jit(jax.value_and_grad(lambda p: self._loss(p, "backsolve"), has_aux=True)),
        }

    def _loss(self, params, adjoint: str):
        dfx, jnp = self.dfx, self.jnp
        adj = dfx.RecursiveCheckpointAdjoint() if adjoint == "checkpoint" else dfx.BacksolveAdjoint()
        sol = dfx.diffeqsolve(dfx.ODETerm(self.field), dfx.Tsit5(), self.ts[0], self.ts[-1], None, self.y0,
                              args=params, stepsize_controller=dfx.PIDController(rtol=self.rtol, atol=self.atol),
                              adjoint=adj, saveat=dfx.SaveAt(ts=self.ts))  # fmt: skip
        stats = (sol.stats["num_steps"], sol.stats["num_accepted_steps"], sol.stats["num_rejected_steps"])
        return jnp.sum((sol.ys - self.target) ** 2), stats

    def call(self, what: str):
        start = time.perf_counter()
        out = self.jax.block_until_ready(self.fns[what](self.params))
        return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> None:
    args, data = jax_serve.start("python -m benchmarks.peers.diffrax_small", __doc__.split("\n\n")[0], ("spiral", "lv"),
                                 ".npz with y0, ts, optionally data, and p:<name> parameters", argv)  # fmt: skip
    problem = Problem(args.workload, data, args.rtol, args.atol)
    print("ready 0", flush=True)
    for cmd in jax_serve.commands():
        if cmd[0] == "compile":
            print("done " + " ".join(f"{problem.call(w)[0]:.6f}" for w in FUNCTIONS), flush=True)
        elif cmd[0] == "time":
            print(f"done {problem.call(cmd[1])[0]:.6f}", flush=True)
        elif cmd[0] == "grad":
            seconds, out = problem.call(cmd[1])
            if cmd[1] == "forward":
                (loss, stats), grads = out, {}
            else:
                (loss, stats), grads = out
            arrays = {f"g:{k}": np.asarray(v) for k, v in grads.items()}
            np.savez(cmd[2], loss=np.asarray(loss), **arrays)
            print(f"done {seconds:.6f} {' '.join(str(int(s)) for s in stats)}", flush=True)
        else:
            print(f"error unknown command {cmd[0]!r}", flush=True)


if __name__ == "__main__":
    main()
