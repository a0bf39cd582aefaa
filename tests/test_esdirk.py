"""The adaptive ESDIRKs (Kvaerno5, KenCarp4 and its IMEX split) against independent references:
their tableaus against the rooted-tree order conditions (coloured trees for the additive pair),
observed orders on Prothero-Robinson, L-stability, Robertson's kinetics against scipy's Radau at
tight tolerances, Newton failures as rejected steps, the IMEX split against the unsplit solve and
scipy, gradients against central finite differences of scipy's solution, and the work counters.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
import torch
from conftest import ROBER_K, T_GRAD, W_GRAD, hires, hires_np, rober, rober_np, rober_fd_gradient
from scipy.integrate import solve_ivp

import odeflux
from odeflux import IMEX, KenCarp4, Kvaerno5, Status
from odeflux.solvers import SOLVERS

ESDIRKS = ["kvaerno5", "kencarp4"]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny states: a second intra-op thread only waits."""


def tab(name: str):
    return SOLVERS[name]().tableau


# -- the tableaus ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def coloured_trees(n: int, colours: int) -> tuple:
    """Rooted trees of ``n`` nodes whose edges carry one of ``colours`` colours (the tableau the
    child's stage weights come through): each a sorted tuple of ``(colour, subtree)``. One colour
    gives Butcher's trees; two give an additive pair's order conditions."""
    if n == 1:
        return ((),)

    def partitions(rem: int, largest: int):
        if rem == 0:
            yield ()
            return
        for p in range(min(rem, largest), 0, -1):
            for rest in partitions(rem - p, p):
                yield (p,) + rest

    out = set()
    for part in partitions(n - 1, n - 1):
        choices = [[(c, t) for c in range(colours) for t in coloured_trees(p, colours)] for p in part]
        for children in itertools.product(*choices):
            out.add(tuple(sorted(children)))
    return tuple(sorted(out))


def density(t) -> int:
    size = lambda u: 1 + sum(size(c) for _, c in u)  # noqa: E731
    g = size(t)
    for _, c in t:
        g *= density(c)
    return g


def phi(t, As: list[np.ndarray]) -> np.ndarray:
    v = np.ones(As[0].shape[0])
    for colour, c in t:
        v = v * (As[colour] @ phi(c, As))
    return v


def worst(weights: np.ndarray, As: list[np.ndarray], n: int, theta: float = 1.0) -> float:
    """The largest ``|weights . Phi(t) - theta^n / gamma(t)|`` over the trees of ``n`` nodes."""
    return max(abs(weights @ phi(t, As) - theta**n / density(t)) for t in coloured_trees(n, len(As)))


def test_tree_enumeration():
    assert [len(coloured_trees(n, 1)) for n in range(1, 7)] == [1, 1, 2, 4, 9, 20]  # OEIS A000081
    assert [len(coloured_trees(n, 2)) for n in range(1, 5)] == [1, 2, 7, 26]  # bicoloured edges: A000151


@pytest.mark.parametrize("name", ESDIRKS)
def test_tableau_structure(name):
    """ESDIRK: an explicit first stage, one diagonal value, stiffly accurate; row sums = c."""
    t = tab(name)
    A, c = t.a_matrix(), np.array(t.c)
    np.testing.assert_allclose(A.sum(axis=1), c, rtol=0, atol=1e-15)
    assert not np.triu(A, 1).any() and not A[0].any() and c[0] == 0.0
    diag = set(np.diag(A)[1:])
    assert diag == {0.26 if name == "kvaerno5" else 0.25}
    np.testing.assert_allclose(A[-1], t.b, rtol=0, atol=1e-16)
    if name == "kencarp4":
        AE = np.array(t.a_explicit)
        assert not np.triu(AE).any()
        np.testing.assert_allclose(AE.sum(axis=1), c, rtol=0, atol=1e-15)
    assert t.adaptive and (t.order, t.error_order) == ((5, 4) if name == "kvaerno5" else (4, 3))


