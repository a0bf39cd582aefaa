"""The continuous adjoints of per-sample solves (``batch_axis=0, sensealg=...``): each method's
gradients against DirectAdjoint's, central finite differences and the joint adjoint of each sample
alone; a failed sample; what is refused."""

import math

import pytest
import torch
from torch import nn

import odeflux

D = torch.float64
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (conftest.py: tiny ops)
nan = math.nan
METHODS = [
    odeflux.BacksolveAdjoint(),
    odeflux.BacksolveAdjoint(checkpointing=False),
    odeflux.InterpolatingAdjoint(),
    odeflux.InterpolatingAdjoint(seminorm=True),
    odeflux.GaussAdjoint(),
    odeflux.QuadratureAdjoint(),
]
IDS = ["backsolve", "backsolve-carried", "interpolating", "interpolating-seminorm", "gauss", "quadrature"]


class Field(nn.Module):
    """A Van der Pol oscillator with one ``mu`` per sample, a shared spring and a shared forcing in time."""

    def __init__(self, mu=(0.5, 1.0, 2.0)):
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(mu, dtype=D))
        self.k = nn.Parameter(torch.tensor(1.0, dtype=D))
        self.c = nn.Parameter(torch.tensor(0.3, dtype=D))

    def forward(self, t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, self.mu * (1 - x * x) * v - self.k * x + self.c * torch.sin(t)], -1)


Y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5], [0.5, -1.0]], dtype=D)
# Own spans (the last sample runs backwards in time) and own saved times, NaN-padded; the first
# sample saves its start.
T0 = torch.tensor([0.0, 0.0, 1.5], dtype=D)
T1 = torch.tensor([1.0, 2.0, 0.0], dtype=D)
SAVEAT = torch.tensor([[0.0, 0.25, 1.0], [0.5, 2.0, nan], [1.0, 0.0, nan]], dtype=D)
W = torch.tensor([[1.0, -2.0], [0.5, 3.0], [-1.5, 1.0]], dtype=D)


def _loss(f, y0, sensealg, tol=1e-8):
    sol = odeflux.solve(f, y0, (T0, T1), saveat=SAVEAT, batch_axis=0, rtol=tol, atol=tol, sensealg=sensealg)
    ys = torch.nan_to_num(sol.ys)  # (the padding's NaN: no gradient through it)
    return (ys[..., 0] ** 2 * W[:, :1]).sum() + (torch.sin(ys[..., 1]) * W[:, 1:]).sum(), sol


def _grads(sensealg):
    f = Field()
    y0 = Y0.clone().requires_grad_(True)
    loss, sol = _loss(f, y0, sensealg)
    return torch.autograd.grad(loss, [y0, f.mu, f.k, f.c]), sol


@pytest.fixture(scope="module")
def reference():
    direct, _ = _grads(odeflux.DirectAdjoint())
    # Central differences of the loss, solved far tighter than the step's error allows for.
    eps, fd = 1e-5, []
    with torch.no_grad():
        for which in range(4):
            base = [Y0, torch.tensor((0.5, 1.0, 2.0), dtype=D), torch.tensor(1.0, dtype=D), torch.tensor(0.3, dtype=D)]
            g = torch.zeros_like(base[which])
            for i in range(g.numel()):
                vals = []
                for s in (1, -1):
                    x = [v.clone() for v in base]
                    x[which].view(-1)[i] += s * eps
                    f = Field(tuple(x[1].tolist()))
                    f.k.fill_(float(x[2]))
                    f.c.fill_(float(x[3]))
                    vals.append(float(_loss(f, x[0], None, tol=1e-12)[0]))
                g.view(-1)[i] = (vals[0] - vals[1]) / (2 * eps)
            fd.append(g)
    return direct, fd


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_gradients_against_direct_adjoint_and_finite_differences(method, reference):
    direct, fd = reference
    grads, sol = _grads(method)
    assert sol.sensealg is method and sol.backward_stats.n_steps > 0
    for g, d, e in zip(grads, direct, fd):
        torch.testing.assert_close(g, d, rtol=1e-5, atol=1e-6 * float(d.abs().max()))
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6 * float(e.abs().max()))
    # A wrong adjoint would not pass: the gradients are not small next to the tolerance.
    assert all(float(d.abs().max()) > 0.1 for d in direct)


class Shared(nn.Module):
    """Every parameter shared by the samples: each sample alone is the same field."""

    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[-0.5, 1.2], [-1.0, -0.2]], dtype=D))
        self.b = nn.Parameter(torch.tensor([0.1, -0.3], dtype=D))

    def forward(self, t, y):
        return torch.tanh(y) @ self.A.T + self.b * torch.cos(torch.as_tensor(t, dtype=D)).unsqueeze(-1)


FUNC = [odeflux.InterpolatingAdjoint(vjp="func"), odeflux.BacksolveAdjoint(vjp="func"), odeflux.QuadratureAdjoint(vjp="func")]


