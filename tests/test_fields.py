"""Vector fields with their own VJP rule: the rule against the autograd engine, and the adjoints
that use it against the same adjoints without it and against backpropagation through the solver."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import odeflux
from odeflux import BacksolveAdjoint, DirectAdjoint, GaussAdjoint, InterpolatingAdjoint, QuadratureAdjoint
from odeflux.fields import ACTIVATIONS, MLP, FrozenVJP, dense_chain
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
    """Counts calls of the MLP's VJP rule (on tensors, or its array form's products)."""
    calls: list = []
    fn = m._vjp
    m._vjp = lambda *a, **k: calls.append(1) or fn(*a, **k)
    make = m.array_vjp

    def array_vjp(y):
        rule = make(y)
        if rule is None:
            return None
        return _Counted(rule, calls)

    m.array_vjp = array_vjp
    return calls


class _Counted(FrozenVJP):
    """An array rule that counts its products (plans count once per state)."""

    def __init__(self, rule: FrozenVJP, calls: list):
        super().__init__(rule.kernels, rule.d_in)
        self.calls = calls

    def __call__(self, *a, **k):
        self.calls.append(1)
        return super().__call__(*a, **k)

    def stage_plan(self, ys, negate=False):
        self.calls.extend([1] * ys.shape[0])
        return super().stage_plan(ys, negate)


def flat_rule(m: MLP, y: torch.Tensor, v: torch.Tensor, want_y: bool = True, negate: bool = False) -> torch.Tensor:
    """The rule's products concatenated, as an adjoint's right-hand side uses them."""
    _, gy, gp = m.vjp_rule(y, v, want_y=want_y)
    out = torch.cat(([gy.reshape(-1)] if want_y else []) + [g.reshape(-1) for g in gp])
    return -out if negate else out


# For rounding_bounds: |act(a) - act(b)| <= L |a - b|; and the rule's factor phi(h) as a function of
# the activation's output h, |phi'(h)|, and what its three roundings are relative to.
_LIPSCHITZ = {"tanh": 1.0, "sigmoid": 0.25, "relu": 1.0}
_PHI = {
    "tanh": (lambda h: 1 - h * h, lambda h: 2 * h.abs(), lambda h: 1 + h * h),
    "sigmoid": (lambda h: h * (1 - h), lambda h: (1 - 2 * h).abs(), lambda h: h * (1 + h)),
    "relu": (lambda h: (h > 0).double(), torch.zeros_like, torch.zeros_like),
}


def rounding_bounds(m: MLP, y: torch.Tensor, v: torch.Tensor, act_ulps: float = 4.0):
    """First-order bounds, element by element, on the rounding error of any evaluation of ``m(y)``
    and of its VJP rule's flat products (``flat_rule(m, y, v)``) in ``y``'s dtype, whatever the order of its sums or the BLAS
    kernel: a sum of n products is within n u of the exact sum relative to the sum of the products'
    magnitudes (u: the unit roundoff), layer by layer, an activation adds ``act_ulps`` ulps, and
    errors from earlier layers pass through |W| and the activation's Lipschitz constant (the rule's
    factor through its derivative; a ReLU input within its error of 0 may take either side).
    Returns the bounds on the output and on the flat rule, in float64."""
    u = torch.finfo(y.dtype).eps / 2
    x = y.double().reshape(-1, y.shape[-1])
    hs, dhs, kinks = [x], [torch.zeros_like(x)], []
    for layer, name in zip(m.layers, m._act_names):
        W, b = layer.weight.detach().double(), None if layer.bias is None else layer.bias.detach().double()
        h, dh = hs[-1], dhs[-1]
        z = h @ W.T + (0 if b is None else b)
        mag = h.abs() @ W.abs().T + (0 if b is None else b.abs())
        dz = dh @ W.abs().T + (W.shape[1] + (b is not None)) * u * mag
        kinks.append(z.abs() <= dz)
        if name in (None, "identity"):
            hs.append(z), dhs.append(dz)
        else:
            out = ACTIVATIONS[name][0](z)
            hs.append(out), dhs.append(_LIPSCHITZ[name] * dz + act_ulps * 2 * u * out.abs())
    # The rule, last layer first: g <- phi(h) g; dW = g^T h_in; db = sum of g's rows; g <- g W.
    rows = x.shape[0]
    g, dg = v.double().reshape(hs[-1].shape), torch.zeros_like(hs[-1])
    grads: list[torch.Tensor] = []
    for i in range(len(m.layers) - 1, -1, -1):
        W, name = m.layers[i].weight.detach().double(), m._act_names[i]
        if name not in (None, "identity"):
            phi, dphi, scale = _PHI[name]
            h, dh = hs[i + 1], dhs[i + 1]
            dg = phi(h).abs() * dg + g.abs() * dphi(h) * dh + 3 * u * g.abs() * scale(h)
            if name == "relu":
                dg = dg + g.abs() * kinks[i]
            g = phi(h) * g
        dW = dg.T @ hs[i].abs() + g.abs().T @ dhs[i] + rows * u * (g.abs().T @ hs[i].abs())
        grads[:0] = [dW] if m.layers[i].bias is None else [dW, dg.sum(0) + rows * u * g.abs().sum(0)]
        g, dg = g @ W, dg @ W.abs() + W.shape[0] * u * (g.abs() @ W.abs())
    out_bound = dhs[-1].reshape(y.shape[:-1] + (hs[-1].shape[-1],))
    return out_bound, torch.cat([dg.reshape(-1)] + [t.reshape(-1) for t in grads])


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
    with torch.no_grad():
        rule = m.array_vjp(y.detach())
    if kernels:  # the array form: the same products, flat
        assert torch.allclose(torch.from_numpy(rule(y.detach().numpy(), v.numpy())), flat, rtol=1e-12, atol=1e-13)
        only_p = torch.from_numpy(rule(y.detach().numpy(), v.numpy(), want_y=False, negate=True))
        assert torch.allclose(only_p, -flat[y.numel() :], rtol=1e-12, atol=1e-13)
    else:
        assert rule is None


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_numpy_kernels_agree_with_torch(activation, dtype):
    """The small-CPU NumPy path against torch's ops, in the forward pass and the rule: each is
    within ``rounding_bounds`` of the exact values, so they differ by at most twice that, on any
    machine and BLAS. (A fixed rtol=1e-5 in float32 was below that bound for every entry of the
    tanh rule, whose weight products sum 128 rows: it held on one CPU by favourable cancellation
    and failed with another's kernels.)"""
    fast, ref = mlp(activation).to(dtype), mlp(activation, small_cpu_kernels=False).to(dtype)
    y = torch.randn(128, 4, generator=torch.Generator().manual_seed(5), dtype=dtype)
    v = torch.randn(128, 4, generator=torch.Generator().manual_seed(6), dtype=dtype)
    bound_out, bound_rule = rounding_bounds(ref, y, v)
    with torch.no_grad():
        assert fast._numpy_kernels(y) is not None and ref._numpy_kernels(y) is None
        out, expected = fast(y), ref(y)
        rule = torch.from_numpy(fast.array_vjp(y)(y.numpy(), v.numpy(), negate=True))
    assert out.dtype == dtype and ((out - expected).double().abs() <= 2 * bound_out).all()
    expected_rule = flat_rule(ref, y, v, negate=True)
    assert ((rule - expected_rule).double().abs() <= 2 * bound_rule).all()
    # The bound keeps the test's teeth: typically 1e4 u or less of the value (a wrong kernel is off by ~1).
    nonzero = expected_rule != 0  # (ReLU's dead units: exact zeros, bound 0)
    u = torch.finfo(dtype).eps / 2
    assert float((bound_rule[nonzero] / expected_rule[nonzero].double().abs()).median()) < 1e4 * u


def test_numpy_kernels_are_used_only_where_they_may_be():
    m = mlp()
    y = torch.randn(8, 4, dtype=torch.float64)
    assert m._numpy_kernels(y) is None  # grad mode and parameters requiring grad: the graph is needed
    out = m(y.requires_grad_())
    assert out.grad_fn is not None
    with torch.no_grad():
        assert m._numpy_kernels(y) is not None
        assert m._numpy_kernels(y.float()) is None  # parameters in another dtype: torch's error, not a silent cast
        assert m._numpy_kernels(torch.zeros(100_000, 4, dtype=torch.float64)) is None  # large: torch's kernels
        before = m(y)
        m.layers[0].weight.mul_(2)  # in place: the arrays see it
        assert not torch.allclose(m(y), before)
        kernels = m._numpy_kernels(y)
        m.float().double()  # .to() moves the data: the kernels are rebuilt
        assert m._numpy_kernels(y) is not kernels
        assert torch.allclose(m(y), MLP(list(m.layers), small_cpu_kernels=False)(y))


def test_kernels_are_kept_for_new_views_of_the_same_memory():
    """A flat parameter vector cuts new views each forward: same memory, same layout, same kernels;
    a view with another layout over that memory gets new ones, and computes with it."""
    m = mlp()
    y = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        kernels = m._numpy_kernels(y)
        w = m.layers[0]._parameters["weight"]
        m.layers[0]._parameters["weight"] = w.view(w.shape)  # a new object over the same memory
        assert m._numpy_kernels(y) is kernels
        w.mul_(3)  # still seen through
        assert torch.allclose(m(y), MLP(list(m.layers), small_cpu_kernels=False)(y))
        m.layers[0]._parameters["weight"] = w.t().contiguous().t()  # other memory and strides
        assert m._numpy_kernels(y) is not kernels
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
        field, rule = m.array_field(y), m.array_vjp(y)
        assert m.array_field(y) is field and m.array_vjp(y) is rule  # kept
        assert m.array_field(y[:3]) is not field  # another shape, another form
        for layer in m.layers:
            if layer.bias is not None:
                layer.bias.add_(0.5)
            layer.weight.mul_(1.5)
        field, rule = m.array_field(y), m.array_vjp(y)
        assert torch.allclose(field.tensor(y), ref(y), rtol=1e-12, atol=1e-12)
        assert torch.allclose(torch.from_numpy(rule(y.numpy(), v.numpy())), flat_rule(ref, y, v), rtol=1e-12, atol=1e-12)


# -- nn.Sequential fields of dense layers (odeflux.fields.dense_chain) ----------------------------
class _SubTanh(nn.Tanh):
    pass


def _sequential(act: type = nn.Tanh, seed: int = 0) -> nn.Sequential:
    m = mlp("tanh", final_activation=False, seed=seed)
    mods: list[nn.Module] = []
    for i, layer in enumerate(m.layers):
        mods.append(copy.deepcopy(layer))
        if i < len(m.layers) - 1:
            mods.append(act())
    return nn.Sequential(*mods)


def test_a_dense_sequential_is_recognised_and_anything_else_is_not():
    seq = _sequential()
    chain = dense_chain(seq)
    assert chain is not None and dense_chain(seq) is chain  # kept while the layers stay
    assert [layer is child for layer, child in zip(chain.layers, seq[::2])] == [True] * 3
    assert chain._act_names == ["tanh", "tanh", None]
    y = torch.randn(5, 4, dtype=torch.float64)
    assert torch.allclose(chain(y), seq(y), rtol=1e-13, atol=1e-14)
    seq[2] = nn.Linear(6, 5).double()  # a replaced layer: seen at once
    assert dense_chain(seq) is not chain and dense_chain(seq).layers[1] is seq[2]
    assert dense_chain(_sequential(_SubTanh)) is None  # a subclass may compute something else
    assert dense_chain(nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Tanh())) is None  # two activations
    assert dense_chain(nn.Sequential(nn.Tanh(), nn.Linear(4, 4))) is None
    assert dense_chain(nn.Sequential(nn.Linear(4, 3), nn.Linear(4, 4))) is None  # sizes do not chain
    assert dense_chain(nn.Sequential(nn.Linear(4, 4), nn.GELU())) is None
    hooked = _sequential()
    handle = hooked[1].register_forward_hook(lambda *a: None)
    assert dense_chain(hooked) is None  # the kernels would skip the hook
    handle.remove()
    assert dense_chain(hooked) is not None


@pytest.mark.parametrize("sensealg", [DirectAdjoint, *CONTINUOUS])
def test_a_dense_sequential_takes_the_mlp_kernels_with_the_plain_paths_gradients(sensealg):
    """Through solve and NeuralODE a dense Sequential uses the MLP's rule and NumPy kernels (VJP
    products counted through them), with the gradients of the same field on the plain path."""
    y0 = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = []
    for act in (nn.Tanh, _SubTanh):
        seq = _sequential(act)
        calls = count_rule_calls(dense_chain(seq)) if act is nn.Tanh else None
        y = y0.clone().requires_grad_()
        sol = odeflux.solve(seq, y, (0.0, 1.0), saveat=[0.5, 1.0], sensealg=sensealg(), rtol=1e-8, atol=1e-8)
        (sol.ys**2).sum().backward()
        grads.append(torch.cat([y.grad.reshape(-1)] + [p.grad.reshape(-1) for p in seq.parameters()]))
        if calls is not None:
            assert calls, "the dense chain's rule was not used"
    assert torch.allclose(grads[0], grads[1], rtol=1e-6, atol=1e-9)
