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

On small CPU tensors outside autograd, :class:`MLP` computes on NumPy (:mod:`odeflux.small_cpu`),
and ``MLP.frozen(y)`` hands a solve its evaluation (:class:`FrozenField`) or VJP rule
(:class:`FrozenVJP`) with the per-call checks done once; the solver and the adjoints look for
those forms, and for ``vjp_rule_flat`` (the products already concatenated), by name.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from . import small_cpu
from .small_cpu import Kernels
from .solvers.tableau import _is_compiling

def _same_pair(a: tuple, b: tuple) -> bool:
    return a[0] is b[0] and a[1] is b[1]


def _layout(tensors: list[tuple]) -> list[tuple]:
    return [
        (t.shape, t.stride(), t.dtype, t.device) if t is not None else None for pair in tensors for t in pair
    ]  # fmt: skip


_aten = torch.ops.aten

# name -> (activation, its derivative as a function of (incoming gradient, activation output))
ACTIVATIONS: dict[str, tuple[Callable | None, Callable | None]] = {
    "tanh": (torch.tanh, _aten.tanh_backward),
    "sigmoid": (torch.sigmoid, _aten.sigmoid_backward),
    "relu": (torch.relu, lambda g, h: _aten.threshold_backward(g, h, 0.0)),
    "identity": (None, None),
}

VJPRuleResult = tuple[torch.Tensor, "torch.Tensor | None", "list[torch.Tensor] | None"]


class FrozenField:
    """An :class:`MLP` on its NumPy kernels for one solve (see :meth:`MLP.frozen`): ``f(y)``."""

    def __init__(self, kernels: Kernels, d_in: int, out_shape: torch.Size):
        self.kernels, self.d_in, self.out_shape = kernels, d_in, out_shape

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        out = self.kernels.output(small_cpu.as_array(y).reshape(-1, self.d_in))
        return torch.from_numpy(out.reshape(self.out_shape))

    def on_arrays(self, x: np.ndarray, out: np.ndarray) -> None:
        """``f`` of the state's array ``x`` written into the flat array ``out`` (both of the
        state's size): for :func:`odeflux.small_cpu.rk_step`, which then needs no tensors at all."""
        self.kernels.output(x.reshape(-1, self.d_in), out.reshape(-1, self.out_shape[-1]))


