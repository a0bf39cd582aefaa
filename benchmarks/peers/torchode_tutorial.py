"""The tutorial's model with torchode: Tsit5 with its PID controller, four ways to differentiate.

- ``joint``: ``AutoDiffAdjoint`` (backpropagation through the solver) on the batch as one
  ``(1, 128*20)`` problem: one step size for the batch, as the tutorial (and odeflux) solve it.
- ``per-sample``: ``AutoDiffAdjoint`` on 128 problems with their own step sizes (torchode's own mode).
- ``backsolve``: ``BacksolveAdjoint`` (per sample, VJPs by ``vmap``).
- ``joint-backsolve``: ``JointBacksolveAdjoint`` (the batch as one problem, autograd VJPs).

    python -m benchmarks.peers.torchode_tutorial [--mode joint] [--threads N]
"""

from __future__ import annotations

import torch
from torch import nn

from .torch_tutorial import build_model, run_cli, train_parser

__all__ = ["MODES", "ODELayer", "make_ode", "model"]

MODES = ("joint", "per-sample", "backsolve", "joint-backsolve")


class ODELayer(nn.Module):
    """``x -> y(1)`` of ``dy/dt = f(t, y)``, ``y(0) = x``, by torchode's Tsit5."""

    def __init__(self, field: nn.Module, mode: str = "joint", rtol: float = 1e-3, atol: float = 1e-3):
        super().__init__()
        import torchode as to

        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.field, self.mode = field, mode
        self._features = None
        term = to.ODETerm(self._joint_f) if mode == "joint" else to.ODETerm(field)
        # solve_ivp's default controller gains.
        ctrl = to.PIDController(atol=atol, rtol=rtol, pcoeff=0.2, icoeff=0.5, dcoeff=0.0, term=term)
        step = to.Tsit5(term=term)
        if mode in ("joint", "per-sample"):
            self.solver = to.AutoDiffAdjoint(step, ctrl)
        elif mode == "backsolve":
            self.solver = to.BacksolveAdjoint(term, step, ctrl)
        else:
            self.solver = to.JointBacksolveAdjoint(term, step, ctrl)
        self._to = to

    def _joint_f(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.field(t, y.view(-1, self._features)).view(1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        to = self._to
        if self.mode == "joint":
            self._features = x.shape[-1]
            y0 = x.reshape(1, -1)
        else:
            y0 = x
        n = y0.shape[0]
        problem = to.InitialValueProblem(y0, torch.zeros(n, dtype=x.dtype), torch.ones(n, dtype=x.dtype))
        sol = self.solver.solve(problem)
        self.last_stats = sol.stats
        return sol.ys[:, -1].reshape(x.shape)


def make_ode(mode: str = "joint", rtol: float = 1e-3, atol: float = 1e-3):
    """A ``make_ode`` for :func:`benchmarks.peers.torch_tutorial.build_model`."""
    return lambda field: ODELayer(field, mode, rtol, atol)


def model(mode: str = "joint", seed: int = 0, **kw) -> nn.Sequential:
    return build_model(make_ode(mode), seed, **kw)


def main(argv: list[str] | None = None) -> None:
    p = train_parser("python -m benchmarks.peers.torchode_tutorial", "The tutorial's run with torchode (Tsit5).")
    p.add_argument("--mode", choices=MODES, default="joint", help="how gradients are taken (see the module docstring)")
    args = p.parse_args(argv)
    run_cli(args, make_ode(args.mode, args.rtol, args.atol))


if __name__ == "__main__":
    main()
