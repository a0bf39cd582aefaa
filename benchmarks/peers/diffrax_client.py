"""Drive :mod:`benchmarks.peers.diffrax_tutorial` in its own process from a torch benchmark.

The JAX process waits on its stdin while the torch configurations run, and the torch process
waits on the pipe while JAX trains, so the two never compete for the cores and can be timed in
the same interleaved rounds.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def available() -> str | None:
    """``None`` when diffrax, JAX and optax can be imported; else why not (one line)."""
    missing = [m for m in ("jax", "diffrax", "optax") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed (pip install -e .[bench])"
    return None


def save_weights(model, path: Path) -> Path:
    """The torch tutorial model's layers as ``w0, b0, ..., w4, b4`` (dense_in, the field's three, dense_out)."""
    mlp = [m for m in model.modules() if type(m).__name__ == "TanhMLP"][0]
    layers = [model.dense_in, *mlp.layers, model.dense_out]
    arrays = {}
    for i, layer in enumerate(layers):
        arrays[f"w{i}"] = layer.weight.detach().cpu().numpy().astype(np.float32)
        arrays[f"b{i}"] = layer.bias.detach().cpu().numpy().astype(np.float32)
    np.savez(path, **arrays)
    return path


class DiffraxServer:
    """A ``diffrax_tutorial serve`` process: ``epoch()`` / ``batches(k)`` train and return seconds."""

    def __init__(
        self,
        n_samples: str = "1500",
        threads: int = 0,
        init: Path | None = None,
        adjoint: str = "checkpoint",
        extra: Sequence[str] = (),
        env: dict | None = None,
        timeout: float = 600.0,
    ):
        cmd = [sys.executable, "-m", "benchmarks.peers.diffrax_tutorial", "serve", "--n-samples", str(n_samples),
               "--threads", str(threads), "--adjoint", adjoint, *extra]  # fmt: skip
        if init is not None:
            cmd += ["--init", str(init)]
        self._start(cmd, env, timeout)
        self.reported: list[float] = []
        self.last_steps = 0

    def _start(self, cmd: list[str], env: dict | None, timeout: float) -> None:
        """Spawn the server and wait for its ``ready <compile seconds>`` line."""
        env = dict(os.environ if env is None else env, JAX_PLATFORMS="cpu")
        self.started = time.perf_counter()
        self.timeout = timeout
        self._err = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: JAX's warnings can't block it
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err, text=True, bufsize=1)  # fmt: skip
        try:
            line = self._read()
            if not line.startswith("ready"):
                raise RuntimeError(f"diffrax server did not start: {line!r}")
        except BaseException:
            self.close()
            raise
        self.compile_s = float(line.split()[1])
        self.startup_s = time.perf_counter() - self.started

    def _read(self) -> str:
        killer = threading.Timer(self.timeout, self.proc.kill)  # no reply in time: fail, don't hang
        killer.start()
        try:
            line = self.proc.stdout.readline()
        finally:
            killer.cancel()
        if not line:
            self.proc.wait(timeout=30)
            self._err.seek(0)
            err = self._err.read()
            tail = " | ".join(err.strip().splitlines()[-3:])
            raise RuntimeError(f"diffrax server exited (status {self.proc.poll()}): {tail}")
        return line.strip()

    def _ask(self, cmd: str) -> float:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        _, seconds, steps = self._read().split()
        self.reported.append(float(seconds))
        self.last_steps = int(steps)
        return float(seconds)

    def epoch(self) -> float:
        return self._ask("epoch")

    def batches(self, k: int) -> float:
        return self._ask(f"batches {k}")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self._err):
            stream.close()

    def __enter__(self) -> "DiffraxServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DiffraxFieldServer(DiffraxServer):
    """A ``diffrax_general serve`` process for one workload of :mod:`benchmarks.general` (or, with
    ``module``, another server of the same commands: :mod:`.diffrax_small`).

    ``time(adj)`` runs one gradient and returns the seconds it reports; ``grad(adj, path)`` also
    saves the gradient and returns ``(seconds, steps, accepted, rejected)``; ``count(adj)``
    returns ``(forward f evals, backward f evals, backward VJPs)``.
    """

    def __init__(self, workload: str, data: Path, rtol: float, atol: float, threads: int = 0,
                 env: dict | None = None, timeout: float = 600.0, module: str = "benchmarks.peers.diffrax_general"):  # fmt: skip
        cmd = [sys.executable, "-m", module, "serve", "--workload", workload,
               "--data", str(data), "--rtol", repr(rtol), "--atol", repr(atol), "--threads", str(threads)]  # fmt: skip
        self._start(cmd, env, timeout)
        self.reported: dict[str, list[float]] = {}

    def _command(self, cmd: str) -> list[str]:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        words = self._read().split()
        if words[:1] != ["done"]:
            raise RuntimeError(f"diffrax server answered {' '.join(words)!r} to {cmd!r}")
        return words[1:]

    def time(self, adjoint: str) -> float:
        seconds = float(self._command(f"time {adjoint}")[0])
        self.reported.setdefault(adjoint, []).append(seconds)
        return seconds

    def grad(self, adjoint: str, path: Path) -> tuple[float, int, int, int]:
        seconds, *stats = self._command(f"grad {adjoint} {path}")
        return (float(seconds), *(int(s) for s in stats))

    def count(self, adjoint: str) -> tuple[int, int, int]:
        return tuple(int(n) for n in self._command(f"count {adjoint}"))