@pytest.mark.parametrize("name", ESDIRKS)
def test_order_conditions(name):
    """b meets every (coloured, for the IMEX pair) order condition up to the order and misses
    one beyond; the embedded solution b - b_err meets them up to error_order and misses one
    beyond; the dense output b(theta) meets them up to interp_order at every theta."""
    t = tab(name)
    As = [t.a_matrix()] + ([np.array(t.a_explicit)] if t.a_explicit is not None else [])
    b = np.array(t.b)
    b_hat = b - np.array(t.b_err)
    for n in range(1, t.order + 1):
        assert worst(b, As, n) < 1e-13, f"order {n}"
    assert worst(b, As[:1], t.order + 1) > 1e-5
    for n in range(1, t.error_order + 1):
        assert worst(b_hat, As, n) < 1e-13, f"embedded order {n}"
    assert worst(b_hat, As[:1], t.error_order + 1) > 1e-5
    for theta in (0.2, 0.5, 0.9, 1.0):
        w = t.dense_weights(theta)
        for n in range(1, t.interp_order + 1):
            assert worst(w, As, n, theta) < 1e-13, f"dense order {n} at {theta}"
    np.testing.assert_allclose(t.dense_weights(1.0), b, rtol=0, atol=1e-14)


def stability(A: np.ndarray, b: np.ndarray, z: complex) -> complex:
    s = len(b)
    return 1 + z * b @ np.linalg.solve(np.eye(s) - z * A, np.ones(s))


@pytest.mark.parametrize("name", ESDIRKS)
def test_l_stable(name):
    """A-stable (|R| <= 1 on the imaginary axis) and R(z) -> 0 as z -> -inf."""
    t = tab(name)
    A, b = t.a_matrix(), np.array(t.b)
    assert max(abs(stability(A, b, 1j * y)) for y in np.logspace(-2, 6, 80)) <= 1 + 1e-12
    assert max(abs(stability(A, b, -x)) for x in np.logspace(-2, 6, 80)) <= 1 + 1e-12
    assert abs(stability(A, b, -1e9)) < 1e-6


# -- accuracy ---------------------------------------------------------------------------------


def prothero_robinson(lam: float):
    """y' = lam (y - sin t) + cos t: the solution sin t from y(0) = 0, whatever lam."""
    return lambda t, y: lam * (y - torch.sin(t)) + torch.cos(t)


@pytest.mark.parametrize("name", ESDIRKS)
def test_observed_order_fixed_steps(name):
    solver = SOLVERS[name]()
    f = prothero_robinson(-1.0)
    y0 = torch.zeros(1, dtype=torch.float64)
    ns = np.array([8, 16, 32])
    errs = []
    for n in ns:
        sol = odeflux.solve(f, y0, (0.0, 2.0), solver=solver, dt0=2.0 / n, controller=odeflux.ConstantStepSize(), rtol=1e-13, atol=1e-15)
        assert sol.stats.n_accepted == n
        errs.append(abs(float(sol.ys[-1, 0]) - math.sin(2.0)))
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert abs(slope - solver.order) < 0.2, (slope, errs)


@pytest.mark.parametrize("name", ESDIRKS)
def test_very_stiff_with_large_steps(name):
    """y' = -1e6 (y - cos t) from y(0) = 0 (a transient of size 1): steps of 0.1 (h lambda = -1e5)
    damp it at once and follow the slow solution; so does the adaptive solve, in few steps."""
    lam = 1e6

    def f(t, y):
        return -lam * (y - torch.cos(t))

    ts = np.linspace(0.2, 2.0, 10)
    slow = (lam**2 * np.cos(ts) + lam * np.sin(ts)) / (lam**2 + 1)
    y0 = torch.zeros(1, dtype=torch.float64)
    fixed = odeflux.solve(f, y0, (0.0, 2.0), solver=SOLVERS[name](), dt0=0.1, controller=odeflux.ConstantStepSize(), saveat=ts)
    assert np.abs(fixed.ys[:, 0].numpy() - slow).max() < 1e-4
    # (At the steps' ends: the cubic dense output inside a step of a problem this stiff carries
    # the end state's error times h |lambda|, through f(t1, y1).)
    adaptive = odeflux.solve(f, y0, (0.0, 2.0), solver=SOLVERS[name](), rtol=1e-6, atol=1e-9, save_everystep=True)
    late = adaptive.ts.numpy() > 1e-3
    exact = (lam**2 * np.cos(adaptive.ts.numpy()) + lam * np.sin(adaptive.ts.numpy())) / (lam**2 + 1)
    assert np.abs(adaptive.ys[:, 0].numpy() - exact)[late].max() < 1e-6
    assert adaptive.stats.n_steps < 100


