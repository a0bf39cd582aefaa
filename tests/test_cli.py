"""The ``odeflux`` command line: argument errors, ``info``, a short ``train``."""

import argparse
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch
from conftest import run_cli

import odeflux

LINE = re.compile(r"^\[(\d+)/(\d+)\] \t Time \d+\.\d\ds \t Training Accuracy: \d+\.\d\d% \t Test Accuracy: \d+\.\d\d%$")


@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "--epochs", "-1"], ["--epochs", "positive integer", "-1"]),
        (["train", "--epochs", "three"], ["--epochs", "positive integer"]),
        (["train", "--batch-size", "0"], ["--batch-size", "positive integer"]),
        (["train", "--train-split", "1.5"], ["--train-split", "between 0 and 1"]),
        (["train", "--train-split", "0"], ["--train-split", "between 0 and 1"]),
        (["train", "--n-samples", "70000"], ["--n-samples", "60000", "'all'"]),
        (["train", "--n-samples", "1"], ["--n-samples", "at least 2"]),
        (["train", "--n-samples", "2", "--train-split", "0.1"], ["--n-samples", "train set empty"]),
        (["train", "--rtol", "0"], ["--rtol", "positive"]),
        (["train", "--atol=-1e-3"], ["--atol", "positive"]),
        (["train", "--lr", "nan"], ["--lr", "positive"]),
        (["train", "--seed", "-3"], ["--seed", "non-negative"]),
        (["train", "--threads", "0"], ["--threads", "positive integer"]),
        (["train", "--sensealg", "reversediff"], ["--sensealg", "invalid choice", "interpolating"]),
        (["train", "--vjp", "zygote"], ["--vjp", "invalid choice"]),
        (["train", "--solver", "euler"], ["--solver", "invalid choice", "tsit5"]),
        (["train", "--params", "namedtuple"], ["--params", "invalid choice"]),
        (["train", "--adjoint-first-step", "largest"], ["--adjoint-first-step", "invalid choice", "hairer"]),
        (["train", "--bogus"], ["unrecognized arguments", "--bogus"]),
        (["train", "--model", "resnet"], ["--model", "invalid choice", "tutorial"]),
        (["train", "--model", "odenet", "--width", "0"], ["--width", "positive integer"]),
        (["train", "--width", "16"], ["--width", "--model odenet"]),
        (["train", "--pooled-head"], ["--pooled-head", "--model odenet"]),
        (["train", "--per-sample", "--model", "odenet"], ["--per-sample", "--model odenet"]),
        (["train", "--per-sample", "--vjp", "compile"], ["--per-sample", "--vjp func"]),
        (["train", "--resume", "somewhere", "--run-dir", "elsewhere"], ["--resume", "drop --run-dir"]),
        (["evaluate"], ["CHECKPOINT"]),
        (["evaluate", "ckpt", "--split", "validation"], ["--split", "invalid choice"]),
        (["predict", "ckpt"], ["IMAGE"]),
        (["frobnicate"], ["unrecognized arguments", "frobnicate"]),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(argv, words, capsys):
    code, out, err = run_cli(argv, capsys)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("odeflux")
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0]


def _train_choices() -> dict[str, tuple]:
    """The ``train`` subcommand's choice lists, by destination."""
    from odeflux.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {a.dest: tuple(a.choices) for a in sub.choices["train"]._actions if a.choices is not None}


