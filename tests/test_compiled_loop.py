"""``compile=True`` without autograd: the whole adaptive loop as one compiled program
(:mod:`odeflux.compiled`), against the eager loop.

Each distinct program costs a few seconds to compile, so the cases share fields and shapes
(a new instance of the same field class reuses its program, as torch.compile's guards do).
"""

import math
import warnings

import pytest
import torch
import torch._dynamo
from torch import nn

import odeflux
from conftest import LotkaVolterraRates
from odeflux.compiled import program, program_count
from odeflux.control import HOST, TENSOR, IController, PIController
from odeflux.solution import Status


class TimeMLP(nn.Module):
    """A time-dependent field: concat(y, t) -> 16 -> tanh -> state."""

    def __init__(self, n: int, seed: int, dtype: torch.dtype = torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1, self.l2 = nn.Linear(n + 1, 16), nn.Linear(16, n)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)
        self.to(dtype)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tt = t.expand(y.shape[:-1] + (1,)).to(y.dtype)
        return self.l2(torch.tanh(self.l1(torch.cat([y, tt], -1))))


def _pair(f, y0, span, **kw):
    """The eager and the compiled solve, both under no_grad."""
    with torch.no_grad():
        eager = odeflux.solve(f, y0, span, **kw)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="compile=True", category=RuntimeWarning)  # (no eager fallback)
            compiled = odeflux.solve(f, y0, span, compile=True, **kw)
    return eager, compiled


def _same(eager, compiled, atol=1e-10):
    for name in ("n_steps", "n_accepted", "n_rejected", "n_f_evals"):
        assert getattr(compiled.stats, name) == getattr(eager.stats, name), name
    assert compiled.status == eager.status
    torch.testing.assert_close(compiled.ts, eager.ts, rtol=0, atol=1e-12)
    torch.testing.assert_close(compiled.ys, eager.ys, rtol=0, atol=atol)


@pytest.fixture(autouse=True)
def _quiet_dynamo():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TensorFloat32.*")
        yield


def test_tsit5_saveat_matches_eager_step_for_step_and_reuses_its_program(monkeypatch):
    y0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    saveat = torch.linspace(0.0, 2.0, 17, dtype=torch.float64)
    eager, compiled = _pair(TimeMLP(4, 1), y0, (0.0, 2.0), saveat=saveat, rtol=1e-7, atol=1e-9)
    assert eager.stats.n_steps > 10 and eager.stats.n_rejected > 0  # (a run with rejections)
    _same(eager, compiled)
    # Another field of the same class, the same shapes: its program is reused, not recompiled.
    before, frames = program_count(), torch._dynamo.utils.counters["stats"]["unique_graphs"]
    eager, compiled = _pair(TimeMLP(4, 2), y0, (0.0, 2.0), saveat=saveat, rtol=1e-7, atol=1e-9)
    _same(eager, compiled)
    assert program_count() == before
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    # A solve that runs out of steps stops where the eager one does, with what it saved so far
    # (max_steps is an input of the program, not a constant of it).
    eager, compiled = _pair(TimeMLP(4, 1), y0, (0.0, 2.0), saveat=saveat, rtol=1e-7, atol=1e-9, max_steps=7, throw=False)
    assert compiled.status == Status.MAX_STEPS
    _same(eager, compiled)
    assert 0 < len(compiled.ts) < len(saveat)
    # A new state shape is a new program; past the limit that is said once, in one line.
    monkeypatch.setattr(program, "PROGRAM_LIMIT", program_count())
    monkeypatch.setattr(program, "_THRASH_WARNED", [])
    y1 = torch.randn(5, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match=r"compile=True: \d+ compiled loops in this process, one per field class.*pass compile=False$"):
        compiled = odeflux.solve(TimeMLP(4, 1), y1, (0.0, 2.0), compile=True, saveat=saveat, rtol=1e-7, atol=1e-9)
    with torch.no_grad():
        eager = odeflux.solve(TimeMLP(4, 1), y1, (0.0, 2.0), saveat=saveat, rtol=1e-7, atol=1e-9)
    _same(eager, compiled)
    assert program_count() == before + 1


def test_backwards_in_time_with_an_integral_controller_and_dopri5():
    y0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    eager, compiled = _pair(
        TimeMLP(3, 5), y0, (1.0, -0.5), solver=odeflux.Dopri5(), controller=IController(), rtol=1e-6, atol=1e-8
    )
    assert eager.ts.tolist() == [1.0, -0.5]
    _same(eager, compiled)


