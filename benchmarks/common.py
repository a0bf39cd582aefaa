"""Shared benchmark harness: timing with warm-up and rotation, machine description, markdown output.

Timings are wall-clock (``time.perf_counter``) with the garbage collector paused during each
sample. On a shared machine noise comes in bursts, so comparisons should run interleaved
(:func:`interleaved`): every round runs every configuration once, in a rotated order, and a
burst hits all configurations alike. Report the median; min-max shows the spread.
"""

from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "CountingField",
    "Timing",
    "command_line",
    "fmt_seconds",
    "interleaved",
    "machine_info",
    "markdown_table",
    "package_versions",
    "result_document",
    "set_threads",
    "timeit",
    "write_result",
]


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median and the range over the measured samples."""

    median: float
    lo: float
    hi: float
    samples: tuple[float, ...] = ()

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> "Timing":
        if not samples:
            raise ValueError("Timing needs at least one sample: use repeats >= 1")
        s = tuple(samples)
        return cls(statistics.median(s), min(s), max(s), s)

    def per(self, count: float) -> "Timing":
        """The same timing divided by ``count`` (e.g. per step), samples included."""
        if count <= 0:
            raise ValueError(f"cannot divide a timing by a non-positive count {count}")
        return Timing(self.median / count, self.lo / count, self.hi / count, tuple(x / count for x in self.samples))

    def __str__(self) -> str:
        return f"{fmt_seconds(self.median)} [{fmt_seconds(self.lo)}–{fmt_seconds(self.hi)}]"


def fmt_seconds(s: float) -> str:
    """A duration with a unit that keeps three significant digits: ``'412 µs'``, ``'3.05 ms'``."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if abs(s) >= 0.9995 * scale or unit == "ns":  # 0.9997 ms reads '1 ms', not '1e+03 µs'
            v = s / scale
            return f"{v:.3g} {unit}" if v < 1000 else f"{v:.0f} {unit}"
    raise AssertionError("unreachable")


def _sample(fn: Callable[[], Any], number: int) -> float:
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - t0) / number
    finally:
        if gc_was_on:
            gc.enable()


