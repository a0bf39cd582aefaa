"""Vector fields with their own VJP rule: the rule against the autograd engine, and the adjoints
that use it against the same adjoints without it and against backpropagation through the solver."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import odeflux
from odeflux import BacksolveAdjoint, DirectAdjoint, GaussAdjoint, InterpolatingAdjoint, QuadratureAdjoint
from odeflux.fields import ACTIVATIONS, MLP
from odeflux.mnist.model import FlatParameters, create_model

CONTINUOUS = [InterpolatingAdjoint, BacksolveAdjoint, QuadratureAdjoint, GaussAdjoint]


def mlp(activation: str = "tanh", final_activation: bool = True, seed: int = 0, **kw) -> MLP:
    g = torch.Generator().manual_seed(seed)
    layers = [nn.Linear(4, 6), nn.Linear(6, 5, bias=False), nn.Linear(5, 4)]
    with torch.no_grad():
        for layer in layers:
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)
    return MLP(layers, activation, final_activation=final_activation, **kw).double()


KERNELS = pytest.mark.parametrize("kernels", [True, False], ids=["numpy", "torch"])


def count_rule_calls(m: MLP) -> list:
    """Counts calls of the MLP's VJP rule (either form)."""
    calls: list = []
    for name in ("_vjp", "_vjp_flat"):
        fn = getattr(m, name)
        setattr(m, name, lambda *a, _fn=fn, **k: calls.append(1) or _fn(*a, **k))
    freeze = m.frozen

    def frozen(y, vjp=False):
        fn = freeze(y, vjp)
        if fn is None or not vjp:
            return fn
        return lambda *a, **k: calls.append(1) or fn(*a, **k)

    m.frozen = frozen
    return calls


