"""The interpolating adjoint (``jaxode.interpolated_adjoint``, ``adjoint_interpolate=True``):
``z`` read off forward re-solves, the parameter and time adjoints as quadratures."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from conftest import loop_emitters

import jaxode


def _forced(z, t, p):
    return -p[0] * z + p[1] * jnp.sin(3.0 * t) * z[::-1]


P = jnp.array([0.7, 0.4])
Z0 = jnp.array([1.0, -0.5])
TS = jnp.array([0.0, 0.4, 1.1, 2.0])


def _loss(gradient, interpolate, solver="tsit5", tol=1e-10):
    def loss(z0, p, ts):
        ys = jaxode.odesolve(_forced, z0, ts, p, solver=solver, rtol=tol, atol=tol, gradient=gradient,
                             adjoint_interpolate=interpolate)
        return jnp.sum(jnp.sin(ys) * jnp.arange(1.0, 1.0 + ys.size).reshape(ys.shape))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


@pytest.mark.parametrize("solver", ["tsit5", pytest.param("dopri8", marks=pytest.mark.slow),
                                    pytest.param("bosh3", marks=pytest.mark.slow)])
def test_gradients_match_backprop(solver):
    """All of ∂L/∂z0, ∂L/∂θ, ∂L/∂ts (outputs inside the loss too) agree with the exact derivative
    of the computed solution at tight tolerance."""
    tol = 1e-8 if solver == "bosh3" else 1e-10
    got = _loss("adjoint", True, solver, tol)(Z0, P, TS)
    want = _loss("backprop", None, "dopri8", 1e-12)(Z0, P, TS)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5 if solver == "bosh3" else 1e-7, atol=1e-9)


@pytest.mark.slow
def test_batched_and_vmapped():
    z0s = jnp.array([[1.0, -0.5], [0.2, 0.3], [-1.0, 0.0]])
    opts = dict(rtol=1e-10, atol=1e-10, adjoint_interpolate=True)
    batched = jax.grad(lambda p: jnp.sum(jaxode.odesolve(_forced, z0s, TS, p, batched=True, **opts) ** 2))(P)
    each = lambda p: jax.vmap(lambda z: jaxode.odesolve(_forced, z, TS, p, gradient="backprop", rtol=1e-10,
                                                        atol=1e-10))(z0s)
    np.testing.assert_allclose(batched, jax.grad(lambda p: jnp.sum(each(p) ** 2))(P), rtol=1e-7)


@functools.cache
def _stiff_system():
    """``z' = p A z`` with the eigenvalues of ``A`` spread over -1 ... -1000."""
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    return jnp.asarray(q @ np.diag([-1.0, -10.0, -100.0, -1000.0]) @ q.T)


def _linear(z, t, p):
    return p * (_stiff_system() @ z)


