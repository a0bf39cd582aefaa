"""Per-sample stiff solves: a batch of independent stiff systems (``solve(..., solver=Rodas5P(),
batch_axis=0)``), each with its own steps and its own ``(n, n)`` Jacobian, against single solves,
central differences and scipy; the batched ``W`` inverse against LAPACK's."""

import math

import pytest
import torch
from torch import nn

import odeflux
from odeflux.solution import Status

D = torch.float64
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (conftest.py: tiny ops)


class Rober(nn.Module):
    """Robertson's kinetics with one set of log rate constants per sample (``(B, 3)``), or one
    shared set (``(3,)``)."""

    def __init__(self, logk):
        super().__init__()
        self.logk = nn.Parameter(torch.as_tensor(logk, dtype=D).clone())

    def forward(self, t, y):
        k1, k2, k3 = self.logk.exp().unbind(-1)
        a, b, c = y.unbind(-1)
        return torch.stack([-k1 * a + k3 * b * c, k1 * a - k2 * b * b - k3 * b * c, k2 * b * b], -1)


SCALES = [0.5, 1.0, 2.0]
LOGK = torch.tensor([0.04, 3e7, 1e4], dtype=D).log() + torch.tensor(SCALES, dtype=D).log()[:, None]


def _y0(B=len(SCALES)):
    return torch.tensor([1.0, 0.0, 0.0], dtype=D).expand(B, 3).clone()


def test_each_stiff_sample_takes_the_steps_of_its_own_solve():
    """Rodas5P per sample on ROBER to t = 1e4, rates scaled per sample: each sample's accepted
    and rejected steps and saved states as its own (joint) solve's, and within 10x the tolerance
    of scipy's Radau at 1e-12; the Jacobian counted once per attempted step."""
    scipy_integrate = pytest.importorskip("scipy.integrate")
    f = Rober(LOGK)
    ts = torch.tensor([1e-3, 1.0, 1e2, 1e4], dtype=D)
    with torch.no_grad():
        sol = odeflux.solve(f, _y0(), (0.0, 1e4), solver=odeflux.Rodas5P(), rtol=1e-6, atol=1e-10, saveat=ts, batch_axis=0)
    assert sol.status == Status.SUCCESS
    assert sol.stats.n_jacobians == sol.stats.n_factorizations == sol.stats.n_steps
    for b in range(len(SCALES)):
        fb = Rober(LOGK[b])
        with torch.no_grad():
            one = odeflux.solve(fb, _y0(1)[0], (0.0, 1e4), solver=odeflux.Rodas5P(), rtol=1e-6, atol=1e-10, saveat=ts)
        assert int(sol.sample_stats["n_accepted"][b]) == one.stats.n_accepted > 50
        assert int(sol.sample_stats["n_rejected"][b]) == one.stats.n_rejected
        torch.testing.assert_close(sol.ys[b], one.ys, rtol=1e-9, atol=1e-15)
        k = LOGK[b].exp().tolist()

        def rober(t, y, k=k):
            return [-k[0] * y[0] + k[2] * y[1] * y[2], k[0] * y[0] - k[1] * y[1] ** 2 - k[2] * y[1] * y[2], k[1] * y[1] ** 2]

        ref = scipy_integrate.solve_ivp(rober, (0.0, 1e4), [1.0, 0.0, 0.0], method="Radau", rtol=1e-12, atol=1e-14,
                                        t_eval=ts.tolist()).y.T  # fmt: skip
        scale = 1e-10 + 1e-6 * abs(torch.tensor(ref))
        assert float((abs(sol.ys[b] - torch.tensor(ref)) / scale).max()) < 10


