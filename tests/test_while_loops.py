"""The reverse-differentiable loops (jaxode/backprop.py) and the backprop and checkpoint
gradient modes: exact derivatives of the discrete solution, forward mode, second derivatives,
training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from grad_utils import PARAMS, TOL, TS, Z0, central_difference, forced_oscillator, sub_jaxprs, weighted_loss
from jax import lax

import jaxode
from jaxode.while_loops import checkpointed_while, custom_vjp_while, residual_bytes, tree_bytes


@pytest.mark.parametrize("max_steps", [1, 7, 64, 1000])
def test_checkpointed_while_matches_while_loop_and_differentiates(max_steps):
    """x <- x * a + 1 for as long as i < n (n data-dependent, capped by max_steps)."""
    n = jnp.array(13)
    cond = lambda s: s[0] < jnp.minimum(n, max_steps)

    def run(a, driver):
        body = lambda s: (s[0] + 1, s[1] * a + 1.0)
        if driver == "while":
            return lax.while_loop(cond, body, (0, jnp.array(0.5)))[1]
        return checkpointed_while(cond, body, (0, jnp.array(0.5)), max_steps)[1]

    a = jnp.array(1.1)
    assert run(a, "checkpointed") == pytest.approx(float(run(a, "while")), rel=1e-14)
    k = min(13, max_steps)  # x_k = 0.5 a^k + sum_{j<k} a^j
    exact = 0.5 * k * a ** (k - 1) + sum(j * a ** (j - 1) for j in range(1, k))
    assert jax.grad(run)(a, "checkpointed") == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize("max_steps", [1, 7, 13, 40, 1000])
def test_custom_vjp_while_equals_the_unrolled_loop(max_steps):
    """x <- x * a + c, outputs[i] = x * c, for as long as i < n (and at most max_steps times):
    values and gradients (with respect to the initial carry, the outputs and the closed-over
    a, c) equal those of the same loop unrolled in Python. With max_steps = 13 the 13
    iterations overfill the K = 12 checkpoint slots once (segments of 2 recomputed on the way
    back), with max_steps = 40 the 40 iterations the K = 18 slots twice (segments of 4)."""
    n = 40
    k = min(n, max_steps)

    def run(x0, outputs, a, c, driver):
        if driver == "unrolled":
            x = x0
            for i in range(k):
                outputs = outputs.at[i].set(x * c)
                x = x * a + c
            return x, outputs

        def body(carry, outputs):
            i, x = carry
            return (i + 1, x * a + c), outputs.at[i].set(x * c)

        cond = lambda carry: carry[0] < n  # the loop itself stops at max_steps
        (_, x), outputs = custom_vjp_while(cond, body, (jnp.asarray(0), x0), outputs, max_steps)
        return x, outputs

    def loss(x0, outputs, a, c, driver):
        x, outputs = run(x0, outputs, a, c, driver)
        return jnp.sin(x) + jnp.sum(jnp.cos(outputs) * jnp.arange(1.0, n + 1))

    args = (jnp.array(0.3), jnp.full(n, 0.7), jnp.array(1.05), jnp.array(-0.2))
    np.testing.assert_allclose(run(*args, "custom")[1], run(*args, "unrolled")[1], rtol=1e-15)
    want = jax.grad(loss, argnums=(0, 1, 2, 3))(*args, "unrolled")
    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)(*args, "custom")
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("max_steps", [13, 40])
def test_custom_vjp_while_under_vmap_each_element_its_own_iterations(max_steps):
    """The loop of the test above under ``jax.vmap`` with a different ``n`` per element (5, 17
    and 40 iterations, cut at ``max_steps``): values and gradients equal each element's
    unrolled loop, so an element that is done stops (its carry, outputs and checkpoints) while
    the others go on, also when the others overfill their checkpoint slots."""
    ns = (5, 17, 40)

    def run(x0, outputs, a, c, n):
        def body(carry, outputs):
            i, x = carry
            return (i + 1, x * a + c), outputs.at[i].set(x * c)

        (_, x), outputs = custom_vjp_while(lambda carry: carry[0] < n, body, (jnp.asarray(0), x0), outputs,
                                           max_steps)
        return x, outputs

    def unrolled(x0, outputs, a, c, n):
        x = x0
        for i in range(min(n, max_steps)):
            outputs = outputs.at[i].set(x * c)
            x = x * a + c
        return x, outputs

    def loss(run_one, x0, outputs, a, c, n):
        x, outputs = run_one(x0, outputs, a, c, n)
        return jnp.sin(x) + jnp.sum(jnp.cos(outputs) * jnp.arange(1.0, 41.0))

    x0s, outputs = jnp.array([0.3, -0.1, 0.5]), jnp.full((3, 40), 0.7)
    a, c = jnp.array(1.05), jnp.array(-0.2)
    got = jax.jit(jax.grad(lambda x0s, outputs, a, c: jnp.sum(jax.vmap(
        lambda x0, o, n: loss(run, x0, o, a, c, n))(x0s, outputs, jnp.array(ns))), argnums=(0, 1, 2, 3)))(
        x0s, outputs, a, c)
    want = [jax.grad(lambda *args: loss(unrolled, *args, n), argnums=(0, 1, 2, 3))(x0s[i], outputs[i], a, c)
            for i, n in enumerate(ns)]
    np.testing.assert_allclose(got[0], [w[0] for w in want], rtol=1e-12)
    np.testing.assert_allclose(got[1], np.stack([w[1] for w in want]), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got[2], sum(w[2] for w in want), rtol=1e-12)
    np.testing.assert_allclose(got[3], sum(w[3] for w in want), rtol=1e-12)
    values = jax.vmap(lambda x0, o, n: run(x0, o, a, c, n)[1])(x0s, outputs, jnp.array(ns))
    for i, n in enumerate(ns):
        np.testing.assert_allclose(values[i], unrolled(x0s[i], outputs[i], a, c, n)[1], rtol=1e-15)


def _while_loops(jaxpr):
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "while":
            yield eqn
        for sub in sub_jaxprs(eqn):
            yield from _while_loops(sub)


def test_vmapped_checkpoint_loop_copies_no_checkpoint_slots():
    """Under ``jax.vmap`` the taped forward loop of ``gradient="checkpoint"`` runs on an
    unbatched predicate (any element still going), each element's carry and checkpoints
    stopping by themselves: with a batched predicate XLA selects between the old and the new
    carry at every iteration, a copy of all K checkpoint slots of every carry leaf per step, a
    cost growing with ``sqrt(max_steps)`` (measured on a vmapped 2-state neural field at
    max_steps 4096: 5.5 ms per gradient before, 4.3 after). The taped loop is the one that
    carries arrays with K rows (the reverse pass reads them as constants)."""
    slots = 2 * int(np.ceil(np.sqrt(2 * 4096)))  # K at max_steps = 4096

    def loss(k):
        solve = lambda z0: jaxode.odesolve(lambda z, t, k: -k * z, z0, TS, k, gradient="checkpoint")
        return jnp.sum(jax.vmap(solve)(jnp.array([[1.0], [2.0], [0.5]])))

    loops = list(_while_loops(jax.make_jaxpr(jax.grad(loss))(0.7).jaxpr))
    carried = lambda w: w.params["body_jaxpr"].jaxpr.invars[w.params["body_nconsts"]:]
    taped = [w for w in loops if any(slots in getattr(v.aval, "shape", ()) for v in carried(w))]
    assert taped, "the taped loop was not found"
    for loop in taped:
        assert loop.params["cond_jaxpr"].out_avals[0].shape == ()


@pytest.mark.parametrize("max_steps", [13, 40])
def test_custom_vjp_while_second_derivatives(max_steps):
    """x <- x * a + c for 40 iterations (at most max_steps): ∂²x/∂a² and ∂²x/∂a∂c, by reverse
    over reverse and forward over reverse, equal the unrolled loop's (the checkpoint slots
    thinned: the reverse sweep recomputes segments)."""
    k = min(40, max_steps)

    def run(a, c, driver):
        if driver == "unrolled":
            x = jnp.array(0.3)
            for _ in range(k):
                x = x * a + c
            return x

        body = lambda carry, o: ((carry[0] + 1, carry[1] * a + c), o)
        cond = lambda carry: carry[0] < 40
        return custom_vjp_while(cond, body, (jnp.asarray(0), jnp.array(0.3)), jnp.zeros(1), max_steps)[0][1]

    args = (jnp.array(1.02), jnp.array(-0.2))
    want = jax.hessian(run, argnums=(0, 1))(*args, "unrolled")[0]
    rev_rev = jax.jit(jax.grad(lambda a, c: jax.grad(run)(a, c, "custom"), argnums=(0, 1)))(*args)
    fwd_rev = jax.jit(jax.jacfwd(lambda a, c: jax.grad(run)(a, c, "custom"), argnums=(0, 1)))(*args)
    for got in (rev_rev, fwd_rev):
        np.testing.assert_allclose(got, want, rtol=1e-12)


def _mode_grads(mode, solver, max_steps, **options):
    def loss(z0, ts, p):
        ys = jaxode.odesolve(forced_oscillator, z0, ts, p, solver=solver, gradient=mode,
                             max_steps=max_steps, **options)
        return weighted_loss(ys)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(Z0, TS, PARAMS)


@pytest.mark.parametrize("solver,options", [
    ("dopri5", TOL), pytest.param("dopri8", TOL, marks=pytest.mark.slow), ("rk4", dict(dt0=0.05)),
], ids=["dopri5", "dopri8", "rk4"])
def test_checkpoint_mode_equals_backprop(solver, options):
    """Both modes differentiate the same computed solution exactly: equal gradients (w.r.t.
    z0, every ts and the parameters), with the step budget just sufficient (the checkpoints
    thinned, segments recomputed) and, for dopri5, ample (every step a checkpoint)."""
    _, info = jaxode.odesolve(forced_oscillator, Z0, TS, PARAMS, solver=solver, full_output=True, **options)
    needed = int(info.num_steps)
    want = _mode_grads("backprop", solver, 4096, **options)
    for max_steps in (4096, needed) if solver == "dopri5" else (needed,):
        got = _mode_grads("checkpoint", solver, max_steps, **options)
        assert float(got[0]) == pytest.approx(float(want[0]), rel=1e-13)
        for g, w in zip(jax.tree_util.tree_leaves(got[1]), jax.tree_util.tree_leaves(want[1])):
            np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-14)


def test_checkpoint_mode_under_vmap_with_closures_and_pytrees():
    """Per-sample gradients under jax.vmap, of a pytree state, with respect to an array the
    field closes over: equal to the backprop mode's, sample by sample."""
    z0s = {"x": jnp.array([[0.8, -0.3], [2.5, 0.0], [-1.0, 1.5]]), "s": jnp.array([0.1, 0.5, -0.2])}

    def loss(z0, b, mode):
        f = lambda z, t, _: {"x": forced_oscillator(z["x"], t, dict(PARAMS, b=b)), "s": -b * z["s"]}
        ys = jaxode.odesolve(f, z0, TS, None, gradient=mode, **TOL)
        return weighted_loss(ys["x"]) + jnp.sum(ys["s"] ** 2)

    grad = jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(0, None, None))
    got = jax.jit(grad, static_argnums=2)(z0s, PARAMS["b"], "checkpoint")
    want = jax.jit(grad, static_argnums=2)(z0s, PARAMS["b"], "backprop")
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-11, atol=1e-14)