def test_fixed_steps_without_fsal():
    y0 = torch.randn(2, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    saveat = torch.tensor([0.0, 0.25, 0.3, 1.0], dtype=torch.float64)
    eager, compiled = _pair(TimeMLP(3, 7), y0, (0.0, 1.0), solver=odeflux.RK4(), dt0=0.1, saveat=saveat)
    assert eager.stats.n_steps == 10
    _same(eager, compiled, atol=1e-12)


def test_float32_agrees_to_the_tolerance():
    """In float32 the compiler's fused arithmetic rounds otherwise than eager ops, and a step's
    error estimate (differences of stages) carries that rounding: step sizes drift apart by
    float32 round-off, so the steps agree in number within one and the states to tolerance."""
    y0 = torch.randn(8, 4, generator=torch.Generator().manual_seed(8))
    saveat = torch.linspace(0.0, 1.5, 30)
    eager, compiled = _pair(TimeMLP(4, 9, torch.float32), y0, (0.0, 1.5), saveat=saveat, rtol=1e-4, atol=1e-6)
    assert abs(compiled.stats.n_steps - eager.stats.n_steps) <= 1
    torch.testing.assert_close(compiled.ys, eager.ys, rtol=1e-3, atol=1e-4)


class _BlowUp(nn.Module):
    """y' = y^2 from y0 = 1: y = 1 / (1 - t), infinite at t = 1."""

    def forward(self, t, y):
        return y * y


def test_a_solve_that_fails_reports_what_the_eager_one_does():
    y0 = torch.ones(2, dtype=torch.float64)
    eager, compiled = _pair(_BlowUp(), y0, (0.0, 2.0), throw=False)
    assert eager.status in (Status.DT_MIN, Status.NONFINITE, Status.MAX_STEPS)
    assert compiled.status == eager.status
    assert compiled.message == eager.message
    assert compiled.t_final == pytest.approx(eager.t_final, rel=1e-12)
    assert compiled.stats.n_steps == eager.stats.n_steps


def test_the_start_inside_the_program_matches_the_eager_start():
    """The first step size is chosen inside the program (Hairer's estimate, or dt0), from the
    step limits given or not, as the eager integrator chooses it on the host."""
    inf_start = torch.full((2,), 1e200, dtype=torch.float64)  # f(t0, y0) = inf: no first step size
    eager, compiled = _pair(_BlowUp(), inf_start, (0.0, 2.0), throw=False)
    assert eager.status == Status.NONFINITE and eager.stats.n_steps == 0
    _same(eager, compiled)
    assert compiled.message == eager.message
    # (dt0's start: test_fixed_steps_without_fsal.)
    eager, compiled = _pair(_BlowUp(), torch.ones(2, dtype=torch.float64), (0.0, 0.5), rtol=1e-8, atol=1e-8, dtmax=0.01, dtmin=1e-3)
    _same(eager, compiled)


class _GraphBreak(nn.Module):
    def forward(self, t, y):
        if bool(y.sum() > 0):  # a branch on data: torch.compile cannot keep it in one graph
            return -y
        return y


def test_a_field_the_compiler_refuses_gets_one_line_and_runs_eagerly():
    y0 = torch.ones(3, dtype=torch.float64)
    with torch.no_grad():
        eager = odeflux.solve(_GraphBreak(), y0, (0.0, 1.0))
        with pytest.warns(RuntimeWarning, match=r"compile=True: the field could not be compiled as one program \(.+\); this solve runs eagerly") as rec:
            compiled = odeflux.solve(_GraphBreak(), y0, (0.0, 1.0), compile=True)
    assert len([w for w in rec if "could not be compiled" in str(w.message)]) == 1
    assert "\n" not in str(rec[0].message) and "data-dependent" in str(rec[0].message)
    torch.testing.assert_close(compiled.ys, eager.ys)
    # Said once: the same field's code is not tried again, as a loop or step by step.
    y1 = y0.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with torch.no_grad():
            again = odeflux.solve(_GraphBreak(), y0, (0.0, 1.0), compile=True)
        sol = odeflux.solve(_GraphBreak(), y1, (0.0, 1.0), compile=True)
    torch.testing.assert_close(again.ys, eager.ys)
    torch.testing.assert_close(sol.ys.detach(), eager.ys)


class _GraphBreakToo(_GraphBreak):
    pass


def test_under_autograd_a_refused_field_also_gets_one_line():
    y0 = torch.ones(3, dtype=torch.float64)
    with torch.no_grad():
        eager = odeflux.solve(_GraphBreakToo(), y0, (0.0, 1.0))
    y1 = y0.clone().requires_grad_(True)
    # (The gradient's forward solve runs outside autograd, as one program: that is where it is said.)
    with pytest.warns(RuntimeWarning, match=r"could not be compiled (in one step|as one program) \(.+\); this solve runs eagerly"):
        sol = odeflux.solve(_GraphBreakToo(), y1, (0.0, 1.0), compile=True)
    torch.testing.assert_close(sol.ys.detach(), eager.ys)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        sol = odeflux.solve(_GraphBreakToo(), y1, (0.0, 1.0), compile=True)
    torch.testing.assert_close(sol.ys.detach(), eager.ys)


def test_under_autograd_compile_takes_the_compiled_step_and_its_gradient_is_eagers():
    """torch 2.13 differentiates torch.while_loop wrongly, so a differentiated solve never runs
    the compiled loop: its gradient is the eager one's."""
    rate = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64, requires_grad=True)
    before = program_count()
    grads = []
    for compile in (False, True):
        sol = odeflux.solve(lambda t, y: -rate * torch.sin(y) * (1 + t), y0, (0.0, 1.0), rtol=1e-8, atol=1e-10, compile=compile)
        grads.append(torch.autograd.grad(sol.ys[-1].square().sum(), [y0, rate]))
    assert program_count() == before
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("controller", [PIController(), IController(), IController(shrink_accepted=False, min_step=1e-3)])
def test_controller_rules_agree_on_host_floats_and_tensors(controller):
    """One rule, two kinds of numbers: the compiled loop's decisions are the eager loop's."""
    state = controller.init_state()
    for dt in (1e-4, 0.3):
        for err in (0.0, 1e-12, 0.37, 1.0, 1.0000001, 3.5, 1e6, math.inf, math.nan):
            host = controller.rule(dt, err, 1e-4 if state is None else 0.25, 5, HOST)
            d = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
            tens = controller.rule(d(dt), d(err), None if state is None else d(0.25), 5, TENSOR)
            assert bool(tens[0]) == bool(host[0]), (dt, err)
            assert float(tens[1]) == pytest.approx(host[1], rel=1e-15), (dt, err)
            if state is not None:
                assert float(tens[2]) == pytest.approx(host[2], rel=1e-15), (dt, err)


