"""The project's speed targets (issue 5): ratios measured side by side, judged PASS or FAIL."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Sequence

from .common import Timing, markdown_table

__all__ = ["Target", "paired_ratio", "targets_table"]


@dataclass(frozen=True)
class Target:
    """``value`` (a ratio) against ``limit``; ``at_most`` says which side passes."""

    key: str  # e.g. "1a"
    text: str
    value: float | None  # None: not measured (the reason in ``note``)
    limit: float
    spread: tuple[float, float] | None = None
    at_most: bool = True
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.value is None:
            return "NOT MEASURED"
        ok = self.value <= self.limit if self.at_most else self.value >= self.limit
        return "PASS" if ok else "FAIL"

    def row(self) -> list[str]:
        value = "—" if self.value is None else f"{self.value:.2f}"
        spread = f"[{self.spread[0]:.2f}–{self.spread[1]:.2f}]" if self.spread else ""
        bound = f"{'<=' if self.at_most else '>='} {self.limit:g}"
        return [self.key, self.text, f"{value} {spread}".strip(), bound, self.verdict, self.note]


def paired_ratio(a: Timing, b: Timing) -> tuple[float, tuple[float, float]]:
    """``median(a) / median(b)`` and the range of the round-by-round ratios (interleaved samples pair up)."""
    n = min(len(a.samples), len(b.samples))
    per_round = [x / y for x, y in zip(a.samples[:n], b.samples[:n])] or [a.median / b.median]
    return a.median / b.median, (min(per_round), max(per_round))


def targets_table(targets: Sequence[Target]) -> str:
    rows = [t.row() for t in targets]
    return markdown_table(["target", "what", "measured: ratio [per-round min–max]", "goal", "verdict", "note"],
                          rows, align="llrlll")  # fmt: skip


def median_or_none(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None
