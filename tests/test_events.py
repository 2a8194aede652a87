"""Events (issue 15): detection, location, terminal and update events, their derivatives in every
gradient mode, against closed forms (a falling and a bouncing ball) and finite differences."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_same_computation
from grad_utils import bouncing_exact, central_difference, forced_oscillator, impact_exact, relative_error

import jaxode
from jaxode import errors

MODES = ("adjoint", "backprop", "checkpoint")
TOL = dict(rtol=1e-11, atol=1e-11)
H0, G, E = 10.0, 9.81, 0.8


def ball(z, t, p):
    """A ball under gravity: ``z = [height, velocity, time of the last bounce]``."""
    return jnp.stack([z[1], -p["g"], jnp.zeros_like(z[2])])


def bounce(z, t, p):
    return jnp.stack([z[0], -p["e"] * z[1], t])


GROUND = jaxode.Event(lambda z, t, p: z[0])  # terminal
BOUNCE = jaxode.Event(lambda z, t, p: z[0], direction=-1, terminal=False, update=bounce)
PARAMS = {"g": jnp.array(G), "e": jnp.array(E)}


@pytest.fixture(scope="module")
def falling():
    """``(event_time, impact velocity)`` of the falling ball as a jitted function per mode."""

    def make(mode):
        @jax.jit
        def run(h, g):
            z0 = jnp.stack([h, 0.0, 0.0])
            ts = jnp.linspace(0.0, 3.0, 7)
            _, info = jaxode.odesolve(ball, z0, ts, {"g": g, "e": 0.0}, events=GROUND, gradient=mode,
                                      full_output=True, **TOL)
            return info.event_time, info.event_state[1]

        return run

    return {mode: make(mode) for mode in MODES}


@pytest.mark.parametrize("mode", MODES)
def test_falling_ball_impact_time_and_its_derivatives(falling, mode):
    run = falling[mode]
    h, g = jnp.array(H0), jnp.array(G)
    t_star, v_star = run(h, g)
    t_ref, v_ref = impact_exact(h, g)
    assert abs(t_star - t_ref) < 1e-10 and abs(v_star - v_ref) < 1e-9
    for out in (0, 1):  # the event time and the state there, w.r.t. z0 and params
        grads = jax.grad(lambda h, g: run(h, g)[out], argnums=(0, 1))(h, g)
        exact = jax.grad(lambda h, g: impact_exact(h, g)[out], argnums=(0, 1))(h, g)
        np.testing.assert_allclose(grads, exact, rtol=1e-7)


def test_falling_ball_forward_mode_and_second_derivatives():
    def t_star(h):
        _, info = jaxode.odesolve(ball, jnp.stack([h, 0.0, 0.0]), jnp.array([0.0, 3.0]), PARAMS,
                                  events=GROUND, gradient="backprop", full_output=True, **TOL)
        return info.event_time

    _, tangent = jax.jvp(t_star, (jnp.array(H0),), (jnp.array(1.0),))
    np.testing.assert_allclose(tangent, jax.grad(lambda h: impact_exact(h, G)[0])(H0), rtol=1e-7)
    # second derivatives: the root's jvp rule is differentiable itself
    second = jax.hessian(lambda h: impact_exact(h, G)[0])(H0)
    np.testing.assert_allclose(jax.hessian(t_star)(jnp.array(H0)), second, rtol=1e-7)


def test_terminal_event_stops_the_solve():
    """Outputs after t* are NaN, the ones before exact, status 0, no error with throw=True;
    the state at t* is the dense output there (no overshoot) and the condition ~0."""
    ts = jnp.linspace(0.0, 3.0, 7)
    z0 = jnp.array([H0, 0.0, 0.0])
    ys, info, sol = jaxode.odesolve(ball, z0, ts, PARAMS, events=GROUND, full_output=True, dense=True,
                                    gradient="backprop", **TOL)
    t_star = float(info.event_time)
    before = np.asarray(ts) <= t_star
    assert before.sum() == 3 and info.status == 0 and info.event_index == 0 and info.num_events == 1
    assert np.all(np.isnan(np.asarray(ys)[~before]))
    np.testing.assert_allclose(ys[before, 0], H0 - G * ts[before] ** 2 / 2, rtol=1e-10)
    assert abs(info.event_state[0]) < 1e-13 * H0
    # the dense output at t* (θ recomputed from t*: a rounding of t away) is the state there
    slope = np.abs(np.asarray(ball(info.event_state, t_star, PARAMS)))
    atol = 4e-16 * t_star * slope.max()
    np.testing.assert_allclose(sol(info.event_time), info.event_state, rtol=0, atol=atol)
    assert info.final_time == info.event_time


@pytest.fixture(scope="module")
def bouncing():
    """A bouncing ball up to t = 5 (two bounces), jitted per mode: ``(ys, info)``."""

    def make(mode):
        @jax.jit
        def run(h, g, e):
            z0 = jnp.stack([h, 0.0, 0.0])
            ts = jnp.linspace(0.0, 5.0, 11)
            return jaxode.odesolve(ball, z0, ts, {"g": g, "e": e}, events=BOUNCE, gradient=mode,
                                   full_output=True, **TOL)

        return run

    return {mode: make(mode) for mode in MODES}


@pytest.mark.parametrize("mode", MODES)
def test_bouncing_ball_heights_bounce_times_and_gradients(bouncing, mode):
    run = bouncing[mode]
    ys, info = run(H0, G, E)
    ts = np.linspace(0.0, 5.0, 11)
    assert info.num_events == 2 and info.event_index == -1 and info.status == 0
    assert info.event_time == 5.0
    t1 = np.sqrt(2 * H0 / G)
    t2 = t1 + 2 * E * G * t1 / G
    for t, y in zip(ts, np.asarray(ys)):
        bounces = int(t > t1) + int(t > t2)
        if bounces == 0:
            exact, last = H0 - G * t**2 / 2, 0.0
        else:
            exact, last = bouncing_exact(H0, G, E, t, bounces)
        np.testing.assert_allclose(y[0], exact, atol=1e-8)
        np.testing.assert_allclose(y[2], last, atol=1e-9)  # the bounce times, through the update
    # gradients of the height and of the last bounce time at t = 5, w.r.t. h, g and e
    for out in (0, 2):
        got = jax.grad(lambda *a: run(*a)[0][-1, out], argnums=(0, 1, 2))(H0, G, E)
        exact = jax.grad(lambda *a: bouncing_exact(*a, 5.0, 2)[out // 2], argnums=(0, 1, 2))(H0, G, E)
        np.testing.assert_allclose(got, exact, rtol=1e-6)


def _pendulum_events():
    """A driven pendulum with a threshold event whose parameters (``c``, ``d``) only the
    condition and the update use, and a terminal event on the velocity."""
    cross = jaxode.Event(lambda z, t, p: z[0] - p["c"], direction=-1, terminal=False,
                         update=lambda z, t, p: jnp.stack([z[0] + p["d"], 0.7 * z[1]]))
    stop = jaxode.Event(lambda z, t, p: z[1] + p["s"], direction=-1)
    return [cross, stop]


PEND_EVENTS = _pendulum_events()  # one object: repeated solves reuse the compiled program
PEND = {"a": jnp.array(1.1), "b": jnp.array(2.0), "w": jnp.array(1.3), "c": jnp.array(0.6),
        "d": jnp.array(0.25), "s": jnp.array(1.1)}
PEND_Z0 = jnp.array([0.8, 0.6])
PEND_TS = jnp.array([0.0, 0.7, 1.5, 2.6, 4.0, 6.0])


def _pendulum_loss(mode, z0, ts, p):
    ys, info = jaxode.odesolve(forced_oscillator, z0, ts, p, events=PEND_EVENTS, gradient=mode,
                               full_output=True, rtol=1e-12, atol=1e-12)
    reached = jnp.isfinite(ys[:, 0])
    weights = jnp.arange(1.0, 7.0)[:, None] * jnp.array([1.0, -0.5])
    outputs = jnp.sum(jnp.where(reached[:, None], weights * jnp.sin(jnp.where(reached[:, None], ys, 0)), 0))
    return outputs + 0.3 * info.event_time + jnp.sum(info.event_state**2)


def test_pendulum_events_fire_as_intended():
    _, info = jaxode.odesolve(forced_oscillator, PEND_Z0, PEND_TS, PEND, events=PEND_EVENTS,
                              full_output=True, rtol=1e-12, atol=1e-12)
    assert info.num_events >= 3 and info.event_index == 1  # resets, then the terminal one
    assert PEND_TS[2] < info.event_time < PEND_TS[3]


@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_finite_differences(mode):
    """W.r.t. z0, every parameter (``c``, ``d`` used only by the event) and ts."""
    args = (PEND_Z0, PEND_TS, PEND)
    grads = jax.grad(lambda *a: _pendulum_loss(mode, *a), argnums=(0, 1, 2))(*args)
    fd = central_difference(lambda a: _pendulum_loss("backprop", *a), args, eps=1e-6)
    for got, ref in zip(grads, fd):
        assert relative_error(got, ref) < 1e-6, (got, ref)


def test_double_sign_change_inside_one_step():
    """One rk4 step over [0, 3]; the condition is negative only on (1.4, 1.6): the ends of the
    step miss it, the interior points (θ = 1/4, 1/2, 3/4) catch it."""
    f = lambda z, t, p: jnp.ones_like(z)
    ts = jnp.array([0.0, 3.0])
    dip = lambda z, t, p: (z[0] - 1.5) ** 2 - 0.01
    kw = dict(solver="rk4", dt0=3.0, full_output=True)
    _, missed = jaxode.odesolve(f, jnp.zeros(1), ts, events=jaxode.Event(dip, interior_points=0), **kw)
    assert missed.num_events == 0 and missed.num_steps == 1
    _, info = jaxode.odesolve(f, jnp.zeros(1), ts, events=jaxode.Event(dip), **kw)
    assert info.num_events == 1 and info.event_index == 0
    np.testing.assert_allclose(info.event_time, 1.4, rtol=1e-14)


def test_earliest_event_in_a_step_wins_and_ties_go_to_the_lower_index():
    f = lambda z, t, p: jnp.ones_like(z)
    kw = dict(solver="rk4", dt0=3.0, full_output=True)
    at = lambda c: jaxode.Event(lambda z, t, p: z[0] - c)
    _, info = jaxode.odesolve(f, jnp.zeros(1), jnp.array([0.0, 3.0]), events=[at(2.0), at(1.0)], **kw)
    assert info.event_index == 1 and abs(info.event_time - 1.0) < 1e-14
    twice = [jaxode.Event(lambda z, t, p: z[0] - 1.0), jaxode.Event(lambda z, t, p: 2 * (z[0] - 1.0))]
    for events, index in ((twice, 0), (twice[::-1], 0)):
        _, info = jaxode.odesolve(f, jnp.zeros(1), jnp.array([0.0, 3.0]), events=events, **kw)
        assert info.event_index == index and info.num_events == 1


def test_no_event_on_a_rejected_step():
    """The first attempt (dt0 = 1 on z' = -50 z) ends far above 2 and is rejected; the accepted
    solution decays from 1, so the event z = 2 never fires."""
    from jaxode.methods import get_method

    f = lambda z, t, p: -50.0 * z
    g = lambda y, t: f(y, t, None)
    y0 = jnp.ones(1)
    first = get_method("tsit5").step(g, 0.0, y0, 1.0, g(y0, 0.0), (), 1.0)
    assert first.y_new[0] > 2  # the attempt would cross the level
    ys, info = jaxode.odesolve(f, y0, jnp.array([0.0, 1.0]), events=jaxode.Event(lambda z, t, p: z[0] - 2.0),
                               dt0=1.0, full_output=True)
    assert info.num_rejected >= 1 and info.num_events == 0 and info.event_index == -1
    np.testing.assert_allclose(ys[-1], np.exp(-50.0), atol=1e-6)


def test_zeno_ends_in_the_max_steps_error_mentioning_events():
    """A ball bouncing to rest: events ever closer together; never a hang."""
    z0 = jnp.array([1.0, 0.0, 0.0])
    p = {"g": jnp.array(G), "e": jnp.array(0.5)}
    kw = dict(events=BOUNCE, max_steps=300, full_output=True)
    _, info = jaxode.odesolve(ball, z0, jnp.array([0.0, 5.0]), p, throw=False, **kw)
    assert info.status == errors.EVENTS_MAX_STEPS and info.num_events > 20
    assert np.isnan(info.event_time) and np.all(np.isnan(info.event_state))  # nothing finite-looking
    with pytest.raises(jaxode.SolveError, match="events"):
        jaxode.odesolve(ball, z0, jnp.array([0.0, 5.0]), p, **kw)


VMAP_HS = jnp.array([1.0, 5.0, 20.0])
VMAP_TS = jnp.array([0.0, 1.0, 2.5])


@pytest.fixture(scope="module")
def vmapped():
    """Three drops under ``jax.vmap``: each its own steps and impact."""
    def one(h):
        z0 = jnp.stack([h, 0.0, 0.0])
        ys, info = jaxode.odesolve(ball, z0, VMAP_TS, PARAMS, events=GROUND, full_output=True, **TOL)
        return ys, info

    return jax.jit(jax.vmap(one))(VMAP_HS)


def test_vmap_each_sample_its_own_events(vmapped):
    ys, info = vmapped
    np.testing.assert_allclose(info.event_time, np.sqrt(2 * np.asarray(VMAP_HS) / G), rtol=1e-10)
    assert len(set(np.asarray(info.num_steps).tolist())) > 1  # each its own steps
    reached = np.asarray(VMAP_TS)[None, :] <= np.asarray(info.event_time)[:, None]
    assert np.array_equal(np.isfinite(np.asarray(ys[..., 0])), reached)


@pytest.mark.parametrize("mode", MODES)
def test_batched_events_each_problem_its_own_and_exact_gradient(vmapped, mode):
    """``batched=True`` gives the vmapped solve's impacts and NaN outputs after them, and the
    gradient of the summed impact times is the closed form's."""
    ys_v, info_v = vmapped
    z0s = jnp.stack([VMAP_HS, jnp.zeros(3), jnp.zeros(3)], axis=1)

    def loss(g):
        ys, info = jaxode.odesolve(ball, z0s, VMAP_TS, {"g": g, "e": PARAMS["e"]}, events=GROUND,
                                   batched=True, full_output=True, gradient=mode, **TOL)
        return jnp.sum(info.event_time), (ys, info.event_time)

    (_, (ys, event_time)), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(PARAMS["g"])
    np.testing.assert_allclose(event_time, info_v.event_time, rtol=1e-12)
    np.testing.assert_array_equal(np.isnan(ys), np.isnan(ys_v))
    exact = jax.grad(lambda g: jnp.sum(impact_exact(VMAP_HS, g)[0]))(G)
    np.testing.assert_allclose(grad, exact, rtol=1e-7)


@pytest.mark.parametrize("mode, backwards", [("adjoint", False), ("adjoint", True), ("backprop", False),
                                            ("checkpoint", True)])
def test_terminal_events_located_after_the_loop_as_in_it(mode, backwards):
    """Terminal events only are located after the loop (``Loop.locate_events_after``); with a
    non-terminal event among them (one that never fires), in the step itself. Both give the
    same events, times, states, outputs (NaN after t*), statistics and gradients, under
    jax.vmap, with two terminal events that fire alone, in one step (the earlier wins) or not
    at all. The second event: time |t| reaching ``z[2]``."""
    sign = -1.0 if backwards else 1.0
    ts = sign * jnp.linspace(0.0, 2.0, 21)
    events = [GROUND, jaxode.Event(lambda z, t, p: sign * t - z[2], direction=1)]
    never = jaxode.Event(lambda z, t, p: z[0] + 1e6, terminal=False)
    # impacts at sqrt(2h/g) = 0.45, 1.01, 1.195 (with |t| = 1.2 in the same step), 2.02, 2.47
    hs = jnp.array([1.0, 5.0, 7.0, 20.0, 30.0])
    cs = jnp.array([5.0, 5.0, 1.2, 1.2, 5.0])

    def run(events):
        def one(h, c):
            z0 = jnp.stack([h, 0.0, c])
            return jaxode.odesolve(ball, z0, ts, PARAMS, events=events, gradient=mode, full_output=True,
                                   rtol=1e-8, atol=1e-8)

        def loss(hs):
            ys, info = jax.vmap(one)(hs, cs)
            reached = jnp.where(jnp.isnan(ys), 0, ys)
            return jnp.sum(info.event_time) + jnp.sum(info.event_state) + jnp.sum(reached)

        return jax.jit(jax.vmap(one))(hs, cs), jax.jit(jax.grad(loss))(hs)

    ((ys, info), grad), ((ys_ref, ref), grad_ref) = run(events), run(events + [never])
    np.testing.assert_array_equal(ref.event_index, [0, 0, 0, 1, -1])
    for name in ("event_index", "num_events", "num_steps", "nfe", "status"):
        np.testing.assert_array_equal(getattr(info, name), getattr(ref, name), err_msg=name)
    np.testing.assert_allclose(info.event_time, ref.event_time, rtol=1e-15, atol=0)
    np.testing.assert_allclose(info.event_state, ref.event_state, rtol=1e-14, atol=1e-13)  # rounding
    np.testing.assert_array_equal(np.isnan(ys), np.isnan(ys_ref))
    np.testing.assert_allclose(ys, ys_ref, rtol=1e-14, atol=1e-13)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-10)
    np.testing.assert_allclose(info.event_time[:3], sign * np.sqrt(2 * np.asarray(hs[:3]) / G), rtol=1e-7)
    np.testing.assert_allclose(info.event_time[3:], sign * np.array([1.2, 2.0]), rtol=1e-14)


