"""Every field pattern under every sensitivity method and VJP backend: the same gradient as
DirectAdjoint (itself checked against central differences), or one clear line saying why not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import odeflux
from odeflux.sensitivity import VJP_BACKENDS

D = torch.float64
CONTINUOUS = [odeflux.InterpolatingAdjoint, odeflux.BacksolveAdjoint, odeflux.QuadratureAdjoint, odeflux.GaussAdjoint]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):  # (conftest.py: tiny ops)
    pass


class ExactTraceCNF(nn.Module):
    """A CNF's field: z' = g(z), log-density' = -tr(dg/dz), the trace by autograd on a leaf the
    field makes itself (torchdiffeq's CNF example, FFJORD's exact mode)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()

    def forward(self, t, state):
        z = state[:, :2]
        with torch.enable_grad():
            z = z.detach().requires_grad_(True) if not z.requires_grad else z
            dz = self.net(z)
            tr = sum(torch.autograd.grad(dz[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(2))
        return torch.cat([dz, -tr.unsqueeze(1)], 1)


class HutchinsonCNF(ExactTraceCNF):
    """The same with Hutchinson's trace estimator, its noise a fixed tensor passed in ``args``."""

    def forward(self, t, state, noise):
        z = state[:, :2]
        with torch.enable_grad():
            z = z.detach().requires_grad_(True) if not z.requires_grad else z
            dz = self.net(z)
            (vjp,) = torch.autograd.grad(dz, z, noise, create_graph=True)
        return torch.cat([dz, -(vjp * noise).sum(1, keepdim=True)], 1)


class FuncInside(nn.Module):
    """A field that calls torch.func inside: y' = -grad V(y), V an MLP potential."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.V = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()

    def forward(self, t, y):
        params = dict(self.V.named_parameters())
        grad = torch.func.vmap(torch.func.grad(lambda p, x: torch.func.functional_call(self.V, p, (x,)).sum(), argnums=1), (None, 0))(params, y)
        return -grad


class WithBatchNorm(nn.Module):
    """A field with buffers: BatchNorm in eval mode (running statistics used, never changed)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.net = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
        with torch.no_grad():
            self.net[1].running_mean.uniform_(-0.5, 0.5)
            self.net[1].running_var.uniform_(0.5, 2.0)
        self.eval()

    def forward(self, t, y):
        return self.net(y)


def _closure_field():
    torch.manual_seed(3)
    W = (0.5 * torch.randn(3, 3, dtype=D)).requires_grad_()
    return (lambda t, y: torch.tanh(y @ W) * torch.cos(t)), [W]


def _y_only():
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def build(pattern: str):
    """``(f, y0, solve keywords, leaves to differentiate)`` for a pattern."""
    torch.manual_seed(10)
    if pattern == "exact-trace":
        f = ExactTraceCNF()
        y0 = torch.cat([torch.randn(4, 2, dtype=D), torch.zeros(4, 1, dtype=D)], 1).requires_grad_()
        return f, y0, {}, [y0, *f.parameters()]
    if pattern == "hutchinson":
        f = HutchinsonCNF()
        y0 = torch.cat([torch.randn(4, 2, dtype=D), torch.zeros(4, 1, dtype=D)], 1).requires_grad_()
        noise = torch.randn(4, 2, dtype=D)
        return f, y0, {"args": noise}, [y0, *f.parameters()]
    if pattern == "torch-func":
        f = FuncInside()
        y0 = torch.randn(4, 2, dtype=D, requires_grad=True)
        return f, y0, {}, [y0, *f.parameters()]
    if pattern == "batchnorm-eval":
        f = WithBatchNorm()
        y0 = torch.randn(5, 3, dtype=D, requires_grad=True)
        return f, y0, {}, [y0, *f.parameters()]
    if pattern == "closure-in-params":
        f, params = _closure_field()
        y0 = torch.randn(2, 3, dtype=D, requires_grad=True)
        return f, y0, {"params": params}, [y0, *params]
    if pattern == "y-only-module":
        f = _y_only()
        y0 = torch.randn(2, 3, dtype=D, requires_grad=True)
        return f, y0, {}, [y0, *f.parameters()]
    raise AssertionError(pattern)


PATTERNS = ["exact-trace", "hutchinson", "torch-func", "batchnorm-eval", "closure-in-params", "y-only-module"]
TOL = dict(rtol=1e-9, atol=1e-9)


def gradient(pattern: str, sensealg) -> list[torch.Tensor]:
    f, y0, kw, leaves = build(pattern)
    sol = odeflux.solve(f, y0, (0.0, 0.7), saveat=[0.3, 0.7], sensealg=sensealg, **TOL, **kw)
    loss = (sol.ys[0] ** 2).sum() + sol.ys[1].sin().sum()
    return [g if g is not None else torch.zeros_like(p) for g, p in zip(torch.autograd.grad(loss, leaves, allow_unused=True), leaves)]


@pytest.fixture(scope="module")
def direct_gradients() -> dict[str, list[torch.Tensor]]:
    return {p: gradient(p, odeflux.DirectAdjoint()) for p in PATTERNS}


@pytest.mark.parametrize("pattern", PATTERNS)
def test_direct_adjoint_matches_central_differences(pattern, direct_gradients):
    f, y0, kw, leaves = build(pattern)
    grads = direct_gradients[pattern]
    was_training = f.training if isinstance(f, nn.Module) else None

    def loss_at() -> float:
        # Fixed steps, so the loss is smooth in the perturbed entry: an adaptive solve's steps may
        # change between the two sides (how, depends on the BLAS's rounding), a jump of its
        # tolerance that eps turns into gradient noise. Dopri8 in 35 steps: truncation ~1e-14.
        with torch.no_grad():
            sol = odeflux.solve(f, y0.detach(), (0.0, 0.7), saveat=[0.3, 0.7], solver=odeflux.Dopri8(),
                                controller=odeflux.ConstantStepSize(), dt0=0.02, **kw)  # fmt: skip
            return float((sol.ys[0] ** 2).sum() + sol.ys[1].sin().sum())

    eps = 1e-6
    for leaf, g in zip(leaves[:3], grads[:3]):  # y0 and the first parameters, a few entries each
        for j in range(min(3, leaf.numel())):
            with torch.no_grad():
                leaf.view(-1)[j] += eps
            up = loss_at()
            with torch.no_grad():
                leaf.view(-1)[j] -= 2 * eps
            dn = loss_at()
            with torch.no_grad():
                leaf.view(-1)[j] += eps
            assert g.reshape(-1)[j].item() == pytest.approx((up - dn) / (2 * eps), rel=1e-5, abs=1e-7)
    if was_training is not None:
        assert f.training == was_training


# What cannot work, each refused with one line naming the fix: the functional backends take
# parameters only through a module or args= (not a closure), and the forward-mode Jacobian
# backend cannot run a field that calls torch.autograd itself.
REFUSED = {("closure-in-params", vjp) for vjp in ("func", "compile", "jacobian")} | {
    ("exact-trace", "jacobian"),
    ("hutchinson", "jacobian"),
}


@pytest.mark.parametrize("vjp", sorted(VJP_BACKENDS))
@pytest.mark.parametrize("method", CONTINUOUS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_every_continuous_adjoint_and_vjp_backend_agrees_or_refuses_clearly(pattern, method, vjp, direct_gradients):
    if (pattern, vjp) in REFUSED:
        with pytest.raises(ValueError, match=rf"^vjp={vjp!r} .*use vjp='autograd'$") as info:
            gradient(pattern, method(vjp=vjp))
        assert "\n" not in str(info.value)
        return
    grads = gradient(pattern, method(vjp=vjp))
    for a, b in zip(grads, direct_gradients[pattern]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (pattern, method.__name__, vjp, (a - b).abs().max().item())


@pytest.mark.parametrize("method", CONTINUOUS, ids=lambda m: m.__name__)
def test_dropout_in_training_mode_is_refused_by_the_continuous_adjoints(method):
    """Dropout in training mode draws a new mask at each evaluation of f: an adjoint solved
    backwards would differentiate another field than the forward solve's (before this check
    InterpolatingAdjoint returned such a gradient silently, BacksolveAdjoint failed with DT_MIN).
    DirectAdjoint records the masks; "auto" picks it; in eval mode every method runs."""
    torch.manual_seed(0)
    field = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).double()
    y0 = torch.randn(4, 3, dtype=D)
    with pytest.raises(ValueError, match=rf"{method.__name__} cannot differentiate a field with dropout in training mode \(Dropout at '2'.*sensealg=odeflux.DirectAdjoint\(\)"):
        odeflux.NeuralODE(field, sensealg=method())(y0).sum().backward()
    with pytest.raises(ValueError, match="dropout in training mode"):  # per-sample solves alike
        odeflux.NeuralODE(field, sensealg=method(), batch_axis=0)(y0).sum().backward()
    fixed = dict(solver=odeflux.RK4(), dt0=0.25)  # (a random field makes an adaptive solve take thousands of steps)
    sol = odeflux.solve(field, y0.requires_grad_(True), (0.0, 1.0), sensealg="auto", **fixed)
    assert isinstance(sol.sensealg, odeflux.DirectAdjoint)
    # DirectAdjoint's gradient is the gradient of the masks drawn: the same as backpropagating
    # through the same solve, made with the same random stream, with autograd alone.
    state = torch.get_rng_state()
    g1 = torch.autograd.grad(odeflux.solve(field, y0, (0.0, 1.0), sensealg=odeflux.DirectAdjoint(), **fixed).y_final.sum(), y0)[0]
    torch.set_rng_state(state)
    y = y0
    for _ in range(4):  # four RK4 steps, by hand
        h = 0.25
        k1 = field(y)
        k2 = field(y + h / 2 * k1)
        k3 = field(y + h / 2 * k2)
        k4 = field(y + h * k3)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    g2 = torch.autograd.grad(y.sum(), y0)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)
    field.eval()
    odeflux.NeuralODE(field, sensealg=method())(y0.detach()).sum().backward()
