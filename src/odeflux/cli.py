"""The ``odeflux`` command line: ``odeflux train`` (the Lux tutorial's runs) and ``odeflux info``.

Bad input ends in one line on stderr naming the problem and the fix, and a non-zero exit:
2 for arguments, 1 for data, device and solver failures.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
from typing import Sequence

MNIST_TRAIN_SIZE = 60_000
DEFAULT_COMMAND = "train"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), pointing to ``--help``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action)


def _number(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None


def _positive_int(text: str) -> int:
    v = _number(text, int, "a positive integer")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def _nonneg_int(text: str) -> int:
    v = _number(text, int, "a non-negative integer")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {v}")
    return v


def _positive_float(text: str) -> float:
    v = _number(text, float, "a positive number")
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return v


def _fraction(text: str) -> float:
    v = _number(text, float, "a number strictly between 0 and 1 (e.g. 0.9)")
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1 (e.g. 0.9), got {text}")
    return v


def _n_samples(text: str) -> int | str:
    if text == "all":
        return "all"
    v = _number(text, int, "an integer or 'all'")
    if v < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (one train and one test image), got {v}")
    if v > MNIST_TRAIN_SIZE:
        raise argparse.ArgumentTypeError(
            f"{v} is more than the {MNIST_TRAIN_SIZE} training images: pass at most {MNIST_TRAIN_SIZE}, "
            "or 'all' for the official 60k/10k split"
        )
    return v


def build_parser() -> argparse.ArgumentParser:
    """The ``odeflux`` argument parser (subcommands ``train`` and ``info``)."""
    from .mnist.data import DATASETS
    from .mnist.model import ADAPTIVE_SOLVERS, PARAM_STRUCTURES, SENSEALGS, VJPS
    from .mnist.train import DEVICES

    from . import __version__

    parser = _Parser(prog="odeflux", description="Neural ODEs for PyTorch: the Lux MNIST tutorial, and system info.")
    parser.add_argument("--version", action="version", version=f"odeflux {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,info}", parser_class=_Parser)

    t = sub.add_parser(
        "train",
        help="train the tutorial's Neural-ODE MNIST classifier (the default command)",
        description="Train the Lux tutorial's Neural-ODE MNIST classifier; prints one line per epoch.",
        formatter_class=_DefaultsFormatter,
    )
    add = t.add_argument
    add("--sensealg", choices=SENSEALGS, default="interpolating", help="gradient method of the ODE layer")
    add("--vjp", choices=VJPS, default="autograd",
        help="vector-Jacobian products of the continuous adjoints (jacobian: full Jacobians, slow for this state)")
    add("--device", choices=DEVICES, default="auto", help="auto: a working CUDA GPU if there is one, else the CPU")
    add("--params", choices=PARAM_STRUCTURES, default="flat",
        help="flat: one parameter vector (the tutorial's ComponentArray); tree: each layer's own")
    add("--epochs", type=_positive_int, default=9, help="passes over the training images")
    add("--batch-size", type=_positive_int, default=128, help="images per optimisation step")
    add("--n-samples", type=_n_samples, default=1500,
        help="the first N training images, split by --train-split; 'all': official 60k/10k split")
    add("--train-split", type=_fraction, default=0.9, help="fraction of --n-samples to train on")
    add("--lr", type=_positive_float, default=1e-3, help="Adam's learning rate")
    add("--seed", type=_nonneg_int, default=0, help="seeds the initial weights and the batch order")
    add("--rtol", type=_positive_float, default=1e-3, help="relative tolerance of the ODE solves")
    add("--atol", type=_positive_float, default=1e-3, help="absolute tolerance of the ODE solves")
    add("--solver", choices=ADAPTIVE_SOLVERS, default="tsit5", help="adaptive Runge-Kutta method of the ODE layer")
    add("--dataset", choices=DATASETS, default="mnist", help="MNIST, or Fashion-MNIST in the same format")
    add("--data-dir", default=None,
        help="directory holding the IDX files; otherwise $ODEFLUX_DATA_DIR, the cache, the bundled 1500 images, a download")
    add("--threads", type=_positive_int, default=1, help="torch intra-op threads; the model's ops are too small to gain from more")
    add("--compile", action="store_true", help="run the solver's per-step work through torch.compile(fullgraph=True)")

    sub.add_parser("info", help="versions, threads, CPU and GPU details", description="Print versions, threads, CPU and GPU details.")
    return parser


def _check_train_args(args: argparse.Namespace) -> str | None:
    """Checks that span several flags; returns the error message, if any."""
    if args.n_samples != "all":
        n_train = round(args.train_split * args.n_samples)
        if n_train in (0, args.n_samples):
            part = "train" if n_train == 0 else "test"
            return (
                f"--n-samples {args.n_samples} with --train-split {args.train_split} leaves the {part} set empty: "
                "raise --n-samples or move --train-split away from 0 and 1"
            )
    return None


def _run_train(args: argparse.Namespace) -> int:
    from .mnist.data import MNISTDataError
    from .mnist.train import DeviceError, TrainConfig, train
    from .solution import SolveError

    prog = "odeflux train"
    problem = _check_train_args(args)
    if problem:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 2
    config = TrainConfig(
        sensealg=args.sensealg, vjp=args.vjp, device=args.device, params=args.params, epochs=args.epochs,
        batch_size=args.batch_size, n_samples=args.n_samples, train_split=args.train_split, lr=args.lr,
        seed=args.seed, rtol=args.rtol, atol=args.atol, solver=args.solver, data_dir=args.data_dir,
        dataset=args.dataset, compile=args.compile, threads=args.threads,
    )  # fmt: skip
    try:
        train(config, log=lambda line: print(line, flush=True))
    except DeviceError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except MNISTDataError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except SolveError as exc:
        print(f"{prog}: error: {exc} (try tighter --rtol/--atol or a smaller --lr)", file=sys.stderr)
        return 1
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def info_text() -> str:
    """The tutorial appendix's ``versioninfo()``, for this installation."""
    import numpy
    import torch

    from . import __version__

    lines = [
        f"odeflux {__version__}",
        f"Python {platform.python_version()} ({platform.python_implementation()}, {sys.executable})",
        f"torch {torch.__version__}",
        f"numpy {numpy.__version__}",
        "Platform Info:",
        f"  OS: {platform.system()} {platform.release()} ({platform.machine()})",
        f"  Platform: {platform.platform()}",
        f"  CPU: {os.cpu_count()} x {_cpu_name()}",
        f"Threads: {torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op",
    ]
    env = [k for k in ("ODEFLUX_DATA_DIR", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES") if k in os.environ]
    if env:
        lines.append("Environment:")
        lines += [f"  {k} = {os.environ[k]}" for k in env]
    devices = ["cpu"]
    cuda_lines: list[str] = []
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        devices += [f"cuda:{i}" for i in range(n)]
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        cuda_lines += [f"CUDA runtime {torch.version.cuda}", f"cuDNN {cudnn if cudnn is not None else 'not available'}",
                       f"{n} CUDA device{'s' if n != 1 else ''}:"]  # fmt: skip
        for i in range(n):
            p = torch.cuda.get_device_properties(i)
            cuda_lines.append(f"  {i}: {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.3f} GiB)")
    else:
        why = "torch built without CUDA" if torch.version.cuda is None else f"torch built with CUDA {torch.version.cuda}, no GPU found"
        cuda_lines.append(f"CUDA: not available ({why})")
    lines.append(f"Devices: {', '.join(devices)}")
    return "\n".join(lines + cuda_lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``odeflux`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "info", "-h", "--help", "--version"):
        argv.insert(0, DEFAULT_COMMAND)  # `odeflux --epochs 3` means `odeflux train --epochs 3`
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            print(info_text())
            return 0
        return _run_train(args)
    except KeyboardInterrupt:
        print("odeflux: interrupted", file=sys.stderr)
        return 130
