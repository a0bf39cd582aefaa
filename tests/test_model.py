"""The tutorial's model: shapes, Lux's initialisation, the flat parameter structure."""

import math

import pytest
import torch
from torch import nn

import odeflux
from odeflux.mnist.model import (
    FlatParameters,
    TanhMLP,
    create_model,
    dense,
    glorot_uniform_,
    make_sensealg,
    trainable_parameters,
)

# Lux's ComponentArray of the tutorial's model ends at index 16450 (its printed axes):
# 784*20+20 + (20*10+10 + 10*10+10 + 10*20+20) + 20*10+10.
LUX_N_PARAMS = 16450


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def test_output_shape_and_layers():
    model = create_model(sensealg="direct")
    x = torch.rand(5, 1, 28, 28)
    out = model(x)
    assert out.shape == (5, 10) and out.dtype == torch.float32
    shapes = [tuple(l.weight.shape) for l in _linears(model)]
    assert shapes == [(20, 784), (10, 20), (10, 10), (20, 10), (10, 20)]
    assert sum(p.numel() for p in model.parameters()) == LUX_N_PARAMS


def test_node_is_the_tutorials_solve():
    node = create_model(sensealg="direct").node
    assert isinstance(node.solver, odeflux.Tsit5)
    assert node.tspan == (0.0, 1.0)
    assert node.solve_kwargs["rtol"] == 1e-3 and node.solve_kwargs["atol"] == 1e-3
    assert node.solve_kwargs["save_start"] is False


@pytest.mark.parametrize("sensealg", ["interpolating", "gauss", "backsolve", "quadrature"])
@pytest.mark.parametrize("arch", ["tutorial", "odenet"])
def test_the_recorded_runs_keep_ordinarydiffeqs_pi_controller(sensealg, arch):
    """The tutorial's forward solves and every model's adjoint solves keep OrdinaryDiffEq's PI
    controller (error memory floored at 1e-4), as their runs were recorded, though odeflux's
    default for Tsit5 floors it at 0.1; on the tutorial's field the two take other steps."""
    from odeflux.control import IController, PIController

    node = create_model(sensealg=sensealg, arch=arch).node
    forward = node.solve_kwargs["controller"]
    if arch == "tutorial":
        assert type(forward) is PIController and forward.qoldinit == 1e-4
    else:  # (the ODE-Net's forward: torchdiffeq's integral controller, as Chen et al.)
        assert type(forward) is IController
    assert type(node.sensealg.controller) is PIController and node.sensealg.controller.qoldinit == 1e-4
    if arch == "tutorial" and sensealg == "interpolating":
        h = torch.tanh(torch.randn(128, 20, generator=torch.Generator().manual_seed(1)))
        with torch.no_grad():
            field = next(m for m in node.modules() if isinstance(m, TanhMLP))
            pinned = odeflux.solve(field, h, (0.0, 1.0), rtol=1e-3, atol=1e-3, controller=forward)
            default = odeflux.solve(field, h, (0.0, 1.0), rtol=1e-3, atol=1e-3)
        assert not torch.equal(pinned.ys, default.ys)  # (other step sizes)


def test_glorot_uniform_statistics():
    gen = torch.Generator().manual_seed(0)
    w = glorot_uniform_(torch.empty(400, 784), gen)
    bound = math.sqrt(6.0 / (400 + 784))
    assert w.abs().max() <= bound
    assert w.abs().max() > 0.999 * bound  # fills the whole interval
    # U(-b, b): mean 0, standard deviation b / sqrt(3); 313,600 draws pin both to well under 1 %.
    assert abs(w.mean().item()) < 0.01 * bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.01)
    # Uniform, not merely the right variance: each quarter of the interval holds a quarter of the draws.
    counts = torch.histc(w, bins=4, min=-bound, max=bound) / w.numel()
    assert torch.allclose(counts, torch.full((4,), 0.25), atol=0.005)


