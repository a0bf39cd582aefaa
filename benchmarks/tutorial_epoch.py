"""Steady-state epoch time of the tutorial's runs against the same model in torchdiffeq, torchode and diffrax.

An epoch is the tutorial's: 11 training steps over its 1350 training images (batch 128, the last
one 70), shuffled per epoch, Adam(1e-3), float32, rtol = atol = 1e-3. Every configuration starts
from the same initial weights (seed 0) and trains through the tutorial's 9 epochs: the first is
the warm-up, epochs 2 to 9 are timed, one epoch of each configuration per interleaved round.
diffrax runs in its own process (see :mod:`benchmarks.peers.diffrax_client`), timed in the same
rounds. Measured at 2 torch threads and at 1.

    python -m benchmarks.tutorial_epoch           # writes benchmarks/results/tutorial_epoch.md
    python -m benchmarks.tutorial_epoch --quick   # smoke run, prints only
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import odeflux
from odeflux.mnist.data import BatchLoader, tutorial_split
from odeflux.mnist.model import create_model
from odeflux.mnist.optim import make_optimizer
from odeflux.mnist.steps import warmup
from odeflux.mnist.train import train_epoch

from .common import (
    Timing,
    closing_line,
    fmt_seconds,
    interleaved,
    machine_info,
    markdown_table,
    publish,
    set_threads,
)
from .peers import diffrax_client, torchdiffeq_tutorial, torchode_tutorial
from .peers import torch_tutorial
from .peers.torch_tutorial import build_model
from .provenance import code_state
from .targets import Target, paired_ratio, targets_table

RESULT = Path(__file__).parent / "results" / "tutorial_epoch.md"
PACKAGES = ("torchdiffeq", "torchode", "jax", "diffrax", "optax")
DEFAULT = "odeflux interpolating + autograd (flat)"
ENGINE = "odeflux interpolating + autograd, engine only (flat)"
DIRECT = "odeflux direct (flat)"
USER = "odeflux NeuralODE(nn.Sequential) + torch.optim.Adam, as a user writes it"
#: The same model with odeflux's Adam (one fused kernel over the flat parameters, as every odeflux
#: row): the difference from USER is torch.optim.Adam's own per-step cost.
USER_OWN_ADAM = "the same with odeflux's Adam (odeflux.mnist.optim.make_optimizer)"
TD_ADJOINT = "torchdiffeq odeint_adjoint"
TD_ODEINT = "torchdiffeq odeint"
DIFFRAX = "diffrax RecursiveCheckpointAdjoint (jit)"
DIFFRAX_BACKSOLVE = "diffrax BacksolveAdjoint (jit)"

# The tutorial's four runs (scripts/tutorial_runs.sh), by the flags of `odeflux train`.
ODEFLUX_RUNS = {
    DEFAULT: dict(sensealg="interpolating", vjp="autograd", params="flat"),
    # The default without the field's hand-written VJP rule: every product through the autograd engine.
    ENGINE: dict(sensealg="interpolating", vjp="autograd", params="flat", vjp_rule=False),
    "odeflux gauss + autograd (tree)": dict(sensealg="gauss", vjp="autograd", params="tree"),
    "odeflux interpolating + func (flat)": dict(sensealg="interpolating", vjp="func", params="flat"),
    DIRECT: dict(sensealg="direct", params="flat"),
}
PEER_MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    TD_ADJOINT: lambda: torchdiffeq_tutorial.model(adjoint=True),
    TD_ODEINT: lambda: torchdiffeq_tutorial.model(adjoint=False),
    "torchode Tsit5 joint (AutoDiffAdjoint)": lambda: torchode_tutorial.model("joint"),
    "torchode Tsit5 per-sample (AutoDiffAdjoint)": lambda: torchode_tutorial.model("per-sample"),
}


def user_model() -> nn.Module:
    """The tutorial's model as a user writes it (issue 13): the field a plain ``nn.Sequential`` of
    ``nn.Linear`` and ``nn.Tanh``, ``NeuralODE``'s defaults (Dopri5, ``sensealg="auto"``), tree
    parameters; the same initial weights as the other configurations."""

    def node(field: torch_tutorial.TimeField) -> nn.Module:
        seq = nn.Sequential(*(m for layer in field.module.layers for m in (layer, nn.Tanh())))
        return odeflux.NeuralODE(seq, tspan=(0.0, 1.0), rtol=1e-3, atol=1e-3)

    return build_model(node)


@dataclass
class Section:
    threads: int
    timings: dict[str, Timing]
    losses: dict[str, float]
    compile_s: dict[str, float]
    reported: dict[str, list[float]]


def torch_epoch(model: torch.nn.Module, data, torch_adam: bool = False) -> tuple[Callable[[], Any], dict]:
    """One epoch of the tutorial's training loop (odeflux.mnist.train.train_epoch) for ``model``,
    with odeflux's Adam or (``torch_adam``) ``torch.optim.Adam``."""
    loader = BatchLoader(data, 128, shuffle=True, seed=0)
    opt = torch_tutorial.make_optimizer(model, 1e-3) if torch_adam else make_optimizer(model, 1e-3)
    warmup(model, (loader.x, loader.y))  # the tutorial's one-image warm-up pass
    state: dict = {}

    def epoch() -> None:
        _, loss_sum = train_epoch(model, loader, opt)
        state["loss"] = loss_sum

    return epoch, state


