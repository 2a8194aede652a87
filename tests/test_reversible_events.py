"""Events with gradient="reversible" (issue 17's "events later"): a falling ball (terminal event)
and a bouncing ball (an update at each bounce) against their closed forms, and the gradient
against float64 central differences of the same reversible solve (w.r.t. z0, the field's
parameters, a parameter only the condition uses, the restitution only the update uses, and ts),
fixed step and adaptive at a tight tolerance; several events (which one fired), jit, vmap and
batched=True."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grad_utils import bouncing_exact, central_difference, forced_oscillator, impact_exact, relative_error

import jaxode

H0, G, E = 10.0, 9.81, 0.8
# fixed step: dt0 commensurate with no output interval (a grid landing within rounding of an
# output time would change its step count under a finite-difference perturbation of ts)
FIXED = dict(solver="rk4", dt0=0.045)
ADAPTIVE = dict(solver="tsit5", rtol=1e-11, atol=1e-11)
SETTINGS = {"fixed": FIXED, "adaptive": ADAPTIVE}


def ball(z, t, p):
    """A ball under gravity with linear drag ``k``: ``z = [height, velocity, last bounce time]``."""
    return jnp.stack([z[1], -p["g"] - p["k"] * z[1], jnp.zeros_like(z[2])])


def bounce(z, t, p):
    return jnp.stack([z[0], -p["e"] * z[1], t])


# one object each: repeated solves reuse the compiled program
GROUND = jaxode.Event(lambda z, t, p: z[0] - p["lvl"])  # terminal; ``lvl`` only in the condition
BOUNCE = jaxode.Event(lambda z, t, p: z[0] - p["lvl"], direction=-1, terminal=False, update=bounce)

# a loss on the outputs reached, the event time and the state there
FALL_Z0 = jnp.array([H0, 1.5, 0.0])
FALL_TS = jnp.array([0.0, 0.35, 0.8, 1.2, 2.0])  # the impact is at ~1.6: the last output is not reached
FALL_P = {"g": jnp.array(G), "k": jnp.array(0.3), "lvl": jnp.array(0.4)}
BOUNCE_TS = jnp.array([0.0, 0.7, 1.9, 3.1, 4.6])  # two bounces, at ~1.6 and ~3.8
BOUNCE_P = {"g": jnp.array(G), "k": jnp.array(0.3), "lvl": jnp.array(0.4), "e": jnp.array(E)}


def _loss(event, settings):
    def loss(z0, ts, p):
        ys, info = jaxode.odesolve(ball, z0, ts, p, events=event, gradient="reversible", full_output=True,
                                   **settings)
        reached = jnp.isfinite(ys[:, 0])
        weights = jnp.arange(1.0, 1.0 + ts.shape[0])[:, None] * jnp.array([1.0, -0.5, 0.7])
        values = jnp.where(reached[:, None], weights * jnp.sin(jnp.where(reached[:, None], ys, 0)), 0)
        at_event = 0.3 * info.event_time + jnp.sum(jnp.array([1.0, 0.2, 0.5]) * info.event_state**2)
        return jnp.sum(values) + at_event

    return jax.jit(loss)


CASES = {("falling", kind): (GROUND, FALL_Z0, FALL_TS, FALL_P, settings)
         for kind, settings in SETTINGS.items()}
CASES.update({("bouncing", kind): (BOUNCE, FALL_Z0, BOUNCE_TS, BOUNCE_P, settings)
              for kind, settings in SETTINGS.items()})


@pytest.fixture(scope="module", params=sorted(CASES), ids=lambda c: "-".join(c))
def case(request):
    """(args, jitted loss, its jitted gradient w.r.t. z0, ts, params)."""
    event, z0, ts, p, settings = CASES[request.param]
    loss = _loss(event, settings)
    return (z0, ts, p), loss, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


@pytest.mark.parametrize("wrt", [0, 1, 2], ids=["z0", "ts", "params"])
def test_gradient_is_derivative_of_the_reversible_solve(case, wrt):
    """Relative error <= 1e-7 against central differences of the same reversible solve; the
    parameters include ``lvl`` (condition only) and, bouncing, ``e`` (update only)."""
    args, loss, grad = case
    exact = grad(*args)[wrt]

    def of(x):
        return float(loss(*[x if i == wrt else a for i, a in enumerate(args)]))

    numeric = central_difference(of, args[wrt], eps=1e-6)
    assert relative_error(exact, numeric) <= 1e-7, (exact, numeric)


def test_events_fire_as_intended():
    """The cases above test what they mean to: one impact before the last output, two bounces."""
    for event, ts, p, count, index in ((GROUND, FALL_TS, FALL_P, 1, 0), (BOUNCE, BOUNCE_TS, BOUNCE_P, 2, -1)):
        for settings in SETTINGS.values():
            ys, info = jaxode.odesolve(ball, FALL_Z0, ts, p, events=event, gradient="reversible",
                                       full_output=True, **settings)
            assert info.num_events == count and info.event_index == index and info.status == 0
            assert np.isnan(ys[-1, 0]) == (index == 0)


# ---- closed forms (no drag, ground at 0) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def falling():
    """``(event_time, impact velocity, ys)`` of the falling ball, jitted per setting."""

    def make(settings):
        @jax.jit
        def run(h, g):
            z0 = jnp.stack([h, 0.0, 0.0])
            p = {"g": g, "k": 0.0, "lvl": 0.0}
            ys, info = jaxode.odesolve(ball, z0, jnp.linspace(0.0, 3.0, 7), p, events=GROUND,
                                       gradient="reversible", full_output=True, **settings)
            return info.event_time, info.event_state[1], ys

        return run

    return {kind: make(settings) for kind, settings in SETTINGS.items()}


@pytest.mark.parametrize("kind", sorted(SETTINGS))
def test_falling_ball_impact_time_state_and_derivatives(falling, kind):
    """t* = sqrt(2h/g), v* = -g t*, and their derivatives w.r.t. h and g; outputs after t* NaN."""
    run = falling[kind]
    h, g = jnp.array(H0), jnp.array(G)
    t_star, v_star, ys = run(h, g)
    t_ref, v_ref = impact_exact(h, g)
    assert abs(t_star - t_ref) < 1e-10 and abs(v_star - v_ref) < 1e-9
    ts = np.linspace(0.0, 3.0, 7)
    assert np.array_equal(np.isnan(np.asarray(ys[:, 0])), ts > float(t_ref))
    before = ts <= float(t_ref)
    np.testing.assert_allclose(ys[before, 0], H0 - G * ts[before] ** 2 / 2, rtol=1e-10)
    for out in (0, 1):
        grads = jax.grad(lambda h, g: run(h, g)[out], argnums=(0, 1))(h, g)
        exact = jax.grad(lambda h, g: impact_exact(h, g)[out], argnums=(0, 1))(h, g)
        np.testing.assert_allclose(grads, exact, rtol=1e-7)


@pytest.mark.parametrize("kind", sorted(SETTINGS))
def test_bouncing_ball_heights_bounce_times_and_gradients(kind):
    @jax.jit
    def run(h, g, e):
        p = {"g": g, "k": 0.0, "lvl": 0.0, "e": e}
        return jaxode.odesolve(ball, jnp.stack([h, 0.0, 0.0]), jnp.linspace(0.0, 5.0, 11), p, events=BOUNCE,
                               gradient="reversible", full_output=True, **SETTINGS[kind])

    ys, info = run(H0, G, E)
    assert info.num_events == 2 and info.event_index == -1 and info.status == 0
    t1 = np.sqrt(2 * H0 / G)
    t2 = t1 + 2 * E * t1
    for t, y in zip(np.linspace(0.0, 5.0, 11), np.asarray(ys)):
        bounces = int(t > t1) + int(t > t2)
        exact, last = (H0 - G * t**2 / 2, 0.0) if bounces == 0 else bouncing_exact(H0, G, E, t, bounces)
        np.testing.assert_allclose(y[0], exact, atol=1e-8)
        np.testing.assert_allclose(y[2], last, atol=1e-9)
    for out in (0, 2):  # the height and the last bounce time at t = 5, w.r.t. h, g and e
        got = jax.grad(lambda *a: run(*a)[0][-1, out], argnums=(0, 1, 2))(H0, G, E)
        exact = jax.grad(lambda *a: bouncing_exact(*a, 5.0, 2)[out // 2], argnums=(0, 1, 2))(H0, G, E)
        np.testing.assert_allclose(got, exact, rtol=1e-7)


# ---- several events, transforms -----------------------------------------------------------------------


def _pendulum_events():
    """A terminal event on the velocity and a reset whose parameters (``c``, ``d``) only the
    condition and the update use (as in tests/test_events.py, in the other order: the reset is
    event 1, so the loop must record which event fired)."""
    cross = jaxode.Event(lambda z, t, p: z[0] - p["c"], direction=-1, terminal=False,
                         update=lambda z, t, p: jnp.stack([z[0] + p["d"], 0.7 * z[1]]))
    stop = jaxode.Event(lambda z, t, p: z[1] + p["s"], direction=-1)
    return [stop, cross]


PEND_EVENTS = _pendulum_events()
PEND = {"a": jnp.array(1.1), "b": jnp.array(2.0), "w": jnp.array(1.3), "c": jnp.array(0.6),
        "d": jnp.array(0.25), "s": jnp.array(1.1)}
PEND_Z0 = jnp.array([0.8, 0.6])
PEND_TS = jnp.array([0.0, 0.7, 1.5, 2.6, 4.0, 6.0])


@jax.jit
def _pendulum_loss(z0, ts, p):
    ys, info = jaxode.odesolve(forced_oscillator, z0, ts, p, events=PEND_EVENTS, gradient="reversible",
                               full_output=True, **ADAPTIVE)
    reached = jnp.isfinite(ys[:, 0])
    weights = jnp.arange(1.0, 7.0)[:, None] * jnp.array([1.0, -0.5])
    outputs = jnp.sum(jnp.where(reached[:, None], weights * jnp.sin(jnp.where(reached[:, None], ys, 0)), 0))
    return outputs + 0.3 * info.event_time + jnp.sum(info.event_state**2), info


def test_several_events_resets_then_terminal():
    """Two events (the loop records which one reset the solve): gradients w.r.t. z0, ts and
    every parameter against differences; the solution against the backprop mode's within the
    two discretisations' difference."""
    args = (PEND_Z0, PEND_TS, PEND)
    _, info = _pendulum_loss(*args)
    assert info.num_events >= 3 and info.event_index == 0 and PEND_TS[2] < info.event_time < PEND_TS[3]
    _, ref = jaxode.odesolve(forced_oscillator, PEND_Z0, PEND_TS, PEND, events=PEND_EVENTS, full_output=True,
                             gradient="backprop", **ADAPTIVE)
    assert int(ref.num_events) == int(info.num_events) and abs(ref.event_time - info.event_time) < 1e-8
    grads = jax.jit(jax.grad(lambda *a: _pendulum_loss(*a)[0], argnums=(0, 1, 2)))(*args)
    fd = central_difference(lambda a: float(_pendulum_loss(*a)[0]), args, eps=1e-6)
    for got, want in zip(grads, fd):
        assert relative_error(got, want) <= 1e-7, (got, want)


