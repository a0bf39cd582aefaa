"""The convolutional ODE-Net (``create_model(arch="odenet")``): shapes, size, gradients, parameter structures."""

import math

import pytest
import torch
import torch._dynamo
from torch import nn
from torch.nn import functional as F

import odeflux
from odeflux.integrator import rk_step_with_error
from odeflux.mnist.model import (
    ODENET_WIDTH,
    ConcatConv2d,
    ConvODEFunc,
    FlatParameters,
    create_model,
    odenet,
    trainable_parameters,
)
from odeflux.nn import VectorField


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):  # (conftest.py: tiny ops)
    yield


def _n_params(w: int, pooled: bool) -> int:
    """Counted layer by layer: downsampler, ODE block (two convs with a time channel), head."""
    gn = 2 * w
    down = (1 * 9 * w + w) + gn + (w * 16 * w + w) + gn + (w * 16 * w + w)
    block = 3 * gn + 2 * ((w + 1) * 9 * w + w)
    head = gn + (w * (1 if pooled else 36) * 10 + 10)
    return down + block + head


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _labels(n: int) -> torch.Tensor:
    return torch.arange(n) % 10


def _grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    params = trainable_parameters(model)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    return torch.cat([g.reshape(-1) for g in grads])


def test_shapes():
    model = create_model(arch="odenet", sensealg="direct")
    x = _images(3)
    h = model.downsample(x)
    assert h.shape == (3, ODENET_WIDTH, 6, 6)
    z = model.node(h)
    assert z.shape == h.shape and not torch.equal(z, h)
    out = model(x)
    assert out.shape == (3, 10) and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("width", [8, 32, 64])
def test_parameter_count(width):
    model = create_model(arch="odenet", width=width, sensealg="direct")
    assert sum(p.numel() for p in model.parameters()) == _n_params(width, pooled=False)


def test_chen_et_al_size():
    # Chen et al.'s configuration (64 channels, pooled head): the paper lists the ODE-Net at 0.22 M
    # parameters (0.21 M by this count).
    model = odenet(64, torch.Generator().manual_seed(0), pooled_head=True, sensealg=odeflux.DirectAdjoint())
    n = sum(p.numel() for p in model.parameters())
    assert n == _n_params(64, pooled=True) == 208_266
    assert model(_images(2)).shape == (2, 10)


@pytest.mark.parametrize("params", ["tree", "flat"])
def test_create_model_builds_chen_et_als_pooled_head(params):
    pooled = create_model(arch="odenet", width=8, pooled_head=True, sensealg="direct", params=params)
    reference = odenet(8, torch.Generator().manual_seed(0), pooled_head=True, sensealg=odeflux.DirectAdjoint())
    weights = torch.cat([p.detach().reshape(-1) for p in trainable_parameters(pooled)])
    assert torch.equal(weights, torch.cat([p.detach().reshape(-1) for p in reference.parameters()]))  # same draws
    assert weights.numel() == _n_params(8, pooled=True) and pooled(_images(2)).shape == (2, 10)


def test_ode_block_is_the_papers_solve():
    node = create_model(arch="odenet", sensealg="direct").node
    assert isinstance(node.solver, odeflux.Tsit5) and node.tspan == (0.0, 1.0)
    assert node.solve_kwargs["rtol"] == 1e-3 and node.solve_kwargs["atol"] == 1e-3
    assert isinstance(node.field.module, ConvODEFunc) and node.field.time_dependent
    norms = [m for m in node.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3 and all(m.num_groups == min(32, ODENET_WIDTH) for m in norms)
    assert not list(create_model(arch="odenet", sensealg="direct").buffers())  # all state is parameters


def test_init_is_seeded_and_pytorchs_default():
    def flat(m: nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in m.parameters()])

    a, b = create_model(arch="odenet", seed=0, sensealg="direct"), create_model(arch="odenet", seed=0, sensealg="direct")
    c = create_model(arch="odenet", seed=1, sensealg="direct")
    assert torch.equal(flat(a), flat(b)) and not torch.equal(flat(a), flat(c))
    for m in a.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            # kaiming_uniform_(a=sqrt(5)) and the bias both draw from U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
            bound = 1 / math.sqrt(m.weight[0].numel())
            assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.9 * bound
            assert m.bias.abs().max() <= bound
        if isinstance(m, nn.GroupNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and torch.count_nonzero(m.bias) == 0


def test_concat_conv_is_affine_in_time():
    gen = torch.Generator().manual_seed(0)
    layer = ConcatConv2d(3, 4)
    y = torch.randn(2, 3, 5, 5, generator=gen)
    base = layer(torch.tensor(0.0), y)
    # The time channel is constant, so t enters as t * (its kernel slice convolved with ones).
    ones = torch.ones(2, 1, 5, 5)
    slope = F.conv2d(ones, layer.conv.weight[:, :1], padding=1)
    for t in (0.3, 1.0):
        torch.testing.assert_close(layer(torch.tensor(t), y), base + t * slope, rtol=1e-5, atol=1e-5)
    assert slope.abs().max() > 0


def test_vector_field_depends_on_time():
    f = create_model(arch="odenet", width=8, sensealg="direct").node.field
    y = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(1))
    f0, f1 = f(torch.tensor(0.0), y), f(torch.tensor(1.0), y)
    assert f0.shape == y.shape
    assert (f0 - f1).abs().max() > 1e-3


