"""Regression tests for the engine issue: where ``odeflux.MLP`` (a hand-written VJP rule, and NumPy
kernels on small CPU tensors outside autograd: the *fast path*) must behave exactly as the same
field written as a plain ``nn.Sequential`` of ``nn.Linear`` and activation modules (torch's ops and
the autograd engine: the *plain path*).

Each section failed on commit 51f245f, before the engine's seam (``odeflux.kernels``), as below;
all pass since. What they found, by section:

1. ``solve`` on a module of ``y`` alone: FAIL, every test. An ``MLP`` dies inside the integrator
   without grad and under ``DirectAdjoint`` (``TypeError: FrozenField.on_arrays() takes 3
   positional arguments but 4 were given``), and is called as ``f(t, y)`` under the continuous
   adjoints (``TypeError: MLP.forward() takes 2 positional arguments but 3 were given``); an
   ``nn.Sequential`` is always called as ``f(t, y)`` (the same TypeError).
2. Parameter changes after the fast path has run: FAIL for ``replace_layer`` (the MLP keeps the
   old layers' parameter dicts, ``_param_slots``, so its NumPy kernels compute with the old
   weights: its output under ``no_grad``, ``NeuralODE``'s forward and every sensealg's gradient
   are wrong). PASS for ``load_state_dict``, ``double`` and ``sgd_step`` (guards).
3. Double backward: FAIL for the MLP under ``DirectAdjoint`` (the hand-written reverse pass is an
   ``autograd.Function`` marked ``@once_differentiable``: "trying to differentiate twice a
   function that was marked with @once_differentiable"), where the Sequential works. The
   continuous adjoints refuse double backward for both kinds alike (same ``@once_differentiable``
   bridge), with that clear message when the penalty is backpropagated with ``.backward()``:
   PASS (they must keep at least saying so; working is allowed too).
4. In-place change of a parameter between forward and backward: FAIL for the MLP under the default
   ``DirectAdjoint()`` (its hand-written reverse pass saves no tensor, so autograd's version
   counter never sees the change and the gradient is computed silently). ``DirectAdjoint(
   hand_written=False)`` raises for both kinds: PASS. The continuous adjoints raise for neither
   kind today (their backward solve reads the parameters as they are at backward time); the test
   there only requires MLP and Sequential to behave alike: PASS.
6. Fast path against plain path on random fields: PASS today (guards for the refactor).

Tolerances. The two paths round differently in each evaluation of ``f`` (about an ulp). With the
same steps on both (a fixed-step solver: forward and adjoint take the same steps), every result is
a chain of a few hundred roundings: compared to ``eps_tol = 1e3 * eps`` (relative, in norm;
measured at most 3 eps over 40 random fields). With adaptive steps, the roundoff also moves the
steps: a change ``d`` of the error norm changes the next step by about ``beta1 * d`` (relative),
which moves a smooth solution's final state by about eps per step, not by the tolerance (the
local error is itself proportional to the error norm, which cancels), so final states are still
compared to ``eps_tol`` (measured: 19 eps), and step counts exactly, in float64 (float32: see
section 6). A gradient is not what the error estimate controls, so step shifts move it more (up
to 1.2e4 eps in float64 over 32 random fields at rtol 1e-6, 6e-10 relative at rtol 1e-5): adaptive
gradients from the two paths must agree to the solve's ``rtol``, the accuracy either can claim.
The stale weights of section 2 are off by about 1 (relative). ReLU fields are only piecewise smooth:
there a roundoff step shift changes the solution by amounts of the tolerance and a discrete
gradient by a few percent (3 % measured in float32 with equal step counts), so they are compared
on fixed steps only.
"""

from __future__ import annotations

import copy
import random
import re

import pytest
import torch
from torch import nn

import odeflux
from odeflux.fields import MLP