def test_train_choices_are_the_registries_keys():
    from odeflux.sensitivity.base import ADJOINT_FIRST_STEPS as FIRST_STEPS
    from odeflux.mnist.devices import DEVICES
    from odeflux.mnist.model import ARCHS, PARAM_STRUCTURES
    from odeflux.mnist.schedule import LR_SCHEDULES
    from odeflux.sensitivity import SENSEALGS
    from odeflux.sensitivity.vjp import VJP_BACKENDS
    from odeflux.solvers import SOLVERS

    choices = _train_choices()
    assert choices["sensealg"] == tuple(SENSEALGS)
    assert choices["vjp"] == tuple(VJP_BACKENDS)
    assert choices["solver"] == tuple(name for name, cls in SOLVERS.items() if cls().adaptive and cls.stepwise)
    assert "scipy_solver" not in choices["solver"] and "explicit_adams" not in choices["solver"]
    assert set(choices["solver"]) >= {"tsit5", "dopri5"} and "euler" not in choices["solver"]
    assert choices["adjoint_first_step"] == tuple(FIRST_STEPS)  # (every first step the continuous adjoints take)
    assert (choices["model"], choices["params"], choices["device"]) == (ARCHS, PARAM_STRUCTURES, DEVICES)
    assert choices["lr_schedule"] == LR_SCHEDULES


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_cuda_without_gpu_is_a_one_line_error(capsys):
    code, out, err = run_cli(["train", "--device", "cuda", "--epochs", "1"], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "--device cuda" in err and "--device cpu" in err


def test_data_errors_exit_1_with_one_line(tmp_path, capsys):
    code, out, err = run_cli(["train", "--device", "cpu", "--epochs", "1", "--data-dir", str(tmp_path / "nowhere")], capsys)
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "nowhere" in err and "--data-dir" in err


def test_info_reports_versions_threads_and_devices(capsys):
    code, out, err = run_cli(["info"], capsys)
    assert code == 0 and err == ""
    assert f"odeflux {odeflux.__version__}" in out
    assert f"Python {platform.python_version()}" in out
    assert f"torch {torch.__version__}" in out
    assert f"numpy {numpy.__version__}" in out
    assert f"Threads: {torch.get_num_threads()} intra-op" in out
    assert platform.system() in out
    assert "Devices: cpu" in out
    if torch.cuda.is_available():
        assert torch.cuda.get_device_name(0) in out and f"CUDA runtime {torch.version.cuda}" in out
    else:
        assert "CUDA: not available" in out


def test_short_train_prints_the_epoch_lines(capsys):
    code, out, err = run_cli(
        ["train", "--device", "cpu", "--sensealg", "direct", "--epochs", "2", "--n-samples", "300", "--params", "tree"],
        capsys,
    )
    assert code == 0, err
    lines = out.strip().splitlines()
    assert [LINE.match(l).group(1, 2) for l in lines] == [("1", "2"), ("2", "2")]


def test_per_sample_training_prints_the_epoch_lines(capsys):
    """`--per-sample`: each image's ODE its own problem (issue 16), with the default adjoint (the
    interpolating adjoint, its first step a try at each whole interval)."""
    code, out, err = run_cli(["train", "--per-sample", "--epochs", "1", "--n-samples", "200"], capsys)
    assert code == 0, err
    assert [LINE.match(l).group(1, 2) for l in out.strip().splitlines()] == [("1", "1")]


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "odeflux", "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"odeflux {odeflux.__version__}"


# --- run directories, resuming, progress ---------------------------------------------------------

SHORT = ["train", "--device", "cpu", "--sensealg", "direct", "--epochs", "2", "--n-samples", "200"]


def test_the_default_run_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(SHORT, capsys)
    assert code == 0 and err == ""
    assert len(out.strip().splitlines()) == 2 and all(LINE.match(l) for l in out.strip().splitlines())
    assert list(tmp_path.iterdir()) == []


def test_run_dir_without_a_value_goes_under_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli([*SHORT, "--run-dir"], capsys)
    assert code == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"\d{8}-\d{6}(-\d+)?", run.name)
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "curves.png", "last.pt", "metrics.jsonl", "prev.pt"]
    assert str(Path("runs") / run.name) in err and all(LINE.match(l) for l in out.strip().splitlines())


def test_progress_bars_go_to_stderr_only(tmp_path, capsys):
    code, out, err = run_cli([*SHORT, "--progress"], capsys)
    assert code == 0
    assert all(LINE.match(l) for l in out.strip().splitlines()) and len(out.strip().splitlines()) == 2
    assert "epoch 1/2" in err and "batch" in err


def test_run_dir_problems_are_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, out, err = run_cli([*SHORT, "--run-dir", str(tmp_path / "file")], capsys)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "is a file" in err
    code, out, err = run_cli(["train", "--resume", str(tmp_path / "nothing-here")], capsys)
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and "does not exist" in err


