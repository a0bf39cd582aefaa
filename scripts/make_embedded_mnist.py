#!/usr/bin/env python
"""Build the MNIST subset shipped in the package: the first 1500 training images and labels.

Usage: .venv/bin/python scripts/make_embedded_mnist.py [MNIST_DIR]
MNIST_DIR (default $ODEFLUX_DATA_DIR, else ../shared/data/mnist) holds the canonical
train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz; both are checked against their known
SHA-256 first. Writes two deterministic IDX .gz files and a README into src/odeflux/mnist/_data/.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from odeflux.mnist.data import _EMBEDDED, EMBEDDED_N  # noqa: E402
from odeflux.mnist.download import MNIST_FILES  # noqa: E402
from odeflux.mnist.idx import parse_idx, write_idx  # noqa: E402

OUT = ROOT / "src" / "odeflux" / "mnist" / "_data"
SOURCES = {"images": "train-images-idx3-ubyte.gz", "labels": "train-labels-idx1-ubyte.gz"}

README = """\
# Embedded MNIST subset

The first {n} images of the MNIST training set and their labels, as gzipped IDX files (the
format of the originals), so that the tutorial's default run (1500 images) works offline.

| file | bytes | SHA-256 |
| --- | --- | --- |
{rows}

Built by `scripts/make_embedded_mnist.py` from the canonical files (verified first):
{sources}

MNIST by Yann LeCun and Corinna Cortes, CC BY-SA 3.0.
"""


def main(argv: list[str]) -> int:
    default = os.environ.get("ODEFLUX_DATA_DIR") or ROOT.parent / "shared/data/mnist"
    src_dir = Path(argv[1] if len(argv) > 1 else default)
    rows, sources = [], []
    for kind, name in SOURCES.items():
        raw = (src_dir / name).read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        if digest != MNIST_FILES[name].sha256:
            print(f"error: {src_dir / name} has SHA-256 {digest}, expected {MNIST_FILES[name].sha256}", file=sys.stderr)
            return 1
        out = write_idx(OUT / _EMBEDDED[kind], parse_idx(raw, name)[:EMBEDDED_N])
        data = out.read_bytes()
        rows.append(f"| {out.name} | {len(data)} | {hashlib.sha256(data).hexdigest()} |")
        sources.append(f"- `{name}`, SHA-256 {digest}")
        print(f"wrote {out} ({len(data)} bytes)")
    (OUT / "README.md").write_text(README.format(n=EMBEDDED_N, rows="\n".join(rows), sources="\n".join(sources)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
