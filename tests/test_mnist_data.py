"""The MNIST data layer: IDX reading, where the files come from, the tutorial's split, batches."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from odeflux import mnist
from odeflux.mnist import BatchLoader, MNISTDataError, load_mnist, read_idx, tutorial_split
from odeflux.mnist import data as data_mod
from odeflux.mnist import download as download_mod
from odeflux.mnist.idx import write_idx


def _find_canonical() -> Path | None:
    for d in (os.environ.get("ODEFLUX_DATA_DIR"), Path(__file__).resolve().parents[2] / "shared/data/mnist"):
        if d and (Path(d) / "train-images-idx3-ubyte.gz").is_file():
            return Path(d)
    return None


CANONICAL = _find_canonical()  # read before the fixture below clears the environment
needs_canonical = pytest.mark.skipif(CANONICAL is None, reason="canonical MNIST files not found")
EMBEDDED_DIR = Path(mnist.__file__).parent / "_data"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No user data dir, an empty cache, no Fashion-MNIST default dir, and no network at all."""
    monkeypatch.delenv("ODEFLUX_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data_mod, "FASHION_MNIST_DIRS", (tmp_path / "no-fashion",))

    def no_download(*args, **kwargs):
        raise AssertionError("the network was used")

    monkeypatch.setattr(download_mod, "download_file", no_download)


@pytest.fixture(scope="module")
def canonical():
    """The canonical arrays, read independently of odeflux (gzip + numpy, header skipped)."""
    if CANONICAL is None:
        pytest.skip("canonical MNIST files not found")

    def raw(name, header):
        return np.frombuffer(gzip.decompress((CANONICAL / name).read_bytes())[header:], dtype=np.uint8)

    return {
        "train_x": raw("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28),
        "train_y": raw("train-labels-idx1-ubyte.gz", 8),
        "test_x": raw("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28),
        "test_y": raw("t10k-labels-idx1-ubyte.gz", 8),
    }


def make_dir(root: Path, n_train: int = 20, n_test: int = 7, seed: int = 0, gz: bool = True,
             stems=("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")) -> dict:
    """A synthetic MNIST-format directory; returns its arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for stem, key in zip(stems, ("train_x", "train_y", "test_x", "test_y")):
        write_idx(root / (stem + (".gz" if gz else "")), arrays[key])
    return arrays


def as_float(u8: np.ndarray) -> torch.Tensor:
    return torch.tensor(u8.astype(np.float64) / 255.0, dtype=torch.float32).unsqueeze(1)


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# --- IDX ------------------------------------------------------------------------------------------


def test_read_idx_hand_built_header(tmp_path):
    """A file built byte by byte from the IDX spec: uint8 2x3 and big-endian int16 2."""
    (tmp_path / "a.idx").write_bytes(struct.pack(">BBBBII", 0, 0, 0x08, 2, 2, 3) + bytes(range(6)))
    np.testing.assert_array_equal(read_idx(tmp_path / "a.idx"), np.arange(6, dtype=np.uint8).reshape(2, 3))
    (tmp_path / "b.idx.gz").write_bytes(gzip.compress(struct.pack(">BBBBIhh", 0, 0, 0x0B, 1, 2, -2, 300)))
    out = read_idx(tmp_path / "b.idx.gz")
    assert out.dtype == np.int16 and out.tolist() == [-2, 300]


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("name", ["x.idx", "x.idx.gz"])
def test_idx_round_trip(tmp_path, dtype, name):
    a = (np.random.default_rng(1).standard_normal((3, 4, 5)) * 100).astype(dtype)
    write_idx(tmp_path / name, a)
    b = read_idx(tmp_path / name)
    assert b.dtype == a.dtype and b.flags.writeable
    np.testing.assert_array_equal(a, b)
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left


def test_write_idx_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(ValueError, match="int64"):
        write_idx(tmp_path / "x.idx", np.zeros(3, dtype=np.int64))


@needs_canonical
def test_read_idx_matches_published_sha256_of_uncompressed_files():
    sums = dict(line.split()[::-1] for line in (CANONICAL / "SHA256SUMS").read_text().splitlines() if line.strip())
    for stem in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte", "t10k-images-idx3-ubyte"):
        a = read_idx(CANONICAL / f"{stem}.gz")
        header = bytes([0, 0, 8, a.ndim]) + np.asarray(a.shape, dtype=">u4").tobytes()
        assert hashlib.sha256(header + a.tobytes()).hexdigest() == sums[stem]


GOOD = struct.pack(">BBBBII", 0, 0, 0x08, 2, 2, 3) + bytes(6)
BAD_FILES = {
    "empty": (b"", "too short"),
    "bad_magic": (b"\x01\x00" + GOOD[2:], "not an IDX magic"),
    "unknown_type": (GOOD[:2] + b"\x07" + GOOD[3:], "not an IDX magic"),
    "zero_dims": (GOOD[:3] + b"\x00" + GOOD[4:], "not an IDX magic"),
    "short_header": (GOOD[:8], "truncated IDX header"),
    "truncated_data": (GOOD[:-1], "truncated"),
    "trailing_bytes": (GOOD + b"\x00", "trailing bytes"),
    "truncated_gzip": (gzip.compress(GOOD)[:-10], "corrupt or truncated gzip"),
    "corrupt_gzip": (gzip.compress(GOOD)[:-8] + bytes(4) + gzip.compress(GOOD)[-4:], "corrupt or truncated gzip"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_read_idx_rejects_bad_files(tmp_path, case):
    content, expected = BAD_FILES[case]
    path = tmp_path / f"{case}.idx"
    path.write_bytes(content)
    with pytest.raises(MNISTDataError) as exc:
        read_idx(path)
    msg = one_line(exc)
    assert str(path) in msg and expected in msg


def test_read_idx_truncation_message_gives_sizes(tmp_path):
    (tmp_path / "t.idx").write_bytes(GOOD[:-2])
    with pytest.raises(MNISTDataError, match=r"dimensions 2x3 of uint8 need 18 bytes, found 16"):
        read_idx(tmp_path / "t.idx")


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(MNISTDataError, match="no such file"):
        read_idx(tmp_path / "nope.gz")


def test_mnist_data_error_is_value_error():
    assert issubclass(MNISTDataError, ValueError)


# --- the embedded subset --------------------------------------------------------------------------


def test_embedded_subset_is_canonical_first_1500(canonical):
    x = read_idx(EMBEDDED_DIR / "train-images-first1500-idx3-ubyte.gz")
    y = read_idx(EMBEDDED_DIR / "train-labels-first1500-idx1-ubyte.gz")
    assert x.shape == (1500, 28, 28) and y.shape == (1500,)
    np.testing.assert_array_equal(x, canonical["train_x"][:1500])
    np.testing.assert_array_equal(y, canonical["train_y"][:1500])
    readme = (EMBEDDED_DIR / "README.md").read_text()
    assert "MNIST by Yann LeCun and Corinna Cortes, CC BY-SA 3.0" in readme
    for p in EMBEDDED_DIR.glob("*.gz"):  # the README's table matches the shipped bytes
        assert hashlib.sha256(p.read_bytes()).hexdigest() in readme


def test_default_run_works_offline_from_embedded_subset(canonical):
    """Fresh machine: no data dir, empty cache, no network (the fixture fails any download)."""
    (x_train, y_train), (x_test, y_test) = tutorial_split()
    assert x_train.shape == (1350, 1, 28, 28) and x_test.shape == (150, 1, 28, 28)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert float(x_train.min()) == 0.0 and float(x_train.max()) == 1.0
    torch.testing.assert_close(x_train, as_float(canonical["train_x"][:1350]), rtol=0, atol=0)
    torch.testing.assert_close(x_test, as_float(canonical["train_x"][1350:1500]), rtol=0, atol=0)
    assert y_train.tolist() == canonical["train_y"][:1350].tolist()
    assert y_test.tolist() == canonical["train_y"][1350:1500].tolist()


def test_more_than_embedded_without_download_says_what_to_do(tmp_path):
    with pytest.raises(MNISTDataError) as exc:
        load_mnist("train", n=1501, download=False)
    msg = one_line(exc)
    assert "download=False" in msg and "--data-dir" in msg and str(tmp_path / "cache") in msg
    with pytest.raises(MNISTDataError, match="not in the cache"):
        load_mnist("test", download=False)


# --- sources and their order ----------------------------------------------------------------------


@needs_canonical
def test_data_dir_loads_official_test_split(canonical):
    x, y = load_mnist("test", data_dir=CANONICAL)
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    torch.testing.assert_close(x, as_float(canonical["test_x"]), rtol=0, atol=0)
    assert torch.equal(y, torch.from_numpy(canonical["test_y"].astype(np.int64)))


def test_env_dir_precedes_embedded_and_cache(tmp_path, monkeypatch):
    env = make_dir(tmp_path / "env", seed=1)
    make_dir(tmp_path / "cache" / "odeflux" / "mnist", seed=2)
    monkeypatch.setenv("ODEFLUX_DATA_DIR", str(tmp_path / "env"))
    x, y = load_mnist("train", n=5)
    torch.testing.assert_close(x, as_float(env["train_x"][:5]), rtol=0, atol=0)
    assert y.tolist() == env["train_y"][:5].tolist()


def test_data_dir_argument_precedes_env(tmp_path, monkeypatch):
    make_dir(tmp_path / "env", seed=1)
    arg = make_dir(tmp_path / "arg", seed=2)
    monkeypatch.setenv("ODEFLUX_DATA_DIR", str(tmp_path / "env"))
    x, _ = load_mnist("test", data_dir=tmp_path / "arg")
    torch.testing.assert_close(x, as_float(arg["test_x"]), rtol=0, atol=0)


def test_populated_cache_precedes_embedded(tmp_path):
    cached = make_dir(tmp_path / "cache" / "odeflux" / "mnist", seed=3)
    assert data_mod.cache_dir() == tmp_path / "cache" / "odeflux" / "mnist"
    _, y = load_mnist("train", n=20)
    assert y.tolist() == cached["train_y"].tolist()


def test_cache_dir_defaults_to_home(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data_mod.cache_dir() == tmp_path / ".cache" / "odeflux" / "mnist"


def test_subdirectory_raw_and_dotted_names_are_found(tmp_path):
    sub = make_dir(tmp_path / "root" / "mnist", seed=4)
    _, y = load_mnist("test", data_dir=tmp_path / "root")
    assert y.tolist() == sub["test_y"].tolist()
    raw = make_dir(tmp_path / "raw", gz=False, seed=5)
    _, y = load_mnist("test", data_dir=tmp_path / "raw")
    assert y.tolist() == raw["test_y"].tolist()
    dotted = make_dir(tmp_path / "dotted", seed=6, stems=("train-images.idx3-ubyte", "train-labels.idx1-ubyte",
                                                          "t10k-images.idx3-ubyte", "t10k-labels.idx1-ubyte"))
    _, y = load_mnist("train", data_dir=tmp_path / "dotted")
    assert y.tolist() == dotted["train_y"].tolist()


def test_env_dir_without_files_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("ODEFLUX_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(MNISTDataError) as exc:
        load_mnist("train", n=10)
    msg = one_line(exc)
    assert "ODEFLUX_DATA_DIR" in msg and "train-images-idx3-ubyte" in msg and "unset" in msg


def test_missing_data_dir(tmp_path):
    with pytest.raises(MNISTDataError, match="is not a directory.*--data-dir"):
        load_mnist("test", data_dir=tmp_path / "nowhere")


def test_corrupt_cache_file_says_delete_and_rerun(tmp_path):
    cache = tmp_path / "cache" / "odeflux" / "mnist"
    make_dir(cache)
    bad = cache / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-20])
    with pytest.raises(MNISTDataError) as exc:
        load_mnist("test")
    msg = one_line(exc)
    assert f"delete {bad} and rerun" in msg and "truncated" in msg


def test_truncated_file_in_data_dir(tmp_path):
    make_dir(tmp_path / "d", gz=False)
    bad = tmp_path / "d" / "t10k-labels-idx1-ubyte"
    bad.write_bytes(bad.read_bytes()[:-3])
    with pytest.raises(MNISTDataError) as exc:
        load_mnist("test", data_dir=tmp_path / "d")
    msg = one_line(exc)
    assert str(bad) in msg and "need 15 bytes, found 12" in msg and "--data-dir" in msg


@pytest.mark.parametrize(
    "images, labels, expected",
    [
        (np.zeros((4, 28, 28), np.uint8), np.zeros(3, np.uint8), "4 images but"),
        (np.zeros((4, 32, 32), np.uint8), np.zeros(4, np.uint8), "shape \\(N, 28, 28\\)"),
        (np.zeros((4, 28, 28), np.float32), np.zeros(4, np.uint8), "uint8 images"),
        (np.zeros((4, 28, 28), np.uint8), np.full(4, 10, np.uint8), "digits 0-9"),
        (np.zeros((4, 28, 28), np.uint8), np.zeros((4, 1), np.uint8), "uint8 labels"),
    ],
)
def test_files_that_are_not_mnist_format(tmp_path, images, labels, expected):
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    with pytest.raises(MNISTDataError, match=expected) as exc:
        load_mnist("test", data_dir=tmp_path)
    one_line(exc)


# --- Fashion-MNIST --------------------------------------------------------------------------------


def test_fashion_mnist_from_default_dir(tmp_path, monkeypatch):
    fashion = make_dir(tmp_path / "fashion", seed=7)
    monkeypatch.setattr(data_mod, "FASHION_MNIST_DIRS", (tmp_path / "fashion",))
    x, y = load_mnist("train", dataset="fashion-mnist")
    torch.testing.assert_close(x, as_float(fashion["train_x"]), rtol=0, atol=0)
    assert y.tolist() == fashion["train_y"].tolist()


def test_fashion_mnist_is_never_downloaded_or_embedded():
    with pytest.raises(MNISTDataError) as exc:
        load_mnist("train", n=10, dataset="fashion-mnist")
    msg = one_line(exc)
    assert "dataset-fashion-mnist" in msg and "--data-dir" in msg


@needs_canonical
def test_mnist_given_as_fashion_mnist_is_refused(tmp_path, monkeypatch):
    with pytest.raises(MNISTDataError) as exc:
        load_mnist("test", dataset="fashion-mnist", data_dir=CANONICAL)
    assert "holds the MNIST test labels, not the Fashion-MNIST test ones" in one_line(exc)
    # The environment's MNIST directory is passed over in favour of the Fashion-MNIST default ...
    fashion = make_dir(tmp_path / "fashion", seed=8)
    monkeypatch.setattr(data_mod, "FASHION_MNIST_DIRS", (tmp_path / "fashion",))
    monkeypatch.setenv("ODEFLUX_DATA_DIR", str(CANONICAL))
    _, y = load_mnist("test", dataset="fashion-mnist")
    assert y.tolist() == fashion["test_y"].tolist()
    # ... and the error says so when there is none.
    monkeypatch.setattr(data_mod, "FASHION_MNIST_DIRS", (tmp_path / "none",))
    with pytest.raises(MNISTDataError, match="ODEFLUX_DATA_DIR passed over"):
        load_mnist("test", dataset="fashion-mnist")


@needs_canonical
def test_split_mixup_is_refused(tmp_path):
    """Test labels under train names: the labels' hash gives it away."""
    (tmp_path / "train-images-idx3-ubyte.gz").symlink_to(CANONICAL / "t10k-images-idx3-ubyte.gz")
    (tmp_path / "train-labels-idx1-ubyte.gz").symlink_to(CANONICAL / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(MNISTDataError, match="holds the MNIST test labels, not the MNIST train ones"):
        load_mnist("train", data_dir=tmp_path)


# --- arguments ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(split="val"), "split must be"),
        (dict(dataset="cifar"), "dataset must be one of"),
        (dict(n=0), "n must be a positive integer"),
        (dict(n=True), "n must be a positive integer"),
        (dict(n=2.5), "n must be a positive integer"),
    ],
)
def test_load_mnist_bad_arguments(kwargs, expected):
    with pytest.raises(ValueError, match=expected):
        load_mnist(**kwargs)


def test_n_larger_than_split(tmp_path):
    make_dir(tmp_path / "d", n_test=7)
    with pytest.raises(ValueError, match="n=8 exceeds the 7 images of the MNIST test split"):
        load_mnist("test", n=8, data_dir=tmp_path / "d")


# --- the tutorial's split -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, at, n_train",
    [
        (1500, 0.9, 1350),  # the tutorial
        (100, 0.7, 70),  # MLUtils' docstring example: splitobs(100, at=0.7) == (1:70, 71:100)
        (10, 0.25, 2),  # 2.5 rounds to even, as Julia's round(Int, 2.5) == 2
        (10, 0.75, 8),  # 7.5 rounds to even: 8
    ],
)
def test_tutorial_split_follows_splitobs(tmp_path, n, at, n_train):
    arrays = make_dir(tmp_path / "d", n_train=max(n, 20))
    (xa, ya), (xb, yb) = tutorial_split(n, at, data_dir=tmp_path / "d")
    assert len(xa) == len(ya) == n_train and len(xb) == len(yb) == n - n_train
    assert ya.tolist() + yb.tolist() == arrays["train_y"][:n].tolist()
    torch.testing.assert_close(torch.cat([xa, xb]), as_float(arrays["train_x"][:n]), rtol=0, atol=0)


def test_tutorial_split_all_uses_official_files(tmp_path):
    arrays = make_dir(tmp_path / "d", n_train=30, n_test=9)
    (xa, ya), (xb, yb) = tutorial_split("all", 0.5, data_dir=tmp_path / "d")
    assert len(xa) == 30 and len(xb) == 9
    assert ya.tolist() == arrays["train_y"].tolist() and yb.tolist() == arrays["test_y"].tolist()


def test_tutorial_split_accepts_digit_string(tmp_path):
    make_dir(tmp_path / "d", n_train=20)
    (xa, _), (xb, _) = tutorial_split("20", data_dir=tmp_path / "d")
    assert (len(xa), len(xb)) == (18, 2)


@pytest.mark.parametrize(
    "n_samples, at, expected",
    [
        (1500, 0.0, "strictly between"),
        (1500, 1.0, "strictly between"),
        (1500, 1.5, "strictly between"),
        (1, 0.5, "integer >= 2"),
        (True, 0.5, "integer >= 2"),
        ("abc", 0.5, 'or "all"'),
        (3, 0.1, "empty train set"),
        (3, 0.9, "empty test set"),
    ],
)
def test_tutorial_split_bad_arguments(n_samples, at, expected):
    with pytest.raises(ValueError, match=expected):
        tutorial_split(n_samples, at)


# --- batches --------------------------------------------------------------------------------------


def ids(n):
    """Data whose rows say where they came from."""
    return torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous(), torch.arange(n)


def test_unshuffled_batches_are_in_order():
    x, y = ids(1350)
    loader = BatchLoader((x, y), 128)
    batches = list(loader)
    assert len(loader) == len(batches) == 11
    assert [len(b[1]) for b in batches] == [128] * 10 + [70]
    assert torch.equal(torch.cat([b[0] for b in batches]), x) and torch.equal(torch.cat([b[1] for b in batches]), y)
    assert list(loader)[3][1].tolist() == list(range(384, 512))  # same again on the next pass


def test_drop_last():
    loader = BatchLoader(ids(1350), 128, shuffle=True, drop_last=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 10 and all(len(b[1]) == 128 for b in batches)
    seen = torch.cat([b[1] for b in batches])
    assert len(set(seen.tolist())) == 1280


def test_shuffled_epoch_is_a_permutation_and_pairs_stay_together():
    x, y = ids(300)
    loader = BatchLoader((x, y), 64, shuffle=True, seed=3)
    batches = list(loader)
    seen = torch.cat([b[1] for b in batches])
    assert sorted(seen.tolist()) == list(range(300)) and seen.tolist() != list(range(300))
    for bx, by in batches:
        assert torch.equal(bx[:, 0, 0, 0].long(), by)
    assert torch.equal(seen, loader.permutation(0))


def test_fresh_permutation_each_epoch_reproducible_from_seed_and_epoch():
    def run(loader, epochs):
        return [torch.cat([b[1] for b in loader]).tolist() for _ in range(epochs)]

    first = run(BatchLoader(ids(200), 32, shuffle=True, seed=11), 3)
    assert first[0] != first[1] != first[2]
    assert run(BatchLoader(ids(200), 32, shuffle=True, seed=11), 3) == first
    resumed = BatchLoader(ids(200), 32, shuffle=True, seed=11)
    resumed.set_epoch(2)
    assert run(resumed, 1) == [first[2]]
    assert run(BatchLoader(ids(200), 32, shuffle=True, seed=12), 1) != [first[0]]
    # Neighbouring (seed, epoch) pairs do not share permutations.
    assert not torch.equal(BatchLoader(ids(200), shuffle=True, seed=1).permutation(0),
                           BatchLoader(ids(200), shuffle=True, seed=0).permutation(1))


def test_to_moves_data_once():
    x, y = ids(10)
    loader = BatchLoader((x, y), 4, shuffle=True)
    assert loader.to("meta") is loader
    assert loader.x.device.type == "meta" and loader.y.device.type == "meta"
    assert all(bx.device.type == "meta" and by.device.type == "meta" for bx, by in loader)
    assert loader.tensors == (loader.x, loader.y)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_cuda_gives_the_same_batches():
    cpu = BatchLoader(ids(300), 64, shuffle=True, seed=5)
    gpu = BatchLoader(ids(300), 64, shuffle=True, seed=5).to("cuda")
    for (cx, cy), (gx, gy) in zip(cpu, gpu):
        assert gx.is_cuda and torch.equal(gx.cpu(), cx) and torch.equal(gy.cpu(), cy)


@pytest.mark.parametrize(
    "args, kwargs, error, expected",
    [
        ((torch.zeros(3), torch.zeros(3)), {}, TypeError, "pair of tensors"),
        (((torch.zeros(3), torch.zeros(4)),), {}, ValueError, "same non-zero first dimension"),
        (((torch.zeros(0), torch.zeros(0)),), {}, ValueError, "same non-zero first dimension"),
        ((ids(5),), dict(batch_size=0), ValueError, "batch_size"),
        ((ids(5),), dict(seed=-1), ValueError, "seed"),
        ((ids(5),), dict(batch_size=8, drop_last=True), ValueError, "leaves no batch"),
    ],
)
def test_batch_loader_bad_arguments(args, kwargs, error, expected):
    with pytest.raises(error, match=expected):
        BatchLoader(*args, **kwargs)


def test_set_epoch_rejects_negative():
    with pytest.raises(ValueError, match="epoch"):
        BatchLoader(ids(5)).set_epoch(-1)
