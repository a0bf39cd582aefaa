"""The tutorial's model with diffrax/JAX: Tsit5, PID controller, RecursiveCheckpointAdjoint, jitted steps.

Dense(784->20, tanh), the ODE ``dy/dt = f(y)`` with ``f = Dense(20->10,tanh)-Dense(10->10,tanh)-
Dense(10->20,tanh)`` on [0, 1] (rtol = atol = 1e-3, the batch as one state), Dense(20->10); Adam
(1e-3) by optax on mean logit cross-entropy; the whole training step (gather, forward, gradient,
update) is one ``jax.jit`` function. Imports neither torch nor odeflux, so that it can run in its
own process beside them. Two ways to run:

    python -m benchmarks.peers.diffrax_tutorial train [--epochs 9] [--threads N]   # the tutorial's lines
    python -m benchmarks.peers.diffrax_tutorial serve [--n-samples N] [--init W.npz] # for the benchmarks

``serve`` compiles, prints ``ready <compile seconds>``, then answers commands on stdin, one a
line: ``epoch`` (one pass over the training images), ``batches K`` (K training steps, going on
through the epochs), each replied with ``done <seconds> <ODE steps of the last batch>``; ``quit``.
``--threads 1`` pins the process to one CPU core before JAX starts (XLA sizes its pools from it).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np

from . import jax_serve

from .data import epoch_order, tutorial_split

LAYERS = ((784, 20), (20, 10), (10, 10), (10, 20), (20, 10))  # dense_in, the field's three, dense_out


def glorot_params(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Lux's Glorot-uniform weights ``(out, in)`` and zero biases (numpy's generator: not torch's draws)."""
    rng = np.random.default_rng(seed)
    out = []
    for n_in, n_out in LAYERS:
        b2 = math.sqrt(24.0 / (n_in + n_out))
        out.append((((rng.random((n_out, n_in)) - 0.5) * b2).astype(np.float32), np.zeros(n_out, np.float32)))
    return out


