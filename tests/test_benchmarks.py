"""The benchmarks run (a smoke run of each); their numbers live in benchmarks/results/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import Timing, interleaved, markdown_table, write_result

ROOT = Path(__file__).resolve().parents[1]


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
def test_every_benchmark_smoke_runs():
    """`python -m benchmarks.run_all --quick`: each benchmark end to end on tiny settings (peers
    that are not installed, diffrax here, are reported as not measured)."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.run_all", "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Failed:" not in out.stdout


@pytest.mark.slow
def test_general_benchmark_smoke_runs():
    """`python -m benchmarks.general --quick`: every workload and configuration on tiny sizes, end to
    end (diffrax on the Lotka-Volterra workload only, when it is installed); nothing is written."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.general", "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for workload in ("mlp", "conv", "lv", "lv-batch"):
        assert f"## {workload}:" in out.stdout
    assert "written to" not in out.stdout