F32, F64 = torch.float32, torch.float64
# Subclasses of torch's activation modules: the same computation, but not the exact classes that
# odeflux.fields.dense_chain recognises, so a Sequential of them stays on the plain path.
ACT_MODULES = {
    name: type(f"Plain{cls.__name__}", (cls,), {})
    for name, cls in {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU, "identity": nn.Identity}.items()
}


def eps_tol(dtype: torch.dtype) -> float:
    """Same steps on both paths, or a smooth solution's final state (see the module's docstring)."""
    return 1e3 * torch.finfo(dtype).eps


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def linears(widths: list[int], dtype: torch.dtype = F64, seed: int = 0) -> list[nn.Linear]:
    """Dense layers ``widths[0] -> widths[1] -> ...`` with seeded random weights and biases, of
    standard deviation 1/sqrt(fan-in) (mild dynamics: few steps)."""
    g = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(a, b) for a, b in zip(widths, widths[1:])]
    with torch.no_grad():
        for layer in layers:
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / layer.in_features**0.5)
    return [layer.to(dtype) for layer in layers]


def as_sequential(mlp: MLP) -> nn.Sequential:
    """The plain-path twin of ``mlp``: copies of its current layers, its activation after each."""
    mods: list[nn.Module] = []
    last = len(mlp.layers) - 1
    for i, layer in enumerate(mlp.layers):
        mods.append(copy.deepcopy(layer))
        if i < last or mlp.final_activation:
            mods.append(ACT_MODULES[mlp.activation]())
    return nn.Sequential(*mods)


def make_field(kind: str, widths=(3, 8, 3), activation: str = "tanh", dtype=F64, seed: int = 0) -> nn.Module:
    mlp = MLP(linears(list(widths), dtype, seed), activation=activation)
    return mlp if kind == "mlp" else as_sequential(mlp)


def flat_grads(loss: torch.Tensor, inputs: list[torch.Tensor], **kw) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, inputs, **kw)])


def state(shape, dtype=F64, seed: int = 1, requires_grad: bool = False) -> torch.Tensor:
    y = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return y.requires_grad_(requires_grad)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):  # (conftest.py: tiny ops)
    yield


SENSEALGS = [
    pytest.param(odeflux.DirectAdjoint, id="direct"),
    pytest.param(odeflux.BacksolveAdjoint, id="backsolve"),
    pytest.param(odeflux.InterpolatingAdjoint, id="interpolating"),
    pytest.param(odeflux.QuadratureAdjoint, id="quadrature"),
    pytest.param(odeflux.GaussAdjoint, id="gauss"),
]
CONTINUOUS = SENSEALGS[1:]
KINDS = pytest.mark.parametrize("kind", ["mlp", "sequential"])


# -- 1. solve() on a module of y alone -------------------------------------------------------------
# NeuralODE accepts a vector field of y alone (VectorField detects it from the signature); solve must
# too, and give what the explicit (t, y) form gives.


@KINDS
@pytest.mark.parametrize("dtype", [F32, F64], ids=["float32", "float64"])
def test_solve_takes_a_module_of_y_alone_without_grad(kind, dtype):
    field = make_field(kind, dtype=dtype)
    y0 = state((4, 3), dtype)
    with torch.no_grad():
        sol = odeflux.solve(field, y0, (0.0, 1.0))
        ref = odeflux.solve(lambda t, y: field(y), y0, (0.0, 1.0))
    if dtype == F64:  # (float32: see test_fast_and_plain_paths_take_the_same_adaptive_steps)
        assert sol.stats == ref.stats
    assert rel_err(sol.ys, ref.ys) <= eps_tol(dtype)


