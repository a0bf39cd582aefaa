"""The benchmarks run (a smoke run of each); their numbers live in benchmarks/results/."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.common import Timing, interleaved, markdown_table, write_result

ROOT = Path(__file__).resolve().parents[1]

# The smoke runs: test name -> (benchmark module, its arguments). They run one after the other in
# one process (one start-up of Python, torch and the peers for all of them, as benchmarks.run_all
# runs its benchmarks), in this order, each from the process's default torch thread count.
SMOKE = {
    # (profile_small is left out: all it times is the compiled gradient, whose programs take a
    # minute to build cold; tests/test_compiled_reverse.py checks them.)
    "test_every_benchmark_smoke_runs": ("run_all", ["--quick", "--skip", "stiff_work_precision",
                                                    "--skip", "gradient_work_precision", "--skip", "profile_small"]),
    "test_stiff_work_precision_smoke_runs": ("stiff_work_precision", ["--quick"]),
    "test_gradient_work_precision_smoke_runs": ("gradient_work_precision", ["--quick", "--only", "tutorial_doubled",
                                                                            "--only", "cnf_exact"]),
    # (Its eager configurations only: the compiled per-sample gradient's programs take a minute to
    # build cold, and tests/test_compiled_reverse.py checks them against the recorded loop.)
    "test_per_sample_torchode_smoke_runs": ("per_sample_torchode", ["--quick", "--sensealg", "DirectAdjoint"]),
    "test_general_benchmark_smoke_runs": ("general", ["--quick", "--threads", "1"]),
}  # fmt: skip
# Runs each "<name> <out> <args...>" (a JSON list of them in argv[1]) as `python -m benchmarks.<name>
# <args...>` would: its stdout and stderr (file descriptors 1 and 2: subprocesses' output too) to
# <out>.stdout and <out>.stderr, its exit status to <out>.rc (run_all's: main's return value; the
# others': 0 unless main raises; SystemExit's code; 1 with the traceback on stderr for an exception).
RUNNER = """
import importlib, json, os, sys, traceback, torch
threads = torch.get_num_threads()
for name, out, args in json.loads(sys.argv[1]):
    torch.set_num_threads(threads)
    sys.stdout.flush(); sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(out + ".stdout", "w") as o, open(out + ".stderr", "w") as e:
        os.dup2(o.fileno(), 1); os.dup2(e.fileno(), 2)
        try:
            ret = importlib.import_module("benchmarks." + name).main(args)
            code = (ret or 0) if name == "run_all" else 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(saved[0], 1); os.dup2(saved[1], 2)
    os.close(saved[0]); os.close(saved[1])
    with open(out + ".rc", "w") as f:
        f.write(str(code))
"""


@pytest.fixture(scope="module")
def smoke(request, tmp_path_factory):
    """The smoke runs of the benchmarks whose tests this session selected, in one process (see
    RUNNER): -> {test name: (exit status, stdout, stderr)}; a run that never finished (its process
    died) has no exit status and the process's own output for stderr."""
    wanted = {item.originalname for item in request.session.items if getattr(item, "module", None) is request.module}
    names = [t for t in SMOKE if t in wanted]
    out = tmp_path_factory.mktemp("smoke")
    jobs = [(SMOKE[t][0], str(out / t), SMOKE[t][1]) for t in names]
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(jobs)], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800)  # fmt: skip
    results = {}
    for t in names:
        rc = out / f"{t}.rc"
        if rc.exists():
            results[t] = int(rc.read_text()), (out / f"{t}.stdout").read_text(), (out / f"{t}.stderr").read_text()
        else:
            results[t] = None, "", f"(exit {proc.returncode})\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
    return results


def _smoke_run(smoke, test: str) -> str:
    """The stdout of ``test``'s smoke run, which must have exited with status 0."""
    code, stdout, stderr = smoke[test]
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    return stdout


def test_interleaved_rounds_time_every_configuration():
    calls: list[str] = []
    out = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=4, warmup=1)
    assert set(out) == {"a", "b"} and all(isinstance(t, Timing) for t in out.values())
    assert calls.count("a") == calls.count("b") == 5  # one warm-up and four timed calls each
    assert calls[2:4] == ["a", "b"] and calls[4:6] == ["b", "a"]  # rotated order, round by round


def test_markdown_table_and_atomic_write(tmp_path):
    text = markdown_table(["x", "y"], [[1, 2.5], ["a", "b"]])
    assert text.splitlines()[0].count("|") == 3 and "2.5" in text
    with pytest.raises(ValueError):
        markdown_table(["x", "y"], [[1]])
    path = tmp_path / "r.md"
    write_result(path, text)
    assert path.read_text() == text and not list(tmp_path.glob("*.tmp*"))


