"""The batched adjoint (``batched=True``, jaxode/adjoint.py's ``backward_batched``) on the
cases that broke it: rejected backward steps with non-finite stages, parameters without a
floating-point array, an explicit ``dt0``, parameters of another dtype than the state."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxode

TS2 = jnp.array([0.0, 2.0])


def logistic_in_domain(z, t, r):
    """``r z (1 - z)`` on [0, 1], NaN outside: rejected backward steps that leave the domain
    evaluate NaN stages."""
    return jnp.where((z >= 0) & (z <= 1), r * z * (1 - z), jnp.nan)


def logistic_grads(z0s, r, batched):
    """``∂/∂(z0s, r)`` of ``Σ ys`` at loose tolerances; ``batched=False``: ``jax.vmap`` of the
    plain adjoint with the seminorm (the batched adjoint's error control), summed over ``r``."""
    opts = dict(rtol=1e-2, atol=1e-2, full_output=True, throw=False)

    def loss(z0s, r):
        if batched:
            ys, info = jaxode.odesolve(logistic_in_domain, z0s, TS2, r, batched=True, **opts)
        else:
            one = lambda z: jaxode.odesolve(logistic_in_domain, z, TS2, r, adjoint_seminorm=True, **opts)  # noqa: E731
            ys, info = jax.vmap(one)(z0s)
        return jnp.sum(ys), info.status

    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(z0s, r)


def test_rejected_backward_steps_with_nan_stages_leave_the_parameter_gradient_finite():
    z0s = jnp.array([[0.01], [0.3], [0.99]])
    r = jnp.array(1.0)
    (g_z0, g_r), status = logistic_grads(z0s, r, batched=True)
    (v_z0, v_r), _ = logistic_grads(z0s, r, batched=False)
    assert np.all(np.asarray(status) == 0)
    assert np.isfinite(g_r) and np.all(np.isfinite(g_z0))
    # same per-problem steps as the seminorm adjoint under vmap: the same sums
    np.testing.assert_allclose(g_z0, v_z0, rtol=1e-12)
    np.testing.assert_allclose(g_r, v_r, rtol=1e-10)
    # and the gradient: Σ_b ∂z_b(2)/∂r, z = 1/(1 + (1/z0 - 1) e^{-rt}), ∂z/∂r = t z (1 - z)
    z = 1 / (1 + (1 / z0s[:, 0] - 1) * np.exp(-2.0))
    np.testing.assert_allclose(g_r, np.sum(2 * z * (1 - z)), rtol=5e-2)


def decay_grads(params, field, **options):
    """``∂ Σ ys / ∂z0s`` for ``batched=True`` on ``z0s`` (3, 1), ``ts = [0, 2]``."""
    z0s = jnp.array([[1.0], [-0.5], [2.0]])
    loss = lambda z: jnp.sum(jaxode.odesolve(field, z, TS2, params, batched=True, **options))  # noqa: E731
    return jax.jit(jax.grad(loss))(z0s)


@pytest.mark.parametrize(
    "params, field, rate",
    [
        (None, lambda z, t, p: -0.5 * z, 0.5),
        (2, lambda z, t, p: -p * z, 2.0),
        ((0.25, 5.0), lambda z, t, p: -p[0] * p[1] * z, 1.25),
    ],
    ids=["none", "int", "python-floats"],
)
def test_batched_adjoint_without_floating_point_parameter_arrays(params, field, rate):
    """No parameter to differentiate (an empty θ): ``∂ Σ ys/∂z0 = 1 + e^{-2 rate}``."""
    g = decay_grads(params, field, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(g, np.full((3, 1), 1 + np.exp(-2 * rate)), rtol=1e-8)


def test_batched_adjoint_with_explicit_dt0():
    """An adaptive solver with ``dt0``: the backward solve starts from each problem's last
    forward step, and ``dt0`` (a scalar) still gets a cotangent of its own shape."""
    z0s = jnp.array([[1.0], [-0.5], [2.0]])

    def loss(z0s, k, dt0):
        opts = dict(batched=True, dt0=dt0, rtol=1e-10, atol=1e-10)
        return jnp.sum(jaxode.odesolve(lambda z, t, k: -k * z, z0s, TS2, k, **opts))

    g_z0, g_k, g_dt0 = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(z0s, jnp.array(0.5), jnp.array(0.1))
    np.testing.assert_allclose(g_z0, np.full((3, 1), 1 + np.exp(-1.0)), rtol=1e-8)
    np.testing.assert_allclose(g_k, -2 * np.exp(-1.0) * np.sum(z0s), rtol=1e-8)
    assert g_dt0.shape == () and g_dt0 == 0


def mixed_field(z, t, p):
    """A float32 state with parameters of other dtypes (``p["a"]`` float64, ``p["b"]``
    float32); the result is cast back to the state's dtype. ``z * t`` is a float32 product
    (``t`` has the state's dtype) that fails if ``t`` comes in as float64."""
    return (-p["a"] * z * jnp.cos(t) + p["b"] + 0.1 * z * t).astype(z.dtype)


MIXED_PARAMS = {"a": jnp.array(0.8, jnp.float64), "b": jnp.array([0.1, -0.2], jnp.float32)}


@pytest.mark.parametrize(
    "mode, batched",
    [("adjoint", False), ("adjoint", True), ("backprop", False), ("checkpoint", False)],
    ids=["adjoint", "adjoint-batched", "backprop", "checkpoint"],
)
def test_mixed_precision_parameters(mode, batched):
    """Each gradient comes back in its own input's dtype, and equals the all-float64 gradient
    to float32 accuracy (batched=True differs from vmap only in the adjoint)."""
    z0 = jnp.array([[0.5, -0.3], [1.0, 0.2]], jnp.float32)
    ts = jnp.array([0.0, 0.7, 1.5])

    opts = dict(gradient=mode, rtol=1e-6, atol=1e-6)

    def loss(z0, p):
        if batched:
            ys = jaxode.odesolve(mixed_field, z0, ts, p, batched=True, **opts)
        else:
            ys = jax.vmap(lambda z: jaxode.odesolve(mixed_field, z, ts, p, **opts))(z0)
        return jnp.sum(jnp.sin(ys))

    g_z0, g_p = jax.jit(jax.grad(loss, argnums=(0, 1)))(z0, MIXED_PARAMS)
    assert g_z0.dtype == jnp.float32
    assert g_p["a"].dtype == jnp.float64 and g_p["b"].dtype == jnp.float32
    to64 = lambda x: jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), x)  # noqa: E731
    tight = lambda z, p: jnp.sum(jnp.sin(jax.vmap(  # noqa: E731
        lambda z: jaxode.odesolve(mixed_field, z, ts, p, rtol=1e-11, atol=1e-11))(z)))
    ref = jax.jit(jax.grad(tight, argnums=(0, 1)))(to64(z0), to64(MIXED_PARAMS))
    np.testing.assert_allclose(g_z0, ref[0], rtol=2e-4, atol=2e-5)
    for k in ("a", "b"):
        np.testing.assert_allclose(g_p[k], ref[1][k], rtol=2e-4, atol=2e-5)


