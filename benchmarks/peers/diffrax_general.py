"""The general benchmark's vector fields in diffrax/JAX: one jitted gradient per adjoint, served over a pipe.

Three fields, the same as :mod:`benchmarks.general` builds in torch (the weights come from there,
as arrays named like the torch module's parameters):

- ``mlp``: ``Linear(65,256)-tanh-Linear(256,256)-tanh-Linear(256,64)`` on ``cat([y, t])``;
- ``conv``: ``GroupNorm(32,64)-ReLU-Conv3x3(65->64)-GroupNorm(32,64)-ReLU-Conv3x3(65->64)``, each
  convolution's input with a constant channel ``t`` in front (NHWC inside, torch's layouts in and out);
- ``lv``: Lotka-Volterra ``x' = alpha x - beta x y``, ``y' = delta x y - gamma y``.

Tsit5, ``PIDController(rtol, atol)`` (an I controller, diffrax's default gains), the whole state
as one ODE (RMS norm over all of it). The loss is the mean square of the final state, or with
``saveat`` times the sum of squares of the saved states; its gradient with respect to the field's
parameters is one ``jax.jit`` function per adjoint (``RecursiveCheckpointAdjoint``, diffrax's
default, and ``BacksolveAdjoint``). Imports neither torch nor odeflux.

    python -m benchmarks.peers.diffrax_general serve --workload lv --data p.npz --rtol 1e-6 --atol 1e-8 [--threads 1]

The ``.npz`` holds ``y0``, the parameters as ``p:<name>``, ``t1`` and optionally ``saveat``;
float64 arrays switch on JAX's x64 mode. ``serve`` compiles both gradients, prints
``ready <compile seconds>``, then answers one command a line:

- ``time ADJ``: one gradient; ``done <seconds>``;
- ``grad ADJ PATH``: one gradient, saved to ``PATH`` (``.npz``, the parameters' names);
  ``done <seconds> <steps> <accepted steps> <rejected steps>``;
- ``count ADJ``: the same gradient with a counting field (compiled on first use, not for timing);
  ``done <forward f evals> <backward f evals> <backward VJPs>``;
- ``quit``.

``ADJ`` is ``checkpoint`` or ``backsolve``. f evaluations are counted by a ``jax.custom_vjp``
wrapper of the field whose forward and backward rules call ``jax.debug.callback``: every primal
evaluation (also those inside a VJP, or recomputed from a checkpoint) is an f evaluation, every
backward rule a VJP; the forward count comes from a forward-only solve, the backward ones are the
gradient's totals less it.
"""

from __future__ import annotations

import time

import numpy as np

from . import jax_serve

ADJOINTS = ("checkpoint", "backsolve")


def mlp_field(jnp):
    def f(t, y, p):
        tt = jnp.broadcast_to(jnp.asarray(t, y.dtype), (*y.shape[:-1], 1))
        h = jnp.tanh(jnp.concatenate([y, tt], -1) @ p["l1.weight"].T + p["l1.bias"])
        h = jnp.tanh(h @ p["l2.weight"].T + p["l2.bias"])
        return h @ p["l3.weight"].T + p["l3.bias"]

    return f