def test_forward_matches_torchdiffeq():
    # ReLU kinks make both solvers' errors exceed their tolerance about a hundredfold, so each
    # solves at 1e-8 and the two must agree to 1e-4 (they converge to each other: 3e-6 at 1e-9).
    torchdiffeq = pytest.importorskip("torchdiffeq")
    model = create_model(arch="odenet", width=8, sensealg="direct", rtol=1e-8, atol=1e-8).double()
    with torch.no_grad():
        h = model.downsample(_images(2).double())
        ours = model.node(h)
        ref = torchdiffeq.odeint(model.node.field, h, torch.tensor([0.0, 1.0], dtype=torch.float64),
                                 method="dopri5", rtol=1e-8, atol=1e-8)[-1]  # fmt: skip
    assert (ours - h).abs().max() > 0.1  # the block does move the state
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_direct_and_interpolating_adjoint_gradients_agree():
    # ReLU makes the field only piecewise smooth: the two gradients converge slowly as the
    # tolerance shrinks (relative gap 0.15 at 1e-4, 0.06 at 1e-5, 0.02 at 1e-6), so loosely.
    x, y = _images(4).double(), _labels(4)
    grads = {}
    for name in ("direct", "interpolating"):
        model = create_model(arch="odenet", width=4, sensealg=name, rtol=1e-6, atol=1e-6).double()
        grads[name] = _grad(model, x, y)
    g_direct, g_interp = grads["direct"], grads["interpolating"]
    assert torch.isfinite(g_interp).all() and g_direct.norm() > 0
    assert (g_interp - g_direct).norm() / g_direct.norm() < 0.05
    assert F.cosine_similarity(g_interp, g_direct, dim=0) > 0.999


@pytest.mark.parametrize("sensealg", ["direct", "interpolating"])
def test_tree_and_flat_agree(sensealg):
    tree = create_model(arch="odenet", width=8, sensealg=sensealg, params="tree")
    flat = create_model(arch="odenet", width=8, sensealg=sensealg, params="flat")
    assert isinstance(flat, FlatParameters) and len(trainable_parameters(flat)) == 1
    assert torch.equal(flat.flat.detach(), torch.cat([p.detach().reshape(-1) for p in tree.parameters()]))
    x, y = _images(3), _labels(3)
    torch.testing.assert_close(flat(x), tree(x), rtol=0, atol=0)
    torch.testing.assert_close(_grad(flat, x, y), _grad(tree, x, y), rtol=1e-5, atol=1e-7)


def test_a_few_steps_learn():
    model = create_model(arch="odenet", width=4, sensealg="direct", params="flat")
    opt = torch.optim.Adam(trainable_parameters(model), lr=1e-2)
    x, y = _images(16, seed=2), _labels(16)
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(model(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0], losses


def test_vector_field_step_traces_as_one_graph():
    torch._dynamo.reset()
    try:
        f = VectorField(ConvODEFunc(8))
        solver = odeflux.Tsit5()
        y = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(0))
        t = torch.zeros(())
        with torch.no_grad():
            k = f(t, y)
        args = (solver, f, t, y, 0.1, k, solver.coefficients(y.dtype, y.device), 1e-3, 1e-3, None)
        explanation = torch._dynamo.explain(rk_step_with_error)(*args)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
    finally:
        torch._dynamo.reset()


def test_bad_choices_are_refused():
    with pytest.raises(ValueError, match="unknown arch 'resnet'"):
        create_model(arch="resnet")
    with pytest.raises(ValueError, match="width applies to arch='odenet' only"):
        create_model(width=16)
    with pytest.raises(ValueError, match="pooled_head applies to arch='odenet' only"):
        create_model(pooled_head=True)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="width must be a positive integer"):
            create_model(arch="odenet", width=bad)


def test_tutorial_stays_the_default():
    default, explicit = create_model(sensealg="direct"), create_model(sensealg="direct", arch="tutorial")
    assert [n for n, _ in default.named_parameters()] == [n for n, _ in explicit.named_parameters()]
    for p, q in zip(default.parameters(), explicit.parameters()):
        assert torch.equal(p, q)
    assert not any(isinstance(m, nn.Conv2d) for m in default.modules())