def test_pytree_state_and_backwards_in_time():
    f = lambda z, t, p: {"x": z["v"], "v": -G * jnp.ones_like(z["x"])}
    z0 = {"x": jnp.array(H0), "v": jnp.array(0.0)}
    ev = jaxode.Event(lambda z, t, p: z["x"])
    for ts, sign in ((jnp.array([0.0, 3.0]), 1), (jnp.array([0.0, -3.0]), -1)):
        _, info = jaxode.odesolve(f, z0, ts, events=ev, full_output=True, **TOL)
        assert set(info.event_state) == {"x", "v"}
        np.testing.assert_allclose(info.event_time, sign * np.sqrt(2 * H0 / G), rtol=1e-10)
        np.testing.assert_allclose(info.event_state["v"], -sign * G * np.sqrt(2 * H0 / G), rtol=1e-9)


def test_event_parameters_held_by_an_equinox_condition():
    class Threshold(eqx.Module):
        level: jax.Array

        def __call__(self, z, t, p):
            return z[0] - self.level

    def t_star(level):
        ev = jaxode.Event(Threshold(level))
        _, info = jaxode.odesolve(ball, jnp.array([H0, 0.0, 0.0]), jnp.array([0.0, 3.0]), PARAMS, events=ev,
                                  full_output=True, **TOL)
        return info.event_time

    exact = jax.grad(lambda lv: jnp.sqrt(2 * (H0 - lv) / G))(2.0)
    np.testing.assert_allclose(jax.grad(t_star)(jnp.array(2.0)), exact, rtol=1e-7)


