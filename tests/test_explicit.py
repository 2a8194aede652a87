"""Explicit Runge–Kutta steps (``jaxode.methods.explicit``): order, FSAL, error estimates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ADAPTIVE_SOLVERS

from jaxode.methods.explicit import ExplicitRK
from jaxode.methods.tableaus import SOLVERS


def rk_step(tab, field, t0, y0, h, f0):
    """One step of ``tab`` by ``h`` from ``(t0, y0)``."""
    return ExplicitRK(tab).step(field, t0, y0, h, f0, (), t0 + h)


def field(y, t):
    return -2.0 * t * y**2  # y = 1 / (1 + t^2) / y0-scaled; nonlinear and non-autonomous


def exact(t, t0, y0):
    # y' = -2 t y^2  =>  1/y = t^2 + C
    return 1.0 / (t**2 + 1.0 / y0 - t0**2)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_local_error_order(name):
    """One step's error behaves like h^(p+1): halving h divides it by 2^(p+1); the error
    estimate like h^(q+1), q the embedded order."""
    tab = SOLVERS[name]
    t0, y0 = 0.3, jnp.array([0.8])
    step = jax.jit(lambda h: rk_step(tab, field, t0, y0, h, field(y0, t0)))
    hs = 0.05 * 0.5 ** np.arange(3)
    steps = [step(h) for h in hs]
    if tab.order <= 4:  # (5th and 8th order: the local error of this problem is at round-off)
        errs = np.array([abs(float(st.y_new[0]) - exact(t0 + h, t0, 0.8)) for st, h in zip(steps, hs)])
        np.testing.assert_allclose(np.log2(errs[:-1] / errs[1:]), tab.order + 1, atol=0.35)
    if tab.adaptive:
        # (DOP853's 5th-order estimate behaves like h^6; the controller uses error_order = 7
        # because the combination |e5|^2 / |e3| behaves like h^8)
        q = 5 if name == "dopri8" else tab.error_order
        ests = np.array([abs(float(st.error[0][0])) for st in steps])
        np.testing.assert_allclose(np.log2(ests[:-1] / ests[1:]), q + 1, atol=0.35)


@pytest.mark.parametrize("name", ADAPTIVE_SOLVERS)
def test_fsal_stage_is_f_at_new_point(name):
    tab = SOLVERS[name]
    t0, y0, h = 0.3, jnp.array([0.8, 1.3]), 0.25
    st = rk_step(tab, field, t0, y0, h, field(y0, t0))
    assert len(st.dense) == tab.num_stages
    np.testing.assert_allclose(st.f_new, field(st.y_new, t0 + h), rtol=1e-14)
    # the error estimate is h Σ e_i k_i
    expected = h * sum(e * k for e, k in zip(tab.b_error, st.dense))
    np.testing.assert_allclose(st.error[0], expected, rtol=1e-12, atol=1e-17)


def test_rk4_step_is_taylor_polynomial_on_linear_problem():
    # For y' = λy, classic RK4 gives y (1 + z + z^2/2 + z^3/6 + z^4/24), z = hλ.
    lam, h = -1.7, 0.3
    st = rk_step(SOLVERS["rk4"], lambda y, t: lam * y, 0.0, jnp.array([2.0]), h, jnp.array([2.0 * lam]))
    z = h * lam
    np.testing.assert_allclose(float(st.y_new[0]), 2.0 * (1 + z + z**2 / 2 + z**3 / 6 + z**4 / 24),
                               rtol=1e-15)
    assert st.error is None
    np.testing.assert_allclose(st.f_new, lam * st.y_new, rtol=1e-15)  # one more evaluation


def test_error_ratio_dop853_combination():
    tab = SOLVERS["dopri8"]
    y = jnp.array([1.0, 2.0])
    st = rk_step(tab, lambda y, t: -y * (1 + t), 0.0, y, 0.3, -y)
    rtol, atol = 1e-7, 1e-9
    scale = atol + rtol * np.maximum(np.abs(y), np.abs(st.y_new))
    e5 = np.sqrt(np.mean((np.asarray(st.error[0]) / scale) ** 2))
    e3 = np.sqrt(np.mean((np.asarray(st.error[1]) / scale) ** 2))
    np.testing.assert_allclose(ExplicitRK(tab).error_ratio(st, y, rtol, atol, ((0, 2),)),
                               e5**2 / np.sqrt(e5**2 + 0.01 * e3**2),
                               rtol=1e-12)


def test_error_ratio_dop853_nan_is_inf():
    tab = SOLVERS["dopri8"]
    y = jnp.array([1.0, 2.0])
    st = rk_step(tab, lambda y, t: -y, 0.0, y, 0.3, -y)
    bad = st._replace(error=tuple(e.at[0].set(jnp.nan) for e in st.error))
    assert float(ExplicitRK(tab).error_ratio(bad, y, 1e-6, 1e-6, ((0, 2),))) == np.inf