def test_stiff_decay_gradient_where_the_backsolve_fails():
    """On a stiff decaying system the backsolve adjoint integrates z backwards, where the fast
    mode grows like e^{1000 t}: it fails (or is far off); the interpolating adjoint matches the
    analytic gradient through expm. (Explicit tsit5 takes its stability-limited steps.)"""
    a = np.asarray(_stiff_system())
    z0, ts, p = jnp.array([1.0, 2.0, -1.0, 0.5]), jnp.array([0.0, 0.5, 1.0]), 1.0
    weights = jnp.array([[0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 2.0, 0.5], [0.3, 1.0, 1.0, -2.0]])

    def loss(z0, p, interpolate, throw=True):
        ys = jaxode.odesolve(_linear, z0, ts, p, rtol=1e-8, atol=1e-10, max_steps=20000, throw=throw,
                             adjoint_interpolate=interpolate)
        return jnp.sum(weights * ys)

    g_z0, g_p = jax.grad(loss, (0, 1))(z0, p, True)
    want_z0 = sum(scipy.linalg.expm(a * t).T @ np.asarray(w) for t, w in zip(np.asarray(ts), weights))
    want_p = sum(np.asarray(w) @ (t * a @ scipy.linalg.expm(a * t) @ np.asarray(z0))
                 for t, w in zip(np.asarray(ts), weights))
    np.testing.assert_allclose(g_z0, want_z0, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(g_p, want_p, rtol=1e-5)
    backsolve = jax.grad(loss, (0, 1))(z0, p, False, False)
    assert not np.allclose(backsolve[1], want_p, rtol=1e-3)  # NaN (failed) or far off


@pytest.mark.slow
def test_second_derivatives_refused_and_info():
    loss = lambda p: jnp.sum(jaxode.odesolve(_forced, Z0, TS, p, adjoint_interpolate=True))
    with pytest.raises(NotImplementedError, match="interpolating adjoint"):
        jax.hessian(loss)(P)
    (g_z0, _), (fwd, bwd) = jaxode.adjoint_backward_info(_forced, Z0, TS, P, adjoint_interpolate=True,
                                                          rtol=1e-10, atol=1e-10)
    want = jax.grad(lambda z: jnp.sum(jaxode.odesolve(_forced, z, TS, P, gradient="backprop", rtol=1e-10,
                                                        atol=1e-10)))(Z0)
    np.testing.assert_allclose(g_z0, want, rtol=1e-7)
    assert int(bwd.status) == 0 and int(bwd.num_steps) > 0 and float(bwd.final_time) == 0.0
    assert int(bwd.nfe) > int(fwd.nfe)  # the re-solves and quadratures are counted


@pytest.mark.parametrize(
    "solver", ["rodas5p", pytest.param("rosenbrock23", marks=pytest.mark.slow), "kvaerno5"]
)
def test_stiff_method_adjoint_is_the_interpolating_one(solver):
    """With an implicit method the adjoint interpolates by default: on z' = p A z with eigenvalues
    down to -1e4 its gradients match expm's; the backsolve (forced) fails or is far off.
    (kvaerno5 evaluates a stage past its step: z is then the last interpolant continued.)"""
    a = np.asarray(_stiff_system())
    z0, ts = jnp.array([1.0, 2.0, -1.0, 0.5]), jnp.array([0.0, 0.5, 1.0])
    stiffer = lambda z, t, p: 10.0 * _linear(z, t, p)  # eigenvalues -10 ... -1e4

    tol = 1e-9 if solver == "rodas5p" else 1e-7

    def loss(z0, p, interpolate=None, throw=True):
        ys = jaxode.odesolve(stiffer, z0, ts, p, solver=solver, rtol=tol, atol=tol * 1e-2, throw=throw,
                             adjoint_interpolate=interpolate, max_steps=4000)
        return jnp.sum(ys[-1]) + jnp.sum(ys[1] ** 2)

    g_z0, g_p = jax.grad(loss, (0, 1))(z0, 1.0)
    m = 10.0 * a
    e1, e2 = scipy.linalg.expm(0.5 * m), scipy.linalg.expm(m)
    z1, z2 = e1 @ np.asarray(z0), e2 @ np.asarray(z0)
    want_z0 = e2.T @ np.ones(4) + e1.T @ (2 * z1)
    want_p = np.ones(4) @ (m @ z2) + (2 * z1) @ (0.5 * m @ z1)
    rtol = {"rodas5p": 1e-6, "rosenbrock23": 1e-3, "kvaerno5": 1e-4}[solver]
    np.testing.assert_allclose(g_z0, want_z0, rtol=rtol, atol=1e-9)
    np.testing.assert_allclose(g_p, want_p, rtol=rtol)
    backsolve = jax.grad(loss, (0, 1))(z0, 1.0, False, False)
    assert not np.allclose(backsolve[1], want_p, rtol=1e-3)


@pytest.mark.parametrize("t_last", [1.5, 20.0])  # every interval within one segment; one over 128 steps
def test_one_resolve_per_interval_equals_the_segmented_backward(t_last):
    """An interval re-solved once (its steps fit in one segment's storage) and by checkpointed
    segments (the path a batch always takes) give the same gradient: to rounding where every
    interval fits in one 32-step segment, and through the fallback when one takes over 128."""
    from jaxode import interpolated_adjoint
    from jaxode.forward import Config, Controls
    from jaxode.methods import get_method

    tol = 1e-7
    ts = jnp.array([0.0, 0.3, 0.8, t_last])
    cfg = Config(method=get_method("tsit5"), max_steps=4096, interpolate=True)
    field = lambda z, t, p, _: _forced(z, t, p)
    p = jnp.array([0.05, 2.0])
    ys, info = jaxode.odesolve(_forced, Z0, ts, p, rtol=tol, atol=tol, full_output=True)
    ct = jnp.cos(ys)
    controls = Controls(rtol=jnp.asarray(tol), atol=jnp.asarray(tol), dt0=None)

    def backward(batched):
        run = lambda ys, p: interpolated_adjoint.backward(field, ys, ts, p, None, ct, controls, controls, cfg,
                                                          batched=batched)
        return jax.jit(run)(ys, p)

    once, segmented = backward(False), backward(True)
    assert int(once[3].status) == int(segmented[3].status) == 0
    assert (int(info.num_steps) < 32) == (t_last == 1.5) and (int(info.num_steps) > 140) == (t_last == 20.0)
    # to rounding; over 20 time units the loop emitters' rounding (tests/conftest.py) grows to ~5e-11
    rtol = 1e-10 if loop_emitters() and t_last == 20.0 else 1e-12
    for a, b in zip(once[:3], segmented[:3]):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-13)