@pytest.mark.parametrize("mode", [*MODES, "reversible"])
def test_max_events(mode):
    """``max_events`` = the events that fire (2): the same outputs and gradient as without it,
    bit for bit (``assert_same_computation``); one fewer: the solve fails naming ``max_events``
    (raised under jit, gradient included), or NaN outputs and gradient with ``throw=False``."""

    def loss(e, max_events, throw=True):
        ys = jaxode.odesolve(ball, jnp.array([H0, 0.0, 0.0]), jnp.linspace(0.0, 5.0, 3), {"g": G, "e": e},
                             events=BOUNCE, gradient=mode, max_events=max_events, throw=throw, **TOL)
        return ys[-1, 0] + ys[-1, 2]

    value, grad = jax.jit(jax.value_and_grad(lambda e: loss(e, None)))(E)
    value2, grad2 = jax.jit(jax.value_and_grad(lambda e: loss(e, 2)))(E)
    assert_same_computation(value, value2)
    assert_same_computation(grad, grad2)
    assert np.isfinite(float(grad))
    value1, grad1 = jax.jit(jax.value_and_grad(lambda e: loss(e, 1, False)))(E)
    assert np.isnan(float(value1)) and np.isnan(float(grad1))
    with pytest.raises(Exception, match="more events fired than max_events"):
        jax.jit(jax.grad(lambda e: loss(e, 1)))(E)