@functools.lru_cache(maxsize=1)
def rober_reference():
    return solve_ivp(rober_np, (0.0, 1e5), [1.0, 0.0, 0.0], method="Radau", rtol=1e-12, atol=1e-14, dense_output=True)


@pytest.mark.parametrize("name", ESDIRKS)
def test_robertson(name):
    """ROBER on [0, 1e5] at rtol 1e-6, atol 1e-10: every accepted step's state within 10x the
    tolerance (rtol |y| + atol) of scipy's Radau at 1e-12; in about a hundred steps."""
    rtol, atol = 1e-6, 1e-10
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    sol = odeflux.solve(rober, y0, (0.0, 1e5), solver=SOLVERS[name](), rtol=rtol, atol=atol, save_everystep=True)
    ref = rober_reference().sol(sol.ts.numpy()).T
    scaled = np.abs(sol.ys.numpy() - ref) / (rtol * np.abs(ref) + atol)
    assert scaled.max() < 10, scaled.max(axis=0)
    assert sol.stats.n_steps < 200
    torch.testing.assert_close(sol.ys.sum(dim=1), torch.ones(len(sol.ts), dtype=torch.float64), rtol=0, atol=1e-12)


@functools.lru_cache(maxsize=None)
def hires_reference():
    y0 = [1.0, 0, 0, 0, 0, 0, 0, 0.0057]
    return solve_ivp(hires_np, (0.0, 321.8122), y0, method="Radau", rtol=1e-12, atol=1e-14, dense_output=True)


@pytest.mark.parametrize(
    "problem, rtol", [("rober", 1e-8), ("hires", 1e-6), ("hires", 1e-7), ("hires", 1e-8)], ids=lambda v: str(v)
)
def test_kvaerno5_tight_tolerances(problem, rtol):
    """Kvaerno5 at tight tolerances (atol = 1e-4 rtol, as the stiff benchmark): every accepted
    step's state within 10x the tolerance of scipy's Radau at rtol 1e-12, atol 1e-14. Regression:
    the Newton iteration's stopping test took its contraction rate from the ratio of two max-norms,
    which a fast entry's first update dominates; on a stale Jacobian (ROBER's at t = 0, where the
    stiff terms vanish) it stopped with errors of a whole tolerance in y1, and ROBER at 1e-8 stalled
    at dt ~ 2e-4 (MAX_STEPS), HIRES's error stayed flat."""
    atol = 1e-4 * rtol
    if problem == "rober":
        f, y0, span, ref = rober, [1.0, 0.0, 0.0], (0.0, 1e5), rober_reference()
    else:
        f, y0, span, ref = hires, [1.0, 0, 0, 0, 0, 0, 0, 0.0057], (0.0, 321.8122), hires_reference()
    y0 = torch.tensor(y0, dtype=torch.float64)
    sol = odeflux.solve(f, y0, span, solver=Kvaerno5(), rtol=rtol, atol=atol, save_everystep=True, max_steps=2000, throw=False)
    assert sol.status == Status.SUCCESS, sol.message
    exact = ref.sol(sol.ts.numpy()).T
    scaled = np.abs(sol.ys.numpy() - exact) / (rtol * np.abs(exact) + atol)
    assert scaled.max() < 10, (scaled.max(axis=0), sol.stats)


@pytest.mark.slow
def test_robertson_is_stiff_for_tsit5():
    """Tsit5 at the same tolerances runs out of 20x Kvaerno5's steps on ROBER."""
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    implicit = odeflux.solve(rober, y0, (0.0, 1e5), solver=Kvaerno5(), rtol=1e-6, atol=1e-10)
    budget = 20 * implicit.stats.n_steps
    sol = odeflux.solve(rober, y0, (0.0, 1e5), solver=odeflux.Tsit5(), rtol=1e-6, atol=1e-10, max_steps=budget, throw=False)
    assert sol.status == Status.MAX_STEPS and sol.t_final < 1e3


