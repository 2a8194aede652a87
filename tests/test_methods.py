"""The ``Method`` interface (``jaxode.methods.base``): a method written against it alone runs in
the loop under every gradient mode, ``batched=True`` and ``jax.vmap``; ``get_method``."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxode
from jaxode.interpolation import hermite_coefficients
from jaxode.methods import METHODS, ButcherTableau, ExplicitRK, Method, StepResult, get_method


@dataclasses.dataclass(frozen=True)
class HeunEuler(Method):
    """Heun's method with Euler as its embedded method, 2(1), cubic Hermite dense output: written
    from scratch, not from a tableau. Its method state counts the accepted steps (the loop keeps
    the state of the last accepted step)."""

    name: str = "heun-euler"
    order: int = 2
    error_order: int = 1
    adaptive: bool = True
    num_stages: int = 2
    interpolant_nfe: int = 0
    quadrature_weights: tuple = (0.5, 0.5)

    def init(self, field, t0, y0, f0):
        return jnp.zeros((), jnp.int32)

    def step(self, field, t, y, h, f0, state, t_end):
        hy = jnp.asarray(h).astype(y.dtype)
        y1 = y + hy * f0
        k1 = field(y1, t_end)
        y_new = y + 0.5 * hy * (f0 + k1)
        f_new = field(y_new, t_end)
        error = 0.5 * hy * (k1 - f0)
        nodes = (jnp.stack([y, y1]), jnp.stack([t, t_end]))
        return StepResult(y_new, f_new, error, f0, nodes, 2, 0, state + 1)

    def interpolant(self, field, t, y, h, dense, y_new, f_new):
        return hermite_coefficients(y, h, dense, y_new, f_new)


HEUN_EULER_TABLEAU = ButcherTableau(
    name="heun-euler-tableau", order=2, c=(0.0, 1.0), a=((1.0,),), b=(0.5, 0.5), b_error=(-0.5, 0.5),
    error_order=1,
)


def _field(z, t, p):
    return jnp.stack([z[1], -p * z[0]])


def _exact(ts, p):
    w = np.sqrt(p)
    return np.stack([np.cos(w * ts), -w * np.sin(w * ts)], -1)


TS = jnp.linspace(0.0, 3.0, 7)


@pytest.mark.parametrize("gradient", ["adjoint", "backprop", "checkpoint"])
def test_a_method_written_against_the_interface_runs_in_every_mode(gradient):
    """Same steps and numbers as the equivalent tableau (nfe counted from the method's own
    report), the analytic solution, and the analytic gradient."""
    z0 = jnp.array([1.0, 0.0])
    opts = dict(rtol=1e-7, atol=1e-7, gradient=gradient, full_output=True, max_steps=20000)
    ys, info = jaxode.odesolve(_field, z0, TS, 2.0, solver=HeunEuler(), **opts)
    ys_tab, info_tab = jaxode.odesolve(_field, z0, TS, 2.0, solver=HEUN_EULER_TABLEAU, **opts)
    np.testing.assert_allclose(ys, ys_tab, rtol=1e-12, atol=1e-14)
    assert int(info.num_steps) == int(info_tab.num_steps) > 100
    assert int(info.nfe) == int(info_tab.nfe)
    np.testing.assert_allclose(ys, _exact(np.asarray(TS), 2.0), atol=3e-5)
    loss = lambda p: jaxode.odesolve(_field, z0, TS, p, solver=HeunEuler(), **opts)[0][-1, 0]
    np.testing.assert_allclose(jax.grad(loss)(2.0), -3.0 / (2 * np.sqrt(2.0)) * np.sin(3.0 * np.sqrt(2.0)),
                               rtol=2e-4)


@pytest.mark.slow
def test_a_new_method_batched_and_vmapped():
    z0s = jnp.array([[1.0, 0.0], [0.5, 0.2], [0.0, 1.0]])
    opts = dict(rtol=1e-7, atol=1e-7, solver=HeunEuler(), max_steps=20000)
    batched = jaxode.odesolve(_field, z0s, TS, 2.0, batched=True, **opts)
    vmapped = jax.vmap(lambda z: jaxode.odesolve(_field, z, TS, 2.0, **opts))(z0s)
    np.testing.assert_allclose(batched, vmapped, rtol=1e-13)
    g_b = jax.grad(lambda p: jnp.sum(jaxode.odesolve(_field, z0s, TS, p, batched=True, **opts)[:, -1]))(2.0)
    each = lambda p: jax.vmap(lambda z: jaxode.odesolve(_field, z, TS, p, **opts))(z0s)
    g_v = jax.grad(lambda p: jnp.sum(each(p)[:, -1]))(2.0)
    np.testing.assert_allclose(g_b, g_v, rtol=1e-4)


def test_get_method():
    assert get_method("tsit5") is METHODS["tsit5"]
    assert get_method(HEUN_EULER_TABLEAU) == ExplicitRK(HEUN_EULER_TABLEAU)
    custom = HeunEuler()
    assert get_method(custom) is custom
    with pytest.raises(ValueError, match="unknown solver 'nope'.*'tsit5'"):
        get_method("nope")
    assert hash(get_method("dopri5")) == hash(ExplicitRK(jaxode.SOLVERS["dopri5"]))
