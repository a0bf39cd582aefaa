"""Structured states: a tuple, list or dict of tensors of different shapes, through solve, every
sensitivity method, dense output and NeuralODE."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import odeflux

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (conftest.py: tiny ops)

D = torch.float64

ADJOINTS = [
    odeflux.DirectAdjoint(),
    odeflux.InterpolatingAdjoint(),
    odeflux.BacksolveAdjoint(),
    odeflux.QuadratureAdjoint(),
    odeflux.GaussAdjoint(),
]


def test_dict_state_matches_the_closed_form():
    # a' = -a, b' = -2 b, c' = a (c = 1 - e^{-t} + c0): three shapes, one solve.
    y0 = {"a": torch.tensor(1.0, dtype=D), "b": torch.ones(2, 3, dtype=D), "c": torch.zeros(1, dtype=D)}
    f = lambda t, y: {"a": -y["a"], "b": -2 * y["b"], "c": y["a"].reshape(1)}  # noqa: E731
    ts = [0.0, 0.4, 1.3]
    sol = odeflux.solve(f, y0, (0.0, 1.3), saveat=ts, rtol=1e-10, atol=1e-12)
    assert set(sol.ys) == {"a", "b", "c"}
    assert sol.ys["a"].shape == (3,) and sol.ys["b"].shape == (3, 2, 3) and sol.ys["c"].shape == (3, 1)
    for i, t in enumerate(ts):
        assert sol.ys["a"][i].item() == pytest.approx(math.exp(-t), abs=1e-9)
        assert torch.allclose(sol.ys["b"][i], torch.full((2, 3), math.exp(-2 * t), dtype=D), atol=1e-9)
        assert sol.ys["c"][i].item() == pytest.approx(1 - math.exp(-t), abs=1e-9)
    assert sol.y_final["b"].shape == (2, 3)


def test_tuple_state_equals_the_concatenated_tensor_solve():
    """One RMS norm over all entries: the steps are those of the same state as one tensor."""
    A = torch.tensor([[-0.3, 1.0, 0.2], [-1.0, -0.1, 0.0], [0.1, 0.3, -0.5]], dtype=D)
    y0 = torch.tensor([1.0, -0.5, 2.0], dtype=D)
    flat = odeflux.solve(lambda t, y: torch.tanh(A @ y), y0, (0.0, 2.0), save_everystep=True)

    def f(t, y):
        k = torch.tanh(A @ torch.cat([y[0], y[1]]))
        return (k[:1], k[1:])

    tree = odeflux.solve(f, (y0[:1], y0[1:]), (0.0, 2.0), save_everystep=True)
    assert tree.stats == flat.stats
    assert torch.equal(torch.cat(tree.ys, dim=1), flat.ys)
    # dense output in the structure
    mid = tree(0.77)
    assert isinstance(mid, tuple) and torch.allclose(torch.cat(mid), flat(0.77))


class MixedField(nn.Module):
    """A field of a dict state with a matrix, a vector and a scalar entry."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.W = nn.Parameter(0.5 * torch.randn(3, 3, dtype=D))
        self.v = nn.Parameter(0.3 * torch.randn(3, dtype=D))

    def forward(self, t, y):
        m, x, s = y["m"], y["x"], y["s"]
        return {
            "m": torch.tanh(m @ self.W) * s,
            "x": torch.sin(self.W @ x) + self.v * t,
            "s": -(x * self.v).sum() * s,
        }


def _state():
    torch.manual_seed(1)
    return {
        "m": (0.5 * torch.randn(2, 3, dtype=D)).requires_grad_(),
        "x": torch.randn(3, dtype=D).requires_grad_(),
        "s": torch.tensor(0.7, dtype=D, requires_grad=True),
    }


def _loss(sol):
    return (sol.ys["m"][-1] ** 2).sum() + sol.ys["x"][-1].sum() + 3 * sol.ys["s"][-1] + (sol.ys["x"][1] ** 2).sum()