@pytest.mark.slow
def test_every_benchmark_smoke_runs(smoke):
    """`python -m benchmarks.run_all --quick`: each benchmark end to end on tiny settings (peers
    that are not installed, diffrax here, are reported as not measured). The two with smoke tests
    of their own below are left out here, so each runs once in the suite."""
    stdout = _smoke_run(smoke, "test_every_benchmark_smoke_runs")
    assert "Failed:" not in stdout


@pytest.mark.slow
def test_general_benchmark_smoke_runs(smoke):
    """`python -m benchmarks.general --quick`: every workload and configuration on tiny sizes, end to
    end (diffrax on the Lotka-Volterra workload only, when it is installed); nothing is written. One
    torch thread: at the default two, the tiny ops of the smoke sizes mostly wait for the second
    thread on a loaded 2-core machine (the mlp and conv workloads took 30 s each instead of 1)."""
    stdout = _smoke_run(smoke, "test_general_benchmark_smoke_runs")
    for workload in ("mlp", "conv", "lv", "lv-batch"):
        assert f"## {workload}:" in stdout
    assert "written to" not in stdout


def test_work_precision_compares_curves_at_equal_error():
    from benchmarks.work_precision import Point, compare, frontier

    a = [Point(1e-3, 100, 1e-3), Point(1e-4, 200, 1e-4), Point(1e-5, 400, 1e-5)]
    b = [Point(p.tol, 2 * p.nfe, p.err) for p in a]
    ratio, decades = compare(b, a)
    assert abs(ratio - 2.0) < 1e-9 and abs(decades - 2.0) < 1e-9
    # A point that costs more and ends less accurate than another is off the frontier; failures too.
    worse = a + [Point(1e-6, 300, 2e-3), Point(1e-7, 50, float("inf"), failed="DT_MIN")]
    assert len(frontier(worse)) == 3
    assert compare([Point(1e-3, 10, 1.0), Point(1e-4, 20, 0.5)], a) is None  # no common error range


def test_work_precision_controllers_follow_their_references():
    from benchmarks.work_precision import DiffraxPID, LimitedPID

    c = DiffraxPID()
    ok, dt, state = c.propose(1.0, 0.99, c.init_state(), 5)
    assert ok and dt == 1.0 and state[0] == 1 / 0.99  # an accepted step never shrinks the next (diffrax)
    ok, dt, state2 = c.propose(1.0, 1.0, state, 5)
    assert not ok and dt == 0.9 and state2 == state  # err < 1 to keep; a rejection shrinks by the safety at least
    h = LimitedPID()  # H211PI as OrdinaryDiffEq's PIDController: the limited factor decides acceptance
    ok, dt, _ = h.propose(1.0, 10.0, h.init_state(), 5)
    assert ok and 0.81 < dt < 1.0


def test_stiff_work_precision_compares_time_at_equal_error():
    from benchmarks.common import Timing
    from benchmarks.stiff_work_precision import Point, best_of, compare, rel_err

    def pt(rtol, seconds, err):
        return Point(rtol, err=err, time=Timing.from_samples([seconds]))

    a = [pt(1e-4, 0.01, 1e-4), pt(1e-6, 0.02, 1e-6), pt(1e-8, 0.04, 1e-8)]
    b = [pt(p.rtol, 3 * p.time.median, p.err) for p in a]
    ratio, decades = compare(b, a)
    assert abs(ratio - 3.0) < 1e-9 and abs(decades - 4.0) < 1e-9
    failed = Point(1e-9, failed="MAX_STEPS")  # no time, infinite error: off the frontier
    assert compare(b + [failed], a) == (ratio, decades)
    assert best_of({"a": a, "b": b}, ["a", "b"]) == "a"
    assert rel_err([[1.0, 2.2]], [[1.0, 2.0]]) == pytest.approx(0.1)


@pytest.mark.slow
def test_stiff_work_precision_smoke_runs(smoke):
    """`python -m benchmarks.stiff_work_precision --quick` (about 15 s: rtol 1e-4, one repeat, diffrax
    on ROBER when installed); nothing is written."""
    stdout = _smoke_run(smoke, "test_stiff_work_precision_smoke_runs")
    for title in ("## ROBER", "## HIRES", "## Summary"):
        assert title in stdout
    assert "written to" not in stdout


