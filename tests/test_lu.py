"""``jaxode.methods.lu``: the implicit methods' LU solves, unrolled for small systems."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxode.methods.lu import UNROLLED, factor, solve


def _system(n, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n))
    a[0, 0] = 0.0  # the first pivot must come from another row
    return a, rng.normal(size=n)


@pytest.mark.parametrize("n", [1, 2, 3, 5, UNROLLED, UNROLLED + 3])
def test_solve_matches_numpy(n):
    a, b = _system(n)
    if n == 1:
        a[0, 0] = 2.0
    x = solve(factor(jnp.asarray(a)), jnp.asarray(b))
    np.testing.assert_allclose(x, np.linalg.solve(a, b), rtol=1e-12, atol=1e-12)
    x32 = solve(factor(jnp.asarray(a, jnp.float32)), jnp.asarray(b, jnp.float32))
    assert x32.dtype == jnp.float32
    np.testing.assert_allclose(x32, np.linalg.solve(a, b), rtol=1e-4, atol=1e-4)


def test_small_systems_make_no_library_calls_and_equal_lapacks_substitutions():
    """Up to ``UNROLLED`` the substitutions are array operations (no ``triangular_solve``, a
    LAPACK call each on the CPU), the same ones LAPACK's ``lu_solve`` runs: equal to rounding."""
    from jax.scipy.linalg import lu_solve

    a, b = _system(UNROLLED, seed=3)
    f = factor(jnp.asarray(a))
    program = str(jax.make_jaxpr(solve)(f, jnp.asarray(b)))
    assert "triangular_solve" not in program
    assert "triangular_solve" in str(jax.make_jaxpr(lambda f, b: lu_solve((f.lu, f.pivots), b))(f, b))
    np.testing.assert_allclose(solve(f, jnp.asarray(b)), lu_solve((f.lu, f.pivots), jnp.asarray(b)),
                               rtol=1e-14, atol=1e-14)


def test_derivatives_of_the_solution():
    """``dx = A⁻¹ (db - dA x)``, in forward and reverse mode."""
    a, b = _system(4, seed=5)
    a, b = jnp.asarray(a), jnp.asarray(b)
    da, db = jnp.asarray(np.random.default_rng(6).normal(size=(4, 4))), jnp.ones(4)
    x, dx = jax.jvp(lambda a, b: solve(factor(a), b), (a, b), (da, db))
    np.testing.assert_allclose(dx, np.linalg.solve(a, db - da @ x), rtol=1e-10)
    grad_b = jax.grad(lambda b: jnp.sum(solve(factor(a), b) ** 2))(b)
    np.testing.assert_allclose(grad_b, np.linalg.solve(np.asarray(a).T, 2 * np.asarray(x)), rtol=1e-10)
