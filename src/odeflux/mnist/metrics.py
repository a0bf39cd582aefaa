"""A run's metrics on disk: the JSONL log (one record per epoch) and the PNG plots.

Plots are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend
switch), imported only when a plot is made, and written atomically. Each PNG carries its data as
JSON in an ``odeflux`` text chunk, so that what a plot shows can be checked.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from .fileio import atomic_write_bytes

__all__ = ["CURVES_NAME", "FIELDS", "METRICS_NAME", "MetricsLog", "plot_confusion_matrix", "plot_learning_curves", "read_metrics"]

METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.png"
#: The fields of an epoch record, in order.
FIELDS = ("epoch", "time_s", "train_accuracy", "test_accuracy", "mean_loss", "f_evals_forward", "f_evals_backward", "lr")


def _plain(value: Any) -> Any:
    """JSON-safe: non-finite floats become null (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _line(record: dict[str, Any]) -> str:
    return json.dumps({k: _plain(v) for k, v in record.items()}, allow_nan=False) + "\n"


class MetricsLog:
    """``metrics.jsonl``: appended to once per epoch (flushed and fsynced), rewritten atomically on resume."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def reset(self, records: Sequence[dict[str, Any]] = ()) -> None:
        """Replace the file's contents with ``records`` (a resumed run's history: a line written after
        the last checkpoint, by a run killed before it finished the epoch, is dropped)."""
        atomic_write_bytes(self.path, "".join(_line(r) for r in records).encode())

    def append(self, record: dict[str, Any]) -> None:
        """Add one record as a line, durably."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(_line(record))
            f.flush()
            os.fsync(f.fileno())


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file; ``ValueError`` naming the line for a malformed one."""
    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not a JSON record ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
            records.append(rec)
    return records


# --- plots --------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: str | os.PathLike, data: dict[str, Any]) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": "odeflux", "odeflux": json.dumps(data, allow_nan=False)})
    return atomic_write_bytes(path, buf.getvalue())


def _series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def plot_learning_curves(records: Sequence[dict[str, Any]], path: str | os.PathLike, title: str | None = None) -> Path:
    """Accuracy, mean loss and function evaluations per batch against the epoch, as a PNG at ``path``."""
    if not records:
        raise ValueError("no epoch records to plot")
    fig = _figure(12.0, 3.6)
    ax_acc, ax_loss, ax_nfe = fig.subplots(1, 3)
    for key, label in (("train_accuracy", "train"), ("test_accuracy", "test")):
        xs, ys = _series(records, key)
        ax_acc.plot(xs, [100 * y for y in ys], "o-", label=label)
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    ax_acc.legend(loc="lower right")
    xs, ys = _series(records, "mean_loss")
    ax_loss.plot(xs, ys, "o-", color="tab:red")
    ax_loss.set(xlabel="epoch", ylabel="mean cross-entropy", title="training loss")
    for key, label in (("f_evals_forward", "forward"), ("f_evals_backward", "backward")):
        xs, ys = _series(records, key)
        if xs:
            ax_nfe.plot(xs, ys, "o-", label=label)
    ax_nfe.set(xlabel="epoch", ylabel="f evaluations per batch", title="ODE work")
    if ax_nfe.lines:
        ax_nfe.legend(loc="best")
    for ax in (ax_acc, ax_loss, ax_nfe):
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    data = {"kind": "learning-curves", "epochs": [r["epoch"] for r in records]}
    return _save_png(fig, path, data)


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]], path: str | os.PathLike, labels: Sequence[str] | None = None, title: str | None = None
) -> Path:
    """A confusion matrix (rows: true class, columns: predicted) as an annotated PNG at ``path``."""
    rows = [[int(v) for v in row] for row in matrix]
    n = len(rows)
    if n == 0 or any(len(r) != n for r in rows):
        raise ValueError(f"a confusion matrix must be square and non-empty, got {n} rows of lengths "
                         f"{sorted({len(r) for r in rows})}")  # fmt: skip
    labels = [str(i) for i in range(n)] if labels is None else [str(s) for s in labels]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for a {n} x {n} confusion matrix")
    fig = _figure(7.0, 6.0)
    ax = fig.subplots()
    peak = max(max(r) for r in rows) or 1
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=peak)
    fig.colorbar(im, ax=ax, label="images")
    for i, row in enumerate(rows):
        for j, v in enumerate(row):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="white" if v > peak / 2 else "black")
    ax.set_xticks(range(n), labels, rotation=45 if max(map(len, labels)) > 2 else 0, ha="right" if max(map(len, labels)) > 2 else "center")
    ax.set_yticks(range(n), labels)
    ax.set(xlabel="predicted class", ylabel="true class")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save_png(fig, path, {"kind": "confusion-matrix", "labels": labels, "matrix": rows})
