"""The tutorial's type-stability section, in PyTorch terms: the per-step work traces as one graph.

Lux checks ``@code_warntype`` for a concretely inferred return type; here the solver's step on
the tutorial's vector field must trace under ``torch.compile(fullgraph=True)`` without a graph
break, and the compiled step must compute what the eager one does.
"""

import math

import pytest
import torch
import torch._dynamo

from odeflux.integrator import rk_step_with_error
from odeflux.mnist.model import create_model, vector_field
from odeflux.nn import VectorField
from odeflux.solvers import Tsit5


@pytest.fixture()
def step_args():
    torch._dynamo.reset()
    f = VectorField(vector_field(torch.Generator().manual_seed(0)))
    solver = Tsit5()
    y = torch.randn(128, 20, generator=torch.Generator().manual_seed(1))
    t = torch.zeros(())
    co = solver.coefficients(y.dtype, y.device)
    with torch.no_grad():
        k = f(t, y)
    yield solver, f, t, y, 0.1, k, co, 1e-3, 1e-3, None
    torch._dynamo.reset()


def test_vector_field_and_step_have_no_graph_break(step_args):
    explanation = torch._dynamo.explain(rk_step_with_error)(*step_args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_fullgraph_compile_of_the_step_matches_eager(step_args):
    compiled = torch.compile(rk_step_with_error, fullgraph=True)
    with torch.no_grad():
        got = compiled(*step_args)
        ref = rk_step_with_error(*step_args)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_model_matches_eager():
    """``create_model(compile=True)`` (``odeflux train --compile``) gives the eager model's outputs."""
    torch._dynamo.reset()
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    eager = create_model(sensealg="direct", params="tree")
    compiled = create_model(sensealg="direct", params="tree", compile=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


_STRICT_WARNINGS = """
import torch, odeflux
from odeflux import torch_imports
torch_imports.compiler()
import torch._inductor.compile_fx  # (what torch.compile imports; warned at import in torch 2.13)
p = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
sol = odeflux.solve(lambda t, y, a: -a * y, torch.ones(2, dtype=torch.float64), (0.0, 1.0), args=p,
                    sensealg=odeflux.ForwardSensitivity(), rtol=1e-9, atol=1e-9)
sol.ys[-1].sum().backward()
print(float(p.grad))
"""


def test_warnings_as_errors_leave_compile_and_forward_mode_working():
    """torch 2.13 warns (DeprecationWarning) while importing Inductor and forward-mode AD's
    decompositions; under warnings as errors a compile=True solve would fail to compile and a
    ForwardSensitivity gradient raise from inside torch. odeflux.torch_imports imports them
    quietly first (each torch.compile site and forward mode call it). A fresh process: the
    imports happen once per process."""
    import os
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", _STRICT_WARNINGS],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split()[-1]) == pytest.approx(-2 * math.exp(-0.5), rel=1e-6)  # d/da of 2 exp(-a)