def test_gradient_work_precision_weights_and_errors():
    from benchmarks.gradient_work_precision import GradPoint, rel_err

    p = GradPoint(1e-3, 0, 0.1, fwd=10, bwd=4, vjps=4)
    assert p.total() == 18 and p.total(2) == 22
    assert p.weighted(2).nfe == 22 and p.weighted(2).err == 0.1
    assert rel_err(torch.tensor([1.0, 2.0, 2.0]), torch.tensor([1.0, 2.0, 2.5])) == pytest.approx(0.5 / 11.25**0.5)


def test_gradient_work_precision_smoke_runs(smoke):
    """`python -m benchmarks.gradient_work_precision --quick` on two small fields (a few seconds: two
    tolerances, every configuration, a loose reference); nothing is written."""
    stdout = _smoke_run(smoke, "test_gradient_work_precision_smoke_runs")
    for title in ("## Summary", "## Gradient error per tolerance", "## (a)", "## (f)"):
        assert title in stdout
    assert "failed (" not in stdout  # no configuration fails on these fields
    assert "written to" not in stdout


def test_small_systems_targets_come_from_the_numbers():
    from benchmarks.common import Timing
    from benchmarks.small_systems import Row, targets

    def row(name, kind, key, ms, grad_diff=0.0, compiled=False):
        return Row(name, kind, key, compiled, timing=Timing.from_samples([ms / 1e3]), grad_diff=grad_diff)

    spiral = [
        row("odeflux eager InterpolatingAdjoint", "gradient", "InterpolatingAdjoint", 3.0),
        row("odeflux compiled DirectAdjoint", "gradient", "DirectAdjoint", 0.5, grad_diff=0.9, compiled=True),
        row("odeflux eager DirectAdjoint", "gradient", "DirectAdjoint", 1.5),
        row("diffrax RecursiveCheckpointAdjoint (jit)", "gradient", "checkpoint", 1.0),
    ]
    lv = [row("odeflux eager DirectAdjoint", "gradient", "DirectAdjoint", 0.9),
          row("diffrax BacksolveAdjoint (jit)", "gradient", "backsolve", 1.0)]
    text, data = targets({"spiral": spiral, "lv": lv}, {"spiral": 0.1, "lv": 1e-4},
                         {"spiral": ("InterpolatingAdjoint", "DirectAdjoint")})
    # The wrong (fast) gradient does not count, even as compile=True's default ("auto" picks
    # DirectAdjoint): 1.5 ÷ 1.0 is not met; 3.0 ÷ 1.0 ≤ 2 is not met; lv 0.9 is met.
    assert [(d["workload"], d["which"], round(d["ratio"], 2), d["met"]) for d in data] == [
        ("spiral", "fastest", 1.5, False), ("spiral", "default", 3.0, False), ("lv", "fastest", 0.9, True)]
    assert text.count("not met") == 2


def test_per_sample_torchode_goal_counts_only_comparable_gradients():
    from benchmarks.common import Timing
    from benchmarks.per_sample_torchode import Result, goal_rows

    def res(name, kind, ms, state, grad, factor=1):
        return Result(name, kind, factor=factor, sensealg="DirectAdjoint" if "odeflux" in name else "",
                      timing=Timing.from_samples([ms / 1e3]), state_err=state, grad_err=grad)  # fmt: skip

    rows = goal_rows("w", [
        res("odeflux per sample, DirectAdjoint", "odeflux per sample", 4.0, 1e-6, 1e-6),
        res("odeflux per sample, DirectAdjoint, rtol 3e-3", "odeflux per sample", 3.0, 1e-5, 1e-5, factor=3),
        res("torchode per sample, AutoDiffAdjoint", "torchode per sample", 10.0, 2e-5, 2e-5),
        res("torchode per sample, BacksolveAdjoint", "torchode per sample", 1.0, 2e-5, float("inf")),
    ])  # fmt: skip
    # The backsolve's infinite gradient error keeps it out; at matched accuracy the looser row counts.
    assert [(r[2].split(" (")[0], r[4].split()[0], r[6]) for r in rows] == [
        ("same tolerances", "0.40", "met"), ("matched accuracy: rtol 3e-3", "0.30", "met")]
    assert "BacksolveAdjoint" in rows[0][7]


def test_per_sample_torchode_smoke_runs(smoke):
    """`python -m benchmarks.per_sample_torchode --quick --sensealg DirectAdjoint` (a few seconds: 8
    random images, 4 oscillators over [0, 0.2], one round, odeflux eagerly); nothing is written."""
    stdout = _smoke_run(smoke, "test_per_sample_torchode_smoke_runs")
    for title in ("## tutorial:", "## vdp:", "## Goal (issue 16)"):
        assert title in stdout
    assert "| failed:" not in stdout and "written to" not in stdout
