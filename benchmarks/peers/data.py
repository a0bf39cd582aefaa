"""The tutorial's MNIST images for the peer scripts, with numpy alone (no torch, no odeflux import).

Reads the same files ``odeflux train`` reads: the directory in ``$ODEFLUX_DATA_DIR`` when it is
set, else the 1500 training images shipped inside the odeflux package (found without importing
it). The split is the tutorial's: the first ``round(0.9 n)`` images train, the rest test.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import numpy as np

__all__ = ["epoch_order", "load_images", "tutorial_split"]

_EMBEDDED = ("train-images-first1500-idx3-ubyte.gz", "train-labels-first1500-idx1-ubyte.gz")
_FULL = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_idx(path: Path) -> np.ndarray:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file; point ODEFLUX_DATA_DIR at the MNIST files")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for d in (directory / "mnist", directory):
        for name in (f"{stem}.gz", stem):
            if (d / name).is_file():
                return d / name
    raise FileNotFoundError(f"no {stem}[.gz] in {directory}: set ODEFLUX_DATA_DIR to the MNIST directory or unset it")


def _embedded_dir() -> Path:
    spec = importlib.util.find_spec("odeflux")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the odeflux package is not installed: its shipped images are the default data")
    return Path(list(spec.submodule_search_locations)[0]) / "mnist" / "_data"


def load_images(split: str = "train", n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images as float32 ``(N, 1, 28, 28)`` in [0, 1] and int64 labels, first ``n`` of ``split``."""
    env = os.environ.get("ODEFLUX_DATA_DIR")
    if env:
        img, lab = (_find(Path(env), stem) for stem in _FULL[split])
    else:
        if split != "train" or n is None or n > 1500:
            raise FileNotFoundError("only the first 1500 training images ship with odeflux: set ODEFLUX_DATA_DIR")
        img, lab = (_embedded_dir() / name for name in _EMBEDDED)
    x, y = _read_idx(img), _read_idx(lab)
    if n is not None:
        x, y = x[:n], y[:n]
    return (x.astype(np.float32) / 255.0)[:, None], y.astype(np.int64)


def tutorial_split(n_samples: int | str = 1500, train_split: float = 0.9):
    """``((x_train, y_train), (x_test, y_test))`` as ``odeflux.mnist.tutorial_split`` makes them."""
    if n_samples == "all":
        return load_images("train"), load_images("test")
    x, y = load_images("train", int(n_samples))
    k = round(train_split * int(n_samples))
    return (x[:k], y[:k]), (x[k:], y[k:])


def epoch_order(n: int, seed: int, epoch: int, torch_module=None) -> np.ndarray:
    """The sample order of an epoch. With ``torch_module`` it is ``odeflux.mnist.BatchLoader``'s
    (a torch ``randperm`` seeded from ``(seed, epoch)``), so torch peers see the same batches;
    without, a numpy permutation from the same seeds (the JAX peer's, which has no torch)."""
    words = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    mixed = (int(words[0]) << 32) | int(words[1])
    if torch_module is not None:
        gen = torch_module.Generator(device="cpu")
        gen.manual_seed(mixed)
        return torch_module.randperm(n, generator=gen).numpy()
    return np.random.default_rng(mixed).permutation(n)