@pytest.mark.parametrize("sensealg", [pytest.param(lambda: None, id="default"), *SENSEALGS])
@KINDS
def test_solve_takes_a_module_of_y_alone_with_grad(kind, sensealg):
    """Same solution and same gradient (y0 and every parameter) as the ``lambda t, y: field(y)``
    form, whose parameters are listed in ``params=`` so that every method differentiates them.
    (The lambda form takes the plain path for its products, the MLP its rule: gradients to rtol.)"""
    field = make_field(kind)
    params = list(field.parameters())
    rtol = 1e-7
    results = []
    for f, extra in ((field, {}), (lambda t, y: field(y), {"params": params})):
        y0 = state((4, 3), requires_grad=True)
        sol = odeflux.solve(f, y0, (0.0, 1.0), sensealg=sensealg(), rtol=rtol, atol=1e-9, **extra)
        results.append((sol.ys.detach(), flat_grads(sol.ys[-1].pow(2).sum(), [y0, *params])))
    (ys, grads), (ys_ref, grads_ref) = results
    assert rel_err(ys, ys_ref) <= eps_tol(F64)
    assert rel_err(grads, grads_ref) <= rtol


# -- 2. The fast path after the parameters change ----------------------------------------------------
# The MLP caches NumPy kernels over its parameters' memory (and a solve's frozen forms with per-row
# bias copies). Whatever changes the parameters must show in its next evaluation, exactly as it shows
# in the plain path.

CHANGES = ["replace_layer", "load_state_dict", "double", "sgd_step"]
WIDTHS = [3, 8, 8, 3]
NODE = dict(rtol=1e-5, atol=1e-7)  # NeuralODE's solve options here (float32 and float64 alike)


def warmed_mlp() -> tuple[MLP, odeflux.NeuralODE, torch.Tensor]:
    """A float32 MLP whose fast path has run (its kernels and a NeuralODE solve's frozen forms are
    cached), the NeuralODE over it, and a state."""
    mlp = MLP(linears(WIDTHS, F32, seed=0), activation="tanh")
    node = odeflux.NeuralODE(mlp, **NODE)
    y = state((5, 3), F32)
    with torch.no_grad():
        assert mlp._numpy_kernels(y) is not None  # the fast path is the one under test
        mlp(y)
        node(y)
    return mlp, node, y


def change_parameters(change: str, mlp: MLP, y: torch.Tensor) -> torch.dtype:
    """Applies ``change`` to ``mlp``; returns the dtype its inputs must have now."""
    if change == "replace_layer":
        mlp.layers[1] = linears([8, 8], F32, seed=7)[0]
    elif change == "load_state_dict":
        mlp.load_state_dict(MLP(linears(WIDTHS, F32, seed=3)).state_dict())
    elif change == "double":
        mlp.double()
        return F64
    elif change == "sgd_step":
        mlp(y).pow(2).sum().backward()
        torch.optim.SGD(mlp.parameters(), lr=0.1).step()
        mlp.zero_grad()
    return F32


def fresh_copy(mlp: MLP) -> MLP:
    """A new MLP over copies of ``mlp``'s current layers: nothing cached."""
    return MLP(copy.deepcopy(list(mlp.layers)), activation=mlp.activation)


def by_hand(mlp: MLP, y: torch.Tensor) -> torch.Tensor:
    """The MLP's function from its current layers with plain torch ops (float64)."""
    h = y.double()
    for layer in mlp.layers:
        h = torch.tanh(h @ layer.weight.detach().double().T + layer.bias.detach().double())
    return h


@pytest.mark.parametrize("change", CHANGES)
def test_fast_path_output_follows_parameter_changes(change):
    mlp, node, y = warmed_mlp()
    dtype = change_parameters(change, mlp, y)
    y = y.to(dtype)
    tol = dict(rtol=eps_tol(dtype), atol=eps_tol(dtype))
    with torch.no_grad():
        fast = mlp(y)
    graph = mlp(y)  # parameters require grad: torch's ops
    assert graph.grad_fn is not None
    torch.testing.assert_close(fast, graph.detach(), **tol)
    torch.testing.assert_close(fast.double(), by_hand(mlp, y), **tol)
    # Through NeuralODE (the solve's frozen forms), against a NeuralODE over the Sequential twin.
    with torch.no_grad():
        out, ref = node(y), odeflux.NeuralODE(as_sequential(mlp), **NODE)(y)
    torch.testing.assert_close(out, ref, **tol)


