"""Time and step-size handling: large |t| (the step is the one time advanced by), the time dtype
(mixed precision, float16/bfloat16 states), the underflow test at the current time, invalid
tolerances and a non-finite start stop the loop at once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxode
from jaxode import errors

T_BIG = 1e9


def _oscillator(z, t, p):
    return jnp.stack([z[1], -z[0]])


def _exact_oscillator(t, t0, z0):
    c, s = np.cos(t - t0), np.sin(t - t0)
    return np.stack([c * z0[0] + s * z0[1], -s * z0[0] + c * z0[1]], axis=-1)


# ---- item 4: time drift at large |t| -----------------------------------------------------------

# diffrax 0.7.2 on the same problem: 1.4e-10 (tsit5), 6.3e-11 (dopri8), 2.6e-9 (bosh3)
LARGE_T_BOUNDS = {"tsit5": 1e-9, "dopri8": 1e-9, "bosh3": 1e-8}


@pytest.mark.parametrize("name", list(LARGE_T_BOUNDS))
def test_adaptive_accuracy_does_not_drift_at_large_t(name):
    """The harmonic oscillator on [1e9, 1e9 + 10] (time resolution 1.2e-7): each step must
    advance ``y`` by the step that ``t`` really advanced by."""
    ts = T_BIG + jnp.linspace(0.0, 10.0, 5)
    z0 = np.array([1.0, 0.5])
    ys = jaxode.odesolve(_oscillator, jnp.asarray(z0), ts, solver=name, rtol=1e-10, atol=1e-10,
                         max_steps=50_000)
    exact = _exact_oscillator(np.asarray(ts), T_BIG, z0)
    assert np.max(np.abs(np.asarray(ys) - exact)) < LARGE_T_BOUNDS[name]


@pytest.fixture(scope="module")
def rk4_stiff_decay():
    """rk4 on ``z' = -1e8 z`` from ``t0`` over 1e-9 with dt0 = 1e-11 (100 steps of h·λ = 1e-3)."""
    return jax.jit(lambda t0: jaxode.odesolve(lambda z, t, p: -1e8 * z, jnp.array([1.0]),
                                              jnp.stack([t0, t0 + 1e-9]), solver="rk4", dt0=1e-11))


@pytest.mark.parametrize("t0", [1.0, 1e3])
def test_fixed_step_advances_by_the_rounded_step(rk4_stiff_decay, t0):
    ys = rk4_stiff_decay(jnp.asarray(t0))
    dt = float((jnp.asarray(t0) + 1e-9) - t0)  # the span as ts holds it
    np.testing.assert_allclose(float(ys[-1, 0]), np.exp(-1e8 * dt), rtol=1e-13)


def test_adjoint_gradient_at_large_t():
    """The adjoint's backward solve (stopping at each output) at large t: ∂z(T)/∂z0 of the
    oscillator is the rotation by T - t0."""
    ts = T_BIG + jnp.array([0.0, 4.0, 10.0])
    loss = lambda z0: jaxode.odesolve(_oscillator, z0, ts, rtol=1e-10, atol=1e-10)[-1, 0]
    g = jax.grad(loss)(jnp.array([1.0, 0.5]))
    np.testing.assert_allclose(np.asarray(g), [np.cos(10.0), np.sin(10.0)], rtol=0, atol=1e-8)


def test_fixed_step_too_small_for_the_time_is_underflow():
    """rk4 with dt0 below the time's resolution at t = 1e9: ``t + dt0 == t``, so the solve
    stops at once with a step size underflow (not max_steps of steps that never move)."""
    ys, info = jaxode.odesolve(_oscillator, jnp.array([1.0, 0.0]), T_BIG + jnp.array([0.0, 1.0]),
                               solver="rk4", dt0=1e-8, throw=False, full_output=True)
    assert int(info.status) == errors.STEP_SIZE_UNDERFLOW and int(info.num_steps) == 0


# ---- item 7: the time dtype ---------------------------------------------------------------------


def test_float32_state_with_float64_times_runs_in_float64_time():
    seen = []

    def f(z, t, p):
        seen.append(t.dtype)
        return -z

    ts = jnp.array([1e4, 1e4 + 1.0])  # float64: float32 would resolve t only to 1e-3
    ys, info = jaxode.odesolve(f, jnp.array([1.0], jnp.float32), ts, rtol=1e-6, atol=1e-7, full_output=True)
    assert ys.dtype == jnp.float32 and int(info.status) == 0
    assert set(seen) == {jnp.dtype(jnp.float64)}
    np.testing.assert_allclose(float(ys[-1, 0]), np.exp(-1.0), rtol=1e-5)


def test_float32_state_adjoint_gradient_with_float64_times():
    """``z' = -p cos(t) z`` at t ~ 1e4 (float64 times, float32 state): the adjoint's backward
    solve runs on the same float64 times; ∂z(T)/∂p = -(sin T - sin t0) z(T)."""
    f = lambda z, t, p: -p * z * jnp.cos(t).astype(z.dtype)
    ts = jnp.array([1e4, 1e4 + 0.5, 1e4 + 1.0])
    loss = lambda p: jaxode.odesolve(f, jnp.ones(1, jnp.float32), ts, p, rtol=1e-6, atol=1e-7)[-1, 0]
    value, grad = jax.value_and_grad(loss)(jnp.float32(0.7))
    delta = np.sin(1e4 + 1.0) - np.sin(1e4)
    np.testing.assert_allclose(float(value), np.exp(-0.7 * delta), rtol=2e-6)
    np.testing.assert_allclose(float(grad), -delta * np.exp(-0.7 * delta), rtol=2e-5)


# ---- items 11, 12: stop at once on a non-finite start or an invalid tolerance -------------------


