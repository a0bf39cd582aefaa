"""DirectAdjoint with ``recompute=True``: backpropagation through the solve, one step at a time.

The forward solve runs without a graph and keeps each accepted step's start, size and start
state. The backward pass walks the steps last to first: it takes step ``i`` again from
``(t_i, y_i)`` with size ``h_i``, recorded this time, and pulls back through it by autograd the
cotangent of ``y_{i+1}`` (and of the step's stages, where a saved time was interpolated inside
it) to ``y_i`` and the parameters; then the step's graph is freed. That is the gradient of the
whole recorded solve (the step sizes constants in both), with the graph of one step alive at a
time instead of all of them: each stage's ``f`` is evaluated once more, and the memory kept
between the passes is the steps' start states (the forward's dense output), as the continuous
adjoints keep. The same pass, as one compiled program for ``B`` problems, is
:mod:`odeflux.compiled.reverse`; written out on arrays for dense fields, :mod:`.rk_reverse`.

With a ``graph_budget`` the solve is recorded whole, as ``DirectAdjoint()`` records it (no
evaluation retaken), while its graph stays within the budget: the bytes a step keeps are
estimated from one evaluation of ``f`` (the tensors autograd saves, measured once per field and
state), which bounds the steps; a solve that needs more is abandoned there, the module's buffers
and the random generator put back, and solved again as above (:func:`record_within`).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch

from ..problem import solution_from_result
from ..solution import BackwardStats, Solution, SolveError, Status
from .base import _buffers_kept, _restored, _stack_like, buffer_values, put_back, rng_kept, run_solution, user_module

if TYPE_CHECKING:
    from ..problem import Problem


def recompute_applies(problem: "Problem") -> bool:
    """Whether a step can be taken again from its start exactly as the forward took it: an
    explicit Runge-Kutta solver, no differentiable dense output (``dense=True``), ``f`` evaluated
    on the steps' own stage times (no ``perturb``, no ``jump_times``)."""
    return bool(problem.solver.tableau_steps) and not (problem.dense or problem.perturb or problem.jump_times)