def test_vmap_and_batched_equal_a_loop():
    """jit(grad) of a loss of jax.vmap over z0, and of batched=True, equal the sum of the
    per-problem gradients; each problem bounces at its own times."""
    z0s = jnp.stack([FALL_Z0, FALL_Z0 * jnp.array([0.5, -1.0, 1.0]), FALL_Z0 * 1.5])
    kw = dict(events=BOUNCE, gradient="reversible", full_output=True, **ADAPTIVE)

    def one(z0, p):
        ys, info = jaxode.odesolve(ball, z0, BOUNCE_TS, p, **kw)
        return jnp.sum(jnp.sin(ys)) + jnp.sum(info.event_state**2)

    def vmapped(z0s, p):
        return jnp.sum(jax.vmap(one, (0, None))(z0s, p))

    def batched(z0s, p):
        ys, info = jaxode.odesolve(ball, z0s, BOUNCE_TS, p, batched=True, **kw)
        return jnp.sum(jnp.sin(ys)) + jnp.sum(info.event_state**2)

    g_one = jax.jit(jax.grad(one, argnums=(0, 1)))
    loop = [g_one(z, BOUNCE_P) for z in z0s]
    summed = jax.tree_util.tree_map(lambda *x: sum(x), *[g[1] for g in loop])
    expected = (jnp.stack([g[0] for g in loop]), summed)
    for fn in (vmapped, batched):
        got = jax.jit(jax.grad(fn, argnums=(0, 1)))(z0s, BOUNCE_P)
        assert relative_error(got, expected) <= 1e-10, fn.__name__


