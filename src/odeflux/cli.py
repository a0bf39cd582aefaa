"""The ``odeflux`` command line: ``train`` (the Lux tutorial's runs and beyond), ``evaluate`` and
``predict`` (a trained checkpoint put to use) and ``info``.

Bad input ends in one line on stderr naming the problem and the fix, and a non-zero exit:
2 for arguments, 1 for data, checkpoint, image, device and solver failures. ``odeflux train``
prints the tutorial's epoch lines and nothing else on stdout; notes and progress bars go to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Sequence

MNIST_TRAIN_SIZE = 60_000
DEFAULT_COMMAND = "train"
COMMANDS = ("train", "evaluate", "predict", "info")
#: ``--run-dir`` given without a value: a new directory under ``runs/`` named for the start time.
AUTO_RUN_DIR = "\0auto"
#: Flags a resumed run may change (everything else is the checkpoint's): more epochs, where the
#: data lives, how it runs. Other flags must match the checkpoint's values.
RESUMABLE = ("epochs", "data_dir", "device", "threads", "deterministic")


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


def build_parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The ``odeflux`` argument parser (subcommands ``train``, ``evaluate``, ``predict``, ``info``).

    ``suppress_defaults``: flags left out of the command line are absent from the result (tells
    which flags were given).
    """
    from . import __version__
    from .mnist.data import DATASETS
    from .mnist.devices import DEVICES
    from .mnist.model import ADAPTIVE_SOLVERS, ARCHS, FIRST_STEPS, ODENET_WIDTH, PARAM_STRUCTURES, SENSEALGS, VJPS
    from .mnist.schedule import LR_SCHEDULES

    parser = _Parser(prog="odeflux", description="Neural ODEs for PyTorch: the Lux MNIST tutorial, and system info.")
    parser.add_argument("--version", action="version", version=f"odeflux {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}", parser_class=_Parser)

    t = sub.add_parser(
        "train",
        help="train the tutorial's Neural-ODE MNIST classifier (the default command)",
        description="Train the Lux tutorial's Neural-ODE MNIST classifier; prints one line per epoch. With --run-dir "
        "each epoch also appends to DIR/metrics.jsonl, redraws DIR/curves.png and checkpoints to DIR/last.pt "
        "(previous: DIR/prev.pt); without it nothing is written. Under torchrun the processes train "
        "data-parallel (gloo on CPU, NCCL on GPU) and only rank 0 prints and writes.",
        formatter_class=_DefaultsFormatter,
    )

    def add(*flags, **kwargs):
        if suppress_defaults:
            kwargs["default"] = argparse.SUPPRESS
        t.add_argument(*flags, **kwargs)

    add("--sensealg", choices=SENSEALGS, default="interpolating", help="gradient method of the ODE layer")
    add("--vjp", choices=VJPS, default="autograd",
        help="vector-Jacobian products of the continuous adjoints (jacobian: full Jacobians, slow for this state)")
    add("--device", choices=DEVICES, default="auto", help="auto: a working CUDA GPU if there is one, else the CPU")
    add("--model", choices=ARCHS, default="tutorial",
        help="tutorial: the Lux tutorial's dense model; odenet: a convolutional ODE-Net")
    add("--width", type=_positive_int, default=None,
        help=f"--model odenet: channels of the downsampler and ODE block (default {ODENET_WIDTH})")
    add("--pooled-head", action="store_true",
        help="--model odenet: Chen et al.'s head (global average pool, Linear(width -> 10)) instead of a Linear "
        "over the flattened maps")
    add("--params", choices=PARAM_STRUCTURES, default="flat",
        help="flat: one parameter vector (the tutorial's ComponentArray); tree: each layer's own")
    add("--epochs", type=_positive_int, default=9, help="passes over the training images")
    add("--batch-size", type=_positive_int, default=128,
        help="images per optimisation step (under torchrun: the global batch, shared by the processes)")
    add("--n-samples", type=_n_samples, default=1500,
        help="the first N training images, split by --train-split; 'all': official 60k/10k split")
    add("--train-split", type=_fraction, default=0.9, help="fraction of --n-samples to train on")
    add("--lr", type=_positive_float, default=1e-3, help="Adam's learning rate")
    add("--lr-schedule", choices=LR_SCHEDULES, default="constant",
        help="cosine: the learning rate decays from --lr to 0 over all batches of all epochs")
    add("--seed", type=_nonneg_int, default=0, help="seeds the initial weights, the batch order and torch's generator")
    add("--rtol", type=_positive_float, default=1e-3, help="relative tolerance of the ODE solves")
    add("--atol", type=_positive_float, default=1e-3, help="absolute tolerance of the ODE solves")
    add("--solver", choices=ADAPTIVE_SOLVERS, default="tsit5", help="adaptive Runge-Kutta method of the ODE layer")
    add("--adjoint-first-step", choices=FIRST_STEPS, default="interval",
        help="the continuous adjoints' first step: interval tries the whole span as one step (falling back to "
        "Hairer's estimate if rejected); hairer starts from Hairer's estimate, as SciMLSensitivity; continue "
        "(the library's default) carries the step across saved times; forward starts from the forward's last steps")
    add("--per-sample", action="store_true",
        help="solve each image's ODE as its own problem (its own steps; solve(..., batch_axis=0)); its continuous adjoints take --vjp autograd or func")
    add("--dataset", choices=DATASETS, default="mnist", help="MNIST, or Fashion-MNIST in the same format")
    add("--data-dir", default=None,
        help="directory holding the IDX files; otherwise $ODEFLUX_DATA_DIR, the cache, the bundled 1500 images, a download")
    add("--threads", type=_positive_int, default=1, help="torch intra-op threads; the model's ops are too small to gain from more")
    add("--compile", action="store_true",
        help="solve with compile=True: torch.compile(fullgraph=True) where it is faster (on the CPU the tutorial's "
        "field keeps its NumPy kernel and hand-written reverse pass)")
    add("--run-dir", nargs="?", const=AUTO_RUN_DIR, default=None, metavar="DIR",
        help="write metrics.jsonl, curves.png and checkpoints (last.pt, prev.pt) to DIR after each epoch; "
        "without DIR: runs/<start time>")
    add("--resume", default=None, metavar="RUN_DIR",
        help="continue the run checkpointed in RUN_DIR (or from a checkpoint file such as RUN_DIR/prev.pt) "
        f"with its configuration; only {', '.join('--' + f.replace('_', '-') for f in RESUMABLE)} may change")
    add("--progress", action=argparse.BooleanOptionalAction, default=None,
        help="a progress bar per epoch on stderr (default: when stderr is a terminal)")
    add("--deterministic", action="store_true",
        help="torch.use_deterministic_algorithms(True) (and CUBLAS_WORKSPACE_CONFIG on CUDA); an error names "
        "any operation without a deterministic implementation")

    e = sub.add_parser(
        "evaluate",
        help="accuracy, confusion matrix and ODE work of a trained checkpoint",
        description="Evaluate a checkpoint on its run's test (or training) images: accuracy, confusion matrix "
        "(also drawn as a PNG) and the mean forward function evaluations per batch.",
        formatter_class=_DefaultsFormatter,
    )
    e.add_argument("checkpoint", metavar="CHECKPOINT", help="a run directory (its last.pt) or a checkpoint file")
    e.add_argument("--split", choices=("test", "train"), default="test",
                   help="which part of the run's data (its --n-samples/--train-split, or the official files)")
    e.add_argument("--data-dir", default=None, help="directory holding the IDX files (default: as in training)")
    e.add_argument("--device", choices=DEVICES, default="auto", help="where to run the model")
    e.add_argument("--batch-size", type=_positive_int, default=None, help="images per batch (default: the run's)")
    e.add_argument("--plot", default=None, metavar="PNG",
                   help="where to draw the confusion matrix (default: confusion-<split>.png beside the checkpoint)")
    e.add_argument("--threads", type=_positive_int, default=1, help="torch intra-op threads")

    p = sub.add_parser(
        "predict",
        help="classify image files with a trained checkpoint",
        description="Classify PNG or JPEG images with a checkpoint. Each image is made MNIST-like: grayscale, "
        "inverted when its border is light (dark digit on paper), cropped to the digit, scaled to fit 20x20 "
        "and centred by mass in 28x28. Prints one line per image: the class, its probability, all ten.",
        formatter_class=_DefaultsFormatter,
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a run directory (its last.pt) or a checkpoint file")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="image files (PNG, JPEG)")
    p.add_argument("--device", choices=DEVICES, default="auto", help="where to run the model")
    p.add_argument("--threads", type=_positive_int, default=1, help="torch intra-op threads")

    sub.add_parser("info", help="versions, threads, CPU and GPU details", description="Print versions, threads, CPU and GPU details.")
    return parser


def _check_train_args(args: argparse.Namespace) -> str | None:
    """Checks that span several flags; returns the error message, if any."""
    for flag, given in (("--width", args.width is not None), ("--pooled-head", args.pooled_head)):
        if given and args.model != "odenet":
            return f"{flag} shapes the ODE-Net, not the {args.model} model: add --model odenet, or drop {flag}"
    if args.per_sample and args.model != "tutorial":
        return "--per-sample solves the tutorial model's ODE per image: drop --model odenet, or --per-sample"
    if args.per_sample and args.sensealg != "direct" and args.vjp not in ("autograd", "func"):
        return f"--per-sample's adjoints take --vjp autograd or func, not {args.vjp}: pass --vjp func (or --sensealg direct)"
    if args.n_samples != "all":
        n_train = round(args.train_split * args.n_samples)
        if n_train in (0, args.n_samples):
            part = "train" if n_train == 0 else "test"
            return (
                f"--n-samples {args.n_samples} with --train-split {args.train_split} leaves the {part} set empty: "
                "raise --n-samples or move --train-split away from 0 and 1"
            )
    return None


def _fail(prog: str, message: str, code: int) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def _config_field(dest: str) -> str:
    return "arch" if dest == "model" else dest


def _new_run_dir() -> Path:
    """``runs/<YYYYmmdd-HHMMSS>``, with a suffix if a run already took that second."""
    base = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    path, i = base, 1
    while path.exists():
        path, i = base.with_name(f"{base.name}-{i}"), i + 1
    return path


def _resumed_config(args: argparse.Namespace, given: set[str], ckpt):
    """The checkpoint's config with the allowed overrides; (config, None) or (None, error message)."""
    from .mnist.config import TrainConfig

    saved = TrainConfig.from_dict(ckpt.config)
    overrides = {}
    for dest in sorted(given):
        name = _config_field(dest)
        if not hasattr(saved, name):
            continue
        value = getattr(args, dest)
        if dest in RESUMABLE:
            overrides[name] = value
        elif value != getattr(saved, name):
            flag = "--" + dest.replace("_", "-")
            return None, (f"{flag} {value} differs from the resumed run's {getattr(saved, name)}: a resumed run keeps "
                          f"its configuration (only {', '.join('--' + f.replace('_', '-') for f in RESUMABLE)} may "
                          f"change); drop {flag}, or start a new run with --run-dir")
    return dataclasses.replace(saved, **overrides), None


def _want_progress(flag: bool | None) -> tuple[bool, str | None]:
    """Whether to draw progress bars (``None``: when stderr is a terminal), and an error if tqdm is missing."""
    show = sys.stderr.isatty() if flag is None else flag
    if not show:
        return False, None
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False, ("--progress needs tqdm: pip install 'odeflux[app]'" if flag else None)
    return True, None


def _run_train(args: argparse.Namespace, given: set[str]) -> int:
    from .mnist.checkpoint import CheckpointError, load_checkpoint
    from .mnist.config import TrainConfig
    from .mnist.data import MNISTDataError
    from .mnist.devices import DeterminismError, DeviceError
    from .mnist.distributed import DistributedError, launch_context
    from .mnist.rundir import RunDirError, check_run_dir
    from .mnist.train import train
    from .solution import SolveError

    prog = "odeflux train"
    try:
        main_rank = launch_context().is_main
    except DistributedError as exc:
        return _fail(prog, str(exc), 2)
    progress, problem = _want_progress(args.progress)
    if problem:
        return _fail(prog, problem, 2)
    ckpt = None
    try:
        if args.resume is not None:
            if args.run_dir is not None:
                return _fail(prog, "--resume continues the run in its own directory: drop --run-dir", 2)
            ckpt = load_checkpoint(args.resume)
            try:
                config, problem = _resumed_config(args, given, ckpt)
            except (TypeError, ValueError) as exc:
                return _fail(prog, f"{ckpt.path}: its config cannot be used ({exc})", 1)
            if problem:
                return _fail(prog, problem, 2)
            run_dir = ckpt.run_dir
            if ckpt.epoch >= config.epochs:
                if main_rank:
                    print(f"{prog}: the run in {run_dir} has done its {ckpt.epoch} epochs; pass --epochs N "
                          f"(more than {ckpt.epoch}) to train further", file=sys.stderr)
                return 0
        else:
            problem = _check_train_args(args)
            if problem:
                return _fail(prog, problem, 2)
            config = TrainConfig(
                sensealg=args.sensealg, vjp=args.vjp, device=args.device, params=args.params, epochs=args.epochs,
                batch_size=args.batch_size, n_samples=args.n_samples, train_split=args.train_split, lr=args.lr,
                seed=args.seed, rtol=args.rtol, atol=args.atol, solver=args.solver, data_dir=args.data_dir,
                dataset=args.dataset, compile=args.compile, threads=args.threads, arch=args.model, width=args.width,
                pooled_head=args.pooled_head, deterministic=args.deterministic, lr_schedule=args.lr_schedule,
                adjoint_first_step=args.adjoint_first_step, per_sample=args.per_sample,
            )  # fmt: skip
            run_dir = None
            if args.run_dir is not None:
                run_dir = check_run_dir(_new_run_dir() if args.run_dir == AUTO_RUN_DIR else args.run_dir)
        if run_dir is not None and main_rank:
            what = f"resuming epoch {ckpt.epoch + 1} of {config.epochs} in" if ckpt is not None else "writing to"
            print(f"{prog}: {what} {run_dir}", file=sys.stderr)
        train(config, log=lambda line: print(line, flush=True), run_dir=run_dir, resume=ckpt, progress=progress)
    except (DeviceError, RunDirError, DistributedError) as exc:
        return _fail(prog, str(exc), 2)
    except (MNISTDataError, CheckpointError, DeterminismError) as exc:
        return _fail(prog, str(exc), 1)
    except SolveError as exc:
        return _fail(prog, f"{exc} (try tighter --rtol/--atol or a smaller --lr)", 1)
    return 0


def _matrix_table(matrix: list[list[int]]) -> list[str]:
    n = len(matrix)
    width = max(4, max(len(str(v)) for row in matrix for v in row) + 1)
    lines = ["true\\pred " + "".join(f"{j:>{width}}" for j in range(n))]
    lines += [f"{i:>9} " + "".join(f"{v:>{width}}" for v in row) for i, row in enumerate(matrix)]
    return lines


def _run_evaluate(args: argparse.Namespace) -> int:
    from .mnist.checkpoint import CheckpointError
    from .mnist.data import BatchLoader, MNISTDataError, tutorial_split
    from .mnist.devices import DeviceError
    from .mnist.evaluate import class_names, evaluate, load_trained
    from .mnist.metrics import plot_confusion_matrix

    prog = "odeflux evaluate"
    try:
        model, config, ckpt = load_trained(args.checkpoint, args.device)
        data_dir = args.data_dir if args.data_dir is not None else config.data_dir
        train_part, test_part = tutorial_split(config.n_samples, config.train_split, data_dir=data_dir,
                                               dataset=config.dataset)  # fmt: skip
        x, y = test_part if args.split == "test" else train_part
        device = next(model.parameters()).device
        batch_size = args.batch_size or config.batch_size
        res = evaluate(model, BatchLoader((x, y), batch_size).to(device))
        plot = Path(args.plot) if args.plot else ckpt.path.parent / f"confusion-{args.split}.png"
        title = f"{config.dataset} {args.split}: accuracy {100 * res.accuracy:.2f}% ({ckpt.path.name}, epoch {ckpt.epoch})"
        plot_confusion_matrix(res.confusion, plot, labels=class_names(config.dataset), title=title)
    except DeviceError as exc:
        return _fail(prog, str(exc), 2)
    except (CheckpointError, MNISTDataError) as exc:
        return _fail(prog, str(exc), 1)
    except OSError as exc:
        return _fail(prog, f"cannot write the plot: {exc.strerror or exc} ({exc.filename}); pass --plot PATH", 1)
    names = class_names(config.dataset)
    split = "official test files" if config.n_samples == "all" and args.split == "test" else (
        "official training files" if config.n_samples == "all" else f"{args.split} part of the run's {config.n_samples} images")
    fevals = "n/a (no ODE layer)" if res.f_evals_forward is None else f"{res.f_evals_forward:.1f}"
    lines = [
        f"checkpoint: {ckpt.path} (epoch {ckpt.epoch} of {config.epochs}; {config.arch} model, sensealg {config.sensealg}, "
        f"seed {config.seed})",
        f"data: {config.dataset}, {split} ({res.n_images} images), on {device.type}",
        f"accuracy: {100 * res.accuracy:.2f}% ({res.correct}/{res.n_images})",
        f"mean forward f evaluations per batch: {fevals} (batches of {batch_size})",
        "confusion matrix (rows: true class, columns: predicted class):",
        *_matrix_table(res.confusion),
    ]
    if names != class_names("mnist"):
        lines.append("classes: " + ", ".join(f"{i} {n}" for i, n in enumerate(names)))
    lines.append(f"confusion matrix plot: {plot}")
    print("\n".join(lines))
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    from .mnist.checkpoint import CheckpointError
    from .mnist.devices import DeviceError
    from .mnist.evaluate import ImageError, class_names, load_images, load_trained, predict

    prog = "odeflux predict"
    try:
        images = load_images(args.images)  # every file checked before the model is loaded
        model, config, _ = load_trained(args.checkpoint, args.device)
    except DeviceError as exc:
        return _fail(prog, str(exc), 2)
    except (CheckpointError, ImageError) as exc:
        return _fail(prog, str(exc), 1)
    names = class_names(config.dataset)
    probs = predict(model, images)
    for path, p in zip(args.images, probs.tolist()):
        k = max(range(len(p)), key=p.__getitem__)
        label = str(k) if names[k] == str(k) else f"{k} {names[k]}"
        print(f"{path}: {label} (p={p[k]:.3f}) | " + " ".join(f"{i}:{v:.3f}" for i, v in enumerate(p)))
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


def _given(argv: list[str]) -> set[str]:
    """The ``train`` flags present on the command line (by destination name)."""
    return set(vars(build_parser(suppress_defaults=True).parse_args(argv))) - {"command"}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``odeflux`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in (*COMMANDS, "-h", "--help", "--version"):
        argv.insert(0, DEFAULT_COMMAND)  # `odeflux --epochs 3` means `odeflux train --epochs 3`
    args = build_parser().parse_args(argv)
    try:
        if args.command == "info":
            print(info_text())
            return 0
        if args.command in ("evaluate", "predict"):
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(args.threads)
            try:
                return _run_evaluate(args) if args.command == "evaluate" else _run_predict(args)
            finally:
                torch.set_num_threads(threads)
        return _run_train(args, _given(argv) if args.resume is not None else set())
    except KeyboardInterrupt:
        print("odeflux: interrupted", file=sys.stderr)
        return 130
