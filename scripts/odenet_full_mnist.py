"""Train the convolutional ODE-Net on full MNIST: ``odeflux train`` with this run's presets.

    .venv/bin/python scripts/odenet_full_mnist.py [odeflux train flags]

is ``odeflux train --model odenet --n-samples all --sensealg direct --params tree --epochs 5 [flags]``:
the same loop, one line per epoch. Flags given after the presets override them, e.g.
``--lr-schedule cosine`` (the 99.35 % run of benchmarks/results/odenet_full_mnist.md),
``--width 64 --pooled-head`` (Chen et al.'s model) or ``--n-samples 10000``. With ``--run-dir DIR``
each epoch's mean loss, function evaluations and learning rate go to ``DIR/metrics.jsonl``, with a
checkpoint; continue such a run with ``odeflux train --resume DIR`` (it keeps its configuration).
"""

from __future__ import annotations

import sys

from odeflux.cli import main

PRESETS = ["--model", "odenet", "--n-samples", "all", "--sensealg", "direct", "--params", "tree", "--epochs", "5"]

if __name__ == "__main__":
    sys.exit(main(["train", *PRESETS, *sys.argv[1:]]))
