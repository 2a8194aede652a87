"""The adjoint with events under ``jax.vmap`` (jaxode/event_adjoint.py): with terminal events
only, ``jax.grad`` of ``jax.vmap`` over the initial states shares one parameter adjoint across
the batch (``backward_shared``), against closed forms and the per-problem gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grad_utils import impact_exact, sub_jaxprs

import jaxode

TOL = dict(rtol=1e-11, atol=1e-11)
TS = jnp.array([0.0, 0.5, 1.2, 3.0])
HS = jnp.array([1.0, 5.0, 20.0])  # impacts at 0.45, 1.01, 2.02: the outputs after them not reached


def fall(z, t, p):
    return jnp.stack([z[1], -p["g"] * jnp.ones_like(z[1])])


FLOOR = jaxode.Event(lambda z, t, p: z[0] - p["floor"])  # terminal; its parameter only here


def solved(hs, g, floor, ts, **options):
    """``(ys, t*, v*)`` of balls dropped from ``hs`` onto ``floor``, ``jax.vmap`` over ``hs``."""

    def one(h):
        z0 = jnp.stack([h, jnp.zeros_like(h)])
        ys, info = jaxode.odesolve(fall, z0, ts, {"g": g, "floor": floor}, events=FLOOR, full_output=True,
                                   **TOL, **options)
        return ys[:, 0], info.event_time, info.event_state[1]

    return jax.vmap(one)(hs)


def exact(hs, g, floor, ts):
    fall_time, v_star = impact_exact(hs - floor, g)
    heights = hs[:, None] - g * (ts - ts[0])[None, :] ** 2 / 2
    t_star = ts[0] + fall_time
    return jnp.where(ts[None, :] <= t_star[:, None], heights, jnp.nan), t_star, v_star


def loss(heights, t_star, v_star):
    reached = jnp.where(jnp.isfinite(heights), heights, 0.0)
    return jnp.sum(reached**2 * jnp.arange(1.0, 5.0)) + jnp.sum(t_star) + 0.1 * jnp.sum(v_star**2)


def test_shared_parameter_adjoint_matches_the_closed_form():
    """``∂L/∂(hs, g, floor, ts)`` of outputs, impact times and velocities of a batch of falling
    balls, ``g`` in the field and ``floor`` in the condition only, shared by the batch."""
    args = (HS, jnp.array(9.81), jnp.array(0.3), TS)
    got = jax.jit(jax.grad(lambda *a: loss(*solved(*a)), argnums=(0, 1, 2, 3)))(*args)
    want = jax.grad(lambda *a: loss(*exact(*a)), argnums=(0, 1, 2, 3))(*args)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-8, atol=1e-9)


def _mlp(z, t, p):
    return p["w2"] @ jnp.tanh(p["w1"] @ z + p["b1"]) + jnp.array([1.0, 0.0])


def _while_carries(jaxpr) -> list:
    """The shapes of every ``while`` loop's carried arrays, nested loops included."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "while":
            shapes += [v.aval.shape for v in eqn.invars if hasattr(v.aval, "shape")]
        for sub in sub_jaxprs(eqn):
            shapes += _while_carries(sub)
    return shapes


@pytest.fixture(scope="module")
def neural_field():
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    p = {"w1": jax.random.normal(keys[0], (16, 2)), "b1": jax.random.normal(keys[1], (16,)),
         "w2": 0.3 * jax.random.normal(keys[2], (2, 16))}
    z0s = jax.random.uniform(jax.random.PRNGKey(1), (3, 2), minval=-1.0, maxval=1.0)
    crossing = jaxode.Event(lambda z, t, p: z[0] - 2.0, direction=1)

    def one(z0, p, **options):
        _, info = jaxode.odesolve(_mlp, z0, jnp.array([0.0, 10.0]), p, events=crossing, full_output=True,
                                  rtol=1e-10, atol=1e-10, **options)
        return info.event_time + jnp.sum(info.event_state**2)

    return p, z0s, one, jax.jit(jax.grad(one, argnums=(0, 1)))  # the last compiled once, shared


def test_grad_of_vmap_carries_no_per_problem_parameter_adjoint(neural_field):
    """A neural field with a terminal event (64 weights, 3 starts): the gradient of the summed
    losses is the sum of the per-problem gradients, and no loop carries ``(3, ≥ 64)`` arrays
    (each problem's own parameter adjoint, as ``jax.vmap`` of the rule would)."""
    p, z0s, one, grad_one = neural_field
    total = lambda p, z0s: jnp.sum(jax.vmap(one, (0, None))(z0s, p))  # noqa: E731
    got = jax.jit(jax.grad(total, argnums=(0, 1)))(p, z0s)
    singles = [grad_one(z0, p) for z0 in z0s]
    for name in p:
        want = sum(s[1][name] for s in singles)
        np.testing.assert_allclose(got[0][name], want, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(got[1], np.stack([s[0] for s in singles]), rtol=1e-7, atol=1e-9)
    carries = _while_carries(jax.make_jaxpr(jax.grad(total))(p, z0s).jaxpr)
    assert carries and not [s for s in carries if len(s) >= 2 and s[0] == 3 and s[-1] >= 64]


def test_a_failed_problem_fails_the_shared_gradient_without_throw(neural_field):
    """With ``throw=False``, a problem whose solve fails (a NaN start) gets NaN ``∂L/∂z0``, the
    others their own gradients, and the shared parameters' gradient is NaN."""
    p, z0s, one, grad_one = neural_field
    z0s = z0s.at[1, 0].set(jnp.nan)
    total = lambda p, z0s: jnp.sum(jax.vmap(lambda z0, p: one(z0, p, throw=False), (0, None))(z0s, p))  # noqa: E731
    g_p, g_z = jax.jit(jax.grad(total, argnums=(0, 1)))(p, z0s)
    assert all(np.all(np.isnan(leaf)) for leaf in jax.tree_util.tree_leaves(g_p))
    assert np.all(np.isnan(g_z[1])) and np.all(np.isfinite(g_z[np.array([0, 2])]))
    want = grad_one(z0s[0], p)[0]
    np.testing.assert_allclose(g_z[0], want, rtol=1e-7)
