"""The MNIST classifiers: the Lux tutorial's model and a convolutional ODE-Net.

``arch="tutorial"``: Flatten, Dense(784->20, tanh), a NeuralODE, Dense(20->10), initialised as
``Lux.setup`` does (Glorot-uniform weights, zero biases) from a seeded ``torch.Generator``.
``arch="odenet"``: after Chen et al. (2018)'s ODE-Net: a strided convolutional downsampler, an ODE
block whose time-dependent vector field is two 3x3 convolutions with GroupNorm, and a linear head
over the flattened feature maps (Chen et al. average-pool them first, which learns far slower:
see benchmarks/results/odenet_full_mnist.md); PyTorch's default initialisation, drawn from the
seeded generator. With ``params="flat"``
every parameter lives in one vector, as the tutorial's ``ComponentArray`` holds them.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..control import ORDINARYDIFFEQ_PI, IController
from ..fields import MLP
from ..nn import NeuralODE
from ..sensitivity import SENSEALGS as ALGORITHMS
from ..sensitivity import VJP_BACKENDS, ContinuousAdjoint
from ..sensitivity.base import ADJOINT_FIRST_STEPS as FIRST_STEPS
from ..solvers import SOLVERS

# The names the command line takes, from the registries, so that a method added there is offered here.
SENSEALGS = tuple(ALGORITHMS)
VJPS = tuple(VJP_BACKENDS)
# The layer needs error control, and steps on any device (ScipySolver integrates on the CPU alone).
ADAPTIVE_SOLVERS = tuple(name for name, cls in SOLVERS.items() if cls().adaptive and cls.stepwise)
PARAM_STRUCTURES = ("tree", "flat")
ARCHS = ("tutorial", "odenet")
IMAGE_SIZE = 28 * 28
HIDDEN = 20
N_CLASSES = 10
#: The ODE-Net's default channel count: Chen et al. use 64; 32 reaches 99 % on MNIST in ~40 % of
#: the time per batch (benchmarks/results/odenet_full_mnist.md).
ODENET_WIDTH = 32
ODENET_MAP = 6  # the downsampler's output side for 28 x 28 images


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


def make_sensealg(name: str, vjp: str = "autograd", first_step: str = "interval") -> Any:
    """The sensitivity algorithm for a command-line name (``SENSEALGS``): a continuous adjoint, such
    as ``interpolating`` -> ``InterpolatingAdjoint(vjp=vjp, first_step=first_step, norm="rms")``,
    or ``direct`` -> ``DirectAdjoint()`` (which takes none: it runs no adjoint solve). The
    continuous adjoints keep SciMLSensitivity's error norm (one RMS norm over the adjoint's whole
    state) and OrdinaryDiffEq's PI controller (``ORDINARYDIFFEQ_PI``, the adjoints' default too),
    as the tutorial reproduces its runs."""
    if name not in SENSEALGS:
        raise ValueError(f"unknown sensealg {name!r}: choose one of {', '.join(SENSEALGS)}")
    if vjp not in VJPS:
        raise ValueError(f"unknown vjp {vjp!r}: choose one of {', '.join(VJPS)}")
    if first_step not in FIRST_STEPS:
        raise ValueError(f"unknown adjoint first step {first_step!r}: choose one of {', '.join(FIRST_STEPS)}")
    cls = ALGORITHMS[name]
    if issubclass(cls, ContinuousAdjoint):
        return cls(vjp=vjp, first_step=first_step, norm="rms", controller=ORDINARYDIFFEQ_PI)
    return cls()


class TanhMLP(MLP):
    """Dense layers, each followed by ``tanh`` (Lux's ``Chain(Dense(a => b, tanh), ...)``), with
    :class:`odeflux.fields.MLP`'s hand-written VJP rule (``vjp_rule=False`` leaves it to autograd).

    One module call per evaluation rather than one per layer: the ODE solver calls it six times
    a step, so the per-call overhead of a ``Sequential`` shows.
    """

    def __init__(self, layers: list[nn.Linear], vjp_rule: bool = True):
        super().__init__(layers, "tanh", vjp_rule=vjp_rule)


def vector_field(generator: torch.Generator, vjp_rule: bool = True) -> TanhMLP:
    """The tutorial's ODE right-hand side: Dense(20->10, tanh), Dense(10->10, tanh), Dense(10->20, tanh)."""
    layers = [dense(HIDDEN, 10, generator), dense(10, 10, generator), dense(10, HIDDEN, generator)]
    return TanhMLP(layers, vjp_rule=vjp_rule)


class FlatParameters(nn.Module):
    """Runs ``module`` with all its parameters held in one flat ``nn.Parameter``, ``flat``.

    Each forward cuts ``flat`` into per-parameter views and calls the module with the views in
    place of its parameters (as ``torch.func.functional_call`` would), so gradients and the
    optimizer see one tensor (like a
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

    def _slots(self) -> list[tuple[dict, str]]:
        # (owner's _parameters dict, leaf name) per parameter, in `names` order.
        slots = []
        for name in self.names:
            owner, _, leaf = name.rpartition(".")
            slots.append((self.module.get_submodule(owner)._parameters, leaf))
        return slots

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # What torch.func.functional_call does, without its per-call bookkeeping (about 5 % of a
        # tutorial training step): the views stand in for the parameters during the call.
        slots = self.__dict__.get("_slot_cache")
        if slots is None:
            slots = self.__dict__["_slot_cache"] = self._slots()
        saved = [d[leaf] for d, leaf in slots]
        for (d, leaf), v in zip(slots, self._split(self.flat)):
            d[leaf] = v
        try:
            return self.module(x)
        finally:
            for (d, leaf), p in zip(slots, saved):
                d[leaf] = p

    def extra_repr(self) -> str:
        return f"n_params={self.flat.numel()}"


def group_norm(channels: int) -> nn.GroupNorm:
    """Chen et al.'s normalisation: ``GroupNorm(min(32, channels), channels)`` (no running buffers,
    so a flat parameter vector holds the whole state of the model)."""
    return nn.GroupNorm(min(32, channels), channels)


def torch_default_init_(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-draw every ``Conv2d``/``Linear`` in ``module`` as PyTorch's ``reset_parameters`` does
    (Kaiming-uniform with ``a = sqrt(5)``, bias ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``), but from
    ``generator``, in module order, so that a seed fixes the model."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
            if m.bias is not None:
                bound = 1.0 / math.sqrt(m.weight[0].numel())  # fan_in
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)
    return module


class ConcatConv2d(nn.Module):
    """A 3x3 convolution (padding 1) of the state with the time ``t`` appended as a constant channel,
    which makes the vector field time-dependent as in Chen et al."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in + 1, c_out, kernel_size=3, padding=1)

    def forward(self, t: torch.Tensor | float, y: torch.Tensor) -> torch.Tensor:
        b, _, h, w = y.shape
        tt = torch.as_tensor(t, dtype=y.dtype, device=y.device).reshape(1, 1, 1, 1).expand(b, 1, h, w)
        return self.conv(torch.cat([tt, y], dim=1))


