"""A trained model put to use: evaluation on a dataset split, and predictions for image files.

Image files (PNG, JPEG, or anything else Pillow reads) are turned into MNIST-like 28x28 inputs
the way MNIST itself was made:

1. Converted to grayscale; transparent parts are laid on white first.
2. Made white-on-black: the image is inverted when its border (the outermost rows and columns)
   is lighter than mid-grey, i.e. a dark digit on light paper.
3. The background level (the border's median) is subtracted and the contrast stretched to
   [0, 1]; an image without contrast is refused (no digit to find).
4. Cropped to the digit's bounding box (pixels above 0.1), resized keeping the aspect ratio so
   that the longer side is 20 pixels (Lanczos), and pasted into a 28x28 black image with its
   centre of mass at pixel (14, 14), where MNIST's digits have theirs.

A 28x28 MNIST image goes through almost unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .checkpoint import Checkpoint, CheckpointError, load_checkpoint
from .config import TrainConfig, build_model
from .devices import resolve_device
from .steps import FEvalCounter

__all__ = [
    "CLASS_NAMES", "EvalResult", "ImageError", "class_names", "evaluate", "load_image", "load_images", "load_trained",
    "mnist_like", "predict",
]

N_CLASSES = 10
#: Fashion-MNIST's class names (MNIST's are the digits).
CLASS_NAMES = {
    "mnist": tuple(str(i) for i in range(N_CLASSES)),
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
}  # fmt: skip
_INK = 0.1  # a pixel above this (after background removal) belongs to the digit's bounding box
_BOX = 20  # MNIST's digits fit a 20x20 box ...
_SIZE = 28  # ... centred by mass in a 28x28 image


class ImageError(ValueError):
    """An image file that cannot be read or holds no digit."""


def class_names(dataset: str) -> tuple[str, ...]:
    """The names of the ten classes of ``dataset`` ("mnist" or "fashion-mnist")."""
    return CLASS_NAMES.get(dataset, CLASS_NAMES["mnist"])


def load_trained(checkpoint: Checkpoint | str | os.PathLike, device: str = "auto") -> tuple[nn.Module, TrainConfig, Checkpoint]:
    """The model of a checkpoint (or its file or run directory), in eval mode on ``device``,
    with its training config and the checkpoint itself."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    try:
        config = TrainConfig.from_dict(ckpt.config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{ckpt.path}: its config cannot be used ({exc})") from None
    model = build_model(config, resolve_device(device))
    try:
        model.load_state_dict(ckpt.model)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{ckpt.path}: its weights do not fit the {config.arch} model ({first[:160]})") from None
    model.eval()
    return model, config, ckpt


@dataclass
class EvalResult:
    """Accuracy, confusion matrix (``confusion[true][predicted]`` counts) and the ODE work."""

    accuracy: float
    confusion: list[list[int]]
    n_images: int
    f_evals_forward: float | None  # mean function evaluations per batch (None: no NeuralODE layer)

    @property
    def correct(self) -> int:
        return sum(self.confusion[i][i] for i in range(len(self.confusion)))


@torch.no_grad()
def evaluate(model: nn.Module, loader, n_classes: int = N_CLASSES) -> EvalResult:
    """Evaluate ``model`` (in eval mode) over ``loader``'s batches; one host read at the end."""
    was_training = model.training
    model.eval()
    counter = FEvalCounter(model)
    counts = None
    for x, y in loader:
        pred = model(x).argmax(dim=1)
        counter.add(backward=False)
        cell = torch.bincount(y * n_classes + pred, minlength=n_classes * n_classes)
        counts = cell if counts is None else counts + cell
    model.train(was_training)
    if counts is None:
        raise ValueError("nothing to evaluate: the loader gave no batch")
    matrix = counts.view(n_classes, n_classes).cpu().tolist()
    n = sum(map(sum, matrix))
    fwd, _ = FEvalCounter.means(counter.totals(), bool(counter.nodes))
    return EvalResult(sum(matrix[i][i] for i in range(n_classes)) / n, matrix, n, fwd)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``(N, 10)`` for images ``(N, 1, 28, 28)`` in [0, 1], in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    probs = torch.softmax(model(images.to(device)).float(), dim=1)
    model.train(was_training)
    return probs.cpu()


# --- image files -------------------------------------------------------------------------------


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file as an MNIST-like ``(1, 28, 28)`` float32 tensor in [0, 1] (see the module
    docstring); :class:`ImageError` with a one-line reason when it cannot be."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path} is a directory, not an image file")
    try:
        with Image.open(path) as im:
            im.load()
            gray = _grayscale(ImageOps.exif_transpose(im))
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path} is not an image Pillow can read: pass a PNG or JPEG file") from None
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{path} is too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path} is a damaged or truncated image ({str(exc).strip() or type(exc).__name__}): "
                         "pass an intact PNG or JPEG file") from None
    try:
        return torch.from_numpy(mnist_like(gray)).unsqueeze(0)
    except ImageError as exc:
        raise ImageError(f"{path}: {exc}") from None


def _grayscale(im) -> np.ndarray:
    """A Pillow image as a 2-d float array in [0, 1], transparency laid on white."""
    from PIL import Image

    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # deep grayscale: scale its own range
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    if "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return np.asarray(im.convert("L"), dtype=np.float64) / 255.0


def mnist_like(gray: np.ndarray) -> np.ndarray:
    """A 2-d grayscale array in [0, 1] (any size) as a 28x28 float32 MNIST-style digit (see the
    module docstring); :class:`ImageError` when there is no digit to find."""
    from PIL import Image

    a = np.asarray(gray, dtype=np.float64)
    if a.ndim != 2 or a.size == 0:
        raise ImageError(f"expected a 2-d grayscale image, got shape {a.shape}")
    border = np.concatenate([a[0, :], a[-1, :], a[:, 0], a[:, -1]])
    if border.mean() > 0.5:  # dark digit on light paper
        a, border = 1.0 - a, 1.0 - border
    background, peak = float(np.median(border)), float(a.max())
    if peak - background < 0.1:
        raise ImageError("no digit found: the image has (nearly) no contrast against its background")
    a = np.clip((a - background) / (peak - background), 0.0, 1.0)
    rows, cols = np.nonzero(a > _INK)
    a = a[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    h, w = a.shape
    scale = _BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != (w, h):
        img = Image.fromarray(a.astype(np.float32)).resize(size, Image.Resampling.LANCZOS)
        a = np.clip(np.asarray(img, dtype=np.float64), 0.0, 1.0)
    h, w = a.shape
    mass = a.sum()
    cy = (a.sum(axis=1) @ np.arange(h)) / mass
    cx = (a.sum(axis=0) @ np.arange(w)) / mass
    top = int(np.clip(round(_SIZE / 2 - cy), 0, _SIZE - h))
    left = int(np.clip(round(_SIZE / 2 - cx), 0, _SIZE - w))
    out = np.zeros((_SIZE, _SIZE), dtype=np.float32)
    out[top:top + h, left:left + w] = a
    return out


def load_images(paths: Sequence[str | os.PathLike]) -> torch.Tensor:
    """:func:`load_image` of each path, stacked as ``(N, 1, 28, 28)``."""
    return torch.stack([load_image(p) for p in paths])
