"""The tutorial's model with torchdiffeq: dopri5 through ``odeint_adjoint`` (or ``odeint``).

python -m benchmarks.peers.torchdiffeq_tutorial [--odeint] [--seminorm] [--threads N]
"""

from __future__ import annotations

import torch
from torch import nn

from .torch_tutorial import build_model, run_cli, train_parser

__all__ = ["ODELayer", "make_ode", "model"]


class ODELayer(nn.Module):
    """``x -> y(1)`` of ``dy/dt = f(t, y)``, ``y(0) = x``, by torchdiffeq."""

    def __init__(self, field: nn.Module, adjoint: bool = True, seminorm: bool = False, rtol: float = 1e-3,
                 atol: float = 1e-3, method: str = "dopri5"):  # fmt: skip
        super().__init__()
        self.field = field
        self.adjoint, self.seminorm = adjoint, seminorm
        self.rtol, self.atol, self.method = rtol, atol, method
        self.register_buffer("t", torch.tensor([0.0, 1.0]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torchdiffeq

        t = self.t.to(x.dtype)
        kw = dict(rtol=self.rtol, atol=self.atol, method=self.method)
        if not self.adjoint:
            return torchdiffeq.odeint(self.field, x, t, **kw)[-1]
        opts = dict(norm="seminorm") if self.seminorm else None
        return torchdiffeq.odeint_adjoint(self.field, x, t, adjoint_options=opts, **kw)[-1]


def make_ode(adjoint: bool = True, seminorm: bool = False, rtol: float = 1e-3, atol: float = 1e-3):
    """A ``make_ode`` for :func:`benchmarks.peers.torch_tutorial.build_model`."""
    return lambda field: ODELayer(field, adjoint, seminorm, rtol, atol)


def model(adjoint: bool = True, seminorm: bool = False, seed: int = 0, **kw) -> nn.Sequential:
    return build_model(make_ode(adjoint, seminorm), seed, **kw)


def main(argv: list[str] | None = None) -> None:
    p = train_parser("python -m benchmarks.peers.torchdiffeq_tutorial", "The tutorial's run with torchdiffeq (dopri5).")
    p.add_argument("--odeint", action="store_true", help="backpropagate through odeint instead of odeint_adjoint")
    p.add_argument("--seminorm", action="store_true", help="odeint_adjoint with adjoint_options=dict(norm='seminorm')")
    args = p.parse_args(argv)
    run_cli(args, make_ode(not args.odeint, args.seminorm, args.rtol, args.atol))


if __name__ == "__main__":
    main()