@pytest.mark.parametrize("sensealg", ADJOINTS, ids=lambda a: type(a).__name__)
def test_every_adjoint_on_a_dict_state_against_finite_differences(sensealg):
    field = MixedField()
    y0 = _state()
    saveat = [0.0, 0.6, 1.0]
    sol = odeflux.solve(field, y0, (0.0, 1.0), saveat=saveat, rtol=1e-10, atol=1e-10, sensealg=sensealg)
    leaves = [y0["m"], y0["x"], y0["s"], field.W, field.v]
    grads = torch.autograd.grad(_loss(sol), leaves)

    def loss_at(vals):
        with torch.no_grad():
            saved = [p.detach().clone() for p in (field.W, field.v)]
            field.W.copy_(vals[3])
            field.v.copy_(vals[4])
            s = odeflux.solve(field, {"m": vals[0], "x": vals[1], "s": vals[2]}, (0.0, 1.0), saveat=saveat, rtol=1e-11, atol=1e-11)
            field.W.copy_(saved[0])
            field.v.copy_(saved[1])
            return float(_loss(s))

    base = [p.detach().clone() for p in leaves]
    eps = 1e-6
    for i, g in enumerate(grads):
        for j in range(min(base[i].numel(), 4)):
            up = [b.clone() for b in base]
            dn = [b.clone() for b in base]
            up[i].view(-1)[j] += eps
            dn[i].view(-1)[j] -= eps
            fd = (loss_at(up) - loss_at(dn)) / (2 * eps)
            assert g.reshape(-1)[j].item() == pytest.approx(fd, rel=1e-5, abs=1e-6), (i, j)


def test_a_users_norm_sees_the_structure_and_decides_the_steps():
    seen = []

    def norm(e):
        seen.append(e)
        return e["smooth"].pow(2).mean().sqrt()

    # "wiggly" oscillates fast and feeds nothing back: a norm over "smooth" alone ignores it.
    y0 = {"smooth": torch.ones(2, dtype=D), "wiggly": torch.zeros(3, dtype=D)}
    f = lambda t, y: {"smooth": -y["smooth"], "wiggly": 50 * torch.cos(50 * t) * torch.ones(3, dtype=D)}  # noqa: E731
    only_fast = odeflux.solve(f, y0, (0.0, 1.0), norm=norm)
    both = odeflux.solve(f, y0, (0.0, 1.0))
    assert seen and all(isinstance(e, dict) and e["wiggly"].shape == (3,) for e in seen)
    assert only_fast.stats.n_steps < both.stats.n_steps / 2
    assert only_fast.ys["smooth"][-1, 0].item() == pytest.approx(math.exp(-1), rel=1e-3)


def test_neural_ode_takes_a_tuple_state():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2).double()

        def forward(self, y):
            return (self.lin(y[0]), -y[1])

    node = odeflux.NeuralODE(Pair(), rtol=1e-8, atol=1e-8)
    out = node((torch.ones(4, 2, dtype=D), torch.ones(3, dtype=D)))
    assert isinstance(out, tuple) and out[0].shape == (4, 2)
    assert torch.allclose(out[1], torch.full((3,), math.exp(-1), dtype=D), atol=1e-7)
    out[0].sum().backward()
    assert node.vector_field.lin.weight.grad is not None


@pytest.mark.parametrize(
    "f, y0, match",
    [
        (lambda t, y: y[0], (torch.ones(2), torch.ones(3)), r"f\(t, y\) is a Tensor where the state is \(tensor\[2\], tensor\[3\]\)"),
        (lambda t, y: {"a": y["a"]}, {"a": torch.ones(2), "b": torch.ones(1)}, r"keys \['a'\] where the state has keys \['a', 'b'\]"),
        (lambda t, y: y["a"], {"a": torch.ones(2), "b": torch.ones(1)}, r"f\(t, y\) is a Tensor where the state is \{'a': tensor\[2\], 'b': tensor\[1\]\}"),
        (lambda t, y: (y[0], y[1][:1]), (torch.ones(2), torch.ones(3)), r"f\(t, y\)\[1\] has shape \(1,\) where the state's entry has shape \(3,\)"),
    ],
    ids=["not-a-tuple", "missing-key", "not-a-dict", "wrong-shape"],
)
def test_a_field_returning_another_structure_is_named(f, y0, match):
    with pytest.raises(ValueError, match=match):
        odeflux.solve(f, y0, (0.0, 1.0))


def test_mixed_dtypes_and_non_tensors_are_refused_clearly():
    with pytest.raises(ValueError, match="one dtype and device"):
        odeflux.solve(lambda t, y: y, (torch.ones(2), torch.ones(2, dtype=D)), (0.0, 1.0))
    with pytest.raises(TypeError, match=r"y0\['b'\] is a str"):
        odeflux.solve(lambda t, y: y, {"a": torch.ones(2), "b": "x"}, (0.0, 1.0))
    with pytest.raises(ValueError, match="empty tuple"):
        odeflux.solve(lambda t, y: y, (), (0.0, 1.0))


# ------------------------------------------------------------------------------------------------
# Complex states: integrated on their real view (real and imaginary parts two entries each).


