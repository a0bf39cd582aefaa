"""Checkpoints of a training run: atomic writes, a checked format, safe loading, RNG states.

A run directory holds ``last.pt`` (the newest complete checkpoint) and ``prev.pt`` (the one
before). Each save writes a temporary file in the same directory, fsyncs it, moves the old
``last.pt`` to ``prev.pt`` (a hard link, so ``last.pt`` never goes missing) and renames the new
file over ``last.pt``; a kill at any moment leaves both names holding complete checkpoints.

File format: one header line ``ODEFLUX-CHECKPOINT v1 <sha256 of the payload>\\n`` then the payload,
a ``torch.save`` archive of plain containers (dict, list, str, int, float, bool, None) and tensors
only, read back with ``torch.load(weights_only=True)``: nothing else is ever unpickled. The
checksum catches partial and damaged files, which ``torch.load`` alone would often read silently.
Payload keys: ``format``, ``version``, ``epoch`` (completed epochs), ``config`` (the
:class:`~odeflux.mnist.config.TrainConfig` as a dict), ``model`` and ``optimizer`` (state dicts),
``rng`` (``{"ranks": [per-rank state]}``, see :func:`rng_state`), ``loader`` (seed and next epoch
of the batch order), ``history`` (one metrics record per completed epoch), ``world_size``,
``torch_version``, ``odeflux_version``.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .fileio import atomic_write_bytes, fsync_dir

__all__ = [
    "CHECKPOINT_NAME", "Checkpoint", "CheckpointError", "PREVIOUS_NAME", "atomic_write_bytes", "is_intact", "load_checkpoint",
    "resolve_checkpoint", "rng_state", "save_checkpoint", "set_rng_state",
]

CHECKPOINT_NAME = "last.pt"
PREVIOUS_NAME = "prev.pt"
FORMAT = "odeflux-checkpoint"
VERSION = 1
_MAGIC = b"ODEFLUX-CHECKPOINT v1 "
_HEADER_LEN = len(_MAGIC) + 64 + 1  # magic, hex SHA-256, newline
_REQUIRED = ("epoch", "config", "model", "optimizer", "rng", "loader", "history")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial, damaged or not an odeflux checkpoint."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``path`` it came from and the payload's fields (see the module docstring)."""

    path: Path
    epoch: int
    config: dict[str, Any]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    loader: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def run_dir(self) -> Path:
        """The run directory the checkpoint lives in."""
        return self.path.parent


# --- atomic files ------------------------------------------------------------------------------


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _write_synced(file: Path, data: bytes, midway: Callable[[], None] | None) -> None:
    with open(file, "wb") as f:
        half = len(data) // 2
        f.write(data[:half])
        if midway is not None:  # tests only: a kill here leaves a partial temporary file
            f.flush()
            midway()
        f.write(data[half:])
        f.flush()
        os.fsync(f.fileno())


# --- save and load -----------------------------------------------------------------------------