def test_model_init_bounds_and_zero_biases():
    model = create_model(sensealg="direct")
    for layer in _linears(model):
        fan_out, fan_in = layer.weight.shape
        assert layer.weight.abs().max() <= math.sqrt(6.0 / (fan_in + fan_out))
        assert torch.count_nonzero(layer.bias) == 0


def test_init_is_seeded():
    a = torch.cat([p.detach().reshape(-1) for p in create_model(sensealg="direct", seed=0).parameters()])
    b = torch.cat([p.detach().reshape(-1) for p in create_model(sensealg="direct", seed=0).parameters()])
    c = torch.cat([p.detach().reshape(-1) for p in create_model(sensealg="direct", seed=1).parameters()])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_tanh_mlp_matches_a_sequential():
    gen = torch.Generator().manual_seed(3)
    layers = [dense(20, 10, gen), dense(10, 20, gen)]
    mlp = TanhMLP(layers)
    ref = nn.Sequential(layers[0], nn.Tanh(), layers[1], nn.Tanh())
    y = torch.randn(7, 20)
    torch.testing.assert_close(mlp(y), ref(y), rtol=0, atol=0)


def test_flat_holds_the_same_parameters_in_one_tensor():
    tree = create_model(sensealg="direct", params="tree")
    flat = create_model(sensealg="direct", params="flat")
    assert isinstance(flat, FlatParameters)
    trainable = trainable_parameters(flat)
    assert len(trainable) == 1 and trainable[0] is flat.flat
    assert flat.flat.shape == (LUX_N_PARAMS,)
    expected = torch.cat([p.detach().reshape(-1) for p in tree.parameters()])
    assert torch.equal(flat.flat.detach(), expected)
    x = torch.rand(3, 1, 28, 28)
    torch.testing.assert_close(flat(x), tree(x), rtol=0, atol=0)


def test_flat_module_parameters_alias_the_vector_after_a_move():
    flat = create_model(sensealg="direct", params="flat").to(torch.float64)
    assert flat.flat.dtype == torch.float64
    with torch.no_grad():
        flat.flat.zero_()
    # The wrapped module's own parameters follow the vector (they are views of it), dtype included.
    for p in flat.module.parameters():
        assert p.dtype == torch.float64 and not p.requires_grad
        assert torch.count_nonzero(p) == 0


def test_make_sensealg_maps_names():
    assert isinstance(make_sensealg("direct"), odeflux.DirectAdjoint)
    from odeflux.sensitivity import BacksolveAdjoint, GaussAdjoint, InterpolatingAdjoint, QuadratureAdjoint

    for name, cls in [("interpolating", InterpolatingAdjoint), ("gauss", GaussAdjoint),
                      ("backsolve", BacksolveAdjoint), ("quadrature", QuadratureAdjoint)]:  # fmt: skip
        alg = make_sensealg(name, "func")
        assert type(alg) is cls and alg.vjp == "func" and alg.first_step == "interval"
        assert make_sensealg(name, first_step="hairer").first_step == "hairer"
    with pytest.raises(ValueError, match="unknown sensealg"):
        make_sensealg("reversediff")
    with pytest.raises(ValueError, match="unknown vjp"):
        make_sensealg("gauss", "zygote")
    with pytest.raises(ValueError, match="unknown adjoint first step 'auto': choose one of hairer, interval"):
        make_sensealg("gauss", first_step="auto")
    node = next(m for m in create_model(adjoint_first_step="hairer").modules() if isinstance(m, odeflux.NeuralODE))
    assert node.sensealg.first_step == "hairer"
    for first in ("continue", "forward"):  # (every first step the adjoints take is a choice)
        assert make_sensealg("gauss", first_step=first).first_step == first


def test_create_model_rejects_bad_choices():
    with pytest.raises(ValueError, match="solver"):
        create_model(sensealg="direct", solver="euler")
    with pytest.raises(ValueError, match="params"):
        create_model(sensealg="direct", params="namedtuple")