class ConvODEFunc(nn.Module):
    """The ODE-Net's vector field ``f(t, y)`` on ``(batch, C, H, W)`` states:
    norm, ReLU, concat-t conv, norm, ReLU, concat-t conv, norm."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = group_norm(channels)
        self.conv1 = ConcatConv2d(channels, channels)
        self.norm2 = group_norm(channels)
        self.conv2 = ConcatConv2d(channels, channels)
        self.norm3 = group_norm(channels)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.conv1(t, F.relu(self.norm1(y)))
        out = self.conv2(t, F.relu(self.norm2(out)))
        return self.norm3(out)


def downsampler(width: int) -> nn.Sequential:
    """1x28x28 images to ``width`` x6x6 feature maps: conv 3x3, then two 4x4 stride-2 convs."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, 1), group_norm(width), nn.ReLU(),
        nn.Conv2d(width, width, 4, 2, 1), group_norm(width), nn.ReLU(),
        nn.Conv2d(width, width, 4, 2, 1),
    )  # fmt: skip


def classifier_head(width: int, pooled: bool = False) -> nn.Sequential:
    """Feature maps to logits: norm, ReLU, then Linear over the flattened ``width`` x6x6 maps; with
    ``pooled=True`` Chen et al.'s global average pool and Linear(width -> 10) instead."""
    if pooled:
        return nn.Sequential(
            group_norm(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, N_CLASSES)
        )
    return nn.Sequential(group_norm(width), nn.ReLU(), nn.Flatten(), nn.Linear(width * ODENET_MAP**2, N_CLASSES))


