"""What the diffrax servers (:mod:`.diffrax_general`, :mod:`.diffrax_small`) share: their
command line, the process set-up before JAX starts, and the loop over the commands they read."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Iterator

import numpy as np


def start(prog: str, description: str, workloads: tuple[str, ...], data_help: str,
          argv: list[str] | None) -> tuple[argparse.Namespace, dict]:  # fmt: skip
    """Parse ``serve --workload W --data D --rtol R --atol A [--threads 1]``, pin the process to one
    core where asked (before JAX sizes its thread pools), and load the ``.npz`` data (float64
    arrays switch on JAX's x64 mode)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("mode", choices=("serve",))
    p.add_argument("--workload", choices=workloads, required=True)
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--rtol", type=float, required=True)
    p.add_argument("--atol", type=float, required=True)
    p.add_argument("--threads", type=int, default=0, help="1: pin to one CPU core; 0: JAX's default (all usable cores)")
    args = p.parse_args(argv)
    if args.threads == 1:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    with np.load(args.data) as z:
        data = {k: z[k] for k in z.files}
    if data["y0"].dtype == np.float64:
        import jax

        jax.config.update("jax_enable_x64", True)
    return args, data


def commands() -> Iterator[list[str]]:
    """The commands read from stdin, one a line, split into words, until ``quit``."""
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "quit":
            return
        yield cmd