def test_max_events_status_and_bad_input():
    solve = lambda **kw: jaxode.odesolve(ball, jnp.array([H0, 0.0, 0.0]), jnp.array([0.0, 5.0]), PARAMS,
                                         full_output=True, throw=False, **kw)
    ys, info = solve(events=BOUNCE, max_events=1)
    assert int(info.status) == errors.TOO_MANY_EVENTS and int(info.num_events) == 2
    assert np.all(np.isnan(np.asarray(ys[-1])))
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="max_events must be a positive int"):
            solve(events=BOUNCE, max_events=bad)
    with pytest.raises(ValueError, match="pass events= too"):
        solve(max_events=3)


def test_bad_input():
    z0, ts = jnp.array([H0, 0.0, 0.0]), jnp.array([0.0, 1.0])
    solve = lambda ev: jaxode.odesolve(ball, z0, ts, PARAMS, events=ev)
    with pytest.raises(ValueError, match="real floating-point scalar"):
        solve(jaxode.Event(lambda z, t, p: z))
    with pytest.raises(ValueError, match="update must return"):
        solve(jaxode.Event(lambda z, t, p: z[0], terminal=False, update=lambda z, t, p: z[:2]))
    with pytest.raises(ValueError, match="direction must be -1, 0 or 1"):
        jaxode.Event(lambda z, t, p: z[0], direction=2)
    with pytest.raises(ValueError, match="terminal=False"):
        jaxode.Event(lambda z, t, p: z[0], update=bounce)
    with pytest.raises(TypeError, match="jaxode.Event"):
        solve([lambda z, t, p: z[0]])
    with pytest.raises(ValueError, match="interior_points"):
        jaxode.Event(lambda z, t, p: z[0], interior_points=-1)
    with pytest.raises(TypeError, match=r"calling events\[0\]\.condition\(z, t, params\) failed: KeyError"):
        solve(jaxode.Event(lambda z, t, p: z[0] + p["missing"]))  # PARAMS has no such key
    with pytest.raises(TypeError, match=r"calling events\[1\]\.update\(z, t, params\) failed: KeyError"):
        solve([jaxode.Event(lambda z, t, p: z[0]),
               jaxode.Event(lambda z, t, p: z[0], terminal=False, update=lambda z, t, p: z @ p["missing"])])


