"""``torch.compile`` around odeflux: a user compiles the model that holds a ``NeuralODE`` (or a
function that calls ``odeint``). The solve is one unit dynamo skips (a graph break), so the
compiled model computes what the eager one does, new step sizes and batch sizes included; before,
dynamo traced the solve step by step (dozens of graphs, seconds a call) and failed inside its
own guard checks on the first call.

``backend="eager"``: dynamo's tracing is what is under test, not Inductor's code.
"""

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

import odeflux
from odeflux.compat import torchdiffeq as compat


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class TimeField(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 16), nn.Linear(16, 4)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y))) * torch.cos(t)


def _model(sensealg="auto"):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), odeflux.NeuralODE(TimeField(), sensealg=sensealg), nn.Linear(4, 2))


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("sensealg", ["auto", "interpolating"])
def test_a_compiled_model_around_a_neural_ode_computes_what_the_eager_one_does(sensealg):
    method = "auto" if sensealg == "auto" else odeflux.InterpolatingAdjoint()
    model = _model(method)
    compiled = torch.compile(model, backend="eager")
    graphs = counters["stats"]["unique_graphs"]
    gen = torch.Generator().manual_seed(1)
    # New values (other step sizes), then a new batch size.
    for x in (torch.randn(16, 3, generator=gen), 3 * torch.randn(16, 3, generator=gen), torch.randn(32, 3, generator=gen)):
        out_c, g_c = _grads(compiled, x)
        out_e, g_e = _grads(model, x)
        torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-7)
        for a, b in zip(g_c, g_e):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # The layers before and after the solve (traced again for the new batch size), not its steps.
    assert counters["stats"]["unique_graphs"] - graphs <= 6


def test_fullgraph_refuses_with_the_fix_named():
    compiled = torch.compile(_model(), backend="eager", fullgraph=True)
    with pytest.raises(Exception, match="compile=True"):
        compiled(torch.randn(4, 3))


def test_odeint_inside_a_compiled_function_matches_eager():
    field = TimeField().double()
    t = torch.linspace(0.0, 1.0, 5, dtype=torch.float64)

    def loss(y0):
        return compat.odeint_adjoint(field, y0, t, rtol=1e-8, atol=1e-10).square().sum()

    compiled = torch.compile(loss, backend="eager")
    for scale in (1.0, 2.5):
        y0 = scale * torch.linspace(-1.0, 1.0, 8, dtype=torch.float64).reshape(2, 4)
        grads = []
        for fn in (compiled, loss):
            y = y0.clone().requires_grad_(True)
            value = fn(y)
            grads.append((value.detach(), *torch.autograd.grad(value, (y, *field.parameters()))))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver", ["adaptive", "fixed"])
def test_torch_export_is_refused_in_one_line(solver):
    """torch.export traces the solve with fake tensors, which a solve's host loop cannot run on:
    one line naming the problem, not an error from inside (a data pointer of a fake tensor)."""
    kw = {} if solver == "adaptive" else {"solver": odeflux.RK4(), "dt0": 0.1}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), odeflux.NeuralODE(TimeField(), **kw), nn.Linear(4, 2))
    with pytest.raises(RuntimeError, match=r"^odeflux.solve cannot be traced by torch.export: .*run the model eagerly$"):
        torch.export.export(model, (torch.randn(4, 3),))
