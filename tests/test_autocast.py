"""Solves under ``torch.autocast`` (mixed-precision training): the field runs under the caller's
autocast, the solver's own arithmetic in the state's float32, and the continuous adjoints'
backward evaluations under the autocast the forward ran in (:mod:`odeflux.autocast`).

On the CPU with bfloat16, the autocast dtype a CPU has; CUDA's float16 takes the same path.
"""

import pytest
import torch
from torch import nn

import odeflux
from odeflux.compat import torchdiffeq as compat

AMP = dict(device_type="cpu", dtype=torch.bfloat16)


class Field(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 32), nn.Linear(32, 4)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y))) * (1 + 0.5 * torch.cos(t))


def _model(sensealg):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), odeflux.NeuralODE(Field(), sensealg=sensealg, rtol=1e-5, atol=1e-6), nn.Linear(4, 2))


def _gradient(model, x, amp):
    model.zero_grad(set_to_none=True)
    with torch.autocast(**AMP, enabled=amp):
        out = model(x)
    out.float().square().sum().backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


METHODS = ["auto", "DirectAdjoint", "InterpolatingAdjoint", "BacksolveAdjoint", "GaussAdjoint"]


def _sensealg(name):
    return name if name == "auto" else getattr(odeflux, name)()


@pytest.mark.parametrize("method", METHODS)
def test_a_neural_ode_trains_under_autocast_with_its_field_in_bfloat16(method):
    model = _model(_sensealg(method))
    ode = model[1]
    seen = {"forward": set(), "backward": set()}
    phase = ["forward"]
    ode.vector_field.l1.register_forward_hook(lambda m, i, o: seen[phase[0]].add(o.dtype))
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))

    ode.return_solution = True
    with torch.autocast(**AMP):
        sol = ode(model[0](x))
    assert model[0](x).dtype == torch.float32 and sol.ys.dtype == torch.float32  # (the state, promoted from bfloat16)
    ode.return_solution = False

    seen["forward"].clear()
    model.zero_grad(set_to_none=True)
    with torch.autocast(**AMP):
        out = model(x)
    phase[0] = "backward"
    out.float().square().sum().backward()
    g_amp = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert seen["forward"] == {torch.bfloat16}
    # The continuous adjoints evaluate the field again in the backward pass: under the same autocast.
    assert seen["backward"] <= {torch.bfloat16}
    if method in ("InterpolatingAdjoint", "BacksolveAdjoint", "GaussAdjoint"):
        assert seen["backward"] == {torch.bfloat16}
    g_full = _gradient(_model(_sensealg(method)), x, amp=False)
    assert torch.isfinite(g_amp).all()
    assert (g_amp - g_full).norm() / g_full.norm() < 5e-2  # bfloat16's 8 bits of mantissa in the field


def test_the_solvers_own_arithmetic_stays_out_of_autocast():
    """A field autocast leaves alone (elementwise ops): the solve under autocast is bitwise the
    solve outside it; the stage sums' matrix products, run by autocast in bfloat16, would not be."""
    a = torch.linspace(-1.0, 0.5, 32).reshape(4, 8)
    y0 = torch.linspace(0.5, 2.0, 32).reshape(4, 8)

    def f(t, y):
        return a * y + torch.sin(t)

    ref = odeflux.solve(f, y0, (0.0, 2.0), rtol=1e-6, atol=1e-8, saveat=torch.linspace(0.0, 2.0, 5))
    with torch.autocast(**AMP):
        sol = odeflux.solve(f, y0, (0.0, 2.0), rtol=1e-6, atol=1e-8, saveat=torch.linspace(0.0, 2.0, 5))
    assert sol.stats.n_steps == ref.stats.n_steps
    assert torch.equal(sol.ys, ref.ys)


def test_a_bfloat16_state_is_promoted_under_autocast_only():
    y0 = torch.ones(2, 4, dtype=torch.bfloat16, requires_grad=True)
    field = Field()
    with torch.autocast(**AMP):
        sol = odeflux.solve(field, y0, (0.0, 1.0))
    assert sol.ys.dtype == torch.float32
    sol.ys[-1].sum().backward()
    assert y0.grad is not None and y0.grad.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="float32 or float64"):
        odeflux.solve(field, y0.detach(), (0.0, 1.0))


def test_odeint_under_autocast_matches_float32_to_bfloat16s_accuracy():
    field = Field()
    y0 = torch.linspace(-1.0, 1.0, 8).reshape(2, 4)
    t = torch.linspace(0.0, 1.0, 4)
    ref = compat.odeint(field, y0, t, rtol=1e-5, atol=1e-6)
    with torch.autocast(**AMP):
        ys = compat.odeint(field, y0, t, rtol=1e-5, atol=1e-6)
    assert ys.dtype == torch.float32
    assert (ys - ref).norm() / ref.norm() < 2e-2
    assert (ys - ref).abs().max() > 0  # (the field did run in bfloat16)


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_a_dense_y_only_sequential_runs_under_autocast_not_its_float32_kernels(grad):
    """A dense nn.Sequential of y alone has NumPy kernels and a hand-written VJP in float32; under
    autocast the solve takes the generic path, where the layers run as autocast makes them."""
    torch.manual_seed(0)
    field = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4))
    seen = set()
    field[0].register_forward_hook(lambda m, i, o: seen.add(o.dtype))
    y0 = torch.randn(8, 4, requires_grad=grad)
    with torch.set_grad_enabled(grad), torch.autocast(**AMP):
        sol = odeflux.solve(field, y0, (0.0, 1.0))
    assert seen == {torch.bfloat16} and sol.ys.dtype == torch.float32
    ref = odeflux.solve(field, y0, (0.0, 1.0))
    assert (sol.ys - ref.ys).norm() / ref.ys.norm() < 2e-2
    if grad:
        sol.ys[-1].sum().backward()
        assert torch.isfinite(y0.grad).all()


def test_what_is_remembered_of_a_field_is_remembered_under_autocast():
    """The continuous adjoints check a field once (one evaluation, remembered per field); under
    autocast the field is wrapped afresh per solve, and the check is still done once."""
    field = Field()
    calls = [0]
    field.register_forward_hook(lambda m, i, o: calls.__setitem__(0, calls[0] + 1))
    y0 = torch.randn(8, 4, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    with torch.autocast(**AMP):
        odeflux.solve(field, y0, (0.0, 1.0), sensealg=odeflux.InterpolatingAdjoint())  # (checked here)
        calls[0] = 0
        sol = odeflux.solve(field, y0, (0.0, 1.0), sensealg=odeflux.InterpolatingAdjoint())
    assert calls[0] == sol.stats.n_f_evals
