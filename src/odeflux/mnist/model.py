"""The Lux tutorial's MNIST classifier: Flatten, Dense(784->20, tanh), a NeuralODE, Dense(20->10).

Initialised as ``Lux.setup`` does (Glorot-uniform weights, zero biases) from a seeded
``torch.Generator``. With ``params="flat"`` every parameter lives in one vector, as the
tutorial's ``ComponentArray`` holds them.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.func import functional_call

from ..nn import NeuralODE
from ..solvers import SOLVERS

SENSEALGS = ("interpolating", "gauss", "backsolve", "quadrature", "direct")
VJPS = ("autograd", "func", "compile", "jacobian")
PARAM_STRUCTURES = ("tree", "flat")
ADAPTIVE_SOLVERS = ("tsit5", "dopri5", "bs3", "heun")
IMAGE_SIZE = 28 * 28
HIDDEN = 20
N_CLASSES = 10


def glorot_uniform_(weight: torch.Tensor, generator: torch.Generator, gain: float = 1.0) -> torch.Tensor:
    """Fill a ``(out, in)`` weight in place as Lux's ``glorot_uniform``: ``U(-b, b)``,
    ``b = gain * sqrt(6 / (fan_in + fan_out))``, drawn as ``(rand - 1/2) * 2b``."""
    fan_out, fan_in = weight.shape
    scale = gain * math.sqrt(24.0 / (fan_in + fan_out))
    u = torch.rand(weight.shape, generator=generator, dtype=weight.dtype, device=generator.device)
    with torch.no_grad():
        weight.copy_((u - 0.5) * scale)
    return weight


def dense(n_in: int, n_out: int, generator: torch.Generator) -> nn.Linear:
    """A Lux-initialised ``Dense(n_in => n_out)``: Glorot-uniform weight, zero bias."""
    layer = nn.Linear(n_in, n_out)
    glorot_uniform_(layer.weight, generator)
    with torch.no_grad():
        layer.bias.zero_()
    return layer


def make_sensealg(name: str, vjp: str = "autograd") -> Any:
    """The sensitivity algorithm for a command-line name: ``interpolating`` ->
    ``InterpolatingAdjoint(vjp=vjp)``, ``gauss``, ``backsolve``, ``quadrature`` likewise,
    ``direct`` -> ``DirectAdjoint()`` (which takes no VJP)."""
    if name not in SENSEALGS:
        raise ValueError(f"unknown sensealg {name!r}: choose one of {', '.join(SENSEALGS)}")
    if vjp not in VJPS:
        raise ValueError(f"unknown vjp {vjp!r}: choose one of {', '.join(VJPS)}")
    from ..sensitivity import SENSEALGS as ALGORITHMS

    cls = ALGORITHMS[name]
    return cls() if name == "direct" else cls(vjp=vjp)


class TanhMLP(nn.Module):
    """Dense layers, each followed by ``tanh`` (Lux's ``Chain(Dense(a => b, tanh), ...)``).

    One module call per evaluation rather than one per layer: the ODE solver calls it six times
    a step, so the per-call overhead of a ``Sequential`` shows.
    """

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            y = torch.tanh(F.linear(y, layer.weight, layer.bias))
        return y


def vector_field(generator: torch.Generator) -> TanhMLP:
    """The tutorial's ODE right-hand side: Dense(20->10, tanh), Dense(10->10, tanh), Dense(10->20, tanh)."""
    return TanhMLP([dense(HIDDEN, 10, generator), dense(10, 10, generator), dense(10, HIDDEN, generator)])


class FlatParameters(nn.Module):
    """Runs ``module`` with all its parameters held in one flat ``nn.Parameter``, ``flat``.

    Each forward cuts ``flat`` into per-parameter views and calls the module through
    ``torch.func.functional_call``, so gradients and the optimizer see one tensor (like a
    ``ComponentArray``). The module's own parameters are frozen aliases of ``flat`` (kept in
    sync for inspection; never trained).
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        named = list(module.named_parameters())
        if not named:
            raise ValueError("FlatParameters needs a module with parameters")
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) != 1:
            raise ValueError(f"FlatParameters needs one parameter dtype, got {sorted(map(str, dtypes))}")
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.module = module
        self.flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for _, p in named]))
        for _, p in named:
            p.requires_grad_(False)
        self._alias()

    def _alias(self) -> None:
        with torch.no_grad():
            for (_, p), v in zip(self.module.named_parameters(), self._split(self.flat.data)):
                p.data = v

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [v.view(s) for v, s in zip(flat.split(self.numels), self.shapes)]

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .double() break the aliasing: restore it
        super()._apply(fn, recurse)
        self._alias()
        return self

    def views(self) -> dict[str, torch.Tensor]:
        """The module's parameters as differentiable views of ``flat``, by name."""
        return dict(zip(self.names, self._split(self.flat)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, self.views(), (x,))

    def extra_repr(self) -> str:
        return f"n_params={self.flat.numel()}"


def create_model(
    *,
    sensealg: Any = "interpolating",
    vjp: str = "autograd",
    solver: str = "tsit5",
    rtol: float = 1e-3,
    atol: float = 1e-3,
    params: str = "tree",
    seed: int = 0,
    compile: bool = False,
    device: torch.device | str | None = None,
) -> nn.Module:
    """The tutorial's model, initialised from ``torch.Generator().manual_seed(seed)`` in layer order.

    ``sensealg`` is a name from ``SENSEALGS`` (with ``vjp``) or a sensitivity-algorithm instance.
    ``solver`` names an adaptive solver (``ADAPTIVE_SOLVERS``). ``params="flat"`` wraps the model in
    :class:`FlatParameters`. ``compile=True`` runs the solver's per-step work through
    ``torch.compile(fullgraph=True)``. Float32, as in the tutorial.
    """
    if params not in PARAM_STRUCTURES:
        raise ValueError(f"unknown params {params!r}: choose one of {', '.join(PARAM_STRUCTURES)}")
    if solver not in ADAPTIVE_SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: choose one of the adaptive {', '.join(ADAPTIVE_SOLVERS)}")
    alg = make_sensealg(sensealg, vjp) if isinstance(sensealg, str) else sensealg
    gen = torch.Generator().manual_seed(seed)
    model: nn.Module = nn.Sequential(
        OrderedDict(
            flatten=nn.Flatten(),
            dense_in=dense(IMAGE_SIZE, HIDDEN, gen),
            act=nn.Tanh(),
            node=NeuralODE(
                vector_field(gen), SOLVERS[solver](), (0.0, 1.0), alg,
                rtol=rtol, atol=atol, save_start=False, compile=compile,
            ),  # fmt: skip
            dense_out=dense(HIDDEN, N_CLASSES, gen),
        )
    )
    if params == "flat":
        model = FlatParameters(model)
    if device is not None:
        model = model.to(device)
    return model


def trainable_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The tensors an optimizer should update (for a flat model: the one vector)."""
    return [p for p in model.parameters() if p.requires_grad]
