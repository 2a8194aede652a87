"""Gradients at degenerate points and of failed solves, in every gradient mode: no NaN from a
zero error estimate; ``throw=True`` enforced under ``jit`` of ``grad``/``jvp``/``vmap`` (where
the primal outputs are dead code); ``throw=False`` gives NaN gradients in every mode."""

from __future__ import annotations

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import failure_cause

import jaxode

MODES = ("adjoint", "backprop", "checkpoint")
TIGHT = dict(rtol=1e-9, atol=1e-9)


# ---- a zero error estimate (item 1) -----------------------------------------------------------------


def _switched_on(z, t, k):
    return jnp.where(t > 1.0, -k * z, 0.0 * z)  # f = 0 (so every error estimate is 0) until t = 1


def _linear(z, t, lam):
    return lam * z


@pytest.mark.parametrize("mode", MODES)
def test_zero_error_estimate_switched_field(mode):
    """z' = 0 on [0, 1], z' = -z on (1, 3]: ∂ z(3) / ∂ z0 = e^{-2} per component."""
    loss = lambda z0: jnp.sum(jaxode.odesolve(
        _switched_on, z0, jnp.array([0.0, 3.0]), 1.0, gradient=mode, **TIGHT)[-1])
    g = jax.jit(jax.grad(loss))(jnp.ones(2))
    np.testing.assert_allclose(g, np.exp(-2.0) * np.ones(2), rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_zero_error_estimate_zero_rate(mode):
    """z' = λ z at λ = 0: z(3) = z0 e^{3λ}, so ∂ Σ z(3) / ∂λ = 3 Σ z0 and ∂/∂z0 = 1."""
    z0 = jnp.array([1.0, -0.5])
    loss = lambda z0, lam: jnp.sum(jaxode.odesolve(
        _linear, z0, jnp.array([0.0, 3.0]), lam, gradient=mode, **TIGHT)[-1])
    g_z0, g_lam = jax.jit(jax.grad(loss, argnums=(0, 1)))(z0, 0.0)
    np.testing.assert_allclose(g_z0, np.ones(2), rtol=1e-12)
    np.testing.assert_allclose(g_lam, 3 * np.sum(z0), rtol=1e-9)


@pytest.fixture(scope="module")
def zero_last_layer_mlp():
    """A neural-ODE field whose last layer starts at zero (f = 0, so z(t) = z0)."""
    mlp = eqx.nn.MLP(2, 2, 4, 1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    last = mlp.layers[-1]
    mlp = eqx.tree_at(lambda m: (m.layers[-1].weight, m.layers[-1].bias), mlp,
                      (jnp.zeros_like(last.weight), jnp.zeros_like(last.bias)))
    return mlp


@pytest.mark.parametrize("mode", MODES)
def test_zero_error_estimate_zero_initialised_mlp(mode, zero_last_layer_mlp):
    """With f ≡ 0 at the start, a(t) = 1 and z(t) = z0, so ∂ Σ z(T) / ∂θ = T ∂ Σ f(z0) / ∂θ."""
    z0, t1 = jnp.array([0.3, -0.7]), 1.5
    field = lambda z, t, m: m(z)

    def loss(m):
        return jnp.sum(jaxode.odesolve(field, z0, jnp.array([0.0, t1]), m, gradient=mode, **TIGHT)[-1])

    got = eqx.filter_jit(eqx.filter_grad(loss))(zero_last_layer_mlp)
    want = eqx.filter_grad(lambda m: t1 * jnp.sum(m(z0)))(zero_last_layer_mlp)
    got, want = eqx.filter(got, eqx.is_inexact_array), eqx.filter(want, eqx.is_inexact_array)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12)


# ---- failed solves under transformations (item 2) ----------------------------------------------------


def _blow(z, t, p):
    return p * z**2  # z = 1 / (1 - p t): singular at t = 1 for p = 1


BLOW_TS = jnp.array([0.0, 0.5, 0.9, 1.5])
ONE = jnp.array([1.0])
CAUSES = {20: r"max_steps", 4096: r"underflow"}  # max_steps -> the failure it meets first


def _blow_loss(mode, max_steps, throw=True):
    def loss(p, z0=ONE):
        ys = jaxode.odesolve(_blow, z0, BLOW_TS, p, gradient=mode, max_steps=max_steps, throw=throw)
        return jnp.sum(ys)

    return loss


def _assert_raises_cause(fn, cause):
    with pytest.raises(Exception) as err:
        jax.block_until_ready(fn())
    message = failure_cause(err.value)
    assert re.search(cause, message), message


@pytest.mark.parametrize("max_steps", [4096, 20])
@pytest.mark.parametrize("mode", MODES)
def test_throw_under_jit_of_grad(mode, max_steps):
    """Only the gradient is returned: the primal outputs, which carried the check, are dead."""
    grad = jax.jit(jax.grad(_blow_loss(mode, max_steps)))
    _assert_raises_cause(lambda: grad(1.0), CAUSES[max_steps])


def test_throw_under_jit_of_jvp_tangent_only():
    solve = lambda p: jaxode.odesolve(_blow, jnp.array([1.0]), BLOW_TS, p, gradient="backprop")
    tangent = jax.jit(lambda p: jax.jvp(solve, (p,), (1.0,))[1])
    _assert_raises_cause(lambda: tangent(1.0), CAUSES[4096])


@pytest.mark.parametrize("mode", MODES)
def test_throw_under_vmap_of_grad(mode):
    """One element of the batch fails (p = 1 blows up at t = 1; p = 0.2 does not)."""
    grad = jax.jit(jax.vmap(jax.grad(_blow_loss(mode, 4096))))
    _assert_raises_cause(lambda: grad(jnp.array([0.2, 1.0])), CAUSES[4096])


def test_throw_with_only_info_used():
    def status(p):
        _, info = jaxode.odesolve(_blow, jnp.array([1.0]), BLOW_TS, p, full_output=True)
        return info.num_steps

    _assert_raises_cause(lambda: jax.jit(status)(1.0), CAUSES[4096])


@pytest.mark.parametrize("max_steps", [4096, 20])
@pytest.mark.parametrize("mode", MODES)
def test_failed_solve_without_throw_has_nan_gradients(mode, max_steps):
    """With throw=False every mode gives NaN for every gradient of a failed solve (not the
    gradient of the outputs that happened to be reached), and finite ones elsewhere in a batch."""
    grad = jax.jit(jax.vmap(jax.grad(_blow_loss(mode, max_steps, throw=False), argnums=(0, 1))))
    g_p, g_z0 = grad(jnp.array([1.0, 0.2]), jnp.array([[1.0], [1.0]]))
    assert np.isnan(g_p[0]) and np.all(np.isnan(g_z0[0]))
    if max_steps == 4096:  # z = 1 / (1 - p t): Σ_i ∂z(t_i)/∂p = Σ t_i z_i², ∂z(t_i)/∂z0 = z_i²
        z = 1 / (1 - 0.2 * np.asarray(BLOW_TS))
        np.testing.assert_allclose(g_p[1], np.sum(np.asarray(BLOW_TS) * z**2), rtol=1e-4)
        np.testing.assert_allclose(g_z0[1], [np.sum(z**2)], rtol=1e-4)


# ---- second derivatives (item 18) --------------------------------------------------------------------

DECAY_TS = jnp.array([0.0, 0.5, 1.2])


def _decay_loss(mode):
    """L(x) = Σ_i Σ_j z_j(t_i) for z' = -k z, x = [k, z0_0, z0_1]: z_j(t) = z0_j e^{-k t}."""

    def loss(x):
        ys = jaxode.odesolve(lambda z, t, k: -k * z, x[1:], DECAY_TS, x[0], gradient=mode,
                             rtol=1e-11, atol=1e-11)
        return jnp.sum(ys)

    return loss


def _decay_hessian(x):
    """H_kk = S Σ t_i² e^{-k t_i} (S = Σ z0), H_{k z0_j} = -Σ t_i e^{-k t_i}, H_{z0 z0} = 0."""
    k, s, t = float(x[0]), float(np.sum(x[1:])), np.asarray(DECAY_TS)
    e = np.exp(-k * t)
    cross = -np.sum(t * e)
    return np.array([[s * np.sum(t**2 * e), cross, cross], [cross, 0, 0], [cross, 0, 0]])


X = jnp.array([0.7, 1.0, -2.5])


@pytest.mark.parametrize("mode", MODES)
def test_hessian(mode):
    np.testing.assert_allclose(jax.jit(jax.hessian(_decay_loss(mode)))(X), _decay_hessian(X),
                               rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_grad_of_grad(mode):
    """Reverse over reverse: ∂/∂x of ∂L/∂k, the first row of the Hessian."""
    loss = _decay_loss(mode)
    g = jax.jit(jax.grad(lambda x: jax.grad(loss)(x)[0]))(X)
    np.testing.assert_allclose(g, _decay_hessian(X)[0], rtol=1e-7, atol=1e-9)


# ---- a rejected step attempt that overflowed ---------------------------------------------------------


def _cubic_decay(z, t, p):
    return -p * z**3  # z = z0 / sqrt(1 + 2 p z0² t); explicit stages from a huge step overflow


@pytest.mark.parametrize("mode", MODES)
def test_rejected_overflowing_step_leaves_gradients_finite(mode):
    """dt0 = 100 on z' = -z³: the first attempts overflow (inf, NaN stages) and are rejected.
    Their zero cotangents must not meet the infinite derivatives (0 · inf = NaN).
    At z0 = 1, p = 1: ∂z(t)/∂p = -t (1 + 2t)^{-3/2}, ∂z(t)/∂z0 = (1 + 2t)^{-3/2}."""
    t1 = 100.0

    def loss(z0, p):
        ys = jaxode.odesolve(_cubic_decay, z0, jnp.array([0.0, t1]), p, gradient=mode, dt0=t1, **TIGHT)
        return jnp.sum(ys[-1])

    g_z0, g_p = jax.jit(jax.grad(loss, argnums=(0, 1)))(ONE, 1.0)
    np.testing.assert_allclose(g_z0, [(1 + 2 * t1) ** -1.5], rtol=2e-5)
    np.testing.assert_allclose(g_p, -t1 * (1 + 2 * t1) ** -1.5, rtol=2e-5)


@pytest.mark.parametrize("mode", ["backprop", "checkpoint"])
def test_rejected_overflowing_step_of_one_vmapped_problem(mode):
    """The same under ``jax.vmap``, where one problem's first attempts overflow (z0 = 1) and the
    other's do not (z0 = 1e-3): the shared parameter's gradient is the sum of both exact ones,
    ∂z(t)/∂p = -t z0³ (1 + 2 p z0² t)^{-3/2} at p = 1."""
    t1, z0s = 100.0, jnp.array([[1.0], [1e-3]])

    def loss(p):
        solve = lambda z0: jaxode.odesolve(_cubic_decay, z0, jnp.array([0.0, t1]), p, gradient=mode, dt0=t1,
                                           **TIGHT)
        return jnp.sum(jax.vmap(solve)(z0s)[:, -1])

    want = sum(-t1 * z0**3 * (1 + 2 * z0**2 * t1) ** -1.5 for z0 in (1.0, 1e-3))
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(1.0), want, rtol=2e-5)