@KERNELS
@pytest.mark.parametrize("final_activation", [True, False])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("shape", [(4,), (3, 4), (2, 3, 4)], ids=["vector", "batch", "batch2"])
def test_rule_matches_the_autograd_engine(activation, final_activation, shape, kernels):
    m = mlp(activation, final_activation, small_cpu_kernels=kernels)
    g = torch.Generator().manual_seed(1)
    y = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_()
    v = torch.randn(shape, generator=g, dtype=torch.float64)
    out = m(y)
    ref = torch.autograd.grad(out, [y, *m.parameters()], v)
    f, gy, gp = m.vjp_rule(y.detach(), v)
    assert torch.allclose(f, out.detach(), rtol=1e-13, atol=1e-14)
    assert gy.shape == y.shape and len(gp) == len(ref) - 1
    for a, b in zip([gy, *gp], ref):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-13)
    _, none_y, only_p = m.vjp_rule(y.detach(), v, want_y=False)
    assert none_y is None and all(torch.equal(a, b) for a, b in zip(only_p, gp))
    _, only_y, none_p = m.vjp_rule(y.detach(), v, want_p=False)
    assert none_p is None and torch.equal(only_y, gy)
    flat = torch.cat([x.reshape(-1) for x in ref])
    assert torch.allclose(m.vjp_rule_flat(y.detach(), v), flat, rtol=1e-12, atol=1e-13)
    only_p = m.vjp_rule_flat(y.detach(), v, want_y=False, negate=True)
    assert torch.allclose(only_p, -flat[y.numel() :], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numpy_kernels_agree_with_torch(activation, dtype):
    """The small-CPU NumPy path against torch's ops, in the forward pass and the rule."""
    fast, ref = mlp(activation).to(dtype), mlp(activation, small_cpu_kernels=False).to(dtype)
    y = torch.randn(128, 4, generator=torch.Generator().manual_seed(5), dtype=dtype)
    v = torch.randn(128, 4, generator=torch.Generator().manual_seed(6), dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    with torch.no_grad():
        assert fast._small_cpu(y) is not None and ref._small_cpu(y) is None
        out = fast(y)
        assert out.dtype == dtype and torch.allclose(out, ref(y), **tol)
    assert torch.allclose(fast.vjp_rule_flat(y, v, negate=True), ref.vjp_rule_flat(y, v, negate=True), **tol)


def test_numpy_kernels_are_used_only_where_they_may_be():
    m = mlp()
    y = torch.randn(8, 4, dtype=torch.float64)
    assert m._small_cpu(y) is None  # grad mode and parameters requiring grad: the graph is needed
    out = m(y.requires_grad_())
    assert out.grad_fn is not None
    with torch.no_grad():
        assert m._small_cpu(y) is not None
        assert m._small_cpu(y.float()) is None  # parameters in another dtype: torch's error, not a silent cast
        assert m._small_cpu(torch.zeros(100_000, 4, dtype=torch.float64)) is None  # large: torch's kernels
        before = m(y)
        m.layers[0].weight.mul_(2)  # in place: the arrays see it
        assert not torch.allclose(m(y), before)
        kernels = m._small_cpu(y)
        m.float().double()  # .to() moves the data: the kernels are rebuilt
        assert m._small_cpu(y) is not kernels
        assert torch.allclose(m(y), MLP(list(m.layers), small_cpu_kernels=False)(y))


def test_kernels_are_kept_for_new_views_of_the_same_memory():
    """A flat parameter vector cuts new views each forward: same memory, same layout, same kernels;
    a view with another layout over that memory gets new ones, and computes with it."""
    m = mlp()
    y = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        kernels = m._small_cpu(y)
        w = m.layers[0]._parameters["weight"]
        m.layers[0]._parameters["weight"] = w.view(w.shape)  # a new object over the same memory
        assert m._small_cpu(y) is kernels
        w.mul_(3)  # still seen through
        assert torch.allclose(m(y), MLP(list(m.layers), small_cpu_kernels=False)(y))
        m.layers[0]._parameters["weight"] = w.t().contiguous().t()  # other memory and strides
        assert m._small_cpu(y) is not kernels
        assert torch.allclose(m(y), MLP(list(m.layers), small_cpu_kernels=False)(y))


def test_mlp_checks_its_inputs():
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        MLP([nn.Linear(2, 2)], "gelu")
    with pytest.raises(TypeError, match="nn.Linear"):
        MLP([nn.Conv1d(1, 1, 1)])
    with pytest.raises(TypeError, match="non-empty"):
        MLP([])
    with pytest.raises(ValueError, match="3 outputs feed 4 inputs"):
        MLP([nn.Linear(2, 3), nn.Linear(4, 2)])
    m = MLP([nn.Linear(2, 2)])
    m.layers.append(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="layers changed"):
        m(torch.zeros(2))
    assert MLP([nn.Linear(2, 2)], vjp_rule=False).vjp_rule is None


def _grads(field: nn.Module, y0: torch.Tensor, sensealg, **kw) -> torch.Tensor:
    y0 = y0.clone().requires_grad_()
    for p in field.parameters():
        p.grad = None
    sol = odeflux.solve(field, y0, (0.0, 1.0), sensealg=sensealg, rtol=1e-9, atol=1e-9, **kw)
    (sol.ys**2).sum().backward()
    return torch.cat([y0.grad.reshape(-1)] + [p.grad.reshape(-1) for p in field.parameters() if p.requires_grad])


@pytest.mark.parametrize("method", CONTINUOUS, ids=lambda m: m.__name__)
def test_adjoints_with_the_rule_agree_with_the_engine_and_with_direct(method):
    y0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    field = odeflux.VectorField(mlp())
    calls = count_rule_calls(field.module)
    with_rule = _grads(field, y0, method(), saveat=[0.3, 1.0])
    assert calls, "the adjoint did not use the field's VJP rule"
    field.module.use_vjp_rule = False
    n = len(calls)
    engine = _grads(field, y0, method(), saveat=[0.3, 1.0])
    assert len(calls) == n
    direct = _grads(field, y0, DirectAdjoint(), saveat=[0.3, 1.0])
    assert torch.allclose(with_rule, engine, rtol=1e-10, atol=1e-12)
    assert float((with_rule - direct).norm() / direct.norm()) < 1e-6


def test_rule_is_skipped_when_it_does_not_cover_the_parameters():
    """A frozen parameter or an extra tensor in args: the engine takes over, and gradients stay right."""
    y0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    m = mlp()
    used = count_rule_calls(m)
    m.layers[0].bias.requires_grad_(False)
    field = odeflux.VectorField(m)
    g = _grads(field, y0, InterpolatingAdjoint())
    assert not used
    ref = _grads(field, y0, DirectAdjoint())
    assert float((g - ref).norm() / ref.norm()) < 1e-6
    assert m.layers[0].bias.grad is None

    m.layers[0].bias.requires_grad_(True)
    extra = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)  # one more tensor to differentiate
    sol = odeflux.solve(field, y0, (0.0, 1.0), params=[extra], sensealg=InterpolatingAdjoint(), rtol=1e-9, atol=1e-9)
    sol.ys[-1].sum().backward()
    assert not used and float(extra.grad) == 0.0


class TimeMLP(nn.Module):
    """``f(t, y) = cos(t) * mlp(y)`` with a rule in the ``(t, y, v)`` convention."""

    def __init__(self):
        super().__init__()
        self.mlp = mlp("sigmoid")
        self.calls = 0

    def forward(self, t, y):
        return torch.cos(torch.as_tensor(t, dtype=y.dtype)) * self.mlp(y)

    def vjp_rule(self, t, y, v, want_y=True, want_p=True):
        self.calls += 1
        c = torch.cos(torch.as_tensor(t, dtype=y.dtype))
        f, gy, gp = self.mlp.vjp_rule(y, v * c, want_y=want_y, want_p=want_p)
        return f * c, gy, gp


def test_time_dependent_field_gets_its_rule_called_with_t():
    y0 = torch.randn(2, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    tm = TimeMLP()
    field = odeflux.VectorField(tm)
    g = _grads(field, y0, GaussAdjoint())
    assert tm.calls > 0
    ref = _grads(field, y0, DirectAdjoint())
    assert float((g - ref).norm() / ref.norm()) < 1e-6


def test_tutorial_model_with_flat_parameters_uses_the_rule():
    """The tutorial's model (FlatParameters over a TanhMLP field): same gradient with and without the rule."""
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))
    grads = []
    for rule in (True, False):
        model = create_model(params="flat")
        assert isinstance(model, FlatParameters)
        field = model.module.node.vector_field
        field.use_vjp_rule = rule
        nn.functional.cross_entropy(model(x), y).backward()
        grads.append(model.flat.grad)
        assert model.module.node.last_backward_stats.n_vjp_evals > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_frozen_forms_are_kept_across_solves_and_see_the_biases_as_they_are_now():
    """A solve's frozen field and VJP rule are kept with the kernels for the next solve of the same
    shape, with the per-row bias copies brought up to date each time: an optimizer's in-place
    update between solves shows in the next solve's evaluations and products."""
    m = mlp()
    ref = MLP(list(m.layers), small_cpu_kernels=False)
    y = torch.randn(5, 4, dtype=torch.float64)
    v = torch.randn(5, 4, dtype=torch.float64)
    with torch.no_grad():
        field, rule = m.frozen(y), m.frozen(y, vjp=True)
        assert m.frozen(y) is field and m.frozen(y, vjp=True) is rule  # kept
        assert m.frozen(y[:3]) is not field  # another shape, another form
        for layer in m.layers:
            if layer.bias is not None:
                layer.bias.add_(0.5)
            layer.weight.mul_(1.5)
        field, rule = m.frozen(y), m.frozen(y, vjp=True)
        assert torch.allclose(field(y), ref(y), rtol=1e-12, atol=1e-12)
        assert torch.allclose(rule(y, v), ref.vjp_rule_flat(y, v), rtol=1e-12, atol=1e-12)
