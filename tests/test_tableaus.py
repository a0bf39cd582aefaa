"""Every Butcher tableau against the rooted-tree order conditions, computed here from scratch.

For a method (A, b, c) and a rooted tree t, the condition is ``b . Phi(t) = 1 / gamma(t)``, where
``Phi(leaf) = 1`` (all stages) and ``Phi([t1, ..., tm]) = prod_j A Phi(t_j)`` elementwise, and
``gamma(t) = |t| prod_j gamma(t_j)``. A dense output ``b(theta)`` of order q satisfies
``b(theta) . Phi(t) = theta^|t| / gamma(t)`` for every tree with ``|t| <= q`` and every theta.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest

from odeflux.solvers import RK_SOLVERS as SOLVERS  # the tableaus of the explicit Runge-Kutta solvers

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (conftest.py: tiny ops)

ALL = sorted(SOLVERS)
ADAPTIVE = [n for n in ALL if SOLVERS[n]().adaptive]
EXPECTED = {  # name: (order, error_order, interp_order, adaptive, fsal), from the methods' papers
    "tsit5": (5, 4, 4, True, True),
    "dopri5": (5, 4, 4, True, True),
    "bs3": (3, 2, 3, True, True),
    "heun": (2, 1, 2, True, False),
    "euler": (1, None, 1, False, False),
    "midpoint": (2, None, 2, False, False),
    "rk4": (4, None, 3, False, False),
    # Dopri8: DOP853's 5th-order embedded estimate; its dense output is odeflux's free quintic
    # (DOP853's 7th-order one needs three more stages).
    "dopri8": (8, 5, 5, True, True),
    "fehlberg2": (2, 1, 2, True, False),
    "adaptive_heun": (2, 1, 2, True, False),  # torchdiffeq's name for Heun()
    "heun2": (2, None, 2, False, False),
    "heun3": (3, None, 2, False, False),
    "rk38": (4, None, 3, False, False),
    # The implicit methods: fixed step; collocation methods' dense output is their collocation
    # polynomial, of stage order (Hairer and Wanner, Solving ODEs II, IV.5).
    "implicit_euler": (1, None, 1, False, False),
    "implicit_midpoint": (2, None, 1, False, False),
    "trapezoid": (2, None, 2, False, False),
    "radauiia3": (3, None, 2, False, False),
    "radauiia5": (5, None, 3, False, False),
    "gl4": (4, None, 2, False, False),
    "gl6": (6, None, 3, False, False),
    "sdirk2": (2, None, 2, False, False),
    "trbdf2": (2, None, 2, False, False),
}


@functools.lru_cache(maxsize=None)
def trees(n: int) -> tuple:
    """All rooted trees with n nodes, each a sorted tuple of its children's subtrees."""
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
        for children in itertools.product(*(trees(p) for p in part)):
            out.add(tuple(sorted(children)))
    return tuple(sorted(out))


def size(t) -> int:
    return 1 + sum(size(c) for c in t)


def gamma(t) -> int:
    g = size(t)
    for c in t:
        g *= gamma(c)
    return g


def phi(t, A: np.ndarray) -> np.ndarray:
    v = np.ones(A.shape[0])
    for c in t:
        v = v * (A @ phi(c, A))
    return v


def residuals(weights: np.ndarray, A: np.ndarray, order: int, theta: np.ndarray | None = None) -> np.ndarray:
    """``|weights . Phi(t) - theta^|t| / gamma(t)|`` for every tree of exactly ``order`` nodes."""
    th = np.ones(1) if theta is None else theta
    w = np.atleast_2d(weights)
    return np.array([np.abs(w @ phi(t, A) - th**order / gamma(t)).max() for t in trees(order)])


def test_tree_enumeration_matches_known_counts():
    # OEIS A000081: the number of rooted trees with n nodes.
    assert [len(trees(n)) for n in range(1, 8)] == [1, 1, 2, 4, 9, 20, 48]
    # gamma: the density of each tree (Butcher), e.g. 1/gamma = 1/3 for b.c^2 and 1/6 for b.A.c.
    assert sorted(gamma(t) for t in trees(3)) == [3, 6]
    assert sorted(gamma(t) for t in trees(4)) == [4, 8, 12, 24]


@pytest.mark.parametrize("name", ALL)
def test_declared_properties(name):
    s = SOLVERS[name]()
    tab = s.tableau
    order, error_order, interp_order, adaptive, fsal = EXPECTED[name]
    assert (tab.order, tab.error_order, tab.interp_order, s.adaptive, s.fsal) == (
        order, error_order, interp_order, adaptive, fsal,
    )  # fmt: skip