@pytest.mark.parametrize("sensealg", SENSEALGS)
@pytest.mark.parametrize("change", CHANGES)
def test_gradients_follow_parameter_changes(change, sensealg):
    """The rule's products (NumPy kernels) must use the new parameters too. NeuralODE's gradients
    after the change must equal those of a fresh MLP over the same layers (the same code path: to
    eps), and those of the Sequential twin (another path: to the solves' rtol; stale weights give
    ~0.7)."""
    mlp, node, y = warmed_mlp()
    node.sensealg = sensealg()
    node(y.clone().requires_grad_()).sum().backward()  # the rule's forms cached as well
    mlp.zero_grad()
    y = y.to(change_parameters(change, mlp, y))
    fresh, seq = fresh_copy(mlp), as_sequential(mlp)
    grads = []
    for field, n in ((mlp, node), (fresh, odeflux.NeuralODE(fresh, sensealg=sensealg(), **NODE)),
                     (seq, odeflux.NeuralODE(seq, sensealg=sensealg(), **NODE))):  # fmt: skip
        y0 = y.clone().requires_grad_()
        grads.append(flat_grads(n(y0).pow(2).sum(), [y0, *field.parameters()]))
    assert rel_err(grads[0], grads[1]) <= eps_tol(y.dtype)
    assert rel_err(grads[0], grads[2]) <= NODE["rtol"]


# -- 3. Double backward (a gradient penalty) ---------------------------------------------------------


def second_order(field: nn.Module, sensealg, **solve_kw) -> torch.Tensor:
    """d/d(y0, params) of ||d loss/d(y0, params)||^2 (a gradient penalty), by ``.backward()``."""
    params = list(field.parameters())
    y0 = state((4, 3), requires_grad=True)
    sol = odeflux.solve(odeflux.VectorField(field), y0, (0.0, 1.0), sensealg=sensealg, **solve_kw)
    grads = torch.autograd.grad(sol.ys[-1].pow(2).sum(), [y0, *params], create_graph=True)
    for p in params:
        p.grad = None
    sum(g.pow(2).sum() for g in grads).backward()
    return torch.cat([y0.grad.reshape(-1)] + [p.grad.reshape(-1) for p in params])


@pytest.mark.parametrize("sensealg", [pytest.param(lambda: None, id="default"), SENSEALGS[0]])
def test_double_backward_through_direct_adjoint(sensealg):
    """Works for the Sequential (autograd through the solver's ops): it must for the MLP too, with the
    same second-order gradient. (1e-9: both are exact derivatives of discrete solutions that differ
    by roundoff; a second derivative amplifies that more than a first.)"""
    ref = second_order(make_field("sequential"), sensealg(), rtol=1e-7, atol=1e-9)
    assert torch.isfinite(ref).all() and ref.norm() > 0
    got = second_order(make_field("mlp"), sensealg(), rtol=1e-7, atol=1e-9)
    assert rel_err(got, ref) <= 1e-9




@pytest.mark.parametrize("sensealg", CONTINUOUS)
@KINDS
def test_double_backward_through_a_continuous_adjoint_works_or_says_why(kind, sensealg):
    """Under ``create_graph=True`` the continuous adjoints differentiate the solve's recorded graph
    (on 51f245f they refused: "trying to differentiate twice a function that was marked with
    @once_differentiable", and ``torch.autograd.grad(..., allow_unused=True)`` silently gave
    ``None``): the second-order gradient must match the exact one (DirectAdjoint through the
    Sequential) to about the solves' tolerance."""
    kw = dict(rtol=1e-10, atol=1e-10)
    got = second_order(make_field(kind), sensealg(), **kw)
    ref = second_order(make_field("sequential"), odeflux.DirectAdjoint(hand_written=False), **kw)
    assert rel_err(got, ref) <= 1e-5


# -- 4. A parameter modified in place between forward and backward ----------------------------------

