"""Shared helpers for the forward-solver tests: float64, reference solutions, evaluation recorders."""

from __future__ import annotations

import re

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy.integrate import solve_ivp  # noqa: E402

FIXED_SOLVERS = ("euler", "midpoint", "heun", "rk4")
ADAPTIVE_SOLVERS = ("bosh3", "dopri5", "tsit5", "dopri8")
FIXED_ORDERS = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}
STAGES = {"bosh3": 4, "dopri5": 7, "tsit5": 7, "dopri8": 13}
FSAL = {"euler": False, "midpoint": False, "heun": False, "rk4": False,
        "bosh3": True, "dopri5": True, "tsit5": True, "dopri8": True}


def reference(fun, y0, ts, rtol=1e-13, atol=1e-14):
    """An independent high-accuracy solution: scipy's DOP853, ``fun(t, y)`` in numpy."""
    ts = np.asarray(ts, dtype=np.float64)
    sol = solve_ivp(fun, (ts[0], ts[-1]), np.asarray(y0, dtype=np.float64), method="DOP853",
                    t_eval=ts, rtol=rtol, atol=atol)
    assert sol.success, sol.message
    return sol.y.T


def logistic_exact(t, y0=0.1, r=1.0):
    """The solution of ``y' = r y (1 - y)``, ``y(0) = y0``."""
    return 1.0 / (1.0 + (1.0 / y0 - 1.0) * np.exp(-r * np.asarray(t)))


def failure_cause(exc: BaseException) -> str:
    """The library's own message (the ``jaxode: ...`` line) out of a raised runtime error."""
    m = re.search(r"jaxode:[^\n]*", str(exc))
    assert m is not None, f"no jaxode message in the error: {exc}"
    return m.group(0)


class Recorder:
    """Records the times at which a vector field is really evaluated (a side effect, so it
    counts executions of the compiled program, not traces)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, t):
        self.times.append(float(t))

    def record(self, t):
        """Call inside ``f``: ``recorder.record(t)``."""
        jax.debug.callback(self, t, ordered=True)

    def clear(self):
        self.times = []

    def collect(self) -> np.ndarray:
        jax.effects_barrier()
        return np.asarray(self.times)


@pytest.fixture
def recorder():
    return Recorder()
