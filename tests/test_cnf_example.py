"""The CNF example (examples/cnf_two_moons.py): its log-density against a closed form, and its
gradients under the continuous adjoints against DirectAdjoint, for both trace estimators."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import odeflux

PATH = Path(__file__).resolve().parents[1] / "examples" / "cnf_two_moons.py"


@pytest.fixture(scope="module")
def cnf():
    spec = importlib.util.spec_from_file_location("cnf_two_moons", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):  # (conftest.py: tiny ops)
    pass


def test_the_log_density_of_a_linear_flow_is_the_closed_form(cnf):
    """g(t, z) = A z moves N(0, I) pulled back by exp(A): log p(x) = log N(exp(A) x) + tr(A)."""
    A = torch.tensor([[-0.3, 0.8], [-0.5, 0.2]])
    field = cnf.Field(width=4)
    field.forward = lambda t, z: z @ A.T  # (a linear field in place of the MLP)
    x = torch.randn(6, 2)
    got = cnf.log_likelihood(cnf.ExactTrace(field), x, rtol=1e-7, atol=1e-7)
    z1 = x @ torch.linalg.matrix_exp(A).T
    want = -0.5 * (z1**2).sum(1) - math.log(2 * math.pi) + torch.trace(A)
    assert torch.allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("estimator", ["exact", "hutchinson"])
@pytest.mark.parametrize("method", [odeflux.InterpolatingAdjoint(), odeflux.GaussAdjoint()], ids=lambda m: type(m).__name__)
def test_continuous_adjoints_give_directs_gradient(cnf, method, estimator):
    torch.manual_seed(0)
    field = cnf.Field(width=16).double()
    x = cnf.two_moons(64, np.random.default_rng(0)).double()
    v = (torch.randint(0, 2, (64, 2)) * 2 - 1).double()
    flow = cnf.ExactTrace(field) if estimator == "exact" else cnf.Hutchinson(field)
    args = None if estimator == "exact" else v
    grads = []
    for sensealg in (odeflux.DirectAdjoint(), method):
        loss = -cnf.log_likelihood(flow, x, sensealg, args, rtol=1e-9, atol=1e-9).mean()
        grads.append(torch.autograd.grad(loss, list(field.parameters())))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8)


def test_training_raises_the_held_out_likelihood(cnf):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    init = cnf.Field(width=16)
    batches = [cnf.two_moons(128, rng) for _ in range(15)]
    test = cnf.two_moons(500, np.random.default_rng(1))
    field, _ = cnf.train("GaussAdjoint", "exact", init, batches, [None] * 15, lr=1e-2)
    assert cnf.held_out(field, test) > cnf.held_out(init, test) + 0.1