class StepReverseRun:
    """Forward: the solve without a graph, its steps kept. Backward: each step recorded again and
    differentiated, last to first (:class:`~odeflux.sensitivity.base._AdjointFunction`'s run)."""

    def __init__(self, problem: "Problem", params: list[torch.Tensor]):
        self.problem, self.params = problem, params
        self.module_state = problem.module_state
        self.y = problem.y0.detach()
        self.bstats = BackwardStats()
        self.result = None

    def forward(self) -> torch.Tensor:
        before = _generator_state(self.y.device)
        with torch.no_grad():
            self.result = self.problem.integrate(y0=self.y, dense=True, dense_stages=False)
        # A field that draws random numbers (dropout) would draw others when a step is taken again:
        # its backward pass records the whole solve again from the same generator state instead.
        self.random_state = None if torch.equal(_generator_state(self.y.device), before) else before
        ys = self.result.ys
        return torch.stack(ys) if ys else self.y.new_empty((0,) + tuple(self.y.shape))

    def recorded(self, y0: torch.Tensor) -> torch.Tensor:
        """The forward's saved states again, recorded in a graph from ``y0`` (``create_graph=True``)."""
        return _stack_like(self.problem.integrate(y0=y0), self.result)

    def backward(self, grad_ys: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        res = self.result
        if res.status != Status.SUCCESS:
            raise SolveError(f"cannot differentiate a solve that failed ({res.status.name}): {res.message}", res.status)
        # (The module's own tensors as in the forward pass, and its buffers left as they were.)
        with _restored(self.module_state), _buffers_kept(self.module_state):
            if self.random_state is not None:
                return self._backward_recorded(grad_ys.detach())
            return self._backward(grad_ys.detach())

    def _backward_recorded(self, grad_ys: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The cotangents through the whole solve recorded again, its random numbers drawn again
        from the forward's generator state (the generator left as it was)."""
        device = self.y.device
        now = _generator_state(device)
        _set_generator_state(device, self.random_state)
        try:
            with torch.enable_grad():
                y0 = self.y.clone().requires_grad_(True)
                out = self.recorded(y0)
                got = torch.autograd.grad(out, [y0, *self.params], grad_ys, allow_unused=True)
        finally:
            _set_generator_state(device, now)
        self.bstats.n_f_evals += self.result.stats.n_f_evals
        return got[0], [torch.zeros_like(q) if g is None else g for q, g in zip(self.params, got[1:])]

    def _backward(self, grad_ys: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        res, p, y0 = self.result, self.problem, self.y
        dense = res.dense
        n = 0 if dense is None else len(dense)
        params = self.params
        grads_p = [torch.zeros_like(q) for q in params]
        if n == 0:  # (no step: every saved state is y0)
            return grad_ys.sum(0), grads_p
        solver = p.solver
        co = solver.coefficients(y0.dtype, y0.device)
        at_boundary, inside = _saved_cotangents(solver, dense, res, grad_ys)
        f, float_time = p.f, p.float_time
        a = at_boundary.get(n, torch.zeros_like(y0))
        for i in range(n - 1, -1, -1):
            t = dense.t_starts[i] if float_time else torch.full((), dense.t_starts[i], dtype=y0.dtype, device=y0.device)
            kbar = inside.get(i)
            with torch.enable_grad():
                y = dense.y0s[i].detach().requires_grad_(True)
                # (An FSAL method's last stage is f at the new state: needed only where the step's
                # stages carry a cotangent.)
                step = solver.step(f, t, y, dense.dts[i], f(t, y), co, solution_only=kbar is None)
                outs, cots = ((step.y1,), (a,)) if kbar is None else ((step.y1, step.K), (a, kbar))
                got = torch.autograd.grad(outs, [y, *params], cots, allow_unused=True)
            a = got[0] if got[0] is not None else torch.zeros_like(a)
            if i in at_boundary:
                a = a + at_boundary[i]
            for j, g in enumerate(got[1:]):
                if g is not None:
                    grads_p[j] += g
            self.bstats.n_f_evals += step.K.shape[0]
            self.bstats.n_vjp_evals += step.K.shape[0]
        self.bstats.n_steps = self.bstats.n_accepted = n
        return a, grads_p


def _saved_cotangents(solver: Any, dense: Any, res: Any, grads: torch.Tensor) -> tuple[dict, dict]:
    """The saved states' cotangents given to the step boundaries (``{i: cotangent of the state
    before step i}``) and to the stages of the steps they were interpolated in
    (``{i: (stages, ...)}``), placed as the compiled reverse pass places them
    (:func:`~odeflux.compiled.reverse.place_saved`); only the steps that get one are kept."""
    from ..compiled.reverse import place_saved

    f64 = dict(dtype=torch.float64, device=grads.device)
    at, inside, boundary = place_saved(
        solver, torch.tensor([dense.t_starts], **f64), torch.tensor([dense.dts], **f64),
        torch.full((1,), len(dense), dtype=torch.int64, device=grads.device), torch.full((1,), res.t, **f64),
        torch.tensor([res.ts], **f64), grads.dtype,
    )  # fmt: skip
    to_b: dict[int, torch.Tensor] = {}
    to_k: dict[int, torch.Tensor] = {}
    stage_col = (-1,) + (1,) * (grads.dim() - 1)
    for k, (b, ins, ic) in enumerate(zip(boundary[0].tolist(), inside[0].tolist(), at.ic[0].tolist())):
        g = grads[k]
        to_b[b] = to_b[b] + g if b in to_b else g
        if ins:
            kb = at.weights[0, k].reshape(stage_col) * g
            to_k[ic] = to_k[ic] + kb if ic in to_k else kb
    return to_b, to_k


def _generator_state(device: torch.device) -> torch.Tensor:
    """The state of the random number generator that ``f`` on ``device`` draws from."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_generator_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


#: The graph ``sensealg="auto"`` lets ``DirectAdjoint(recompute=True)`` record before it retakes
#: steps instead: 512 MiB. benchmarks/general.py's neural fields record about 90 MB (the MLP, 3
#: steps) and 244 MB (the conv field, 4 steps), estimated at 95 and 254 MB.
GRAPH_BUDGET = 512 * 2**20

# Bytes autograd saves in one evaluation of f, per field (weakly) and state shape.
_PER_EVAL: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def graph_bytes_per_step(problem: "Problem") -> int:
    """The bytes a recorded step of ``problem`` keeps for its backward pass, estimated: its
    evaluations of ``f`` (what autograd saves in one, measured once per field and state shape;
    an FSAL method's last is the next step's first) and two states besides (the stage sums
    save little: their coefficients need no gradient)."""
    y = problem.y0.detach()
    key = (tuple(y.shape), y.dtype, y.device)
    try:
        known = _PER_EVAL.setdefault(user_module(problem.user_f), {})
    except TypeError:  # (not weakly referenceable: measured every solve)
        known = {}
    if key not in known:
        known[key] = _saved_bytes(problem, y)
    tableau = problem.solver.tableau
    return (tableau.stages - tableau.fsal) * known[key] + 2 * y.numel() * y.element_size()


def _saved_bytes(problem: "Problem", y: torch.Tensor) -> int:
    storages: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        storages[(st.data_ptr(), t.device)] = st.nbytes()
        return t

    t0 = torch.full((), problem.t0, dtype=y.dtype, device=y.device)
    # (The generator and the module's buffers left as they were: this evaluation is no forward pass.)
    with torch.enable_grad(), rng_kept(y.device), _buffers_kept(problem.module_state), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = problem.f(t0, y.clone().requires_grad_(True))
    del out
    return sum(storages.values())


def record_within(problem: "Problem", budget: int) -> Solution | None:
    """The solve recorded whole (``DirectAdjoint()``'s graph) where its steps' estimated graph
    fits ``budget`` bytes, or ``None`` where it does not: the solve is then abandoned once it has
    taken the steps that fit, with the module's buffers (running statistics) and the random
    generator put back as they were before it."""
    fit = budget // max(graph_bytes_per_step(problem), 1)
    if fit < 1:
        return None
    limit = min(fit, problem.max_steps)
    y = problem.y0
    generator = _generator_state(y.device)
    buffers = buffer_values(problem.module_state)
    res = problem.integrate(max_steps=limit)
    if res.status == Status.MAX_STEPS and limit < problem.max_steps:
        del res  # (its graph with it)
        put_back(buffers)
        _set_generator_state(y.device, generator)
        return None
    return solution_from_result(res, problem)


def solve_step_reverse(problem: "Problem") -> Solution:
    """The solve, differentiable through :class:`StepReverseRun`."""
    return run_solution(StepReverseRun(problem, [q for q in problem.params if q.requires_grad]), problem)


__all__ = ["GRAPH_BUDGET", "StepReverseRun", "graph_bytes_per_step", "recompute_applies", "record_within",
           "solve_step_reverse"]