@pytest.mark.parametrize("mode", ("adjoint", "backprop"))
def test_jump_between_outputs_on_the_flat_driver(mode):
    """Regression (found with the event adjoint, which lands on event times as jump times):
    a stop-at-outputs loop (fixed step; the adjoint's backward solve) run by the flat driver
    (a state too large for the nested one) took landing on a time of ``jump_ts`` for arriving
    at the next output time: ``ys[1]`` was the state at the jump, and the adjoint re-anchored
    and added cotangents there."""
    f = lambda z, t, p: -p * z
    ts, jumps, z0 = jnp.array([0.0, 1.0, 2.0]), jnp.array([0.5]), jnp.ones(40)
    ys = jaxode.odesolve(f, z0, ts, 1.0, solver="rk4", dt0=0.1, jump_ts=jumps)
    np.testing.assert_allclose(ys[:, 0], np.exp(-np.asarray(ts)), rtol=1e-5)  # rk4: ~2e-6
    loss = lambda p: jnp.sum(jaxode.odesolve(f, z0, ts, p, jump_ts=jumps, gradient=mode, **TOL)[-1])
    np.testing.assert_allclose(jax.grad(loss)(1.0), -40 * 2 * np.exp(-2.0), rtol=1e-8)


@pytest.mark.parametrize("mode, solver", [("adjoint", "dopri8"), ("backprop", "rk4"),
                                          ("checkpoint", "tsit5")])
