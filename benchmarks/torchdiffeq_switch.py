"""Programs written for torchdiffeq, run unchanged on torchdiffeq and on ``odeflux.compat.torchdiffeq``.

Each program is one function taking the library module (``import torchdiffeq`` or
``from odeflux.compat import torchdiffeq``): the code is the same text for both, as a user's
would be after the import switch. Both run from the same seed; the table gives the time for the
whole program (median over interleaved rounds) and the final loss each reached.

- ``spiral``: torchdiffeq's spiral-fitting demo (``examples/ode_demo.py``): data from the cubic
  spiral ``y' = y^3 A`` on 1000 times in [0, 25], an ``MLP(y^3)`` field (2-50-2, tanh), RMSprop,
  20 windows of 10 times per batch, dopri5 at torchdiffeq's default rtol 1e-7 / atol 1e-9;
  ``odeint`` (backprop through the solver) and ``odeint_adjoint``.
- ``tutorial``: the Lux tutorial's classifier written for torchdiffeq: ``Linear(784, 20)-tanh``,
  an ODE block ``20-10-10-20`` (tanh) over t in [0, 1] with ``odeint_adjoint`` (dopri5: the
  torchdiffeq release on PyPI has no tsit5), rtol = atol = 1e-3, ``Linear(20, 10)``, Adam, batches
  of 128 of the first 1350 MNIST training images (one epoch).

    python -m benchmarks.torchdiffeq_switch              # writes benchmarks/results/torchdiffeq_switch.md
    python -m benchmarks.torchdiffeq_switch --quick      # smoke run, prints only
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .common import closing_line, interleaved, machine_info, markdown_table, publish, set_threads
from .provenance import code_state

RESULT = Path(__file__).parent / "results" / "torchdiffeq_switch.md"
PACKAGES = ("torch", "torchdiffeq")


# -- the programs (torchdiffeq code; `lib` is the module imported as torchdiffeq) -------------


def spiral(lib: Any, iters: int, adjoint: bool) -> float:
    torch.manual_seed(0)
    true_y0 = torch.tensor([[2.0, 0.0]])
    t = torch.linspace(0.0, 25.0, 1000)
    true_A = torch.tensor([[-0.1, 2.0], [-2.0, -0.1]])

    class Lambda(nn.Module):
        def forward(self, t, y):
            return torch.mm(y**3, true_A)

    with torch.no_grad():
        true_y = lib.odeint(Lambda(), true_y0, t, method="dopri5")

    class ODEFunc(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(2, 50), nn.Tanh(), nn.Linear(50, 2))
            for m in self.net.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, mean=0, std=0.1)
                    nn.init.constant_(m.bias, val=0)

        def forward(self, t, y):
            return self.net(y**3)

    func = ODEFunc()
    odeint = lib.odeint_adjoint if adjoint else lib.odeint
    optimizer = torch.optim.RMSprop(func.parameters(), lr=1e-3)
    rng = np.random.RandomState(0)
    loss = torch.tensor(float("nan"))
    for _ in range(iters):
        s = torch.from_numpy(rng.choice(np.arange(1000 - 10, dtype=np.int64), 20, replace=False))
        batch_y0, batch_t = true_y[s], t[:10]
        batch_y = torch.stack([true_y[s + i] for i in range(10)], dim=0)
        optimizer.zero_grad()
        pred_y = odeint(func, batch_y0, batch_t)
        loss = torch.mean(torch.abs(pred_y - batch_y))
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def tutorial(lib: Any, data: tuple[torch.Tensor, torch.Tensor], batches: int) -> float:
    torch.manual_seed(0)

    class ODEFunc(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(20, 10), nn.Tanh(), nn.Linear(10, 10), nn.Tanh(), nn.Linear(10, 20), nn.Tanh())

        def forward(self, t, y):
            return self.net(y)

    class ODEBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.func = ODEFunc()
            self.t = torch.tensor([0.0, 1.0])

        def forward(self, x):
            return lib.odeint_adjoint(self.func, x, self.t, rtol=1e-3, atol=1e-3, method="dopri5")[-1]

    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 20), nn.Tanh(), ODEBlock(), nn.Linear(20, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = data
    loss = torch.tensor(float("nan"))
    for i in range(batches):
        xb, yb = x[i * 128 : (i + 1) * 128], y[i * 128 : (i + 1) * 128]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
    return float(loss.detach())


# -- the comparison ---------------------------------------------------------------------------


def _libraries() -> dict[str, Any]:
    import torchdiffeq

    from odeflux.compat import torchdiffeq as compat

    return {"torchdiffeq": torchdiffeq, "odeflux.compat.torchdiffeq": compat}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.torchdiffeq_switch", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (default 3)")
    p.add_argument("--quick", action="store_true", help="smoke run: a few iterations, 1 round, prints only")
    p.add_argument("--out", type=Path, default=RESULT)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    set_threads(args.threads)
    machine = machine_info(*PACKAGES) + f"\n- {code_state()}"
    start = time.perf_counter()
    libs = _libraries()
    iters = 3 if args.quick else 100
    n_batches = 2 if args.quick else 10  # 1350 images in batches of 128: ten full batches
    from odeflux.mnist.data import tutorial_split

    (x_train, y_train), _ = tutorial_split(1500, download=False)
    programs: dict[str, Callable[[Any], float]] = {
        f"spiral, odeint ({iters} iterations)": lambda lib: spiral(lib, iters, adjoint=False),
        f"spiral, odeint_adjoint ({iters} iterations)": lambda lib: spiral(lib, iters, adjoint=True),
        "tutorial, odeint_adjoint (one epoch)": lambda lib: tutorial(lib, (x_train, y_train), n_batches),
    }
    rows, results = [], {}
    for prog, run in programs.items():
        losses: dict[str, float] = {}

        def one(lib_name: str, run: Callable = run, losses: dict = losses) -> None:
            losses[lib_name] = run(libs[lib_name])

        timings = interleaved(
            {name: (lambda name=name: one(name)) for name in libs},
            rounds=1 if args.quick else args.rounds, warmup=0 if args.quick else 1, min_rounds=1,
        )  # fmt: skip
        ref = timings["torchdiffeq"].median
        for name, tm in timings.items():
            rows.append([prog, name, str(tm), f"{tm.median / ref:.2f}", f"{losses[name]:.6f}"])
        results[prog] = {name: (tm.median, losses[name]) for name, tm in timings.items()}
        print(f"{prog}: " + ", ".join(f"{n} {timings[n]} loss {losses[n]:.6f}" for n in libs), flush=True)
    table = markdown_table(["program", "library", "time (median [min-max])", "÷ torchdiffeq", "final loss"], rows, "llrrr")
    body = (
        "The same program text on each library (the import switch). Time: the whole program, "
        f"median over {args.rounds} interleaved rounds after one warm-up, {args.threads} torch thread(s). "
        "Final loss: the last iteration's, from the same seed.\n\n" + table + "\n\n" + closing_line(start)
    )
    publish("torchdiffeq programs under the import switch", [body], machine, "benchmarks.torchdiffeq_switch", argv, args.out, not (args.quick or args.no_write))
    return results


if __name__ == "__main__":
    main()
