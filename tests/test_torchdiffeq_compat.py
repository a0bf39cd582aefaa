"""``odeflux.compat.torchdiffeq``: torchdiffeq's own test suite run against it, and the same
results as torchdiffeq itself (installed as a test-only dependency) on its API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import torchdiffeq as real
from odeflux.compat import torchdiffeq as compat

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # (conftest.py: tiny ops)

ROOT = Path(__file__).resolve().parents[1]
SUITE = Path(os.environ.get("ODEFLUX_TORCHDIFFEQ_TESTS", ROOT.parent / "shared" / "reference" / "torchdiffeq-tests"))
MODULES = ["api_tests", "event_tests", "gradient_tests", "norm_tests", "odeint_tests"]
# A worker of the suite's run: takes the next module not yet claimed by another worker (an exclusive
# create of <out>/<module>.claim, in the order given: longest first), runs it with unittest in this
# one process (one torch import for all its modules, as the suite's run_all.py does), counting every
# subTest case (unittest reports only failing ones), and writes <out>/<module>.json: cases and the
# failures' names and tracebacks.
RUNNER = """
import json, os, sys, unittest
out, modules = sys.argv[1], sys.argv[2:]
class Counting(unittest.TextTestResult):
    cases = 0
    def addSubTest(self, test, subtest, err):
        Counting.cases += 1
        super().addSubTest(test, subtest, err)
    def addSuccess(self, test):
        Counting.cases += 1
        super().addSuccess(test)