def test_backwards_in_time_other_solvers_and_their_gradients(mode, solver):
    """Decreasing ts (the ball's height is even in t: t* = -sqrt(2h/g)), a fixed-step solver,
    and DOP853 (whose interpolant costs evaluations)."""
    exact = lambda h, g: -jnp.sqrt(2 * h / g)
    options = dict(dt0=0.1) if solver == "rk4" else TOL

    def t_star(h, g):
        z0, ts = jnp.stack([h, 0.0, 0.0]), jnp.array([0.0, -3.0])
        _, info = jaxode.odesolve(ball, z0, ts, {"g": g, "e": 0.0}, events=GROUND, gradient=mode,
                                  solver=solver, full_output=True, **options)
        return info.event_time

    np.testing.assert_allclose(t_star(H0, G), exact(H0, G), rtol=1e-12)
    grads = jax.grad(t_star, argnums=(0, 1))(H0, G)
    np.testing.assert_allclose(grads, jax.grad(exact, argnums=(0, 1))(H0, G), rtol=1e-10)


def test_adjoint_second_derivatives_name_the_alternative():
    def t_star(h):
        z0 = jnp.stack([h, 0.0, 0.0])
        _, info = jaxode.odesolve(ball, z0, jnp.array([0.0, 3.0]), PARAMS, events=GROUND, full_output=True)
        return info.event_time

    with pytest.raises(NotImplementedError, match="backprop"):
        jax.hessian(t_star)(jnp.array(H0))


