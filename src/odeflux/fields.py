"""Vector fields that bring their own vector-Jacobian product rule.

A continuous adjoint spends most of its backward pass in products ``v^T df/dy`` and
``v^T df/dp``. For a generic ``f`` these go through the autograd engine: record ``f``, then walk
the graph node by node. For a stack of dense layers the same products are a dozen matrix
products, and writing them out by hand (as a Julia layer's ``rrule`` does for Zygote) skips
recording the graph and walking it. Any module may offer such a rule as a ``vjp_rule``
attribute, called in the module's own convention: ``rule(y, v, want_y=, want_p=)`` for a module
of ``y``, ``rule(t, y, v, ...)`` for a module of ``(t, y)``; it returns ``(f, v^T df/dy,
[v^T df/dp for p in module.parameters()])``. The ``"autograd"`` VJP backend uses it when the
rule covers exactly the parameters being differentiated, and the autograd engine otherwise.

On small CPU tensors :class:`MLP` computes on NumPy (:mod:`odeflux.kernels.dense_layers`), and
hands a solve its evaluation and VJP rule on arrays through the array-kernel seam
(:class:`odeflux.kernels.ArrayKernelSource`: ``array_field(y)``, ``array_vjp(y)``), built for
that solve from the parameters as they are then.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .kernels import ArrayField, ArrayVJP, arrays
from .kernels.dense_layers import Kernels, StagePlan
from .solvers.tableau import _is_compiling

def _same_pair(a: tuple, b: tuple) -> bool:
    return a[0] is b[0] and a[1] is b[1]


def _layout(tensors: list[tuple]) -> list[tuple] | None:
    """Where each tensor's memory is and how it is laid out; ``None`` where a weight is missing
    (a parametrised one) or a tensor has no memory NumPy could read (a transform's wrapper)."""
    out = []
    try:
        for w, b in tensors:
            if w is None:
                return None
            for t in (w, b):
                out.append(None if t is None else (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device))
    except RuntimeError:
        return None
    return out


_aten = torch.ops.aten

# name -> (activation, its derivative as a function of (incoming gradient, activation output))
ACTIVATIONS: dict[str, tuple[Callable | None, Callable | None]] = {
    "tanh": (torch.tanh, _aten.tanh_backward),
    "sigmoid": (torch.sigmoid, _aten.sigmoid_backward),
    "relu": (torch.relu, lambda g, h: _aten.threshold_backward(g, h, 0.0)),
    "identity": (None, None),
}

VJPRuleResult = tuple[torch.Tensor, "torch.Tensor | None", "list[torch.Tensor] | None"]


class FrozenField(ArrayField):
    """An :class:`MLP` on its NumPy kernels for one solve (see :meth:`MLP.array_field`)."""

    def __init__(self, kernels: Kernels, d_in: int, out_shape: torch.Size):
        self.kernels, self.d_in, self.out_shape = kernels, d_in, out_shape

    def tensor(self, y: torch.Tensor) -> torch.Tensor:
        """``f(y)`` on tensors (viewing the arrays)."""
        out = self.kernels.output(arrays.as_array(y).reshape(-1, self.d_in))
        return torch.from_numpy(out.reshape(self.out_shape))

    def evaluate(self, t: float, x: np.ndarray, out: np.ndarray) -> None:
        self.kernels.output(x.reshape(-1, self.d_in), out.reshape(-1, self.out_shape[-1]))


class FrozenVJP(ArrayVJP):
    """An :class:`MLP`'s VJP rule on its NumPy kernels for one solve (see :meth:`MLP.array_vjp`)."""

    def __init__(self, kernels: Kernels, d_in: int):
        self.kernels, self.d_in, self.n_params = kernels, d_in, kernels.n_params

    def __call__(self, y: np.ndarray, v: np.ndarray, want_y: bool = True, want_p: bool = True, negate: bool = False) -> np.ndarray:
        return self.kernels.rule(y.reshape(-1, self.d_in), v, want_y, want_p, negate)[1]

    def stage_plan(self, ys: np.ndarray, negate: bool = False) -> StagePlan:
        return self.kernels.stage_plan(ys.reshape(-1, self.d_in), ys.shape[0], negate)


class MLP(nn.Module):
    """Dense layers with an activation after each (``Chain(Dense(a => b, act), ...)`` in Lux),
    with a hand-written VJP rule.

    ``layers`` are ``nn.Linear`` modules applied in order to the last axis of ``y``;
    ``activation`` is one of ``ACTIVATIONS`` (``"tanh"``, ``"sigmoid"``, ``"relu"``,
    ``"identity"``); ``final_activation=False`` leaves the last layer linear. The layers and
    activations are fixed at construction. ``vjp_rule=False`` (or setting ``use_vjp_rule``) hides
    the rule, so adjoints go through the autograd engine (for comparison);
    ``small_cpu_kernels=False`` (or setting it) keeps every evaluation on torch's ops.
    """

    def __init__(
        self,
        layers: Sequence[nn.Linear],
        activation: str = "tanh",
        *,
        final_activation: bool = True,
        vjp_rule: bool = True,
        small_cpu_kernels: bool = True,
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        if not layers or not all(isinstance(m, nn.Linear) for m in layers):
            raise TypeError("MLP takes a non-empty sequence of nn.Linear layers")
        for a, b in zip(layers, layers[1:]):
            if a.out_features != b.in_features:
                raise ValueError(f"layer sizes do not chain: {a.out_features} outputs feed {b.in_features} inputs")
        self.layers = nn.ModuleList(layers)
        self._activation = activation
        self._final_activation = final_activation
        self.use_vjp_rule = vjp_rule
        self.small_cpu_kernels = small_cpu_kernels
        last = len(layers) - 1
        self._set_activations([activation if (i < last or final_activation) else None for i in range(last + 1)])

    def _set_activations(self, names: Sequence[str | None]) -> None:
        # Per layer: the activation's name, (activation, derivative); worked out once, as the solver
        # calls f six times a step.
        self._act_names = list(names)
        self._acts = [ACTIVATIONS[a] if a is not None else (None, None) for a in self._act_names]

    @property
    def activation(self) -> str:
        return self._activation

    @property
    def final_activation(self) -> bool:
        return self._final_activation

    def extra_repr(self) -> str:
        return (
            f"activation={self._activation!r}, final_activation={self._final_activation}, "
            f"vjp_rule={self.use_vjp_rule}, small_cpu_kernels={self.small_cpu_kernels}"
        )

    def _check_layers(self) -> None:
        if len(self.layers) != len(self._acts):
            raise RuntimeError("MLP's layers changed after construction: build a new MLP with the new layers")

    def _tensors(self) -> list[tuple[torch.Tensor | None, torch.Tensor | None]]:
        # Read from the layers on every call: a replaced layer or parameter is seen at once.
        return [(layer._parameters.get("weight"), layer._parameters.get("bias")) for layer in self.layers]

    def _numpy_kernels(self, y: torch.Tensor, graph_free: bool = False) -> Kernels | None:
        """NumPy kernels over this module's parameters as they are now, when ``y`` is a small
        CPU tensor and nothing needs a graph (``graph_free``: the caller's result is never
        differentiated); ``None`` otherwise, for torch's kernels."""
        if _is_compiling() or not self.small_cpu_kernels or y.dtype not in arrays.DTYPES or not y.numel():
            return None  # (torch.compile traces torch's ops: checked first, before anything it cannot trace)
        tensors = self._tensors()
        width = max((max(w.shape) for w, _ in tensors if w is not None), default=0)
        if y.numel() // y.shape[-1] * width > arrays.MAX_ACTIVATION_SIZE:
            return None
        if not graph_free and torch.is_grad_enabled():
            if y.requires_grad or any(t is not None and t.requires_grad for pair in tensors for t in pair):
                return None
        if not arrays.readable(y):
            return None
        layout = _layout(tensors)
        if layout is None:
            return None  # a parametrised parameter (computed on access), or a tensor NumPy cannot read
        cached = self.__dict__.get("_kernel_cache")
        if cached is not None and cached[1] is y.dtype and cached[2] == layout:
            # The same memory, laid out the same: the arrays still view it (in-place updates, an
            # optimizer's step, load_state_dict show through; .to() or .double() moves it). New
            # tensor objects over it (a flat parameter vector's views, cut afresh each forward)
            # are checked for what NumPy would drop. (The cached arrays keep their memory alive,
            # so an equal address is that same memory.)
            if all(map(_same_pair, cached[0], tensors)) or all(arrays.untangled(t) for pair in tensors for t in pair if t is not None):
                self.__dict__["_kernel_cache"] = (tensors,) + cached[1:]
                return cached[3]
            return None
        for (w, b), layer in zip(tensors, self.layers):
            if (b is None) != (layer.bias is None):
                return None
            if any(t.dtype != y.dtype or not arrays.readable(t) for t in (w, b) if t is not None):
                return None  # another dtype or device (torch's own error message is the one to see), or a transform's
        kernels = Kernels([(arrays.as_array(w), None if b is None else arrays.as_array(b)) for w, b in tensors], self._act_names)
        self.__dict__["_kernel_cache"] = (tensors, y.dtype, layout, kernels)
        return kernels

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        self._check_layers()
        kernels = self._numpy_kernels(y)
        if kernels is not None:
            with arrays.one_blas_thread:
                return self._field(kernels, y).tensor(y)
        for layer, (act, _) in zip(self.layers, self._acts):
            y = F.linear(y, layer.weight, layer.bias)
            if act is not None:
                y = act(y)
        return y

    def _form(self, y: torch.Tensor, vjp: bool) -> FrozenField | FrozenVJP | None:
        self._check_layers()
        kernels = self._numpy_kernels(y, graph_free=vjp)
        if kernels is None or (vjp and not self.use_vjp_rule):
            return None
        # Kept with the kernels (which live as long as the parameters' memory does), and brought up
        # to date here: each solve's form sees the biases as they are now.
        forms = kernels.__dict__.setdefault("frozen_forms", {})
        key = (vjp, y.shape)
        form = forms.get(key)
        if form is not None:
            form.kernels.refresh_rows()
            return form
        if len(forms) >= 8:  # (many state shapes: keep a few, not one per shape ever seen)
            forms.clear()
        tiled = kernels.for_rows(y.numel() // y.shape[-1])  # biases laid out per row
        form = FrozenVJP(tiled, y.shape[-1]) if vjp else self._field(tiled, y)
        forms[key] = form
        return form

    def array_field(self, y: torch.Tensor) -> FrozenField | None:
        """``f`` on the NumPy kernels for one solve from states like ``y`` (same shape and dtype),
        the parameters as they are now; ``None`` where the kernels do not apply."""
        return self._form(y, vjp=False)

    def array_vjp(self, y: torch.Tensor) -> FrozenVJP | None:
        """The VJP rule on the NumPy kernels for one solve from states like ``y``; ``None`` where
        the kernels do not apply or the rule is off."""
        return self._form(y, vjp=True)

    def _field(self, kernels: Kernels, y: torch.Tensor) -> FrozenField:
        return FrozenField(kernels, y.shape[-1], y.shape[:-1] + (self.layers[-1].out_features,))

    @property
    def vjp_rule(self) -> Callable[..., VJPRuleResult] | None:
        """``(y, v, want_y=True, want_p=True) -> (f(y), v^T df/dy, [v^T df/dp])``, parameters in
        ``self.parameters()`` order (``None`` where not wanted); ``None`` when disabled."""
        return self._vjp if self.use_vjp_rule else None

    def _vjp(self, y: torch.Tensor, v: torch.Tensor, want_y: bool = True, want_p: bool = True) -> VJPRuleResult:
        self._check_layers()
        kernels = self._numpy_kernels(y, graph_free=True)
        if kernels is not None:
            x = arrays.as_array(y).reshape(-1, y.shape[-1])
            with arrays.one_blas_thread:
                f, out = kernels.rule(x, arrays.as_array(v), want_y, want_p)
            flat = torch.from_numpy(out)
            gy = flat[: x.size].view(y.shape) if want_y else None
            gp = None
            if want_p:
                shapes = [t.shape for layer in self.layers for t in (layer.weight, layer.bias) if t is not None]
                chunks = flat[x.size * want_y :].split([math.prod(s) for s in shapes])
                gp = [c.view(s) for c, s in zip(chunks, shapes)]
            return torch.from_numpy(f).view(v.shape), gy, gp
        layers = list(self.layers)
        acts = self._acts
        with torch.no_grad():
            hs = [y.reshape(-1, y.shape[-1])]  # each layer's input, then the output
            for layer, (act, _) in zip(layers, acts):
                h = F.linear(hs[-1], layer.weight, layer.bias)
                hs.append(act(h) if act is not None else h)
            g = v.reshape(hs[-1].shape)
            grads_p: list[torch.Tensor] = []
            gy = None
            for i in range(len(layers) - 1, -1, -1):
                layer = layers[i]
                deriv = acts[i][1]
                if deriv is not None:
                    g = deriv(g, hs[i + 1])
                if want_p:  # built back to front, so each layer's pair goes in front
                    grads_p[:0] = [g.t().mm(hs[i])] if layer.bias is None else [g.t().mm(hs[i]), g.sum(0)]
                if i > 0:
                    g = g.mm(layer.weight)
                elif want_y:
                    gy = g.mm(layer.weight).view(y.shape)
        return hs[-1].view(v.shape), gy, (grads_p if want_p else None)


# -- nn.Sequential fields of dense layers ------------------------------------------------------
#: The activation modules a dense chain may use, by the name of their MLP activation.
ACTIVATION_MODULES: dict[type, str] = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.ReLU: "relu", nn.Identity: "identity"}

_CHAINS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[nn.Module, ...], MLP]] = weakref.WeakKeyDictionary()


