"""``jaxode.nn.CNF``: log densities, Hutchinson's estimator, sampling, gradients, regularisers.

References: a linear field ``f = A z`` has the flow ``z(t1) = e^{AΔ} x`` (``Δ = t1 - t0``) and
the exact log density ``log N(e^{AΔ} x; 0, I) + tr(A) Δ``; its regularisers are
``∫ ||A e^{At} x||² dt`` (by Gauss-Legendre quadrature here) and ``||A||_F² Δ``.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grad_utils import directional_difference
from scipy.linalg import expm

import jaxode
from jaxode.cnf import standard_normal_log_prob
from jaxode.nn import CNF, ConcatSquashField

TOL = dict(rtol=1e-10, atol=1e-10)
T0, T1 = 0.2, 0.9
DELTA = T1 - T0
A = np.array([[-0.3, 0.8, 0.1], [-0.5, 0.2, 0.0], [0.3, -0.4, 0.4]])
X = np.array([[0.5, -1.0, 0.3], [1.2, 0.4, -0.7], [-0.2, 0.1, 0.9], [0.0, 2.0, 1.0]])


class LinearField(eqx.Module):
    """``f(z, t) = A z`` for ``z`` of shape ``(d,)``."""

    a: jax.Array
    data_size: int = eqx.field(static=True)

    def __call__(self, z, t):
        return self.a @ z


def exact_log_prob(x):
    z1 = x @ expm(A * DELTA).T
    return -0.5 * np.sum(z1**2, -1) - 1.5 * np.log(2 * np.pi) + np.trace(A) * DELTA


def exact_kinetic(x, n=40):
    """``∫_{t0}^{t1} ||A e^{A(t-t0)} x||² dt`` by ``n``-point Gauss-Legendre quadrature."""
    nodes, weights = np.polynomial.legendre.leggauss(n)
    s = 0.5 * DELTA * (nodes + 1)
    vals = [np.sum((x @ (A @ expm(A * si)).T) ** 2, -1) for si in s]
    return 0.5 * DELTA * np.tensordot(weights, np.asarray(vals), axes=1)


@pytest.fixture(scope="module")
def linear_cnfs():
    field = LinearField(jnp.asarray(A), 3)
    return {tr: CNF(field, t0=T0, t1=T1, trace=tr, **TOL) for tr in ("exact", "hutchinson")}


@pytest.fixture(scope="module")
def small_field():
    return ConcatSquashField(2, width=5, depth=1, dtype=jnp.float64, key=jax.random.key(0))


def test_linear_field_exact_log_density(linear_cnfs):
    cnf = linear_cnfs["exact"]
    got = eqx.filter_jit(cnf.log_prob)(jnp.asarray(X))
    assert got.shape == (4,)
    np.testing.assert_allclose(got, exact_log_prob(X), rtol=1e-9, atol=1e-9)
    single = cnf.log_prob(jnp.asarray(X[1]))
    assert single.shape == ()
    np.testing.assert_allclose(single, exact_log_prob(X[1]), rtol=1e-9)


def test_data_size_comes_from_the_field_or_the_argument(small_field):
    assert CNF(small_field).data_size == 2
    assert CNF(lambda z, t: -z, data_size=5).data_size == 5
    with pytest.raises(ValueError, match="data_size"):
        CNF(lambda z, t: -z)


def test_regularisers_match_their_definitions_for_a_linear_field(linear_cnfs):
    log_p, (kinetic, frobenius) = linear_cnfs["exact"].log_prob(jnp.asarray(X), regularize=True)
    np.testing.assert_allclose(log_p, exact_log_prob(X), rtol=1e-9)
    np.testing.assert_allclose(kinetic, exact_kinetic(X), rtol=1e-8)
    np.testing.assert_allclose(frobenius, np.sum(A**2) * DELTA * np.ones(4), rtol=1e-9)


@pytest.fixture(scope="module")
def hutchinson_many(linear_cnfs):
    """One point repeated 4000 times: 4000 independent Rademacher vectors from one key."""
    x = jnp.broadcast_to(jnp.asarray(X[0]), (4000, 3))
    return linear_cnfs["hutchinson"].log_prob(x, jax.random.key(7), regularize=True)


def test_hutchinson_is_unbiased_for_the_log_density(hutchinson_many):
    log_p, _ = hutchinson_many
    log_p = np.asarray(log_p)
    assert np.std(log_p) > 0.05  # really a random estimate
    # εᵀAε Δ per sample: the estimates take the values of tr(A)Δ ± Δ Σ_{i≠j} ±A_ij
    se = np.std(log_p) / np.sqrt(log_p.size)
    assert abs(np.mean(log_p) - exact_log_prob(X[0])) < 4 * se


def test_hutchinson_frobenius_is_unbiased(hutchinson_many):
    _, (kinetic, frob) = hutchinson_many
    frob = np.asarray(frob)
    np.testing.assert_allclose(kinetic, exact_kinetic(X[:1])[0], rtol=1e-8)  # noise-free
    se = np.std(frob) / np.sqrt(frob.size)
    assert abs(np.mean(frob) - np.sum(A**2) * DELTA) < 4 * se


def test_each_hutchinson_estimate_is_a_rademacher_quadratic_form(hutchinson_many):
    """For ``f = A z`` each estimate is exactly ``log N(z(t1)) + Δ εᵀAε`` and its Frobenius term
    ``Δ ||Aε||²`` for one of the 8 sign vectors ``ε``, each (up to ±ε) drawn with chance 1/4."""
    log_p, (_, frob) = hutchinson_many
    base = exact_log_prob(X[0]) - np.trace(A) * DELTA
    signs = np.array(np.meshgrid(*[[-1.0, 1.0]] * 3)).reshape(3, -1).T  # (8, 3)
    quad = np.einsum("ki,ij,kj->k", signs, A, signs) * DELTA
    norms = np.sum((signs @ A.T) ** 2, -1) * DELTA
    distance = np.abs(np.asarray(log_p)[:, None] - (base + quad)) + np.abs(np.asarray(frob)[:, None] - norms)
    which = np.argmin(distance, axis=1)
    np.testing.assert_allclose(log_p, base + quad[which], rtol=1e-9)
    np.testing.assert_allclose(frob, norms[which], rtol=1e-9)
    _, counts = np.unique(np.round(np.stack([quad[which], norms[which]]), 9), axis=1, return_counts=True)
    assert len(counts) == 4  # the classes {ε, -ε} are told apart by the pair of values
    np.testing.assert_allclose(counts / len(which), 0.25, atol=4 * np.sqrt(0.25 * 0.75 / len(which)))


def test_hutchinson_trace_is_exact_in_expectation_for_a_nonlinear_field(small_field):
    """Each estimate is ``exact + εᵀMε - tr M`` with ``M = ∫J dt``: the mean over the noise
    is the exact log density."""
    exact = CNF(small_field, **TOL).log_prob(jnp.asarray([0.3, -0.8]))
    x = jnp.broadcast_to(jnp.asarray([0.3, -0.8]), (2000, 2))
    est = np.asarray(CNF(small_field, trace="hutchinson", **TOL).log_prob(x, jax.random.key(3)))
    assert np.std(est) > 1e-3
    assert abs(np.mean(est) - exact) < 4 * np.std(est) / np.sqrt(est.size)


def test_linear_samples_are_the_inverse_map_of_normal_noise(linear_cnfs):
    cnf = linear_cnfs["exact"]
    key = jax.random.key(11)
    samples = cnf.sample(key, 6)
    noise = jax.random.normal(key, (6, 3), jnp.float64)
    np.testing.assert_allclose(samples, noise @ expm(-A * DELTA).T, rtol=1e-8, atol=1e-9)
    # and their log density is the base density plus the log-determinant tr(A)Δ
    np.testing.assert_allclose(
        cnf.log_prob(samples), standard_normal_log_prob(noise) + np.trace(A) * DELTA, rtol=1e-8
    )


def test_samples_map_forward_to_the_standard_normal_noise(small_field):
    cnf = CNF(small_field, **TOL)
    key = jax.random.key(5)
    samples = cnf.sample(key, 8)
    pushed = cnf.forward(samples)[-1]
    np.testing.assert_allclose(pushed, jax.random.normal(key, (8, 2), jnp.float64), atol=1e-8)
    assert np.max(np.abs(samples - pushed)) > 1e-2  # the flow moved them


def test_filter_vmap_over_points_matches_the_batch(small_field):
    cnf = CNF(small_field, **TOL)
    x = jnp.asarray(X[:, :2])
    np.testing.assert_allclose(eqx.filter_vmap(cnf.log_prob)(x), cnf.log_prob(x), rtol=1e-8)


@pytest.fixture(scope="module")
def grad_problem(small_field):
    x = jnp.asarray(X[:3, :2])
    key = jax.random.key(2)
    params, static = eqx.partition(small_field, eqx.is_inexact_array)
    direction = jax.tree_util.tree_map(
        lambda p: jax.random.normal(jax.random.key(p.size), p.shape, p.dtype), params
    )
    return x, key, params, static, direction


@pytest.mark.parametrize("gradient, trace", [
    ("adjoint", "exact"), ("checkpoint", "hutchinson"),
    pytest.param("backprop", "exact", marks=pytest.mark.slow),
    pytest.param("checkpoint", "exact", marks=pytest.mark.slow),
    pytest.param("adjoint", "hutchinson", marks=pytest.mark.slow),
    pytest.param("backprop", "hutchinson", marks=pytest.mark.slow),
])
def test_gradients_match_finite_differences(grad_problem, gradient, trace):
    """The weights' gradient of ``-mean log p + kinetic + frobenius`` along a random
    direction, against a float64 central difference of the loss."""
    x, key, params, static, direction = grad_problem

    def loss(p):
        cnf = CNF(eqx.combine(p, static), trace=trace, gradient=gradient, **TOL)
        log_p, (kin, frob) = cnf.log_prob(x, key, regularize=True)
        return -jnp.mean(log_p) + 0.1 * jnp.mean(kin) + 0.1 * jnp.mean(frob)

    grads = eqx.filter_jit(eqx.filter_grad(loss))(params)
    along = sum(jnp.vdot(g, v) for g, v in zip(jax.tree_util.tree_leaves(grads),
                                                   jax.tree_util.tree_leaves(direction)))
    fd = directional_difference(eqx.filter_jit(loss), params, direction, eps=1e-5)
    np.testing.assert_allclose(along, fd, rtol=1e-6)


def test_bad_input_is_named(small_field):
    with pytest.raises(ValueError, match="unknown trace"):
        CNF(small_field, trace="stochastic")
    with pytest.raises(ValueError, match="batched"):
        CNF(small_field, batched=True)
    with pytest.raises(ValueError, match="t0 and t1"):
        CNF(small_field, t0=1.0, t1=1.0)
    with pytest.raises(ValueError, match="needs a key"):
        CNF(small_field, trace="hutchinson").log_prob(jnp.zeros(2))
    with pytest.raises(ValueError, match=r"\(d,\) or \(B, d\)"):
        CNF(small_field).log_prob(jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match="num"):
        CNF(small_field).sample(jax.random.key(0), 0)


def test_exported_names():
    assert jaxode.CNF is jaxode.nn.CNF is CNF
