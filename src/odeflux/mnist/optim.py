"""Adam for the training loop: ``torch.optim.Adam``'s arithmetic without ``torch.optim``'s start-up.

The first step of any ``torch.optim`` optimizer imports ``torch._dynamo`` (its step functions are
wrapped for ``torch.compile``), which takes about 1.3 s here: a third of the tutorial's whole run
from process start. This class runs the same kernels (``torch._fused_adam_`` where the device has
it, else the same ``foreach`` formulas) and reads and writes ``torch.optim.Adam``'s state-dict
format, so checkpoints move freely between the two.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from .model import trainable_parameters

Optimizer = Any  # Adam below or any torch.optim optimizer


class Adam:
    """Adam (Kingma and Ba, 2015) with ``torch.optim.Adam``'s defaults and state layout.

    Supports what the training loop uses: ``step()``, ``zero_grad()``, ``param_groups`` (one group;
    ``lr`` may be changed between steps), ``state``, ``state_dict()`` and ``load_state_dict()``.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        params = list(params)
        if not params:
            raise ValueError("Adam got an empty parameter list")
        if not (lr > 0 and eps >= 0 and 0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid Adam hyper-parameters: lr={lr}, betas={betas}, eps={eps}")
        self.param_groups: list[dict[str, Any]] = [
            dict(params=params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=0.0, amsgrad=False,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None, decoupled_weight_decay=False)
        ]  # fmt: skip
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    @property
    def params(self) -> list[torch.Tensor]:
        return self.param_groups[0]["params"]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def _state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        st = self.state.get(p)
        if st is None:
            st = self.state[p] = {
                "step": torch.zeros((), dtype=torch.float32, device=p.device),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
        return st

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        params = [p for p in self.params if p.grad is not None]
        if not params:
            return
        states = [self._state(p) for p in params]
        grads = [p.grad for p in params]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        if _has_fused(params[0].device):
            torch._fused_adam_(
                params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                weight_decay=0.0, eps=eps, amsgrad=False, maximize=False,
            )  # fmt: skip
            return
        # torch.optim.Adam's foreach formulas (its non-capturable branch).
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        counts = [float(s) for s in steps]
        step_sizes = [-lr / (1 - beta1**c) for c in counts]
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [math.sqrt(1 - beta2**c) for c in counts])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)

    def state_dict(self) -> dict[str, Any]:
        """In ``torch.optim.Adam``'s format: per-parameter state by index, and the group."""
        index = {id(p): i for i, p in enumerate(self.params)}
        state = {index[id(p)]: dict(st) for p, st in self.state.items()}
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        group["params"] = list(range(len(self.params)))
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or len(groups) != 1 or len(groups[0].get("params", ())) != len(self.params):
            raise ValueError("the optimizer state does not match this model's parameters (one group, same count)")
        group = self.param_groups[0]
        for key in ("lr", "betas", "eps"):
            if key in groups[0]:
                group[key] = tuple(groups[0][key]) if key == "betas" else groups[0][key]
        self.state = {}
        for i, st in state_dict.get("state", {}).items():
            p = self.params[int(i)]
            self.state[p] = {
                "step": torch.as_tensor(st["step"], dtype=torch.float32).to(p.device).reshape(()).clone(),
                "exp_avg": st["exp_avg"].to(device=p.device, dtype=p.dtype).clone(),
                "exp_avg_sq": st["exp_avg_sq"].to(device=p.device, dtype=p.dtype).clone(),
            }


_FUSED: dict[str, bool] = {}


def _has_fused(device: torch.device) -> bool:
    """Whether ``torch._fused_adam_`` runs on this device type (CUDA; the CPU from torch 2.4)."""
    ok = _FUSED.get(device.type)
    if ok is None:
        p = torch.zeros(1, device=device)
        st = [torch.ones((), device=device)]
        try:
            torch._fused_adam_([p], [p.clone()], [p.clone()], [p.clone()], [], st, lr=0.0, beta1=0.9, beta2=0.999,
                               weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)  # fmt: skip
            ok = True
        except (RuntimeError, NotImplementedError, AttributeError):
            ok = False
        _FUSED[device.type] = ok
    return ok


def make_optimizer(model: nn.Module, lr: float = 1e-3) -> Adam:
    """Lux's ``Adam(lr)``: betas (0.9, 0.999), eps 1e-8. :class:`Adam` runs
    ``torch.optim.Adam``'s fused kernel without importing ``torch._dynamo`` (1.3 s of start-up)."""
    return Adam(trainable_parameters(model), lr=lr, betas=(0.9, 0.999), eps=1e-8)