def odenet(width: int, generator: torch.Generator, *, pooled_head: bool = False, **node_kwargs: Any) -> nn.Sequential:
    """The ODE-Net: ``downsample`` (:func:`downsampler`), ``node`` (a :class:`NeuralODE` of
    :class:`ConvODEFunc`, built with ``node_kwargs``), ``head`` (:func:`classifier_head`), with
    PyTorch's default initialisation drawn from ``generator``."""
    model = nn.Sequential(
        OrderedDict(
            downsample=downsampler(width),
            node=NeuralODE(ConvODEFunc(width), **node_kwargs),
            head=classifier_head(width, pooled_head),
        )
    )
    return torch_default_init_(model, generator)


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
    arch: str = "tutorial",
    width: int | None = None,
    pooled_head: bool = False,
    vjp_rule: bool = True,
    adjoint_first_step: str = "interval",
    per_sample: bool = False,
) -> nn.Module:
    """The ``arch`` model (``ARCHS``), initialised from ``torch.Generator().manual_seed(seed)`` in layer order.

    ``arch="tutorial"`` (default) is the Lux tutorial's model; ``arch="odenet"`` the convolutional
    ODE-Net with ``width`` channels (default :data:`ODENET_WIDTH`) and, with ``pooled_head=True``, Chen et
    al.'s pooled head (:func:`classifier_head`); ``width`` and ``pooled_head`` apply to it only.
    ``sensealg`` is a name from ``SENSEALGS`` (with ``vjp``) or a sensitivity-algorithm instance.
    ``solver`` names an adaptive solver (``ADAPTIVE_SOLVERS``); the ODE block of either model is
    solved over ``(0, 1)`` with ``rtol``/``atol``. ``params="flat"`` wraps the model in
    :class:`FlatParameters`. ``compile=True`` runs the solver's per-step work through
    ``torch.compile(fullgraph=True)``. ``vjp_rule=False`` hides the tutorial field's hand-written
    VJP rule (:class:`odeflux.fields.MLP`), so the adjoints go through the autograd engine.
    ``adjoint_first_step`` is a named continuous adjoint's ``first_step`` (``FIRST_STEPS``:
    ``"interval"``, SciMLSensitivity's ``"hairer"``, ``"continue"`` or ``"forward"``).
    ``per_sample=True`` solves each image's ODE as its own problem (``NeuralODE(batch_axis=0)``: its
    own steps). Float32, as in the tutorial.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")
    if width is not None and arch != "odenet":
        raise ValueError(f"width applies to arch='odenet' only; the {arch} model has fixed sizes: drop width=")
    if pooled_head and arch != "odenet":
        raise ValueError(f"pooled_head applies to arch='odenet' only; the {arch} model has its own head: "
                         "drop pooled_head=")
    if arch == "odenet":
        width = ODENET_WIDTH if width is None else width
        if not (isinstance(width, int) and not isinstance(width, bool) and width >= 1):
            raise ValueError(f"width must be a positive integer (channels of the ODE-Net), got {width!r}")
    if params not in PARAM_STRUCTURES:
        raise ValueError(f"unknown params {params!r}: choose one of {', '.join(PARAM_STRUCTURES)}")
    if solver not in ADAPTIVE_SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: choose one of the adaptive {', '.join(ADAPTIVE_SOLVERS)}")
    if per_sample and arch != "tutorial":
        raise ValueError("per_sample solves take the tutorial's model: pass arch='tutorial', or drop per_sample")
    alg = make_sensealg(sensealg, vjp, adjoint_first_step) if isinstance(sensealg, str) else sensealg
    gen = torch.Generator().manual_seed(seed)
    if arch == "odenet":
        # The integral controller, as torchdiffeq's dopri5 in Chen et al.: on this field OrdinaryDiffEq's
        # PI controller grows the step so cautiously that it takes ~60 % more evaluations, none rejected.
        node_kwargs = dict(solver=SOLVERS[solver](), tspan=(0.0, 1.0), sensealg=alg, rtol=rtol, atol=atol,
                           controller=IController(), save_start=False, compile=compile)  # fmt: skip
        return _finish(odenet(width, gen, pooled_head=pooled_head, **node_kwargs), params, device)
    # OrdinaryDiffEq's PI controller forward and backward, as the runs were recorded (odeflux's
    # default for Tsit5 floors the controller's error memory at 0.1, not 1e-4).
    model: nn.Module = nn.Sequential(
        OrderedDict(
            flatten=nn.Flatten(),
            dense_in=dense(IMAGE_SIZE, HIDDEN, gen),
            act=nn.Tanh(),
            node=NeuralODE(
                vector_field(gen, vjp_rule), SOLVERS[solver](), (0.0, 1.0), alg,
                rtol=rtol, atol=atol, controller=ORDINARYDIFFEQ_PI, save_start=False, compile=compile,
                **({"batch_axis": 0} if per_sample else {}),
            ),  # fmt: skip
            dense_out=dense(HIDDEN, N_CLASSES, gen),
        )
    )
    return _finish(model, params, device)


def _finish(model: nn.Module, params: str, device: torch.device | str | None) -> nn.Module:
    if params == "flat":
        model = FlatParameters(model)
    if device is not None:
        model = model.to(device)
    return model


def trainable_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The tensors an optimizer should update (for a flat model: the one vector)."""
    return [p for p in model.parameters() if p.requires_grad]
