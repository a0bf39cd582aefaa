"""MNIST (and Fashion-MNIST) as tensors: where the files come from, the tutorial's split, batches.

Where :func:`load_mnist` looks, first match wins:

1. ``data_dir`` (the CLI's ``--data-dir``), else ``$ODEFLUX_DATA_DIR``: a directory holding the
   four IDX files (``.gz`` or raw), directly or in a ``mnist/`` / ``fashion-mnist/`` subdirectory.
   Missing or broken files there are an error, never a silent fallback. The environment directory
   alone is passed over when its labels show it holds a different dataset (it is often exported
   for MNIST while Fashion-MNIST is asked for).
2. Fashion-MNIST only: ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``).
   Fashion-MNIST is never downloaded.
3. The cache, ``$XDG_CACHE_HOME/odeflux/mnist`` (else ``~/.cache/odeflux/mnist``), if it already
   holds the requested split.
4. The first :data:`EMBEDDED_N` training images shipped inside the package, when the request fits
   (train split, ``n <= 1500``): the tutorial's default run needs no network.
5. A download into the cache (see :mod:`odeflux.mnist.download`), unless ``download=False``.
"""

from __future__ import annotations

import hashlib
import numbers
import os
from importlib import resources
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .idx import MNISTDataError, parse_idx, read_idx

__all__ = [
    "BatchLoader", "DATASETS", "DATA_DIR_ENV", "EMBEDDED_N", "FASHION_MNIST_DIRS", "MNISTDataError",
    "cache_dir", "load_mnist", "tutorial_split",
]

DATASETS = ("mnist", "fashion-mnist")
DATA_DIR_ENV = "ODEFLUX_DATA_DIR"
#: Default search locations for Fashion-MNIST (Debian's dataset-fashion-mnist installs here).
FASHION_MNIST_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
#: How many leading training images ship inside the package.
EMBEDDED_N = 1500
_EMBEDDED = {"images": "train-images-first1500-idx3-ubyte.gz", "labels": "train-labels-first1500-idx1-ubyte.gz"}

_TITLES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
_STEMS = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
# SHA-256 of the label bytes (after the IDX header) of each official split: tells the datasets
# apart whatever the compression. Fashion-MNIST's from Debian's dataset-fashion-mnist 0.0~git20200523.
_LABELS_SHA256 = {
    "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13": ("mnist", "train"),
    "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5": ("mnist", "test"),
    "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7": ("fashion-mnist", "train"),
    "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9": ("fashion-mnist", "test"),
}