STIFF_A = jnp.array([[-1000.0, 0.0], [1.0, -1.0]])


def _stiff(z, t, p):
    return p[0] * (STIFF_A @ z) + jnp.stack([0.0, p[1]])


def test_stiff_terminal_event_adjoint_is_the_interpolating_one():
    """rodas5p with a terminal event: the default adjoint (the interpolating one, ``z`` read off
    forward re-solves; a backsolve would grow the fast mode by e^{1000 t}) matches float64 central
    differences through the outputs before the event, the event time and the event state; outputs
    past the event get no cotangent."""
    ev = jaxode.Event(lambda z, t, p: z[1] - 0.5)
    ts = jnp.array([0.0, 0.2, 0.6, 3.0, 5.0])  # the event is near t = 0.69 (p = 1)

    def loss(p, z0, gradient="adjoint"):
        ys, info = jaxode.odesolve(_stiff, z0, ts, p, solver="rodas5p", rtol=1e-9, atol=1e-11, events=ev,
                                   gradient=gradient, full_output=True)
        reached = jnp.where(jnp.isfinite(ys), ys, 0.0)
        return jnp.sum(reached[1:3] ** 2) + 3 * info.event_time + jnp.sum(jnp.sin(info.event_state))

    p, z0 = jnp.array([1.0, 1.0]), jnp.array([1.0, 0.1])
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))(p, z0)
    reference = central_difference(jax.jit(lambda x: loss(x[0], x[1], "checkpoint")), (p, z0), eps=1e-6)
    assert relative_error(grad, reference) < 1e-6


