"""The time-stepping loop: evaluation counts, where f is evaluated, max_steps, rejection of
non-finite steps, the automatic first step, fixed-step grids."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ADAPTIVE_SOLVERS, FIXED_SOLVERS, STAGES, Recorder, logistic_exact

import jaxode
from jaxode import drivers
from jaxode.loop import Loop
from jaxode.methods import METHODS
from jaxode.methods.tableaus import SOLVERS

TS = jnp.array([0.0, 0.7, 2.5, 6.0])


def _counted_solver(name, recorder, dt0_given):
    def f(z, t, p):
        recorder.record(t)
        return jnp.stack([z[1], -z[0] - 0.3 * z[1] + jnp.cos(1.3 * t)])

    opts = dict(solver=name, full_output=True, rtol=1e-7, atol=1e-7)
    if dt0_given:
        return jax.jit(lambda z0, dt0: jaxode.odesolve(f, z0, TS, dt0=dt0, **opts))
    return jax.jit(lambda z0: jaxode.odesolve(f, z0, TS, **opts))


@pytest.mark.parametrize("name", ADAPTIVE_SOLVERS)
def test_nfe_counts_real_evaluations_automatic_first_step(name, recorder: Recorder):
    solve = _counted_solver(name, recorder, dt0_given=False)
    ys, info = solve(jnp.array([1.0, 0.0]))
    times = recorder.collect()
    assert int(info.nfe) == len(times)
    assert int(info.num_steps) == int(info.num_accepted) + int(info.num_rejected)
    s = STAGES[name]
    if name == "dopri8":  # 3 extra (dense) stages in each accepted step that holds an output
        extra = int(info.nfe) - (2 + (s - 1) * int(info.num_steps))
        assert extra % 3 == 0 and 3 <= extra <= 3 * (len(TS) - 1)
    else:  # documented: f(z0), the first-step probe, then s - 1 per step attempt (FSAL)
        assert int(info.nfe) == 2 + (s - 1) * int(info.num_steps)


@pytest.mark.parametrize("name", ["tsit5", "bosh3"])
def test_nfe_with_rejections_and_given_dt0(name, recorder: Recorder):
    solve = _counted_solver(name, recorder, dt0_given=True)
    ys, info = solve(jnp.array([1.0, 0.0]), 3.0)  # too large a first step: rejections
    times = recorder.collect()
    assert int(info.num_rejected) > 0
    assert int(info.nfe) == len(times) == 1 + (STAGES[name] - 1) * int(info.num_steps)


@pytest.mark.parametrize("name", FIXED_SOLVERS)
def test_nfe_fixed_step(name, recorder: Recorder):
    solve = _counted_solver(name, recorder, dt0_given=True)
    ys, info = solve(jnp.array([1.0, 0.0]), 0.25)
    times = recorder.collect()
    # steps of 0.25 restarting at each output: [0, 0.7] 3, [0.7, 2.5] 8, [2.5, 6] 14
    assert int(info.num_steps) == int(info.num_accepted) == 3 + 8 + 14
    assert int(info.nfe) == len(times) == 1 + SOLVERS[name].num_stages * int(info.num_steps)


def _rk4_reference(f, y0, ts, dt):
    """Classic RK4 in numpy, the grid restarting at each output time, the last step shortened."""
    ys, y = [np.array(y0, dtype=np.float64)], np.array(y0, dtype=np.float64)
    for a, b in zip(ts[:-1], ts[1:]):
        t = a
        n = int(np.ceil((b - a) / dt - 1e-9))
        for i in range(n):
            h = dt if i < n - 1 else b - t
            k1 = f(y, t)
            k2 = f(y + h / 2 * k1, t + h / 2)
            k3 = f(y + h / 2 * k2, t + h / 2)
            k4 = f(y + h * k3, t + h)
            y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            t = a + (i + 1) * dt if i < n - 1 else b
        ys.append(y)
    return np.array(ys)


def test_fixed_step_grid_restarts_at_each_output():
    f_np = lambda y, t: np.array([y[1], -np.sin(y[0]) + 0.2 * np.cos(t)])
    f = lambda z, t, p: jnp.stack([z[1], -jnp.sin(z[0]) + 0.2 * jnp.cos(t)])
    ts = np.array([0.0, 0.35, 1.0, 2.2, 2.3])
    ys, info = jaxode.odesolve(f, jnp.array([1.0, 0.0]), jnp.asarray(ts), solver="rk4", dt0=0.3,
                               full_output=True)
    np.testing.assert_allclose(ys, _rk4_reference(f_np, [1.0, 0.0], ts, 0.3), rtol=1e-13, atol=1e-14)
    assert int(info.num_steps) == 2 + 3 + 4 + 1


def test_fixed_step_exact_multiple_takes_no_sliver_step():
    # 0.1 does not divide 1.0 exactly in floating point: still exactly 10 steps, no tiny 11th.
    ys, info = jaxode.odesolve(lambda z, t, p: -z, jnp.array([1.0]), jnp.array([0.0, 1.0]), solver="euler",
                               dt0=0.1, full_output=True)
    assert int(info.num_steps) == 10
    np.testing.assert_allclose(ys[-1, 0], 0.9**10, rtol=1e-13)


# ---- where f is evaluated -------------------------------------------------------------------------

SPANS_OK = [(0.0, 1.0), (0.0, 10.0), (0.3, 7.123456789), (3.0, 0.0), (10.0, 0.5), (-1.0, -4.0)]


@pytest.mark.parametrize("name", ["tsit5", "dopri8", "rk4"])
def test_never_evaluates_beyond_last_time_and_lands_on_it(name, recorder: Recorder):
    def f(z, t, p):
        recorder.record(t)
        return -z + jnp.sin(t)

    dt0 = 0.3 if name == "rk4" else None
    solve = jax.jit(lambda ts: jaxode.odesolve(f, jnp.array([1.0]), ts, solver=name, dt0=dt0))
    for t0, t1 in SPANS_OK:
        recorder.clear()
        solve(jnp.array([t0, (t0 + t1) / 2, t1]))
        times = recorder.collect()
        lo, hi = min(t0, t1), max(t0, t1)
        assert times.min() >= lo and times.max() <= hi, (t0, t1, times.min(), times.max())
        assert t1 in times  # the last step lands exactly on ts[-1] (f at the final point)


@pytest.mark.parametrize("name", ["tsit5", "dopri8"])
def test_never_evaluates_beyond_last_time_rounding(name, recorder: Recorder):
    def f(z, t, p):
        recorder.record(t)
        return -z

    jaxode.odesolve(f, jnp.array([1.0]), jnp.array([-0.3, 0.01]), solver=name)
    times = recorder.collect()
    assert times.max() <= 0.01
    assert 0.01 in times


def test_field_undefined_beyond_end_time_costs_nothing():
    t_end = 0.01
    for name in ("tsit5", "dopri8"):
        clean = jaxode.odesolve(lambda z, t, p: -z, jnp.array([1.0]), jnp.array([-0.3, t_end]), solver=name,
                                full_output=True)
        nan_after = jaxode.odesolve(lambda z, t, p: jnp.where(t > t_end, jnp.nan, -z), jnp.array([1.0]),
                                    jnp.array([-0.3, t_end]), solver=name, full_output=True, throw=False)
        assert int(nan_after[1].status) == 0
        assert int(nan_after[1].num_steps) == int(clean[1].num_steps)
        np.testing.assert_array_equal(nan_after[0], clean[0])


def test_field_undefined_after_end_time_is_fine_for_simple_spans():
    """f is NaN after ts[-1]: the solve must neither see it nor be slowed down by it."""
    f = lambda z, t, p: jnp.where(t > 2.0, jnp.nan, -z)
    ts = jnp.array([0.0, 1.0, 2.0])
    ys, info = jaxode.odesolve(f, jnp.array([1.0]), ts, full_output=True, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(ys[:, 0], np.exp(-np.asarray(ts)), rtol=1e-7)
    assert int(info.num_rejected) == 0 and int(info.status) == 0


# ---- max_steps ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tsit5", "rk4"])
def test_max_steps_counts_all_steps_of_the_solve(name):
    ts = jnp.linspace(0.0, 10.0, 6)
    f = lambda z, t, p: jnp.stack([z[1], (1 - z[0] ** 2) * z[1] - z[0]])
    opts = dict(solver=name, dt0=3.0 if name == "tsit5" else 0.1, rtol=1e-8, atol=1e-8, throw=False,
                full_output=True)
    ys, info = jaxode.odesolve(f, jnp.array([2.0, 0.0]), ts, **opts)
    n = int(info.num_steps)
    assert int(info.status) == 0 and n == int(info.num_accepted) + int(info.num_rejected)
    if name == "tsit5":
        assert int(info.num_rejected) > 0  # rejected steps are part of the count
    ys_n, info_n = jaxode.odesolve(f, jnp.array([2.0, 0.0]), ts, max_steps=n, **opts)
    assert int(info_n.status) == 0 and int(info_n.num_steps) == n
    np.testing.assert_array_equal(ys_n, ys)
    ys_short, info_short = jaxode.odesolve(f, jnp.array([2.0, 0.0]), ts, max_steps=n - 1, **opts)
    assert int(info_short.status) == 1 and int(info_short.num_steps) == n - 1
    assert np.isnan(np.asarray(ys_short[-1])).all()
    # the outputs reached before the failure are those of the full solve
    reached = ~np.isnan(np.asarray(ys_short[:, 0]))
    assert reached[:-1].sum() >= 4
    np.testing.assert_array_equal(ys_short[reached], ys[reached])


# ---- non-finite values reject the step ----------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "bosh3",
        "dopri5",
        "tsit5",
        "dopri8",
    ],
)
def test_nan_in_step_rejects_and_shrinks(name, recorder: Recorder):
    """f is NaN outside (0, 1), where the true (logistic) solution never goes; an overly large
    first step enters that region: it must be rejected and shrunk, and the solve must then be
    accurate (never extrapolated garbage)."""
    def f(z, t, p):
        outside = jnp.any((z <= 0) | (z >= 1))
        jax.debug.callback(lambda o: recorder(float(o)), outside)
        return jnp.where(outside, jnp.nan, z * (1 - z))

    ts = jnp.array([0.0, 1.0, 4.0, 10.0])
    ys, info = jaxode.odesolve(f, jnp.array([0.1]), ts, solver=name, dt0=10.0, rtol=1e-8, atol=1e-8,
                               full_output=True, throw=False, max_steps=400)
    nan_evaluations = recorder.collect().sum()
    assert nan_evaluations > 0 and int(info.num_rejected) > 0
    assert int(info.status) == 0
    assert np.isfinite(np.asarray(ys)).all()
    np.testing.assert_allclose(ys[:, 0], logistic_exact(np.asarray(ts)), rtol=0, atol=1e-7)


# ---- automatic first step ----------------------------------------------------------------------


def test_automatic_first_step_scales_with_time_scale(recorder: Recorder):
    """For y' = -k y on [0, 10/k] the problems differ only by the time unit: with dt0=None the
    number of steps hardly depends on k, over 8 orders of magnitude, and the first step is
    chosen from the problem (not a constant)."""
    def f(z, t, k):
        recorder.record(t)
        return -k * z

    solve = jax.jit(lambda k: jaxode.odesolve(f, jnp.array([1.0]), jnp.array([0.0, 10.0]) / k, k,
                                              full_output=True)[1])
    ks = [1e-4, 1e-2, 1.0, 1e2, 1e4]
    steps, firsts = [], []
    for k in ks:
        recorder.clear()
        steps.append(int(solve(k).num_steps))
        times = recorder.collect()
        firsts.append(times[2] / SOLVERS["tsit5"].c[1])  # f(z0), the probe, then t0 + c_1 h
    assert max(steps) - min(steps) <= 0.25 * min(steps), steps
    firsts = np.array(firsts)
    assert abs(firsts[2] - 0.01) > 1e-3  # k = 1: not a default constant step
    assert np.all(np.diff(firsts) < 0)  # a faster problem gets a smaller first step
    assert np.all(firsts * np.array(ks) <= 1.0 + 1e-12)  # at most 100 h0 = 1/k (Hairer)


# ---- the two drivers -------------------------------------------------------------------------------


def _damped(z, t, p):
    return jnp.stack([z[1], -z[0] - 0.3 * z[1] + jnp.cos(1.3 * t)])


@pytest.mark.parametrize("name", ["tsit5", "dopri8", "bosh3", "rk4"])
def test_nested_and_flat_loops_agree(name):
    """A 2-state system runs the nested driver (``drivers.nested``); 32 identical copies of it in
    one 64-state system run the flat driver (too big to run inline). The RMS
    error norm of identical copies is that of one, so both take the same steps and give the
    same outputs, at many output times per step and several steps per output."""
    ts = jnp.concatenate([jnp.linspace(0.0, 0.05, 40), jnp.linspace(0.5, 9.0, 5)])
    z0 = jnp.array([1.0, -0.5])
    opts = dict(solver=name, rtol=1e-8, atol=1e-8, full_output=True, dt0=0.01 if name == "rk4" else None)
    wide = lambda z, t, p: jnp.tile(_damped(z.reshape(32, 2)[0], t, p), 32)
    ys, info = jaxode.odesolve(_damped, z0, ts, **opts)
    ys_wide, info_wide = jaxode.odesolve(wide, jnp.tile(z0, 32), ts, **opts)
    # the drivers differ: the narrow system runs inline, the wide one flat
    at = lambda y0: Loop(lambda y, t: y, y0, ts, 1e-6, 1e-6, 0.1, method=METHODS[name], max_steps=8)
    assert not drivers.is_large(at(z0)) and drivers.is_large(at(jnp.tile(z0, 32)))
    for field in ("num_steps", "num_rejected", "nfe", "status"):
        assert int(getattr(info, field)) == int(getattr(info_wide, field)), field
    np.testing.assert_allclose(ys_wide.reshape(len(ts), 32, 2)[:, 5], ys, rtol=1e-13, atol=1e-14)
    ref = jaxode.odesolve(_damped, z0, ts, solver="dopri8", rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ys, ref, atol=1e-3 if name == "rk4" else 1e-6)


def test_vmap_over_a_closed_over_value_without_jit():
    """Under ``jax.vmap`` (not jitted) the field may close over the batched value; the nested
    loops' vmap rule must see it as batched: each problem gets its own rate."""
    ks = jnp.array([0.5, 1.0, 3.0])
    ts = jnp.linspace(0.0, 2.0, 5)

    def solve(k):
        return jaxode.odesolve(lambda z, t, p: -k * z, jnp.array([1.0, 2.0]), ts, rtol=1e-10, atol=1e-10)

    ys = jax.vmap(solve)(ks)
    exact = jnp.exp(-ks[:, None, None] * ts[None, :, None]) * jnp.array([1.0, 2.0])
    np.testing.assert_allclose(ys, exact, rtol=1e-8)
    g = jax.vmap(jax.grad(lambda k: solve(k)[-1, 0]))(ks)  # d/dk exp(-2k) = -2 exp(-2k)
    np.testing.assert_allclose(g, -2 * jnp.exp(-2 * ks), rtol=1e-7)


