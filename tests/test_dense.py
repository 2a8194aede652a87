"""``odesolve(..., dense=True)``: the ``DenseSolution`` equals ``odesolve`` at any time, is NaN
outside the interval, works under jit/vmap, is differentiable with backprop/checkpoint, and a
gradient through it in the adjoint mode raises."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import failure_cause

import jaxode


def _field(z, t, p):
    x, v = z["x"], z["v"]
    return {"x": v, "v": -p * x - 0.2 * v + jnp.sin(t)}


Z0 = {"x": jnp.array([1.0, -0.5]), "v": jnp.array([0.0, 0.3])}


@pytest.mark.parametrize("solver", ["tsit5", "dopri8", "bosh3", "rk4"])
@pytest.mark.parametrize("increasing", [True, False])
def test_dense_equals_odesolve_at_arbitrary_times(solver, increasing):
    """Times drawn at random in the interval (with its ends): the dense solution equals
    ``odesolve``'s outputs there to rounding (the same steps, the same interpolants)."""
    t0, t1 = (0.0, 6.0) if increasing else (6.0, 0.0)
    query = np.random.default_rng(0).uniform(0.0, 6.0, 37)
    inside = jnp.sort(jnp.asarray(query))[:: 1 if increasing else -1]
    ts = jnp.concatenate([jnp.array([t0]), inside, jnp.array([t1])])
    dt0 = 0.05 if solver == "rk4" else None
    _, sol = jaxode.odesolve(_field, Z0, jnp.array([t0, t1]), 2.0, solver=solver, dt0=dt0, dense=True)
    ys = jaxode.odesolve(_field, Z0, ts, 2.0, solver=solver, dt0=dt0)
    at = sol(ts)
    for key in ("x", "v"):
        assert at[key].shape == ys[key].shape
        if solver == "rk4":  # a fixed grid restarts at each output time: other steps, same order
            np.testing.assert_allclose(at[key], ys[key], atol=1e-5)
        else:
            np.testing.assert_allclose(at[key], ys[key], rtol=1e-12, atol=1e-13)
    outside = sol(jnp.array([-0.1, 6.1]))
    assert np.all(np.isnan(outside["x"]))
    scalar = sol(3.0)
    assert scalar["x"].shape == (2,)


def test_dense_under_jit_and_vmap():
    @jax.jit
    def run(p, t):
        _, sol = jaxode.odesolve(_field, Z0, jnp.array([0.0, 5.0]), p, dense=True)
        return sol(t)

    ps = jnp.array([1.0, 2.0, 3.0])
    out = jax.vmap(run, (0, None))(ps, jnp.array([0.5, 2.5]))
    for i, p in enumerate(ps):
        ref = jaxode.odesolve(_field, Z0, jnp.array([0.0, 0.5, 2.5, 5.0]), p)
        np.testing.assert_allclose(out["x"][i], ref["x"][1:3], rtol=1e-10)


def test_dense_batched():
    z0 = {"x": jnp.array([[1.0, 0.0], [0.5, 0.5]]), "v": jnp.zeros((2, 2))}
    ts = jnp.array([0.0, 1.0, 4.0])
    ys, sol = jaxode.odesolve(_field, z0, ts, 2.0, dense=True, batched=True)
    at = sol(ts)
    assert at["x"].shape == (2, 3, 2)
    np.testing.assert_allclose(at["x"], ys["x"], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("gradient", [pytest.param("backprop", marks=pytest.mark.slow), "checkpoint"])
def test_dense_gradient_equals_odesolve_gradient(gradient):
    """Differentiating the dense solution at t = 2.3 gives the gradient of ``odesolve``'s output
    there (same steps): backprop and checkpoint differentiate through the dense steps."""
    ts = jnp.array([0.0, 2.3, 5.0])

    def dense_loss(p):
        ends = ts[jnp.array([0, 2])]
        _, sol = jaxode.odesolve(_field, Z0, ends, p, gradient=gradient, dense=True, max_steps=64)
        return jnp.sum(sol(2.3)["x"] ** 2)

    def out_loss(p):
        return jnp.sum(jaxode.odesolve(_field, Z0, ts, p, gradient=gradient, max_steps=64)["x"][1] ** 2)

    np.testing.assert_allclose(jax.grad(dense_loss)(2.0), jax.grad(out_loss)(2.0), rtol=1e-9)
    h = 1e-6  # and both are the derivative of the computed solution
    fd = (dense_loss(2.0 + h) - dense_loss(2.0 - h)) / (2 * h)
    np.testing.assert_allclose(jax.grad(dense_loss)(2.0), fd, rtol=1e-5)


def test_dense_gradient_in_adjoint_mode_raises():
    """The adjoint gives the gradients of ys only: a gradient that reaches the dense solution
    raises (throw=True) or is NaN (throw=False); one of ys alone is unaffected."""
    ts = jnp.array([0.0, 2.0])

    def loss(p, throw=True, use_dense=True):
        ys, sol = jaxode.odesolve(_field, Z0, ts, p, dense=True, throw=throw)
        return jnp.sum(ys["x"][-1]) + (jnp.sum(sol(1.0)["x"]) if use_dense else 0.0)

    with pytest.raises(Exception) as err:
        jax.block_until_ready(jax.grad(loss)(2.0))
    assert "dense solution" in failure_cause(err.value)
    assert np.isnan(jax.grad(lambda p: loss(p, throw=False))(2.0))
    g = jax.grad(lambda p: loss(p, use_dense=False))(2.0)
    ref = jax.grad(lambda p: jnp.sum(jaxode.odesolve(_field, Z0, ts, p)["x"][-1]))(2.0)
    np.testing.assert_allclose(g, ref, rtol=1e-12)


def test_dense_after_failure_is_nan_past_final_time():
    ts = jnp.array([0.0, 10.0])
    opts = dict(dense=True, throw=False, max_steps=6, full_output=True)
    _, info, sol = jaxode.odesolve(_field, Z0, ts, 2.0, **opts)
    assert int(info.status) == 1
    t_end = float(info.final_time)
    assert np.all(np.isfinite(sol(0.5 * t_end)["x"])) and np.all(np.isnan(sol(t_end + 0.1)["x"]))


def test_step_search_without_a_loop_finds_the_same_steps():
    """``evaluate_steps(search="compare_all")`` (the interpolating adjoint's: one comparison per
    step, no loop) reads the same steps as the binary search, at step boundaries on either
    side too, and its program has no loop."""
    from jaxode.dense import evaluate_steps

    _, sol = jaxode.odesolve(_field, Z0, jnp.array([0.0, 6.0]), 2.0, solver="tsit5", dense=True)
    steps = sol.steps
    bounds = steps.t[jnp.isfinite(steps.t)]
    query = jnp.concatenate([bounds, jnp.asarray(np.random.default_rng(1).uniform(-0.5, 6.5, 41))])
    for side in ("left", "right"):
        at = lambda search, q: evaluate_steps(steps, sol.t0, sol.t1, sol.direction, sol.method, q,
                                              extrapolate=True, side=side, search=search)
        np.testing.assert_array_equal(at("compare_all", query), at("scan", query))
        program = {s: str(jax.make_jaxpr(lambda q, s=s: at(s, q))(query)) for s in ("scan", "compare_all")}
        assert "scan" in program["scan"]  # what the check would see
        assert "scan" not in program["compare_all"] and "while" not in program["compare_all"]
