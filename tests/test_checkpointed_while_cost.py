"""The cost of ``checkpointed_while`` (the loop of ``gradient="backprop"``) beyond the
iterations that run: the predicate evaluations of the skipped groups, blocks and iterations,
and, under ``jax.vmap``, the bodies of the iterations after every element has finished."""

from __future__ import annotations

import math

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxode
from jaxode.while_loops import checkpointed_while, custom_vjp_while


def _count_calls(fn, counter):
    def counted(*args):
        jax.debug.callback(lambda: counter.append(1), ordered=True)
        return fn(*args)

    return counted


def test_skipped_blocks_cost_a_root_of_max_steps_predicates():
    """A loop of 13 iterations with a budget of 4096 (blocks of B = 64, 64 blocks in 8 groups
    of 8): its predicate is evaluated for each iteration of the block that runs (B) and for
    each group and block (16), not once for each of the 64 blocks on top; its value and
    derivative are the loop's, x_13 = 0.5 a^13 + Σ_{j<13} a^j."""
    max_steps, n = 4096, 13
    calls = []
    cond = _count_calls(lambda s: s[0] < n, calls)

    def run(a):
        body = lambda s: (s[0] + 1, s[1] * a + 1.0)
        return checkpointed_while(cond, body, (0, jnp.array(0.5)), max_steps)[1]

    a = 1.1
    value = jax.jit(run)(a)
    jax.effects_barrier()
    block = math.ceil(math.sqrt(max_steps))
    groups = math.ceil(math.sqrt(max_steps / block))
    assert len(calls) <= block + 2 * groups
    assert float(value) == pytest.approx(0.5 * a**n + sum(a**j for j in range(n)), rel=1e-14)
    exact = 0.5 * n * a ** (n - 1) + sum(j * a ** (j - 1) for j in range(1, n))
    assert float(jax.grad(run)(a)) == pytest.approx(exact, rel=1e-12)


def test_vmapped_backprop_solve_evaluates_the_field_as_often_as_a_while_loop():
    """Under ``jax.vmap``, the backprop mode's solve (not differentiated) evaluates the field as
    often as the checkpoint mode's, a plain ``lax.while_loop`` run until the last element is
    done: the iterations of a block after that are skipped, not masked (with masking, a block
    of 25 steps ran where the longest solve takes fewer); the values agree."""
    counts = {}
    z0s = jnp.array([[1.0], [2.0], [0.5]])
    ts = jnp.array([0.0, 0.5])
    for mode in ("backprop", "checkpoint"):
        calls = []
        f = _count_calls(lambda z, t, k: -k * z, calls)
        one = lambda z0: jaxode.odesolve(f, z0, ts, 0.7, gradient=mode, solver="tsit5")[-1]
        solve = jax.jit(jax.vmap(one))
        ys = np.asarray(solve(z0s))
        jax.effects_barrier()
        counts[mode] = (ys, len(calls))
    (ys_b, n_b), (ys_c, n_c) = counts["backprop"], counts["checkpoint"]
    np.testing.assert_allclose(ys_b, np.asarray(z0s) * np.exp(-0.35), rtol=1e-6)
    np.testing.assert_allclose(ys_b, ys_c, rtol=1e-12)  # outputs written by masking or not
    assert n_b == n_c


def test_backprop_forward_mode_and_second_derivatives_still_exact():
    """The grouped blocks change nothing in the derivatives: the forward- and reverse-mode
    derivative of a backprop solve of z' = -k z agree, and the second derivative matches
    central differences of the first."""
    ts = jnp.array([0.0, 1.0])
    final = lambda k: jaxode.odesolve(lambda z, t, k: -k * z, jnp.array([1.0]), ts, k, gradient="backprop",
                                      rtol=1e-10, atol=1e-10)[-1, 0]
    k = 0.7
    rev, fwd = jax.grad(final)(k), jax.jacfwd(final)(k)
    assert float(rev) == pytest.approx(float(fwd), rel=1e-12)
    assert float(rev) == pytest.approx(-np.exp(-k), rel=1e-8)
    second = jax.grad(jax.grad(final))(k)
    eps = 1e-4
    central = (jax.grad(final)(k + eps) - jax.grad(final)(k - eps)) / (2 * eps)
    assert float(second) == pytest.approx(float(central), rel=1e-6)
    assert float(second) == pytest.approx(np.exp(-k), rel=1e-7)