_FORWARD_HOOKS = ("_forward_hooks", "_forward_pre_hooks")
_BACKWARD_HOOKS = ("_backward_hooks", "_backward_pre_hooks")


def has_hooks(*modules: nn.Module, backward: bool = False) -> bool:
    """Whether calling any of ``modules`` would run forward hooks (their own or global ones), or
    with ``backward`` backward hooks too: what a kernel computing without the module would skip."""
    kinds = _FORWARD_HOOKS + _BACKWARD_HOOKS if backward else _FORWARD_HOOKS
    glob = torch.nn.modules.module
    if any(getattr(glob, "_global" + kind, None) for kind in kinds):
        return True
    return any(getattr(m, kind) for m in modules for kind in kinds)


def dense_chain(module: nn.Module) -> MLP | None:
    """The :class:`MLP` that computes exactly what ``module`` computes, over the same layers, when
    ``module`` is an ``nn.Sequential`` of plain ``nn.Linear`` layers each followed by at most one
    ``nn.Tanh``, ``nn.Sigmoid``, ``nn.ReLU`` or ``nn.Identity`` (the exact classes: a subclass may
    compute something else), with no hooks anywhere (the MLP's kernels would skip them);
    ``None`` otherwise. So a field written the way most users write it gets the MLP's VJP rule
    and NumPy kernels, with the same results and autograd behaviour. Checked on every call (a
    replaced layer is seen at once), the MLP kept per ``Sequential`` while its layers stay."""
    if type(module) is not nn.Sequential:
        return None
    children = tuple(module._modules.values())
    kept = _CHAINS.get(module)
    if kept is not None and len(kept[0]) == len(children) and all(map(lambda a, b: a is b, kept[0], children)):
        return None if has_hooks(module, *children, backward=True) else kept[1]
    layers: list[nn.Linear] = []
    acts: list[str | None] = []
    for child in children:
        if type(child) is nn.Linear:
            layers.append(child)
            acts.append(None)
        elif type(child) in ACTIVATION_MODULES and layers and acts[-1] is None:
            acts[-1] = ACTIVATION_MODULES[type(child)]
        else:
            return None
    if not layers or any(a.out_features != b.in_features for a, b in zip(layers, layers[1:])):
        return None
    if has_hooks(module, *children, backward=True):
        return None
    mlp = MLP(layers, "identity")
    mlp._set_activations([None if a in (None, "identity") else a for a in acts])
    _CHAINS[module] = (children, mlp)
    return mlp
