"""The reverse-differentiable loop (jaxode/backprop.py) and the backprop gradient mode:
exact derivatives of the discrete solution, forward mode, second derivatives, training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from grad_utils import PARAMS, TOL, TS, Z0, central_difference, forced_oscillator, weighted_loss
from jax import lax

import jaxode
from jaxode.backprop import checkpointed_while


@pytest.mark.parametrize("max_steps", [1, 7, 64, 1000])
def test_checkpointed_while_matches_while_loop_and_differentiates(max_steps):
    """x <- x * a + 1 for as long as i < n (n data-dependent, capped by max_steps)."""
    n = jnp.array(13)
    cond = lambda s: s[0] < jnp.minimum(n, max_steps)  # noqa: E731

    def run(a, driver):
        body = lambda s: (s[0] + 1, s[1] * a + 1.0)  # noqa: E731
        if driver == "while":
            return lax.while_loop(cond, body, (0, jnp.array(0.5)))[1]
        return checkpointed_while(cond, body, (0, jnp.array(0.5)), max_steps)[1]

    a = jnp.array(1.1)
    assert run(a, "checkpointed") == pytest.approx(float(run(a, "while")), rel=1e-14)
    k = min(13, max_steps)  # x_k = 0.5 a^k + sum_{j<k} a^j
    exact = 0.5 * k * a ** (k - 1) + sum(j * a ** (j - 1) for j in range(1, k))
    assert jax.grad(run)(a, "checkpointed") == pytest.approx(float(exact), rel=1e-12)


def test_exact_derivative_of_the_discrete_solution():
    """With a fixed-step method the computed solution is a smooth function of the inputs:
    its backprop derivative equals a finite difference of the computed solution itself."""
    loss = jax.jit(lambda z0, p: weighted_loss(jaxode.odesolve(
        forced_oscillator, z0, TS, p, solver="rk4", dt0=0.3, gradient="backprop")))
    grads = jax.grad(loss, argnums=(0, 1))(Z0, PARAMS)
    np.testing.assert_allclose(grads[0], central_difference(lambda z: loss(z, PARAMS), Z0), rtol=1e-8)
    fd = central_difference(lambda p: loss(Z0, p), PARAMS)
    for k in PARAMS:
        np.testing.assert_allclose(grads[1][k], fd[k], rtol=1e-8)


def test_forward_mode_matches_reverse_mode_and_finite_differences():
    solve = lambda z0: jaxode.odesolve(forced_oscillator, z0, TS, PARAMS, gradient="backprop", **TOL)  # noqa: E731
    jac_fwd = jax.jit(jax.jacfwd(solve))(Z0)
    jac_rev = jax.jit(jax.jacrev(solve))(Z0)
    np.testing.assert_allclose(jac_fwd, jac_rev, rtol=1e-10, atol=1e-12)
    v = jnp.array([0.3, -1.2])
    _, tangent = jax.jvp(solve, (Z0,), (v,))
    eps = 1e-6
    fd = (solve(Z0 + eps * v) - solve(Z0 - eps * v)) / (2 * eps)
    np.testing.assert_allclose(tangent, fd, rtol=1e-6, atol=1e-9)


def test_hessian_vector_product_of_linear_ode():
    """L(z0) = |expm(A T) z0|^2 has Hessian 2 E^T E with E = expm(A T)."""
    a = jnp.array([[-0.2, 1.0], [-1.5, -0.1]])
    ts = jnp.array([0.0, 2.0])

    def loss(z0):
        ys = jaxode.odesolve(lambda z, t, a: a @ z, z0, ts, a, gradient="backprop", **TOL)
        return jnp.sum(ys[-1] ** 2)

    v = jnp.array([0.7, -0.4])
    hvp = jax.jit(lambda z: jax.jvp(jax.grad(loss), (z,), (v,))[1])(Z0)
    rev_rev = jax.jit(lambda z: jax.grad(lambda z: jnp.vdot(jax.grad(loss)(z), v))(z))(Z0)
    e = jax.scipy.linalg.expm(a * 2.0)
    np.testing.assert_allclose(hvp, 2 * e.T @ e @ v, rtol=1e-8)
    np.testing.assert_allclose(rev_rev, 2 * e.T @ e @ v, rtol=1e-8)


@pytest.mark.parametrize("mode", ["adjoint", "backprop"])
def test_optax_training_step_fits_a_decay_rate(mode):
    """Fit k in z' = -k z to data made with k = 1.5, inside a jitted optax step."""
    ts = jnp.linspace(0.0, 2.0, 9)
    data = jnp.exp(-1.5 * ts)[:, None] * jnp.array([1.0, 2.0])
    optimizer = optax.adam(0.1)

    def loss(k):
        ys = jaxode.odesolve(lambda z, t, k: -k * z, jnp.array([1.0, 2.0]), ts, k, gradient=mode)
        return jnp.mean((ys - data) ** 2)

    @jax.jit
    def step(k, state):
        value, g = jax.value_and_grad(loss)(k)
        updates, state = optimizer.update(g, state)
        return optax.apply_updates(k, updates), state, value

    k, state = jnp.array(0.5), optimizer.init(jnp.array(0.5))
    for _ in range(150):
        k, state, value = step(k, state)
    assert abs(float(k) - 1.5) < 1e-2