@pytest.mark.parametrize(
    "method", METHODS[::2] + [METHODS[-1]] + FUNC, ids=IDS[::2] + [IDS[-1], "interpolating-func", "backsolve-func", "quadrature-func"]
)
def test_parameter_gradients_are_the_sum_of_each_samples_own(method):
    f = Shared()
    y0 = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.5]], dtype=D)
    t1 = [1.0, 2.5, 0.7]
    sol = odeflux.solve(f, y0, (0.0, torch.tensor(t1)), batch_axis=0, rtol=1e-9, atol=1e-9, sensealg=method, save_start=False)
    grads = torch.autograd.grad((sol.ys[:, -1] ** 2).sum(), [f.A, f.b])
    total = [torch.zeros_like(f.A), torch.zeros_like(f.b)]
    for b in range(3):  # each sample as its own joint solve, under the joint solve's adjoint of the same kind
        s = odeflux.solve(f, y0[b], (0.0, t1[b]), rtol=1e-9, atol=1e-9, sensealg=method, save_start=False)
        for acc, g in zip(total, torch.autograd.grad((s.ys[-1] ** 2).sum(), [f.A, f.b])):
            acc += g
    for g, t in zip(grads, total):
        torch.testing.assert_close(g, t, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", [odeflux.InterpolatingAdjoint(), odeflux.QuadratureAdjoint()], ids=["interpolating", "quadrature"])
def test_a_failed_sample_is_refused_unless_left_out_of_the_loss(method):
    class Quadratic(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.tensor(1.0, dtype=D))

        def forward(self, t, y):
            return self.s * y * y * torch.tensor([0.1, 1.0, 0.2], dtype=D).unsqueeze(-1)

    f = Quadratic()
    y0 = torch.ones(3, 1, dtype=D, requires_grad=True)  # the middle sample: y = 1 / (1 - t), infinite at t = 1
    sol = odeflux.solve(f, y0, (0.0, 2.0), batch_axis=0, throw=False, sensealg=method, rtol=1e-9, atol=1e-9)
    assert sol.statuses.tolist()[1] != 0
    with pytest.raises(odeflux.SolveError, match=r"cannot differentiate samples that failed .*samples \[1\]"):
        torch.autograd.grad(sol.ys[:, -1].sum(), [f.s])  # (a NaN loss: it reads the failed sample's end)
    sol = odeflux.solve(f, y0, (0.0, 2.0), batch_axis=0, throw=False, sensealg=method, rtol=1e-9, atol=1e-9)
    g_s, g_y0 = torch.autograd.grad(sol.ys[[0, 2], -1].sum(), [f.s, y0])
    a = torch.tensor([0.1, 0.2], dtype=D)  # y(2) = 1 / (1 - 2 a s): dy/ds = 2 a / (1 - 2 a)^2, dy/dy0 = 1 / (1 - 2 a)^2
    assert float(g_s) == pytest.approx(float((2 * a / (1 - 2 * a) ** 2).sum()), rel=1e-6)
    torch.testing.assert_close(g_y0[[0, 2], 0], 1 / (1 - 2 * a) ** 2, rtol=1e-6, atol=0)
    assert float(g_y0[1, 0]) == 0.0


def test_neural_ode_per_sample_takes_the_continuous_adjoints():
    torch.manual_seed(0)
    field = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x = torch.randn(4, 2, dtype=D)
    grads = []
    for sensealg in ("default", odeflux.GaussAdjoint(vjp="func"), odeflux.InterpolatingAdjoint(vjp="func"), odeflux.DirectAdjoint()):
        model = odeflux.NeuralODE(field, sensealg=sensealg, batch_axis=0, rtol=1e-9, atol=1e-9)
        loss = (model(x) ** 2).sum()
        grads.append(torch.autograd.grad(loss, list(field.parameters())))
    assert isinstance(odeflux.NeuralODE(field, batch_axis=0).sensealg, odeflux.InterpolatingAdjoint)
    for other in grads[:-1]:
        for g, d in zip(other, grads[-1]):
            torch.testing.assert_close(g, d, rtol=1e-5, atol=1e-7)


def test_refusals_name_the_methods_and_options():
    f = Field()
    y0 = Y0.clone().requires_grad_(True)
    solve = lambda sensealg, g=f: odeflux.solve(g, y0, (0.0, 1.0), batch_axis=0, sensealg=sensealg)  # noqa: E731
    works = r"sensealg=None, DirectAdjoint, BacksolveAdjoint, InterpolatingAdjoint, GaussAdjoint or QuadratureAdjoint\(\), not ForwardSens"
    with pytest.raises(ValueError, match=works):
        solve(odeflux.ForwardSensitivity())
    with pytest.raises(ValueError, match=r"take InterpolatingAdjoint without vjp='compile' \(they take vjp='autograd' or 'func'\)"):
        solve(odeflux.InterpolatingAdjoint(vjp="compile"))
    # vjp='func' takes f one sample at a time: a parameter per sample (Field's mu) is refused when it shows.
    with pytest.raises(ValueError, match=r"vjp='func' evaluates f on one sample at a time \(a batch of one\), and f failed there"):
        loss, _ = _loss(f, y0, odeflux.BacksolveAdjoint(vjp="func"))
        loss.backward()
    with pytest.raises(ValueError, match="take vjp='func' for f an nn.Module"):
        solve(odeflux.InterpolatingAdjoint(vjp="func"), lambda t, y: -y)
    with pytest.raises(ValueError, match="take GaussAdjoint without checkpointing=True"):
        solve(odeflux.GaussAdjoint(checkpointing=True))
    hidden = nn.Parameter(torch.tensor(1.0, dtype=D))
    with pytest.raises(ValueError, match=r"f depends on a tensor of shape \(\) that requires grad"):
        solve(odeflux.InterpolatingAdjoint(), lambda t, y: -hidden * y)


@pytest.mark.parametrize("method", [odeflux.InterpolatingAdjoint(first_step="interval"), odeflux.GaussAdjoint(first_step="interval")],
                         ids=["interpolating", "gauss"])  # fmt: skip
def test_a_first_step_over_the_whole_interval_as_each_sample_alone_takes_it(method):
    # Each adjoint interval's first step tries the whole interval, and goes on from Hairer's
    # estimate where that try is rejected (the MNIST tutorial's setting): per sample, the same
    # steps, rejections and gradients as each sample's own joint solve under the same method.
    f = Shared()
    y0 = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.5]], dtype=D)
    t1 = [1.0, 2.5, 0.7]
    taus = torch.tensor([[0.02, 0.5, 1.0], [0.5, 2.5, nan], [0.1, 0.7, nan]], dtype=D)
    kw = dict(rtol=1e-5, atol=1e-5, sensealg=method)
    sol = odeflux.solve(f, y0, (0.0, torch.tensor(t1, dtype=D)), saveat=taus, batch_axis=0, **kw)
    grads = torch.autograd.grad((torch.nan_to_num(sol.ys) ** 2).sum(), [f.A, f.b])
    total, steps, rejected = [torch.zeros_like(f.A), torch.zeros_like(f.b)], 0, 0
    for b in range(3):
        times = taus[b][~torch.isnan(taus[b])].tolist()
        s = odeflux.solve(f, y0[b], (0.0, t1[b]), saveat=times, **kw)
        for acc, g in zip(total, torch.autograd.grad((s.ys**2).sum(), [f.A, f.b])):
            acc += g
        steps, rejected = steps + s.backward_stats.n_steps, rejected + s.backward_stats.n_rejected
    for g, t in zip(grads, total):
        torch.testing.assert_close(g, t, rtol=1e-9, atol=1e-12)
    assert (sol.backward_stats.n_steps, sol.backward_stats.n_rejected) == (steps, rejected)
    # Not Hairer's start under another name: some tries were rejected, and the steps differ.
    hairer = odeflux.solve(f, y0, (0.0, torch.tensor(t1, dtype=D)), saveat=taus, batch_axis=0, **{**kw, "sensealg": type(method)()})
    torch.autograd.grad((torch.nan_to_num(hairer.ys) ** 2).sum(), [f.A, f.b])
    assert rejected > 0 and hairer.backward_stats.n_steps != steps