@pytest.mark.parametrize("name", ALL)
def test_row_sums_equal_nodes(name):
    tab = SOLVERS[name]().tableau
    np.testing.assert_allclose(tab.a_matrix().sum(axis=1), tab.c, rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", ALL)
def test_order_conditions(name):
    tab = SOLVERS[name]().tableau
    A, b = tab.a_matrix(), np.array(tab.b)
    for p in range(1, tab.order + 1):
        assert residuals(b, A, p).max() < 1e-13, f"{name}: order-{p} conditions fail"
    # The order is exact: some condition of the next order fails.
    assert residuals(b, A, tab.order + 1).max() > 1e-5


@pytest.mark.parametrize("name", ADAPTIVE)
def test_embedded_method_order_conditions(name):
    tab = SOLVERS[name]().tableau
    A = tab.a_matrix()
    b_hat = np.array(tab.b) - np.array(tab.b_err)
    for p in range(1, tab.error_order + 1):
        assert residuals(b_hat, A, p).max() < 1e-13, f"{name}: embedded order-{p} conditions fail"
    assert residuals(b_hat, A, tab.error_order + 1).max() > 1e-5
    # The error weights are not zero (a zero estimate would accept every step).
    assert np.abs(tab.b_err).max() > 1e-3


@pytest.mark.parametrize("name", [n for n in ALL if SOLVERS[n]().fsal])
def test_fsal_last_stage_is_the_solution(name):
    tab = SOLVERS[name]().tableau
    assert tab.c[-1] == 1.0
    np.testing.assert_array_equal(np.array(tab.a[-1] + (0.0,)), np.array(tab.b))


def test_dopri8_is_dop853():
    """Dopri8's tableau is Hairer's DOP853 as scipy ships it (an independent transcription)."""
    from scipy.integrate._ivp import dop853_coefficients as dop

    tab = SOLVERS["dopri8"]().tableau
    s = tab.stages  # 12 stages and the FSAL one; DOP853's three dense-output stages are not used
    np.testing.assert_array_equal(tab.c, dop.C[:s])
    np.testing.assert_allclose(tab.a_matrix(), dop.A[:s, :s], rtol=1e-15, atol=0)
    np.testing.assert_allclose(tab.b, dop.A[s - 1, :s], rtol=1e-15, atol=0)
    np.testing.assert_allclose(tab.b_err, dop.E5, rtol=1e-15, atol=0)


THETAS = np.linspace(0.0, 1.0, 17)


@pytest.mark.parametrize("name", ALL)
def test_dense_weights_endpoints(name):
    tab = SOLVERS[name]().tableau
    np.testing.assert_array_equal(tab.dense_weights(0.0), np.zeros(tab.stages))
    np.testing.assert_allclose(tab.dense_weights(1.0), tab.b, rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", ALL)
def test_dense_output_order_conditions_for_all_theta(name):
    tab = SOLVERS[name]().tableau
    A = tab.a_matrix()
    W = tab.dense_weights(THETAS)  # (len(THETAS), stages)
    for q in range(1, tab.interp_order + 1):
        assert residuals(W, A, q, THETAS).max() < 1e-13, f"{name}: dense output fails order-{q} conditions"
    # ... and not beyond (inside the step; at theta = 1 it may be the higher-order b).
    assert residuals(W, A, tab.interp_order + 1, THETAS).max() > 1e-5


@pytest.mark.parametrize("name", ALL)
def test_torch_dense_weights_match_tableau(name):
    import torch

    s = SOLVERS[name]()
    co = s.coefficients(torch.float64, torch.device("cpu"))
    w = s.dense_weights(torch.tensor(THETAS, dtype=torch.float64), co).numpy()
    # A few ulps of the largest weight (|b_i(theta)| reaches ~2): the matmul's summation order is the CPU's.
    np.testing.assert_allclose(w, s.tableau.dense_weights(THETAS), rtol=0, atol=2e-14)
    co32 = s.coefficients(torch.float32, torch.device("cpu"))
    assert s.dense_weights(torch.tensor(THETAS, dtype=torch.float32), co32).dtype == torch.float32


def test_tableau_rejects_malformed_data():
    from odeflux.solvers import ButcherTableau

    two = {"name": "bad", "order": 1, "c": (0.0, 1.0), "b": (0.5, 0.5), "b_err": None, "interp": ((0.5,), (0.5,)), "interp_order": 1}
    with pytest.raises(ValueError, match="lower triangular"):
        ButcherTableau(a=((), (1.0, 0.0)), **two)
    with pytest.raises(ValueError, match="one entry per stage"):
        ButcherTableau(name="bad", order=1, c=(0.0,), a=((),), b=(1.0, 0.0), b_err=None, interp=((1.0,),), interp_order=1)
    with pytest.raises(ValueError, match="FSAL"):
        ButcherTableau(a=((), (1.0,)), fsal=True, **two)


def test_coefficient_tensors_are_made_once_per_tableau():
    """A solver instance made anew (``solve()`` without ``solver=``) reads the tensors its class's
    tableau already has; another tableau, even under the same class and repr, gets its own."""
    import dataclasses

    import torch

    from odeflux.solvers.tableau import ExplicitRK

    a, b = SOLVERS["tsit5"](), SOLVERS["tsit5"]()
    co = a.coefficients(torch.float64, torch.device("cpu"))
    assert b.coefficients(torch.float64, torch.device("cpu")) is co
    assert a.coefficients(torch.float32, torch.device("cpu")) is not co
    other_tab = dataclasses.replace(a.tableau, b_err=tuple(2 * v for v in a.tableau.b_err))
    other = ExplicitRK(tableau=other_tab)
    mine = other.coefficients(torch.float64, torch.device("cpu"))
    assert repr(other) == repr(ExplicitRK(tableau=a.tableau))
    assert mine is not co and torch.equal(mine.e_row, 2 * co.e_row)