@pytest.mark.parametrize("event", [pytest.param(GROUND, id="falling", marks=pytest.mark.slow),
                                   pytest.param(BOUNCE, id="bouncing")])
def test_gradient_backwards_in_time(event):
    """Decreasing ts (the ball's past: it hits the ground at t ~ -1.17), adaptive: the
    conditions and the update see real time; gradients against differences."""
    ts = -jnp.array([0.0, 0.6, 1.6, 2.7, 3.5])
    loss = _loss(event, ADAPTIVE)
    args = (FALL_Z0, ts, BOUNCE_P)
    _, info = jaxode.odesolve(ball, *args, events=event, gradient="reversible", full_output=True, **ADAPTIVE)
    assert info.num_events == 1
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)
    fd = central_difference(lambda a: float(loss(*a)), args, eps=1e-6)
    for got, want in zip(grads, fd):
        assert relative_error(got, want) <= 1e-7, (got, want)


def test_zeno_fails_the_gradient():
    """A ball bouncing to rest spends max_steps on events: the gradient raises (throw=True,
    under jit) or is NaN (throw=False), never finite-looking."""
    p = {"g": jnp.array(G), "k": jnp.array(0.0), "lvl": jnp.array(0.0), "e": jnp.array(0.5)}

    def loss(p, throw):
        ys = jaxode.odesolve(ball, jnp.array([1.0, 0.0, 0.0]), jnp.array([0.0, 5.0]), p, events=BOUNCE,
                             gradient="reversible", max_steps=300, throw=throw, **ADAPTIVE)
        return jnp.sum(ys[-1])

    grads = jax.jit(jax.grad(lambda p: loss(p, False)))(p)
    assert all(np.isnan(float(v)) for v in grads.values())
    with pytest.raises(Exception, match="events"):
        jax.jit(jax.grad(lambda p: loss(p, True)))(p)


