"""The adjoint mode (jaxode/adjoint.py) against finite differences, analytic gradients and
the backprop mode; its backward solve's bookkeeping, error control and failures."""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_same_computation
from grad_utils import (
    PARAMS,
    TOL,
    TS,
    Z0,
    TimeMLP,
    central_difference,
    directional_difference,
    forced_oscillator,
    random_like,
    relative_error,
    weighted_loss,
)

import jaxode

MODES = ("adjoint", "backprop")


@functools.cache  # one compiled loss (and gradient) per mode, whatever the direction of ts
def loss_fn(mode, **options):
    opts = dict(TOL, gradient=mode, **options)

    @jax.jit
    def loss(z0, ts, params):
        return weighted_loss(jaxode.odesolve(forced_oscillator, z0, ts, params, **opts))

    return loss


@functools.cache
def _loss_grad(mode):
    return jax.jit(jax.grad(loss_fn(mode), argnums=(0, 1, 2)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("decreasing", [False, True], ids=["increasing", "decreasing"])
def test_gradients_match_finite_differences(mode, decreasing):
    ts = TS[::-1] if decreasing else TS
    loss = loss_fn(mode)
    grads = _loss_grad(mode)(Z0, ts, PARAMS)
    fd = (
        central_difference(lambda z: loss(z, ts, PARAMS), Z0),
        central_difference(lambda t: loss(Z0, t, PARAMS), ts),
        central_difference(lambda p: loss(Z0, ts, p), PARAMS),
    )
    for g, ref in zip(grads, fd):
        assert relative_error(g, ref) < 1e-5
    # every entry of ts matters here (loss on every output), and its gradient is right entrywise
    np.testing.assert_allclose(grads[1], fd[1], rtol=1e-5, atol=1e-7)


def test_linear_ode_matches_matrix_exponential():
    """z' = A z: ys[i] = expm(A t_i) z0; differentiate the closed form as the reference."""
    a = jnp.array([[-0.3, 1.2, 0.0], [-1.0, -0.2, 0.4], [0.1, -0.5, -0.6]])
    z0 = jnp.array([1.0, -0.5, 0.25])
    ts = jnp.array([0.0, 0.7, 1.5, 3.0])

    def exact(a, z0, ts):
        ys = jax.vmap(lambda t: jax.scipy.linalg.expm(a * (t - ts[0])) @ z0)(ts)
        return jnp.sum(jnp.cos(ys) * jnp.arange(1.0, 5.0)[:, None])

    def solved(a, z0, ts):
        ys = jaxode.odesolve(lambda z, t, a: a @ z, z0, ts, a, **TOL)
        return jnp.sum(jnp.cos(ys) * jnp.arange(1.0, 5.0)[:, None])

    got = jax.jit(jax.grad(solved, argnums=(0, 1, 2)))(a, z0, ts)
    want = jax.grad(exact, argnums=(0, 1, 2))(a, z0, ts)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-7, atol=1e-9)


def test_equinox_mlp_as_params_and_as_field():
    """Weights passed as ``params`` and weights held by an Equinox-module ``f`` (params=None)."""
    model = TimeMLP(3, jax.random.PRNGKey(0))
    model = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, model)
    z0 = jnp.array([0.5, -1.0, 0.3])
    ts = jnp.linspace(0.0, 1.5, 4)

    def as_params(m):
        return jnp.sum(jaxode.odesolve(lambda z, t, m: m(z, t), z0, ts, m, **TOL) ** 2)

    def as_field(m):
        return jnp.sum(jaxode.odesolve(m, z0, ts, None, **TOL) ** 2)

    direction = random_like(eqx.filter(model, eqx.is_inexact_array), jax.random.PRNGKey(1))
    for loss in (as_params, as_field):
        grads = eqx.filter_jit(eqx.filter_grad(loss))(model)
        dyn, static = eqx.partition(model, eqx.is_inexact_array)
        along = lambda d: loss(eqx.combine(d, static))
        fd = directional_difference(jax.jit(along), dyn, direction)
        pairs = zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(direction))
        got = sum(jnp.vdot(g, v) for g, v in pairs)
        assert abs(got - fd) / abs(fd) < 1e-6