def test_imex_observed_order():
    """The split pair converges at 4th order with fixed steps (the coupling conditions hold):
    the oscillator y0' = y1 explicitly, y1' = -y0 implicitly, a forcing split between them."""
    fe = lambda t, y: torch.stack([y[1], 0 * y[0]]) + 0.3 * torch.sin(t)  # noqa: E731
    fi = lambda t, y: torch.stack([0 * y[1], -y[0]]) - 0.3 * torch.sin(t)  # noqa: E731
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    ns = np.array([10, 20, 40])
    errs = []
    for n in ns:
        sol = odeflux.solve(IMEX(fe, fi), y0, (0.0, 2.0), solver=KenCarp4(), dt0=2.0 / n, controller=odeflux.ConstantStepSize(), rtol=1e-12, atol=1e-14)
        errs.append(abs(float(sol.ys[-1, 0]) - math.cos(2.0)))
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert abs(slope - 4) < 0.2, (slope, errs)


# -- Newton's iteration -------------------------------------------------------------------------


def cubic_decay(t, y):
    return -50.0 * y**3  # y = 1 / sqrt(1 + 100 t)


@pytest.mark.parametrize("name", ESDIRKS)
def test_newton_failure_rejects_and_recovers(name):
    """A sharp transient and dt0 = 1: simplified Newton cannot converge in max_iters (the
    contraction rate near the root is close to 1), so the step is rejected and retried with a
    quarter of dt, counted among the rejections; the solve then succeeds. A fixed-step solve of
    the same step ends with NEWTON_FAILED."""
    y0 = torch.ones(1, dtype=torch.float64)
    rejected = []
    cb = odeflux.StepCallbacks(reject=lambda t, y, h: rejected.append(h))
    sol = odeflux.solve(cubic_decay, y0, (0.0, 2.0), solver=SOLVERS[name](), dt0=1.0, rtol=1e-6, atol=1e-9, callbacks=cb)
    assert sol.success and sol.stats.n_rejected >= 1 and len(rejected) == sol.stats.n_rejected
    assert float(sol.ys[-1, 0]) == pytest.approx(1 / math.sqrt(201.0), rel=1e-5)
    fixed = odeflux.solve(
        cubic_decay, y0, (0.0, 2.0), solver=SOLVERS[name](), dt0=1.0, controller=odeflux.ConstantStepSize(), throw=False
    )
    assert fixed.status == Status.NEWTON_FAILED and "Newton" in fixed.message and torch.isfinite(fixed.ys).all()
    # An adaptive solve ends with NEWTON_FAILED only when the retried step would fall below dtmin.
    floor = odeflux.solve(cubic_decay, y0, (0.0, 2.0), solver=SOLVERS[name](), dt0=1.0, dtmin=0.5, throw=False)
    assert floor.status == Status.NEWTON_FAILED and "dtmin=0.5" in floor.message and floor.t_final == 0.0
    assert floor.stats.n_rejected == 1


def test_newton_failure_first_try_is_the_quarter_step():
    """The first rejection is a Newton failure (not an error-test one): the retried step is dt/4."""
    y0 = torch.ones(1, dtype=torch.float64)
    tried = []
    cb = odeflux.StepCallbacks(step=lambda t, y, h: tried.append(h))
    odeflux.solve(cubic_decay, y0, (0.0, 2.0), solver=Kvaerno5(), dt0=1.0, rtol=1e-6, atol=1e-9, callbacks=cb)
    assert tried[:2] == [1.0, 0.25]


# -- IMEX --------------------------------------------------------------------------------------

N_GRID = 16
DX = 1.0 / (N_GRID + 1)


def diffusion(t, u):
    """u_xx on (0, 1) with u = 0 at both ends (the stiff part: eigenvalues down to -4/dx^2)."""
    padded = torch.nn.functional.pad(u, (1, 1))
    return (padded[2:] - 2 * u + padded[:-2]) / DX**2


REACTION_GRAPHS = []


def reaction(t, u):
    """Fisher's logistic growth (the non-stiff part). Notes each call with a graph: KenCarp4's
    split forms only the implicit part's Jacobian, so in a no-grad solve it makes none."""
    if u.requires_grad:
        REACTION_GRAPHS.append(t)
    return 5.0 * u * (1 - u)


