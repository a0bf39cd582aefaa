"""Run every benchmark, one after the other, and summarise the speed targets (issue 5).

    python -m benchmarks.run_all                 # all; writes benchmarks/results/*.md and targets.md
    python -m benchmarks.run_all --quick         # smoke run of each, prints only
    python -m benchmarks.run_all --only tutorial_epoch --only whole_run

About 5 minutes on a 2-core machine (diffrax's start-ups and JIT compilations take a good part), and
about 1.5-3 more for work_precision (f evaluations, not time; its float64 references take most) and
about 1.5 more for stiff_work_precision, about 6-10 more for gradient_work_precision (its conv field's
float64 reference and time_mlp_x3 take most), about 2-3 more for per_sample and about 18 more for
small_systems (its torch.compile cold/warm probes in fresh processes take most). A benchmark that fails is reported and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

from .common import closing_line, machine_info, result_document, write_result
from .provenance import code_state
from .targets import Target, targets_table

RESULTS = Path(__file__).parent / "results"
# name -> arguments of a full run (each benchmark's defaults unless said otherwise)
BENCHMARKS: dict[str, list[str]] = {
    "solver_step": [],
    "adjoint_step": [],
    "tutorial_epoch": [],
    "whole_run": [],
    "full_mnist": [],
    "blas_threads": [],
    "profile_default": [],
    "work_precision": [],
    "stiff_work_precision": [],
    "gradient_work_precision": [],
    "per_sample": [],
    "stiff_batch": [],
    "small_systems": [],
    "profile_small": [],
    "adjoint_first_step": [],
    "compiled_crossover": [],
}
# solver_step has no --quick: its smoke run is a short budget without writing.
QUICK = {"solver_step": ["--rounds", "3", "--budget", "2", "--no-write"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a smoke run of each benchmark; nothing is written")
    p.add_argument("--only", action="append", choices=list(BENCHMARKS), help="run just these (repeatable)")
    p.add_argument("--skip", action="append", choices=list(BENCHMARKS), default=[], help="leave these out")
    args = p.parse_args(argv)
    names = [n for n in (args.only or BENCHMARKS) if n not in args.skip]
    machine = machine_info("torchdiffeq", "torchode", "jax", "diffrax", "optax") + f"\n- {code_state()}"
    start = time.perf_counter()
    targets: list[Target] = []
    failed: list[str] = []
    durations: dict[str, float] = {}
    for name in names:
        bench_argv = QUICK.get(name, ["--quick"]) if args.quick else BENCHMARKS[name]
        print(f"== {name} {' '.join(bench_argv)} (load {os.getloadavg()[0]:.2f})", flush=True)
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            out = module.main(bench_argv)
        except Exception:  # one broken benchmark must not hide the others' results
            traceback.print_exc()
            failed.append(name)
            continue
        finally:
            durations[name] = time.perf_counter() - t0
        if isinstance(out, dict):
            targets += out.get("targets", [])
        print(f"== {name}: {durations[name]:.0f} s", flush=True)

    total = time.perf_counter() - start
    lines = [
        "Issue 5's targets, each a ratio measured side by side in one run (same model, data, tolerances "
        "and float32); see each benchmark's results file for the method and the full tables: "
        "[tutorial_epoch](tutorial_epoch.md) (targets 1, 2), [whole_run](whole_run.md) (3), "
        "[full_mnist](full_mnist.md) (4), [adjoint_step](adjoint_step.md) (6: its memory table). "
        "PASS/FAIL is judged on the ratio of the medians.",
        targets_table(targets) if targets else "No targets were measured.",
        "Target 6 (continuous adjoints keep memory flat in the number of steps) is a test, not a ratio; "
        "adjoint_step.md's memory table shows which methods do.",
        "Durations: " + ", ".join(f"{n} {d:.0f} s" for n, d in durations.items()) + f"; total {total:.0f} s. " + closing_line(),
    ]
    if failed:
        lines.append(f"Failed: {', '.join(failed)} (see the run's output).")
    doc = result_document("Speed targets (issue 5)", "\n\n".join(lines), machine=machine)
    print(doc)
    if not args.quick and not args.only:
        print(f"written to {write_result(RESULTS / 'targets.md', doc)}")
    elif not args.quick and targets:
        print("(targets.md is written by full runs only)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
