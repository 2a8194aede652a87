"""The loop's step options (``jaxode.loop``): ``max_dt``, ``jump_ts``, ``info.final_time``,
``info.num_jacobians``."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import Recorder, failure_cause

import jaxode


def _decay(z, t, p):
    return -p * z


@functools.cache
def _with_max_dt(gradient):
    def run(z0, p, max_dt, ts):
        opts = dict(dense=True, full_output=True, gradient=gradient, max_steps=256)
        return jaxode.odesolve(_decay, z0, ts, p, max_dt=max_dt, **opts)
    return jax.jit(run)


@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
@pytest.mark.parametrize("ts", [jnp.array([0.0, 0.5, 3.0]), jnp.array([3.0, 1.0, -1.0])])
def test_max_dt_bounds_every_step(gradient, ts):
    """Every accepted step is at most max_dt long (the controller alone takes steps of ~1 on
    this smooth decay); a traced max_dt does not recompile."""
    z0, p = jnp.array([1.0, 2.0]), 0.5
    free = jaxode.odesolve(_decay, z0, ts, p, full_output=True, dense=True)
    for max_dt in (0.3, 0.07):
        ys, info, sol = _with_max_dt(gradient)(z0, p, max_dt, ts)
        k = int(info.num_accepted)
        h = np.asarray(sol.steps.h[:k])
        assert np.all(h <= max_dt * (1 + 1e-12)), h.max()
        assert k >= np.ceil(abs(float(ts[-1] - ts[0])) / max_dt)
        np.testing.assert_allclose(ys, z0 * np.exp(-p * (ts - ts[0]))[:, None], rtol=1e-5)
    assert 3 * int(free[1].num_accepted) < k
    assert _with_max_dt(gradient)._cache_size() == 1


@pytest.mark.slow
def test_max_dt_gradient_matches_without_bound():
    """The bound changes the steps, not what is computed: gradients agree with the analytic one."""
    ts = jnp.array([0.0, 2.0])
    for gradient in ("adjoint", "backprop", "checkpoint"):
        opts = dict(max_dt=0.05, gradient=gradient, rtol=1e-9, atol=1e-9)
        g = jax.grad(lambda p: jaxode.odesolve(_decay, jnp.array([1.0]), ts, p, **opts)[-1, 0])(0.7)
        np.testing.assert_allclose(g, -2.0 * np.exp(-1.4), rtol=1e-6)


def test_bad_max_dt():
    ts = jnp.array([0.0, 1.0])
    for bad in (0.0, -1.0, float("nan"), float("inf") * 0):
        with pytest.raises(ValueError, match="max_dt"):
            jaxode.odesolve(_decay, jnp.ones(1), ts, 1.0, max_dt=bad)
    solve = jax.jit(lambda m: jaxode.odesolve(_decay, jnp.ones(1), ts, 1.0, max_dt=m))
    with pytest.raises(Exception) as err:
        jax.block_until_ready(solve(-0.1))
    assert "max_dt" in failure_cause(err.value)


def _switched(recorder=None):
    """``z' = 1`` before t = 1.3, ``z' = -2 z`` after: f jumps at 1.3."""

    def f(z, t, p):
        if recorder is not None:
            recorder.record(t)
        return jnp.where(t < 1.3, jnp.ones_like(z), -p * z)

    return f


def _switched_exact(t, p=2.0):
    t = np.asarray(t)
    return np.where(t < 1.3, t, 1.3 * np.exp(-p * (t - 1.3)))


@pytest.mark.parametrize("solver", ["tsit5", "dopri8", "bosh3"])
def test_jump_is_landed_on_and_costs_fewer_rejections(solver):
    """With jump_ts the solver lands exactly on the jump (a step ends at 1.3 exactly), no
    stage is evaluated past it by the step that lands there, and the solve rejects fewer steps
    (and is more accurate) than without."""
    recorder = Recorder()
    ts = jnp.array([0.0, 0.9, 3.0])
    opts = dict(solver=solver, rtol=1e-8, atol=1e-8, full_output=True, dense=True)
    _, plain, _ = jaxode.odesolve(_switched(), jnp.zeros(1), ts, 2.0, **opts)
    jumps = jnp.array([1.3, 7.0])
    ys, info, sol = jaxode.odesolve(_switched(recorder), jnp.zeros(1), ts, 2.0, jump_ts=jumps, **opts)
    times = recorder.collect()
    starts = np.asarray(sol.steps.t[: int(info.num_accepted)])
    assert 1.3 in starts  # the step after the jump starts exactly on it
    assert np.any(times == np.nextafter(1.3, np.inf))  # the restart: f just after the jump
    assert int(info.num_rejected) < int(plain.num_rejected)
    np.testing.assert_allclose(ys[:, 0], _switched_exact(ts), rtol=1e-6, atol=1e-9)
    # nothing evaluated at 1.3 or later by steps that end there: after it only by the restart and on
    assert np.sum((times >= 1.3) & (times < np.nextafter(1.3, np.inf))) == 0


@pytest.mark.parametrize("gradient", ["adjoint", "backprop", "checkpoint"])
def test_jump_gradients(gradient):
    """Gradients with a jump (both solves land on it): against the analytic derivative of
    z(3) = 1.3 exp(-p (3 - 1.3)), and backwards in time."""
    ts = jnp.array([0.0, 3.0])
    loss = lambda p: jaxode.odesolve(_switched(), jnp.zeros(1), ts, p, jump_ts=[1.3], gradient=gradient,
                                     rtol=1e-10, atol=1e-10)[-1, 0]
    np.testing.assert_allclose(jax.grad(loss)(2.0), -1.7 * 1.3 * np.exp(-2.0 * 1.7), rtol=1e-6)


def test_jump_backwards_in_time():
    ts = jnp.array([3.0, 0.0])
    z3 = jnp.array([1.3 * np.exp(-2.0 * 1.7)])
    ys, info = jaxode.odesolve(_switched(), z3, ts, 2.0, jump_ts=jnp.array([1.3]), rtol=1e-10, atol=1e-10,
                               full_output=True)
    _, plain = jaxode.odesolve(_switched(), z3, ts, 2.0, rtol=1e-10, atol=1e-10, full_output=True)
    np.testing.assert_allclose(ys[-1, 0], 0.0, atol=1e-8)
    assert int(info.num_rejected) < int(plain.num_rejected)


def test_bad_jump_ts():
    ts = jnp.array([0.0, 1.0])
    with pytest.raises(ValueError, match="jump_ts"):
        jaxode.odesolve(_decay, jnp.ones(1), ts, 1.0, jump_ts=jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="jump_ts"):
        jaxode.odesolve(_decay, jnp.ones(1), ts, 1.0, jump_ts=[0.5, float("nan")])


@pytest.mark.parametrize("gradient", ["adjoint", "backprop", "checkpoint"])
def test_final_time_on_success_and_failure(gradient):
    """info.final_time is ts[-1] on success; after a failure (throw=False) the time the last
    accepted step reached (that of the last output reached or later, before the next)."""
    ts = jnp.linspace(0.0, 10.0, 11)
    _, ok = jaxode.odesolve(_decay, jnp.ones(1), ts, 1.0, full_output=True, gradient=gradient)
    assert float(ok.final_time) == 10.0 and int(ok.num_jacobians) == 0
    ys, info, sol = jaxode.odesolve(_decay, jnp.ones(1), ts, 1.0, full_output=True, throw=False, max_dt=0.1,
                                    max_steps=25, gradient=gradient, dense=True)
    assert int(info.status) == 1
    k = int(info.num_accepted)
    last_end = float(sol.steps.t[k - 1] + sol.steps.h[k - 1])
    np.testing.assert_allclose(float(info.final_time), last_end, rtol=1e-14)
    reached = np.asarray(ts)[np.isfinite(np.asarray(ys[:, 0]))]
    assert reached[-1] <= float(info.final_time) < reached[-1] + 1.0
    back = jaxode.odesolve(_decay, jnp.ones(1), -ts, 1.0, full_output=True, throw=False, max_steps=3)[1]
    assert -10.0 < float(back.final_time) < 0.0
