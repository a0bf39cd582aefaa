"""ForwardSensitivity and sensealg="auto": gradients against DirectAdjoint, central finite
differences and closed forms; the error control over the sensitivities; the auto rule; refusals."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import odeflux
from odeflux.sensitivity import SMALL_LIMIT, ForwardSensitivity

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (conftest.py: tiny ops)

D = torch.float64
TS = torch.linspace(0.0, 3.0, 13, dtype=D)
W = torch.linspace(0.5, 1.5, 13 * 2, dtype=D).reshape(13, 2)  # a multi-output loss's weights


class LV(nn.Module):
    """Lotka-Volterra with its four rates learnable."""

    def __init__(self, dtype=D):
        super().__init__()
        self.rates = nn.Parameter(torch.tensor([1.5, 1.0, 1.0, 3.0], dtype=dtype))

    def forward(self, t, y):
        a, b, d, g = self.rates
        x, v = y[..., 0], y[..., 1]
        return torch.stack([a * x - b * x * v, d * x * v - g * v], -1)


def loss_of(ys: torch.Tensor) -> torch.Tensor:
    return (W * ys).sum() + 0.5 * ys.pow(2).sum()


def grads(f: nn.Module, y0: torch.Tensor, sensealg, tol=1e-9, **kw):
    y0 = y0.detach().clone().requires_grad_()
    f.zero_grad()
    sol = odeflux.solve(f, y0, (0.0, 3.0), rtol=tol, atol=tol, saveat=TS, sensealg=sensealg, **kw)
    loss_of(sol.ys).backward()
    return torch.cat([y0.grad.reshape(-1)] + [p.grad.reshape(-1) for p in f.parameters()]), sol


def central_fd(f: nn.Module, y0: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """Central differences of the loss with respect to y0 and every parameter (tight solves)."""

    def loss_at(y):
        with torch.no_grad():
            return float(loss_of(odeflux.solve(f, y, (0.0, 3.0), rtol=1e-11, atol=1e-11, saveat=TS).ys))

    out = []
    for i in range(y0.numel()):
        e = torch.zeros_like(y0).reshape(-1)
        e[i] = h
        out.append((loss_at(y0 + e.view_as(y0)) - loss_at(y0 - e.view_as(y0))) / (2 * h))
    for p in f.parameters():
        flat = p.data.view(-1)
        for i in range(flat.numel()):
            keep = float(flat[i])
            flat[i] = keep + h
            up = loss_at(y0)
            flat[i] = keep - h
            down = loss_at(y0)
            flat[i] = keep
            out.append((up - down) / (2 * h))
    return torch.tensor(out, dtype=D)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("tangents", ["forward", "reverse"])
def test_lotka_volterra_matches_direct_and_finite_differences(tangents):
    f, y0 = LV(), torch.tensor([1.0, 1.0], dtype=D)
    g, sol = grads(f, y0, ForwardSensitivity(tangents=tangents))
    ref, _ = grads(f, y0, odeflux.DirectAdjoint())
    assert rel(g, ref) < 1e-7
    assert rel(g, central_fd(f, y0)) < 1e-6
    assert sol.backward_stats.n_steps == 0 and isinstance(sol.sensealg, ForwardSensitivity)


def test_mlp_field_with_args_and_closure_params():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    scale = torch.tensor([0.9, 1.1, 1.0], dtype=D, requires_grad=True)  # through args
    shift = torch.tensor(0.1, dtype=D, requires_grad=True)  # captured, listed in params=

    def f(t, y, args):
        return net(y) * args["scale"] - shift * y

    y0 = torch.tensor([0.3, -0.2, 0.5], dtype=D, requires_grad=True)
    ts = torch.linspace(0.0, 2.0, 9, dtype=D)
    wts = torch.linspace(-1.0, 1.0, 27, dtype=D).reshape(9, 3)
    leaves = [y0, scale, shift, *net.parameters()]
    out = {}
    for name, alg in [("fwd", ForwardSensitivity()), ("rev", ForwardSensitivity(tangents="reverse")),
                      ("direct", odeflux.DirectAdjoint())]:  # fmt: skip
        sol = odeflux.solve(f, y0, (0.0, 2.0), args={"scale": scale}, params=[shift, *net.parameters()], rtol=1e-10, atol=1e-10,
                            saveat=ts, sensealg=alg)  # fmt: skip
        out[name] = torch.cat([g.reshape(-1) for g in torch.autograd.grad((wts * sol.ys).sum(), leaves)])
    assert rel(out["fwd"], out["direct"]) < 1e-7 and rel(out["rev"], out["direct"]) < 1e-7


def test_tangents_forward_and_reverse_agree_where_the_state_outnumbers_the_parameters():
    # m = 1 direction (one parameter, y0 not differentiated) < n = 6: "auto" takes forward mode
    k = torch.tensor(0.7, dtype=D, requires_grad=True)
    A = torch.randn(6, 6, dtype=D, generator=torch.Generator().manual_seed(1)) * 0.3
    y0 = torch.linspace(-1.0, 1.0, 6, dtype=D)
    res = {}
    for tan in ("auto", "forward", "reverse"):
        sol = odeflux.solve(lambda t, y, a: torch.tanh(a[0] * (A @ y)), y0, (0.0, 1.0), args=(k,), rtol=1e-10,
                            atol=1e-10, sensealg=ForwardSensitivity(tangents=tan))  # fmt: skip
        (res[tan],) = torch.autograd.grad(sol.ys[-1].sum(), [k])
    assert torch.allclose(res["auto"], res["forward"], rtol=1e-12) and torch.allclose(res["forward"], res["reverse"], rtol=1e-9)


def test_structured_state_and_float32():
    net = nn.Linear(2, 3).double()

    def f(t, y):
        return {"a": -0.5 * y["a"] + net(y["b"])[:2], "b": torch.sin(y["a"].sum()) - y["b"]}

    def run(alg, dtype=D):
        a = torch.tensor([1.0, 0.5], dtype=dtype, requires_grad=True)
        b = torch.tensor([0.2, -0.3], dtype=dtype, requires_grad=True)
        net.to(dtype).zero_grad()
        sol = odeflux.solve(f, {"a": a, "b": b}, (0.0, 1.5), rtol=1e-9, atol=1e-9, params=list(net.parameters()),
                            saveat=torch.linspace(0, 1.5, 5, dtype=dtype), sensealg=alg)  # fmt: skip
        (sol.ys["a"].pow(2).sum() + sol.ys["b"].sum()).backward()
        return torch.cat([a.grad, b.grad] + [p.grad.reshape(-1) for p in net.parameters()]).double()

    g = run(ForwardSensitivity())
    assert rel(g, run(odeflux.DirectAdjoint())) < 1e-7
    g32 = run(ForwardSensitivity(), torch.float32)
    net.double()
    assert rel(g32, g) < 1e-4


def test_t_span_ends_and_saveat_times_gradients():
    f, y0 = LV(), torch.tensor([1.0, 1.0], dtype=D)

    def run(alg):
        t0 = torch.tensor(0.0, dtype=D, requires_grad=True)
        t1 = torch.tensor(2.0, dtype=D, requires_grad=True)
        sol = odeflux.solve(f, y0, torch.stack([t0, t1]), rtol=1e-10, atol=1e-10, sensealg=alg)
        g_ends = torch.autograd.grad(sol.ys[-1].pow(2).sum(), [t0, t1])
        s = torch.tensor([0.5, 1.0, 1.5], dtype=D, requires_grad=True)
        sol = odeflux.solve(f, y0, (0.0, 2.0), saveat=s, rtol=1e-10, atol=1e-10, sensealg=alg)
        (g_s,) = torch.autograd.grad(sol.ys.pow(2).sum(), [s])
        return torch.cat([torch.stack(g_ends), g_s])

    g = run(ForwardSensitivity())
    assert rel(g, run(odeflux.DirectAdjoint())) < 1e-7
    with torch.no_grad():  # dL/dt1 by central differences
        end = lambda t1: float(odeflux.solve(f, y0, (0.0, t1), rtol=1e-12, atol=1e-12).ys[-1].pow(2).sum())
        assert abs(float(g[1]) - (end(2.0 + 1e-6) - end(2.0 - 1e-6)) / 2e-6) < 1e-5 * abs(float(g[1]))


def test_error_control_covering_the_sensitivities_keeps_the_gradient_accurate():
    # A small-amplitude rotation: the state sits near atol, so its own error control allows large
    # steps, while the sensitivities dy/dy0 (rotations, of size 1) need small ones.
    omega = torch.tensor(2.0, dtype=D, requires_grad=True)
    ts = torch.linspace(0.0, 10.0, 21, dtype=D)
    c = torch.linspace(-1.0, 1.0, 42, dtype=D).reshape(21, 2)

    def f(t, y, w):
        return torch.stack([-w * y[1], w * y[0]])

    def grad_y0(alg):
        y0 = torch.tensor([1e-6, 0.0], dtype=D, requires_grad=True)
        sol = odeflux.solve(f, y0, (0.0, 10.0), args=omega, saveat=ts, rtol=1e-6, atol=1e-6, sensealg=alg)
        return torch.autograd.grad((c * sol.ys).sum(), [y0])[0], sol.stats.n_accepted

    # dL/dy0 = sum_i R(omega t_i)^T c_i
    ang = 2.0 * ts
    exact = torch.stack([(c[:, 0] * torch.cos(ang) + c[:, 1] * torch.sin(ang)).sum(),
                         (-c[:, 0] * torch.sin(ang) + c[:, 1] * torch.cos(ang)).sum()])  # fmt: skip
    g_full, n_full = grad_y0(ForwardSensitivity())
    g_semi, n_semi = grad_y0(ForwardSensitivity(seminorm=True))
    assert rel(g_full, exact) < 1e-4
    assert rel(g_semi, exact) > 1e-2 and n_semi < n_full


def test_fixed_step_sensitivities_are_the_discrete_derivatives():
    f, y0 = LV(), torch.tensor([1.0, 1.0], dtype=D)
    g, _ = grads(f, y0, ForwardSensitivity(), solver=odeflux.RK4(), dt0=0.1)
    ref, _ = grads(f, y0, odeflux.DirectAdjoint(), solver=odeflux.RK4(), dt0=0.1)
    assert rel(g, ref) < 1e-12


def test_dense_output_and_create_graph():
    f, y0 = LV(), torch.tensor([1.0, 1.0], dtype=D, requires_grad=True)
    q = [0.3, 1.7, 2.9]
    out = {}
    for name, alg in (("fwd", ForwardSensitivity()), ("direct", odeflux.DirectAdjoint())):
        sol = odeflux.solve(f, y0, (0.0, 3.0), rtol=1e-9, atol=1e-9, dense=True, sensealg=alg)
        dense_g = torch.autograd.grad(sol(q).pow(2).sum(), [y0, f.rates])
        sol = odeflux.solve(f, y0, (0.0, 3.0), rtol=1e-7, atol=1e-7, saveat=TS, sensealg=alg)
        (gy,) = torch.autograd.grad(loss_of(sol.ys), [y0], create_graph=True)
        (hvp,) = torch.autograd.grad(gy.sum(), [f.rates])
        out[name] = torch.cat([g.reshape(-1) for g in dense_g] + [hvp])
    assert rel(out["fwd"], out["direct"]) < 1e-6


def test_save_everystep():
    f, y0 = LV(), torch.tensor([1.0, 1.0], dtype=D, requires_grad=True)
    sol = odeflux.solve(f, y0, (0.0, 1.0), rtol=1e-8, atol=1e-8, save_everystep=True, sensealg=ForwardSensitivity())
    # the saved states' own gradient against central differences of y(t_k) for the first entry of y0
    k = len(sol.ts) // 2
    (g,) = torch.autograd.grad(sol.ys[k].sum(), [y0])
    with torch.no_grad():
        ys = lambda y: odeflux.solve(f, y, (0.0, float(sol.ts[k])), rtol=1e-12, atol=1e-12).ys[-1].sum()
        e = torch.tensor([1e-6, 0.0], dtype=D)
        fd = (ys(y0 + e) - ys(y0 - e)) / 2e-6
    assert abs(float(g[0] - fd)) < 1e-5 * abs(float(fd))


def test_auto_picks_by_size_and_its_gradients_are_right():
    f, y0 = LV(), torch.tensor([1.0, 1.0], dtype=D)
    g, sol = grads(f, y0, "auto")  # 2 states + 4 rates: small
    assert isinstance(sol.sensealg, odeflux.DirectAdjoint)
    assert rel(g, central_fd(f, y0)) < 1e-6

    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(2, 40), nn.Tanh(), nn.Linear(40, 2)).double()  # 2 + 202 > SMALL_LIMIT
    assert 2 + sum(p.numel() for p in big.parameters()) > SMALL_LIMIT
    g, sol = grads(big, y0, "auto")
    assert isinstance(sol.sensealg, odeflux.DirectAdjoint) and sol.sensealg.recompute  # (explicit RK: steps retaken)
    assert rel(g, grads(big, y0, odeflux.DirectAdjoint())[0]) < 1e-10
    g, sol = grads(big, y0, "auto", solver=odeflux.KenCarp4())  # (an implicit solver: an adjoint solve)
    assert isinstance(sol.sensealg, odeflux.InterpolatingAdjoint)
    assert rel(g, grads(big, y0, odeflux.DirectAdjoint(), solver=odeflux.KenCarp4())[0]) < 1e-5

    hidden = torch.tensor(0.5, dtype=D, requires_grad=True)  # captured, not in params=: the adjoints can't see it
    big_y0 = torch.ones(200, dtype=D, requires_grad=True)
    sol = odeflux.solve(lambda t, y: -hidden * y, big_y0, (0.0, 1.0), sensealg="auto")
    assert isinstance(sol.sensealg, odeflux.DirectAdjoint)
    (gh,) = torch.autograd.grad(sol.ys[-1].sum(), [hidden])
    assert abs(float(gh) - (-200.0 * math.exp(-0.5))) < 1e-1

    sol = odeflux.solve(f, y0, (0.0, 1.0), sensealg="auto", solver=odeflux.ScipySolver("RK45"))
    assert isinstance(sol.sensealg, odeflux.BacksolveAdjoint)
    with torch.no_grad():
        assert odeflux.solve(f, y0, (0.0, 1.0), sensealg="auto").sensealg is None  # nothing to differentiate

    model = odeflux.NeuralODE(nn.Linear(2, 2).double(), sensealg="auto", return_solution=True)
    sol = model(y0)
    sol.ys[-1].sum().backward()
    assert isinstance(sol.sensealg, odeflux.DirectAdjoint) and model.vector_field.weight.grad is not None


def test_defaults_unchanged():
    f, y0 = LV(), torch.tensor([1.0, 1.0], dtype=D, requires_grad=True)
    assert isinstance(odeflux.solve(f, y0, (0.0, 1.0)).sensealg, odeflux.DirectAdjoint)
    assert odeflux.NeuralODE(nn.Linear(2, 2)).sensealg == "auto"
    # (NeuralODE's solver: Dopri5, by the gradient's work-precision; solve's: Tsit5, by the forward's.)
    assert isinstance(odeflux.NeuralODE(nn.Linear(2, 2)).solver, odeflux.Dopri5)
    with torch.no_grad():
        ys = {s: odeflux.solve(f, y0, (0.0, 1.0), **({} if s is None else {"solver": s()})).ys
              for s in (None, odeflux.Tsit5, odeflux.Dopri5)}  # fmt: skip
    assert torch.equal(ys[None], ys[odeflux.Tsit5]) and not torch.equal(ys[None], ys[odeflux.Dopri5])
    assert isinstance(odeflux.NeuralODE(nn.Linear(2, 2), batch_axis=0).sensealg, odeflux.InterpolatingAdjoint)


def test_refusals():
    f, y0 = LV(), torch.tensor([1.0, 1.0], dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match="ScipySolver.*BacksolveAdjoint"):
        odeflux.solve(f, y0, (0.0, 1.0), solver=odeflux.ScipySolver("RK45"), sensealg=ForwardSensitivity())
    with pytest.raises(ValueError, match="tangents='sideways' is not one of"):
        ForwardSensitivity(tangents="sideways")
    k = torch.tensor(0.5, dtype=D, requires_grad=True)
    with pytest.raises(ValueError, match="pass them inside args=, or use tangents='reverse'"):
        odeflux.solve(lambda t, y: -k * y, y0, (0.0, 1.0), params=[k], sensealg=ForwardSensitivity(tangents="forward"))
    with pytest.raises(ValueError, match="not among the parameters"):
        odeflux.solve(lambda t, y: -k * y, y0, (0.0, 1.0), sensealg=ForwardSensitivity())
    with pytest.raises(TypeError, match='or "auto"'):
        odeflux.solve(f, y0, (0.0, 1.0), sensealg="fastest")


def test_events_and_a_user_norm():
    k = torch.tensor(0.8, dtype=D, requires_grad=True)
    y0 = torch.tensor([1.0, 0.0], dtype=D, requires_grad=True)

    def f(t, y, a):
        return torch.stack([y[1], -a * y[0]])

    out = {}
    for alg in (ForwardSensitivity(), odeflux.DirectAdjoint()):
        sol = odeflux.solve(f, y0, (0.0, 10.0), args=k, rtol=1e-9, atol=1e-9, sensealg=alg,
                            event=odeflux.Event(lambda t, y: y[0] + 0.5, terminal=True))  # fmt: skip
        g_event = torch.autograd.grad(sol.event_t + sol.ys[-1].sum(), [y0, k])
        sol = odeflux.solve(f, y0, (0.0, 3.0), args=k, rtol=1e-9, atol=1e-9, saveat=TS, sensealg=alg,
                            norm=lambda e: e.abs().max())  # fmt: skip
        out[type(alg).__name__] = torch.cat([torch.stack([*g_event[0], g_event[1]]),
                                             torch.stack(torch.autograd.grad(loss_of(sol.ys), [k]))])  # fmt: skip
    assert rel(out["ForwardSensitivity"], out["DirectAdjoint"]) < 1e-6
