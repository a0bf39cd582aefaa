"""Shared fixtures: devices, dtypes and a catalogue of classic ODE problems with independent references.

References come from outside odeflux: closed forms (Kepler's equation, the matrix exponential) or
scipy's DOP853 at rtol = atol = 1e-12.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

# The suite compiles dozens of programs (compile=True), and gcc takes half of each one's build:
# Inductor's C++ wrapper (the loop itself, in odeflux's programs) built apart from the kernels at
# -O1 takes about a third less of it. The generated code is the same, only its compiler flags
# differ; set before torch reads its config, and inherited by the suite's subprocesses.
os.environ.setdefault("TORCHINDUCTOR_CPP_WRAPPER_BUILD_SEPARATE", "1")

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


class LotkaVolterraRates(torch.nn.Module):
    """Lotka-Volterra with its four rates one learnable vector (unbound inside ``forward``): shared by
    the compiled-loop tests, so that they share their compiled programs (keyed by this class)."""

    def __init__(self, rates=(1.5, 1.0, 1.0, 3.0)):
        super().__init__()
        self.rates = torch.nn.Parameter(torch.tensor(rates, dtype=torch.float64))

    def forward(self, t, y):
        a, b, d, g = self.rates
        x, v = y[..., 0], y[..., 1]
        return torch.stack([a * x - b * x * v, d * x * v - g * v], -1)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """``odeflux`` with ``argv`` in-process: (exit code, stdout, stderr)."""
    from odeflux.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")])]
DTYPES = [torch.float32, torch.float64]


@pytest.fixture
def one_torch_thread():
    """One torch intra-op thread for the test: on a shared 2-core machine a second one mostly waits
    on tiny ops (50x slower under load). Modules with tiny ops use it as ``autouse``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Every device the test can run on: the CPU, and CUDA when one is present."""
    return torch.device(request.param)


@pytest.fixture(params=DTYPES, ids=["float32", "float64"])
def dtype(request) -> torch.dtype:
    return request.param


# ---------------------------------------------------------------------------------------------
# Problems. ``f`` is the torch vector field (any device and dtype), ``f_np`` the same field for
# scipy; ``exact`` a closed-form solution where one exists.


@dataclass(frozen=True)
class ODEProblem:
    name: str
    f: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    f_np: Callable[[float, np.ndarray], np.ndarray]
    y0: np.ndarray
    t_span: tuple[float, float]
    exact: Callable[[np.ndarray], np.ndarray] | None = None

    def y0_tensor(self, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor(self.y0, dtype=dtype, device=device)

    def reference(self, ts) -> np.ndarray:
        """The solution at host times ``ts`` (starting from ``t_span[0]``), shape ``(len(ts), *y0.shape)``."""
        ts = tuple(float(t) for t in np.atleast_1d(ts))
        if self.exact is not None:
            return self.exact(np.asarray(ts))
        return _scipy_reference(self.name, ts)


def _scipy_reference(name: str, ts: tuple[float, ...]) -> np.ndarray:
    p = PROBLEMS[name]
    t0 = p.t_span[0]
    out = np.empty((len(ts),) + p.y0.shape)
    for sign in (1.0, -1.0):
        idx = [i for i, t in enumerate(ts) if sign * (t - t0) > 0]
        if idx:
            # One dense scipy solution per problem and direction, reaching at least the problem's t1.
            far = max([sign * ts[i] for i in idx] + ([sign * p.t_span[1]] if sign > 0 else []))
            sol = _scipy_dense(name, sign * far)
            out[idx] = sol(np.array([ts[i] for i in idx])).T.reshape((len(idx),) + p.y0.shape)
    for i, t in enumerate(ts):
        if t == t0:
            out[i] = p.y0
    return out


@functools.lru_cache(maxsize=None)
def _scipy_dense(name: str, t_end: float):
    from scipy.integrate import solve_ivp

    p = PROBLEMS[name]
    flat = lambda t, y: p.f_np(t, y.reshape(p.y0.shape)).reshape(-1)  # noqa: E731
    r = solve_ivp(flat, (p.t_span[0], t_end), p.y0.reshape(-1), method="DOP853", rtol=1e-12, atol=1e-12, dense_output=True)
    assert r.success, r.message
    return r.sol


def _lotka_volterra(t, y):
    x, z = y[..., 0], y[..., 1]
    return _stack([1.5 * x - x * z, -3.0 * z + x * z], y)


def _van_der_pol(t, y):
    x, v = y[..., 0], y[..., 1]
    return _stack([v, (1.0 - x * x) * v - x], y)


def _two_body(t, u):
    x, y, vx, vy = u[..., 0], u[..., 1], u[..., 2], u[..., 3]
    r3 = (x * x + y * y) ** 1.5
    return _stack([vx, vy, -x / r3, -y / r3], u)


def _brusselator(t, y):
    x, z = y[..., 0], y[..., 1]
    return _stack([1.0 + x * x * z - 4.0 * x, 3.0 * x - x * x * z], y)


def _stack(parts, like):
    return torch.stack(parts, -1) if isinstance(like, torch.Tensor) else np.stack(parts, -1)


# A damped rotation coupled to a slow decay: a 3x3 linear system, integrated on a (3, 2) matrix state.
LINEAR_M = np.array([[-0.5, 1.0, 0.0], [-1.0, -0.5, 0.3], [0.2, 0.0, -0.2]])
LINEAR_Y0 = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, -0.5]])
_LINEAR_CACHE: dict = {}


def _linear(t, y):
    if isinstance(y, torch.Tensor):
        key = (y.dtype, y.device)
        M = _LINEAR_CACHE.get(key)
        if M is None:
            M = _LINEAR_CACHE[key] = torch.tensor(LINEAR_M, dtype=y.dtype, device=y.device)
        return M @ y
    return LINEAR_M @ y


def _linear_exact(ts):
    from scipy.linalg import expm

    return np.stack([expm(LINEAR_M * (t - 0.0)) @ LINEAR_Y0 for t in ts])


_LAM, _V = np.linalg.eig(LINEAR_M)
_C = np.linalg.solve(_V, LINEAR_Y0.astype(complex))


def exact_linear(ts) -> np.ndarray:
    """The linear system's solution at times ``ts`` by eigendecomposition:
    ``expm(M t) y0 = V exp(diag(lambda) t) V^-1 y0`` (scipy's expm per time is slow)."""
    t = np.atleast_1d(np.asarray(ts, dtype=np.float64))
    return np.einsum("ij,tj,jk->tik", _V, np.exp(np.outer(t, _LAM)), _C).real


def linear_f(t, y):
    """The linear system's field for any tensor dtype."""
    return torch.as_tensor(LINEAR_M, dtype=y.dtype) @ y


# Stiff problems: Robertson's chemical kinetics (rates k) and HIRES, on tensors and on arrays.
ROBER_K = (0.04, 3e7, 1e4)


def rober(t, y, k=ROBER_K):
    y1, y2, y3 = y[0], y[1], y[2]
    return torch.stack([-k[0] * y1 + k[2] * y2 * y3, k[0] * y1 - k[2] * y2 * y3 - k[1] * y2 * y2, k[1] * y2 * y2])


def rober_np(t, y, k=ROBER_K):
    y1, y2, y3 = y
    return [-k[0] * y1 + k[2] * y2 * y3, k[0] * y1 - k[2] * y2 * y3 - k[1] * y2 * y2, k[1] * y2 * y2]


#: ROBER's gradient test: a short span, and a loss ``W_GRAD . y(T_GRAD)`` weighing y2 up to y1's scale.
T_GRAD, W_GRAD = 0.02, np.array([1.0, 3e4, 2.0])


@functools.lru_cache(maxsize=1)
def rober_fd_gradient() -> np.ndarray:
    """Central differences of scipy's Radau solution (rtol 1e-12) of the loss ``W_GRAD . y(T_GRAD)``
    in each of ROBER's rate constants."""
    from scipy.integrate import solve_ivp

    def loss(k):
        sol = solve_ivp(lambda t, y: rober_np(t, y, k), (0.0, T_GRAD), [1.0, 0.0, 0.0], method="Radau", rtol=1e-12, atol=1e-16)
        return W_GRAD @ sol.y[:, -1]

    g = []
    for i, ki in enumerate(ROBER_K):
        e = 1e-4 * ki
        kp, km = list(ROBER_K), list(ROBER_K)
        kp[i] += e
        km[i] -= e
        g.append((loss(kp) - loss(km)) / (2 * e))
    return np.array(g)


def hires(t, y):
    y1, y2, y3, y4, y5, y6, y7, y8 = (y[i] for i in range(8))
    return torch.stack([
        -1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007,
        1.71 * y1 - 8.75 * y2,
        -10.03 * y3 + 0.43 * y4 + 0.035 * y5,
        8.32 * y2 + 1.71 * y3 - 1.12 * y4,
        -1.745 * y5 + 0.43 * y6 + 0.43 * y7,
        -280.0 * y6 * y8 + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
        280.0 * y6 * y8 - 1.81 * y7,
        -280.0 * y6 * y8 + 1.81 * y7,
    ])  # fmt: skip


def hires_np(t, y):
    y1, y2, y3, y4, y5, y6, y7, y8 = y
    return [
        -1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007, 1.71 * y1 - 8.75 * y2, -10.03 * y3 + 0.43 * y4 + 0.035 * y5,
        8.32 * y2 + 1.71 * y3 - 1.12 * y4, -1.745 * y5 + 0.43 * y6 + 0.43 * y7,
        -280.0 * y6 * y8 + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7, 280.0 * y6 * y8 - 1.81 * y7,
        -280.0 * y6 * y8 + 1.81 * y7,
    ]  # fmt: skip


def kepler_exact(ts, e: float) -> np.ndarray:
    """The two-body orbit with semi-major axis 1, mu = 1, eccentricity ``e``, at perihelion at t = 0.

    Solves Kepler's equation ``E - e sin E = t`` by Newton's method to machine precision.
    """
    M = np.asarray(ts, dtype=np.float64)
    E = M + e * np.sin(M)
    for _ in range(40):
        E = E - (E - e * np.sin(E) - M) / (1.0 - e * np.cos(E))
    s = math.sqrt(1.0 - e * e)
    r = 1.0 - e * np.cos(E)
    return np.stack([np.cos(E) - e, s * np.sin(E), -np.sin(E) / r, s * np.cos(E) / r], -1)


def two_body_f(t, u):
    return _two_body(t, u)


PROBLEMS: dict[str, ODEProblem] = {
    "lotka_volterra": ODEProblem("lotka_volterra", _lotka_volterra, _lotka_volterra, np.array([1.0, 1.0]), (0.0, 10.0)),
    "van_der_pol": ODEProblem("van_der_pol", _van_der_pol, _van_der_pol, np.array([2.0, 0.0]), (0.0, 10.0)),
    "two_body": ODEProblem(
        "two_body", _two_body, _two_body, kepler_exact([0.0], 0.5)[0], (0.0, 2 * math.pi), lambda ts: kepler_exact(ts, 0.5)
    ),
    "brusselator": ODEProblem("brusselator", _brusselator, _brusselator, np.array([1.5, 3.0]), (0.0, 10.0)),
    "linear": ODEProblem("linear", _linear, _linear, LINEAR_Y0, (0.0, 5.0), _linear_exact),
}

# The two-body problem also gets a scipy cross-check: its closed form is our own Kepler solver.
_SCIPY_CHECK = ODEProblem("two_body_scipy", _two_body, _two_body, PROBLEMS["two_body"].y0, (0.0, 2 * math.pi))
PROBLEMS["two_body_scipy"] = _SCIPY_CHECK
CLASSIC = ["lotka_volterra", "van_der_pol", "two_body", "brusselator", "linear"]


@pytest.fixture(params=CLASSIC)
def classic_problem(request) -> ODEProblem:
    """Five classic non-stiff problems, each with an independent reference solution."""
    return PROBLEMS[request.param]


@pytest.fixture
def problems() -> dict[str, ODEProblem]:
    return PROBLEMS