class FrozenVJP:
    """An :class:`MLP`'s flattened VJP rule on its NumPy kernels for one solve (see
    :meth:`MLP.frozen`): ``(y, v, want_y=True, negate=False) -> [v^T df/dy, *v^T df/dp]``."""

    def __init__(self, kernels: Kernels, d_in: int, n_params: int):
        self.kernels, self.d_in, self.n_params = kernels, d_in, n_params

    def __call__(self, y: torch.Tensor, v: torch.Tensor, want_y: bool = True, negate: bool = False) -> torch.Tensor:
        return torch.from_numpy(self.on_arrays(small_cpu.as_array(y), small_cpu.as_array(v), want_y, True, negate))

    def on_arrays(self, y: np.ndarray, v: np.ndarray, want_y: bool = True, want_p: bool = True, negate: bool = False) -> np.ndarray:
        """The rule on the arrays of a state and a cotangent (any shapes of the state's size):
        ``[v^T df/dy (if want_y), *v^T df/dp (if want_p)]`` as one flat array."""
        hs = self.kernels.forward(y.reshape(-1, self.d_in), keep=True)
        g = v.reshape(hs[-1].shape)
        out = np.empty(hs[0].size * want_y + self.n_params * want_p, dtype=hs[0].dtype)
        self.kernels.vjp(hs, -g if negate else g, out, want_y, want_p)
        return out

    def stage_plan(self, ys: np.ndarray, negate: bool = False) -> small_cpu.StagePlan:
        """For ``m`` states stacked as an ``(m, state size)`` array, all known in advance (a
        Runge-Kutta step's stages): one forward pass over all of them, then the rule per state in
        two parts (:class:`odeflux.small_cpu.StagePlan`)."""
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
        self._max_width = max(max(m.in_features, m.out_features) for m in layers)
        self._n_params = sum(p.numel() for m in layers for p in m.parameters())
        last = len(layers) - 1
        # Per layer: the activation's name, (activation, derivative); worked out once, as the solver
        # calls f six times a step.
        self._act_names = [activation if (i < last or final_activation) else None for i in range(last + 1)]
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

    def _small_cpu(self, y: torch.Tensor, graph_free: bool = False) -> Kernels | None:
        """NumPy kernels over this module's parameters when ``y`` is a small CPU tensor and nothing
        needs a graph (``graph_free``: the caller's result is never differentiated); ``None``
        otherwise, for torch's kernels."""
        if _is_compiling() or not self.small_cpu_kernels or y.dtype not in small_cpu.DTYPES or not y.numel():
            return None  # (torch.compile traces torch's ops: checked first, before anything it cannot trace)
        if y.numel() // y.shape[-1] * self._max_width > small_cpu.MAX_ACTIVATION_SIZE or not small_cpu.plain(y):
            return None
        slots = self.__dict__.get("_param_slots")
        if slots is None:  # per layer, its parameter dict: cheaper than module attribute access
            slots = self.__dict__["_param_slots"] = [layer._parameters for layer in self.layers]
        tensors = [(d.get("weight"), d.get("bias")) for d in slots]
        if not graph_free and torch.is_grad_enabled():
            if y.requires_grad or any(t is not None and t.requires_grad for pair in tensors for t in pair):
                return None
        ptrs = [(w.data_ptr(), b.data_ptr() if b is not None else 0) for w, b in tensors]
        cached = self.__dict__.get("_kernel_cache")
        # Same tensors at the same addresses: the arrays still view them (in-place updates show
        # through; .to()/.double() or a new parameter moves the data, and the kernels are rebuilt).
        if cached is not None and cached[1] is y.dtype and cached[2] == ptrs:
            if all(map(_same_pair, cached[0], tensors)):
                return cached[3]
            # New tensor objects over the same memory, laid out the same (a flat parameter vector's
            # views, cut afresh each forward): the arrays view them just as well. (The cached
            # arrays keep their memory alive, so an equal address is that same memory.)
            if _layout(tensors) == cached[4]:
                self.__dict__["_kernel_cache"] = (tensors,) + cached[1:]
                return cached[3]
        layers = list(self.layers)
        for (w, b), layer in zip(tensors, layers):
            if w is None or (b is None) != (layer.bias is None):
                return None  # a parametrised parameter (computed on access): leave it to torch
            if any(t.device.type != "cpu" or t.dtype != y.dtype for t in (w, b) if t is not None):
                return None  # torch's own error message is the one to see
        arrays = [(small_cpu.as_array(w), None if b is None else small_cpu.as_array(b)) for w, b in tensors]
        kernels = small_cpu.Kernels(arrays, self._act_names)
        self.__dict__["_kernel_cache"] = (tensors, y.dtype, ptrs, kernels, _layout(tensors))
        return kernels

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        self._check_layers()
        kernels = self._small_cpu(y)
        if kernels is not None:
            with small_cpu.one_blas_thread:
                return self._field(kernels, y)(y)
        for layer, (act, _) in zip(self.layers, self._acts):
            y = F.linear(y, layer.weight, layer.bias)
            if act is not None:
                y = act(y)
        return y

    def frozen(self, y: torch.Tensor, vjp: bool = False) -> Callable[..., torch.Tensor] | None:
        """For one solve from states like ``y`` (same shape, dtype, device) with the parameters
        left where they are: ``f(y)`` on the NumPy kernels, or with ``vjp`` the flattened rule
        ``(y, v, want_y=True, negate=False)``, with the per-call checks done once, here. ``None``
        where the kernels do not apply (or, with ``vjp``, the rule is off)."""
        self._check_layers()
        kernels = self._small_cpu(y, graph_free=vjp)
        if kernels is None or (vjp and not self.use_vjp_rule):
            return None
        # Kept with the kernels (which live as long as the parameters' memory and layout do), and
        # brought up to date here: each solve's form sees the biases as they are now.
        forms = kernels.__dict__.setdefault("frozen_forms", {})
        key = (vjp, y.shape)
        form = forms.get(key)
        if form is not None:
            form.kernels.refresh_rows()
            return form
        if len(forms) >= 8:  # (many state shapes: keep a few, not one per shape ever seen)
            forms.clear()
        tiled = kernels.for_rows(y.numel() // y.shape[-1])  # biases laid out per row
        form = FrozenVJP(tiled, y.shape[-1], self._n_params) if vjp else self._field(tiled, y)
        forms[key] = form
        return form

    def _field(self, kernels: Kernels, y: torch.Tensor) -> FrozenField:
        return FrozenField(kernels, y.shape[-1], y.shape[:-1] + (self.layers[-1].out_features,))

    @property
    def vjp_rule(self) -> Callable[..., VJPRuleResult] | None:
        """``(y, v, want_y=True, want_p=True) -> (f(y), v^T df/dy, [v^T df/dp])``, parameters in
        ``self.parameters()`` order (``None`` where not wanted); ``None`` when disabled."""
        return self._vjp if self.use_vjp_rule else None

    @property
    def vjp_rule_flat(self) -> Callable[..., torch.Tensor] | None:
        """``(y, v, want_y=True, negate=False) -> [v^T df/dy (if want_y), *v^T df/dp]`` flattened
        into one vector (negated with ``negate``): what an adjoint's right-hand side needs, with
        no concatenation left to do. ``None`` when the rule is disabled."""
        return self._vjp_flat if self.use_vjp_rule else None

    def _vjp_flat(self, y: torch.Tensor, v: torch.Tensor, want_y: bool = True, negate: bool = False) -> torch.Tensor:
        self._check_layers()
        kernels = self._small_cpu(y, graph_free=True)
        if kernels is None:
            _, gy, gp = self._vjp(y, v.neg() if negate else v, want_y=want_y)
            return torch.cat(([gy.reshape(-1)] if want_y else []) + [g.reshape(-1) for g in gp])
        with small_cpu.one_blas_thread:
            return FrozenVJP(kernels, y.shape[-1], self._n_params)(y, v, want_y=want_y, negate=negate)

    def _vjp(self, y: torch.Tensor, v: torch.Tensor, want_y: bool = True, want_p: bool = True) -> VJPRuleResult:
        self._check_layers()
        kernels = self._small_cpu(y, graph_free=True)
        if kernels is not None:
            x = small_cpu.as_array(y).reshape(-1, y.shape[-1])
            with small_cpu.one_blas_thread:
                hs = kernels.forward(x, keep=True)
                out = np.empty(x.size * want_y + self._n_params * want_p, dtype=x.dtype)
                if want_y or want_p:
                    kernels.vjp(hs, small_cpu.as_array(v).reshape(hs[-1].shape), out, want_y, want_p)
            flat = torch.from_numpy(out)
            gy = flat[: x.size].view(y.shape) if want_y else None
            gp = None
            if want_p:
                shapes = [t.shape for layer in self.layers for t in (layer.weight, layer.bias) if t is not None]
                chunks = flat[x.size * want_y :].split([math.prod(s) for s in shapes])
                gp = [c.view(s) for c, s in zip(chunks, shapes)]
            return torch.from_numpy(hs[-1]).view(v.shape), gy, gp
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