def test_imex_split_against_unsplit_and_scipy():
    x = torch.linspace(DX, 1 - DX, N_GRID, dtype=torch.float64)
    u0 = torch.sin(math.pi * x) + 0.5 * torch.sin(3 * math.pi * x)
    ts = [0.05, 0.2, 0.5]
    ref = solve_ivp(
        lambda t, u: (diffusion(t, torch.from_numpy(u)) + 5.0 * torch.from_numpy(u) * (1 - torch.from_numpy(u))).numpy(),
        (0.0, 0.5), u0.numpy(), method="Radau", rtol=1e-12, atol=1e-14, t_eval=ts,
    ).y.T  # fmt: skip
    field = IMEX(explicit=reaction, implicit=diffusion)
    REACTION_GRAPHS.clear()
    with torch.no_grad():
        split = odeflux.solve(field, u0, (0.0, 0.5), solver=KenCarp4(), rtol=1e-7, atol=1e-9, saveat=ts)
        assert not REACTION_GRAPHS  # (Kvaerno5 below differentiates the whole sum)
        whole = odeflux.solve(lambda t, u: diffusion(t, u) + 5.0 * u * (1 - u), u0, (0.0, 0.5), solver=KenCarp4(), rtol=1e-7, atol=1e-9, saveat=ts)
        # Every other solver sees the sum.
        other = odeflux.solve(field, u0, (0.0, 0.5), solver=Kvaerno5(), rtol=1e-7, atol=1e-9, saveat=ts)
    for sol in (split, whole, other):
        assert np.abs(sol.ys.numpy() - ref).max() < 2e-6
    assert np.abs(split.ys.numpy() - whole.ys.numpy()).max() < 2e-6
    assert split.stats.n_steps < 300


def test_imex_with_args_and_errors():
    """``args`` reach both parts. (A forcing in the explicit part of a stiff mode's equation, as
    here, enters y1 after the last implicit stage: KenCarp4 then keeps h |lambda| modest, so this
    split suits lambda = -50 and not -1e4; such a term belongs in the implicit part.)"""

    def stiff(t, y, k):
        return -k * y

    def mild(t, y, k):
        return torch.sin(t) * torch.ones_like(y)

    k = torch.tensor(50.0, dtype=torch.float64)
    y0 = torch.ones(2, dtype=torch.float64)
    sol = odeflux.solve(IMEX(mild, stiff), y0, (0.0, 1.0), args=k, solver=KenCarp4(), rtol=1e-8, atol=1e-10)
    kf = 50.0  # y' = -k y + sin t from 1: exp(-k t) + (k sin t - cos t + exp(-k t)) / (k^2 + 1)
    exact = math.exp(-kf) + (kf * math.sin(1.0) - math.cos(1.0) + math.exp(-kf)) / (kf**2 + 1)
    assert sol.ys[-1, 0].item() == pytest.approx(exact, rel=1e-6)
    assert sol.stats.n_steps < 1000
    with pytest.raises(TypeError, match="two callables"):
        IMEX(mild, None)


# -- gradients ---------------------------------------------------------------------------------


class Rober(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(ROBER_K, dtype=torch.float64))

    def forward(self, t, y):
        return rober(t, y, self.k)


SENSEALGS = [odeflux.DirectAdjoint, odeflux.InterpolatingAdjoint, odeflux.QuadratureAdjoint, odeflux.GaussAdjoint]
FAST = {("kvaerno5", "DirectAdjoint"), ("kvaerno5", "InterpolatingAdjoint"), ("kencarp4", "GaussAdjoint")}


@pytest.mark.parametrize(
    "name, sensealg",
    [
        pytest.param(n, a, marks=() if (n, a.__name__) in FAST else pytest.mark.slow, id=f"{n}-{a.__name__}")
        for n in ESDIRKS for a in SENSEALGS
    ],
)  # fmt: skip
def test_gradients_wrt_rate_constants(name, sensealg):
    """d(w . y(T))/dk of ROBER under DirectAdjoint (through the Newton iterations; step sizes
    constants) and the continuous adjoints that take y(t) from the forward solve (their backward
    systems solved by the same method, with the adjoint systems' own Jacobians) against finite
    differences of an independent solution, within 1e-5 relative at rtol 1e-6 (measured: 4e-6 at
    worst, Kvaerno5's quadrature adjoints through its cubic dense output; the finite differences
    agree with InterpolatingAdjoint to 1e-8). (BacksolveAdjoint integrates ROBER's y backwards,
    where its stiff mode grows as exp(|lambda| t): see test_backsolve_adjoint.)"""
    model = Rober()
    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    sol = odeflux.solve(model, y0, (0.0, T_GRAD), solver=SOLVERS[name](), rtol=1e-6, atol=1e-14, sensealg=sensealg())
    (g,) = torch.autograd.grad(sol.ys[-1] @ torch.from_numpy(W_GRAD), [model.k])
    np.testing.assert_allclose(g.numpy(), rober_fd_gradient(), rtol=1e-5)


