"""Train the convolutional ODE-Net (``create_model(arch="odenet")``) on full MNIST, one line per epoch.

    .venv/bin/python scripts/odenet_full_mnist.py [--epochs 5] [--width 32] [--schedule cosine] ...

The loop is ``odeflux train``'s (same data split, seeded batch order, warm-up, ``train_step``,
``accuracy``), plus what the CLI does not report: the ODE block's evaluations per batch, the
mean loss, and an optional cosine learning-rate schedule stepped once per batch. With
``--schedule constant`` this is the run ``odeflux train --model odenet --n-samples all`` makes,
minus its per-epoch training-set accuracy. Each epoch's numbers also go, as one JSON object a line,
to ``--jsonl`` (rewritten atomically after every epoch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from odeflux.mnist.data import BatchLoader, tutorial_split
from odeflux.mnist.fileio import atomic_write_bytes
from odeflux.mnist.model import (
    ADAPTIVE_SOLVERS,
    ODENET_WIDTH,
    PARAM_STRUCTURES,
    SENSEALGS,
    VJPS,
    FlatParameters,
    create_model,
    odenet,
)  # fmt: skip
from odeflux.mnist.optim import make_optimizer
from odeflux.mnist.schedule import CosineLR
from odeflux.mnist.steps import accuracy, train_step, warmup


def _node_kwargs(model: torch.nn.Module) -> dict:
    node = (model.module if isinstance(model, FlatParameters) else model).node
    return dict(solver=node.solver, tspan=node.tspan, sensealg=node.sensealg, **node.solve_kwargs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--width", type=int, default=ODENET_WIDTH)
    ap.add_argument("--pooled-head", action="store_true",
                    help="Chen et al.'s head (global average pool, Linear(width -> 10)) instead of create_model's")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                    help="cosine: lr decays from --lr to 0 over all batches of all epochs")
    ap.add_argument("--sensealg", choices=SENSEALGS, default="direct")
    ap.add_argument("--vjp", choices=VJPS, default="autograd")
    ap.add_argument("--solver", choices=ADAPTIVE_SOLVERS, default="tsit5")
    ap.add_argument("--tol", type=float, default=1e-3, help="rtol = atol of the ODE block")
    ap.add_argument("--params", choices=PARAM_STRUCTURES, default="tree")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-samples", default="all", help='"all" (60k/10k official split) or an integer (tutorial split)')
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--jsonl", type=Path, default=None, help="write per-epoch results here")
    a = ap.parse_args(argv)
    if a.epochs < 1 or a.batch_size < 1 or a.threads < 1:
        ap.error("--epochs, --batch-size and --threads must be positive integers")

    torch.set_num_threads(a.threads)
    n_samples = a.n_samples if a.n_samples == "all" else int(a.n_samples)
    (x_train, y_train), (x_test, y_test) = tutorial_split(n_samples, data_dir=a.data_dir)
    train_loader = BatchLoader((x_train, y_train), a.batch_size, shuffle=True, seed=a.seed)
    test_loader = BatchLoader((x_test, y_test), a.batch_size)

    model = create_model(arch="odenet", width=a.width, sensealg=a.sensealg, vjp=a.vjp, solver=a.solver,
                         rtol=a.tol, atol=a.tol, params=a.params, seed=a.seed)  # fmt: skip
    if a.pooled_head:  # the same model with the head swapped, built and seeded as create_model does
        pooled = odenet(a.width, torch.Generator().manual_seed(a.seed), pooled_head=True, **_node_kwargs(model))
        model = FlatParameters(pooled) if a.params == "flat" else pooled
    node = (model.module if isinstance(model, FlatParameters) else model).node
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = make_optimizer(model, a.lr)
    total_steps = a.epochs * len(train_loader)
    sched = CosineLR(optimizer, a.lr, total_steps) if a.schedule == "cosine" else None
    head = "pooled" if a.pooled_head else "flat"
    print(f"# odenet width={a.width} head={head} params={n_params} train={len(y_train)} test={len(y_test)} "
          f"batch={a.batch_size} lr={a.lr} schedule={a.schedule} sensealg={a.sensealg} solver={a.solver} "
          f"tol={a.tol} params={a.params} seed={a.seed} threads={a.threads} torch={torch.__version__} "
          f"cpu={platform.processor() or platform.machine()}", flush=True)
    warmup(model, (x_train, y_train), F.cross_entropy)

    rows: list[dict] = []
    run_start = time.perf_counter()
    for epoch in range(a.epochs):
        train_loader.set_epoch(epoch)
        model.train()
        nfe: list[int] = []
        loss_sum = torch.zeros(())
        start, cpu_start = time.perf_counter(), time.process_time()
        for batch in train_loader:
            if sched is not None:
                sched()
            loss_sum += train_step(model, batch, optimizer)
            nfe.append(node.last_stats.n_f_evals)
        train_s, train_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        start = time.perf_counter()
        test_acc = accuracy(model, test_loader)
        eval_s = time.perf_counter() - start
        row = dict(
            epoch=epoch + 1, train_s=round(train_s, 1), train_cpu_s=round(train_cpu_s, 1), eval_s=round(eval_s, 1),
            elapsed_s=round(time.perf_counter() - run_start, 1), mean_loss=float(loss_sum) / len(train_loader),
            test_accuracy=test_acc, nfe_mean=statistics.fmean(nfe), nfe_min=min(nfe), nfe_max=max(nfe),
            lr_end=optimizer.param_groups[0]["lr"], load_avg=os.getloadavg()[0],
        )  # fmt: skip
        rows.append(row)
        print(f"[{epoch + 1}/{a.epochs}] train {train_s:.0f}s (cpu {train_cpu_s:.0f}s)  eval {eval_s:.0f}s  loss {row['mean_loss']:.4f}  "
              f"test {100 * test_acc:.2f}%  NFE/batch (forward) mean {row['nfe_mean']:.1f} "
              f"[{row['nfe_min']}, {row['nfe_max']}]  load {row['load_avg']:.1f}", flush=True)
        if a.jsonl is not None:
            a.jsonl.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(a.jsonl, "".join(json.dumps(r) + "\n" for r in rows).encode())
    print(f"# done: {a.epochs} epochs in {time.perf_counter() - run_start:.0f}s wall, {time.process_time():.0f}s cpu, "
          f"final test accuracy {100 * rows[-1]['test_accuracy']:.2f}%", flush=True)


if __name__ == "__main__":
    main()