for module in modules:
    try:
        os.close(os.open(os.path.join(out, module + ".claim"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        continue
    Counting.cases = 0
    suite = unittest.defaultTestLoader.loadTestsFromName(module)
    result = unittest.TextTestRunner(resultclass=Counting, verbosity=0).run(suite)
    failed = [(str(t), tb) for t, tb in result.failures + result.errors]
    with open(os.path.join(out, module + ".json"), "w") as f:
        json.dump({"cases": Counting.cases, "tests": result.testsRun, "failed": failed}, f)
"""
# The modules' rough cost (seconds on one core), for the longest-first order of the workers' queue.
COST = {"odeint_tests": 48, "event_tests": 24, "gradient_tests": 18, "norm_tests": 14, "api_tests": 2}
D = torch.float64


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> Path:
    """A package named ``torchdiffeq`` that is odeflux's compatibility module."""
    d = tmp_path_factory.mktemp("shim")
    (d / "torchdiffeq").mkdir()
    (d / "torchdiffeq" / "__init__.py").write_text(
        "from odeflux.compat.torchdiffeq import odeint, odeint_adjoint, odeint_dense, odeint_event  # noqa: F401\n"
    )
    return d


@pytest.fixture(scope="module")
def suite_results(request, shim, tmp_path_factory):
    """torchdiffeq's suite, every module of it this session selected, run once by a worker process
    per core (two on the 2-core CI machine): the modules are independent, and each runs whole in a
    fresh process or after others in one, as in the suite's run_all.py. -> {module: result}."""
    wanted = {
        item.callspec.params["module"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_torchdiffeqs_own_suite_passes"
    }
    modules = sorted(wanted, key=lambda m: -COST.get(m, 0))
    out = tmp_path_factory.mktemp("torchdiffeq-suite")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim), str(ROOT / "src")]), OMP_NUM_THREADS="1")
    n = max(1, min(len(modules), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
    logs = [out / f"worker{i}.log" for i in range(n)]
    procs = []
    try:
        for log in logs:
            with open(log, "w") as f:  # (scipy's LSODA prints its complaints to stdout: kept out of pytest's)
                procs.append(subprocess.Popen([sys.executable, "-c", RUNNER, str(out), *modules], cwd=SUITE, env=env,
                                              stdout=f, stderr=subprocess.STDOUT))  # fmt: skip
        for proc in procs:
            proc.wait(timeout=900)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    tails = "\n".join(f"-- {log.name} (exit {p.returncode}):\n" + log.read_text()[-3000:] for log, p in zip(logs, procs))
    results = {}
    for module in modules:
        f = out / f"{module}.json"
        results[module] = json.loads(f.read_text()) if f.exists() else {"cases": 0, "tests": 0, "failed": [], "log": tails}
    return results


@pytest.mark.slow
@pytest.mark.skipif(not (SUITE / "run_all.py").exists(), reason="torchdiffeq's test suite is not beside the checkout")
@pytest.mark.parametrize("module", MODULES)
def test_torchdiffeqs_own_suite_passes(module, suite_results):
    r = suite_results[module]
    print(f"{module}: {r['tests']} tests, {r['cases']} cases (each subTest), {len(r['failed'])} failing")
    assert "log" not in r, f"{module} did not run to the end:\n{r.get('log')}"
    assert not r["failed"], "\n".join(f"FAIL: {name}\n{tb}" for name, tb in r["failed"][:5])
    assert r["tests"] > 0 and r["cases"] > 0


# -- the same results as torchdiffeq ----------------------------------------------------------


class Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()

    def forward(self, t, y):
        return self.net(y) * torch.cos(t)


@pytest.mark.parametrize("method", ["dopri5", "tsit5", "bosh3", "dopri8", "fehlberg2", "adaptive_heun"])
def test_adaptive_methods_agree_with_torchdiffeq(method):
    f = Field()
    y0 = torch.tensor([[0.5, -1.0], [1.0, 0.2]], dtype=D)
    t = torch.linspace(0.0, 2.0, 7, dtype=D)
    with torch.no_grad():
        try:
            theirs = real.odeint(f, y0, t, method=method, rtol=1e-8, atol=1e-9)
        except ValueError:
            pytest.skip(f"the installed torchdiffeq has no {method}")
        ours = compat.odeint(f, y0, t, method=method, rtol=1e-8, atol=1e-9)
        exact = real.odeint(f, y0, t, method="dopri8", rtol=1e-13, atol=1e-14)
    assert ours.shape == theirs.shape == (7, 2, 2)
    # the same accuracy at the same tolerance, not the same steps
    assert (ours - exact).abs().max() <= max(3 * (theirs - exact).abs().max().item(), 1e-9)


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_fixed_grid_methods_take_torchdiffeqs_steps(method):
    f = Field()
    y0 = torch.tensor([0.5, -1.0], dtype=D)
    t = torch.linspace(0.0, 1.0, 5, dtype=D)
    with torch.no_grad():
        for options in (None, {"step_size": 0.25}):  # on the grid of t, and on a step_size grid landing on t
            ours = compat.odeint(f, y0, t, method=method, options=options)
            theirs = real.odeint(f, y0, t, method=method, options=options)
            assert torch.allclose(ours, theirs, atol=1e-12)


def test_tuple_state_and_gradients_match_torchdiffeq():
    f = Field()
    y0 = (torch.tensor([0.5, -1.0], dtype=D, requires_grad=True), torch.tensor([0.1], dtype=D, requires_grad=True))
    t = torch.tensor([0.0, 0.5, 1.5], dtype=D, requires_grad=True)

    def g(t, y):
        return (f(t, y[0]), -y[1] * y[0].sum())

    grads = []
    for lib in (compat, real):
        for odeint in (lib.odeint, lib.odeint_adjoint):
            kw = {"adjoint_params": tuple(f.parameters())} if odeint is lib.odeint_adjoint else {}
            ys = odeint(g, y0, t, rtol=1e-10, atol=1e-10, **kw)
            assert isinstance(ys, tuple) and ys[0].shape == (3, 2) and ys[1].shape == (3, 1)
            loss = (ys[0] ** 2).sum() + ys[1][-1].sum()
            grads.append(torch.autograd.grad(loss, [*y0, t, *f.parameters()]))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


class Rotating(torch.nn.Module):
    """dy/dt = (-i w0 - w1) y on a complex state: y(t) = y0 exp((-i w0 - w1) t)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, 0.05], dtype=D))
        self.seen: list[torch.dtype] = []

    def forward(self, t, y):
        return (-1j * self.w[0] - self.w[1]) * y

    def callback_accept_step(self, t0, y0, dt):
        self.seen.append(y0.dtype)


def test_complex_states_as_torchdiffeq_takes_them():
    """A complex y0 (torchdiffeq integrates it as it is; odeflux.solve on its real view): the same solution and
    gradients as torchdiffeq's odeint, and the exact ones; odeint_adjoint too (torchdiffeq 0.2.5's
    own adjoint fails on a complex state), events, odeint_dense and step callbacks."""
    y0 = torch.tensor([1.0 + 0.5j, -0.3 + 2j], dtype=torch.complex128, requires_grad=True)
    t = torch.linspace(0.0, 2.0, 5, dtype=D)
    out = {}
    for name, odeint in (("real", real.odeint), ("compat", compat.odeint), ("compat adjoint", compat.odeint_adjoint)):
        f = Rotating()
        ys = odeint(f, y0, t, rtol=1e-10, atol=1e-12)
        assert ys.dtype == torch.complex128 and ys.shape == (5, 2)
        loss = (ys.abs() ** 2).sum() + ys.real.sum()
        out[name] = (ys.detach(), torch.autograd.grad(loss, (y0, f.w)))
        if name.startswith("compat"):
            assert f.seen and set(f.seen) == {torch.complex128}
    exact = y0.detach() * torch.exp(torch.tensor(-1j - 0.05, dtype=torch.complex128) * t.to(torch.complex128)).unsqueeze(1)
    torch.testing.assert_close(out["compat"][0], exact, rtol=0, atol=1e-8)
    for name in ("compat", "compat adjoint"):
        torch.testing.assert_close(out[name][0], out["real"][0], rtol=0, atol=1e-8)
        for a, b in zip(out[name][1], out["real"][1]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
    # The first time the real part of y[0] crosses zero, as torchdiffeq finds it.
    with torch.no_grad():
        event = lambda t, y: y[0].real  # noqa: E731
        t_c, ys_c = compat.odeint_event(Rotating(), y0.detach(), torch.tensor(0.0, dtype=D), event_fn=event)
        t_r, _ = real.odeint_event(Rotating(), y0.detach(), torch.tensor(0.0, dtype=D), event_fn=event)
        assert ys_c.dtype == torch.complex128 and abs(float(ys_c[-1, 0].real)) < 1e-6
        assert float(t_c) == pytest.approx(float(t_r), abs=1e-6)
        dense = compat.odeint_dense(Rotating(), y0.detach(), 0.0, 2.0, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dense(t[1:3]), exact[1:3], rtol=0, atol=1e-8)
    with pytest.raises(TypeError, match="f\\(t, y\\) has dtype torch.float64 where the state's entry is a complex tensor"):
        compat.odeint(lambda t, y: y.real, y0.detach(), t)


def test_reversed_time_matches_torchdiffeq():
    f = Field()
    y0 = torch.tensor([0.5, -1.0], dtype=D)
    t = torch.tensor([2.0, 1.2, 0.0], dtype=D)
    with torch.no_grad():
        assert torch.allclose(compat.odeint(f, y0, t), real.odeint(f, y0, t), atol=1e-7)


def test_odeint_dense_interpolates_the_solve():
    f = Field()
    y0 = torch.tensor([0.5, -1.0], dtype=D)
    with torch.no_grad():
        dense = compat.odeint_dense(f, y0, torch.tensor(0.0, dtype=D), torch.tensor(2.0, dtype=D))
        ts = torch.tensor([0.3, 1.1, 1.9], dtype=D)
        assert torch.allclose(dense(ts), real.odeint(f, y0, torch.cat([torch.zeros(1, dtype=D), ts]))[1:], atol=1e-7)


def test_clear_errors_and_warnings():
    f = lambda t, y: -y  # noqa: E731
    y0 = torch.ones(2)
    with pytest.raises(ValueError, match=r'Invalid method "rk5"\. Must be one of .*dopri5'):
        compat.odeint(f, y0, torch.tensor([0.0, 1.0]), method="rk5")
    with pytest.raises(ValueError, match="strictly increasing or strictly decreasing"):
        compat.odeint(f, y0, torch.tensor([0.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="adjoint_params"):
        compat.odeint_adjoint(f, y0, torch.tensor([0.0, 1.0]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compat.odeint(f, y0, torch.tensor([0.0, 1.0]), options={"not_an_option": 1})
    assert any("Unexpected arguments {'not_an_option'}" in str(w.message) for w in caught)
    # torchdiffeq takes a tolerance per tensor of a tuple state, or per entry: one line here.
    with pytest.raises(ValueError, match=r"rtol per tensor or per entry is not supported .* the tightest \(rtol=1e-05\)"):
        compat.odeint(lambda t, y: (-y[0], -y[1]), (y0, y0), torch.tensor([0.0, 1.0]), rtol=(1e-3, 1e-5))
    with pytest.raises(ValueError, match=r"atol per tensor or per entry is not supported .* \(atol=1e-05\)"):
        compat.odeint(f, y0, torch.tensor([0.0, 1.0]), atol=torch.tensor([1e-3, 1e-5]))


def test_times_that_require_grad_warn_nothing():
    """torchdiffeq's suite passes times that require grad: reading them as numbers must not warn
    from inside (torch's "Converting a tensor with requires_grad=True to a scalar")."""
    t = torch.linspace(1.0, 2.0, 3, dtype=D, requires_grad=True)
    y0 = torch.ones(2, dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compat.odeint(lambda t, y: -y, y0, t)
        compat.odeint(lambda t, y: -y, y0, t, method="euler", options={"step_size": 0.1})
        compat.odeint(lambda t, y: -y, y0, t[:2], event_fn=lambda t, y: y[0] - 0.5)
        compat.odeint_dense(lambda t, y: -y, y0, t[0], t[1])