def test_checkpoint_mode_is_reverse_mode_only():
    solve = lambda z0: jaxode.odesolve(forced_oscillator, z0, TS, PARAMS, gradient="checkpoint")
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(solve, (Z0,), (Z0,))


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
    solve = lambda z0: jaxode.odesolve(forced_oscillator, z0, TS, PARAMS, gradient="backprop", **TOL)
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


def test_vmapped_backprop_cost_does_not_grow_with_max_steps():
    """Under ``jax.vmap`` the loop's finished blocks are still skipped: the field evaluations of
    a vmapped backprop gradient with 1024 as the step budget are no more than with 64 (the
    blocks differ in length, so the counts need not be equal; a loop that ran every block
    would evaluate the field about 16 times as often)."""
    evaluations = []

    def f(z, t, k):
        jax.debug.callback(lambda: evaluations.append(1))
        return -k * z

    z0s = jnp.array([[1.0], [2.0], [0.5]])

    def count(max_steps):
        evaluations.clear()
        loss = lambda k: jnp.sum(jax.vmap(lambda z0: jaxode.odesolve(
            f, z0, TS, k, gradient="backprop", max_steps=max_steps))(z0s))
        grad = jax.jit(jax.grad(loss))(0.7)
        jax.effects_barrier()
        ts = np.asarray(TS)
        exact = -np.sum(np.asarray(z0s)) * np.sum(ts * np.exp(-0.7 * ts))  # d/dk of Σ z0 e^{-k t}
        assert float(grad) == pytest.approx(exact, rel=1e-4)
        return len(evaluations)

    assert count(1024) <= count(64)


def test_residual_bytes_counts_what_the_reverse_pass_keeps():
    """``residual_bytes``, which sets backprop's block length: a function linear in its input
    keeps nothing (the closed-over matrix is kept once by a scan, not per iteration); ``tanh(x
    W)`` keeps at least its ``(5, 16)`` value; ``tree_bytes`` adds up a pytree's arrays."""
    w, x = jnp.ones((8, 16)), jnp.ones((5, 8))
    size = x.dtype.itemsize
    assert residual_bytes(lambda x: x @ w, x) == 0
    assert 5 * 16 * size <= residual_bytes(lambda x: jnp.tanh(x @ w), x) <= 3 * 5 * 16 * size
    assert tree_bytes((x, w, {"i": jnp.ones(3, jnp.int8)})) == (5 * 8 + 8 * 16) * size + 3