def run_section(threads: int, rounds: int, data, init: Path | None, diffrax_modes: list[str], quick: bool) -> Section:
    set_threads(threads)
    fns: dict[str, Callable[[], Any]] = {}
    states: dict[str, dict] = {}
    runs = dict(ODEFLUX_RUNS)
    peers = dict(PEER_MODELS)
    if quick:
        runs = {k: runs[k] for k in (DEFAULT, DIRECT)}
        peers = {k: peers[k] for k in (TD_ADJOINT, TD_ODEINT)}
    for name, flags in runs.items():
        fns[name], states[name] = torch_epoch(create_model(**flags), data)
    fns[USER], states[USER] = torch_epoch(user_model(), data, torch_adam=True)
    fns[USER_OWN_ADAM], states[USER_OWN_ADAM] = torch_epoch(user_model(), data)
    for name, make in peers.items():
        fns[name], states[name] = torch_epoch(make(), data)
    servers = []
    compile_s, reported = {}, {}
    try:
        for mode in diffrax_modes:
            name = DIFFRAX if mode == "checkpoint" else DIFFRAX_BACKSOLVE
            # diffrax at 1 thread: the process is pinned to one core (XLA sizes its pools from that).
            srv = diffrax_client.DiffraxServer("1500", threads=1 if threads == 1 else 0, init=init, adjoint=mode)
            servers.append(srv)
            fns[name] = srv.epoch
            compile_s[name] = srv.compile_s
            reported[name] = srv.reported
        # Warm-up: the tutorial's first epoch, untimed; then epochs 2.. in interleaved rounds.
        timings = interleaved(fns, rounds=rounds, warmup=1, min_rounds=rounds)
    finally:
        for srv in servers:
            srv.close()
    losses = {k: float(s["loss"]) / 11 for k, s in states.items() if "loss" in s}
    return Section(threads, timings, losses, compile_s, {k: v[1:] for k, v in reported.items()})


def section_table(sec: Section) -> str:
    base = sec.timings[DEFAULT]
    rows = []
    for name, t in sec.timings.items():
        ratio, (lo, hi) = paired_ratio(t, base)
        loss = f"{sec.losses[name]:.3f}" if name in sec.losses else "—"
        rows.append([name, str(t), fmt_seconds(t.median / 11), f"{ratio:.2f} [{lo:.2f}–{hi:.2f}]", loss])
    return markdown_table(
        ["configuration", "epoch: median [min–max]", "per step (÷ 11)", "÷ odeflux default: median [per-round range]",
         "mean loss, last timed epoch"],
        rows, align="lrrrr",
    )  # fmt: skip