def test_counters_are_one_array_read_per_problem_of_a_batch():
    """The loop's counters live in one ``int32`` array (one buffer of the carry): ``counted``
    replaces those it names and keeps the others; the fields read a batch of states per
    problem; a name that is not a counter is refused."""
    loop = Loop(lambda y, t: -y, jnp.ones(2), jnp.linspace(0.0, 1.0, 3), 1e-6, 1e-8, None,
                method=METHODS["tsit5"], max_steps=16)
    state = loop.init()
    assert state.counts.shape == (7,) and state.counts.dtype == jnp.int32
    new = state.counted(nfe=state.nfe + 5, finite=False, status=3)
    assert (int(new.nfe), bool(new.finite), int(new.status)) == (int(state.nfe) + 5, False, 3)
    assert (int(new.i_out), int(new.num_accepted)) == (int(state.i_out), int(state.num_accepted))
    batch = jax.vmap(lambda y0: Loop(lambda y, t: -y, y0, jnp.linspace(0.0, 1.0, 3), 1e-6, 1e-8, None,
                                     method=METHODS["tsit5"], max_steps=16).init())(jnp.ones((4, 2)))
    assert batch.nfe.shape == (4,) and batch.finite.shape == (4,)
    with pytest.raises(TypeError, match="not a counter"):
        state.counted(steps=1)
