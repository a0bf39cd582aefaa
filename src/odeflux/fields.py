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
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

_aten = torch.ops.aten

# name -> (activation, its derivative as a function of (incoming gradient, activation output))
ACTIVATIONS: dict[str, tuple[Callable | None, Callable | None]] = {
    "tanh": (torch.tanh, _aten.tanh_backward),
    "sigmoid": (torch.sigmoid, _aten.sigmoid_backward),
    "relu": (torch.relu, lambda g, h: _aten.threshold_backward(g, h, 0.0)),
    "identity": (None, None),
}

VJPRuleResult = tuple[torch.Tensor, "torch.Tensor | None", "list[torch.Tensor] | None"]


class MLP(nn.Module):
    """Dense layers with an activation after each (``Chain(Dense(a => b, act), ...)`` in Lux),
    with a hand-written VJP rule.

    ``layers`` are ``nn.Linear`` modules applied in order to the last axis of ``y``;
    ``activation`` is one of ``ACTIVATIONS`` (``"tanh"``, ``"sigmoid"``, ``"relu"``,
    ``"identity"``); ``final_activation=False`` leaves the last layer linear. The layers and
    activations are fixed at construction. ``vjp_rule=False`` (or setting ``use_vjp_rule``) hides
    the rule, so adjoints go through the autograd engine (for comparison).
    """

    def __init__(
        self,
        layers: Sequence[nn.Linear],
        activation: str = "tanh",
        *,
        final_activation: bool = True,
        vjp_rule: bool = True,
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
        last = len(layers) - 1
        # Per layer (activation, its derivative), worked out once: the solver calls f six times a step.
        self._acts = [ACTIVATIONS[activation] if (i < last or final_activation) else (None, None) for i in range(last + 1)]

    @property
    def activation(self) -> str:
        return self._activation

    @property
    def final_activation(self) -> bool:
        return self._final_activation

    def extra_repr(self) -> str:
        return f"activation={self._activation!r}, final_activation={self._final_activation}, vjp_rule={self.use_vjp_rule}"

    def _check_layers(self) -> None:
        if len(self.layers) != len(self._acts):
            raise RuntimeError("MLP's layers changed after construction: build a new MLP with the new layers")

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        self._check_layers()
        for layer, (act, _) in zip(self.layers, self._acts):
            y = F.linear(y, layer.weight, layer.bias)
            if act is not None:
                y = act(y)
        return y

    @property
    def vjp_rule(self) -> Callable[..., VJPRuleResult] | None:
        """``(y, v, want_y=True, want_p=True) -> (f(y), v^T df/dy, [v^T df/dp])``, parameters in
        ``self.parameters()`` order (``None`` where not wanted); ``None`` when disabled."""
        return self._vjp if self.use_vjp_rule else None

    def _vjp(self, y: torch.Tensor, v: torch.Tensor, want_y: bool = True, want_p: bool = True) -> VJPRuleResult:
        self._check_layers()
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