def conv_field(jnp, lax, groups: int = 32, eps: float = 1e-5):
    """The field on NHWC states (XLA's CPU convolutions are fast in that layout only); the
    parameters stay in torch's layout (``OIHW`` kernels) and are transposed inside."""

    def group_norm(x, w, b):
        n, h, wd, c = x.shape
        xg = x.reshape(n, h, wd, groups, c // groups)
        mean = xg.mean(axis=(1, 2, 4), keepdims=True)
        var = ((xg - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
        xg = (xg - mean) / jnp.sqrt(var + eps)
        return xg.reshape(n, h, wd, c) * w + b

    def concat_conv(t, x, w, b):
        tt = jnp.broadcast_to(jnp.asarray(t, x.dtype), (*x.shape[:3], 1))
        z = jnp.concatenate([tt, x], -1)  # the time channel first, as torch's cat([t, x], 1)
        kernel = jnp.transpose(w, (2, 3, 1, 0))  # OIHW -> HWIO
        out = lax.conv_general_dilated(z, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return out + b

    def f(t, y, p):
        h = jnp.maximum(group_norm(y, p["norm1.weight"], p["norm1.bias"]), 0)
        h = concat_conv(t, h, p["conv1.weight"], p["conv1.bias"])
        h = jnp.maximum(group_norm(h, p["norm2.weight"], p["norm2.bias"]), 0)
        return concat_conv(t, h, p["conv2.weight"], p["conv2.bias"])

    return f


def lv_field(jnp):
    def f(t, y, p):
        x, v = y[..., 0], y[..., 1]
        return jnp.stack([p["alpha"] * x - p["beta"] * x * v, p["delta"] * x * v - p["gamma"] * v], -1)

    return f


class Problem:
    """The jitted gradients of one workload."""

    def __init__(self, workload: str, data: dict, rtol: float, atol: float):
        import diffrax
        import jax
        import jax.numpy as jnp
        from jax import lax

        self.jax, self.jnp, self.dfx = jax, jnp, diffrax
        self.y0 = jnp.asarray(data["y0"])
        if workload == "conv":  # NCHW -> NHWC; the loss (a mean or sum of squares) does not see the layout
            self.y0 = jnp.transpose(self.y0, (0, 2, 3, 1))
        self.params = {k[2:]: jnp.asarray(v) for k, v in data.items() if k.startswith("p:")}
        self.t1 = float(data["t1"])
        self.saveat = jnp.asarray(data["saveat"]) if "saveat" in data else None
        self.rtol, self.atol = rtol, atol
        self.field = {"mlp": lambda: mlp_field(jnp), "conv": lambda: conv_field(jnp, lax),
                      "lv": lambda: lv_field(jnp)}[workload]()  # fmt: skip
        self._grads = {adj: jax.jit(self._grad_fn(self.field, adj)) for adj in ADJOINTS}
        self._counted: dict[str, tuple] = {}
        self.counts = {"f": 0, "vjp": 0}

    def _solve(self, field, params, adjoint: str):
        dfx = self.dfx
        adj = dfx.RecursiveCheckpointAdjoint() if adjoint == "checkpoint" else dfx.BacksolveAdjoint()
        saveat = dfx.SaveAt(t1=True) if self.saveat is None else dfx.SaveAt(ts=self.saveat)
        return dfx.diffeqsolve(dfx.ODETerm(field), dfx.Tsit5(), 0.0, self.t1, None, self.y0, args=params,
                               stepsize_controller=dfx.PIDController(rtol=self.rtol, atol=self.atol),
                               adjoint=adj, saveat=saveat)  # fmt: skip

    def _grad_fn(self, field, adjoint: str):
        jnp = self.jnp

        def loss(params):
            sol = self._solve(field, params, adjoint)
            ys = sol.ys
            value = jnp.mean(ys[-1] ** 2) if self.saveat is None else jnp.sum(ys**2)
            stats = (sol.stats["num_steps"], sol.stats["num_accepted_steps"], sol.stats["num_rejected_steps"])
            return value, stats

        return self.jax.value_and_grad(loss, has_aux=True)

    def compile(self) -> float:
        start = time.perf_counter()
        for adj in ADJOINTS:
            self.jax.block_until_ready(self._grads[adj](self.params))
        return time.perf_counter() - start

    def gradient(self, adjoint: str):
        start = time.perf_counter()
        out = self.jax.block_until_ready(self._grads[adjoint](self.params))
        return time.perf_counter() - start, out

    # -- counting ----------------------------------------------------------------------------

    def _counting_field(self):
        jax, f = self.jax, self.field

        def bump(key):
            def cb():
                self.counts[key] += 1

            return cb

        @jax.custom_vjp
        def g(t, y, p):
            jax.debug.callback(bump("f"))
            return f(t, y, p)

        def g_fwd(t, y, p):
            jax.debug.callback(bump("f"))
            return f(t, y, p), (t, y, p)

        def g_bwd(res, ct):
            jax.debug.callback(bump("vjp"))
            _, vjp = jax.vjp(f, *res)
            return vjp(ct)

        g.defvjp(g_fwd, g_bwd)
        return g

    def count(self, adjoint: str) -> tuple[int, int, int]:
        if adjoint not in self._counted:
            g = self._counting_field()
            fwd = self.jax.jit(lambda p: self._solve(g, p, adjoint).ys)
            self._counted[adjoint] = (fwd, self.jax.jit(self._grad_fn(g, adjoint)))
        fwd, grad = self._counted[adjoint]
        self.counts.update(f=0, vjp=0)
        self.jax.block_until_ready(fwd(self.params))
        self.jax.effects_barrier()
        n_fwd = self.counts["f"]
        self.counts.update(f=0, vjp=0)
        self.jax.block_until_ready(grad(self.params))
        self.jax.effects_barrier()
        return n_fwd, self.counts["f"] - n_fwd, self.counts["vjp"]


def main(argv: list[str] | None = None) -> None:
    args, data = jax_serve.start("python -m benchmarks.peers.diffrax_general", __doc__.split("\n\n")[0], ("mlp", "conv", "lv"),
                                 ".npz with y0, p:<name> parameters, t1 and optionally saveat", argv)  # fmt: skip
    problem = Problem(args.workload, data, args.rtol, args.atol)
    print(f"ready {problem.compile():.6f}", flush=True)
    for cmd in jax_serve.commands():
        if cmd[0] == "time":
            seconds, _ = problem.gradient(cmd[1])
            print(f"done {seconds:.6f}", flush=True)
        elif cmd[0] == "grad":
            seconds, ((_, stats), grads) = problem.gradient(cmd[1])
            np.savez(cmd[2], **{k: np.asarray(v) for k, v in grads.items()})
            print(f"done {seconds:.6f} {' '.join(str(int(s)) for s in stats)}", flush=True)
        elif cmd[0] == "count":
            print("done " + " ".join(str(n) for n in problem.count(cmd[1])), flush=True)
        else:
            print(f"error unknown command {cmd[0]!r}", flush=True)


if __name__ == "__main__":
    main()