RAISES_FOR_SEQUENTIAL = [  # found by running: the two ways of backpropagating through the solver
    pytest.param(odeflux.DirectAdjoint, id="direct"),
    pytest.param(lambda: odeflux.DirectAdjoint(hand_written=False), id="direct-graph"),
]


def loss_then_modify(field: nn.Module, sensealg) -> torch.Tensor:
    """A solve's loss, after which the first weight is changed in place (as a careless optimizer step
    between forward and backward would)."""
    y0 = state((4, 3), requires_grad=True)
    sol = odeflux.solve(odeflux.VectorField(field), y0, (0.0, 1.0), sensealg=sensealg, rtol=1e-7, atol=1e-9)
    loss = sol.ys[-1].pow(2).sum()
    with torch.no_grad():
        next(field.parameters()).add_(1.0)
    return loss


@pytest.mark.parametrize("sensealg", RAISES_FOR_SEQUENTIAL)
@KINDS
def test_inplace_change_before_backward_raises(kind, sensealg):
    """The gradient would be that of neither the old nor the new parameters: autograd's version
    counter refuses it for the Sequential, and the MLP must refuse it as well."""
    loss = loss_then_modify(make_field(kind), sensealg())
    with pytest.raises(RuntimeError, match=r"(?i)in-?place|modified"):
        loss.backward()


@pytest.mark.parametrize("sensealg", CONTINUOUS)
def test_inplace_change_before_backward_same_outcome_for_mlp_and_sequential(sensealg):
    """On 51f245f neither kind raised under the continuous adjoints (the backward solve used the
    parameters as they were then, a gradient of mixed weights); they save their inputs for
    backward now, so both kinds raise autograd's own error, as a recorded graph does."""
    outcomes = []
    for kind in ("mlp", "sequential"):
        field = make_field(kind)
        loss = loss_then_modify(field, sensealg())
        try:
            loss.backward()
        except RuntimeError as exc:
            outcomes.append(("raised", str(exc)))
        else:
            outcomes.append(("grad", torch.cat([p.grad.reshape(-1) for p in field.parameters()])))
    (how_mlp, mlp_out), (how_seq, seq_out) = outcomes
    assert how_mlp == how_seq == "raised", f"MLP {how_mlp}, Sequential {how_seq}"
    assert re.search(r"(?i)in-?place|modified", mlp_out) and re.search(r"(?i)in-?place|modified", seq_out)


# -- 6. Fast path against plain path on random fields ------------------------------------------------


def random_case(i: int) -> dict:
    """Seeded: widths 2-16 (1 to 3 layers), batch 1-64; activations and dtypes cycled so that every
    pairing appears."""
    rng = random.Random(1000 + i)
    d = rng.randint(2, 16)
    widths = [d] + [rng.randint(2, 16) for _ in range(rng.randint(0, 2))] + [d]
    activation = ["tanh", "sigmoid", "relu", "identity"][i % 4]
    dtype = F32 if i // 4 == 0 else F64
    return dict(seed=i, widths=widths, activation=activation, batch=rng.randint(1, 64), dtype=dtype)


CASES = [random_case(i) for i in range(8)]
SMOOTH_CASES = [c for c in CASES if c["activation"] != "relu"]
FIXED_STEPS = dict(solver=odeflux.RK4(), dt0=0.05)  # no step-size decision anywhere, forward or adjoint


def adaptive(dtype: torch.dtype) -> dict:
    return dict(rtol=1e-4, atol=1e-6) if dtype == F32 else dict(rtol=1e-6, atol=1e-8)


def case_id(c: dict) -> str:
    return f"{c['activation']}-{str(c['dtype'])[6:]}-{'x'.join(map(str, c['widths']))}-b{c['batch']}"


