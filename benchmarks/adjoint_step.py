"""One training step of the tutorial's model under every sensitivity method and VJP backend.

For each configuration: forward + backward time of one step (batch 128, float32, rtol = atol =
1e-3, fixed weights, no optimiser update), the forward and backward step and evaluation counts,
the peak tensor memory of the step, and the gradient's error against a tight reference; odeflux's
adjoint family side by side with torchdiffeq (``odeint_adjoint`` with and without the seminorm,
``odeint``) and torchode (``AutoDiffAdjoint``, ``BacksolveAdjoint``, ``JointBacksolveAdjoint``).
A second table shows how the step's memory grows with the number of solver steps.

    python -m benchmarks.adjoint_step            # writes benchmarks/results/adjoint_step.md
    python -m benchmarks.adjoint_step --quick    # smoke run: a few configurations, prints only
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

import odeflux
from odeflux.mnist.data import tutorial_split
from odeflux.mnist.model import create_model

from .common import (
    CountingField,
    Timing,
    closing_line,
    fmt_seconds,
    interleaved,
    machine_info,
    markdown_table,
    publish,
    set_threads,
)
from .peers import torchdiffeq_tutorial, torchode_tutorial
from .peers.torch_tutorial import build_model
from .provenance import code_state

RESULT = Path(__file__).parent / "results" / "adjoint_step.md"
PEERS = ("torchdiffeq", "torchode")
TOL, TIGHT = 1e-3, 1e-8
CONTINUOUS = ("InterpolatingAdjoint", "BacksolveAdjoint", "QuadratureAdjoint", "GaussAdjoint")
VJPS = ("autograd", "func", "compile", "jacobian")


class AdjointCountingField(CountingField):
    """A :class:`CountingField` that also counts torchdiffeq's adjoint (backward) steps."""

    def reset(self) -> None:
        super().reset()
        self.n_adjoint_steps = 0
        self.n_adjoint_accepted = 0

    def callback_step_adjoint(self, t0: Any, y0: Any, dt: Any) -> None:
        self.n_adjoint_steps += 1

    def callback_accept_step_adjoint(self, t0: Any, y0: Any, dt: Any) -> None:
        self.n_adjoint_accepted += 1


@dataclass
class Counts:
    """Work of one step: forward and backward steps (accepted, rejected) and evaluations."""

    fwd_acc: int = 0
    fwd_rej: int = 0
    fwd_f: int = 0
    bwd_acc: int | None = None
    bwd_rej: int | None = None
    bwd_f: int | None = None
    vjp: int | None = None
    extra: str = ""


