"""Per-sample solves (``solve(..., batch_axis=0)``) against the joint batch and single solves.

A batch of Van der Pol oscillators, ``mu`` log-spaced from 0.1 to 10 (one per sample), from
(2, 0) over [0, 10], rtol 1e-6, atol 1e-8, float64, Tsit5: the steps each sample takes alone,
as a sample of the per-sample batch, and what the joint batch (one ODE, one step size) takes;
and the time of a forward solve (no grad) and of a gradient (DirectAdjoint, the sum of squares
of the final states, with respect to the ``mu``), per-sample against joint, eager and (forward)
``compile=True``.

    python -m benchmarks.per_sample            # writes benchmarks/results/per_sample.md
    python -m benchmarks.per_sample --quick    # smoke run (no compile=True), prints only
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

import odeflux

from .common import closing_line, interleaved, machine_info, markdown_table, publish
from .provenance import code_state

RESULT = Path(__file__).parent / "results" / "per_sample.md"


class VdP(nn.Module):
    def __init__(self, mu: torch.Tensor):
        super().__init__()
        self.mu = nn.Parameter(mu)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, self.mu * (1 - x * x) * v - x], -1)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.per_sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small batch, one round, nothing written")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    B = 4 if args.quick else args.batch
    rounds = 1 if args.quick else args.rounds
    start = time.perf_counter()
    mu = torch.logspace(-1, 1, B, dtype=torch.float64)
    y0 = torch.tensor([[2.0, 0.0]] * B, dtype=torch.float64)
    span, tol = (0.0, 10.0), dict(rtol=1e-6, atol=1e-8)
    f = VdP(mu.clone())
    with torch.no_grad():
        per = odeflux.solve(f, y0, span, batch_axis=0, **tol)
        joint = odeflux.solve(f, y0, span, **tol)
        singles = [odeflux.solve(VdP(mu[b : b + 1].clone()), y0[b : b + 1], span, **tol).stats.n_steps for b in range(B)]
    steps = per.sample_stats["n_steps"].tolist()
    assert steps == singles, (steps, singles)  # (the per-sample loop takes each single solve's steps)
    rows = [[f"{float(mu[b]):.3g}", singles[b], steps[b], joint.stats.n_steps] for b in range(0, B, max(1, B // 8))]
    summary = [
        ["sum over the samples of their steps", sum(singles), sum(steps), B * joint.stats.n_steps],
        ["loop iterations (the batch advances together)", "—", max(steps), joint.stats.n_steps],
    ]

    def grad_of(batch_axis):
        def run():
            g = VdP(mu.clone())
            sol = odeflux.solve(g, y0, span, batch_axis=batch_axis, sensealg=odeflux.DirectAdjoint(), **tol)
            (sol.ys[:, -1] if batch_axis is not None else sol.ys[-1]).pow(2).sum().backward()

        return run

    def fwd_of(batch_axis, compile):
        def run():
            with torch.no_grad():
                odeflux.solve(f, y0, span, batch_axis=batch_axis, compile=compile, **tol)

        return run

    configs = {
        "forward, per sample": fwd_of(0, False), "forward, joint": fwd_of(None, False),
        "forward, per sample, compile=True": fwd_of(0, True), "forward, joint, compile=True": fwd_of(None, True),
        "gradient, per sample (DirectAdjoint)": grad_of(0), "gradient, joint (DirectAdjoint)": grad_of(None),
    }  # fmt: skip
    if args.quick:  # (compiling takes a minute: the smoke run leaves it out)
        configs = {k: v for k, v in configs.items() if "compile" not in k}
    compile_s = {}
    for name, fn in configs.items():  # the first call of each: its compilation, where it has one
        t = time.perf_counter()
        fn()
        compile_s[name] = time.perf_counter() - t
    timings = interleaved(configs, rounds=rounds, warmup=1, min_rounds=rounds)
    trows = [[name, str(timings[name]), f"{compile_s[name]:.1f} s"] for name in configs]
    tutorial = tutorial_section(quick=args.quick)
    parts = [
        f"A batch of {B} Van der Pol oscillators, mu log-spaced in [0.1, 10], y0 = (2, 0), t in [0, 10], rtol 1e-6, "
        "atol 1e-8, float64, Tsit5 (PI controller), 1 torch thread. *Per sample*: `solve(..., batch_axis=0)`, each "
        "sample its own problem; *joint*: the batch as one ODE (one step size, one RMS norm); *alone*: a solve of "
        "the sample by itself. The per-sample steps are checked equal to the single solves' in the run.",
        "## Steps\n\n" + markdown_table(["mu", "alone", "per sample", "joint batch"], rows)
        + "\n\n" + markdown_table(["", "alone", "per sample", "joint batch"], summary),
        "## Time\n\nMedian [min–max] over interleaved rounds, after a first call (its time in the last column: "
        "compilation where `compile=True`).\n\n" + markdown_table(["configuration", "time", "first call"], trows),
        tutorial,
        closing_line(start),
    ]
    publish("Per-sample solves: a batch of independent problems (issue 16)", parts,
            machine_info() + f"\n- {code_state()}", "benchmarks.per_sample", argv, RESULT, write=not args.quick)  # fmt: skip
    return {"steps": steps, "joint": joint.stats.n_steps}


#: ``odeflux train`` configurations timed on the tutorial (TrainConfig fields; the CLI's flags).
TUTORIAL_RUNS: list[tuple[str, dict]] = [
    ("joint, default (InterpolatingAdjoint)", {}),
    ("joint, `--sensealg direct`", {"sensealg": "direct"}),
    ("per sample, default (InterpolatingAdjoint, `--vjp autograd`)", {"per_sample": True}),
    ("per sample, `--sensealg gauss --vjp func`", {"per_sample": True, "sensealg": "gauss", "vjp": "func"}),
    ("per sample, `--sensealg direct`", {"per_sample": True, "sensealg": "direct"}),
    ("per sample, `--sensealg direct --compile`", {"per_sample": True, "sensealg": "direct", "compile": True}),
]


def tutorial_section(quick: bool) -> str:
    """The MNIST tutorial's model, per sample against joint: one batch's steps, and the epoch
    time of ``odeflux train [--per-sample]`` with each of :data:`TUTORIAL_RUNS` (epochs 2-4, median)."""
    from odeflux.mnist.config import TrainConfig
    from odeflux.mnist.data import tutorial_split
    from odeflux.mnist.model import create_model
    from odeflux.mnist.train import train

    (x, _), _ = tutorial_split(download=False)
    model = create_model(sensealg="direct")
    with torch.no_grad():
        h = model.act(model.dense_in(model.flatten(x[:128])))
        field = model.node.field
        per = odeflux.solve(field, h, (0.0, 1.0), rtol=1e-3, atol=1e-3, batch_axis=0, save_start=False)
        joint = odeflux.solve(field, h, (0.0, 1.0), rtol=1e-3, atol=1e-3, save_start=False)
    steps = per.sample_stats["n_steps"].float()
    epochs = 2 if quick else 4
    rows = []
    for name, kw in [] if quick else TUTORIAL_RUNS:  # (the smoke run leaves training out)
        lines: list[str] = []
        train(TrainConfig(epochs=epochs, **kw), log=lines.append)
        secs = sorted(float(line.split("Time ")[1].split("s")[0]) for line in lines[1:])
        acc = lines[-1].split("Test Accuracy: ")[1].strip()
        rows.append([name, f"{secs[len(secs) // 2]:.3f}", acc])
    base = float(rows[0][1]) if rows else float("nan")
    for r in rows:
        r.insert(2, f"{float(r[1]) / base:.1f}")
    return (
        "## The MNIST tutorial's model\n\nThe first training batch (128 images) through the freshly initialised "
        "model's ODE layer (rtol = atol = 1e-3, float32): steps per image solved on its own, against the joint "
        f"batch's: {int(steps.min())} / {float(steps.median()):.0f} / {int(steps.max())} (min / median / max over the "
        f"images) against {joint.stats.n_steps}.\n\nEpoch time of `odeflux train` with and without `--per-sample` "
        f"(epochs 2-{epochs}, median; 1500 images, batch 128, one thread; `--compile`'s compilation is in its first "
        "epoch), and the test accuracy after the last epoch. The joint default run takes the tutorial field's "
        "NumPy kernels and hand-written VJP rule; the per-sample loop the generic torch path. The per-sample "
        "continuous adjoints' first step tries each whole interval, as the tutorial's (`--adjoint-first-step interval`).\n\n"
        + markdown_table(["`odeflux train`", "epoch (s)", "÷ joint default", f"test accuracy after epoch {epochs}"], rows)
    )


if __name__ == "__main__":
    main()