def case_fields(c: dict) -> tuple[MLP, nn.Sequential, torch.Tensor]:
    mlp = MLP(linears(c["widths"], c["dtype"], c["seed"]), activation=c["activation"])
    y0 = state((c["batch"], c["widths"][0]), c["dtype"], seed=c["seed"])
    with torch.no_grad():
        assert mlp._numpy_kernels(y0) is not None  # the MLP really is on the fast path here
    return mlp, as_sequential(mlp), y0


def case_sensealg(factory, c: dict):
    if factory is odeflux.QuadratureAdjoint and c["activation"] == "relu":
        # Its Gauss-Kronrod rule bisects around every kink down to max_depth (12: 80 s here); a
        # shallow bisection keeps the comparison (same algorithm on both paths) and its cost small.
        return odeflux.QuadratureAdjoint(max_depth=2)
    return factory()


def both_gradients(c: dict, sensealg, **solve_kw) -> tuple[torch.Tensor, torch.Tensor]:
    mlp, seq, y0 = case_fields(c)
    grads = []
    for field in (mlp, seq):
        y = y0.clone().requires_grad_()
        sol = odeflux.solve(odeflux.VectorField(field), y, (0.0, 1.0), sensealg=case_sensealg(sensealg, c), **solve_kw)
        grads.append(flat_grads(sol.ys[-1].pow(2).sum(), [y, *field.parameters()]))
    return grads[0], grads[1]


@pytest.mark.parametrize("case", SMOOTH_CASES, ids=case_id)
def test_fast_and_plain_paths_take_the_same_adaptive_steps(case):
    """Step counts are compared in float64 only: in float32 the embedded error estimate of these
    mild fields is a difference of stage derivatives about an ulp apart (error norms 1e-5 with 30 %
    between the two paths, measured), so the step sequence follows roundoff and 1-4 of 45 random
    float32 fields take one step more on one path, while their final states still agree to 5 eps."""
    mlp, seq, y0 = case_fields(case)
    with torch.no_grad():
        fast = odeflux.solve(odeflux.VectorField(mlp), y0, (0.0, 1.0), **adaptive(case["dtype"]))
        plain = odeflux.solve(odeflux.VectorField(seq), y0, (0.0, 1.0), **adaptive(case["dtype"]))
    if case["dtype"] == F64:
        assert fast.stats == plain.stats
    assert rel_err(fast.ys[-1], plain.ys[-1]) <= eps_tol(case["dtype"])


@pytest.mark.parametrize("sensealg", SENSEALGS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fast_and_plain_paths_agree_on_fixed_steps(case, sensealg):
    """The same steps on both paths (forward and adjoint): the solution and every method's gradient
    differ by roundoff alone (at most 3 eps over 40 random fields, measured)."""
    mlp, seq, y0 = case_fields(case)
    with torch.no_grad():
        fast = odeflux.solve(odeflux.VectorField(mlp), y0, (0.0, 1.0), **FIXED_STEPS)
        plain = odeflux.solve(odeflux.VectorField(seq), y0, (0.0, 1.0), **FIXED_STEPS)
    assert fast.stats == plain.stats
    assert rel_err(fast.ys[-1], plain.ys[-1]) <= eps_tol(case["dtype"])
    g_fast, g_plain = both_gradients(case, sensealg, **FIXED_STEPS)
    assert rel_err(g_fast, g_plain) <= eps_tol(case["dtype"])


@pytest.mark.parametrize("sensealg", SENSEALGS)
@pytest.mark.parametrize("case", SMOOTH_CASES, ids=case_id)
def test_fast_and_plain_paths_agree_on_adaptive_gradients(case, sensealg):
    """Adaptive steps: roundoff moves the steps a little differently on the two paths, and a
    gradient (unlike the final state) is not what the error estimate controls, so the two differ by
    more than eps (up to 1.2e4 eps in float64 over 32 random fields, measured): they must agree to
    the solve's rtol, the accuracy either can claim. A wrong or stale product is off by far more."""
    kw = adaptive(case["dtype"])
    g_fast, g_plain = both_gradients(case, sensealg, **kw)
    assert rel_err(g_fast, g_plain) <= kw["rtol"]