class Relax(torch.nn.Module):
    """Prothero-Robinson with a learnable stiffness: y = sin t + y0 exp(lam t)."""

    def __init__(self, lam: float):
        super().__init__()
        self.lam = torch.nn.Parameter(torch.tensor(lam, dtype=torch.float64))

    def forward(self, t, y):
        return self.lam * (y - torch.sin(t)) + torch.cos(t)


@pytest.mark.parametrize("name", ESDIRKS)
def test_backsolve_adjoint(name):
    """BacksolveAdjoint with these solvers where y can be integrated backwards (lam = -10 over
    [0, 0.5]): d y(T) / d lam = y0 T exp(lam T), d y(T) / d y0 = exp(lam T)."""
    model, T = Relax(-10.0), 0.5
    y0 = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)
    sol = odeflux.solve(model, y0, (0.0, T), solver=SOLVERS[name](), rtol=1e-9, atol=1e-12, sensealg=odeflux.BacksolveAdjoint())
    g_lam, g_y0 = torch.autograd.grad(sol.ys[-1, 0], [model.lam, y0])
    assert float(g_lam) == pytest.approx(T * math.exp(-10 * T), rel=1e-6)
    assert float(g_y0) == pytest.approx(math.exp(-10 * T), rel=1e-6)
    assert sol.backward_stats.n_jacobians >= 1 and sol.backward_stats.n_newton_iterations > 0


# -- counters ----------------------------------------------------------------------------------


def test_counters():
    calls = 0

    def f(t, y):
        nonlocal calls
        calls += 1
        return rober(t, y)

    y0 = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    for solver in (Kvaerno5(), KenCarp4()):
        calls = 0
        st = odeflux.solve(f, y0, (0.0, 100.0), solver=solver, rtol=1e-6, atol=1e-10).stats
        assert st.n_f_evals == calls
        # The Jacobian kept across steps; one factorisation per step tried (its dt is new).
        assert 1 <= st.n_jacobians < st.n_steps / 2 and st.n_factorizations >= st.n_steps - st.n_rejected
        # One solve per Newton iteration; KenCarp4 one more per completed step to smooth the error
        # estimate (Kvaerno5's embedded solution is a stage value: its estimate is not smoothed).
        if isinstance(solver, Kvaerno5):
            assert st.n_linear_solves == st.n_newton_iterations
        else:
            assert 0 < st.n_linear_solves - st.n_newton_iterations <= st.n_steps
        assert st.n_newton_iterations >= 5 * st.n_accepted  # (at least one per implicit stage)
    # Fixed steps: a fresh Jacobian and Newton matrix every step (one diagonal value).
    st = odeflux.solve(lambda t, y: -y**3 + torch.sin(t), y0, (0.0, 1.0), solver=odeflux.TRBDF2(), dt0=0.1).stats
    assert (st.n_jacobians, st.n_factorizations) == (10, 10) and st.n_linear_solves == st.n_newton_iterations > 0
    st = odeflux.solve(f, y0, (0.0, 1.0), solver=odeflux.Tsit5()).stats
    assert (st.n_jacobians, st.n_factorizations, st.n_linear_solves, st.n_newton_iterations) == (0, 0, 0, 0)


def test_registry_and_exports():
    for key, cls in (("kvaerno5", Kvaerno5), ("kencarp4", KenCarp4)):
        assert SOLVERS[key] is cls and getattr(odeflux, cls.__name__) is cls
        s = cls()
        assert s.adaptive and not s.explicit and repr(s) == f"{cls.__name__}()"
    assert Kvaerno5().fsal and not KenCarp4().fsal
    with pytest.raises(ValueError, match="newton_kappa"):
        Kvaerno5(newton_kappa=2.0)