def _is_int(value, minimum: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum


class _WrongDataset(MNISTDataError):
    """The files are readable but hold another dataset or split."""


def cache_dir() -> Path:
    """Where downloads go: ``$XDG_CACHE_HOME/odeflux/mnist``, else ``~/.cache/odeflux/mnist``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "odeflux" / "mnist"


def load_mnist(
    split: str = "train",
    *,
    n: int | None = None,
    data_dir: str | os.PathLike | None = None,
    dataset: str = "mnist",
    download: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` (default: all) images and labels of ``split`` ("train" or "test").

    Returns images as float32 ``(N, 1, 28, 28)`` in [0, 1] and labels as int64 ``(N,)``, in the
    files' order. ``dataset`` is "mnist" or "fashion-mnist". Sources are tried in the order given
    in the module docstring. Raises :class:`MNISTDataError` for missing or bad files and
    ``ValueError`` for bad arguments.
    """
    if split not in ("train", "test"):
        raise ValueError(f'split must be "train" or "test", got {split!r}')
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if n is not None and not _is_int(n, 1):
        raise ValueError(f"n must be a positive integer or None, got {n!r}")
    images, labels = _resolve(split, n, data_dir, dataset, download)
    if n is not None:
        if n > len(labels):
            raise ValueError(f"n={n} exceeds the {len(labels)} images of the {_TITLES[dataset]} {split} split")
        images, labels = images[:n], labels[:n]
    x = torch.from_numpy(images).unsqueeze(1).to(torch.float32).div_(255.0)
    y = torch.from_numpy(labels).to(torch.int64)
    return x, y


def tutorial_split(
    n_samples: int | str = 1500,
    train_split: float = 0.9,
    *,
    data_dir: str | os.PathLike | None = None,
    dataset: str = "mnist",
    download: bool = True,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The Lux tutorial's data: ``((x_train, y_train), (x_test, y_test))``.

    An integer ``n_samples`` takes the first ``n_samples`` training images and splits them in
    order as ``MLUtils.splitobs(at=train_split)`` does: the first ``round(train_split * n)``
    (to nearest, ties to even) for training, the rest for testing (1500 -> 1350 / 150).
    ``"all"`` gives the official 60,000 / 10,000 train / test files; ``train_split`` is then unused.
    """
    common = dict(data_dir=data_dir, dataset=dataset, download=download)
    if isinstance(n_samples, str):
        if n_samples == "all":
            return load_mnist("train", **common), load_mnist("test", **common)
        if not n_samples.isdigit():
            raise ValueError(f'n_samples must be a positive integer or "all", got {n_samples!r}')
        n_samples = int(n_samples)
    if not _is_int(n_samples, 2):
        raise ValueError(f'n_samples must be an integer >= 2 or "all", got {n_samples!r}')
    if not 0.0 < train_split < 1.0:
        raise ValueError(f"train_split must lie strictly between 0 and 1, got {train_split!r}")
    n_samples = int(n_samples)
    n_train = min(max(round(train_split * n_samples), 0), n_samples)
    if n_train in (0, n_samples):
        raise ValueError(f"train_split={train_split} leaves an empty {'train' if n_train == 0 else 'test'} "
                         f"set with n_samples={n_samples}")
    x, y = load_mnist("train", n=n_samples, **common)
    # Clones: each part owns its storage (saving or moving one doesn't drag the other along).
    return (x[:n_train].clone(), y[:n_train].clone()), (x[n_train:].clone(), y[n_train:].clone())


class BatchLoader:
    """Mini-batches ``(x[idx], y[idx])`` of a pair of tensors, made by one gather per batch.

    ``len()`` is the number of batches; the last one is partial unless ``drop_last``. With
    ``shuffle`` each pass draws a permutation from a ``torch.Generator`` seeded by ``(seed, epoch)``
    and then advances ``epoch`` by one; ``set_epoch(e)`` pins the next pass to epoch ``e`` (call it
    at the start of every epoch, and a resumed run reproduces the same batches). Without
    ``shuffle`` batches are in order, as views. ``.to(device)`` moves the data once.
    """

    def __init__(
        self,
        data: tuple[torch.Tensor, torch.Tensor],
        batch_size: int = 128,
        *,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ):
        if not (isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)):
            raise TypeError("BatchLoader needs data=(x, y), a pair of tensors")
        x, y = data
        if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise ValueError(f"x and y need the same non-zero first dimension, "
                             f"got {tuple(x.shape)} and {tuple(y.shape)}")
        if x.device != y.device:
            raise ValueError(f"x and y are on different devices ({x.device}, {y.device})")
        if not _is_int(batch_size, 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not _is_int(seed, 0):
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if drop_last and x.shape[0] < batch_size:
            raise ValueError(f"drop_last with batch_size={batch_size} > {x.shape[0]} samples leaves no batch")
        self.x, self.y = x, y
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.epoch = 0

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole ``(x, y)``."""
        return self.x, self.y

    @property
    def num_samples(self) -> int:
        return int(self.x.shape[0])

    @property
    def device(self) -> torch.device:
        return self.x.device

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use epoch ``epoch``'s permutation."""
        if not _is_int(epoch, 0):
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.epoch = int(epoch)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The sample order of ``epoch`` (int64, on the CPU): a function of ``seed`` and ``epoch`` only."""
        # SeedSequence mixes (seed, epoch) so that, unlike seed + epoch, neighbouring seeds don't share epochs.
        words = np.random.SeedSequence([self.seed, epoch]).generate_state(2, dtype=np.uint32)
        gen = torch.Generator(device="cpu")
        gen.manual_seed((int(words[0]) << 32) | int(words[1]))
        return torch.randperm(self.num_samples, generator=gen)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> BatchLoader:
        """Move the data to ``device`` (once, here) and return ``self``."""
        self.x = self.x.to(device, non_blocking=non_blocking)
        self.y = self.y.to(device, non_blocking=non_blocking)
        return self

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.permutation(self.epoch).to(self.device) if self.shuffle else None
        self.epoch += 1
        return self._batches(order)

    def _batches(self, order: torch.Tensor | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, b = self.num_samples, self.batch_size
        stop = n - n % b if self.drop_last else n
        for start in range(0, stop, b):
            if order is None:
                yield self.x[start:start + b], self.y[start:start + b]
            else:
                idx = order[start:start + b]
                yield self.x.index_select(0, idx), self.y.index_select(0, idx)

    def __repr__(self) -> str:
        return (f"BatchLoader(num_samples={self.num_samples}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
                f"seed={self.seed}, drop_last={self.drop_last}, epoch={self.epoch}, device={self.device})")


# --- where the files come from -------------------------------------------------------------------


def _resolve(split: str, n: int | None, data_dir, dataset: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    title = _TITLES[dataset]
    if data_dir is not None:
        return _from_dir(Path(data_dir), dataset, split, f"--data-dir {data_dir}",
                         f"pass --data-dir a directory holding the {title} files")
    passed_over = ""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        try:
            return _from_dir(Path(env), dataset, split, f"{DATA_DIR_ENV}={env}",
                             f"put the {title} files there, or unset {DATA_DIR_ENV} (or pass --data-dir)")
        except _WrongDataset as exc:
            passed_over = f" ({DATA_DIR_ENV} passed over: {exc})"
    if dataset != "mnist":
        for d in FASHION_MNIST_DIRS:
            if _dataset_dir(d, dataset, split) is not None:
                return _from_dir(d, dataset, split, str(d), "reinstall dataset-fashion-mnist or pass --data-dir")
        raise MNISTDataError(
            f"{title} {split} files not found (looked in {', '.join(map(str, FASHION_MNIST_DIRS))}){passed_over}; "
            "install Debian's dataset-fashion-mnist or pass --data-dir a directory holding "
            f"{_STEMS[split, 'images']}.gz and {_STEMS[split, 'labels']}.gz"
        )
    cache = cache_dir()
    names = [_STEMS[split, kind] + ".gz" for kind in ("images", "labels")]
    if all((cache / name).is_file() for name in names):
        return _from_cache(cache, names, split)
    if split == "train" and n is not None and n <= EMBEDDED_N:
        return _embedded()
    if not download:
        raise MNISTDataError(f"MNIST {split} files are not in the cache {cache} and download=False{passed_over}; "
                             f"pass --data-dir or set {DATA_DIR_ENV} to a directory holding them")
    from .download import MNIST_FILES, download_file  # only now: the network path is the rare one

    for name in names:
        download_file(MNIST_FILES[name], cache)
    return _from_cache(cache, names, split)


def _candidates(directory: Path, stem: str) -> list[Path]:
    dotted = stem.replace("-idx", ".idx")  # some copies are named train-images.idx3-ubyte
    return [directory / f"{s}{ext}" for s in (stem, dotted) for ext in (".gz", "")]


def _find(directory: Path, stem: str) -> Path | None:
    return next((p for p in _candidates(directory, stem) if p.is_file()), None)


def _dataset_dir(directory: Path, dataset: str, split: str) -> Path | None:
    """``directory/dataset`` or ``directory`` itself, whichever holds both files of ``split``."""
    for d in (directory / dataset, directory):
        if all(_find(d, _STEMS[split, kind]) is not None for kind in ("images", "labels")):
            return d
    return None


def _from_dir(directory: Path, dataset: str, split: str, origin: str, fix: str) -> tuple[np.ndarray, np.ndarray]:
    found = _dataset_dir(directory, dataset, split)
    if found is None:
        if not directory.is_dir():
            raise MNISTDataError(f"{origin}: {directory} is not a directory; {fix}")
        wanted = " and ".join(f"{_STEMS[split, k]}[.gz]" for k in ("images", "labels"))
        raise MNISTDataError(f"{origin}: no {_TITLES[dataset]} {split} files in {directory} or {directory / dataset} "
                             f"(looked for {wanted}); {fix}")
    img_path, lab_path = (_find(found, _STEMS[split, kind]) for kind in ("images", "labels"))
    labels = _read(lab_path, f"replace it with a good copy, or {fix}")
    try:  # labels first: they are small and tell a wrong dataset before the images are read
        _check_identity(labels, lab_path, dataset, split)
    except _WrongDataset as exc:
        raise _WrongDataset(f"{origin}: {exc}; {fix}") from None
    images = _read(img_path, f"replace it with a good copy, or {fix}")
    return _checked(images, labels, (img_path, lab_path), dataset, split)


def _from_cache(cache: Path, names: list[str], split: str) -> tuple[np.ndarray, np.ndarray]:
    paths = [cache / name for name in names]
    arrays = [_read(p, f"delete {p} and rerun to download it again") for p in paths]
    return _checked(*arrays, paths, "mnist", split)


def _embedded() -> tuple[np.ndarray, np.ndarray]:
    root = resources.files(__package__).joinpath("_data")
    arrays, sources = [], []
    for kind in ("images", "labels"):
        res = root.joinpath(_EMBEDDED[kind])
        source = f"embedded {_EMBEDDED[kind]}"
        try:
            arrays.append(parse_idx(res.read_bytes(), source))
        except (OSError, MNISTDataError) as exc:
            raise MNISTDataError(f"{exc} (the odeflux installation is damaged: reinstall it, "
                                 "or pass --data-dir)") from None
        sources.append(source)
    return _checked(*arrays, sources, "mnist", "train")


def _read(path: Path, fix: str) -> np.ndarray:
    try:
        return read_idx(path)
    except MNISTDataError as exc:
        raise MNISTDataError(f"{exc}; {fix}") from None


def _checked(
    images: np.ndarray, labels: np.ndarray, sources, dataset: str, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """The shapes and values an MNIST-format pair must have, and that it is the dataset asked for."""
    img_src, lab_src = sources
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise MNISTDataError(f"{img_src}: expected uint8 images of shape (N, 28, 28), found {images.dtype} "
                             f"{images.shape}; is it an MNIST-format images file?")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise MNISTDataError(f"{lab_src}: expected uint8 labels of shape (N,), found {labels.dtype} {labels.shape}; "
                             "is it an MNIST-format labels file?")
    if len(images) != len(labels):
        raise MNISTDataError(f"{img_src} holds {len(images)} images but {lab_src} {len(labels)} labels; "
                             "use files of the same split")
    if len(labels) == 0 or labels.max() > 9:
        raise MNISTDataError(f"{lab_src}: labels must be digits 0-9 and not empty, found "
                             f"{'none' if len(labels) == 0 else f'max {int(labels.max())}'}")
    _check_identity(labels, lab_src, dataset, split)
    return images, labels


def _check_identity(labels: np.ndarray, source, dataset: str, split: str) -> None:
    known = _LABELS_SHA256.get(hashlib.sha256(labels.tobytes()).hexdigest())
    if known is not None and known != (dataset, split):
        raise _WrongDataset(f"{source} holds the {_TITLES[known[0]]} {known[1]} labels, "
                            f"not the {_TITLES[dataset]} {split} ones")
