"""Forward sensitivities: the state and its derivatives with respect to y0 and the parameters,
integrated together in one forward solve; no backward solve.

For ``theta`` the entries of ``y0`` and of the parameters, ``S = dy/dtheta`` obeys

    dS/dt = df/dy S + df/dtheta,     S(t0) = dy0/dtheta,

one column per entry of ``theta``. The backward pass of autograd only contracts the cotangents of
the saved states with the saved sensitivities: ``dL/dtheta = sum_i dL/dy(t_i) S(t_i)``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch.utils import _pytree as pytree

from .. import torch_imports
from ..integrator import IntegrationResult
from ..kernels import arrays
from ..problem import solution_from_result
from ..solution import BackwardStats, DenseOutput, Solution, SolveError, Status, times_tensor
from .base import SensitivityAlgorithm, _buffers_kept, _restored, _stack_like, check_hidden_params, split_like

if TYPE_CHECKING:
    from ..problem import Problem

#: How the tangents ``df/dy S + df/dtheta`` are computed (see :class:`ForwardSensitivity`).
TANGENT_MODES = ("auto", "forward", "reverse")


@dataclass(eq=False)
class ForwardSensitivity(SensitivityAlgorithm):
    """Forward sensitivities (SciMLSensitivity's ``ForwardSensitivity`` role): the state and
    ``S = dy/d(y0, params)`` are integrated as one ODE in one forward solve, and the backward
    pass contracts the saved states' cotangents with the saved ``S``: no backward solve, nothing
    kept but the saved states' sensitivities.

    When it pays: few differentiated entries, and no memory to spare for a backward pass. The
    augmented state has ``n (1 + m)`` entries for a state of ``n`` entries and ``m``
    differentiated entries (``y0``'s ``n`` when it requires grad, plus every parameter's), and
    every evaluation of ``f`` carries ``m`` tangents, so its cost grows with ``m`` where an
    adjoint's does not; what it keeps for the backward pass is the saved states' sensitivities,
    whatever the number of steps. Measured on the CPU (benchmarks/results/forward_sensitivity.md):
    on Lotka-Volterra with 4 rates it is 1.6x faster than the continuous adjoints and 3.8x slower
    than DirectAdjoint; on small MLP fields (which have a hand-written VJP rule) slower than both,
    so ``sensealg="auto"`` does not pick it.

    ``tangents`` picks how ``df/dy S + df/dtheta`` is computed: ``"forward"``: forward-mode AD,
    ``torch.func.jvp`` batched over the ``m`` directions with ``torch.func.vmap`` (parameters are
    substituted in ``f``'s modules and ``args``); ``"reverse"``: ``f``'s Jacobian by reverse mode
    (``n`` VJPs batched in one backward pass), then one product, which also covers parameters
    ``f`` captures from its closure (``params=``); ``"auto"`` (default): forward where it takes
    fewer passes (``m < n``: few parameters next to a larger state whose ``y0`` is not
    differentiated) or the solve is compiled (``compile=True``: its whole loop, tangents
    included, is then one compiled program), and every parameter can be substituted; reverse
    otherwise.

    ``seminorm=False`` (default): the step-size control covers the sensitivities as well as the
    state (the largest of the two blocks' RMS norms), so the gradient is as accurate as the
    state; ``seminorm=True`` leaves them out: the state's own steps, a cheaper but uncontrolled
    gradient. With a fixed-step solver the sensitivities are exactly the derivatives of the
    discrete solution (DirectAdjoint's gradient, to round-off).

    Refused: solvers that integrate whole spans themselves (``ScipySolver``).
    ``create_graph=True`` re-solves with a recorded graph and differentiates it (DirectAdjoint's
    gradient, which can be differentiated again), as the continuous adjoints do.
    """

    seminorm: bool = False
    tangents: str = "auto"

    def __post_init__(self) -> None:
        if self.tangents not in TANGENT_MODES:
            raise ValueError(f"ForwardSensitivity: tangents={self.tangents!r} is not one of {', '.join(TANGENT_MODES)}")

    def solve(self, problem: "Problem") -> Solution:
        if not problem.solver.stepwise:
            raise ValueError(
                f"ForwardSensitivity integrates the sensitivities with odeflux's own steps; {type(problem.solver).__name__} "
                "integrates whole spans itself outside autograd: use sensealg=BacksolveAdjoint() or a stepwise solver such as Tsit5()"
            )
        params = [p for p in problem.params if p.requires_grad]
        check_hidden_params(problem, params)
        run = ForwardRun(self, problem, params)
        if run.m == 0:  # nothing but saved times to differentiate: solve() attaches those
            return solution_from_result(problem.integrate(), problem)
        ys = _ForwardFunction.apply(run, problem.y0, *params)
        res = run.result
        dense_fn = None
        if problem.dense and run.dense is not None:

            def dense_fn(times: list[float]) -> torch.Tensor:
                return _ForwardFunction.apply(_DenseQuery(run, times), problem.y0, *params)

        return Solution(
            dense_fn=dense_fn, ts=times_tensor(res.ts, problem.y0), ys=ys, stats=res.stats, status=res.status,
            message=res.message, dense=run.dense if problem.dense else None, backward_stats=BackwardStats(),
            t_final=res.t,
        )  # fmt: skip


@contextlib.contextmanager
def _swapped(slots: list[tuple[dict, str]], values: tuple[torch.Tensor, ...]) -> Iterator[None]:
    """Module parameter slots holding ``values`` for the block (forward mode's substitution)."""
    old = [d[name] for d, name in slots]
    for (d, name), v in zip(slots, values):
        d[name] = v
    try:
        yield
    finally:
        for (d, name), v in zip(slots, old):
            d[name] = v


class ForwardRun:
    """One forward-sensitivity solve: the augmented field, its integration, the saved ``S``."""

    def __init__(self, method: ForwardSensitivity, problem: "Problem", params: list[torch.Tensor]):
        self.method, self.problem, self.params = method, problem, params
        y0 = problem.y0
        self.shape = tuple(y0.shape)
        self.n = y0.numel()
        self.module_state = problem.module_state
        # Directions: y0's entries first (when differentiated), then each parameter's, flattened.
        self.n_y0 = self.n if y0.requires_grad else 0
        self.sizes = [p.numel() for p in params]
        self.m = self.n_y0 + sum(self.sizes)
        self.result: IntegrationResult | None = None
        self.dense: DenseOutput | None = None
        self.saved_S: torch.Tensor | None = None
        mode = method.tangents
        self._slots, self._leaf_slots, self._arg_leaves, self._arg_spec = self._substitution(params)
        if mode == "forward" and self._slots is None:
            raise ValueError(
                "ForwardSensitivity(tangents='forward') substitutes the parameters in f, and some reach f only "
                "through its closure (params=): pass them inside args=, or use tangents='reverse'"
            )
        # "auto": whichever takes fewer passes through f, n VJPs (reverse) or m JVPs (forward); on
        # ties reverse, measured faster per pass (benchmarks/results/forward_sensitivity.md).
        if mode == "auto":
            # With compile=True forward mode wherever it can substitute: the reverse mode's
            # autograd.grad inside f's evaluation is what torch.compile cannot trace.
            fewer = self.m < self.n or (problem.compiled and problem.solver.tableau_steps)
            mode = "forward" if self._slots is not None and fewer else "reverse"
        self.mode = mode
        if mode == "forward":
            torch_imports.forward_ad()
        dt, dev = y0.dtype, y0.device
        # The parameter directions' seeds: direction n_y0 + k moves parameter entry k alone.
        eye = torch.eye(sum(self.sizes), dtype=dt, device=dev)
        seeds = torch.zeros(self.m, sum(self.sizes), dtype=dt, device=dev)
        seeds[self.n_y0 :] = eye
        # (Each its own tensor: a compiled loop may not take inputs that alias each other.)
        self.seeds = [s.reshape((self.m,) + tuple(p.shape)).clone() for s, p in zip(seeds.split(self.sizes, 1), params)]

    def _substitution(self, params):
        """Where each parameter reaches ``f`` (a module slot or an ``args`` leaf), or ``None``s
        when one reaches it only through a closure."""
        p = self.problem
        index = {id(x): i for i, x in enumerate(params)}
        slots: list[tuple[dict, str, int]] = []
        seen: set[int] = set()
        for mod, kind, name, t in p.module_state:
            if kind == "_parameters" and id(t) in index:
                slots.append((getattr(mod, kind), name, index[id(t)]))
                seen.add(index[id(t)])
        leaves, spec = pytree.tree_flatten(p.args) if p.args is not None else ([], None)
        leaf_slots = [(j, index[id(x)]) for j, x in enumerate(leaves) if isinstance(x, torch.Tensor) and id(x) in index]
        seen |= {i for _, i in leaf_slots}
        if len(seen) < len(params):
            return None, None, None, None
        return slots, leaf_slots, leaves, spec

    # the augmented field ------------------------------------------------------------------
    def _f_of(self, t: Any) -> Callable[..., torch.Tensor]:
        """``f(t, y)`` as a function of ``(y, *param_values)`` (forward mode)."""
        p = self.problem
        slots = [(d, name) for d, name, _ in self._slots]
        which = [i for _, _, i in self._slots]
        root = p.user_f if isinstance(p.user_f, torch.nn.Module) else None
        if root is not None:
            # torch.func.functional_call substitutes without writing to the modules, which a
            # compiled loop (compile=True) cannot trace.
            names = self._qualified(root)

            def call(y: torch.Tensor, *pv: torch.Tensor) -> torch.Tensor:
                values = {name: pv[i] for name, i in names}
                if p.args is None:
                    return torch.func.functional_call(root, values, (t, y))
                leaves = list(self._arg_leaves)
                for j, i in self._leaf_slots:
                    leaves[j] = pv[i]
                return torch.func.functional_call(root, values, (t, y, pytree.tree_unflatten(leaves, self._arg_spec)))

            return call

        def g(y: torch.Tensor, *pv: torch.Tensor) -> torch.Tensor:
            with _swapped(slots, tuple(pv[i] for i in which)):
                if p.args is None:
                    return p.f(t, y)
                leaves = list(self._arg_leaves)
                for j, i in self._leaf_slots:
                    leaves[j] = pv[i]
                return p.user_f(t, y, pytree.tree_unflatten(leaves, self._arg_spec))

        return g

    def _qualified(self, root: torch.nn.Module) -> list[tuple[str, int]]:
        """``root``'s parameter names (tied ones each) with the index of the parameter in ``params``."""
        names = getattr(self, "_names", None)
        if names is None:
            index = {id(x): i for i, x in enumerate(self.params)}
            names = self._names = [
                (name, index[id(q)]) for name, q in root.named_parameters(remove_duplicate=False) if id(q) in index
            ]
        return names

    def tangents(self, t: Any, y: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``f(t, y)`` and ``df/dy S + df/dtheta`` (``S``: ``(m, n)``)."""
        if self.mode == "forward":
            g = self._f_of(t)
            pvals = tuple(q.detach() for q in self.params)

            def one(dy: torch.Tensor, *dp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                return torch.func.jvp(g, (y, *pvals), (dy, *dp))

            out, dS = torch.func.vmap(one, out_dims=(None, 0))(S.view((self.m,) + self.shape), *self.seeds)
            return out, dS.reshape(self.m, self.n)
        with torch.enable_grad():
            y_ = y.detach().requires_grad_()
            out = self.problem.f(t, y_)
            inputs = [y_, *self.params]
            grads = torch.autograd.grad(out, inputs, self._eye(y), is_grads_batched=True, allow_unused=True)
        # Row i of each: d out_i / d input.
        jy = grads[0].reshape(self.n, self.n) if grads[0] is not None else y.new_zeros(self.n, self.n)
        dS = S @ jy.T
        if self.params:
            jp = torch.cat([
                (g.reshape(self.n, -1) if g is not None else y.new_zeros(self.n, q.numel()))
                for g, q in zip(grads[1:], self.params)
            ], 1)  # fmt: skip
            dS[self.n_y0 :] += jp.T
        return out.detach(), dS

    def _eye(self, y: torch.Tensor) -> torch.Tensor:
        """The ``n`` unit cotangents, batched (made once)."""
        if getattr(self, "_eye_t", None) is None:
            self._eye_t = torch.eye(self.n, dtype=y.dtype, device=y.device).view((self.n,) + self.shape)
        return self._eye_t

    def rhs(self, t: Any, z: torch.Tensor) -> torch.Tensor:
        n = self.n
        out, dS = self.tangents(t, z[:n].view(self.shape), z[n:].view(self.m, n))
        return torch.cat([out.reshape(-1), dS.reshape(-1)])

    # forward ------------------------------------------------------------------------------
    def forward(self) -> torch.Tensor:
        p, n, m = self.problem, self.n, self.m
        y0 = p.y0.detach()
        S0 = y0.new_zeros(m, n)
        if self.n_y0:
            S0[: self.n_y0] = torch.eye(n, dtype=y0.dtype, device=y0.device)
        z0 = torch.cat([y0.reshape(-1), S0.reshape(-1)])
        kw: dict[str, Any] = {}
        if p.norm is not None:  # the user's norm on the state, and the RMS norm on S beside it
            kw["norm"] = self._norm(p.norm)
        else:
            kw["error_parts"] = ((0, n),) if self.method.seminorm or m == 0 else ((0, n), (n, n * (1 + m)))
        # A small augmented state: BLAS (NumPy's, torch's) on one thread while it steps. Its stage
        # sums (a few hundred entries) pass torch's threading threshold, and on a loaded machine
        # each parallel product then waits on a descheduled thread: measured 1.3 ms per addmm at 2
        # threads against ~5 us at 1 (a 4-state MLP field with 76 parameters, 2 busy cores).
        small = arrays.small_state(z0)
        with torch.no_grad(), _buffers_kept(self.module_state), (arrays.one_blas_thread if small else _NULL), (
            _one_torch_thread() if small else _NULL
        ):
            res = _integrate(self.rhs, z0, p, **kw)
        self.result = res
        if res.dense is not None:
            d = res.dense
            self.dense = DenseOutput(
                p.solver, d.t_starts, d.dts, [y[:n].view(self.shape) for y in d.y0s],
                [K[:, :n].reshape((K.shape[0],) + self.shape) for K in d.Ks],
            )  # fmt: skip
            self._aug_dense = d
        if not res.ys:
            self.saved_S = y0.new_empty((0, m, n))
            return y0.new_empty((0,) + self.shape)
        zs = torch.stack(res.ys)
        self.saved_S = zs[:, n:].reshape(-1, m, n)
        return zs[:, :n].reshape((-1,) + self.shape)

    def _norm(self, norm: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        n, shape, semi = self.n, self.shape, self.method.seminorm or self.m == 0

        def aug_norm(scaled: torch.Tensor) -> torch.Tensor:
            own = norm(scaled[:n].view(shape)).reshape(())
            if semi:
                return own
            s = scaled[n:]
            return torch.maximum(own, torch.linalg.vector_norm(s) / math.sqrt(s.numel()))

        return aug_norm

    # backward -----------------------------------------------------------------------------
    def contract(self, grad_ys: torch.Tensor, S: torch.Tensor) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """``sum_i grad_ys[i] S_i``, cut into ``y0``'s gradient and the parameters'."""
        res = self.result
        if res is not None and res.status != Status.SUCCESS:
            raise SolveError(f"cannot differentiate a solve that failed ({res.status.name}): {res.message}", res.status)
        g = torch.einsum("tn,tmn->m", grad_ys.reshape(-1, self.n), S)
        gy0 = g[: self.n_y0].view(self.shape) if self.n_y0 else None
        return gy0, split_like(g[self.n_y0 :], self.params)

    def backward(self, grad_ys: torch.Tensor) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        return self.contract(grad_ys, self.saved_S)

    def recorded(self, y0: torch.Tensor) -> torch.Tensor:
        return _stack_like(self.problem.integrate(y0=y0), self.result)


_NULL = contextlib.nullcontext()


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """torch's intra-op pool at one thread for the block (from the main thread only: the count is
    process-wide), the count it found given back after."""
    import threading

    n = torch.get_num_threads()
    if n == 1 or threading.current_thread() is not threading.main_thread():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _integrate(rhs: Callable, z0: torch.Tensor, p: "Problem", **kw: Any) -> IntegrationResult:
    from ..integrator import integrate

    return integrate(rhs, z0, p.t0, p.t1, p.solver, p.options(**{"norm": None, **kw}))


class _DenseQuery:
    """``sol(t)`` of a forward-sensitivity solve, differentiable: ``S(t)`` by the same interpolant."""

    def __init__(self, run: ForwardRun, times: list[float]):
        self.run, self.times = run, times
        self.module_state = run.module_state

    def forward(self) -> torch.Tensor:
        return self.run.dense.evaluate(self.times)

    def backward(self, grad: torch.Tensor) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        r = self.run
        z = r._aug_dense.evaluate(self.times).reshape(len(self.times), -1)
        return r.contract(grad, z[:, r.n :].reshape(-1, r.m, r.n))

    def recorded(self, y0: torch.Tensor) -> torch.Tensor:
        return self.run.problem.integrate(y0=y0, dense=True).dense.evaluate(self.times)


class _ForwardFunction(torch.autograd.Function):
    """Connects a forward-sensitivity run to autograd: forward solves state and sensitivities,
    backward contracts. Under ``create_graph=True`` it records the solve and differentiates it."""

    @staticmethod
    def forward(ctx: Any, run: "ForwardRun | _DenseQuery", y0: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.run = run
        ctx.save_for_backward(y0, *params)
        return run.forward()

    @staticmethod
    def backward(ctx: Any, grad_ys: torch.Tensor) -> tuple:
        y0, *params = ctx.saved_tensors  # autograd's error if one was modified in place
        run = ctx.run
        if torch.is_grad_enabled():  # create_graph=True: differentiate a recorded solve
            with _restored(run.module_state), _buffers_kept(run.module_state):
                out = run.recorded(y0)
            inputs = [y0, *params]
            grads = torch.autograd.grad(out, inputs, grad_ys, create_graph=True, allow_unused=True)
            return (None, *[torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)])
        gy0, gp = run.backward(grad_ys)
        return (None, gy0, *gp)