def test_failing_problem_poisons_only_its_own_initial_state_cotangent():
    """``throw=False``, one problem of the batch blows up (``z' = z²`` from 2 at ``t = 0.5``):
    as under ``jax.vmap``, only its ``∂L/∂z0`` is NaN; the shared parameter's gradient, a sum
    over all problems, is NaN."""
    z0s = jnp.array([[0.2], [0.5], [2.0]])
    ts = jnp.array([0.0, 1.0])
    opts = dict(throw=False, full_output=True, max_steps=200)

    def loss(z0s, k, batched):
        f = lambda z, t, k: k * z**2  # noqa: E731
        if batched:
            ys, info = jaxode.odesolve(f, z0s, ts, k, batched=True, **opts)
        else:
            ys, info = jax.vmap(lambda z: jaxode.odesolve(f, z, ts, k, adjoint_seminorm=True, **opts))(z0s)
        return jnp.sum(jnp.where(jnp.isfinite(ys), ys, 0.0)), info.status

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (g_z0, g_k), status = grad(z0s, jnp.array(1.0), True)
    (v_z0, _), _ = grad(z0s, jnp.array(1.0), False)
    np.testing.assert_array_equal(np.asarray(status) != 0, [False, False, True])
    assert np.all(np.isnan(g_z0[2])) and np.isnan(g_k)
    np.testing.assert_allclose(g_z0[:2], v_z0[:2], rtol=1e-12)
    # z = z0 / (1 - z0 t): ∂(z0 + z(1))/∂z0 = 1 + 1 / (1 - z0)²
    np.testing.assert_allclose(g_z0[:2, 0], 1 + 1 / (1 - z0s[:2, 0]) ** 2, rtol=1e-4)


