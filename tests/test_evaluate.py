"""``odeflux evaluate`` and ``odeflux predict``: accuracy and confusion matrix of a checkpoint,
MNIST-like preprocessing of image files, predictions, and clear errors for bad files."""

import json
import re

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from odeflux.mnist.config import TrainConfig
from odeflux.mnist.data import BatchLoader, load_mnist
from odeflux.mnist.evaluate import ImageError, evaluate, load_image, load_trained, mnist_like, predict
from odeflux.mnist.steps import accuracy
from odeflux.mnist.train import train
from odeflux.nn import NeuralODE


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short run (600 images, tutorial split) with a run directory, and its data."""
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    config = TrainConfig(sensealg="direct", device="cpu", epochs=3, batch_size=64, lr=5e-3, n_samples=600)
    res = train(config, log=None, run_dir=run_dir)
    x, y = load_mnist("train", n=600)
    return res, run_dir, (x[540:], y[540:])


def test_load_trained_gives_the_trained_weights(trained):
    res, run_dir, _ = trained
    for where in (run_dir, run_dir / "last.pt"):
        model, config, ckpt = load_trained(where, "cpu")
        assert ckpt.epoch == 3 and config == res.config and not model.training
        ref = res.model.state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())


def test_evaluate_counts_agree_with_the_labels(trained):
    res, run_dir, (x, y) = trained
    model, _, _ = load_trained(run_dir, "cpu")
    loader = BatchLoader((x, y), 16)
    out = evaluate(model, loader)
    matrix = np.array(out.confusion)
    assert matrix.shape == (10, 10) and out.n_images == 60
    assert matrix.sum(axis=1).tolist() == torch.bincount(y, minlength=10).tolist()  # rows: true classes
    assert out.accuracy == pytest.approx(accuracy(model, loader)) and out.accuracy == res.epochs[-1].test_accuracy
    assert out.accuracy > 0.3  # trained: well above chance
    node = next(m for m in model.modules() if isinstance(m, NeuralODE))
    evals = []
    with torch.no_grad():
        for bx, _ in loader:
            model(bx)
            evals.append(node.last_stats.n_f_evals)
    assert out.f_evals_forward == pytest.approx(sum(evals) / len(evals))


def test_evaluate_cli_prints_and_plots_the_confusion_matrix(trained, capsys):
    res, run_dir, _ = trained
    code, out, err = run_cli(["evaluate", str(run_dir), "--device", "cpu"], capsys)
    assert code == 0 and err == "", err
    assert f"accuracy: {100 * res.epochs[-1].test_accuracy:.2f}%" in out
    assert "(60 images)" in out and "mean forward f evaluations per batch:" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"^\s+\d\s+(\d+\s+){9}\d+$", line)]
    printed = [[int(v) for v in r[1:]] for r in rows]
    assert len(printed) == 10
    plot = run_dir / "confusion-test.png"
    assert f"confusion matrix plot: {plot}" in out
    with Image.open(plot) as im:
        assert im.format == "PNG"
        assert json.loads(im.text["odeflux"])["matrix"] == printed
        assert np.asarray(im.convert("L")).std() > 10
    assert sum(map(sum, printed)) == 60


def test_evaluate_cli_other_split_and_plot_path(trained, tmp_path, capsys):
    _, run_dir, _ = trained
    code, out, _ = run_cli(["evaluate", str(run_dir / "prev.pt"), "--split", "train", "--plot", str(tmp_path / "cm.png"),
                         "--device", "cpu"], capsys)  # fmt: skip
    assert code == 0
    assert "epoch 2 of 3" in out and "(540 images)" in out and (tmp_path / "cm.png").is_file()


def test_evaluate_cli_bad_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "x.pt").write_bytes(b"nonsense")
    for target in (tmp_path / "x.pt", tmp_path / "missing", tmp_path):
        code, out, err = run_cli(["evaluate", str(target)], capsys)
        assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err


# --- images --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    x, y = load_mnist("train", n=40)
    return x[:, 0].numpy(), y


def test_an_mnist_image_goes_through_unchanged(digits):
    images, _ = digits
    diffs = [np.abs(mnist_like(a) - a).mean() for a in images]
    assert max(diffs) < 0.01


def test_dark_on_light_larger_images_are_made_mnist_like(digits):
    images, _ = digits
    for a in images[:20]:
        up = np.asarray(Image.fromarray((a * 255).astype(np.uint8)).resize((84, 84), Image.Resampling.BILINEAR)) / 255
        paper = np.full((120, 150), 0.9)
        paper[20:104, 50:134] = 0.9 - 0.8 * up  # dark ink on light grey paper, off centre
        out = mnist_like(paper)
        assert out.shape == (28, 28) and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
        # MNIST's own centring leaves the centre of mass up to half a pixel off: allow a one-pixel shift.
        best = max(np.corrcoef(np.roll(out, (dy, dx), (0, 1)).ravel(), a.ravel())[0, 1]
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1))  # fmt: skip
        assert best > 0.85
        rows, cols = np.nonzero(out > 0.1)
        assert max(np.ptp(rows), np.ptp(cols)) + 1 <= 20  # fits MNIST's 20x20 box
        mass = out.sum()
        cy, cx = (out.sum(1) @ np.arange(28)) / mass, (out.sum(0) @ np.arange(28)) / mass
        assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5  # centred by mass, as MNIST


def test_uniform_images_are_refused():
    with pytest.raises(ImageError, match="no digit"):
        mnist_like(np.full((30, 30), 0.7))


def test_png_jpeg_and_transparent_files_load(digits, tmp_path):
    images, _ = digits
    a = (images[0] * 255).astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "d.png")
    Image.fromarray(255 - a).convert("RGB").resize((56, 56)).save(tmp_path / "d.jpg", quality=95)
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)
    rgba[..., 3] = a  # black ink on a transparent background
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    ref = torch.from_numpy(images[0])
    for name in ("d.png", "d.jpg", "t.png"):
        t = load_image(tmp_path / name)
        assert t.shape == (1, 28, 28) and t.dtype == torch.float32
        assert np.corrcoef(t.ravel().numpy(), ref.ravel().numpy())[0, 1] > 0.9, name


def test_predict_cli_reports_the_models_probabilities(trained, digits, tmp_path, capsys):
    _, run_dir, _ = trained
    images, _ = digits
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray((images[i] * 255).astype(np.uint8)).save(paths[-1])
    code, out, err = run_cli(["predict", str(run_dir), *map(str, paths), "--device", "cpu"], capsys)
    assert code == 0 and err == ""
    lines = out.strip().splitlines()
    assert len(lines) == 6
    model, _, _ = load_trained(run_dir, "cpu")
    ref = predict(model, torch.from_numpy(images[:6]).unsqueeze(1))  # the tensors the PNGs were made from
    for line, path, p in zip(lines, paths, ref):
        m = re.match(r"^(.+): (\d) \(p=(\d\.\d{3})\) \| " + " ".join(rf"{i}:(\d\.\d{{3}})" for i in range(10)) + "$", line)
        assert m and m.group(1) == str(path), line
        probs = np.array([float(v) for v in m.groups()[3:]])
        assert abs(probs.sum() - 1) < 0.006
        assert np.abs(probs - p.numpy()).max() < 0.006
        assert int(m.group(2)) == int(p.argmax()) or p.max() - p.sort().values[-2] < 0.01


@pytest.mark.parametrize("kind", ["garbage", "text", "truncated-png", "truncated-jpeg", "missing", "directory", "blank"])
def test_predict_rejects_bad_files_in_one_line(trained, digits, tmp_path, capsys, kind):
    _, run_dir, _ = trained
    a = (digits[0][0] * 255).astype(np.uint8)
    path = tmp_path / f"bad-{kind}.png"
    if kind == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "text":
        path = tmp_path / "notes.txt"
        path.write_text("not an image\n")
    elif kind == "truncated-png":
        Image.fromarray(a).save(path)
        path.write_bytes(path.read_bytes()[:120])
    elif kind == "truncated-jpeg":
        path = tmp_path / "bad.jpg"
        Image.fromarray(a).resize((200, 200)).save(path)
        path.write_bytes(path.read_bytes()[:700])
    elif kind == "directory":
        path = tmp_path
    elif kind == "blank":
        Image.new("L", (40, 40), 255).save(path)
    good = tmp_path.parent / f"good-{kind}.png"
    Image.fromarray(a).save(good)
    code, out, err = run_cli(["predict", str(run_dir), str(good), str(path)], capsys)
    assert code == 1 and out == ""  # every file is checked before anything is printed
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("odeflux predict: error:") and "Traceback" not in err
    assert str(path) in lines[0]
