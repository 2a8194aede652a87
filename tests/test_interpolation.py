"""Dense output: the interpolant inside a step, and many output times in a solve."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ADAPTIVE_SOLVERS, Recorder, logistic_exact

import jaxode
from jaxode.interpolation import evaluate
from jaxode.methods import METHODS


def field(y, t):
    return -2.0 * t * y**2


def exact(t, t0, y0):
    return 1.0 / (t**2 + 1.0 / y0 - t0**2)


def _step_and_interpolant(method, y0, t0, h):
    """One step of ``method`` and its interpolant's coefficients."""
    st = method.step(field, t0, y0, h, field(y0, t0), (), t0 + h)
    return st, method.interpolant(field, t0, y0, h, st.dense, st.y_new, st.f_new)


def _interpolant(name):
    method = METHODS[name]

    @jax.jit
    def run(y0, h, theta):
        st, coeffs = _step_and_interpolant(method, y0, 0.3, h)
        return method.interpolate(y0, coeffs, theta), st.y_new

    return run


@pytest.mark.parametrize("name", ADAPTIVE_SOLVERS)
def test_interpolant_endpoints(name):
    run = _interpolant(name)
    y0 = jnp.array([0.8, -0.4, 1.5])
    at0, y_new = run(y0, 0.2, 0.0)
    at1, _ = run(y0, 0.2, 1.0)
    np.testing.assert_allclose(at0, y0, rtol=0, atol=0)
    np.testing.assert_allclose(at1, y_new, rtol=1e-12, atol=1e-13)
    # y(θ = 0) = y0 holds for any coefficients; the slopes check them: dy/dθ = h f(t, y(θ))
    # at both ends (the interpolant is C1 across steps)
    slope = lambda theta: jax.jvp(lambda th: run(y0, 0.2, th)[0], (theta,), (1.0,))[1]
    np.testing.assert_allclose(slope(0.0), 0.2 * field(y0, 0.3), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(slope(1.0), 0.2 * field(y_new, 0.5), rtol=1e-12, atol=1e-13)


# (step sizes, expected slope of the interpolation error at θ = 0.37, tolerance): dopri5/tsit5
# have 4th-order interpolants (local error h^5), dopri8 a 7th-order one (h^8), bosh3 the cubic
# Hermite (h^4).
INTERP_ORDERS = {"bosh3": (0.05, 4, 0.5), "dopri5": (0.1, 5, 0.3), "tsit5": (0.1, 5, 0.3),
                 "dopri8": (0.4, 8, 0.8)}


@pytest.mark.parametrize("name", ADAPTIVE_SOLVERS)
def test_interpolant_order(name):
    run = _interpolant(name)
    base, slope, tol = INTERP_ORDERS[name]
    hs = base * 0.5 ** np.arange(3)
    errs = np.array([abs(float(run(jnp.array([0.8]), h, 0.37)[0][0]) - exact(0.3 + 0.37 * h, 0.3, 0.8))
                     for h in hs])
    np.testing.assert_allclose(np.log2(errs[:-1] / errs[1:]), slope, atol=tol)


def test_evaluate_is_polynomial():
    y = jnp.array([1.0, 2.0])
    coeffs = jnp.array([[0.5, -1.0], [0.25, 3.0], [-2.0, 0.125]])
    for theta in (0.0, 0.3, 1.0):
        expected = y + theta * coeffs[0] + theta**2 * coeffs[1] + theta**3 * coeffs[2]
        np.testing.assert_allclose(evaluate(y, coeffs, theta), expected, rtol=1e-15)


def test_hermite_dense_for_tableau_without_dense_matrix():
    """bosh3 has no dense matrix: the cubic Hermite interpolant matches values and slopes at both ends."""
    method = METHODS["bosh3"]
    assert method.tableau.dense is None
    y0, h, t0 = jnp.array([0.8]), 0.2, 0.3
    st, coeffs = _step_and_interpolant(method, y0, t0, h)
    p = lambda th: evaluate(y0, coeffs, th)
    dp = jax.jacfwd(p)
    np.testing.assert_allclose(p(1.0), st.y_new, rtol=1e-14)
    np.testing.assert_allclose(dp(0.0) / h, field(y0, t0), rtol=1e-13)
    np.testing.assert_allclose(dp(1.0) / h, field(st.y_new, t0 + h), rtol=1e-13)


@functools.cache
def _logistic_solver(name):
    f = lambda z, t, p: z * (1 - z)
    return jax.jit(lambda ts, tol: jaxode.odesolve(f, jnp.array([0.1]), ts, solver=name, rtol=tol, atol=tol,
                                                   full_output=True))


TS_MANY = jnp.linspace(0.0, 8.0, 1000)


@pytest.mark.parametrize("name", ADAPTIVE_SOLVERS)
def test_many_outputs_within_tolerance(name):
    """1000 output times of the logistic equation (the analytic-solution accuracy test of every
    adaptive solver on it, at both tolerances)."""
    for tol in (1e-6, 1e-9):
        ys, info = _logistic_solver(name)(TS_MANY, tol)
        assert int(info.status) == 0
        err = np.max(np.abs(np.asarray(ys[:, 0]) - logistic_exact(np.asarray(TS_MANY))))
        assert err < 20 * tol, (tol, err)
        assert ys[0, 0] == 0.1


@pytest.mark.parametrize("name", ["tsit5", "dopri8"])
def test_outputs_do_not_stop_the_solver(name):
    solve = _logistic_solver(name)
    for tol in (1e-6, 1e-9):
        ys, info = solve(TS_MANY, tol)
        ys2, info2 = solve(TS_MANY[jnp.array([0, -1])], tol)
        # outputs are interpolated: the step sequence is the same, the end point identical
        assert int(info.num_steps) == int(info2.num_steps)
        assert int(info.num_accepted) == int(info2.num_accepted)
        assert float(ys[-1, 0]) == float(ys2[-1, 0])
        if name != "dopri8":
            assert int(info.nfe) == int(info2.nfe)
        else:  # 3 extra (dense) stages in each step with an output (with 2 outputs: only the last)
            assert int(info.nfe) == int(info2.nfe) + 3 * (int(info.num_accepted) - 1)


def test_dopri8_extra_stages_only_in_steps_with_outputs(recorder: Recorder):
    def f(z, t, p):
        recorder.record(t)
        return z * (1 - z)

    solve = jax.jit(lambda ts: jaxode.odesolve(f, jnp.array([0.1]), ts, solver="dopri8", rtol=1e-10,
                                               atol=1e-10, full_output=True))
    _, info2 = solve(jnp.array([0.0, 8.0]))
    times2 = recorder.collect()
    n2 = len(times2)
    recorder.clear()
    ts3 = jnp.array([0.0, 4.0, 8.0])
    ys3, info3 = solve(ts3)
    n3 = len(recorder.collect())
    assert int(info2.nfe) == n2 and int(info3.nfe) == n3
    assert int(info3.num_steps) == int(info2.num_steps)
    # one more step holds an output: 3 more evaluations, unless t=4 is a step's end (then its
    # last stage, at c = 1, was evaluated at t=4 and the output needs no interpolation)
    assert n3 - n2 == (0 if np.any(times2 == 4.0) else 3)
    np.testing.assert_allclose(ys3[:, 0], 1.0 / (1.0 + 9.0 * np.exp(-np.asarray(ts3))), atol=1e-9)
