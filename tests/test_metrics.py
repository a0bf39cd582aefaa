"""Metrics on disk: the JSONL log of a run (one record per epoch) and the PNG plots, read back."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from odeflux.mnist.config import TrainConfig
from odeflux.mnist.data import load_mnist
from odeflux.mnist.metrics import FIELDS, MetricsLog, plot_confusion_matrix, plot_learning_curves, read_metrics
from odeflux.mnist.train import train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _read_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        meta = json.loads(im.text["odeflux"])
        pixels = np.asarray(im.convert("L"), dtype=np.float64)
        size = im.size
    return meta, pixels, size


def _records(n: int, shift: float = 0.0) -> list[dict]:
    return [
        {"epoch": e, "time_s": 0.1, "train_accuracy": 0.5 + 0.04 * e + shift, "test_accuracy": 0.45 + 0.04 * e,
         "mean_loss": 2.0 / e, "f_evals_forward": 26.0, "f_evals_backward": 30.0 + e, "lr": 1e-3}
        for e in range(1, n + 1)
    ]  # fmt: skip


def test_metrics_log_appends_and_resets(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    log.reset()
    recs = _records(3)
    for r in recs:
        log.append(r)
    assert read_metrics(log.path) == recs
    log.reset(recs[:1])  # a resumed run drops what came after its checkpoint
    assert read_metrics(log.path) == recs[:1]
    log.append({"epoch": 2, "mean_loss": float("nan")})  # JSON has no NaN: written as null
    assert read_metrics(log.path)[-1] == {"epoch": 2, "mean_loss": None}


def test_malformed_metrics_name_the_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"epoch": 1}\n{"epoch": 2, \n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2"):
        read_metrics(path)


def test_learning_curves_png_holds_the_plot(tmp_path):
    path = plot_learning_curves(_records(4), tmp_path / "curves.png", title="test")
    meta, pixels, size = _read_png(path)
    assert meta == {"kind": "learning-curves", "epochs": [1, 2, 3, 4]}
    assert size == (1200, 360)
    assert pixels.std() > 10  # not blank
    # The pixels follow the data: other numbers, another picture.
    _, other, _ = _read_png(plot_learning_curves(_records(4, shift=0.2), tmp_path / "other.png", title="test"))
    assert np.abs(other - pixels).mean() > 0.01
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "other.png"]  # no temporary files


def test_confusion_matrix_png_holds_the_matrix(tmp_path):
    rng = np.random.default_rng(0)
    matrix = (rng.integers(0, 5, (10, 10)) + np.diag(rng.integers(20, 60, 10))).tolist()
    labels = [f"c{i}" for i in range(10)]
    meta, pixels, size = _read_png(plot_confusion_matrix(matrix, tmp_path / "cm.png", labels=labels, title="t"))
    assert meta["kind"] == "confusion-matrix" and meta["labels"] == labels
    assert meta["matrix"] == matrix and len(meta["matrix"]) == 10 and all(len(r) == 10 for r in meta["matrix"])
    assert size == (700, 600)
    assert pixels.std() > 10


@pytest.mark.parametrize("matrix", [[], [[1, 2], [3]], [[1, 2, 3]]])
def test_confusion_matrix_must_be_square(tmp_path, matrix):
    with pytest.raises(ValueError, match="square"):
        plot_confusion_matrix(matrix, tmp_path / "cm.png")
    assert not (tmp_path / "cm.png").exists()


def test_a_run_directory_gets_one_record_per_epoch_and_the_curves(tmp_path):
    x, y = load_mnist("train", n=256)
    config = TrainConfig(sensealg="direct", device="cpu", epochs=2, batch_size=64, lr=3e-3)
    res = train(config, log=None, data=((x[:192], y[:192]), (x[192:], y[192:])), run_dir=tmp_path / "run")
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    for rec, ep in zip(records, res.epochs):
        assert tuple(rec) == FIELDS
        assert rec["train_accuracy"] == ep.train_accuracy and rec["test_accuracy"] == ep.test_accuracy
        assert rec["mean_loss"] == ep.mean_loss and rec["lr"] == 3e-3 and rec["time_s"] > 0
        # DirectAdjoint backpropagates through each evaluation once: backward counts equal forward ones.
        assert rec["f_evals_forward"] >= 7 and rec["f_evals_backward"] == rec["f_evals_forward"]
        assert all(isinstance(rec[k], float) and math.isfinite(rec[k]) for k in FIELDS[1:])
    meta, pixels, _ = _read_png(tmp_path / "run" / "curves.png")
    assert meta["epochs"] == [1, 2] and pixels.std() > 10
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["sensealg"] == "direct" and cfg["epochs"] == 2
