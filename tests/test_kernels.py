"""The step kernels behind the seam (odeflux.kernels): the NumPy step against the torch step,
solves under no_grad against scipy, and the fields' array forms against the module."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CLASSIC, PROBLEMS
from torch import nn

import odeflux
from odeflux.control import initial_step
from odeflux.kernels import NumpyStepKernel, TorchStepKernel, arrays
from odeflux.kernels.dense_layers import Kernels, StagePlan
from odeflux.solvers import RK_SOLVERS as SOLVERS  # the NumPy kernel runs their tableaus


def field(t, y):
    return torch.sin(y) * torch.cos(t) - 0.3 * y


@pytest.mark.parametrize("n", [None, ((0, 3),), ((0, 8), (8, 20))], ids=["norm", "seminorm", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", [name for name in SOLVERS if SOLVERS[name].tableau_steps])  # (the NumPy kernel runs explicit tableaus)
def test_numpy_step_matches_torch_step(name, dtype, n):
    solver = SOLVERS[name]()
    g = torch.Generator().manual_seed(0)
    y = torch.randn(4, 5, generator=g, dtype=dtype)
    t = torch.tensor(0.3, dtype=dtype)
    k = field(t, y)
    with torch.no_grad():
        assert arrays.state_applies(y)
        # A long step, so that the error estimate (a difference of near-equal sums) is well above
        # float32's round-off, which the two summation orders would otherwise show.
        ref = TorchStepKernel(field, solver, y, 1e-4, 1e-5, n, False, False).step(0.3, y, 0.8, k)
        out = NumpyStepKernel(field, solver, y, 1e-4, 1e-5, n, False, None, None).step(0.3, y, 0.8, k)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-14)
    assert out[0].shape == y.shape and out[0].dtype == dtype and torch.allclose(out[0], ref[0], **tol)
    assert out[1].shape == ref[1].shape and torch.allclose(out[1], ref[1], **tol)
    if ref[2] is None:
        assert out[2] is None
    else:
        # The estimate is a difference of near-equal sums: its float32 round-off, relative to it,
        # grows with the stages summed (Dopri8's 12) and shrinks with the block's size.
        rel = (1e-2 if solver.tableau.stages > 7 else 1e-3) if dtype == torch.float32 else 1e-10
        assert isinstance(out[2], float) and out[2] == pytest.approx(float(ref[2]), rel=rel)


def test_numpy_step_is_used_only_outside_autograd_on_small_cpu_states():
    y = torch.zeros(10)
    assert not arrays.state_applies(y)  # grad mode: the discrete adjoint may need the graph
    with torch.no_grad():
        assert arrays.state_applies(y)
        assert not arrays.state_applies(torch.zeros(arrays.MAX_STATE_SIZE + 1))
        assert not arrays.state_applies(torch.zeros(10, dtype=torch.float16))
        assert not arrays.state_applies(torch.zeros(0))


@pytest.mark.parametrize("name", CLASSIC)
def test_solves_under_no_grad_match_scipy_and_the_torch_path(name):
    p = PROBLEMS[name]
    y0 = torch.tensor(p.y0, dtype=torch.float64)
    ts = np.linspace(*p.t_span, 5)[1:]
    with torch.no_grad():
        fast = odeflux.solve(p.f, y0, p.t_span, saveat=list(ts), rtol=1e-10, atol=1e-10)
    slow = odeflux.solve(p.f, y0, p.t_span, saveat=list(ts), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(fast.ys.numpy(), p.reference(ts), rtol=1e-6, atol=1e-7)
    assert fast.stats.n_steps == slow.stats.n_steps
    np.testing.assert_allclose(fast.ys.numpy(), slow.ys.numpy(), rtol=1e-11, atol=1e-12)


def mlp() -> odeflux.MLP:
    g = torch.Generator().manual_seed(0)
    layers = [nn.Linear(6, 8), nn.Linear(8, 6)]
    with torch.no_grad():
        for p in (q for m in layers for q in m.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    return odeflux.MLP(layers)


def test_array_evaluation_matches_the_module_and_respects_hooks():
    vf = odeflux.VectorField(mlp())
    y = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast = vf.array_field(y)
        assert fast is not None
        out = np.empty(y.numel(), dtype=np.float32)
        fast.evaluate(0.0, y.numpy().reshape(-1), out)
        assert torch.allclose(torch.from_numpy(out).view(y.shape), vf(0.0, y), rtol=1e-6, atol=1e-7)
        seen = []
        handle = vf.module.register_forward_hook(lambda *a: seen.append(1))
        assert vf.array_field(y) is None  # an array evaluation would skip the hook
        odeflux.solve(vf, y, (0.0, 1.0))
        assert seen  # so the solve called the module, hooks and all
        handle.remove()
    vf.module.use_vjp_rule = False
    assert vf.array_vjp(y) is None


def test_neural_ode_gives_the_same_training_gradient_with_and_without_the_numpy_kernels():
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(2))
    grads = []
    for kernels in (True, False):
        m = mlp()
        m.small_cpu_kernels = kernels
        node = odeflux.NeuralODE(m, tspan=(0.0, 1.0), rtol=1e-6, atol=1e-6)
        node(x).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("n", [None, ((0, 4),), ((0, 6), (6, 15))], ids=["norm", "seminorm", "mixed"])
def test_numpy_initial_step_matches_torch(n):
    """Hairer's start from the NumPy kernel's norms against the torch kernel's."""
    y0 = torch.randn(3, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    f0 = field(torch.tensor(0.0, dtype=torch.float64), y0)
    solver = odeflux.Tsit5()
    torch_k = TorchStepKernel(field, solver, y0, 1e-6, 1e-8, n, False, False)
    numpy_k = NumpyStepKernel(field, solver, y0, 1e-6, 1e-8, n, False, None, None)
    ref = initial_step(torch_k.norms(0.0, y0, f0), 0.0, 1.0, 5, 10.0)
    with torch.no_grad():
        out = initial_step(numpy_k.norms(0.0, y0, f0), 0.0, 1.0, 5, 10.0)
    assert out[1] == ref[1] == 1 and out[0] == pytest.approx(ref[0], rel=1e-12)


def test_initial_step_through_a_fields_arrays_matches_torch():
    """A field's array form gives the initial step the module gives through torch's ops."""
    m = odeflux.VectorField(odeflux.MLP([nn.Linear(5, 7), nn.Linear(7, 5)], "tanh").double())
    y0 = torch.randn(3, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    f0 = m(torch.tensor(0.0, dtype=torch.float64), y0).detach()
    solver = odeflux.Tsit5()
    ref = initial_step(TorchStepKernel(m, solver, y0, 1e-6, 1e-8, None, False, False).norms(0.0, y0, f0), 0.0, 1.0, 5, 10.0)
    with torch.no_grad():
        array_f = m.array_field(y0)
        assert array_f is not None
        kernel = NumpyStepKernel(m, solver, y0, 1e-6, 1e-8, None, False, array_f, None)
        out = initial_step(kernel.norms(0.0, y0, f0), 0.0, 1.0, 5, 10.0)
    assert out[1] == ref[1] == 1 and out[0] == pytest.approx(ref[0], rel=1e-12)


def _mlp_field(dtype=torch.float64) -> odeflux.VectorField:
    g = torch.Generator().manual_seed(11)
    layers = [nn.Linear(3, 8), nn.Linear(8, 3)]
    with torch.no_grad():
        for p in (q for m in layers for q in m.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    return odeflux.VectorField(odeflux.MLP(layers, "tanh").to(dtype))


def test_dense_output_on_numpy_matches_torch():
    y0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        sol = odeflux.solve(_mlp_field(), y0, (0.0, 2.0), dense=True, rtol=1e-8, atol=1e-8)
        assert sol.dense.on_arrays
        ts = np.linspace(0.0, 2.0, 13)
        fast = torch.stack([sol.dense.at(float(t)) for t in ts])
    slow = torch.stack([sol.dense.at(float(t)) for t in ts])  # grad mode: torch's addmm
    assert torch.allclose(fast, slow, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(slow.numpy(), sol.dense.evaluate(list(ts)).numpy(), rtol=1e-13, atol=1e-14)


def test_dense_output_at_many_times_matches_one_at_a_time():
    """at_arrays (the adjoints' stage batches) against evaluate, inside one step and across steps."""
    y0 = torch.randn(4, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with torch.no_grad():
        sol = odeflux.solve(_mlp_field(), y0, (0.0, 2.0), dense=True, rtol=1e-6, atol=1e-6)
        d = sol.dense
        assert d.on_arrays and len(d) > 3
        inside = [d.t_starts[1] + f * d.dts[1] for f in (0.1, 0.5, 0.9, 1.0)]
        across = [0.0, 0.3, 1.1, 1.7, 2.0]
        for ts in (inside, across, across[::-1]):
            got = d.at_arrays(ts).reshape((len(ts),) + tuple(y0.shape))
            np.testing.assert_allclose(got, d.evaluate(ts).numpy(), rtol=1e-13, atol=1e-14)
        sol32 = odeflux.solve(_mlp_field(torch.float32), y0.float(), (0.0, 2.0), dense=True, rtol=1e-6, atol=1e-6)
        assert sol32.dense.on_arrays
        got32 = sol32.dense.at_arrays(across)  # float32 all through: the powers and coefficients too
        assert got32.dtype == np.float32
        np.testing.assert_allclose(got32.reshape((len(across),) + tuple(y0.shape)), sol32.dense.evaluate(across).numpy(),
                                   rtol=2e-6, atol=2e-6)  # fmt: skip


@pytest.mark.parametrize("vjp", ["func", "jacobian"])
def test_torch_func_transforms_see_torch_ops(vjp):
    """Under torch.func transforms (the func and jacobian VJP backends) the kernels step aside: the
    tutorial field's gradients through them match the default's."""
    from odeflux.mnist.model import create_model

    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    grads = []
    for backend in ("autograd", vjp):
        model = create_model(vjp=backend, params="flat")
        model(x).pow(2).sum().backward()
        grads.append(model.flat.grad)
    # Float32 through two differently ordered sums: elements near 0 carry round-off of the
    # gradient's scale (~10 here), so the absolute part is a few eps of that.
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_forward_mode_and_vmap_are_not_dropped():
    m = mlp()
    y = torch.randn(5, 6, generator=torch.Generator().manual_seed(3))
    t = torch.randn(5, 6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        _, jvp = torch.func.jvp(m, (y,), (t,))
        ref = odeflux.MLP(list(m.layers), small_cpu_kernels=False)
        _, jvp_ref = torch.func.jvp(ref, (y,), (t,))
        assert torch.allclose(jvp, jvp_ref, rtol=1e-5, atol=1e-6) and jvp.abs().sum() > 0
        import torch.autograd.forward_ad as fwAD

        with fwAD.dual_level():
            out = m(fwAD.make_dual(y, t))
            assert torch.allclose(fwAD.unpack_dual(out).tangent, jvp_ref, rtol=1e-5, atol=1e-6)
        assert torch.allclose(torch.func.vmap(m)(y.unsqueeze(1)).squeeze(1), ref(y), rtol=1e-5, atol=1e-6)


def test_kernels_step_aside_for_autocast_subclasses_and_sparse_states():
    m = mlp()
    y = torch.randn(8, 6)
    with torch.no_grad():
        assert m._numpy_kernels(y) is not None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert m._numpy_kernels(y) is None and not arrays.state_applies(y)
            assert m(y).dtype == torch.bfloat16  # torch's autocast semantics, kept

        class Tagged(torch.Tensor):
            pass

        assert m._numpy_kernels(y.as_subclass(Tagged)) is None
        assert not arrays.readable(y.to_sparse())
        assert m._numpy_kernels(torch.zeros(0, 6)) is None
        assert m(torch.zeros(6)).shape == (6,)  # a single state: one row


def _plan_mlp(activation: str, final_activation: bool, dtype) -> odeflux.MLP:
    g = torch.Generator().manual_seed(3)
    layers = [nn.Linear(4, 6), nn.Linear(6, 5, bias=False), nn.Linear(5, 4)]
    with torch.no_grad():
        for p in (q for layer in layers for q in layer.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.7)
    return odeflux.MLP(layers, activation, final_activation=final_activation).to(dtype)


@pytest.mark.parametrize("negate", [False, True])
@pytest.mark.parametrize("final_activation", [True, False])
@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu", "identity"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stage_plan_matches_the_rule_state_by_state(activation, final_activation, negate, dtype):
    """StagePlan (the adjoint steps' batched VJP) against the per-state rule and the autograd
    engine: each state's v^T df/dy as it comes, then the parameter products per state (into
    strided rows, as the adjoint step writes them) and summed."""
    m = _plan_mlp(activation, final_activation, dtype)
    gen = torch.Generator().manual_seed(4)
    n_states, shape = 5, (3, 4)
    ys = torch.randn((n_states,) + shape, generator=gen, dtype=dtype)
    vs = torch.randn((n_states,) + shape, generator=gen, dtype=dtype)
    rule = m.array_vjp(ys[0])
    plan = rule.stage_plan(ys.reshape(n_states, -1).numpy(), negate)
    n, n_p = ys[0].numel(), sum(p.numel() for p in m.parameters())
    rows = np.full((n_states, n + n_p + 3), np.nan, dtype=ys.numpy().dtype)  # wider rows: strided views
    for j in (4, 2, 3, 0, 1):  # any order
        plan.stage(j, vs[j].numpy().reshape(-1), rows[j, :n])
    plan.params_into(rows[:, n : n + n_p])
    total = np.empty(n_p, dtype=rows.dtype)
    plan.params_total(total)
    rtol, atol = (1e-5, 1e-5) if dtype == torch.float32 else (1e-12, 1e-13)  # float32: a few eps of the scale (~3)
    sign = -1.0 if negate else 1.0
    for j in range(n_states):
        y = ys[j].clone().requires_grad_()
        ref = torch.autograd.grad(m(y), [y, *m.parameters()], vs[j])
        ref = sign * torch.cat([r.reshape(-1) for r in ref]).numpy()
        np.testing.assert_allclose(rows[j, : n + n_p], ref, rtol=rtol, atol=atol)
        np.testing.assert_allclose(rows[j, : n + n_p], rule(ys[j].numpy(), vs[j].numpy(), negate=negate), rtol=rtol, atol=atol)
    assert np.isnan(rows[:, n + n_p :]).all()  # nothing written past the rows' parameter part
    np.testing.assert_allclose(total, rows[:, n : n + n_p].sum(0), rtol=rtol, atol=atol)


ADJOINTS_WITH_PLANS = {
    "interpolating": lambda: odeflux.InterpolatingAdjoint(),
    "interpolating-seminorm": lambda: odeflux.InterpolatingAdjoint(seminorm=True),
    "gauss": lambda: odeflux.GaussAdjoint(),
    "quadrature": lambda: odeflux.QuadratureAdjoint(),
}


@pytest.mark.parametrize("method", list(ADJOINTS_WITH_PLANS))
@pytest.mark.parametrize("solver", ["tsit5", "dopri5", "bs3", "heun"])  # heun: no FSAL
def test_adjoint_steps_through_the_stage_plan_as_through_the_engine(solver, method, monkeypatch):
    """The adjoints' planned steps (lambda per stage, the field's pass and mu's parts batched; the
    Gauss and quadrature nodes batched too) give the gradients the engine's per-call products
    give, over several saved times. (Heun, of order 2, at a looser tolerance: its 700 forward and
    up to 2900 adjoint steps at 1e-7 check nothing 80 and 160-310 steps do not.)"""
    from odeflux.sensitivity import rhs

    steps, plans = [], []
    plan_step = rhs._PlannedRHS.plan_step
    monkeypatch.setattr(rhs._PlannedRHS, "plan_step", lambda self, t, h: steps.append(1) or plan_step(self, t, h))
    params_into = StagePlan.params_into
    monkeypatch.setattr(StagePlan, "params_into", lambda self, out: plans.append(1) or params_into(self, out))
    y0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    tol = 1e-5 if solver == "heun" else 1e-7
    out = []
    for rule in (True, False):
        m = _plan_mlp("tanh", True, torch.float64)
        m.use_vjp_rule = rule
        y = y0.clone().requires_grad_()
        sol = odeflux.solve(odeflux.VectorField(m), y, (0.0, 1.0), solver=SOLVERS[solver](), saveat=[0.2, 0.6, 1.0],
                            sensealg=ADJOINTS_WITH_PLANS[method](), rtol=tol, atol=tol)  # fmt: skip
        (sol.ys**3).sum().backward()
        out.append(torch.cat([y.grad.reshape(-1)] + [p.grad.reshape(-1) for p in m.parameters()]))
        if rule:  # every adjoint step was planned, and mu's parts came from plans
            assert len(steps) == sol.backward_stats.n_steps > 3 and plans
            n_plans = len(plans)
    assert len(plans) == n_plans  # without the rule, no plans
    assert torch.allclose(out[0], out[1], rtol=1e-10, atol=1e-12), float((out[0] - out[1]).abs().max())


# -- NumPy's BLAS on one thread while the kernels run ---------------------------------------------
def _blas():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    libs = threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers
    if not libs:
        pytest.skip("threadpoolctl finds no BLAS library behind NumPy here")
    return threadpoolctl, libs


@pytest.fixture
def two_blas_threads():
    """The BLAS libraries the hold drives (those loaded at its first use, NumPy's among them) set to
    2 threads for the test, so that holding them to one shows; restored after."""
    threadpoolctl, _ = _blas()
    libs = arrays.one_blas_thread._controllers()
    assert libs  # threadpoolctl sees a BLAS, so the hold drives it
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        assert all(lib.get_num_threads() == 2 for lib in libs)
        yield libs


def test_one_blas_thread_holds_blas_to_one_thread_and_restores_it(two_blas_threads):
    libs = two_blas_threads
    with arrays.one_blas_thread:
        assert [lib.get_num_threads() for lib in libs] == [1] * len(libs)
        with arrays.one_blas_thread:  # nested: still one, and the inner exit does not restore
            pass
        assert [lib.get_num_threads() for lib in libs] == [1] * len(libs)
    assert [lib.get_num_threads() for lib in libs] == [2] * len(libs)
    with pytest.raises(RuntimeError, match="boom"), arrays.one_blas_thread:
        raise RuntimeError("boom")
    assert [lib.get_num_threads() for lib in libs] == [2] * len(libs)  # restored on an exception too


@pytest.mark.parametrize("sensealg", ["interpolating", "gauss", "direct"])
def test_numpy_kernels_run_on_one_blas_thread_in_solves_and_backward_passes(two_blas_threads, sensealg, monkeypatch):
    """The NumPy kernels (the field's passes, the RK step) see one BLAS thread in the forward solve
    and in the backward pass (a continuous adjoint's solve, DirectAdjoint's hand-written reverse
    pass); the user's own NumPy work before and after keeps its threads."""
    libs = two_blas_threads
    seen = []
    forward, step = Kernels.forward, NumpyStepKernel.step
    monkeypatch.setattr(Kernels, "forward", lambda *a, **k: seen.append(libs[0].get_num_threads()) or forward(*a, **k))
    monkeypatch.setattr(NumpyStepKernel, "step", lambda *a: seen.append(libs[0].get_num_threads()) or step(*a))
    field_ = odeflux.MLP([nn.Linear(4, 8), nn.Linear(8, 4)], "tanh")
    alg = {"interpolating": odeflux.InterpolatingAdjoint(), "gauss": odeflux.GaussAdjoint(),
           "direct": odeflux.DirectAdjoint()}[sensealg]  # fmt: skip
    y = torch.randn(16, 4, requires_grad=True)
    out = odeflux.NeuralODE(field_, sensealg=alg)(y)
    n_forward = len(seen)
    assert libs[0].get_num_threads() == 2
    out.square().sum().backward()
    assert libs[0].get_num_threads() == 2 and y.grad is not None
    if sensealg != "direct":  # (DirectAdjoint records the forward through torch's ops)
        assert n_forward > 0
    assert len(seen) > n_forward and set(seen) == {1}


def test_the_kernel_is_chosen_once_per_solve_from_typed_facts():
    """choose_step_kernel: the NumPy kernel only for a small, readable CPU state outside autograd
    whose right-hand side has array forms (compile=True or not); torch's for everything else."""
    import torch.autograd.forward_ad as fwAD

    from odeflux.kernels import choose_step_kernel

    vf = _mlp_field(torch.float32)
    y = torch.randn(8, 3)
    solver = odeflux.Tsit5()

    def kernel(f, y0, compiled=False):
        return type(choose_step_kernel(f, y0, solver, rtol=1e-3, atol=1e-6, parts=None, float_time=True, compiled=compiled))

    with torch.no_grad():
        assert kernel(vf, y) is NumpyStepKernel
        assert kernel(field, y) is TorchStepKernel  # a plain callable: no array forms
        # compile=True keeps a field's array form: faster than the compiled loop on a small CPU state.
        assert kernel(vf, y, compiled=True) is NumpyStepKernel
        assert kernel(field, y, compiled=True) is TorchStepKernel
        assert kernel(vf, torch.randn(arrays.MAX_STATE_SIZE // 3 + 1, 3)) is TorchStepKernel  # large
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert kernel(vf, y) is TorchStepKernel
        with fwAD.dual_level():
            assert kernel(vf, fwAD.make_dual(y, torch.ones_like(y))) is TorchStepKernel  # its tangent would be dropped
        seen = []
        torch.func.vmap(lambda row: seen.append(kernel(vf, row.reshape(1, 3))) or row)(y)
        assert seen == [TorchStepKernel]  # a transform's wrapper has no memory for NumPy
    assert kernel(vf, y) is TorchStepKernel  # grad mode: the discrete adjoint may need the graph


def test_compile_true_on_a_field_with_array_forms_runs_its_numpy_kernel():
    """solve(..., compile=True) outside autograd on a dense nn.Sequential and a small CPU state:
    the NumPy kernel (no compiled program built), the eager solve's result exactly."""
    from odeflux.compiled import program_count

    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    y0 = torch.randn(5, 3)
    before = program_count()
    with torch.no_grad():
        eager = odeflux.solve(seq, y0, (0.0, 1.0), saveat=torch.linspace(0, 1, 4))
        compiled = odeflux.solve(seq, y0, (0.0, 1.0), saveat=torch.linspace(0, 1, 4), compile=True)
    assert program_count() == before
    assert compiled.stats == eager.stats
    torch.testing.assert_close(compiled.ys, eager.ys, rtol=0, atol=0)