def _encode(payload: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    return _MAGIC + hashlib.sha256(body).hexdigest().encode("ascii") + b"\n" + body


def save_checkpoint(run_dir: str | os.PathLike, payload: dict[str, Any], *, _midway: Callable[[], None] | None = None) -> Path:
    """Write ``payload`` as ``run_dir/last.pt``, keeping the previous one as ``prev.pt``; returns the path.

    ``payload`` must hold tensors and plain containers only (it is checked by reading it back
    the way :func:`load_checkpoint` does, before anything on disk changes).
    """
    run_dir = Path(run_dir)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    data = _encode(payload)
    try:  # refuse now what could not be loaded later
        _decode(data, run_dir / CHECKPOINT_NAME)
    except CheckpointError as exc:
        raise TypeError(f"not saving a checkpoint that would not load: its payload must hold tensors and plain "
                        f"containers only ({exc})") from None
    last, prev = run_dir / CHECKPOINT_NAME, run_dir / PREVIOUS_NAME
    new = _tmp_name(last)
    # The new checkpoint is complete on disk before the old ones are touched.
    try:
        _write_synced(new, data, _midway)
        if last.exists():
            keep = _tmp_name(prev)
            keep.unlink(missing_ok=True)
            try:
                os.link(last, keep)  # prev.pt becomes the current last.pt, which stays in place
            except OSError:  # no hard links here (e.g. FAT): a copy
                shutil.copyfile(last, keep)
                with open(keep, "rb+") as f:
                    os.fsync(f.fileno())
            os.replace(keep, prev)
        os.replace(new, last)
    except BaseException:
        new.unlink(missing_ok=True)
        raise
    fsync_dir(run_dir)
    return last


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory (its ``last.pt``); :class:`CheckpointError` if neither."""
    path = Path(path)
    if path.is_dir():
        found = path / CHECKPOINT_NAME
        if not found.is_file():
            raise CheckpointError(f"{path} holds no checkpoint ({CHECKPOINT_NAME}): pass a run directory written by "
                                  "'odeflux train --run-dir', or a checkpoint file")
        return found
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: pass a run directory or a checkpoint file (e.g. RUN_DIR/last.pt)")
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file or directory: pass a run directory or a checkpoint file")
    return path


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and check a checkpoint (a file, or a run directory's ``last.pt``), tensors on the CPU.

    Raises :class:`CheckpointError` with the problem and the fix for anything that is not a
    complete odeflux checkpoint.
    """
    file = resolve_checkpoint(path)
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {file}: {exc.strerror or exc}") from None
    payload = _decode(data, file)
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"{file} lacks {', '.join(missing)}: it was not written by 'odeflux train'")
    epoch = payload["epoch"]
    if not (isinstance(epoch, int) and epoch >= 1 and isinstance(payload["config"], dict)
            and isinstance(payload["model"], dict) and isinstance(payload["history"], list)):  # fmt: skip
        raise CheckpointError(f"{file} has malformed fields (epoch, config, model or history): it was not written "
                              "by 'odeflux train'")
    known = set(_REQUIRED) | {"format", "version", "world_size"}
    return Checkpoint(
        path=file, epoch=epoch, config=payload["config"], model=payload["model"], optimizer=payload["optimizer"],
        rng=payload["rng"], loader=payload["loader"], history=payload["history"],
        world_size=int(payload.get("world_size", 1)), extra={k: v for k, v in payload.items() if k not in known},
    )  # fmt: skip


def is_intact(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete odeflux checkpoint file (header and checksum; nothing unpickled)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return False
    return (len(data) >= _HEADER_LEN and data.startswith(_MAGIC)
            and hashlib.sha256(data[_HEADER_LEN:]).hexdigest().encode() == data[len(_MAGIC):_HEADER_LEN - 1])  # fmt: skip


def _previous_hint(file: Path) -> str:
    prev = file.with_name(PREVIOUS_NAME)
    if file.name == CHECKPOINT_NAME and prev.is_file():
        return f"; the previous epoch's checkpoint {prev} may be intact: pass that file instead"
    return ""


def _decode(data: bytes, file: Path) -> dict[str, Any]:
    if not data:
        raise CheckpointError(f"{file} is empty (an interrupted write){_previous_hint(file)}")
    if not data[:len(_MAGIC)] == _MAGIC[:len(data)]:
        raise CheckpointError(f"{file} is not an odeflux checkpoint (no '{_MAGIC.decode().strip()}' header): "
                              "pass a file written by 'odeflux train --run-dir'")
    if len(data) < _HEADER_LEN:
        raise CheckpointError(f"{file} is truncated ({len(data)} bytes){_previous_hint(file)}")
    digest, body = data[len(_MAGIC):_HEADER_LEN - 1].decode("ascii", "replace"), data[_HEADER_LEN:]
    if data[_HEADER_LEN - 1:_HEADER_LEN] != b"\n" or hashlib.sha256(body).hexdigest() != digest:
        raise CheckpointError(f"{file} is corrupt or partial (its checksum does not match: an interrupted copy "
                              f"or a damaged disk){_previous_hint(file)}")
    try:
        payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler refuses anything but tensors and plain containers
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{file} cannot be loaded safely (weights_only): {first[:200]}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not an odeflux checkpoint (unexpected payload)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{file} has checkpoint format version {payload.get('version')!r}; this odeflux reads "
                              f"version {VERSION}: use the odeflux that wrote it")
    return payload


# --- random number generators ------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's generator states as plain containers and tensors: torch's CPU generator,
    every initialised CUDA device's, Python's ``random`` and numpy's global generator."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only where the same devices exist)."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))  # fmt: skip
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