def load_params(path: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Weights saved as ``w0, b0, ..., w4, b4`` (e.g. odeflux's initial model, for identical starts)."""
    with np.load(path) as z:
        return [(z[f"w{i}"].astype(np.float32), z[f"b{i}"].astype(np.float32)) for i in range(len(LAYERS))]


class Trainer:
    """The jitted training step and evaluation, with the data on the device."""

    def __init__(self, params, data, rtol: float, atol: float, adjoint: str, batch: int, seed: int):
        import diffrax
        import jax
        import jax.numpy as jnp
        import optax

        self.jax, self.jnp = jax, jnp
        (xtr, ytr), (xte, yte) = data
        self.xtr, self.ytr = jnp.asarray(xtr.reshape(len(xtr), -1)), jnp.asarray(ytr)
        self.xte, self.yte = jnp.asarray(xte.reshape(len(xte), -1)), jnp.asarray(yte)
        self.n_train, self.batch, self.seed = len(ytr), batch, seed
        self.params = [(jnp.asarray(w), jnp.asarray(b)) for w, b in params]
        adj = diffrax.RecursiveCheckpointAdjoint() if adjoint == "checkpoint" else diffrax.BacksolveAdjoint()
        term = diffrax.ODETerm(lambda t, y, field: _mlp(jnp, field, y))
        ctrl = diffrax.PIDController(rtol=rtol, atol=atol)
        solver = diffrax.Tsit5()

        def logits(p, x):
            (wi, bi), *field, (wo, bo) = p
            h = jnp.tanh(x @ wi.T + bi)
            sol = diffrax.diffeqsolve(term, solver, 0.0, 1.0, None, h, args=field, stepsize_controller=ctrl,
                                      adjoint=adj, saveat=diffrax.SaveAt(t1=True))  # fmt: skip
            return sol.ys[-1] @ wo.T + bo, sol.stats["num_steps"]

        def loss_fn(p, x, y):
            out, steps = logits(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), steps

        self.opt = optax.adam(1e-3, b1=0.9, b2=0.999, eps=1e-8)
        self.opt_state = self.opt.init(self.params)

        def step(p, s, xs, ys, idx):
            (loss, steps), g = jax.value_and_grad(loss_fn, has_aux=True)(p, xs[idx], ys[idx])
            updates, s = self.opt.update(g, s, p)
            return optax.apply_updates(p, updates), s, loss, steps

        self._step = jax.jit(step)
        self._predict = jax.jit(lambda p, x: jnp.argmax(logits(p, x)[0], axis=1))
        self.epoch, self.pos, self.order, self.last_steps = 0, 0, None, 0

    def compile(self, evaluation: bool = True) -> float:
        """Compile every batch shape once (outputs thrown away: the weights don't move); seconds."""
        start = time.perf_counter()
        sizes = {self.batch, self.n_train % self.batch or self.batch}
        for k in sizes:
            idx = self.jnp.arange(k)
            self.jax.block_until_ready(self._step(self.params, self.opt_state, self.xtr, self.ytr, idx))
        for x in (self.xtr, self.xte) if evaluation else ():
            for i in range(0, len(x), self.batch):
                self._predict(self.params, x[i : i + self.batch]).block_until_ready()
        return time.perf_counter() - start

    def train_batches(self, k: int | None = None) -> float:
        """``k`` steps (``None``: the rest of the current epoch); seconds, waited for the device."""
        start = time.perf_counter()
        losses = []
        done = 0
        while k is None or done < k:
            if self.order is None:
                self.order = self.jnp.asarray(epoch_order(self.n_train, self.seed, self.epoch))
            idx = self.order[self.pos : self.pos + self.batch]
            self.params, self.opt_state, loss, steps = self._step(self.params, self.opt_state, self.xtr, self.ytr, idx)
            losses.append(loss)
            done += 1
            self.pos += self.batch
            if self.pos >= self.n_train:
                self.epoch, self.pos, self.order = self.epoch + 1, 0, None
                if k is None:
                    break
        self.jax.block_until_ready((self.params, losses))
        self.last_steps = int(steps)
        return time.perf_counter() - start

    def accuracy(self, x, y) -> float:
        hits = sum(int((self._predict(self.params, x[i : i + self.batch]) == y[i : i + self.batch]).sum())
                   for i in range(0, len(y), self.batch))  # fmt: skip
        return hits / len(y)


def _mlp(jnp, field, y):
    for w, b in field:
        y = jnp.tanh(y @ w.T + b)
    return y


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.peers.diffrax_tutorial", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("mode", choices=("train", "serve"))
    p.add_argument("--epochs", type=int, default=9)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--n-samples", default="1500", help="first N training images (or 'all': 60k/10k)")
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--atol", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adjoint", choices=("checkpoint", "backsolve"), default="checkpoint",
                   help="RecursiveCheckpointAdjoint (diffrax's default) or BacksolveAdjoint")  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="1: pin to one core; 0: JAX's default (all usable cores)")
    p.add_argument("--init", help="start from these weights (.npz with w0, b0, ..., w4, b4)")
    args = p.parse_args(argv)
    if args.threads == 1:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    n = args.n_samples if args.n_samples == "all" else int(args.n_samples)
    params = load_params(args.init) if args.init else glorot_params(args.seed)
    trainer = Trainer(params, tutorial_split(n), args.rtol, args.atol, args.adjoint, args.batch_size, args.seed)
    compile_s = trainer.compile(evaluation=args.mode == "train")
    if args.mode == "train":
        for epoch in range(args.epochs):
            seconds = trainer.train_batches()
            tr, te = trainer.accuracy(trainer.xtr, trainer.ytr), trainer.accuracy(trainer.xte, trainer.yte)
            print(f"[{epoch + 1}/{args.epochs}] \t Time {seconds:.2f}s \t Training Accuracy: {100 * tr:.2f}% "
                  f"\t Test Accuracy: {100 * te:.2f}%", flush=True)  # fmt: skip
        return
    print(f"ready {compile_s:.6f}", flush=True)
    for cmd in jax_serve.commands():
        seconds = trainer.train_batches(int(cmd[1]) if cmd[0] == "batches" else None)
        print(f"done {seconds:.6f} {trainer.last_steps}", flush=True)


if __name__ == "__main__":
    main()