class Damped(nn.Module):
    """dy/dt = (-i w0 - w1) y: y(t) = y0 exp((-i w0 - w1) t), |y(t)|^2 = |y0|^2 exp(-2 w1 t)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.3, 0.2], dtype=D))

    def forward(self, t, y):
        return (-1j * self.w[0] - self.w[1]) * y


@pytest.mark.parametrize("sensealg", ADJOINTS, ids=lambda s: type(s).__name__)
def test_a_complex_state_against_the_closed_form_and_its_gradients(sensealg):
    f = Damped()
    y0 = torch.tensor([1.0 + 0.5j, -0.3 + 2.0j, 0.7j], dtype=torch.complex128, requires_grad=True)
    ts = torch.linspace(0.0, 1.5, 4, dtype=D)
    sol = odeflux.solve(f, y0, (0.0, 1.5), saveat=ts, rtol=1e-10, atol=1e-12, sensealg=sensealg)
    lam = torch.tensor(-1.3j - 0.2, dtype=torch.complex128)
    exact = y0.detach() * torch.exp(lam * ts.to(torch.complex128)).unsqueeze(1)
    assert sol.ys.dtype == torch.complex128 and sol.ys.shape == (4, 3)
    torch.testing.assert_close(sol.ys.detach(), exact, rtol=0, atol=1e-9)
    # L = sum |y(T)|^2 = sum |y0|^2 exp(-2 w1 T): dL/dw0 = 0, dL/dw1 = -2 T L, and torch's gradient
    # for the complex y0 (dL/dRe + i dL/dIm) 2 y0 exp(-2 w1 T).
    loss = sol.y_final.abs().pow(2).sum()
    g_y0, g_w = torch.autograd.grad(loss, (y0, f.w))
    decay = math.exp(-2 * 0.2 * 1.5)
    torch.testing.assert_close(g_y0, 2 * y0.detach() * decay, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(g_w, torch.tensor([0.0, -2 * 1.5 * float(loss)], dtype=D), rtol=1e-7, atol=1e-8)


def test_a_complex_leaf_in_a_structure_dense_output_events_and_callbacks():
    f = Damped()
    y0 = {"z": torch.tensor([1.0 + 1.0j], dtype=torch.complex128), "r": torch.tensor([2.0], dtype=D)}
    seen = []
    g = lambda t, y: {"z": f(t, y["z"]), "r": -y["r"]}  # noqa: E731
    cb = odeflux.StepCallbacks(accept=lambda t, y, dt: seen.append(y))
    sol = odeflux.solve(g, y0, (0.0, 2.0), rtol=1e-10, atol=1e-12, dense=True, callbacks=cb)
    assert seen and all(y["z"].dtype == torch.complex128 and y["r"].dtype == D for y in seen)
    half = sol(1.0)
    assert half["z"].dtype == torch.complex128
    torch.testing.assert_close(half["z"], y0["z"] * torch.exp(torch.tensor(-1.3j - 0.2, dtype=torch.complex128)), rtol=0, atol=1e-9)
    torch.testing.assert_close(half["r"], y0["r"] * math.exp(-1.0), rtol=0, atol=1e-9)
    # The real part of z, e^{-0.2 t} (cos 1.3 t + sin 1.3 t) = sqrt(2) e^{-0.2 t} sin(1.3 t + pi/4),
    # first crosses zero at 1.3 t = 3 pi/4.
    ev = odeflux.solve(lambda t, y: f(t, y), y0["z"], (0.0, 5.0), rtol=1e-10, atol=1e-12,
                       event=odeflux.Event(lambda t, y: y[0].real, terminal=True))  # fmt: skip
    assert float(ev.event_t.detach()) == pytest.approx(3 * math.pi / 4 / 1.3, abs=1e-7)
    assert ev.event_y.dtype == torch.complex128 and abs(float(ev.event_y[0].real)) < 1e-8


def test_a_complex_state_refuses_a_real_derivative_and_a_per_sample_solve():
    y0 = torch.ones(2, dtype=torch.complex64)
    with pytest.raises(TypeError, match=r"f\(t, y\) has dtype torch.float32 where the state's entry is a complex tensor"):
        odeflux.solve(lambda t, y: y.real, y0, (0.0, 1.0))
    with pytest.raises(TypeError, match="batch_axis needs y0 as a float32 or float64 tensor"):
        odeflux.solve(lambda t, y: -y, y0.reshape(2, 1), (0.0, 1.0), batch_axis=0)