class Runner:
    """A model at fixed weights and the way to read its counts after a step."""

    def __init__(self, model: nn.Module, forward: Callable[[torch.Tensor], tuple[torch.Tensor, Any]],
                 counts: Callable[[Any], Counts]):  # fmt: skip
        self.model, self.forward, self.read_counts = model, forward, counts
        mlp = [m for m in model.modules() if type(m).__name__ == "TanhMLP"]
        if len(mlp) != 1:
            raise RuntimeError("expected the tutorial model's one TanhMLP vector field")
        self.ordered = [model.dense_in.weight, model.dense_in.bias, *mlp[0].parameters(),
                        model.dense_out.weight, model.dense_out.bias]  # fmt: skip
        self.n_field = sum(p.numel() for p in mlp[0].parameters())
        self.last: Any = None

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        for p in self.ordered:
            p.grad = None
        logits, info = self.forward(x)
        F.cross_entropy(logits, y).backward()
        self.last = info

    def counts(self) -> Counts:
        return self.read_counts(self.last)

    def grads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(all parameters' gradient, the vector field's), float64, in one fixed order."""
        g = torch.cat([p.grad.reshape(-1).double() for p in self.ordered])
        k = self.ordered[0].numel() + self.ordered[1].numel()
        return g, g[k : k + self.n_field]


# -- configurations ---------------------------------------------------------------------------


@dataclass
class Config:
    name: str
    build: Callable[[torch.dtype, float], Runner]
    group: str = "fast"  # "fast", "compile" or "jacobian": timed in separate interleaved sets
    tight: bool = True  # whether the float64 tight-tolerance error is computed by default


def odeflux_runner(make_alg: Callable[[], Any], dtype: torch.dtype, tol: float, t1: float = 1.0,
                   vjp_rule: bool = True) -> Runner:  # fmt: skip
    model = create_model(sensealg=make_alg(), params="tree", rtol=tol, atol=tol, vjp_rule=vjp_rule).to(dtype)
    node = model.node
    node.return_solution = True
    node.tspan = (0.0, t1)

    def forward(x):
        sol = node(model.act(model.dense_in(model.flatten(x))))
        return model.dense_out(sol.ys[-1]), sol

    def counts(sol) -> Counts:
        s, b = sol.stats, sol.backward_stats
        c = Counts(s.n_accepted, s.n_rejected, s.n_f_evals)
        if b is not None and (b.n_steps or b.n_vjp_evals):
            c.bwd_acc, c.bwd_rej, c.bwd_f, c.vjp = b.n_accepted, b.n_rejected, b.n_f_evals, b.n_vjp_evals
            notes = []
            if b.n_checkpoints:
                notes.append(f"{b.n_checkpoints} re-solves")
            if b.n_quadrature_points:
                notes.append(f"{b.n_quadrature_points} quadrature points")
            c.extra = ", ".join(notes)
        return c

    return Runner(model, forward, counts)


def torchdiffeq_runner(adjoint: bool, seminorm: bool, dtype: torch.dtype, tol: float, t1: float = 1.0) -> Runner:
    fields: list[AdjointCountingField] = []

    def wrap(m: nn.Module) -> nn.Module:
        fields.append(AdjointCountingField(m, autonomous=True))
        return fields[0]

    model = build_model(torchdiffeq_tutorial.make_ode(adjoint, seminorm, tol, tol), wrap=wrap).to(dtype)
    model.node.t = torch.tensor([0.0, t1])
    f = fields[0]

    def forward(x):
        f.reset()
        out = model(x)
        return out, (f.n_calls, f.n_accepted, f.n_steps)

    def counts(info) -> Counts:
        n_fwd, acc, att = info
        c = Counts(acc, att - acc, n_fwd)
        if adjoint:  # each adjoint evaluation is one f evaluation and its VJP, in one pass
            c.bwd_acc, c.bwd_rej = f.n_adjoint_accepted, f.n_adjoint_steps - f.n_adjoint_accepted
            c.bwd_f = c.vjp = f.n_calls - n_fwd
        return c

    return Runner(model, forward, counts)


def torchode_runner(mode: str, dtype: torch.dtype, tol: float) -> Runner:
    fields: list[CountingField] = []

    def wrap(m: nn.Module) -> nn.Module:
        fields.append(CountingField(m, autonomous=True))
        return fields[0]

    model = build_model(torchode_tutorial.make_ode(mode, tol, tol), wrap=wrap).to(dtype)
    f = fields[0]

    def forward(x):
        f.reset()
        out = model(x)
        return out, (f.n_calls, model.node.last_stats)

    def counts(info) -> Counts:
        n_fwd, stats = info
        # Per-sample modes: the loop runs until the slowest sample is done.
        acc, att = int(stats["n_accepted"].max()), int(stats["n_steps"].max())
        c = Counts(acc, att - acc, n_fwd)
        if mode in ("backsolve", "joint-backsolve"):
            back = stats.get("backsolve", [])[-1:]
            if back:
                b_acc, b_att = int(back[0]["n_accepted"].max()), int(back[0]["n_steps"].max())
                c.bwd_acc, c.bwd_rej = b_acc, b_att - b_acc
            c.bwd_f = c.vjp = f.n_calls - n_fwd
            if mode == "backsolve":
                c.extra = "VJPs vmapped over the 128 samples"
        return c

    return Runner(model, forward, counts)


def configs(quick: bool) -> list[Config]:
    out = [Config("odeflux DirectAdjoint", lambda d, t: odeflux_runner(odeflux.DirectAdjoint, d, t))]
    for cls_name in CONTINUOUS:
        cls = getattr(odeflux, cls_name)
        for vjp in VJPS:
            group = vjp if vjp in ("compile", "jacobian") else "fast"
            out.append(Config(f"odeflux {cls_name} {vjp}",
                              lambda d, t, cls=cls, vjp=vjp: odeflux_runner(lambda: cls(vjp=vjp), d, t),
                              group, tight=group == "fast"))  # fmt: skip
    # The default without the tutorial field's hand-written VJP rule: every product through the engine.
    out.append(Config("odeflux InterpolatingAdjoint autograd, engine only",
                      lambda d, t: odeflux_runner(odeflux.InterpolatingAdjoint, d, t, vjp_rule=False)))  # fmt: skip
    for cls_name in ("InterpolatingAdjoint", "BacksolveAdjoint"):  # Kidger et al.'s seminorm, as torchdiffeq's below
        cls = getattr(odeflux, cls_name)
        out.append(
            Config(
                f"odeflux {cls_name} autograd seminorm",
                lambda d, t, cls=cls: odeflux_runner(lambda: cls(vjp="autograd", seminorm=True), d, t),
            )
        )
    out += [
        Config("torchdiffeq odeint_adjoint", lambda d, t: torchdiffeq_runner(True, False, d, t)),
        Config("torchdiffeq odeint_adjoint seminorm", lambda d, t: torchdiffeq_runner(True, True, d, t)),
        Config("torchdiffeq odeint", lambda d, t: torchdiffeq_runner(False, False, d, t)),
    ]
    out += [Config(f"torchode {m}", lambda d, t, m=m: torchode_runner(m, d, t)) for m in torchode_tutorial.MODES]
    if quick:
        keep = {"odeflux DirectAdjoint", "odeflux InterpolatingAdjoint autograd", "odeflux GaussAdjoint func",
                "odeflux BacksolveAdjoint autograd", "torchdiffeq odeint_adjoint", "torchode joint"}  # fmt: skip
        out = [c for c in out if c.name in keep]
    return out


# -- measurements -----------------------------------------------------------------------------


def peak_tensor_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes of torch CPU tensor memory allocated during ``fn()`` above what was live before,
    from ``torch.profiler``'s allocation events (each allocation and free, in time order)."""
    gc.collect()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    )
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def fmt_bytes(n: float) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - ref) / torch.linalg.vector_norm(ref))