def test_closed_over_arrays_are_differentiated():
    z0 = jnp.array([1.0, 2.0])
    ts = jnp.array([0.0, 1.0, 2.0])

    def loss(w):
        return jnp.sum(jaxode.odesolve(lambda z, t, _: -w * z + jnp.sin(t), z0, ts, None, **TOL))

    g = jax.jit(jax.grad(loss))(jnp.array(0.7))
    assert abs(g - central_difference(loss, jnp.array(0.7))) < 1e-7 * max(1, abs(g))


@pytest.mark.parametrize("solver", ["tsit5", "bosh3", pytest.param("dopri5", marks=pytest.mark.slow),
                                    pytest.param("dopri8", marks=pytest.mark.slow)])
def test_adjoint_converges_to_backprop(solver):
    """As the tolerance tightens, the continuous adjoint approaches the discrete gradient: their
    difference is of the order of the tolerance, and shrinks with it."""
    errors, tols = [], (1e-4, 1e-7, 1e-10)
    grad_fns = {}  # the tolerance is a traced argument: one compiled gradient per mode
    for mode in MODES:
        loss = lambda p, tol, mode=mode: weighted_loss(
            jaxode.odesolve(forced_oscillator, Z0, TS, p, gradient=mode, solver=solver, rtol=tol, atol=tol)
        )
        grad_fns[mode] = jax.jit(jax.grad(loss))
    for tol in tols:
        grads = {mode: grad_fns[mode](PARAMS, jnp.float64(tol)) for mode in MODES}
        errors.append(relative_error(grads["adjoint"], grads["backprop"]))
    assert errors[-1] < 1e-6
    assert errors[0] > 1e-6  # two different computations (optimise-then-discretise vs the exact one)
    assert all(e < 50 * tol for e, tol in zip(errors, tols)), errors
    assert all(b < a / 100 for a, b in zip(errors, errors[1:])), errors  # tol / 1000: error / 100 at least


def test_cotangent_added_at_every_output_time():
    """A loss on one interior output only: the cotangents at other times are zero, and the
    gradient must still be right (checks the jump bookkeeping at each ts[i])."""
    loss = jax.jit(lambda z0, p, i: jaxode.odesolve(forced_oscillator, z0, TS, p, **TOL)[i, 0])
    grad = jax.jit(jax.grad(loss))  # i traced: one program for every output time
    for i in range(1, len(TS)):
        g = grad(Z0, PARAMS, i)
        np.testing.assert_allclose(g, central_difference(lambda z: loss(z, PARAMS, i), Z0), rtol=1e-6)


def test_pytree_state_and_float32():
    z0 = {"x": jnp.array([1.0, 0.5], jnp.float32), "v": jnp.array(0.2, jnp.float32)}

    def f(z, t, k):
        return {"x": z["x"] * z["v"] - k * z["x"], "v": -z["v"] * jnp.sum(z["x"]) * k}

    ts = jnp.linspace(0, 1, 5, dtype=jnp.float32)
    loss = lambda k, mode: sum(jnp.sum(y**2) for y in jax.tree_util.tree_leaves(
        jaxode.odesolve(f, z0, ts, k, rtol=1e-6, atol=1e-6, gradient=mode)))
    g = {m: jax.jit(jax.grad(loss), static_argnums=1)(jnp.array(0.4, jnp.float32), m) for m in MODES}
    assert g["adjoint"].dtype == jnp.float32
    np.testing.assert_allclose(g["adjoint"], g["backprop"], rtol=1e-3)
    z64 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), z0)
    ref = jax.grad(lambda k: sum(jnp.sum(y**2) for y in jax.tree_util.tree_leaves(
        jaxode.odesolve(f, z64, ts.astype(jnp.float64), k, **TOL))))(jnp.array(0.4))
    np.testing.assert_allclose(g["adjoint"], ref, rtol=1e-3)


def test_vmap_of_gradient_equals_loop():
    z0s = jnp.array([[0.8, -0.3], [2.5, 0.0], [-1.0, 1.5]])
    tss = jnp.stack([TS, TS * 1.5, TS[::-1]])
    loss = lambda z0, ts, p: weighted_loss(jaxode.odesolve(forced_oscillator, z0, ts, p, **TOL))
    grad = jax.grad(loss, argnums=(0, 1, 2))
    batched = jax.jit(jax.vmap(grad, in_axes=(0, 0, None)))(z0s, tss, PARAMS)
    for i in range(3):
        single = jax.jit(grad)(z0s[i], tss[i], PARAMS)
        for b, s in zip(jax.tree_util.tree_leaves(batched), jax.tree_util.tree_leaves(single)):
            np.testing.assert_allclose(b[i], s, rtol=1e-9, atol=1e-12)


