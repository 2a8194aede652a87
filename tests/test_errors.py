"""Bad input raises a clear error before any work; failed solves raise (throw=True) or return
NaN for the unreached outputs with a nonzero status (throw=False)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import failure_cause

import jaxode
from jaxode.methods.tableaus import SOLVERS

Z0 = jnp.array([1.0, 0.0])
TS = jnp.array([0.0, 1.0, 2.0])


def field(z, t, p):
    return jnp.stack([z[1], -z[0]])


# ---- bad input: raised at trace time ---------------------------------------------------------------


@pytest.mark.parametrize(
    "ts, match",
    [
        (jnp.zeros((2, 2)), "1-D"),
        (jnp.array(1.0), "1-D"),
        (jnp.array([0.0]), "at least two"),
        (jnp.array([0.0, 1.0, 1.0]), "strictly"),
        (jnp.array([0.0, 2.0, 1.0]), "strictly"),
        (jnp.array([2.0, 1.0, 3.0]), "strictly"),
        (jnp.array([0.0, jnp.nan]), "finite"),
        (jnp.array([0.0, 1.0, jnp.inf]), "finite"),
    ],
)
def test_bad_ts(ts, match):
    with pytest.raises(ValueError, match=match):
        jaxode.odesolve(field, Z0, ts)


def test_value_checks_of_an_array_given_again():
    """An eager call skips the value checks of a JAX array it checked before (immutable), but a
    NumPy array changed in place is checked again, and a new bad JAX array is caught."""
    ts = jnp.array([0.0, 1.0, 2.0])
    for _ in range(2):
        np.testing.assert_allclose(np.asarray(jaxode.odesolve(field, Z0, ts))[:, 0], np.cos([0.0, 1.0, 2.0]),
                                   rtol=1e-5)
    ts_np = np.array([0.0, 1.0, 2.0])
    jaxode.odesolve(field, Z0, ts_np)
    ts_np[2] = 0.5
    with pytest.raises(ValueError, match="strictly"):
        jaxode.odesolve(field, Z0, ts_np)
    z0_np = np.array([1.0, 0.0])
    jaxode.odesolve(field, z0_np, TS)
    z0_np[1] = np.nan
    with pytest.raises(ValueError, match="z0 must be finite"):
        jaxode.odesolve(field, z0_np, TS)
    with pytest.raises(ValueError, match="finite"):
        jaxode.odesolve(field, Z0, ts.at[1].set(jnp.nan))


def test_bad_ts_shape_raises_under_jit_at_trace_time():
    with pytest.raises(ValueError, match="1-D"):
        jax.jit(lambda ts: jaxode.odesolve(field, Z0, ts))(jnp.zeros((3, 1)))
    with pytest.raises(ValueError, match="at least two"):
        jax.jit(lambda ts: jaxode.odesolve(field, Z0, ts))(jnp.zeros((1,)))


@pytest.mark.parametrize("z0", [jnp.array([1, 0]), {"a": jnp.array([1.0]), "b": jnp.array([True])},
                                jnp.array([1, 0], dtype=jnp.int8)])
def test_z0_not_floating(z0):
    with pytest.raises(TypeError, match="floating"):
        jaxode.odesolve(lambda z, t, p: z, z0, TS)


@pytest.mark.parametrize(
    "f, error, match",
    [
        (lambda z, t, p: (z, z), ValueError, "structure"),
        (lambda z, t, p: {"z": z}, ValueError, "structure"),
        (lambda z, t, p: jnp.concatenate([z, z]), ValueError, "shape"),
        (lambda z, t, p: z[:, None], ValueError, "shape"),
        (lambda z, t, p: z.astype(jnp.float32), TypeError, "dtype"),
    ],
)
def test_f_output_must_match_z0(f, error, match):
    with pytest.raises(error, match=match):
        jaxode.odesolve(f, Z0, TS)


def test_f_output_pytree_mismatch_in_one_leaf():
    z0 = {"a": jnp.array([1.0]), "b": jnp.ones((2, 2))}
    with pytest.raises(ValueError, match="shape"):
        jaxode.odesolve(lambda z, t, p: {"a": z["a"], "b": z["b"][0]}, z0, TS)


def test_unknown_solver_lists_valid_names():
    with pytest.raises(ValueError, match="unknown solver") as err:
        jaxode.odesolve(field, Z0, TS, solver="rk45")
    for name in SOLVERS:
        assert name in str(err.value)


@pytest.mark.parametrize("name", ["euler", "midpoint", "heun", "rk4"])
def test_fixed_step_solver_needs_dt0(name):
    with pytest.raises(ValueError, match="dt0"):
        jaxode.odesolve(field, Z0, TS, solver=name)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(dt0=0.0), "dt0"),
        (dict(dt0=-0.1), "dt0"),
        (dict(solver="rk4", dt0=-0.1), "dt0"),
        (dict(rtol=-1e-6), "rtol"),
        (dict(atol=-1e-6), "atol"),
        (dict(max_steps=0), "max_steps"),
        (dict(max_steps=-5), "max_steps"),
        (dict(gradient="forward"), "gradient"),
        (dict(gradient="adjoints"), "gradient"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        jaxode.odesolve(field, Z0, TS, **options)


def test_bad_options_raise_before_any_work():
    calls = []

    def f(z, t, p):
        calls.append(None)  # traced calls count too: nothing may even be traced
        return -z

    with pytest.raises(ValueError, match="rtol"):
        jaxode.odesolve(f, Z0, TS, rtol=-1.0)
    with pytest.raises(ValueError, match="dt0"):
        jaxode.odesolve(f, Z0, TS, solver="euler")
    assert calls == []


def test_non_monotonic_traced_ts_raises_at_run_time():
    solve = jax.jit(lambda ts: jaxode.odesolve(field, Z0, ts))
    ys = solve(jnp.array([0.0, 1.0, 2.0]))  # fine
    np.testing.assert_allclose(ys[-1], [np.cos(2.0), -np.sin(2.0)], atol=1e-5)
    np.testing.assert_allclose(solve(jnp.array([2.0, 1.0, 0.0]))[-1], [np.cos(2.0), np.sin(2.0)], atol=1e-5)
    for bad in ([0.0, 2.0, 1.0], [0.0, 1.0, 1.0], [0.0, 1.0, np.nan]):
        with pytest.raises(Exception, match="strictly increasing or strictly decreasing"):
            jax.block_until_ready(solve(jnp.array(bad)))


# ---- failed solves ------------------------------------------------------------------------------------

CAUSES = {"max_steps": r"max_steps", "underflow": r"underflow", "nonfinite": r"non-?finite"}
STATUS = {"max_steps": 1, "underflow": 2, "nonfinite": 3}


def _vdp(z, t, p):
    return jnp.stack([z[1], (1 - z[0] ** 2) * z[1] - z[0]])


def _blow_up(z, t, p):
    return z**2  # y = 1 / (1/y0 - t): singular at t = 1/y0


def _nan_after_half(z, t, p):
    return jnp.where(t > 0.5, jnp.nan, -z)


# cause -> (f, z0, ts, options, exact solution at the outputs that must be reached (or None))
FAILURES = {
    "max_steps": (_vdp, jnp.array([2.0, 0.0]), jnp.array([0.0, 0.3, 10.0]), dict(max_steps=40), None),
    "underflow": (_blow_up, jnp.array([1.0]), jnp.array([0.0, 0.5, 0.9, 2.0]), dict(max_steps=100_000),
                  np.array([[1.0], [2.0], [10.0]])),
    "nonfinite": (_nan_after_half, jnp.array([1.0]), jnp.array([0.0, 0.2, 0.4, 2.0]),
                  dict(max_steps=100_000), np.exp(-np.array([[0.0], [0.2], [0.4]]))),
}


def _assert_cause(exc, cause):
    message = failure_cause(exc)
    assert re.search(CAUSES[cause], message), message
    for other, pattern in CAUSES.items():
        if other != cause:
            assert not re.search(pattern, message), message


@pytest.mark.parametrize("cause", list(FAILURES))
def test_failure_raises_naming_its_cause_under_jit(cause):
    f, z0, ts, opts, _ = FAILURES[cause]
    solve = jax.jit(lambda z0: jaxode.odesolve(f, z0, ts, rtol=1e-6, atol=1e-6, **opts))
    with pytest.raises(Exception) as err:
        jax.block_until_ready(solve(z0))
    _assert_cause(err.value, cause)


def test_failure_raises_without_jit():
    f, z0, ts, opts, _ = FAILURES["underflow"]
    with pytest.raises(Exception) as err:
        jax.block_until_ready(jaxode.odesolve(f, z0, ts, **opts))
    _assert_cause(err.value, "underflow")


@pytest.mark.parametrize("cause", list(FAILURES))
def test_failure_without_throw_keeps_reached_outputs(cause):
    f, z0, ts, opts, exact = FAILURES[cause]
    ys, info = jaxode.odesolve(f, z0, ts, rtol=1e-6, atol=1e-6, throw=False, full_output=True, **opts)
    assert int(info.status) == STATUS[cause]
    ys = np.asarray(ys)
    assert np.isnan(ys[-1]).all()
    reached = ~np.isnan(ys).any(axis=1)
    assert reached[0] and np.all(reached[: reached.sum()])  # a prefix of the outputs
    np.testing.assert_array_equal(ys[0], z0)
    if exact is not None:
        assert reached.sum() == len(exact)
        np.testing.assert_allclose(ys[reached], exact, rtol=2e-5)
    else:  # max_steps: what was reached agrees with an unconstrained solve
        full = jaxode.odesolve(f, z0, ts, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(ys[reached], np.asarray(full)[reached], rtol=1e-12)
        assert reached.sum() == 2


def test_fixed_step_state_overflow_is_nonfinite():
    # rk4 through the singularity of y' = y^2 at t = 1: the state becomes inf/NaN
    ts = jnp.array([0.0, 0.5, 2.0])
    ys, info = jaxode.odesolve(_blow_up, jnp.array([1.0]), ts, solver="rk4", dt0=0.01, throw=False,
                               full_output=True)
    assert int(info.status) == STATUS["nonfinite"]
    np.testing.assert_allclose(ys[:2, 0], [1.0, 2.0], rtol=1e-7)
    assert np.isnan(ys[2, 0])
    with pytest.raises(Exception) as err:
        jax.block_until_ready(jax.jit(lambda z0: jaxode.odesolve(_blow_up, z0, ts, solver="rk4", dt0=0.01))(
            jnp.array([1.0])))
    _assert_cause(err.value, "nonfinite")


def test_vmap_failure_only_affects_the_failing_element():
    ts = jnp.array([0.0, 0.5, 2.0])
    solve = jax.jit(jax.vmap(lambda z0: jaxode.odesolve(_blow_up, z0, ts, rtol=1e-6, atol=1e-6, throw=False,
                                                        full_output=True, max_steps=100_000)))
    z0 = jnp.array([[1.0], [0.2], [-1.0]])  # the first blows up at t = 1; the others are fine on [0, 2]
    ys, info = solve(z0)
    np.testing.assert_array_equal(np.asarray(info.status), [STATUS["underflow"], 0, 0])
    np.testing.assert_allclose(ys[0, :2, 0], [1.0, 2.0], rtol=1e-5)
    assert np.isnan(ys[0, 2, 0])
    exact = 1.0 / (1.0 / np.asarray(z0[1:]) - np.asarray(ts))
    np.testing.assert_allclose(ys[1:, :, 0], exact, rtol=1e-5)
    with pytest.raises(Exception) as err:
        jax.block_until_ready(jax.jit(jax.vmap(lambda z0: jaxode.odesolve(
            _blow_up, z0, ts, max_steps=100_000)))(z0))
    _assert_cause(err.value, "underflow")


@pytest.mark.parametrize("name, tol", [("tsit5", 1e-6), ("dopri5", 1e-6), ("dopri8", 1e-8)])
def test_blow_up_is_step_size_underflow(name, tol):
    ts = jnp.array([0.0, 0.5, 2.0])
    ys, info = jaxode.odesolve(_blow_up, jnp.array([1.0]), ts, solver=name, rtol=tol, atol=tol, throw=False,
                               full_output=True, max_steps=100_000)
    assert int(info.status) == STATUS["underflow"]
    assert int(info.num_steps) < 3000  # time's precision is exhausted in a few hundred steps
    np.testing.assert_allclose(ys[1, 0], 2.0, rtol=1e-5)


@pytest.mark.parametrize("name, tol", [("tsit5", 1e-8), ("bosh3", 1e-6)])
def test_blow_up_is_step_size_underflow_at_tight_tolerance(name, tol):
    ts = jnp.array([0.0, 0.5, 2.0])
    ys, info = jaxode.odesolve(_blow_up, jnp.array([1.0]), ts, solver=name, rtol=tol, atol=tol, throw=False,
                               full_output=True, max_steps=100_000)
    assert int(info.status) == STATUS["underflow"]
    assert int(info.num_steps) < 3000


# ---- input mistakes named early ----------------------------------------------------------------


@pytest.mark.parametrize("z0", [jnp.array([jnp.nan, 1.0]), {"a": jnp.ones(1), "b": jnp.array([jnp.inf])}])
def test_non_finite_z0_is_named_before_any_step(z0):
    with pytest.raises(ValueError, match="z0 must be finite"):
        jaxode.odesolve(lambda z, t, p: jax.tree_util.tree_map(lambda x: -x, z), z0, TS)


def test_zero_tolerances_are_refused_by_odesolve_and_neural_ode():
    with pytest.raises(ValueError, match="rtol and atol cannot both be 0"):
        jaxode.odesolve(field, Z0, TS, rtol=0.0, atol=0.0)
    with pytest.raises(ValueError, match="rtol and atol cannot both be 0"):
        jaxode.NeuralODE(lambda z, t, p: -z, rtol=0.0, atol=0.0)
    ys = jaxode.odesolve(field, Z0, TS, rtol=0.0, atol=1e-8)  # either alone is a tolerance
    np.testing.assert_allclose(np.asarray(ys[-1]), [np.cos(2.0), -np.sin(2.0)], atol=1e-6)


@pytest.mark.parametrize("rtol, atol", [(-1e-3, 1e-6), (jnp.nan, 1e-6), (0.0, 0.0)])
def test_bad_traced_tolerances_raise_at_run_time(rtol, atol):
    solve = jax.jit(lambda rtol, atol: jaxode.odesolve(field, Z0, TS, rtol=rtol, atol=atol, max_steps=50))
    with pytest.raises(Exception) as err:
        jax.block_until_ready(solve(rtol, atol))
    assert "invalid traced rtol, atol, dt0 or max_dt" in failure_cause(err.value)


@pytest.mark.parametrize("f", [lambda t, y: -y, lambda t, y, p: -y[0] * y], ids=["f(t, y)", "f(t, y, p)"])
def test_scipy_argument_order_is_named(f):
    with pytest.raises(TypeError, match=r"jaxode calls f\(z, t, params\)"):
        jaxode.odesolve(f, Z0, TS)


def test_list_state_with_array_field_suggests_asarray():
    with pytest.raises(ValueError, match=r"jnp.asarray\(z0\)"):
        jaxode.odesolve(lambda z, t, p: -jnp.asarray(z), [1.0, 2.0], TS)


# ---- what a runtime failure looks like ----------------------------------------------------------


def test_eager_failure_is_a_one_line_solve_error(caplog):
    f, z0, ts, opts, _ = FAILURES["max_steps"]
    with pytest.raises(jaxode.SolveError) as err:
        jaxode.odesolve(f, z0, ts, rtol=1e-6, atol=1e-6, **opts)
    assert str(err.value).startswith("jaxode: the solve took max_steps")
    assert "\n" not in str(err.value)
    assert "pure_callback failed" not in caplog.text


def test_failure_under_jit_ends_with_the_message_and_nothing_misleading(caplog):
    f, z0, ts, opts, _ = FAILURES["max_steps"]
    with pytest.raises(Exception) as err:
        jax.block_until_ready(jax.jit(lambda z0: jaxode.odesolve(f, z0, ts, **opts))(z0))
    text = str(err.value)
    assert text.rstrip().endswith(failure_cause(err.value)), text
    assert len(text.splitlines()) <= 4, text  # the message, not a dump of the Python stack
    assert "filter_jit" not in text and "Equinox" not in text
    assert "pure_callback failed" not in caplog.text
