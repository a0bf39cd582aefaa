"""Vector-Jacobian products of the vector field: ``v^T df/dy`` and ``v^T df/dp``, four ways.

- ``autograd``: record ``f`` once and call ``torch.autograd.grad`` (works for any ``f``).
- ``func``: ``torch.func.vjp`` of a functional form of ``f`` (parameters substituted by name).
- ``compile``: that same VJP compiled once with ``torch.compile`` and reused across steps.
- ``jacobian``: an explicit Jacobian by forward mode (``torch.func.jacfwd``), for small states.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from .. import torch_imports
from ..kernels import ArrayKernelSource, ArrayVJP
from ..solution import BackwardStats

if TYPE_CHECKING:
    from ..kernels.dense_layers import StagePlan
    from ..problem import Problem

VJPResult = tuple["torch.Tensor | None", "torch.Tensor | None", "list[torch.Tensor] | None"]


class VJPBackend:
    """``(t, y, v) -> (f(t, y) if want_f, v^T df/dy if want_y, [v^T df/dp_i] if want_p)``."""

    def __init__(self, problem: Problem, params: list[torch.Tensor], stats: BackwardStats):
        self.problem = problem
        self.params = params
        self.stats = stats
        self.dtype = problem.y0.dtype
        self.device = problem.y0.device

    def time(self, t: float | torch.Tensor) -> torch.Tensor | float:
        if isinstance(t, torch.Tensor) or self.problem.float_time:
            return t
        return torch.full((), t, dtype=self.dtype, device=self.device)

    def __call__(self, t: float, y: torch.Tensor, v: torch.Tensor, want_y: bool = True, want_p: bool = True, want_f: bool = False) -> VJPResult:
        raise NotImplementedError

    def stage_plan(self, ys: np.ndarray, negate: bool = False) -> StagePlan | None:
        """For ``m`` states known in advance (a step's stages; an ``(m, state size)`` array of a
        small CPU state): the VJPs at all of them as one :class:`odeflux.kernels.dense_layers.StagePlan`, its
        ``v``-independent work done at once. ``None`` where the backend has no such form."""
        return None

    def on_arrays(self, y: np.ndarray, v: np.ndarray, want_p: bool = True, negate: bool = False) -> np.ndarray | None:
        """For one state known as an array (a small CPU state): ``[v^T df/dy, v^T df/dp (if
        want_p)]`` as one flat array, negated if asked. ``None`` where the backend has no such form."""
        return None

    def flat(
        self, t: float, y: torch.Tensor, v: torch.Tensor, want_y: bool = True, negate: bool = False
    ) -> torch.Tensor:
        """``[v^T df/dy (if want_y), v^T df/dp_1, ...]`` flattened into one vector, negated if asked
        (the adjoints' right-hand sides)."""
        _, gy, gp = self(t, y, v, want_y=want_y)
        out = torch.cat(([gy.reshape(-1)] if want_y else []) + [g.reshape(-1) for g in gp])
        return out.neg_() if negate else out


def find_vjp_rule(problem: Problem, params: list[torch.Tensor]) -> Callable[..., Any] | None:
    """``f``'s own VJP rule (see :mod:`odeflux.fields`), or ``None`` unless ``f`` has one and it
    covers exactly ``params``, in order."""
    f = problem.user_f
    if not isinstance(f, nn.Module) or problem.args is not None:
        return None
    rule = getattr(f, "vjp_rule", None)
    if rule is None:
        return None
    own = problem.f_params if problem.f_params is not None else list(f.parameters())
    if len(own) != len(params) or any(a is not b for a, b in zip(own, params)):
        return None  # frozen or extra parameters: the rule's products would not line up
    return rule


def find_array_vjp(problem: Problem, params: list[torch.Tensor], y: torch.Tensor) -> ArrayVJP | None:
    """``f``'s VJP rule on NumPy arrays for one solve from states like ``y``
    (:class:`odeflux.kernels.ArrayKernelSource`), where its rule covers exactly ``params``."""
    f = problem.user_f
    if not isinstance(f, ArrayKernelSource) or find_vjp_rule(problem, params) is None:
        return None
    return f.array_vjp(y)


class AutogradVJP(VJPBackend):
    """Reverse mode through the autograd engine, or through ``f``'s own VJP rule when it has one
    (as Zygote uses a layer's hand-written ``rrule``), on NumPy arrays where ``f`` offers it."""

    def __init__(self, problem, params, stats):
        super().__init__(problem, params, stats)
        self.rule = find_vjp_rule(problem, params)
        self._array: ArrayVJP | None = None
        self._array_looked = self.rule is None  # looked up at the first array call, for that state

    def _array_form(self, y: np.ndarray) -> ArrayVJP | None:
        if not self._array_looked:
            self._array_looked = True
            state = torch.from_numpy(y).view(self.problem.y0.shape)
            self._array = find_array_vjp(self.problem, self.params, state)
        return self._array

    def stage_plan(self, ys, negate=False):
        rule = self._array_form(ys[0])
        if rule is None:
            return None
        # Counted here, not per stage (one Python layer less per stage): a step evaluates them all.
        self.stats.n_vjp_evals += ys.shape[0]
        return rule.stage_plan(ys, negate)

    def on_arrays(self, y, v, want_p=True, negate=False):
        rule = self._array_form(y)
        if rule is None:
            return None
        self.stats.n_vjp_evals += 1
        return rule(y, v, True, want_p, negate)

    def __call__(self, t, y, v, want_y=True, want_p=True, want_f=False):
        self.stats.n_vjp_evals += 1
        self.stats.n_f_evals += want_f
        if self.rule is not None:
            out, gy, gp = self.rule(self.time(t), y, v, want_y=want_y, want_p=want_p)
            return (out if want_f else None), gy, gp
        with torch.enable_grad():
            y_ = y.detach().requires_grad_(want_y)
            out = self.problem.f(self.time(t), y_)
            inputs = ([y_] if want_y else []) + (self.params if want_p else [])
            if out.requires_grad and inputs:
                grads = list(torch.autograd.grad(out, inputs, v, allow_unused=True))
            else:  # f depends on none of them
                grads = [None] * len(inputs)
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
        gy = grads[0] if want_y else None
        gp = grads[1:] if want_y else grads
        return (out.detach() if want_f else None), gy, (gp if want_p else None)


class FunctionalF:
    """``f`` as a pure function of ``(t, y, *param_values)``, by substituting parameters by name.

    Parameters must reach ``f`` as parameters of an ``nn.Module`` ``f`` or as tensors inside
    ``args``; tensors that ``f`` only captures from its closure cannot be substituted.
    """

    def __init__(self, problem: Problem, params: list[torch.Tensor], backend: str):
        self.user_f = problem.user_f
        self.args = problem.args
        module = self.user_f if isinstance(self.user_f, nn.Module) else None
        index = {id(p): i for i, p in enumerate(params)}
        self.module_slots: list[tuple[str, int]] = []
        if module is not None:
            for name, p in module.named_parameters(remove_duplicate=False):
                if id(p) in index:
                    self.module_slots.append((name, index[id(p)]))
        self.module = module
        leaves, self.spec = pytree.tree_flatten(self.args) if self.args is not None else ([], None)
        self.leaves = leaves
        self.leaf_slots = [(j, index[id(x)]) for j, x in enumerate(leaves) if isinstance(x, torch.Tensor) and id(x) in index]
        covered = {i for _, i in self.module_slots} | {i for _, i in self.leaf_slots}
        missing = [i for i in range(len(params)) if i not in covered]
        if missing:
            raise ValueError(
                f"vjp={backend!r} differentiates a functional form of f, so every parameter must reach f as a "
                "parameter of an nn.Module f or inside args=; some are captured from f's closure. Pass them "
                "through args=, or use vjp='autograd'"
            )

    def __call__(self, t: torch.Tensor, y: torch.Tensor, *pvals: torch.Tensor) -> torch.Tensor:
        args = self.args
        if self.leaf_slots:
            leaves = list(self.leaves)
            for j, i in self.leaf_slots:
                leaves[j] = pvals[i]
            args = pytree.tree_unflatten(leaves, self.spec)
        call_args = (t, y) if args is None else (t, y, args)
        if self.module is not None:
            return torch.func.functional_call(self.module, {name: pvals[i] for name, i in self.module_slots}, call_args)
        return self.user_f(*call_args)


def _func_vjp(fn: FunctionalF, t: torch.Tensor, y: torch.Tensor, v: torch.Tensor, *pvals: torch.Tensor):
    out, pullback = torch.func.vjp(lambda y_, *p_: fn(t, y_, *p_), y, *pvals)
    return (out,) + tuple(pullback(v))


class FuncVJP(VJPBackend):
    def __init__(self, problem, params, stats):
        super().__init__(problem, params, stats)
        self.fn = FunctionalF(problem, params, self.name)
        self.pvals = [p.detach() for p in params]

    name = "func"

    def _vjp(self, t: torch.Tensor, y: torch.Tensor, v: torch.Tensor):
        return _func_vjp(self.fn, t, y, v, *self.pvals)

    def __call__(self, t, y, v, want_y=True, want_p=True, want_f=False):
        self.stats.n_vjp_evals += 1
        self.stats.n_f_evals += want_f
        try:
            out, gy, *gp = self._vjp(self.time(t), y, v)
        except RuntimeError as exc:
            if "functorch" not in str(exc) and "torch.func" not in str(exc):
                raise
            # A field that calls torch.autograd or requires_grad_() itself (a CNF's exact trace)
            # cannot run under torch.func's transforms.
            first = str(exc).strip().splitlines()[0][:160]
            raise ValueError(
                f"vjp={self.name!r} runs f under torch.func transforms, which f does not support ({first}): use "
                "vjp='autograd'"
            ) from exc
        return (out if want_f else None), (gy if want_y else None), (list(gp) if want_p else None)


_COMPILED_VJP: Callable | None = None


class CompileVJP(FuncVJP):
    """:class:`FuncVJP` compiled once per process with ``torch.compile``: torch's own guards
    decide when a new field or shape needs a new graph (bounded by its recompile limit, with its
    warning when that limit is hit)."""

    name = "compile"

    def __init__(self, problem, params, stats):
        super().__init__(problem, params, stats)
        global _COMPILED_VJP
        if _COMPILED_VJP is None:
            torch_imports.compiler()
            _COMPILED_VJP = torch.compile(_func_vjp, dynamic=False)
        self.compiled = _COMPILED_VJP

    def _vjp(self, t, y, v):
        return self.compiled(self.fn, t, y, v, *self.pvals)


class JacobianVJP(FuncVJP):
    name = "jacobian"

    def _vjp(self, t, y, v):
        n_in = 1 + len(self.pvals)
        out = self.fn(t, y, *self.pvals)
        jacs = torch.func.jacfwd(lambda y_, *p_: self.fn(t, y_, *p_), argnums=tuple(range(n_in)))(y, *self.pvals)
        grads = [torch.tensordot(v, j, dims=v.ndim) for j in jacs]
        return (out, *grads)


VJP_BACKENDS: dict[str, Callable[..., VJPBackend]] = {
    "autograd": AutogradVJP,
    "func": FuncVJP,
    "compile": CompileVJP,
    "jacobian": JacobianVJP,
}


def make_vjp(method: Any, problem: Problem, params: list[torch.Tensor], stats: BackwardStats) -> VJPBackend:
    return VJP_BACKENDS[method.vjp](problem, params, stats)