def _cond_outputs_with_leading_axis(jaxpr, size):
    """The shapes of the ``cond`` outputs in ``jaxpr`` (and the jaxprs inside it) whose first
    axis has length ``size``."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "cond":
            found += [v.aval.shape for v in eqn.outvars if v.aval.shape[:1] == (size,)]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _cond_outputs_with_leading_axis(sub, size)
    return found


def test_reverse_pass_recomputes_a_skipped_block_without_its_iterations_residuals():
    """A linearised ``lax.cond`` outputs the residuals of both branches. When the reverse pass
    recomputed a skipped block (a block-level ``cond`` inside the block's checkpoint), it wrote
    zeros for the residuals of all the block's ``B`` iterations, stacked ``(B, ...)``: that
    cost grew with the skipped blocks of the running group, i.e. with ``max_steps`` (mlp-batch
    under ``jax.vmap``: 1.9x the reverse pass at max_steps 4096). With the block in a
    checkpoint of its own, no ``cond`` of the gradient's program outputs a ``(B, ...)`` stack;
    the derivative of ``x <- sin(a x) + 1`` (13 iterations, budget 4096) is unchanged."""
    max_steps, n = 4096, 13
    block = math.ceil(math.sqrt(max_steps))  # residual_ratio 1

    def run(a, driver):
        body = lambda s: (s[0] + 1, jnp.sin(s[1] * a) + 1.0)
        init = (0, jnp.full(3, 0.5))
        if driver == "while":
            return lax.while_loop(lambda s: s[0] < n, body, init)[1].sum()
        return checkpointed_while(lambda s: s[0] < n, body, init, max_steps)[1].sum()

    program = jax.make_jaxpr(jax.grad(lambda a: run(a, "checkpointed")))(1.1)
    assert _cond_outputs_with_leading_axis(program.jaxpr, block) == []
    exact = jax.jacfwd(run)(1.1, "while")  # forward mode through the plain while loop
    assert float(jax.grad(run)(1.1, "checkpointed")) == pytest.approx(float(exact), rel=1e-13)


def _count(jaxpr, name):
    """The equations of primitive ``name`` in ``jaxpr`` and the jaxprs inside it."""
    subs = [sub for eqn in jaxpr.eqns for sub in jax.extend.core.jaxprs_in_params(eqn.params)]
    return sum(eqn.primitive.name == name for eqn in jaxpr.eqns) + sum(_count(sub, name) for sub in subs)


def test_backprop_gradient_evaluates_a_step_twice_not_three_times():
    """The two checkpoints around a block: the outer one's recomputation of the inner one is
    dead code, removed from the gradient's program. So the program holds the field twice as
    often as the solve's (the forward, and the recomputation before each block's transpose);
    a third copy would recompute every step once more."""
    f = lambda z, t, k: jnp.tanh(z @ k)
    z0, ts, k = jnp.ones(4), jnp.linspace(0.0, 1.0, 4), 0.1 * jnp.eye(4)
    loss = lambda k: jnp.sum(jaxode.odesolve(f, z0, ts, k, gradient="backprop", max_steps=256))
    solve, gradient = (_count(jax.make_jaxpr(fn)(k).jaxpr, "tanh") for fn in (loss, jax.grad(loss)))
    assert solve > 0
    assert gradient <= 2 * solve


def test_loop_with_a_pytree_state_and_integer_leaves_under_vmap():
    """Integer leaves, a batch whose elements stop at different iterations: each element's
    result is that of ``lax.while_loop``."""
    ns = jnp.array([3, 9, 0])

    def run(n, driver):
        cond = lambda s: s["i"] < n
        body = lambda s: {"i": s["i"] + 1, "x": s["x"] * 1.5 + 1.0}
        init = {"i": jnp.array(0), "x": jnp.array(0.25)}
        if driver == "while":
            return lax.while_loop(cond, body, init)
        return checkpointed_while(cond, body, init, 64)

    got, want = jax.vmap(lambda n: run(n, "checkpointed"))(ns), jax.vmap(lambda n: run(n, "while"))(ns)
    np.testing.assert_array_equal(np.asarray(got["i"]), np.asarray(want["i"]))
    np.testing.assert_array_equal(np.asarray(got["x"]), np.asarray(want["x"]))


def _selects_outside_branches(jaxpr, size):
    """The ``select_n`` equations of ``jaxpr`` (and of the loops and calls inside it, but not of
    ``cond`` branches) whose output has an axis of length ``size`` and at least two axes."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "select_n":
            found += [v for v in eqn.outvars if size in v.aval.shape and len(v.aval.shape) >= 2]
        if eqn.primitive.name == "cond":
            continue
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _selects_outside_branches(sub, size)
    return found


def test_checkpoint_tape_is_not_thinned_at_every_iteration_under_vmap():
    """``custom_vjp_while`` keeps K checkpoint slots and thins them (every other one dropped)
    when they are full. Under ``jax.vmap`` its ``lax.cond`` on the batched "full" flag became a
    select between the thinned and the kept slots at every iteration (a copy of all K slots of
    every carry leaf per step: the vmapped checkpoint gradient cost grew with K, i.e. with
    sqrt(max_steps)); it is a branch taken only when some element's slots are full. Checked on
    the traced program (no select of slot-sized arrays outside a branch), and the gradient
    (x <- x a + 1 for n iterations, n per element, 40 of them overfilling K = 18 slots) is
    exact."""
    max_steps = 40
    num_slots = 2 * math.ceil(math.sqrt(2 * max_steps))
    ns = jnp.array([5, 40, 17])

    def run(a, n):
        body = lambda c, o: ((c[0] + 1, c[1] * a + 1.0), o)
        carry, _ = custom_vjp_while(lambda c: c[0] < n, body, (0, jnp.array(0.5)), jnp.zeros(()), max_steps)
        return carry[1]

    grad = jax.vmap(jax.grad(run), in_axes=(None, 0))
    a = 1.01
    jaxpr = jax.make_jaxpr(grad)(a, ns).jaxpr
    assert not _selects_outside_branches(jaxpr, num_slots)
    for n, g in zip(np.asarray(ns), np.asarray(grad(a, ns))):
        exact = 0.5 * n * a ** (n - 1) + sum(j * a ** (j - 1) for j in range(1, n))
        assert float(g) == pytest.approx(exact, rel=1e-12)
