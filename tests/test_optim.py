"""odeflux's Adam against torch.optim.Adam: the same numbers, interchangeable state."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

from odeflux.mnist import optim


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(20, 7), (7,), (3, 3)]]


def _run(opt, params, steps: int = 6, lr_change: bool = True) -> None:
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        opt.zero_grad()
        loss = sum((p * torch.randn(p.shape, generator=g)).sum() + p.pow(2).sum() for p in params)
        loss.backward()
        if lr_change and i == 3:
            opt.param_groups[0]["lr"] = 5e-3
        opt.step()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_matches_torch_adam(fused, monkeypatch):
    monkeypatch.setitem(optim._FUSED, "cpu", fused and optim._has_fused(torch.device("cpu")))
    ours, ref = _params(), _params()
    _run(optim.Adam(ours, lr=1e-2), ours)
    kernel = {"fused": True} if optim._FUSED["cpu"] else {"foreach": True}
    _run(torch.optim.Adam(ref, lr=1e-2, **kernel), ref)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_state_dict_is_interchangeable_with_torch_adam():
    ours, ref = _params(), _params()
    o = optim.Adam(ours, lr=1e-2)
    _run(o, ours, steps=3, lr_change=False)
    t = torch.optim.Adam(ref, lr=1e-2)
    with torch.no_grad():
        for a, b in zip(ref, ours):
            a.copy_(b)
    t.load_state_dict(copy.deepcopy(o.state_dict()))  # ours -> torch (state dicts share tensors)
    back = optim.Adam(_params(), lr=1.0)
    back.load_state_dict(copy.deepcopy(t.state_dict()))  # torch -> ours
    assert back.param_groups[0]["lr"] == 1e-2
    for p, q in zip(back.params, ours):
        for k in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(back.state[p][k], o.state[q][k])
    _run(o, ours, steps=2, lr_change=False)
    _run(t, ref, steps=2, lr_change=False)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_mismatched_state_is_a_clear_error():
    o = optim.Adam(_params())
    with pytest.raises(ValueError, match="does not match"):
        o.load_state_dict({"state": {}, "param_groups": [{"params": [0]}]})
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.Adam([])


def test_does_not_import_dynamo():
    """The point of the class: no torch._dynamo import (seconds of start-up) on the first step."""
    code = (
        "import sys, torch\n"
        "from odeflux.mnist.optim import Adam\n"
        "p = torch.nn.Parameter(torch.ones(3)); o = Adam([p]); p.sum().backward(); o.step()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
