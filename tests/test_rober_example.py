"""The ROBER fitting example (examples/rober_fit.py) on a short span: its GaussAdjoint gradient at
the starting rates against DirectAdjoint and central differences, and a short fit that lowers the
loss and moves the rates toward the truth."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import odeflux

PATH = Path(__file__).resolve().parents[1] / "examples" / "rober_fit.py"
TIMES = np.geomspace(1e-4, 1.0, 9)  # the fast transient and the start of the slow phase: cheap solves


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("rober_fit", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def obs(ex):
    return ex.observations(TIMES)[1]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):  # (conftest.py: tiny ops)
    pass


def test_observations_are_the_solution_with_multiplicative_noise(ex, obs):
    clean, noisy = ex.observations(TIMES)
    assert torch.equal(noisy, obs)  # fixed seed
    log_ratio = (noisy / clean).log()
    assert 0.01 < float(log_ratio.std()) < 0.06 and float(log_ratio.abs().max()) < 0.2
    with torch.no_grad():  # Rodas5P at the example's tolerance against Radau at rtol 1e-12
        pred = ex.predict(ex.Rober(ex.TRUE_K), TIMES)
    np.testing.assert_allclose(pred.numpy(), clean.numpy(), rtol=1e-4)


def test_gauss_adjoint_gradient_at_the_start(ex, obs):
    """d loss / d log k at the starting rates: GaussAdjoint within 1e-5 relative of DirectAdjoint
    (measured 5e-7) and within 1e-3 of central differences of the loss (each solve at rtol 1e-6)."""
    loss, g_gauss = ex.gradient(ex.Rober(ex.START_K), TIMES, obs, odeflux.GaussAdjoint())
    _, g_direct = ex.gradient(ex.Rober(ex.START_K), TIMES, obs, odeflux.DirectAdjoint())
    assert float((g_gauss - g_direct).norm() / g_direct.norm()) < 1e-5
    h = 1e-4
    fd = []
    for i in range(3):
        m = ex.Rober(ex.START_K)
        with torch.no_grad():
            m.log_k[i] += h
            up = float(ex.loss_fn(m, TIMES, obs))
            m.log_k[i] -= 2 * h
            down = float(ex.loss_fn(m, TIMES, obs))
        fd.append((up - down) / (2 * h))
    np.testing.assert_allclose(g_gauss.numpy(), fd, atol=1e-3 * float(g_gauss.norm()))


def test_a_short_fit_lowers_the_loss_and_approaches_the_true_rates(ex, obs):
    model = ex.Rober(ex.START_K)
    res = ex.fit(model, TIMES, obs, iters=2)
    losses = [h[0] for h in res["history"]]
    assert losses[-1] < 0.2 * losses[0]
    true = torch.tensor(ex.TRUE_K, dtype=torch.float64).log()
    start = torch.tensor(ex.START_K, dtype=torch.float64).log()
    assert float((model.log_k.detach() - true).norm()) < 0.8 * float((start - true).norm())