def timeit(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3, number: int = 1) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` samples, each the mean of ``number`` calls."""
    if repeats < 1 or warmup < 0 or number < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, number >= 1; got {repeats}, {warmup}, {number}")
    for _ in range(warmup):
        fn()
    return Timing.from_samples([_sample(fn, number) for _ in range(repeats)])


def interleaved(
    fns: Mapping[str, Callable[[], Any]],
    rounds: int = 20,
    warmup: int = 3,
    number: int = 1,
    budget_s: float | None = None,
    min_rounds: int = 5,
) -> dict[str, Timing]:
    """Time several configurations side by side.

    After ``warmup`` untimed calls of each, every round runs every configuration once (a sample of
    ``number`` calls), starting one place further along the list each round, so that slow
    patches of a shared machine and ordering effects (caches, allocator state) hit all alike.
    With ``budget_s``, rounds stop once that many seconds have passed (after at least
    ``min_rounds``), so a loaded machine cannot stretch a run without bound; every configuration
    still has the same number of samples (``len(timing.samples)``).
    """
    if rounds < 1 or warmup < 0 or number < 1 or min_rounds < 1:
        raise ValueError(
            "need rounds >= 1, warmup >= 0, number >= 1, min_rounds >= 1; "
            f"got {rounds}, {warmup}, {number}, {min_rounds}"
        )
    names = list(fns)
    if not names:
        raise ValueError("interleaved() needs at least one configuration")
    start = time.perf_counter()
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(_sample(fns[name], number))
        if budget_s is not None and r + 1 >= min_rounds and time.perf_counter() - start > budget_s:
            break
    return {name: Timing.from_samples(samples[name]) for name in names}


def set_threads(n: int) -> None:
    """Pin torch's intra-op thread count (call before the first timed work)."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    torch.set_num_threads(n)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def package_versions(*names: str) -> str:
    """``'torchdiffeq 0.2.5, torchode 1.0.1'``; a package that is not installed reads 'not installed'."""
    out = []
    for name in names:
        try:
            out.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            out.append(f"{name} not installed")
    return ", ".join(out)


def machine_info(*packages: str) -> str:
    """A markdown bullet list: CPU, cores, load, OS, Python, torch and its threads, ``packages``' versions."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 0
    try:
        load = "load average %.2f %.2f %.2f (1, 5, 15 min)" % os.getloadavg()
    except OSError:
        load = "load average unknown"
    lines = [
        f"CPU: {_cpu_model()}, {os.cpu_count()} logical cores ({usable} usable), {load}",
        f"OS: {platform.system()} {platform.release()}; Python {platform.python_version()}",
        f"torch {torch.__version__}: {torch.get_num_threads()} intra-op threads, "
        f"{torch.get_num_interop_threads()} inter-op threads",
    ]
    if packages:
        lines.append(package_versions(*packages))
    return "\n".join(f"- {line}" for line in lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table. ``align`` has one letter per column: ``l``, ``r`` or ``c`` (default: all ``l``)."""
    n = len(headers)
    align = align or "l" * n
    if len(align) != n or set(align) - set("lrc"):
        raise ValueError(f"align needs one of l/r/c per column ({n}), got {align!r}")
    for i, row in enumerate(rows):
        if len(row) != n:
            raise ValueError(f"row {i} has {len(row)} cells for {n} headers")
    rule = {"l": ":--", "r": "--:", "c": ":-:"}

    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), "| " + " | ".join(rule[a] for a in align) + " |", *(line(r) for r in rows)])


def command_line() -> str:
    """How this benchmark was started, as a user would type it: ``python -m benchmarks.<name> <args>``."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    prog = f"python -m {spec.name}" if spec is not None and spec.name else f"python {sys.argv[0]}"
    return " ".join([prog, *(shlex.quote(a) for a in sys.argv[1:])])


def result_document(
    title: str, body: str, packages: Sequence[str] = (), command: str | None = None, machine: str | None = None
) -> str:
    """A results file: title, the command (default :func:`command_line`), date, machine, then ``body``.

    ``machine`` defaults to :func:`machine_info` of ``packages`` now; pass one taken before the run
    to record the load the run started under.
    """
    machine = machine or machine_info(*packages)
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"# {title}\n\n"
        f"Command: `{command or command_line()}`  \nDate: {date}\n\nMachine:\n{machine}\n\n"
        f"{body.rstrip()}\n"
    )


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_result(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, _new_file_mode())  # mkstemp makes it owner-only; results are meant to be shared
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


class CountingField(nn.Module):
    """Wraps a vector field ``f(t, y, *args)`` and counts its calls in ``n_calls``.

    One wrapper for every library, so function evaluations are counted the same way. With
    ``autonomous=True`` it calls ``f(y)`` (e.g. an ``nn.Sequential`` that ignores time). It also
    implements torchdiffeq's step callbacks, which gives torchdiffeq's attempted and accepted step
    counts (``n_steps``, ``n_accepted``); other libraries report steps in their own statistics.
    ``f`` is registered as a submodule when it is one, so its parameters stay visible.
    """

    def __init__(self, f: Callable[..., torch.Tensor], autonomous: bool = False):
        super().__init__()
        self.f = f
        self.autonomous = autonomous
        self.reset()

    def reset(self) -> None:
        self.n_calls = 0
        self.n_steps = 0
        self.n_accepted = 0

    def forward(self, t: torch.Tensor, y: torch.Tensor, *args: Any) -> torch.Tensor:
        self.n_calls += 1
        return self.f(y, *args) if self.autonomous else self.f(t, y, *args)

    def callback_step(self, t0: Any, y0: Any, dt: Any) -> None:
        self.n_steps += 1

    def callback_accept_step(self, t0: Any, y0: Any, dt: Any) -> None:
        self.n_accepted += 1


def invocation(module: str, argv: list[str] | None) -> str | None:
    """The command line for a results file. ``None`` when the benchmark runs as a script
    (``command_line()`` tells it then); under ``run_all``, its own command and ``run_all``'s."""
    if argv is None:
        return None
    return shlex.join(["python", "-m", module, *argv]) + f" (run by {command_line()})"


def publish(title: str, parts: list[str], machine: str, module: str, argv: list[str] | None, out, write: bool) -> str:
    """Assemble a results document, print it, and (``write``) save it atomically to ``out``."""
    doc = result_document(title, "\n\n".join(parts), machine=machine, command=invocation(module, argv))
    print(doc)
    if write:
        print(f"written to {write_result(out, doc)}")
    return doc


def closing_line(start: float | None = None) -> str:
    """The results' last line: the load average now, and the run's duration since ``start``."""
    load = "Load average at the end: %.2f %.2f %.2f" % os.getloadavg()
    return load + ("." if start is None else f"; whole run {time.perf_counter() - start:.0f} s.")
