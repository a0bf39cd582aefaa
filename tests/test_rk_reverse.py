"""DirectAdjoint's hand-written reverse pass (odeflux/sensitivity/rk_reverse.py) against autograd
through the solver's operations, finite differences, and a closed form."""

from __future__ import annotations

import pytest
import scipy.linalg
import torch
from torch import nn

import odeflux
from odeflux import ConstantStepSize, DirectAdjoint
from odeflux.sensitivity.rk_reverse import reverse_pass_rule
from odeflux.problem import make_problem
from odeflux.solvers import SOLVERS

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (conftest.py: tiny ops)


def mlp(activation: str = "tanh", bias: bool = True) -> odeflux.MLP:
    g = torch.Generator().manual_seed(0)
    layers = [nn.Linear(4, 6, bias=bias), nn.Linear(6, 4)]
    with torch.no_grad():
        for p in (q for m in layers for q in m.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.8)
    return odeflux.MLP(layers, activation).double()


def grads(hand_written: bool, solver: str = "tsit5", t_span=(0.0, 1.0), loss=lambda ys: (ys**2).sum(), **kw):
    m = mlp(kw.pop("activation", "tanh"))
    y0 = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    sol = odeflux.solve(odeflux.VectorField(m), y0, t_span, solver=SOLVERS[solver](),
                        sensealg=DirectAdjoint(hand_written=hand_written), **kw)  # fmt: skip
    loss(sol.ys).backward()
    return torch.cat([y0.grad.reshape(-1)] + [p.grad.reshape(-1) for p in m.parameters()]), sol


ADAPTIVE = dict(rtol=1e-6, atol=1e-6)


def same_sums(g: torch.Tensor, ref: torch.Tensor) -> bool:
    """Equal up to the round-off of summing the same products in two orders (NumPy's BLAS and
    torch's) over every stage of every step: some 1e4 float64 ulps of the gradient's scale (the
    BLAS kernels, and so the orders, differ between CPUs and library builds)."""
    return torch.allclose(g, ref, rtol=1e-11, atol=1e4 * torch.finfo(ref.dtype).eps * float(ref.abs().max()))


@pytest.mark.parametrize("solver", ["tsit5", "dopri5", "bs3", "heun"])
@pytest.mark.parametrize(
    "saving",
    [dict(), dict(saveat=[0.3, 0.7, 1.0]), dict(saveat=[0.0, 0.55]), dict(save_start=False)],
    ids=["start_end", "saveat", "saveat_t0", "end"],
)
def test_matches_autograd_through_the_solver(solver, saving):
    g, sol = grads(True, solver, **ADAPTIVE, **saving)
    ref, _ = grads(False, solver, **ADAPTIVE, **saving)
    assert sol.backward_stats.n_vjp_evals > 0  # the hand-written pass ran
    assert same_sums(g, ref), float((g - ref).abs().max())


@pytest.mark.parametrize("solver", ["euler", "midpoint", "rk4", "tsit5"])
def test_fixed_steps_every_step_saved_and_backwards_in_time(solver):
    kw = dict(dt0=0.1, controller=ConstantStepSize(), save_everystep=True, dense=False)
    for t_span in ((0.0, 1.0), (1.0, 0.2)):
        g, _ = grads(True, solver, t_span=t_span, **kw)
        ref, _ = grads(False, solver, t_span=t_span, **kw)
        assert same_sums(g, ref), float((g - ref).abs().max())


def test_matches_finite_differences():
    """At tight tolerances the discrete gradient approaches the exact one."""
    g, _ = grads(True, rtol=1e-11, atol=1e-11, saveat=[0.5, 1.0])
    m = mlp()
    y0 = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    f = odeflux.VectorField(m)
    fd, eps = [], 1e-6
    with torch.no_grad():
        for x in [y0] + list(m.parameters()):
            flat = x.view(-1)
            for i in range(flat.numel()):
                old, vals = float(flat[i]), []
                for s in (1, -1):
                    flat[i] = old + s * eps
                    sol = odeflux.solve(f, y0, (0.0, 1.0), saveat=[0.5, 1.0], rtol=1e-12, atol=1e-12)
                    vals.append(float((sol.ys**2).sum()))
                flat[i] = old
                fd.append((vals[0] - vals[1]) / (2 * eps))
    assert torch.allclose(g, torch.tensor(fd, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_linear_field_against_the_matrix_exponential():
    """identity activation, no hidden bias: f(y) = W2 W1 y + b2, so y(1) has a closed form."""
    lin = odeflux.MLP([nn.Linear(3, 3, bias=False)], "identity").double()
    with torch.no_grad():
        lin.layers[0].weight.copy_(torch.tensor([[-0.5, 0.2, 0.0], [0.1, -0.3, 0.4], [0.0, -0.2, -0.1]]))
    y0 = torch.tensor([[1.0, -0.5, 0.25]], dtype=torch.float64, requires_grad=True)
    sol = odeflux.solve(odeflux.VectorField(lin), y0, (0.0, 1.0), rtol=1e-12, atol=1e-12, save_start=False)
    sol.ys[-1].sum().backward()
    W = lin.layers[0].weight.detach().numpy()
    expected = scipy.linalg.expm(W).T @ [1.0, 1.0, 1.0]  # d sum(exp(W) y0) / d y0
    assert torch.allclose(y0.grad[0], torch.tensor(expected), rtol=1e-9, atol=1e-10)


def test_applies_only_where_it_may():
    m = mlp()
    f = odeflux.VectorField(m)
    y0 = torch.zeros(3, 4, dtype=torch.float64)
    problem, _ = make_problem(
        f, y0, (0.0, 1.0), None, None, None, 1e-6, 1e-6, None, False, True, True,
        None, None, None, None, 100, None, False,
    )  # fmt: skip
    assert reverse_pass_rule(problem) is not None
    m.layers[0].bias.requires_grad_(False)  # the rule would not line up with the parameters
    assert reverse_pass_rule(problem) is None
    m.layers[0].bias.requires_grad_(True)
    problem.dense = True  # a differentiable sol(t) needs the graph
    assert reverse_pass_rule(problem) is None
    problem.dense = False
    m.use_vjp_rule = False
    assert reverse_pass_rule(problem) is None


def test_a_failed_solve_cannot_be_differentiated():
    m = mlp()
    y0 = torch.ones(3, 4, dtype=torch.float64, requires_grad=True)
    sol = odeflux.solve(odeflux.VectorField(m), y0, (0.0, 10.0), max_steps=2, throw=False)
    assert not sol.success
    with pytest.raises(odeflux.SolveError, match="cannot differentiate a solve that failed"):
        sol.ys[-1].sum().backward()


def test_t_span_gradients_through_the_hand_written_pass():
    out = []
    for hand_written in (True, False):
        m = mlp()
        y0 = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        span = torch.tensor([0.1, 0.9], dtype=torch.float64, requires_grad=True)
        sol = odeflux.solve(odeflux.VectorField(m), y0, span, sensealg=DirectAdjoint(hand_written=hand_written),
                            rtol=1e-9, atol=1e-9)  # fmt: skip
        (sol.ys**2).sum().backward()
        out.append(torch.cat([span.grad, y0.grad.reshape(-1)] + [p.grad.reshape(-1) for p in m.parameters()]))
    assert torch.allclose(out[0], out[1], rtol=1e-9, atol=1e-11)
    assert out[0][:2].abs().min() > 0