def dynamo_graphs() -> int:
    try:
        from torch._dynamo.utils import counters
    except Exception:  # dynamo unavailable on this build
        return 0
    return int(counters["stats"]["unique_graphs"])


@dataclass
class Result:
    config: Config
    counts: Counts
    err32: tuple[float, float]
    first_call: float
    graphs_first: int = 0
    graphs_steady: int = 0
    timing: Timing | None = None
    peak: int | None = None
    err64: tuple[float, float] | None = None
    notes: list[str] = field(default_factory=list)


def fmt_steps(acc: int | None, rej: int | None) -> str:
    if acc is None:
        return "—"
    return f"{acc} ({rej})"


def run(args: argparse.Namespace) -> tuple[str, dict]:
    (xtr, ytr), _ = tutorial_split(1500)
    x, y = xtr[:128].contiguous(), ytr[:128].contiguous()
    x64 = x.double()
    cfgs = configs(args.quick)

    # Reference: backpropagation through odeflux's solver in float64 at rtol = atol = 1e-8.
    ref_runner = odeflux_runner(odeflux.DirectAdjoint, torch.float64, TIGHT)
    ref_runner.step(x64, y)
    ref_all, ref_field = ref_runner.grads()

    results: dict[str, Result] = {}
    runners: dict[str, Runner] = {}
    for c in cfgs:
        r = c.build(torch.float32, TOL)
        g0 = dynamo_graphs()
        t0 = time.perf_counter()
        r.step(x, y)  # first call: counts, gradient, and (for compile) the compilation
        first = time.perf_counter() - t0
        g_all, g_field = r.grads()
        results[c.name] = Result(c, r.counts(), (rel_err(g_all, ref_all), rel_err(g_field, ref_field)), first,
                                 graphs_first=dynamo_graphs() - g0)  # fmt: skip
        runners[c.name] = r
        print(f"  {c.name}: first call {fmt_seconds(first)}", flush=True)

    groups = {
        "fast": dict(rounds=args.rounds, warmup=2, budget_s=args.budget),
        "compile": dict(rounds=max(3, args.rounds // 4), warmup=1, budget_s=args.budget / 2, min_rounds=3),
        "jacobian": dict(rounds=args.slow_rounds, warmup=0, budget_s=args.budget, min_rounds=1),
    }
    rounds_done = {}
    for group, kw in groups.items():
        members = [c for c in cfgs if c.group == group]
        if not members:
            continue
        g0 = dynamo_graphs()
        fns = {c.name: (lambda r=runners[c.name]: r.step(x, y)) for c in members}
        timings = interleaved(fns, **kw)
        graphs = dynamo_graphs() - g0
        for c in members:
            results[c.name].timing = timings[c.name]
            if group == "compile":
                results[c.name].graphs_steady = graphs  # for the whole group: any recompilation shows
        rounds_done[group] = len(next(iter(timings.values())).samples)
        print(f"  timed group {group}: {rounds_done[group]} rounds", flush=True)

    for c in cfgs:  # memory: one profiled step each
        r = runners[c.name]
        results[c.name].peak = peak_tensor_bytes(lambda: r.step(x, y))

    for c in cfgs:  # the method's own accuracy: float64 at the reference's tolerance
        if not (c.tight or args.tight_all):
            continue
        r64 = c.build(torch.float64, TIGHT)
        r64.step(x64, y)
        g_all, g_field = r64.grads()
        results[c.name].err64 = (rel_err(g_all, ref_all), rel_err(g_field, ref_field))
    del runners

    return format_main(results, rounds_done, args), {"results": results}


def format_main(results: dict[str, Result], rounds_done: dict[str, int], args) -> str:
    base_name = "torchdiffeq odeint_adjoint"
    base = results.get(base_name)
    rows = []
    for name, r in results.items():
        c, t = r.counts, r.timing
        ratio = f"{t.median / base.timing.median:.2f}" if base and t else "—"
        e64 = f"{r.err64[0]:.1e} / {r.err64[1]:.1e}" if r.err64 else "not run"
        if name == "odeflux DirectAdjoint":
            e64 = "(the reference)"
        rows.append([
            name, str(t) if t else "—", ratio, f"{fmt_steps(c.fwd_acc, c.fwd_rej)} / {c.fwd_f}",
            fmt_steps(c.bwd_acc, c.bwd_rej), "—" if c.bwd_f is None else c.bwd_f, "—" if c.vjp is None else c.vjp,
            fmt_bytes(r.peak) if r.peak is not None else "—", f"{r.err32[0]:.1e} / {r.err32[1]:.1e}", e64, c.extra,
        ])  # fmt: skip
    headers = [
        "configuration", "step (fwd+bwd): median [min–max]", f"÷ {base_name}", "fwd steps acc (rej) / f evals",
        "bwd steps acc (rej)", "bwd f evals", "VJP evals", "peak tensor memory",
        "grad error at 1e-3, float32: all / field", "grad error at 1e-8, float64: all / field", "notes",
    ]  # fmt: skip
    table = markdown_table(headers, rows, align="lllllrrrlll")

    comp = [r for r in results.values() if r.config.group == "compile" and r.timing]
    comp_table = ""
    if comp:
        crow = [[r.config.name, fmt_seconds(r.first_call), fmt_seconds(max(r.first_call - r.timing.median, 0.0)),
                 str(r.timing), r.graphs_first, r.graphs_steady] for r in comp]  # fmt: skip
        comp_table = markdown_table(
            ["configuration", "first step", "≈ compile time (first − steady median)", "steady state: median [min–max]",
             "graphs compiled in first step", "graphs compiled while timed (whole group)"],
            crow, align="lrrlrr",
        )  # fmt: skip
    return table, comp_table


def memory_scaling(t1s: list[float], quick: bool) -> str:
    """Peak tensor memory of one step as the span, and so the number of steps, grows."""
    (xtr, ytr), _ = tutorial_split(1500)
    x, y = xtr[:128].contiguous(), ytr[:128].contiguous()
    makers: list[tuple[str, Callable[[float], Runner]]] = [
        ("odeflux DirectAdjoint", lambda t1: odeflux_runner(odeflux.DirectAdjoint, torch.float32, TOL, t1)),
        ("odeflux InterpolatingAdjoint (forward steps kept)",
         lambda t1: odeflux_runner(odeflux.InterpolatingAdjoint, torch.float32, TOL, t1)),
        ("odeflux InterpolatingAdjoint(checkpointing=True)",
         lambda t1: odeflux_runner(lambda: odeflux.InterpolatingAdjoint(checkpointing=True), torch.float32, TOL, t1)),
        ("odeflux BacksolveAdjoint", lambda t1: odeflux_runner(odeflux.BacksolveAdjoint, torch.float32, TOL, t1)),
        ("odeflux QuadratureAdjoint", lambda t1: odeflux_runner(odeflux.QuadratureAdjoint, torch.float32, TOL, t1)),
        ("odeflux GaussAdjoint", lambda t1: odeflux_runner(odeflux.GaussAdjoint, torch.float32, TOL, t1)),
        ("torchdiffeq odeint_adjoint", lambda t1: torchdiffeq_runner(True, False, torch.float32, TOL, t1)),
        ("torchdiffeq odeint", lambda t1: torchdiffeq_runner(False, False, torch.float32, TOL, t1)),
    ]  # fmt: skip
    if quick:
        makers = makers[:2] + makers[3:4]
    rows = []
    for name, make in makers:
        cells = [name]
        for t1 in t1s:
            r = make(t1)
            try:
                r.step(x, y)  # warm
            except Exception as e:  # e.g. backsolve's backward y blowing up over a long span
                first = (str(e).splitlines() or [""])[0]
                cells.append(f"fails: {type(e).__name__}: {first[:70]}...")
                continue
            peak = peak_tensor_bytes(lambda: r.step(x, y))
            c = r.counts()
            cells.append(f"{fmt_bytes(peak)} ({c.fwd_acc + c.fwd_rej} steps)")
        rows.append(cells)
    return markdown_table(["configuration"] + [f"t in [0, {t1:g}]" for t1 in t1s], rows, align="l" + "r" * len(t1s))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.adjoint_step", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (odeflux train's default: 1)")
    p.add_argument("--rounds", type=int, default=30, help="timed rounds of the fast configurations")
    p.add_argument("--slow-rounds", type=int, default=3, help="timed rounds of the jacobian-VJP configurations")
    p.add_argument("--budget", type=float, default=40.0, help="seconds of timed rounds per group at most")
    p.add_argument(
        "--tight-all", action="store_true", help="also the float64 error of the compile/jacobian rows (slow)"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: six configurations, 2 rounds, prints only")
    p.add_argument("--out", type=Path, default=RESULT, help="results file (markdown)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.slow_rounds < 1 or args.threads < 1 or not args.budget > 0:
        p.error("--rounds, --slow-rounds and --threads must be >= 1, --budget > 0")
    if args.quick:
        args.rounds, args.slow_rounds, args.budget = 2, 1, 5.0
    set_threads(args.threads)
    machine = machine_info(*PEERS) + f"\n- {code_state()}"
    start = time.perf_counter()

    (table, comp_table), data = run(args)
    t1s = [1.0, 10.0] if args.quick else [1.0, 10.0, 100.0, 1000.0]
    mem_table = memory_scaling(t1s, args.quick)

    parts = [
        "One training step of the MNIST tutorial's model (Flatten, Dense(784->20, tanh), Neural ODE over "
        "`Dense(20->10,tanh)-Dense(10->10,tanh)-Dense(10->20,tanh)` on t in [0, 1], Dense(20->10)), initial "
        f"weights (seed 0, per-layer parameters), the first 128 training images, float32, rtol = atol = {TOL:g}, "
        f"{args.threads} torch thread(s). odeflux solves with Tsit5 (PI controller), torchdiffeq with dopri5, "
        "torchode with Tsit5 (PID controller, `solve_ivp`'s gains). A step is the forward pass, the "
        "cross-entropy loss and `backward()` (no optimiser update, so every repeat does the same work).",
        "Time: median [min–max] over interleaved rounds (every configuration once per round, rotated order). "
        f"Configurations were timed in three interleaved sets: the fast ones ({_rounds(data, 'fast')}), the "
        f"`compile` VJPs ({_rounds(data, 'compile')}) after their first (compiling) step, and the `jacobian` "
        f"VJPs ({_rounds(data, 'jacobian')}, after one untimed step). ÷: median ratio to torchdiffeq's "
        "odeint_adjoint (below 1 is faster).",
        "Counts: *fwd steps* accepted (rejected) and f evaluations of the forward solve; *bwd steps* of the "
        "adjoint solve; *bwd f evals* are evaluations of f alone or together with a VJP (backsolve "
        "integrates y backwards; torchdiffeq's and torchode's adjoint evaluate f and its VJP in one pass, "
        "counted in both columns); *VJP evals* are vector-Jacobian products of f (odeflux's "
        "`backward_stats`; for the peers, calls of f during the backward pass). Discrete methods (odeflux "
        "DirectAdjoint, torchdiffeq odeint, torchode joint/per-sample) backpropagate through the forward's "
        "operations: no backward solve. torchode's per-sample modes count the slowest sample's steps.",
        "Peak tensor memory: the largest amount of torch CPU tensor memory live during one step beyond what "
        "was live before it, from `torch.profiler(profile_memory=True)` allocation and free events (it counts "
        "every tensor torch allocates on the CPU, including autograd's saved tensors and the gradients; not "
        "Python objects or the allocator's cached pages). tracemalloc would not see these allocations.",
        "Gradient error: relative 2-norm error of the loss gradient against odeflux DirectAdjoint (discrete "
        f"backpropagation) in float64 at rtol = atol = {TIGHT:g}, over all parameters and over the vector "
        "field's alone. *At 1e-3, float32*: the configuration as timed; *at 1e-8, float64*: the same method "
        "rerun in float64 at the reference's tolerance (the method's own consistency; the "
        "`compile`/`jacobian` VJP rows compute the same products as `func`/`autograd` and are left out unless "
        "`--tight-all`, as each takes up to a minute there).",
        f"## One training step\n\n{table}",
    ]
    if comp_table:
        parts.append(
            "## torch.compile VJPs: compile time and steady state\n\nThe `compile` backend compiles one VJP "
            "function (`torch.compile(dynamic=False)`). Dynamo caches compiled graphs per function, so the first "
            "`compile` configuration to run pays the compilation and the others reuse its graph while its guards "
            "hold (*graphs compiled in first step*: 0 means reused); graphs compiled while timed would mean "
            "recompilation in the steady state. Their ÷ column above compares across timing sets.\n\n"
            f"{comp_table}"
        )
    parts.append(
        "## Memory against the number of steps\n\nPeak tensor memory of one step (as above, float32, rtol = atol = "
        "1e-3, seeds and batch as above) as the span grows, with the forward's attempted steps in brackets. "
        "Memory flat in the number of steps means the row's numbers stay put across the columns. odeflux's "
        "interpolating, quadrature and Gauss adjoints keep the forward's steps for the backward pass (up to "
        "`store_limit`, 32 MiB by default), or with `checkpointing=True` re-solve each interval between saved "
        "times: with only the end saved that interval is the whole span, so both grow with the steps here; the "
        "backsolve adjoints (odeflux's BacksolveAdjoint, torchdiffeq's odeint_adjoint) keep nothing of the forward "
        "but integrate y backwards again, which a long span can make blow up (a *fails* cell: the backward solve "
        "went non-finite).\n\n" + mem_table
    )
    parts.append(closing_line(start))
    publish(
        "Adjoint methods: one training step",
        parts, machine, "benchmarks.adjoint_step", argv, args.out, not (args.no_write or args.quick),
    )  # fmt: skip
    return data


def _rounds(data: dict, group: str) -> str:
    res = [r for r in data["results"].values() if r.config.group == group and r.timing]
    if not res:
        return "none"
    n = len(res[0].timing.samples)
    return f"{n} round{'s' if n != 1 else ''}"


if __name__ == "__main__":
    main()