def neural_field_problem(dim=4, scale=2.5, t1=1.0, num_out=11):
    field = TimeMLP(dim, jax.random.PRNGKey(3))
    field = jax.tree_util.tree_map(lambda x: x * scale if eqx.is_inexact_array(x) else x, field)
    z0 = jax.random.normal(jax.random.PRNGKey(4), (dim,))
    return field, z0, jnp.linspace(0.0, t1, num_out)


def test_seminorm_saves_backward_steps_at_equal_accuracy():
    """With relative error control (tiny atol) the parameter adjoints need many backward steps
    under the full norm; the seminorm ignores them and stays as accurate."""
    field, z0, ts = neural_field_problem(dim=8, scale=2.0, t1=4.0, num_out=2)
    loss = lambda m, **o: jnp.sum(jaxode.odesolve(m, z0, ts, None, **o)[-1])
    ref = eqx.filter_grad(loss)(field, rtol=1e-12, atol=1e-12)
    ct = jnp.zeros((2, 8)).at[-1].set(1.0)
    steps, errors = {}, {}
    for seminorm in (False, True):
        opts = dict(rtol=1e-6, atol=1e-12, adjoint_seminorm=seminorm)
        (_, _), (_, bwd) = jaxode.adjoint_backward_info(field, z0, ts, None, ct, **opts)
        steps[seminorm] = int(bwd.num_steps)
        errors[seminorm] = relative_error(eqx.filter_grad(loss)(field, **opts), ref)
    assert steps[True] <= 0.8 * steps[False]
    assert errors[True] < 1e-4 and errors[False] < 1e-4


def test_one_backward_solve_across_output_times():
    """The backward solve carries its step size across the 10 output intervals: on a neural
    field its evaluations stay within 1.5x the forward ones (a restart per interval would
    pay a first-step selection and a short start-up in each)."""
    field, z0, ts = neural_field_problem(dim=8, scale=2.0, t1=3.0, num_out=11)
    ys = jaxode.odesolve(field, z0, ts, None, rtol=1e-6, atol=1e-6)
    ct = jax.grad(lambda ys: jnp.mean(ys**2))(ys)
    (_, _), (fwd, bwd) = jaxode.adjoint_backward_info(field, z0, ts, None, ct, rtol=1e-6, atol=1e-6)
    assert int(bwd.nfe) <= 1.5 * int(fwd.nfe)


def test_backward_info_counts_and_agrees_with_grad():
    field, z0, ts = neural_field_problem()
    ct = jnp.ones((len(ts), 4))
    (ct_z0, ct_ts), (fwd, bwd) = jaxode.adjoint_backward_info(field, z0, ts, None, ct, rtol=1e-9, atol=1e-9)
    _, vjp = jax.vjp(lambda z, t: jaxode.odesolve(field, z, t, None, rtol=1e-9, atol=1e-9), z0, ts)
    want_z0, want_ts = vjp(ct)
    np.testing.assert_allclose(ct_z0, want_z0, rtol=1e-12)
    np.testing.assert_allclose(ct_ts, want_ts, rtol=1e-12)
    assert int(bwd.status) == 0
    assert int(bwd.num_steps) == int(bwd.num_accepted) + int(bwd.num_rejected)
    # per accepted/rejected step: 6 new stages of tsit5; one re-evaluation after each of the
    # 9 interior jumps; 1 at the start (the first step size is the forward's last one)
    assert int(bwd.nfe) == 6 * int(bwd.num_steps) + 1 + (len(ts) - 2)


def test_failed_backward_solve_raises_or_returns_nan():
    field, z0, ts = neural_field_problem()
    fwd = jaxode.odesolve(field, z0, ts, None, full_output=True, rtol=1e-6, atol=1e-6)[1]
    budget = int(fwd.num_steps) + 2  # enough for the forward solve, too few for a tight backward one
    opts = dict(rtol=1e-6, atol=1e-6, adjoint_rtol=1e-12, adjoint_atol=1e-12, max_steps=budget)
    loss = lambda m, throw: jnp.sum(jaxode.odesolve(m, z0, ts, None, throw=throw, **opts))
    with pytest.raises(Exception, match="max_steps"):
        jax.block_until_ready(eqx.filter_jit(eqx.filter_grad(loss))(field, True))
    g = eqx.filter_jit(eqx.filter_grad(loss))(field, False)
    assert all(np.all(np.isnan(x)) for x in jax.tree_util.tree_leaves(eqx.filter(g, eqx.is_inexact_array)))


