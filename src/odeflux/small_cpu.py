"""NumPy kernels for small CPU tensors outside autograd: a dense-layer vector field and the RK step.

On the tutorial's sizes (a 128 x 20 state, 10-wide layers) every torch op costs 3-6 us, mostly
dispatch and set-up, while the same matrix product through NumPy's BLAS takes about 1.3 us and
NumPy's ``tanh`` (a SIMD kernel) 0.6 us against torch's 3.5-6 us (measured on this project's
machine; the README's Performance section has the training-step numbers). A training step calls
the field some 40 times and takes ~10 Runge-Kutta steps, so where nothing needs a graph (the
continuous adjoints' solves) and the tensors are small, on the CPU and plain (no ``torch.func``
transform or forward-mode AD about), :class:`odeflux.fields.MLP` hands its evaluations and its
VJP rule to these kernels, and the integrator its steps. The arrays share memory with the
tensors: nothing is copied in or out, and in-place updates of the parameters show through.
"""

from __future__ import annotations

import math
import threading
from typing import Sequence

import numpy as np
import torch

#: Above this many numbers in the widest activation, torch's kernels (and its threads) win.
MAX_ACTIVATION_SIZE = 1 << 16
DTYPES = (torch.float32, torch.float64)


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


def as_array(t: torch.Tensor) -> np.ndarray:
    """The tensor's memory as an array (no copy)."""
    if t.requires_grad:
        t = t.detach()
    try:
        return t.numpy()
    except RuntimeError:  # a lazy negation or conjugation (checking first would cost every call)
        return t.resolve_neg().resolve_conj().numpy()


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
        biases show through only after :meth:`refresh_rows` (a solve's frozen form calls it)."""
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


# -- BLAS threads ------------------------------------------------------------------------------
class _OneBLASThread:
    """Runs NumPy's BLAS on one thread while the block runs (nestable, restored after).

    These kernels' products are too small to gain much from threads, yet some pass OpenBLAS's
    threading thresholds (an RK step's stage sums over the whole state; a stage plan's batched
    products). With torch's own thread pool active on the same cores, OpenBLAS's worker threads
    then wait on each other: measured on 2 cores with 2 torch threads, a batch-512 tutorial epoch
    took 2-3 times as long without this (benchmarks/blas_threads.py). The setting is
    process-wide while it lasts. Needs ``threadpoolctl``; without it this does nothing.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._libs: list | None = None
        self._saved: list[int] = []

    def _controllers(self) -> list:
        if self._libs is None:
            try:
                from threadpoolctl import ThreadpoolController

                self._libs = list(ThreadpoolController().select(user_api="blas").lib_controllers)
            except Exception:  # noqa: BLE001 (no threadpoolctl, or a BLAS it cannot drive: leave the threads alone)
                self._libs = []
        return self._libs

    def __enter__(self) -> None:
        with self._lock:
            if self._depth == 0:
                libs = self._controllers()
                self._saved = [lib.get_num_threads() for lib in libs]
                for lib, n in zip(libs, self._saved):
                    if n != 1:
                        lib.set_num_threads(1)
            self._depth += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                for lib, n in zip(self._libs or [], self._saved):
                    if n != 1:
                        lib.set_num_threads(n)


#: ``with one_blas_thread:`` around work on these kernels (see :class:`_OneBLASThread`).
one_blas_thread = _OneBLASThread()


# -- the Runge-Kutta step ------------------------------------------------------------------------
#: States up to this many numbers take the NumPy step (the tutorial's: 2560, its adjoint's 3100).
MAX_STATE_SIZE = 1 << 16


_functorch = torch._C._functorch
_transform_active = getattr(_functorch, "peek_interpreter_stack", lambda: None)
_functorch_wrapped = getattr(_functorch, "is_functorch_wrapped_tensor", lambda t: False)


def _autocast_cpu() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def plain(t: torch.Tensor) -> bool:
    """Whether ``t`` is a plain, dense CPU tensor NumPy can read in full (not a subclass with
    behaviour of its own), and nothing would miss the work: no ``torch.func`` transform (vmap,
    jacfwd, grad, ...) running, no forward-mode AD level open (its tangents would be dropped), no
    CPU autocast (it would compute in another precision)."""
    return (
        type(t) in _PLAIN_TYPES and t.device.type == "cpu" and t.layout == torch.strided
        and _transform_active() is None and not _functorch_wrapped(t)
        and torch.autograd.forward_ad._current_level < 0 and not _autocast_cpu()
    )  # fmt: skip


def applies_to(y: torch.Tensor) -> bool:
    """Whether ``y`` is a state for these kernels: small, plain (:func:`plain`), float32 or float64."""
    return y.dtype in DTYPES and 0 < y.numel() <= MAX_STATE_SIZE and plain(y)


def step_applies(y: torch.Tensor) -> bool:
    """Whether :func:`rk_step` may take the step from ``y``: :func:`applies_to` it, outside
    autograd (a graph through the step is the discrete adjoint's, and needs torch's ops)."""
    return not torch.is_grad_enabled() and applies_to(y)


def coefficients(solver, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``[1 | a]`` (stages x (1 + stages)), ``[1, b]`` and ``b_err`` of the tableau as arrays of
    ``dtype``, cached on the solver: with the step's start as row 0 of the stage buffer, a stage's
    state is one product with a row of the first."""
    key = ("numpy", dtype)
    cached = solver._cache.get(key)
    if cached is None:
        tab = solver.tableau
        np_dtype = np.float32 if dtype == torch.float32 else np.float64
        s = tab.stages
        a = np.zeros((s, s + 1))
        a[:, 0] = 1.0
        a[:, 1:] = tab.a_matrix()
        b = np.concatenate(([1.0], tab.b))
        err = None if tab.b_err is None else np.asarray(tab.b_err, dtype=np_dtype)
        cached = solver._cache[key] = (a.astype(np_dtype), b.astype(np_dtype), err)
    return cached


def rk_step(solver, f, t, y: torch.Tensor, dt: float, k1: torch.Tensor, co, rtol: float, atol: float, n: int | None):
    """:func:`odeflux.integrator.rk_step_with_error` on NumPy arrays: the same stages, sums and
    error norm, with the stage derivatives written into one buffer as they come (no re-stacking
    per stage). ``f`` still gets and returns tensors (views of the arrays), unless it offers
    ``on_arrays(t, x, out)``, which writes ``f`` of the flat array ``x`` into the flat ``out``.
    A right-hand side with ``prepare_step(t, dt)`` hears of each step first and may answer with a
    plan for it: ``plan.n``, how many leading entries of the state a stage's
    derivative depends on and the plan computes per stage; ``plan.stage(i, head, out)``, the first
    ``n`` entries of stage ``i``'s derivative from the first ``n`` of its state; and
    ``plan.finish(out)``, the other entries of stages 2.. all at once (an adjoint's ``mu``).
    Returns the new state, the stacked stages (tensors) and the error norm (a float, or ``None``)."""
    a, b, e = coefficients(solver, y.dtype)
    c = solver.tableau.c
    s, shape = len(c), y.shape
    y0 = as_array(y).reshape(-1)
    X = np.empty((s + 1, y0.size), dtype=y0.dtype)  # the start, then the stage derivatives
    X[0] = y0
    X[1] = as_array(k1).reshape(-1)
    coef = a * dt
    coef[:, 0] = 1.0
    on_arrays = getattr(f, "on_arrays", None)  # a frozen field that takes arrays: no tensors at all
    prepare = getattr(f, "prepare_step", None)  # a right-hand side that batches work over the stages
    plan = prepare(t, dt) if prepare is not None else None
    yi = y0
    if plan is not None:
        # A split right-hand side (an adjoint's lambda and mu): the stages compute their first
        # plan.n entries from the first plan.n of the state alone; the rest of every new stage
        # comes at the end, all at once (plan.finish).
        m = plan.n
        for i in range(1, s):
            plan.stage(i, np.dot(coef[i, : i + 1], X[: i + 1, :m]), X[i + 1, :m])
        plan.finish(X[2:, m:])
        if solver.tableau.fsal:
            yi = np.dot(coef[s - 1, :s], X[:s])
    else:
        for i in range(1, s):
            yi = np.dot(coef[i, : i + 1], X[: i + 1])
            if on_arrays is not None:
                on_arrays(t + c[i] * dt, yi, X[i + 1])
            else:
                X[i + 1] = as_array(f(t + c[i] * dt, torch.from_numpy(yi.reshape(shape)))).reshape(-1)
    K = X[1:]
    if not solver.tableau.fsal:
        bb = b * dt
        bb[0] = 1.0
        yi = np.dot(bb, X)
    y1, K_t = torch.from_numpy(yi.reshape(shape)), torch.from_numpy(K.reshape((s,) + tuple(shape)))
    if e is None:
        return y1, K_t, None
    err = np.dot(e, K)
    if n is not None:
        err, y0, yi = err[:n], y0[:n], yi[:n]
    # ||dt e.K / (atol + rtol s)|| = |dt| / rtol * ||e.K / (atol / rtol + s)||: two passes fewer
    scale = np.maximum(np.abs(y0), np.abs(yi))
    scale += atol / rtol
    err /= scale
    return y1, K_t, abs(dt) / rtol * math.sqrt(float(np.dot(err, err)) / err.size)
