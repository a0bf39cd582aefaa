"""The tutorial's model and training loop for the torch peers, with a pluggable ODE layer.

Same architecture, initial weights, optimiser, batches and progress lines as ``odeflux train``:
Flatten, Dense(784->20, tanh), ODE layer over ``f = Dense(20->10,tanh)-Dense(10->10,tanh)-
Dense(10->20,tanh)`` on [0, 1], Dense(20->10); Lux's Glorot-uniform weights and zero biases drawn
from ``torch.Generator().manual_seed(seed)`` in layer order; Adam(1e-3); mean logit cross-entropy.
Nothing here imports odeflux.
"""

from __future__ import annotations

import argparse
import math
import time
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .data import epoch_order, tutorial_split

__all__ = ["TanhMLP", "TimeField", "build_model", "dense", "make_optimizer", "run_cli", "train_parser"]

MakeODE = Callable[[nn.Module], nn.Module]


def dense(n_in: int, n_out: int, gen: torch.Generator) -> nn.Linear:
    """Lux's ``Dense(n_in => n_out)``: Glorot-uniform weight as ``(rand - 1/2) * 2b``, zero bias."""
    layer = nn.Linear(n_in, n_out)
    b2 = math.sqrt(24.0 / (n_in + n_out))
    with torch.no_grad():
        layer.weight.copy_((torch.rand((n_out, n_in), generator=gen) - 0.5) * b2)
        layer.bias.zero_()
    return layer


class TanhMLP(nn.Module):
    """Dense layers each followed by tanh, in one module call (as odeflux's tutorial field)."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            y = torch.tanh(F.linear(y, layer.weight, layer.bias))
        return y


class TimeField(nn.Module):
    """``f(t, y) = module(y)``: the signature the ODE libraries call."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.module(y)


def build_model(make_ode: MakeODE, seed: int = 0, wrap: Callable[[nn.Module], nn.Module] = TimeField) -> nn.Sequential:
    """The tutorial's classifier; ``make_ode(f)`` turns the vector field ``f(t, y)`` into the ODE layer.

    ``wrap`` adapts the y-only MLP to ``f(t, y)`` (e.g. a counting wrapper).
    """
    gen = torch.Generator().manual_seed(seed)
    dense_in = dense(784, 20, gen)
    field = TanhMLP([dense(20, 10, gen), dense(10, 10, gen), dense(10, 20, gen)])
    dense_out = dense(20, 10, gen)
    return nn.Sequential(
        OrderedDict(
            flatten=nn.Flatten(), dense_in=dense_in, act=nn.Tanh(), node=make_ode(wrap(field)), dense_out=dense_out
        )
    )


def make_optimizer(model: nn.Module, lr: float = 1e-3) -> torch.optim.Adam:
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, foreach=True)


def _train_step(model, x, y, opt) -> torch.Tensor:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    model.eval()
    hits = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(y), batch))
    model.train()
    return hits / len(y)


def train_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--epochs", type=int, default=9)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--n-samples", default="1500", help="first N training images (or 'all': 60k/10k)")
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--atol", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (odeflux train's default: 1)")
    return p


def run_cli(args: argparse.Namespace, make_ode: MakeODE) -> None:
    """The tutorial's run: warm-up on one image, then one progress line per epoch (training time only)."""
    torch.set_num_threads(args.threads)
    n = args.n_samples if args.n_samples == "all" else int(args.n_samples)
    (xtr, ytr), (xte, yte) = (tuple(torch.from_numpy(a) for a in part) for part in tutorial_split(n))
    model = build_model(make_ode, args.seed)
    opt = make_optimizer(model)
    F.cross_entropy(model(xtr[:1]), ytr[:1]).backward()  # the tutorial's warm-up pass
    model.zero_grad(set_to_none=True)
    b = args.batch_size
    for epoch in range(args.epochs):
        order = torch.from_numpy(epoch_order(len(ytr), args.seed, epoch, torch))
        start = time.perf_counter()
        for i in range(0, len(ytr), b):
            idx = order[i : i + b]
            _train_step(model, xtr.index_select(0, idx), ytr.index_select(0, idx), opt)
        seconds = time.perf_counter() - start
        tr, te = _accuracy(model, xtr, ytr, b), _accuracy(model, xte, yte, b)
        print(
            f"[{epoch + 1}/{args.epochs}] \t Time {seconds:.2f}s \t Training Accuracy: {100 * tr:.2f}% "
            f"\t Test Accuracy: {100 * te:.2f}%",
            flush=True,
        )