@pytest.mark.slow  # ~45 s: compiles the gradient at three step budgets
def test_adjoint_memory_does_not_grow_with_max_steps():
    """XLA's compiled buffers for the adjoint gradient do not depend on the step budget."""
    field, z0, ts = neural_field_problem()

    dyn, static = eqx.partition(field, eqx.is_array)

    def temp_bytes(max_steps, mode):
        def loss(d):
            m = eqx.combine(d, static)
            return jnp.sum(jaxode.odesolve(m, z0, ts, None, max_steps=max_steps, gradient=mode))

        return jax.jit(jax.grad(loss)).lower(dyn).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(16384, "adjoint") <= 1.05 * temp_bytes(256, "adjoint") + 1024
    # backprop keeps O(sqrt(max_steps)) checkpoints: 64x the budget, at most ~8x (+ slack) memory
    small, large = temp_bytes(256, "backprop"), temp_bytes(16384, "backprop")
    assert large <= 10 * small
    assert large > small  # it does keep checkpoints
    # so does the checkpoint mode: O(sqrt(max_steps)) carries
    small, large = temp_bytes(256, "checkpoint"), temp_bytes(16384, "checkpoint")
    assert small < large <= 10 * small


def batch_problem():
    field, _, ts = neural_field_problem(dim=3, scale=2.0, t1=2.0, num_out=6)
    z0s = jax.random.normal(jax.random.PRNGKey(7), (4, 3)) * jnp.array([[0.5], [1.0], [2.0], [3.0]])
    return field, z0s, ts


def test_batched_forward_equals_vmap():
    field, z0s, ts = batch_problem()
    ys, info = jaxode.odesolve(field, z0s, ts, None, batched=True, full_output=True)
    ys_v, info_v = jax.vmap(lambda z: jaxode.odesolve(field, z, ts, None, full_output=True))(z0s)
    assert_same_computation(ys, ys_v)
    np.testing.assert_array_equal(info.num_steps, info_v.num_steps)
    assert len(set(np.asarray(info.num_steps).tolist())) > 1  # each problem has its own steps


def test_batched_adjoint_sums_parameter_adjoints_exactly():
    """The shared parameter adjoint, accumulated by quadrature over all problems' stages, is
    the sum of the per-problem adjoints (same per-problem steps, seminorm error control)."""
    field, z0s, ts = batch_problem()
    dyn, static = eqx.partition(field, eqx.is_inexact_array)
    opts = dict(rtol=1e-8, atol=1e-8)

    def batched_loss(d, z0s, ts):
        ys = jaxode.odesolve(eqx.combine(d, static), z0s, ts, None, batched=True, **opts)
        return jnp.sum(jnp.sin(ys) * jnp.arange(1.0, 7.0)[None, :, None])

    def one_loss(d, z0, ts):
        ys = jaxode.odesolve(eqx.combine(d, static), z0, ts, None, adjoint_seminorm=True, **opts)
        return jnp.sum(jnp.sin(ys) * jnp.arange(1.0, 7.0)[:, None])

    got = jax.jit(jax.grad(batched_loss, argnums=(0, 1, 2)))(dyn, z0s, ts)
    per_problem = jax.jit(jax.vmap(jax.grad(one_loss, argnums=(0, 1, 2)), (None, 0, None)))(dyn, z0s, ts)
    want = (
        jax.tree_util.tree_map(lambda x: jnp.sum(x, 0), per_problem[0]),
        per_problem[1],
        jnp.sum(per_problem[2], 0),
    )
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12)
    # and it is the gradient: against the backprop mode at tight tolerance
    tight = lambda d: jnp.sum(jnp.sin(jaxode.odesolve(
        eqx.combine(d, static), z0s, ts, None, batched=True, gradient="backprop", **TOL))
        * jnp.arange(1.0, 7.0)[None, :, None])
    assert relative_error(got[0], jax.jit(jax.grad(tight))(dyn)) < 1e-6


def test_batched_rejects_mismatched_batch_axes():
    field, z0s, ts = batch_problem()
    with pytest.raises(ValueError, match="leading batch axis"):
        jaxode.odesolve(lambda z, t, p: z, {"a": z0s, "b": jnp.ones(3)}, ts, batched=True)
