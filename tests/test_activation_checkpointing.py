"""A NeuralODE inside ``torch.utils.checkpoint.checkpoint`` (activation checkpointing of a larger
model): the forward is rerun in the backward pass and must save what the first run saved. A
check odeflux runs once per field (whether ``f`` depends on tensors the adjoint cannot see, by one
evaluation) saved tensors in the first run only, and checkpoint refused the recomputation
(``CheckpointError``: a different number of tensors saved)."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import odeflux

METHODS = ["auto", "DirectAdjoint", "InterpolatingAdjoint", "BacksolveAdjoint", "GaussAdjoint", "QuadratureAdjoint"]


@pytest.mark.parametrize("method", METHODS)
def test_a_checkpointed_neural_ode_gives_the_gradients_of_the_plain_one(method):
    grads = []
    for checkpointed in (True, False):
        torch.manual_seed(0)  # (a fresh field each time: the once-per-field check runs in the checkpointed forward)
        field = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 4))
        model = nn.Sequential(nn.Linear(3, 4), odeflux.NeuralODE(field, sensealg=method if method == "auto" else getattr(odeflux, method)(), rtol=1e-6, atol=1e-8), nn.Linear(4, 2))
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))
        h = model[0](x)
        h = checkpoint(model[1], h, use_reentrant=False) if checkpointed else model[1](h)
        model[2](h).square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