def test_vmap_of_grad_keeps_per_sample_parameter_gradients():
    """``jax.vmap(jax.grad(loss))`` over ``z0`` with shared ``ts`` and parameters asks for each
    sample's own parameter gradient (``jax.grad(Σ vmap ...)`` for their sum). A batching rule
    inside the adjoint's backward pass sees the same inputs in both cases, so it must not
    return the summed parameter adjoint (guards against that shortcut)."""
    z0s = jnp.array([[1.0], [-0.5], [2.0]])
    k = jnp.array(0.5)
    decay = lambda z, t, k: -k * z  # noqa: E731
    loss = lambda z0, k: jnp.sum(jnp.sin(jaxode.odesolve(decay, z0, TS2, k, rtol=1e-10, atol=1e-10)))  # noqa: E731
    per_sample = jax.jit(jax.vmap(jax.grad(loss, argnums=1), (0, None)))(z0s, k)
    summed = jax.jit(jax.grad(lambda k: jnp.sum(jax.vmap(loss, (0, None))(z0s, k))))(k)
    # z(2) = z0 e^{-2k}: ∂ sin(z(2))/∂k = -2 z(2) cos(z(2))
    z2 = z0s[:, 0] * np.exp(-1.0)
    np.testing.assert_allclose(per_sample, -2 * z2 * np.cos(z2), rtol=1e-8)
    np.testing.assert_allclose(summed, np.sum(-2 * z2 * np.cos(z2)), rtol=1e-8)


@pytest.fixture(scope="module")
def mlp_batch():
    """A small MLP field (its weights shared), 4 initial states, 3 output times."""
    from grad_utils import TimeMLP

    field = TimeMLP(2, jax.random.PRNGKey(3))
    field = jax.tree_util.tree_map(lambda x: 2.0 * x if eqx.is_inexact_array(x) else x, field)
    dyn, static = eqx.partition(field, eqx.is_inexact_array)
    z0s = jax.random.normal(jax.random.PRNGKey(4), (4, 2))
    ts = jnp.array([0.0, 0.6, 1.5])
    return dyn, static, z0s, ts


def mlp_loss(static, ts, **options):
    def one(d, z0):
        ys = jaxode.odesolve(eqx.combine(d, static), z0, ts, None, **options)
        return jnp.sum(jnp.sin(ys) * jnp.arange(1.0, 4.0)[:, None])

    return one


def test_grad_of_vmap_shares_the_parameter_adjoint(mlp_batch):
    """``jax.grad`` of a sum over ``jax.vmap`` of the adjoint solve (shared weights) runs the
    ``batched=True`` backward solve: the same numbers, and the gradient of the sum."""
    dyn, static, z0s, ts = mlp_batch
    one = mlp_loss(static, ts, rtol=1e-9, atol=1e-9)
    vmapped = lambda d, z0s: jnp.sum(jax.vmap(one, (None, 0))(d, z0s))  # noqa: E731

    def batched(d, z0s):
        ys = jaxode.odesolve(eqx.combine(d, static), z0s, ts, None, batched=True, rtol=1e-9, atol=1e-9)
        return jnp.sum(jnp.sin(ys) * jnp.arange(1.0, 4.0)[None, :, None])

    got = jax.jit(jax.grad(vmapped, argnums=(0, 1)))(dyn, z0s)
    want = jax.jit(jax.grad(batched, argnums=(0, 1)))(dyn, z0s)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-13, atol=1e-15)
    exact = mlp_loss(static, ts, gradient="backprop", rtol=1e-12, atol=1e-12)
    summed_exact = lambda d, z0s: jnp.sum(jax.vmap(exact, (None, 0))(d, z0s))  # noqa: E731
    ref = jax.jit(jax.grad(summed_exact, argnums=(0, 1)))(dyn, z0s)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-8)