@pytest.fixture(scope="module")
def traced_solve():
    """A jitted solve with traced z0, rtol, atol, dt0 (no trace-time check can see them)."""

    def solve(z0, rtol, atol, dt0, solver):
        f = lambda z, t, p: jnp.stack([z[1], -z[0] / (t - 1.0)])  # non-finite at t = 1
        return jaxode.odesolve(f, z0, jnp.array([0.0, 0.5]), solver=solver, rtol=rtol, atol=atol, dt0=dt0,
                               throw=False, full_output=True)

    return jax.jit(solve, static_argnames="solver")


@pytest.mark.parametrize("solver", ["tsit5", "rk4"])
def test_nan_initial_state_stops_at_once(traced_solve, solver):
    ys, info = traced_solve(jnp.array([jnp.nan, 0.0]), 1e-6, 1e-6, 0.01, solver=solver)
    assert int(info.status) == errors.NONFINITE and int(info.num_steps) == 0
    assert np.isnan(np.asarray(ys[1:])).all()


def test_nan_initial_field_stops_at_once():
    f = lambda z, t, p: jnp.stack([z[1], -z[0] / (t - 1.0)])
    solve = jax.jit(lambda t0: jaxode.odesolve(f, jnp.array([1.0, 0.0]), jnp.stack([t0, t0 + 1.0]),
                                               throw=False, full_output=True))
    ys, info = solve(1.0)  # f(z0, 1) divides by zero
    assert int(info.status) == errors.NONFINITE and int(info.num_steps) == 0


@pytest.mark.parametrize("rtol, atol, dt0", [(np.nan, 1e-6, None), (1e-6, -1.0, None), (1e-6, 1e-6, np.nan),
                                             (1e-6, np.inf, None), (1e-6, 1e-6, -0.1)])
def test_invalid_traced_tolerance_is_reported(traced_solve, rtol, atol, dt0):
    ys, info = traced_solve(jnp.array([1.0, 0.0]), rtol, atol, dt0, solver="tsit5")
    assert int(info.status) == errors.INVALID_TOLERANCE and int(info.num_steps) == 0
    assert np.isnan(np.asarray(ys[1:])).all()


def test_invalid_traced_tolerance_raises_naming_it():
    solve = jax.jit(lambda rtol: jaxode.odesolve(_oscillator, jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]),
                                                 rtol=rtol))
    with pytest.raises(Exception, match="invalid traced rtol, atol, dt0 or max_dt"):
        jax.block_until_ready(solve(jnp.nan))


@pytest.mark.parametrize("name", ["tsit5", "dopri8", "bosh3"])
def test_atol_zero_with_zero_components(name):
    """atol = 0: the zero components (here: the second initially, the third always) must not
    turn the automatic first step or the error norm into 0/0."""
    f = lambda z, t, p: jnp.stack([z[1], -z[0], -z[2]])
    ts = jnp.array([0.0, 1.0, 3.0])
    ys, info = jaxode.odesolve(f, jnp.array([1.0, 0.0, 0.0]), ts, solver=name, rtol=1e-8, atol=0.0,
                               full_output=True)
    assert int(info.status) == 0
    exact = _exact_oscillator(np.asarray(ts), 0.0, np.array([1.0, 0.0]))
    np.testing.assert_allclose(np.asarray(ys[:, :2]), exact, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(ys[:, 2]), 0.0)


# ---- item 13: underflow means t + h == t, at the current time -----------------------------------


def test_float32_long_horizon_no_false_underflow():
    f = lambda z, t, p: -1000 * jnp.exp(-1000 * t) * jnp.ones_like(z)  # z = exp(-1000 t)
    ts = jnp.array([0.0, 1e-3, 1e4], jnp.float32)
    ys, info = jaxode.odesolve(f, jnp.array([1.0], jnp.float32), ts, rtol=1e-4, atol=1e-6, full_output=True,
                               throw=False)
    assert int(info.status) == 0
    np.testing.assert_allclose(np.asarray(ys[:, 0]), np.exp(-1000 * np.asarray(ts, np.float64)), atol=1e-4)


def test_tiny_first_step_is_tried():
    ys, info = jaxode.odesolve(lambda z, t, p: -z, jnp.array([1.0]), jnp.array([0.0, 1.0]), dt0=1e-16,
                               rtol=1e-8, atol=1e-8, full_output=True)
    assert int(info.status) == 0
    np.testing.assert_allclose(float(ys[-1, 0]), np.exp(-1.0), rtol=1e-7)


def test_underflow_still_detected():
    """A solution that blows up at t = 1: the step must shrink until t + h == t and stop there."""
    ys, info = jaxode.odesolve(lambda z, t, p: z**2, jnp.array([1.0]), jnp.array([0.0, 2.0]), throw=False,
                               full_output=True, max_steps=100_000)
    assert int(info.status) in (errors.STEP_SIZE_UNDERFLOW, errors.NONFINITE)
    assert int(info.num_steps) < 10_000


# ---- item 15: float16 and bfloat16 states ---------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("solver", ["tsit5", "rk4"])
def test_half_precision_state(dtype, solver):
    ts = jnp.array([0.0, 0.5, 2.0], jnp.float32)
    ys, info = jaxode.odesolve(_oscillator, jnp.array([1.0, 0.0], dtype), ts, solver=solver, rtol=1e-2,
                               atol=1e-3, dt0=0.1 if solver == "rk4" else None, full_output=True)
    assert ys.dtype == dtype and int(info.status) == 0
    tol = 2e-2 if dtype == jnp.bfloat16 else 5e-3
    exact = _exact_oscillator(np.asarray(ts, np.float64), 0.0, np.array([1.0, 0.0]))
    np.testing.assert_allclose(np.asarray(ys, np.float64), exact, rtol=0, atol=tol)
