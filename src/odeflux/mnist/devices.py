"""Where a run computes: the device choice, a CUDA check that really runs, synchronisation, deterministic mode."""

from __future__ import annotations

import os

import torch

DEVICES = ("auto", "cpu", "cuda")


class DeviceError(RuntimeError):
    """The requested device cannot be used."""


class DeterminismError(RuntimeError):
    """``deterministic=True`` met an operation without a deterministic implementation on this device."""


def cuda_status() -> tuple[bool, str]:
    """Whether a CUDA GPU works (available and a tiny operation runs on it), and why not."""
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is available to this torch (torch.cuda.is_available() is False)"
    try:
        ok = float((torch.ones(4, device="cuda") * 2).sum()) == 8.0
    except Exception as exc:  # a broken driver or an unsupported card shows up only here
        return False, f"a CUDA GPU is visible but a test operation on it failed ({type(exc).__name__}: {exc})"
    return (True, "") if ok else (False, "a CUDA GPU is visible but computed a wrong result on a test operation")


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` (which must work) or ``auto``: a working GPU if there is one, as Lux's ``gpu_device()``."""
    if name == "cpu":
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    ok, why = cuda_status()
    if ok:
        return torch.device("cuda")
    if name == "cuda":
        raise DeviceError(f"--device cuda: {why}; use --device cpu (or auto)")
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (a no-op on the CPU), so that host timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_deterministic(device_name: str) -> None:
    """``torch.use_deterministic_algorithms(True)`` for a run on ``device_name``, with what CUDA needs for it."""
    if device_name != "cpu":  # cuBLAS reads this when its handle is created: before the first GPU matmul
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