_LotkaVolterra = LotkaVolterraRates


def test_forward_sensitivity_is_one_compiled_program_with_the_eager_gradient():
    """ForwardSensitivity integrates (y, dy/dtheta) outside autograd: with compile=True that
    whole solve, tangents included, is one compiled loop, and the gradient is the eager one's."""
    f = _LotkaVolterra()
    y0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    saveat = torch.linspace(0.0, 5.0, 40, dtype=torch.float64)
    grads, stats = [], []
    for compile in (False, True):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="compile=True", category=RuntimeWarning)
            sol = odeflux.solve(
                f, y0, (0.0, 5.0), saveat=saveat, rtol=1e-7, atol=1e-9, compile=compile,
                sensealg=odeflux.ForwardSensitivity(tangents="forward"),
            )  # fmt: skip
        grads.append(torch.autograd.grad(sol.ys.square().sum(), f.rates)[0])
        stats.append(sol.stats)
    assert stats[0].n_steps == stats[1].n_steps and stats[0].n_f_evals == stats[1].n_f_evals
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=0)
    direct = odeflux.solve(f, y0, (0.0, 5.0), saveat=saveat, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[1], torch.autograd.grad(direct.ys.square().sum(), f.rates)[0], rtol=1e-5, atol=0)


def _decay(t, y, rate):
    return -rate * y


def test_args_and_closures_made_anew_key_one_program():
    """A program is keyed by the field's code (the key its cache and refusals use): args bound
    anew, or a closure made for each solve, map to one key; another field's code to another."""
    from odeflux.compiled.program import code_key
    from odeflux.problem import bind_args

    keys = {code_key(bind_args(_decay, torch.tensor(r))) for r in (0.5, 1.5)}
    closures = []
    for r in (0.5, 1.5):
        k = torch.tensor(r)
        closures.append(code_key(lambda t, y: -k * y))
    assert len(keys) == 1 and len(set(closures)) == 1 and keys != set(closures)
    assert code_key(TimeMLP(2, 0)) == code_key(TimeMLP(3, 1)) != code_key(_BlowUp())
    assert code_key(_BlowUp().forward) == _BlowUp.forward.__code__


def test_zero_d_arguments_cost_no_second_trace():
    """A program's 0-d float64 and int64 arguments (tolerances, step limits, max_steps, a scalar
    parameter in its dict) reach it as one-entry tensors made 0-d inside: dynamo takes a 0-d CPU
    tensor for a number and, unable to make it a tensor again, traces the whole program twice.
    Inside, each is the same 0-d tensor (its type promotion too: a float32 state stays float32)."""
    import torch._dynamo.utils as dynamo_utils

    def source(y, rtol, params, pair):
        out = y.abs() * rtol + params["p"] * pair[1]
        return out, torch.stack([rtol.new_tensor(rtol.dim()), rtol, pair[0].double()]), params["n"] + 1

    y = torch.randn(3, dtype=torch.float32)
    args = (y, torch.full((), 1e-3, dtype=torch.float64), {"p": torch.tensor(0.5, dtype=torch.float64), "n": torch.tensor(7)},
            (torch.tensor(3), torch.tensor(2.0, dtype=torch.float64)))  # fmt: skip
    attempts = {}
    for name, fn in [
        ("plain", torch.compile(source, fullgraph=True, dynamic=False, backend="aot_eager")),
        ("lifted", program.compile_lifting_scalars(source, "lifting_test", fullgraph=True, dynamic=False, backend="aot_eager")),
    ]:  # fmt: skip
        dynamo_utils.compilation_time_metrics.clear()
        got = fn(*args)
        attempts[name] = sum(1 for k in dynamo_utils.compilation_time_metrics if k.startswith("compile_attempt_"))
        for a, b in zip(got, source(*args)):
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert attempts == {"plain": 2, "lifted": 1}