def test_the_traced_stiff_loop_matches_the_host_loop():
    """The loop ``compile=True`` compiles (torch.while_loop, here with its eager backend: no
    compiler) takes the host loop's steps and states for a batch of Rodas5P problems, each its own
    end. Its body is traced as compiled code is (``torch.compiler.is_compiling()``): with the
    Jacobian by ``jacrev`` and the batched Gauss-Jordan inverse where the host loop takes autograd
    and LAPACK."""
    from odeflux.compiled.loop import LoopSpec
    from odeflux.compiled.start import start_and_run
    from odeflux.per_sample import Batch

    f = Rober(LOGK)
    b = Batch(f, odeflux.Rodas5P(), odeflux.PIController(), True, saving=True, rtol=1e-6, atol=1e-10, dt0=None,
              dtmin=None, dtmax=None, max_steps=500)  # fmt: skip
    y0 = _y0()
    t0, t1 = torch.zeros(3, dtype=D), torch.tensor([10.0, 30.0, 100.0], dtype=D)  # (each its own end)
    with torch.no_grad():
        k0 = f(t0, y0)
        taus = torch.tensor([[1.0, 10.0, math.nan], [1.0, 10.0, 30.0], [1.0, 10.0, 100.0]], dtype=D)
        host, _ = b.run(y0, k0, t0, t1, taus)
        nan = torch.tensor(math.nan, dtype=D)
        inputs = (f, y0, k0, t0, t1, taus, torch.tensor(1e-6, dtype=D), torch.tensor(1e-10, dtype=D),
                  nan, nan, nan, torch.tensor(500), torch.full_like(t0, b.controller.init_state()))  # fmt: skip
        # (dynamo's cache of the loop's body is shared by every traced call of run_loop in this
        # process: traced after another solver's body, a trace fails on aliased coefficients. The
        # programs compile=True builds each have a copy of the code of their own.)
        torch._dynamo.reset()
        try:
            traced = start_and_run(LoopSpec(b.solver, b.controller, True, True), b.start, *inputs, traced=True)
        finally:
            torch._dynamo.reset()
    assert traced[6].tolist() == host[6].tolist() and min(host[6].tolist()) > 10  # accepted steps
    assert traced[7].tolist() == host[7].tolist()  # rejected
    known = ~torch.isnan(taus)
    torch.testing.assert_close(traced[9][known], host[9][known], rtol=1e-10, atol=1e-16)


def test_the_per_sample_direct_gradient_matches_each_samples_own_and_central_differences():
    """DirectAdjoint through the per-sample Rodas5P loop, rates per sample, samples of different
    step counts (those done stand still while the others step: without care their stand-still
    step, of size 0, put NaN into every gradient): each sample's d loss / d log k as its own
    joint solve's DirectAdjoint gives it (the same discrete solution: recorded through the eager
    stepper's graph step), and one rate per sample against central differences of a tighter solve."""
    ts = torch.tensor([0.1, 1.0, 10.0], dtype=D)
    w = torch.randn(3, 3, 3, dtype=D, generator=torch.Generator().manual_seed(0))
    opts = dict(solver=odeflux.Rodas5P(), atol=1e-12, saveat=ts)

    f = Rober(LOGK)
    sol = odeflux.solve(f, _y0(), (0.0, 10.0), rtol=1e-8, batch_axis=0, **opts)
    assert len(set(sol.sample_stats["n_steps"].tolist())) > 1  # (some stand still while others step)
    (g,) = torch.autograd.grad((sol.ys * w).sum(), f.logk)
    assert torch.isfinite(g).all()
    eps = 1e-5
    for b in range(3):
        fb = Rober(LOGK[b])
        one = odeflux.solve(fb, _y0(1)[0], (0.0, 10.0), rtol=1e-8, **opts)
        (gb,) = torch.autograd.grad((one.ys * w[b]).sum(), fb.logk)
        torch.testing.assert_close(g[b], gb, rtol=1e-8, atol=1e-12)
        with torch.no_grad():
            diff = []
            for sign in (1, -1):
                logk = LOGK[b].clone()
                logk[b] += sign * eps
                diff.append((odeflux.solve(Rober(logk), _y0(1)[0], (0.0, 10.0), rtol=1e-10, **opts).ys * w[b]).sum())
        fd = (diff[0] - diff[1]) / (2 * eps)
        assert abs(float(g[b, b] - fd)) < 1e-6 * abs(float(fd))