def test_vmap_with_batched_parameters_keeps_per_sample_adjoints(mlp_batch):
    """Parameters batched with the states: each problem its own weights and gradient."""
    dyn, static, z0s, ts = mlp_batch
    one = mlp_loss(static, ts, rtol=1e-9, atol=1e-9)
    dyns = jax.tree_util.tree_map(lambda x: x * jnp.linspace(0.8, 1.2, 4).reshape((4,) + (1,) * x.ndim), dyn)
    got = jax.jit(jax.grad(lambda ds: jnp.sum(jax.vmap(one)(ds, z0s))))(dyns)
    for i in range(4):
        d_i = jax.tree_util.tree_map(lambda x: x[i], dyns)
        want = jax.jit(jax.grad(one))(d_i, z0s[i])
        for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(g[i], w, rtol=1e-9, atol=1e-12)


def test_nested_vmaps_of_the_adjoint():
    """``grad(vmap(vmap))`` merges both batch axes into one shared adjoint; ``vmap(grad(vmap))``
    gives each outer element its own gradient (``z' = -k z``, loss ``Σ sin z(2)``)."""
    k = jnp.array(0.5)
    z0s = jnp.array([[[1.0], [-0.5]], [[2.0], [0.3]]])
    decay = lambda z, t, k: -k * z  # noqa: E731
    loss = lambda z0, k: jnp.sin(jaxode.odesolve(decay, z0, TS2, k, rtol=1e-10, atol=1e-10)[-1, 0])  # noqa: E731
    z2 = np.asarray(z0s[..., 0]) * np.exp(-1.0)
    dk = -2 * z2 * np.cos(z2)  # ∂ sin(z(2))/∂k
    inner = lambda z, k: jnp.sum(jax.vmap(loss, (0, None))(z, k))  # noqa: E731
    both = jax.jit(jax.grad(lambda k: jnp.sum(jax.vmap(inner, (0, None))(z0s, k))))(k)
    per_outer = jax.jit(jax.vmap(jax.grad(inner, argnums=1), (0, None)))(z0s, k)
    np.testing.assert_allclose(both, np.sum(dk), rtol=1e-8)
    np.testing.assert_allclose(per_outer, np.sum(dk, axis=1), rtol=1e-8)


def test_grad_of_vmap_with_a_batched_closure_is_a_clear_error():
    """A field closing over an array the vmap batches (not passed as ``params``) cannot go
    through the custom rules: a ``ValueError`` saying so (was an UnexpectedTracerError)."""
    rates = jnp.array([0.5, 1.0, 1.5])
    z0s = jnp.array([[1.0], [-0.5], [2.0]])

    def loss(z0, r, k):
        return jnp.sum(jaxode.odesolve(lambda z, t, k: -k * r * z, z0, TS2, k))

    with pytest.raises(ValueError, match="closes over an array that the vmap batches"):
        jax.grad(lambda k: jnp.sum(jax.vmap(loss, (0, 0, None))(z0s, rates, k)))(jnp.array(1.0))


def test_second_derivatives_of_the_batched_adjoint_name_backprop():
    z0s = jnp.array([[1.0], [2.0]])

    def loss(k):
        return jnp.sum(jaxode.odesolve(lambda z, t, k: -k * z, z0s, jnp.array([0.0, 1.0]), k, batched=True))

    assert float(jax.grad(loss)(0.5)) == pytest.approx(-3.0 * np.exp(-0.5), rel=1e-5)
    with pytest.raises(NotImplementedError, match='gradient="backprop"'):
        jax.grad(jax.grad(loss))(0.5)