def section_targets(sec: Section, diffrax_note: str) -> list[Target]:
    t = sec.timings
    out = []
    r, s = paired_ratio(t[DEFAULT], t[TD_ADJOINT])
    out.append(Target("1a", f"default run epoch ÷ torchdiffeq odeint_adjoint, {sec.threads} thread(s)", r, 0.35, s))
    if DIFFRAX in t:
        r, s = paired_ratio(t[DEFAULT], t[DIFFRAX])
        out.append(Target("1b", f"default run epoch ÷ diffrax (jit, steady state), {sec.threads} thread(s)", r, 1.0, s))
    else:
        out.append(Target("1b", f"default run epoch ÷ diffrax, {sec.threads} thread(s)", None, 1.0, note=diffrax_note))
    r, s = paired_ratio(t[DIRECT], t[TD_ODEINT])
    out.append(Target("2", f"DirectAdjoint epoch ÷ torchdiffeq odeint, {sec.threads} thread(s)", r, 0.5, s))
    fastest = min((k for k in (DIFFRAX, DIFFRAX_BACKSOLVE) if k in t), key=lambda k: t[k].median, default=None)
    if fastest is not None:
        r, s = paired_ratio(t[USER], t[fastest])
        out.append(Target("13-1", f"user's nn.Sequential run epoch ÷ diffrax's fastest ({fastest}), {sec.threads} thread(s)", r, 1.0, s))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tutorial_epoch", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--rounds", type=int, default=8, help="timed epochs per configuration (8: the tutorial's epochs 2-9)"
    )
    p.add_argument("--threads", type=int, action="append", help="torch threads; repeat for several (default: 2 and 1)")
    p.add_argument("--no-diffrax", action="store_true", help="leave diffrax out")
    p.add_argument("--diffrax-backsolve", action=argparse.BooleanOptionalAction, default=True,
                   help="also diffrax's BacksolveAdjoint (at the first thread count)")  # fmt: skip
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: two odeflux runs, torchdiffeq, no diffrax, 2 rounds, 1 thread; prints only",
    )
    p.add_argument("--out", type=Path, default=RESULT, help="results file (markdown)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    threads = args.threads or ([1] if args.quick else [2, 1])
    if args.rounds < 1 or any(n < 1 for n in threads):
        p.error("--rounds and --threads must be >= 1")
    if args.quick:
        args.rounds, args.diffrax_backsolve = 2, False
    set_threads(threads[0])
    machine = (
        machine_info(*PACKAGES)
        + f"\n- {code_state()}"
        + (f"\n- this run: torch threads {', then '.join(map(str, threads))}, one section each")
    )
    start = time.perf_counter()
    data = tutorial_split(1500)[0]
    if args.no_diffrax or args.quick:
        missing = "left out (--quick)" if args.quick else "left out (--no-diffrax)"
    else:
        missing = diffrax_client.available()
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        init = diffrax_client.save_weights(build_model(lambda f: f), Path(tmp) / "init.npz") if not missing else None
        for i, n in enumerate(threads):
            modes = [] if missing else ["checkpoint"] + (["backsolve"] if args.diffrax_backsolve and i == 0 else [])
            print(f"  {n} thread(s): {args.rounds} rounds", flush=True)
            sections.append(run_section(n, args.rounds, data, init, modes, args.quick))

    targets = [t for sec in sections for t in section_targets(sec, missing or "")]
    parts = [
        "The MNIST tutorial's model (Dense(784->20, tanh), Neural ODE over `Dense(20->10,tanh)-Dense(10->10,tanh)-"
        "Dense(10->20,tanh)` on [0, 1], Dense(20->10)) trained on the tutorial's 1350 training images: an epoch is "
        "11 steps of batch 128 (the last 70), Adam(1e-3), float32, rtol = atol = 1e-3. All configurations start "
        "from the same initial weights (seed 0: the torch peers rebuild odeflux's, and their scripts print the same "
        "first-epoch accuracies as `odeflux train`; diffrax gets them from a file) "
        "and see the same batches (diffrax: the same images, its own shuffle). Each configuration's first epoch "
        "(after the tutorial's one-image warm-up) is untimed; then epochs 2 to "
        f"{args.rounds + 1} are timed in interleaved rounds, one epoch of each configuration per round in rotated "
        "order. Times are the training batches only (as the tutorial's `Time`); evaluation is not run.",
        "odeflux rows are the tutorial's four runs (`scripts/tutorial_runs.sh`): `--sensealg interpolating --vjp "
        "autograd --params flat` (the default), `gauss --vjp autograd --params tree`, `interpolating --vjp func`, "
        "`direct`, and the default once more with `create_model(vjp_rule=False)` (*engine only*: the products "
        "go through the autograd engine instead of the tutorial field's hand-written VJP rule, "
        "`odeflux.fields.MLP`); each runs `odeflux.mnist.train.train_epoch` with `create_model` and "
        "`make_optimizer`, and so do "
        "the user's row once more (its model with odeflux's Adam where the user row has `torch.optim.Adam(foreach="
        "True)`), and "
        "the torch peers (same loop, only the model differs). torchdiffeq: dopri5, `odeint_adjoint` (adjoint at "
        "the forward's tolerances) or `odeint` (backpropagation through the solver). torchode: Tsit5 with "
        "`solve_ivp`'s PID gains, the batch as one problem (*joint*, as the tutorial) or 128 (*per-sample*). "
        "diffrax: Tsit5, `PIDController(rtol, atol)`, `RecursiveCheckpointAdjoint` (its default) or "
        "`BacksolveAdjoint`; the whole step (gather, forward, gradient, optax Adam) is one `jax.jit` function, "
        "run in its own process, timed from this process (the pipe's round trip, well under a millisecond, "
        "included); at 1 thread that process is pinned to one core.",
    ]
    for sec in sections:
        extra = ""
        if sec.compile_s:
            extra = "\n\nJAX compilation (before the warm-up, not in the epochs): " + ", ".join(
                f"{k}: {v:.1f} s" for k, v in sec.compile_s.items()
            )
        parts.append(f"## {sec.threads} torch thread{'s' if sec.threads != 1 else ''}\n\n"
                     f"{len(next(iter(sec.timings.values())).samples)} timed epochs each.\n\n"
                     f"{section_table(sec)}{extra}")  # fmt: skip
    parts.append("## Targets (issue 5)\n\nRatio of the medians; in brackets the range of the round-by-round ratios "
                 f"(the two epochs of a round ran back to back).\n\n{targets_table(targets)}")  # fmt: skip
    if missing:
        parts.append(f"diffrax: {missing}.")
    parts.append(closing_line(start))
    publish(
        "Tutorial epoch: odeflux's runs against torchdiffeq, torchode and diffrax",
        parts, machine, "benchmarks.tutorial_epoch", argv, args.out, not (args.no_write or args.quick),
    )  # fmt: skip
    return {"targets": targets, "sections": sections}


if __name__ == "__main__":
    main()