def test_adjoint_first_step_reaches_the_model_and_stays_with_the_run(tmp_path, capsys):
    from odeflux.mnist.checkpoint import load_checkpoint

    run = tmp_path / "run"
    argv = ["train", "--device", "cpu", "--epochs", "1", "--n-samples", "200", "--adjoint-first-step", "forward"]
    code, _, err = run_cli([*argv, "--run-dir", str(run)], capsys)
    assert code == 0, err
    assert load_checkpoint(run / "last.pt").config["adjoint_first_step"] == "forward"
    code, _, err = run_cli(["train", "--resume", str(run), "--epochs", "2", "--adjoint-first-step", "interval"], capsys)
    assert code == 2 and "--adjoint-first-step" in err and "keeps its configuration" in err


def test_resume_keeps_the_runs_configuration(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli([*SHORT, "--run-dir", str(run)], capsys)[0] == 0
    code, out, err = run_cli([*SHORT, "--run-dir", str(run)], capsys)  # the same directory again
    assert code == 2 and "--resume" in err
    code, out, err = run_cli(["train", "--resume", str(run), "--lr", "0.5"], capsys)
    assert code == 2 and out == "" and "--lr" in err and "keeps its configuration" in err
    code, out, err = run_cli(["train", "--resume", str(run)], capsys)  # finished: nothing to do
    assert code == 0 and out == "" and "--epochs" in err
    code, out, err = run_cli(["train", "--resume", str(run), "--epochs", "3", "--sensealg", "direct"], capsys)
    assert code == 0, err  # a flag equal to the run's own value is fine
    assert [LINE.match(l).group(1, 2) for l in out.strip().splitlines()] == [("3", "3")]


ODENET = ["train", "--device", "cpu", "--model", "odenet", "--width", "4", "--sensealg", "direct", "--params", "tree",
          "--n-samples", "200", "--batch-size", "64", "--lr", "3e-3"]  # fmt: skip


def test_odenet_width_and_pooled_head_train_and_stay_with_the_run(tmp_path, capsys):
    from odeflux.mnist.checkpoint import load_checkpoint
    from odeflux.mnist.metrics import read_metrics

    run = tmp_path / "run"
    code, out, err = run_cli([*ODENET, "--pooled-head", "--epochs", "1", "--run-dir", str(run)], capsys)
    assert code == 0, err
    assert [LINE.match(l).group(1, 2) for l in out.strip().splitlines()] == [("1", "1")]
    ckpt = load_checkpoint(run)
    assert (ckpt.config["arch"], ckpt.config["width"], ckpt.config["pooled_head"]) == ("odenet", 4, True)
    assert ckpt.model["head.4.weight"].shape == (10, 4)  # the pooled head: Linear(width -> 10)
    code, _, err = run_cli(["train", "--resume", str(run), "--epochs", "2", "--width", "8"], capsys)
    assert code == 2 and "--width" in err and "keeps its configuration" in err
    code, out, err = run_cli(["train", "--resume", str(run), "--epochs", "2"], capsys)
    assert code == 0, err
    assert [LINE.match(l).group(1, 2) for l in out.strip().splitlines()] == [("2", "2")]
    assert load_checkpoint(run).config["pooled_head"] is True
    losses = [m["mean_loss"] for m in read_metrics(run / "metrics.jsonl")]
    assert len(losses) == 2 and losses[1] < losses[0]


def test_the_odenet_script_is_odeflux_train_with_presets(tmp_path, monkeypatch, capsys):
    import runpy

    from odeflux.mnist.checkpoint import load_checkpoint

    script = Path(__file__).resolve().parents[1] / "scripts" / "odenet_full_mnist.py"
    run = tmp_path / "run"
    argv = ["--n-samples", "200", "--epochs", "1", "--width", "4", "--device", "cpu", "--run-dir", str(run)]
    monkeypatch.setattr(sys, "argv", [str(script), *argv])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(script), run_name="__main__")
    out, err = capsys.readouterr()
    assert exit_.value.code == 0, err
    assert [LINE.match(l).group(1, 2) for l in out.strip().splitlines()] == [("1", "1")]
    config = load_checkpoint(run).config
    presets = {"arch": "odenet", "sensealg": "direct", "params": "tree"}
    assert {k: config[k] for k in presets} == presets
    assert (config["n_samples"], config["epochs"], config["width"]) == (200, 1, 4)  # flags given win

