"""The MNIST Neural-ODE application: data (this layer), model and training beside it."""

from .data import EMBEDDED_N, BatchLoader, cache_dir, load_mnist, tutorial_split
from .idx import MNISTDataError, read_idx

__all__ = ["BatchLoader", "EMBEDDED_N", "MNISTDataError", "cache_dir", "load_mnist", "read_idx", "tutorial_split"]
