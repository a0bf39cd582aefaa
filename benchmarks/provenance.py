"""Which code a benchmark measured: the git commit of the tree and whether ``src/`` had uncommitted changes."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def code_state() -> str:
    """``'odeflux at commit 12a3646'``, with a note when src/ differs from it; 'unknown' outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=REPO, capture_output=True,
                               text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "odeflux at an unknown commit (no git)"
    return f"odeflux at commit {head}" + (" with uncommitted changes in src/" if dirty else "")