def test_one_stiff_sample_failing_leaves_the_others_to_finish():
    """A sample whose rates are NaN fails (a Jacobian with NaN entries: NONFINITE) while the others
    reach t1 with the states of their own solves."""
    logk = LOGK.clone()
    logk[1, 0] = math.nan
    with torch.no_grad():
        sol = odeflux.solve(Rober(logk), _y0(), (0.0, 10.0), solver=odeflux.Rodas5P(), rtol=1e-6, atol=1e-10,
                            batch_axis=0, throw=False)  # fmt: skip
        good = odeflux.solve(Rober(LOGK[[0, 2]]), _y0(2), (0.0, 10.0), solver=odeflux.Rodas5P(), rtol=1e-6, atol=1e-10,
                             batch_axis=0)  # fmt: skip
    assert sol.statuses.tolist() == [Status.SUCCESS, Status.NONFINITE, Status.SUCCESS]
    torch.testing.assert_close(sol.ys[[0, 2], -1], good.ys[:, -1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "solver, sensealg, message",
    [
        (odeflux.Kvaerno5(), None, "per-sample solves take explicit Runge-Kutta methods and the Rosenbrock methods"),
        (odeflux.Rodas5P(jac=lambda t, y: -torch.eye(3, dtype=D)), None, "per-sample solves take Rodas5P without a user jac"),
        (odeflux.Rodas5P(), odeflux.GaussAdjoint(), "per-sample solves with Rodas5P differentiate with DirectAdjoint"),
    ],
)
def test_what_a_per_sample_stiff_solve_refuses_gets_one_line(solver, sensealg, message):
    f = Rober(LOGK)
    with pytest.raises(ValueError, match=message) as info:
        odeflux.solve(f, _y0(), (0.0, 1.0), solver=solver, batch_axis=0, sensealg=sensealg)
    assert "\n" not in str(info.value)


def test_the_batched_gauss_jordan_inverse_matches_lapack_and_flags_each_singular_matrix():
    """The inverse compiled programs use for small ``W`` (:func:`_unrolled_inverse`), on a batch
    that needs row exchanges (zeros on the diagonal), with one singular matrix flagged alone."""
    from odeflux.solvers.rosenbrock import _unrolled_inverse

    g = torch.Generator().manual_seed(1)
    M = torch.randn(4, 5, 5, dtype=D, generator=g)
    M[:, 0, 0] = 0.0
    M[2] = torch.outer(torch.arange(1.0, 6.0, dtype=D), torch.ones(5, dtype=D))  # rank one
    (inv,), info = _unrolled_inverse(M)
    assert info.tolist() == [0, 0, 1, 0]
    ok = [0, 1, 3]
    torch.testing.assert_close(inv[ok], torch.linalg.inv(M[ok]), rtol=1e-10, atol=1e-12)
    (inv1,), info1 = _unrolled_inverse(M[0])  # (one matrix, as a joint solve's)
    assert int(info1) == 0
    torch.testing.assert_close(inv1, inv[0], rtol=0, atol=0)


def test_neural_ode_takes_a_per_sample_stiff_solve():
    """``NeuralODE(..., solver=Rodas5P(), batch_axis=0)``: DirectAdjoint by default (the one gradient a
    per-sample Rosenbrock solve has); the per-sample solve's final states, and the gradient of its
    own solve; a continuous adjoint asked for gets the one line."""
    torch.manual_seed(0)
    field = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    y0 = torch.randn(4, 3, dtype=D)
    node = odeflux.NeuralODE(field, solver=odeflux.Rodas5P(), batch_axis=0)
    assert isinstance(node.sensealg, odeflux.DirectAdjoint)
    out = node(y0)
    (g,) = torch.autograd.grad(out.pow(2).sum(), field[0].weight)
    sol = odeflux.solve(field, y0, (0.0, 1.0), solver=odeflux.Rodas5P(), batch_axis=0, sensealg=odeflux.DirectAdjoint())
    torch.testing.assert_close(out, sol.ys[:, -1], rtol=1e-12, atol=1e-14)
    (g_ref,) = torch.autograd.grad(sol.ys[:, -1].pow(2).sum(), field[0].weight)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"pass sensealg=DirectAdjoint\(\)"):
        odeflux.NeuralODE(field, solver=odeflux.Rodas5P(), batch_axis=0, sensealg=odeflux.GaussAdjoint())(y0)


def test_stiff_states_of_any_shape_behind_the_batch_axis():
    """(batch, 2, 2) states, each sample Prothero-Robinson's y' = -lambda (y - cos t) + (-sin t)
    with its own stiffness (lambda 10 to 1e5): each sample's steps and end state as its own solve
    of a (2, 2) state, and the exact solution cos t (y0 = 1)."""
    lam = torch.tensor([10.0, 1e3, 1e5], dtype=D)

    def field(rate):
        return lambda t, y: -rate * (y - torch.cos(t)) - torch.sin(t)

    def batched(t, y):
        return field(lam.reshape(-1, 1, 1))(t.reshape(-1, 1, 1), y)

    y0 = torch.ones(3, 2, 2, dtype=D)
    with torch.no_grad():
        sol = odeflux.solve(batched, y0, (0.0, 2.0), solver=odeflux.Rodas5P(), rtol=1e-7, atol=1e-9, batch_axis=0)
        for b in range(3):
            one = odeflux.solve(field(lam[b]), y0[b], (0.0, 2.0), solver=odeflux.Rodas5P(), rtol=1e-7, atol=1e-9)
            assert int(sol.sample_stats["n_accepted"][b]) == one.stats.n_accepted
            torch.testing.assert_close(sol.ys[b, -1], one.ys[-1], rtol=1e-9, atol=1e-12)  # (rounding: batched products)
    torch.testing.assert_close(sol.ys[:, -1], torch.full((3, 2, 2), math.cos(2.0), dtype=D), rtol=0, atol=1e-6)
