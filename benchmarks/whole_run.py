"""The whole tutorial run as a user sees it: wall clock from spawning the process to its ninth epoch line.

Each configuration is a fresh process: ``python -m odeflux train`` and the same run written with
torchdiffeq, torchode and diffrax (``benchmarks/peers/``), all printing the tutorial's epoch
lines. The time covers the interpreter's start, the imports, loading the 1500 images, building
the model, the warm-up (and for diffrax the JIT compilation) and nine epochs with their
accuracy evaluations. Processes are timed in interleaved rounds (each configuration once per
round, in rotated order), at 2 torch threads and at 1.

    python -m benchmarks.whole_run            # writes benchmarks/results/whole_run.md
    python -m benchmarks.whole_run --quick    # smoke run: 2 epochs, odeflux and torchdiffeq, prints only
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .common import (
    Timing,
    closing_line,
    fmt_seconds,
    machine_info,
    markdown_table,
    publish,
)
from .peers import diffrax_client
from .provenance import code_state
from .targets import Target, paired_ratio, targets_table

RESULT = Path(__file__).parent / "results" / "whole_run.md"
REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torchdiffeq", "torchode", "jax", "diffrax", "optax")
ODEFLUX = "odeflux train (default: interpolating + autograd)"
TD_ADJOINT = "torchdiffeq odeint_adjoint"
TD_ODEINT = "torchdiffeq odeint"
TORCHODE = "torchode Tsit5 joint"
DIFFRAX = "diffrax (jit, RecursiveCheckpointAdjoint)"


def commands(threads: int, epochs: int, with_diffrax: bool, quick: bool) -> dict[str, list[str]]:
    py, n, e = sys.executable, str(threads), str(epochs)
    cmds = {
        ODEFLUX: [py, "-m", "odeflux", "train", "--threads", n, "--epochs", e],
        TD_ADJOINT: [py, "-m", "benchmarks.peers.torchdiffeq_tutorial", "--threads", n, "--epochs", e],
        TD_ODEINT: [py, "-m", "benchmarks.peers.torchdiffeq_tutorial", "--odeint", "--threads", n, "--epochs", e],
        TORCHODE: [py, "-m", "benchmarks.peers.torchode_tutorial", "--mode", "joint", "--threads", n, "--epochs", e],
    }
    if quick:
        cmds = {k: cmds[k] for k in (ODEFLUX, TD_ADJOINT)}
    if with_diffrax:
        jt = "1" if threads == 1 else "0"  # 1: pinned to one core; 0: JAX's default
        cmds[DIFFRAX] = [py, "-m", "benchmarks.peers.diffrax_tutorial", "train", "--threads", jt, "--epochs", e]
    return cmds


@dataclass
class RunTime:
    to_last: float  # spawn to the last epoch line
    to_first: float  # spawn to the first epoch line
    epoch_sum: float  # the epochs' own "Time" fields added up


def time_process(cmd: list[str], epochs: int, env: dict, timeout: float) -> RunTime:
    """Spawn ``cmd`` and time it to its first and last (``[epochs/epochs]``) epoch lines."""
    with tempfile.TemporaryFile(mode="w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        first = last = None
        epoch_sum = 0.0
        killer = threading.Timer(timeout, proc.kill)  # a hung process ends the run with an error, not a hang
        killer.start()
        try:
            for line in proc.stdout:
                now = time.perf_counter() - start
                if line.startswith("["):
                    first = now if first is None else first
                    epoch_sum += float(line.split("Time")[1].split("s")[0])
                    if line.startswith(f"[{epochs}/{epochs}]"):
                        last = now
                        break
            proc.stdout.read()  # let it finish writing
            proc.wait()
        finally:
            killer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        if last is None or proc.returncode != 0:
            err.seek(0)
            tail = " | ".join(err.read().strip().splitlines()[-3:])
            raise RuntimeError(f"{' '.join(cmd[1:])} exited {proc.returncode} before its epoch {epochs} line: {tail}")
    return RunTime(last, first, epoch_sum)


def run_section(threads: int, rounds: int, epochs: int, with_diffrax: bool, quick: bool, env: dict,
                timeout: float) -> dict[str, list[RunTime]]:  # fmt: skip
    cmds = commands(threads, epochs, with_diffrax, quick)
    names = list(cmds)
    out: dict[str, list[RunTime]] = {k: [] for k in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(time_process(cmds[name], epochs, env, timeout))
            print(f"  {threads} thread(s), round {r + 1}: {name} {out[name][-1].to_last:.1f} s", flush=True)
    return out


def section_table(runs: dict[str, list[RunTime]]) -> str:
    base = Timing.from_samples([r.to_last for r in runs[ODEFLUX]])
    rows = []
    for name, rs in runs.items():
        t = Timing.from_samples([r.to_last for r in rs])
        first = Timing.from_samples([r.to_first for r in rs])
        epochs = Timing.from_samples([r.epoch_sum for r in rs])
        ratio, (lo, hi) = paired_ratio(t, base)
        rows.append([name, str(t), f"{ratio:.2f} [{lo:.2f}–{hi:.2f}]", str(first), fmt_seconds(epochs.median)])
    return markdown_table(
        ["configuration", "spawn to last epoch line: median [min–max]", "÷ odeflux: median [per-round range]",
         "spawn to first epoch line", "the epochs' own times, summed (median)"],
        rows, align="lrrrr",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.whole_run", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="timed runs of each configuration at the first thread count")
    p.add_argument("--rounds-1", type=int, default=2, help="timed runs of each at 1 thread (after the first count)")
    p.add_argument("--threads", type=int, action="append", help="torch threads; repeat for several (default: 2 and 1)")
    p.add_argument("--epochs", type=int, default=9)
    p.add_argument("--no-diffrax", action="store_true", help="leave diffrax out")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one process may take")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 epochs, odeflux and torchdiffeq, 1 round, 1 thread; prints only",
    )
    p.add_argument("--out", type=Path, default=RESULT, help="results file (markdown)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    threads = args.threads or ([1] if args.quick else [2, 1])
    if args.quick:
        args.rounds, args.epochs = 1, 2
    if min(args.rounds, args.rounds_1, args.epochs, *threads) < 1:
        p.error("--rounds, --rounds-1, --epochs and --threads must be >= 1")
    if args.no_diffrax or args.quick:
        missing = "left out (--quick)" if args.quick else "left out (--no-diffrax)"
    else:
        missing = diffrax_client.available()
    machine = (
        machine_info(*PACKAGES)
        + f"\n- {code_state()}"
        + (f"\n- this run: torch threads of the timed processes {', then '.join(map(str, threads))}, one section each")
    )
    start = time.perf_counter()

    with tempfile.TemporaryDirectory() as cache:
        # Same data for every process: the 1500 images shipped with odeflux (no data directory, an empty cache).
        env = {k: v for k, v in os.environ.items() if k != "ODEFLUX_DATA_DIR"}
        env.update(XDG_CACHE_HOME=cache, PYTHONDONTWRITEBYTECODE="1")
        # Warm the file cache once (imports), untimed, so the first timed process doesn't read from disk alone.
        mods = "torch, odeflux, torchdiffeq, torchode" + ("" if missing else ", jax, diffrax, optax")
        subprocess.run([sys.executable, "-c", f"import {mods}"], cwd=REPO, env=env, check=True, timeout=args.timeout)
        sections = {}
        for i, n in enumerate(threads):
            rounds = args.rounds if i == 0 else args.rounds_1
            sections[n] = run_section(n, rounds, args.epochs, missing is None, args.quick, env, args.timeout)

    targets = []
    for n, runs in sections.items():
        base = Timing.from_samples([r.to_last for r in runs[ODEFLUX]])
        if DIFFRAX in runs:
            r, s = paired_ratio(base, Timing.from_samples([x.to_last for x in runs[DIFFRAX]]))
            targets.append(Target("3a", f"whole run ÷ diffrax's, {n} thread(s)", r, 0.5, s))
        else:
            targets.append(Target("3a", f"whole run ÷ diffrax's, {n} thread(s)", None, 0.5, note=missing or ""))
        r, s = paired_ratio(base, Timing.from_samples([x.to_last for x in runs[TD_ADJOINT]]))
        targets.append(Target("3b", f"whole run ÷ torchdiffeq odeint_adjoint's, {n} thread(s)", r, 1.0, s))
        if TD_ODEINT in runs:
            r, s = paired_ratio(base, Timing.from_samples([x.to_last for x in runs[TD_ODEINT]]))
            targets.append(Target("3b'", f"whole run ÷ torchdiffeq odeint's, {n} thread(s)", r, 1.0, s))

    parts = [
        f"Wall clock from spawning each process to its epoch-{args.epochs} line (`[{args.epochs}/{args.epochs}] ...`): "
        "interpreter start, imports, reading the tutorial's 1500 images, building the model, the one-image "
        f"warm-up (diffrax: JIT compilation of the training step and of the evaluation), {args.epochs} epochs of "
        "11 training steps each and the train/test accuracy after each epoch. All runs use the 1500 images "
        "shipped inside odeflux (`ODEFLUX_DATA_DIR` unset, an empty cache directory), the tutorial's model, "
        "seed 0, Adam(1e-3), rtol = atol = 1e-3, float32. Commands (from the repository root):",
        "\n".join(
            f"- {name}: `{' '.join(['python', *cmd[1:]])}`"
            for name, cmd in commands(threads[0], args.epochs, missing is None, args.quick).items()
        ),  # fmt: skip
        "`--threads` sets torch's intra-op threads (odeflux train's default is 1); diffrax `--threads 0` leaves "
        "JAX its default (all usable cores), `--threads 1` pins the process to one core. Rounds are "
        "interleaved (each configuration once per round, rotated order). The first epoch line comes after the "
        "one-off costs (imports, compilation); the epochs' own times add up the `Time` each run printed. The "
        "torch peers train with `torch.optim.Adam` as their users would (importing it loads `torch._dynamo`); "
        "`odeflux train` uses odeflux's own Adam, which avoids that import.",
    ]
    for n, runs in sections.items():
        k = len(next(iter(runs.values())))
        parts.append(
            f"## {n} thread{'s' if n != 1 else ''}\n\n{k} round{'s' if k != 1 else ''}.\n\n{section_table(runs)}"
        )
    parts.append(f"## Targets (issue 5)\n\nRatio of the medians; in brackets the range of the round-by-round ratios."
                 f"\n\n{targets_table(targets)}")  # fmt: skip
    if missing:
        parts.append(f"diffrax: {missing}.")
    parts.append(closing_line(start))
    publish(
        "Whole run: process start to the last epoch line",
        parts, machine, "benchmarks.whole_run", argv, args.out, not (args.no_write or args.quick),
    )  # fmt: skip
    return {"targets": targets, "sections": sections}


if __name__ == "__main__":
    main()
