"""Killed runs resume to the same final weights as a run never stopped.

Runs are real ``python -m odeflux train`` subprocesses, SIGKILLed at exact points by the test hook
``ODEFLUX_TEST_KILL_AT`` (see odeflux.mnist.killhook.TEST_KILL_ENV): between epochs, in the middle
of one, and halfway through writing a checkpoint. The reference run is the same command run in
this process (same code, one thread, the CPU).
"""

import os
import signal
import subprocess
import sys

import pytest
import torch

from odeflux.cli import main
from odeflux.mnist.checkpoint import is_intact, load_checkpoint
from odeflux.mnist.killhook import TEST_KILL_ENV
from odeflux.mnist.metrics import read_metrics

# 300 images: 270 to train on in 3 batches of <= 128 per epoch, 30 to test.
ARGS = ["--n-samples", "300", "--epochs", "3", "--device", "cpu", "--seed", "7"]


def _odeflux(*argv: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != TEST_KILL_ENV}
    if kill_at:
        env[TEST_KILL_ENV] = kill_at
    return subprocess.run([sys.executable, "-m", "odeflux", *argv], capture_output=True, text=True, env=env, timeout=300)


def _killed(proc: subprocess.CompletedProcess) -> bool:
    return proc.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run's last checkpoint and metrics."""
    run = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", *ARGS, "--run-dir", str(run)]) == 0
    return load_checkpoint(run), read_metrics(run / "metrics.jsonl")


def _assert_same_run(run, reference):
    ref, ref_metrics = reference
    got = load_checkpoint(run)
    assert got.epoch == 3
    assert got.model.keys() == ref.model.keys()
    for k in ref.model:
        assert torch.equal(got.model[k], ref.model[k]), k
    for i, state in ref.optimizer["state"].items():
        for k, v in state.items():
            assert torch.equal(got.optimizer["state"][i][k], v), k
    metrics = read_metrics(run / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    strip = lambda ms: [{k: v for k, v in m.items() if k != "time_s"} for m in ms]
    assert strip(metrics) == strip(ref_metrics) == strip(got.history)


def test_killed_between_epochs_resumes_to_the_same_weights(tmp_path, reference):
    run = tmp_path / "run"
    first = _odeflux("train", *ARGS, "--run-dir", str(run), kill_at="epoch:2")
    assert _killed(first), first.stderr
    assert len(first.stdout.splitlines()) == 2
    assert load_checkpoint(run).epoch == 2 and load_checkpoint(run / "prev.pt").epoch == 1
    resumed = _odeflux("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert [l.split("]")[0] for l in resumed.stdout.splitlines()] == ["[3/3"]
    _assert_same_run(run, reference)


def test_killed_mid_epoch_and_mid_checkpoint_resumes_to_the_same_weights(tmp_path, reference):
    run = tmp_path / "run"
    # 1. Killed halfway through writing epoch 2's checkpoint: epoch 1's is intact, the new one partial.
    first = _odeflux("train", *ARGS, "--run-dir", str(run), kill_at="checkpoint:2")
    assert _killed(first), first.stderr
    assert is_intact(run / "last.pt") and load_checkpoint(run).epoch == 1
    partial = list(run.glob(".last.pt.tmp-*"))
    assert len(partial) == 1 and not is_intact(partial[0])
    assert len(read_metrics(run / "metrics.jsonl")) == 2  # epoch 2's record, ahead of its checkpoint
    # 2. Resumed, then killed in the middle of epoch 2 (after 2 of its 3 batches).
    second = _odeflux("train", "--resume", str(run), kill_at="batch:2")
    assert _killed(second), second.stderr
    assert second.stdout == ""
    assert load_checkpoint(run).epoch == 1 and not list(run.glob(".*.tmp-*"))
    assert [m["epoch"] for m in read_metrics(run / "metrics.jsonl")] == [1]  # rewritten from the checkpoint
    # 3. Resumed to the end.
    third = _odeflux("train", "--resume", str(run))
    assert third.returncode == 0, third.stderr
    assert [l.split("]")[0] for l in third.stdout.splitlines()] == ["[2/3", "[3/3"]
    _assert_same_run(run, reference)


def test_a_corrupt_last_checkpoint_points_to_the_previous_one(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--n-samples", "200", "--epochs", "2", "--device", "cpu", "--sensealg", "direct"]
    assert main([*args, "--run-dir", str(run)]) == 0
    last = run / "last.pt"
    last.write_bytes(last.read_bytes()[:-100])  # a partial copy
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "corrupt or partial" in err and str(run / "prev.pt") in err
    # The fix works: continue from the previous checkpoint; the bad file is set aside, not rotated into prev.pt.
    assert main(["train", "--resume", str(run / "prev.pt"), "--epochs", "3"]) == 0
    out, _ = capsys.readouterr()
    assert [l.split("]")[0] for l in out.splitlines()] == ["[2/3", "[3/3"]
    assert load_checkpoint(run).epoch == 3 and load_checkpoint(run / "prev.pt").epoch == 2
    assert (run / "last.pt.corrupt").exists()
