"""NumPy's BLAS held to one thread while odeflux's NumPy kernels run, against left as it is.

odeflux's NumPy kernels (odeflux.kernels) run a small CPU solve's products through NumPy's BLAS. Some of them (an RK
step's stage sums, a stage plan's batched products) pass OpenBLAS's threading thresholds once the
batch grows; with torch's own threads busy on the same cores, OpenBLAS's threads then wait on each
other. ``odeflux.kernels.arrays.one_blas_thread`` holds NumPy's BLAS to one thread while the kernels run. This
times the default training run (InterpolatingAdjoint, autograd VJPs, flat parameters, the
tutorial's 1350 images, Adam(1e-3), float32) with the hold (*one BLAS thread*) and without it
(*BLAS threads as set*: NumPy's BLAS on its own thread count, here printed per section), at
batch 128 (the tutorial's) and 512.

    python -m benchmarks.blas_threads           # writes benchmarks/results/blas_threads.md
    python -m benchmarks.blas_threads --quick   # one round, prints only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

from odeflux.kernels import arrays
from odeflux.mnist.data import BatchLoader, tutorial_split
from odeflux.mnist.model import create_model
from odeflux.mnist.optim import make_optimizer
from odeflux.mnist.steps import warmup
from odeflux.mnist.train import train_epoch

from .common import Timing, closing_line, machine_info, markdown_table, publish, set_threads
from .provenance import code_state

RESULT = Path(__file__).parent / "results" / "blas_threads.md"
ROOT = Path(__file__).resolve().parents[1]
HOLD, AS_SET = "one BLAS thread", "BLAS threads as set"


def _blas_threads() -> str:
    try:
        from threadpoolctl import threadpool_info

        return ", ".join(f"{i['internal_api']} {i['num_threads']}" for i in threadpool_info() if i["user_api"] == "blas")
    except ImportError:
        return "unknown (no threadpoolctl)"


def child(batch: int, hold: bool, threads: int, epochs: int) -> None:
    """In a fresh process: the untimed first epoch, then ``epochs`` timed ones; prints their seconds."""
    set_threads(threads)
    data = tutorial_split(1500)[0]
    loader = BatchLoader(data, batch, shuffle=True, seed=0)
    model = create_model(sensealg="interpolating", vjp="autograd", params="flat")
    opt = make_optimizer(model, 1e-3)
    if not hold:
        arrays.one_blas_thread = contextlib.nullcontext()  # every caller looks it up per call
    warmup(model, (loader.x, loader.y))
    train_epoch(model, loader, opt)
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        train_epoch(model, loader, opt)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"times": times, "blas": _blas_threads()}))


def run_child(batch: int, hold: bool, threads: int, epochs: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.blas_threads", "--child", f"{batch},{int(hold)},{threads},{epochs}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.blas_threads", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="processes per configuration (run in rotated order)")
    p.add_argument("--epochs", type=int, default=8, help="timed epochs per process")
    p.add_argument("--threads", type=int, action="append", help="torch threads; repeat for several (default: 2 and 1)")
    p.add_argument("--batch", type=int, action="append", help="batch sizes (default: 128 and 512)")
    p.add_argument("--quick", action="store_true", help="one process each, 2 epochs, batch 512, 2 threads; prints only")
    p.add_argument("--out", type=Path, default=RESULT, help="results file (markdown)")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        b, h, n, e = (int(v) for v in args.child.split(","))
        child(b, bool(h), n, e)
        return {}
    if args.quick:
        args.repeats, args.epochs, args.threads, args.batch = 1, 2, args.threads or [2], args.batch or [512]
    threads, batches = args.threads or [2, 1], args.batch or [128, 512]
    if min(args.repeats, args.epochs, *threads, *batches) < 1:
        p.error("--repeats, --epochs, --threads and --batch must be >= 1")
    start = time.perf_counter()
    parts = [__doc__.split("\n\n")[1].replace("\n", " ") + (
        f" Each configuration runs in {args.repeats} fresh processes (OpenBLAS's idle threads keep spinning "
        "for a while after their last product, which would slow whatever ran next in the same process), "
        f"each timing {args.epochs} epochs after an untimed one; the table gives the median and range of "
        "all their epochs.")]  # fmt: skip
    for n in threads:
        configs = [(b, hold) for b in batches for hold in (True, False)]
        epochs: dict[tuple[int, bool], list[float]] = {c: [] for c in configs}
        blas = ""
        for r in range(args.repeats):
            k = r % len(configs)
            for b, hold in configs[k:] + configs[:k]:
                res = run_child(b, hold, n, args.epochs)
                epochs[(b, hold)] += res["times"]
                blas = res["blas"]
        rows = []
        for b in batches:
            held, free = Timing.from_samples(epochs[(b, True)]), Timing.from_samples(epochs[(b, False)])
            rows.append([b, str(held), str(free), f"{free.median / held.median:.2f}"])
        parts.append(f"## {n} torch thread(s)\n\nNumPy's BLAS when not held: {blas} thread(s).")
        parts.append(markdown_table(["batch", f"epoch, {HOLD}: median [min–max]", f"epoch, {AS_SET}",
                                     f"{AS_SET} ÷ {HOLD}"], rows, align="rrrr"))  # fmt: skip
    parts.append(closing_line(start))
    machine = machine_info("numpy", "threadpoolctl") + f"\n- {code_state()}"
    publish("NumPy's BLAS threads in odeflux's kernels", parts, machine, "benchmarks.blas_threads", argv,
            args.out, write=not (args.no_write or args.quick))  # fmt: skip
    return {}

if __name__ == "__main__":
    main()