def test_interpolating_adjoint_gives_the_falling_balls_impact_derivatives():
    """tsit5 with ``adjoint_interpolate=True`` and a terminal event: the closed-form derivatives
    of the impact time and velocity, ``dt*/dh = 1/sqrt(2hg)``, ``dv/dh = -g/sqrt(2hg)``."""
    def impact(h, g):
        _, info = jaxode.odesolve(ball, jnp.stack([h, 0.0, 0.0]), jnp.linspace(0.0, 3.0, 4),
                                  {"g": g, "e": 0.0}, events=GROUND, adjoint_interpolate=True,
                                  full_output=True, **TOL)
        return info.event_time, info.event_state[1]

    h, g = 10.0, 9.81
    jac = jax.jit(jax.jacrev(impact, argnums=(0, 1)))(h, g)
    exact = jax.jacrev(impact_exact, argnums=(0, 1))(h, g)
    np.testing.assert_allclose(np.array(jac), np.array(exact), rtol=1e-8)


@pytest.mark.parametrize("solver", ["rodas5p", "tsit5"])
def test_interpolating_adjoint_across_resets(solver):
    """The bouncing ball's height and last bounce time at t = 5 (two resets) by the interpolating
    adjoint (rodas5p's default; tsit5 with ``adjoint_interpolate=True``), the re-solves replaying
    the bounces and the jump condition applied at each: the closed-form derivatives w.r.t.
    ``h, g, e``; under ``jax.vmap`` over two heights (both branches of its ``lax.cond`` run)."""
    def final(h, g, e):
        ys = jaxode.odesolve(ball, jnp.stack([h, 0.0, 0.0]), jnp.linspace(0.0, 5.0, 6), {"g": g, "e": e},
                             solver=solver, events=BOUNCE, adjoint_interpolate=True, **TOL)
        return ys[-1, 0], ys[-1, 2]

    jacobian = jax.vmap(jax.jacrev(final, argnums=(0, 1, 2)), (0, None, None))
    got = jax.jit(jacobian)(jnp.array([H0, 12.0]), G, E)
    for b, h in enumerate((H0, 12.0)):
        for out in (0, 1):
            exact = jax.grad(lambda *a: bouncing_exact(*a, 5.0, 2)[out], argnums=(0, 1, 2))(h, G, E)
            np.testing.assert_allclose([g[b] for g in got[out]], exact, rtol=1e-6)


def test_interpolating_adjoint_reads_the_state_before_each_reset():
    """The driven pendulum's resets (20 of them) and terminal event through the interpolating
    adjoint: its parameter quadratures read ``z`` off the re-solves, and a backward step that
    starts at a reset must see the state before it, not after (the field's parameters would be
    off by ~1e-2 here, while ``z0`` and the event's own parameters stay right). The second
    output interval takes ~135 steps: it is re-solved by segments, each reset inside one."""
    ts = jnp.array([0.0, 0.05, 6.0])

    def loss(z0, p, mode, interpolate):
        ys, info = jaxode.odesolve(forced_oscillator, z0, ts, p, events=PEND_EVENTS, gradient=mode,
                                   adjoint_interpolate=interpolate, full_output=True, rtol=1e-12, atol=1e-12)
        reached = jnp.isfinite(ys[:, 0])
        outputs = jnp.sum(jnp.where(reached[:, None], jnp.sin(jnp.where(reached[:, None], ys, 0)), 0))
        return outputs + 0.3 * info.event_time + jnp.sum(info.event_state**2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=(2, 3))
    exact = grad(PEND_Z0, PEND, "checkpoint", None)
    assert relative_error(grad(PEND_Z0, PEND, "adjoint", True), exact) < 1e-8
