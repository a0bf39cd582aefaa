"""NumPy kernels for a chain of dense layers: the forward pass, its VJP, and stage plans.

:class:`odeflux.fields.MLP` hands these to a solve through the array-kernel seam
(:mod:`odeflux.kernels`): its evaluations and its VJP rule on NumPy arrays that view the
parameters' memory, a fraction of torch's per-op cost at the tutorial's sizes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

def _sigmoid(h: np.ndarray) -> None:
    np.negative(h, out=h)
    np.exp(h, out=h)
    h += 1.0
    np.reciprocal(h, out=h)


def _d_tanh(g: np.ndarray, h: np.ndarray) -> np.ndarray:
    return g - g * h * h


def _d_sigmoid(g: np.ndarray, h: np.ndarray) -> np.ndarray:
    return g * h * (1.0 - h)


def _d_relu(g: np.ndarray, h: np.ndarray) -> np.ndarray:
    return g * (h > 0)


# activation name -> (in-place activation, derivative from (incoming gradient, activation output))
ACTIVATIONS = {
    "tanh": (lambda h: np.tanh(h, out=h), _d_tanh),
    "sigmoid": (_sigmoid, _d_sigmoid),
    "relu": (lambda h: np.maximum(h, 0.0, out=h), _d_relu),
    "identity": (None, None),
}


def _factor_tanh(h: np.ndarray) -> np.ndarray:
    f = h * h
    return np.subtract(1.0, f, out=f)


def _factor_sigmoid(h: np.ndarray) -> np.ndarray:
    f = np.subtract(1.0, h)
    f *= h
    return f


def _neg_factor_tanh(h: np.ndarray) -> np.ndarray:
    f = h * h
    f -= 1.0
    return f


def _neg_factor_sigmoid(h: np.ndarray) -> np.ndarray:
    f = h - 1.0
    f *= h
    return f


# activation name -> its derivative as a factor of the activation output, a new array (for
# StagePlan, which computes it once for many gradients), and that factor negated (as cheap)
FACTORS = {
    "tanh": _factor_tanh,
    "sigmoid": _factor_sigmoid,
    "relu": lambda h: (h > 0).astype(h.dtype),
    "identity": None,
}
NEG_FACTORS = {
    "tanh": _neg_factor_tanh,
    "sigmoid": _neg_factor_sigmoid,
    "relu": lambda h: np.negative((h > 0).astype(h.dtype)),
    "identity": None,
}


def _rows_of(b: np.ndarray, rows: int) -> np.ndarray:
    out = np.empty((rows, b.size), dtype=b.dtype)
    out[...] = b
    return out


class Kernels:
    """The forward pass and VJP of ``layers`` (``(weight, bias or None)`` arrays with one
    activation each) on arrays of shape ``(rows, features)``."""

    def __init__(self, params: Sequence[tuple[np.ndarray, np.ndarray | None]], acts: Sequence[str | None]):
        self.params = list(params)
        self.forward_params = [(w.T, b) for w, b in self.params]  # x @ W^T + b, the transpose made once
        self._ones_cache: dict[tuple[int, np.dtype], np.ndarray] = {}
        self.act_names = list(acts)
        self.acts = [ACTIVATIONS[a or "identity"] for a in acts]
        self.n_params = sum(w.size + (0 if b is None else b.size) for w, b in self.params)
        self._chain()

    def _chain(self) -> None:
        # (W^T, bias, activation) per layer: what the forward loops read
        self.chain = [(wt, b, act) for (wt, b), (act, _) in zip(self.forward_params, self.acts)]

    def _ones(self, rows: int, dtype: np.dtype) -> np.ndarray:
        ones = self._ones_cache.get((rows, dtype))
        if ones is None:
            ones = self._ones_cache[(rows, dtype)] = np.ones(rows, dtype=dtype)
        return ones

    def for_rows(self, rows: int) -> Kernels:
        """These kernels with each bias copied out to ``rows`` rows, for solves of states with
        ``rows`` rows (or stacks of them): adding a bias of the output's own shape takes a third
        of the time of a broadcast add. The copies are taken now, so in-place updates of the
        biases show through only after :meth:`refresh_rows` (a solve's array form calls it)."""
        tiled = object.__new__(Kernels)
        tiled.__dict__.update(self.__dict__)
        tiled._bias_sources = [b for _, b in self.forward_params]
        tiled.forward_params = [(wt, None if b is None else _rows_of(b, rows)) for wt, b in self.forward_params]
        tiled._chain()
        return tiled

    def refresh_rows(self) -> None:
        """Copy the biases' current values into the row copies of :meth:`for_rows`."""
        for (_, rows), b in zip(self.forward_params, self.__dict__.get("_bias_sources", ())):
            if b is not None:
                rows[...] = b

    def output(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The last layer's output of ``x`` (``(rows, features)``, rows matching a :meth:`for_rows`
        copy), written into ``out`` (``(rows, outputs)``) if given: :meth:`forward` without the
        list of activations, a solve's f evaluation."""
        h, last = x, len(self.chain) - 1
        for i, (wt, b, act) in enumerate(self.chain):
            h = np.dot(h, wt) if i < last or out is None else np.dot(h, wt, out=out)
            if b is not None:
                h += b
            if act is not None:
                act(h)
        return h

    def forward(self, x: np.ndarray, keep: bool = False) -> list[np.ndarray]:
        """Each layer's output (with ``keep``, the input first and every layer's output)."""
        hs = [x]
        for wt, b, act in self.chain:
            h = np.dot(hs[-1], wt)  # np.dot: the shortest path to BLAS for 2-d arrays
            if b is not None:
                if b.ndim == 2 and b.shape[0] != h.shape[0]:  # a stack of states: (m, rows, width)
                    h3 = h.reshape(-1, *b.shape)
                    np.add(h3, b, out=h3)
                else:
                    h += b
            if act is not None:
                act(h)
            if keep:
                hs.append(h)
            else:
                hs[-1] = h
        return hs

    def param_views(self, out: np.ndarray) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Per layer, ``(dW, db)`` views of ``out``, whose last axis holds the flat parameter
        products in the layers' ``(weight, bias)`` order (any leading axes are kept)."""
        views, at, lead = [], 0, out.shape[:-1]
        for w, b in self.params:
            dw = out[..., at : at + w.size].reshape(lead + w.shape)
            at += w.size
            db = None
            if b is not None:
                db = out[..., at : at + b.size]
                at += b.size
            views.append((dw, db))
        return views

    def vjp(self, hs: list[np.ndarray], v: np.ndarray, out: np.ndarray, want_y: bool, want_p: bool) -> None:
        """Writes ``[v^T df/dx (if want_y), v^T df/dW_1, v^T df/db_1, ...]`` into the flat ``out``,
        given the activations ``hs`` from ``forward(x, keep=True)``."""
        n_y = hs[0].size if want_y else 0
        slots = self.param_views(out[n_y:]) if want_p else None
        ones = self._ones(v.shape[0], v.dtype) if want_p else None
        g = v
        for i in range(len(self.params) - 1, -1, -1):
            w = self.params[i][0]
            deriv = self.acts[i][1]
            if deriv is not None:
                g = deriv(g, hs[i + 1])
            if want_p:
                dw, db = slots[i]
                np.dot(g.T, hs[i], out=dw)
                if db is not None:
                    np.dot(ones, g, out=db)  # the sum over rows, as a product: a quarter of np.sum's time
            if i > 0:
                g = np.dot(g, w)
            elif want_y:
                np.dot(g, w, out=out[:n_y].reshape(g.shape[0], -1))

    def rule(self, x: np.ndarray, v: np.ndarray, want_y: bool, want_p: bool, negate: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The forward pass of ``x`` (``(rows, features)``) and, as one new flat array,
        ``[v^T df/dx (if want_y), v^T df/dp (if want_p)]`` (negated with ``negate``)."""
        hs = self.forward(x, keep=True)
        g = v.reshape(hs[-1].shape)
        out = np.empty(x.size * want_y + self.n_params * want_p, dtype=x.dtype)
        if want_y or want_p:
            self.vjp(hs, -g if negate else g, out, want_y, want_p)
        return hs[-1], out

    def stage_plan(self, x: np.ndarray, m: int, negate: bool = False) -> StagePlan:
        """The VJP over ``m`` states stacked in ``x`` (``(m * rows, features)``): see :class:`StagePlan`."""
        return StagePlan(self, x, m, negate)


class StagePlan:
    """The VJP of :class:`Kernels` over ``m`` states known in advance (a Runge-Kutta step's stages)
    whose cotangents ``v_j`` come one at a time, each depending on the last.

    An adjoint needs ``v_j^T df/dy`` at once (it gives the next stage's state) but ``v_j^T df/dp``
    only summed over the step. So the forward pass over all states, with each activation's
    derivative, is done here once; :meth:`stage` then costs a product and a multiply per layer,
    keeping each layer's gradient; and :meth:`params_into` / :meth:`params_total` turn those into
    the parameter products for all states in one batched product per layer, instead of two small
    ones per layer and state. With ``negate`` every product comes negated (the sign is folded into
    the last layer's factor: no extra pass).
    """

    def __init__(self, kernels: Kernels, x: np.ndarray, m: int, negate: bool):
        self.kernels, self.m, self.dtype = kernels, m, x.dtype
        rows = self.rows = x.shape[0] // m
        hs = kernels.forward(x, keep=True)
        self.inputs = [h.reshape(m, rows, h.shape[-1]) for h in hs[:-1]]  # each layer's input
        self.factors: list[np.ndarray | None] = []
        last = len(hs) - 2
        for i, h in enumerate(hs[1:]):
            make = (NEG_FACTORS if negate and i == last else FACTORS)[kernels.act_names[i] or "identity"]
            self.factors.append(None if make is None else make(h).reshape(m, rows, h.shape[-1]))
        self.grads = [np.empty((m, rows, w.shape[0]), dtype=x.dtype) for w, _ in kernels.params]  # dL/d(pre-activation)
        # Back to front, what stage() reads per layer: (gradients, factors, weight, negate-only)
        self._back = [
            (self.grads[i], self.factors[i], kernels.params[i][0], i == last and negate)
            for i in range(last, -1, -1)
        ]  # fmt: skip

    def stage(self, j: int, v: np.ndarray, out: np.ndarray | None = None) -> np.ndarray | None:
        """``v^T df/dy`` at state ``j`` into ``out`` (flat, the state's size; with no ``out``,
        not computed); keeps what :meth:`params_into` needs."""
        g, first = v.reshape(self.rows, -1), len(self._back) - 1
        for k, (grads, factors, w, negate_only) in enumerate(self._back):
            gi = grads[j]
            if factors is not None:
                np.multiply(g, factors[j], out=gi)
            elif negate_only:
                np.negative(g, out=gi)
            else:
                gi[...] = g
            if k < first:
                g = np.dot(gi, w)
            elif out is not None:  # the first layer's product is v^T df/dy itself
                np.dot(gi, w, out=out.reshape(self.rows, -1))
        return out

    def params_into(self, out: np.ndarray) -> None:
        """Row ``j`` of ``out`` (``(m, n_params)``, rows may be strided) gets ``v_j^T df/dp``, in
        the layers' ``(weight, bias)`` order; every state's :meth:`stage` must have run."""
        if self.m == 1:  # one state (an adjoint's single evaluation): plain products cost less than stacked ones
            self.params_total(out[0])
            return
        ones = self.kernels._ones(self.rows, self.dtype)
        for (dw, db), g, x in zip(self.kernels.param_views(out), self.grads, self.inputs):
            np.matmul(g.transpose(0, 2, 1), x, out=dw)
            if db is not None:
                np.matmul(ones, g, out=db)

    def params_total(self, out: np.ndarray) -> None:
        """``sum_j v_j^T df/dp`` into the flat ``out`` (one product per layer over all states)."""
        ones = self.kernels._ones(self.m * self.rows, self.dtype)
        for (dw, db), g, x in zip(self.kernels.param_views(out), self.grads, self.inputs):
            g2 = g.reshape(-1, g.shape[-1])
            np.dot(g2.T, x.reshape(-1, x.shape[-1]), out=dw)
            if db is not None:
                np.dot(ones, g2, out=db)
