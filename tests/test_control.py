"""Step-size control (``jaxode.control``): the error norm, the PI controller, the first step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import Recorder

import jaxode
from jaxode.control import error_ratio, initial_step, rms_norm, step_factor
from jaxode.methods.explicit import ExplicitRK
from jaxode.methods.tableaus import SOLVERS


def field(y, t):
    return -2.0 * t * y**2  # y = 1 / (1 + t^2) / y0-scaled; nonlinear and non-autonomous


def test_rms_norm_segments():
    x = jnp.array([3.0, 4.0, 0.0, 0.0, 0.0, 12.0])
    np.testing.assert_allclose(rms_norm(x, ((0, 6),)), np.sqrt(169 / 6), rtol=1e-15)
    # per-segment RMS combined by max: sqrt(25/2) vs sqrt(144/4)
    np.testing.assert_allclose(rms_norm(x, ((0, 2), (2, 6))), 6.0, rtol=1e-15)


def test_error_ratio_matches_definition_and_nan_is_inf():
    tab = SOLVERS["dopri5"]
    y = jnp.array([1.0, -2.0, 0.5])
    st = ExplicitRK(tab).step(lambda y, t: jnp.sin(y) * t, 0.2, y, 0.5, jnp.sin(y) * 0.2, (), 0.7)
    rtol, atol = 1e-4, 1e-6
    scale = atol + rtol * np.maximum(np.abs(y), np.abs(st.y_new))
    error = st.error[0]
    expected = np.sqrt(np.mean((np.asarray(error) / scale) ** 2))
    np.testing.assert_allclose(error_ratio(error, y, st.y_new, rtol, atol, ((0, 3),)), expected, rtol=1e-12)
    bad = error.at[1].set(jnp.nan)
    assert float(error_ratio(bad, y, st.y_new, rtol, atol, ((0, 3),))) == np.inf


def test_step_factor_controller_properties():
    """The controller's properties, independent of its exact PI coefficients: it shrinks a step
    whose error is too large and grows one whose error is small, monotonically; the safety
    factor keeps ratio = 1 below 1; it is clipped to [0.2, 10] ([0.2, 1] after a rejection);
    after a rejection it follows ratio^(-1/k); a larger previous error allows a larger step (PI);
    a non-finite ratio shrinks by 0.2."""
    ratios = jnp.logspace(-6, 6, 49)
    for q in (2, 4, 7):
        acc = np.asarray(jax.vmap(lambda r: step_factor(r, 0.5, True, q))(ratios))
        rej = np.asarray(jax.vmap(lambda r: step_factor(r, 0.5, False, q))(ratios))
        assert np.all(np.diff(acc) <= 0) and np.all(np.diff(rej) <= 0)
        assert acc.max() <= 10.0 and acc.min() >= 0.2 - 1e-15
        assert rej.max() <= 1.0 and rej.min() >= 0.2 - 1e-15
        assert float(step_factor(1.0, 1.0, True, q)) < 1.0
        assert float(step_factor(1e-3, 1.0, True, q)) > 1.0
        assert float(step_factor(1e-30, 1.0, True, q)) == pytest.approx(10.0)
        assert float(step_factor(1e30, 1.0, True, q)) == pytest.approx(0.2)
        np.testing.assert_allclose(step_factor(2.0, 0.5, False, q), 0.9 * 2.0 ** (-1 / (q + 1)), rtol=1e-14)
        assert float(step_factor(0.5, 0.9, True, q)) >= float(step_factor(0.5, 0.1, True, q))
        for bad in (jnp.inf, jnp.nan):
            assert float(step_factor(bad, 1.0, False, q)) == pytest.approx(0.2)
            assert float(step_factor(bad, 1.0, True, q)) == pytest.approx(0.2)


def hairer_initial_step(f, t0, y0, order, rtol, atol, span):
    """Hairer, Nørsett & Wanner, Solving ODEs I, II.4 (RMS norms), written out independently;
    the exponent 1/order is that of HINIT in Hairer's DOPRI5 and DOP853 (IORD = 5, 8)."""
    y0 = np.asarray(y0, dtype=np.float64)
    sc = atol + np.abs(y0) * rtol
    f0 = f(y0, t0)
    d0 = np.sqrt(np.mean((y0 / sc) ** 2))
    d1 = np.sqrt(np.mean((f0 / sc) ** 2))
    h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
    h0 = min(h0, span)
    f1 = f(y0 + h0 * f0, t0 + h0)
    d2 = np.sqrt(np.mean(((f1 - f0) / sc) ** 2)) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / order)
    return min(100 * h0, h1, span)


@pytest.mark.parametrize("y0, t0, span", [([0.8, -0.3], 0.3, 10.0), ([1e-9], 0.0, 10.0), ([0.8], 0.3, 1e-3)])
def test_initial_step_matches_hairer(y0, t0, span):
    np_f = lambda y, t: np.cos(t) * y - y**3
    jf = lambda y, t: jnp.cos(t) * y - y**3
    y0 = jnp.array(y0)
    for name in ("bosh3", "dopri5", "dopri8"):
        order = SOLVERS[name].order
        got = initial_step(jf, t0, y0, jf(y0, t0), span, order, 1e-6, 1e-8, ((0, y0.shape[0]),))
        expected = hairer_initial_step(np_f, t0, np.asarray(y0), order, 1e-6, 1e-8, span)
        np.testing.assert_allclose(float(got), expected, rtol=1e-12)


def test_first_step_of_a_solve_is_hairers(recorder: Recorder):
    """In a real solve with dt0=None the first step taken is the automatic one (not 0.01):
    read from the evaluation times: t0, the Euler probe t0 + h0, then the stages t0 + c_i h."""
    tab = SOLVERS["dopri5"]

    def f(z, t, p):
        recorder.record(t)
        return jnp.cos(t) * z - z**3

    ys = jaxode.odesolve(f, jnp.array([0.8]), jnp.array([0.3, 5.0]), solver="dopri5", rtol=1e-6, atol=1e-8)
    times = recorder.collect()
    assert np.isfinite(ys).all()
    expected = hairer_initial_step(lambda y, t: np.cos(t) * y - y**3, 0.3, np.array([0.8]), tab.order,
                                   1e-6, 1e-8, 4.7)
    h_first = (times[2] - 0.3) / tab.c[1]
    np.testing.assert_allclose(h_first, expected, rtol=1e-10)
    assert abs(h_first - 0.01) > 1e-3
    np.testing.assert_allclose(times[2:8], 0.3 + np.array(tab.c[1:]) * h_first, rtol=1e-12)