def _temp_bytes(t1, max_steps, n=1024, event=None, max_events=None, gradient="reversible"):
    """XLA's temporary memory of jit(grad) of a float32 solve of n states with an event (by
    default terminal)."""
    z0 = jnp.full((n,), 0.3, jnp.float32)
    ts = jnp.linspace(0.0, t1, 3).astype(jnp.float32)
    field = lambda z, t, p: jnp.tanh(p * z) - 0.5 * z
    event = jaxode.Event(lambda z, t, p: z[0] - 0.1) if event is None else event

    def loss(p):
        ys = jaxode.odesolve(field, z0, ts, p, rtol=1e-5, atol=1e-5, max_steps=max_steps,
                             gradient=gradient, events=event, max_events=max_events)
        return jnp.sum(jnp.where(jnp.isfinite(ys), ys, 0) ** 2)

    return jax.jit(jax.grad(loss)).lower(jnp.float32(0.9)).compile().memory_analysis().temp_size_in_bytes


def test_memory_with_a_terminal_event_does_not_grow_with_the_steps():
    """As without events (tests/test_reversible.py): equal at t1 = 1 and 64, and from max_steps
    256 to 4096 growth by the step-time record only (at most 2 × 4 bytes per step; measured
    6.1; one 4 KiB state per step would be 4096)."""
    assert _temp_bytes(1.0, 256) == _temp_bytes(64.0, 256)
    assert _temp_bytes(1.0, 4096) - _temp_bytes(1.0, 256) <= 2 * 4 * (4096 - 256)


RESET = jaxode.Event(lambda z, t, p: z[0] - 0.5, direction=1, terminal=False, update=lambda z, t, p: z - 0.3)


@pytest.mark.parametrize("gradient", ["reversible", "adjoint"])
def test_max_events_bounds_the_memory_of_the_reset_record(gradient):
    """With a non-terminal event the record of the resets (reversible: ``(y, ŷ)`` of each event
    step, 2n numbers; adjoint: the state before each update, n) has ``max_steps`` slots, or
    ``max_events``: with ``max_events`` from max_steps 256 to 4096 the memory grows by the
    step-time record only (reversible: at most 2 × 4 bytes per step) or not at all (adjoint).
    Without it the record alone grows by 8n (reversible; measured 8210 bytes per unit of
    max_steps at n = 1024) or 4n bytes."""
    step_times = {"reversible": 2 * 4, "adjoint": 0}[gradient]
    memory = lambda max_steps: _temp_bytes(1.0, max_steps, event=RESET, gradient=gradient, max_events=8)
    assert (memory(4096) - memory(256)) / (4096 - 256) <= step_times


@pytest.mark.slow  # the closure conversion is the events module's, shared by every mode
def test_event_parameters_held_by_an_equinox_condition():
    """A condition that holds its own array (closure-converted, differentiated like params)."""

    class Threshold(eqx.Module):
        level: jax.Array

        def __call__(self, z, t, p):
            return z[0] - self.level

    @jax.jit
    def t_star(level):
        p = {"g": jnp.array(G), "k": jnp.array(0.0)}
        _, info = jaxode.odesolve(ball, jnp.array([H0, 0.0, 0.0]), jnp.array([0.0, 3.0]), p,
                                  events=jaxode.Event(Threshold(level)), gradient="reversible",
                                  full_output=True, **ADAPTIVE)
        return info.event_time

    np.testing.assert_allclose(t_star(jnp.array(2.0)), np.sqrt(2 * (H0 - 2.0) / G), rtol=1e-10)
    exact = jax.grad(lambda lv: jnp.sqrt(2 * (H0 - lv) / G))(2.0)
    np.testing.assert_allclose(jax.grad(t_star)(jnp.array(2.0)), exact, rtol=1e-7)