def test_args_tensors_and_second_derivatives():
    a = torch.tensor([0.5, 1.5], dtype=D, requires_grad=True)
    y0 = torch.tensor([[1.0, 2.0], [0.5, 1.0]], dtype=D, requires_grad=True)

    def f(t, y, args):
        return -args * y * y.sum(-1, keepdim=True)

    grads = []
    for sensealg in (odeflux.InterpolatingAdjoint(), odeflux.DirectAdjoint()):
        sol = odeflux.solve(f, y0, (0.0, torch.tensor([1.0, 0.5])), args=a, batch_axis=0, sensealg=sensealg, rtol=1e-9, atol=1e-9)
        g_a, g_y0 = torch.autograd.grad((sol.ys[:, -1] ** 2).sum(), [a, y0], create_graph=True)
        grads.append((g_a, g_y0, *torch.autograd.grad(g_a.sum(), [a])))  # (create_graph: the recorded loop's)
    for g, d in zip(*grads):
        torch.testing.assert_close(g, d, rtol=1e-6, atol=1e-9)


def test_fixed_steps_take_the_forwards_step_size_back():
    torch.manual_seed(0)
    field = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x = torch.randn(3, 2, dtype=D)
    grads, steps = [], []
    for sensealg in (odeflux.DirectAdjoint(), odeflux.InterpolatingAdjoint(), odeflux.BacksolveAdjoint()):
        sol = odeflux.solve(field, x, (0.0, torch.tensor([1.0, 0.5, 0.8])), solver=odeflux.RK4(), dt0=0.01, batch_axis=0,
                            sensealg=sensealg)  # fmt: skip
        grads.append(torch.autograd.grad((sol.ys[:, -1] ** 2).sum(), list(field.parameters())))
        steps.append(sol.backward_stats.n_steps if sol.backward_stats is not None else sol.stats.n_steps)
    assert steps[0] >= 230 and steps[1:] == [steps[0]] * 2  # (100 + 50 + 80 steps of 0.01, and back)
    for other in grads[1:]:
        for g, d in zip(other, grads[0]):
            torch.testing.assert_close(g, d, rtol=1e-9, atol=1e-12)
