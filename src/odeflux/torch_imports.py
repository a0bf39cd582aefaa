"""torch modules that warn when imported, imported once with those warnings silenced.

torch 2.13 calls its own deprecated ``torch.jit.script`` and ``torch.jit.script_method`` while
importing Inductor (through ``torch.utils.mkldnn``) and forward-mode AD's decompositions. Under
warnings as errors (``-W error``, pytest's ``filterwarnings = error``) the first ``compile=True``
solve would then fail to compile and the first ``ForwardSensitivity`` gradient would raise, from
inside torch. Each call site that would trigger such an import calls the function here first.
"""

from __future__ import annotations

import importlib
import warnings

_IMPORTED: set[str] = set()


def _import_quietly(name: str) -> None:
    if name not in _IMPORTED:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script", category=DeprecationWarning)
            importlib.import_module(name)
        _IMPORTED.add(name)


def compiler() -> None:
    """Before a ``torch.compile``: Inductor."""
    _import_quietly("torch._inductor.compile_fx")


def forward_ad() -> None:
    """Before forward-mode AD (``torch.func.jvp``): its decompositions."""
    _import_quietly("torch._decomp.decompositions_for_jvp")
