"""Tests of jaxode.Options: one validated options object shared by odesolve, NeuralODE and
adjoint_backward_info; NeuralODE's per-call tolerances."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpy.testing import assert_allclose

import jaxode
from jaxode import Options
from jaxode.nn import MLPField, NeuralODE

jax.config.update("jax_enable_x64", True)

TS = jnp.linspace(0.0, 1.0, 4)
Z0 = jnp.array([0.7, -0.4])


def _linear(z, t, a):
    return a @ z


A = jnp.array([[-0.3, 1.0], [-1.0, -0.2]])


# ---------------------------------------------------------------- the object


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(solver="rk45"), ValueError, "unknown solver 'rk45'"),
        (dict(rtol=-1e-3), ValueError, "rtol must be >= 0"),
        (dict(atol=np.inf), ValueError, "atol must be finite"),
        (dict(rtol=0.0, atol=0.0), ValueError, "cannot both be 0"),
        (dict(solver="rk4"), ValueError, "pass dt0"),
        (dict(solver="euler", dt0=0.0), ValueError, "dt0 must be > 0"),
        (dict(max_steps=2.5), ValueError, "max_steps"),
        (dict(gradient="forward"), ValueError, "unknown gradient mode"),
        (dict(adjoint_rtol=-1.0), ValueError, "adjoint_rtol must be >= 0"),
        (dict(adjoint_atol=np.nan), ValueError, "adjoint_atol must be >= 0"),
        (dict(throw="yes"), TypeError, "throw must be True or False"),
    ],
)
def test_bad_option_raises_the_same_in_options_and_odesolve(kwargs, error, match):
    with pytest.raises(error, match=match):
        jaxode.Options(**kwargs)
    with pytest.raises(error, match=match):
        jaxode.odesolve(_linear, Z0, TS, A, **kwargs)


def test_options_frozen_hashable_and_replace_revalidates():
    opts = jaxode.Options(solver="dopri5", rtol=1e-8, atol=1e-9)
    assert hash(opts) == hash(jaxode.Options(solver="dopri5", rtol=1e-8, atol=1e-9))
    assert opts != jaxode.Options(solver="dopri5", rtol=1e-7, atol=1e-9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.rtol = 1.0
    assert opts.replace(rtol=1e-5).rtol == 1e-5 and opts.rtol == 1e-8
    with pytest.raises(ValueError, match="rtol must be >= 0"):
        opts.replace(rtol=-1.0)
    with pytest.raises(TypeError, match="rtl"):
        opts.replace(rtl=1e-5)
    with pytest.raises(TypeError, match="rtl"):
        jaxode.Options(rtl=1e-5)
    # the defaults are odesolve's: its keyword defaults and the object's agree
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(jaxode.odesolve).parameters.items()
                if p.kind is p.KEYWORD_ONLY}
    assert jaxode.Options().as_dict() == defaults


def test_odesolve_with_options_as_keywords():
    opts = jaxode.Options(solver="dopri5", rtol=1e-9, atol=1e-9)
    ys = jaxode.odesolve(_linear, Z0, TS, A, **opts.as_dict())
    exact = jnp.stack([jax.scipy.linalg.expm(A * t) @ Z0 for t in TS])
    assert_allclose(ys, exact, rtol=1e-7, atol=1e-8)


# ---------------------------------------------------------------- NeuralODE


@pytest.fixture(scope="module")
def node():
    return NeuralODE(MLPField(2, width=4, depth=1, key=jax.random.key(0)), ts=TS, rtol=1e-3, atol=1e-3)


def test_neural_ode_holds_options(node):
    assert node.options == jaxode.Options(rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="NeuralODE: rtol must be >= 0"):
        NeuralODE(node.field, ts=TS, rtol=-1.0)


def test_neural_ode_tolerance_sweep_does_not_retrace(node):
    """Per-call traced tolerances: one trace of the field for the whole sweep, and each
    call really solves at its own tolerances."""
    traces = []

    class Counting(eqx.Module):
        inner: MLPField

        def __call__(self, z, t, params):
            traces.append(1)
            return self.inner(z, t, params)

    counted = NeuralODE(Counting(node.field), ts=TS, rtol=1e-3, atol=1e-3)
    run = eqx.filter_jit(lambda m, z0, r, a: m(z0, rtol=r, atol=a, full_output=True))
    results = []
    for tol in (1e-3, 1e-6, 1e-9):
        ys, info = run(counted, Z0, jnp.asarray(tol), jnp.asarray(tol))
        if len(results) == 0:
            first_traces = len(traces)
        results.append((tol, ys, int(info.num_steps)))
    assert first_traces > 0 and len(traces) == first_traces
    for tol, ys, steps in results:  # the override reached the solver
        want, info = jaxode.odesolve(node.field, Z0, TS, None, rtol=tol, atol=tol, full_output=True)
        assert_allclose(ys, want, rtol=1e-12, atol=1e-14)
        assert steps == int(info.num_steps)
    assert results[0][2] < results[1][2] < results[2][2]


def test_neural_ode_tolerances_are_not_trainable_leaves(node):
    """Even given as arrays, the tolerances are static: the only inexact arrays (what an
    optimiser trains) are the field's weights."""
    arr = NeuralODE(node.field, ts=TS, rtol=jnp.asarray(1e-4), atol=jnp.asarray(1e-5),
                    adjoint_rtol=jnp.asarray(1e-6))
    for m in (node, arr):
        leaves = jax.tree_util.tree_leaves(eqx.filter(m, eqx.is_inexact_array))
        weights = jax.tree_util.tree_leaves(eqx.filter(node.field, eqx.is_inexact_array))
        assert len(leaves) == len(weights) == 4
        assert all(a is b for a, b in zip(leaves, weights, strict=True))
    assert arr.options.rtol == 1e-4 and isinstance(arr.options.rtol, float)
    hash(jax.tree_util.tree_structure(arr))  # static fields are in the treedef: hashable


# ---------------------------------------------------------------- adjoint_backward_info


def test_adjoint_backward_info_rejects_unknown_and_inapplicable_options():
    with pytest.raises(TypeError, match="rtl"):
        jaxode.adjoint_backward_info(_linear, Z0, TS, A, rtl=1e-6)
    with pytest.raises(ValueError, match="gradient must be 'adjoint'"):
        jaxode.adjoint_backward_info(_linear, Z0, TS, A, gradient="backprop")
    with pytest.raises(ValueError, match="rtol must be >= 0"):
        jaxode.adjoint_backward_info(_linear, Z0, TS, A, rtol=-1.0)


def test_adjoint_backward_info_batched_matches_odesolve_batched():
    z0s = jnp.array([[0.7, -0.4], [1.0, 0.5], [-0.2, 0.3]])
    ct = jnp.linspace(0.5, 1.5, 3 * len(TS) * 2).reshape(3, len(TS), 2)
    opts = dict(rtol=1e-9, atol=1e-9)
    (ct_z0, ct_ts), (fwd, bwd) = jaxode.adjoint_backward_info(
        _linear, z0s, TS, A, ct, batched=True, **opts)
    _, vjp = jax.vjp(lambda z, t: jaxode.odesolve(_linear, z, t, A, batched=True, **opts), z0s, TS)
    want_z0, want_ts = vjp(ct)
    assert ct_z0.shape == (3, 2) and fwd.num_steps.shape == bwd.num_steps.shape == (3,)
    assert_allclose(ct_z0, want_z0, rtol=1e-12, atol=1e-14)
    assert_allclose(ct_ts, want_ts, rtol=1e-12, atol=1e-14)
    # and each problem's adjoint is the exact one: a(0) = expm(A^T t)... summed over outputs
    exact = sum(jax.scipy.linalg.expm(A.T * t) @ ct[:, i].T for i, t in enumerate(TS)).T
    assert_allclose(ct_z0, exact, rtol=1e-7, atol=1e-8)


def test_adjoint_backward_info_honours_throw():
    opts = dict(rtol=1e-9, atol=1e-9, max_steps=3)
    with pytest.raises(jaxode.SolveError, match="max_steps"):
        jaxode.adjoint_backward_info(_linear, Z0, TS, A, **opts)
    (ct_z0, _), (fwd, _) = jaxode.adjoint_backward_info(_linear, Z0, TS, A, throw=False, **opts)
    assert int(fwd.status) == 1


def test_adjoint_backward_info_checks_z0_like_odesolve():
    with pytest.raises(TypeError, match="floating"):
        jaxode.adjoint_backward_info(lambda z, t, p: -z, jnp.array([1, 2]), jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="z0 must be finite"):
        jaxode.adjoint_backward_info(lambda z, t, p: -z, jnp.array([jnp.nan, 2.0]), jnp.array([0.0, 1.0]))


def test_a_repeated_eager_call_transfers_nothing_to_the_device():
    """The Python-number tolerances of an eager ``odesolve`` become arrays once (kept per value,
    type and ``jax_enable_x64``): the second identical call moves nothing from the host (each
    transfer is a dispatch, more than the whole solve of a small system costs)."""
    f = lambda z, t, p: -p * z  # noqa: E731
    z0, ts, p = jnp.ones(2), jnp.linspace(0.0, 1.0, 3), jnp.asarray(0.5)
    first = jaxode.odesolve(f, z0, ts, p, rtol=1e-6, atol=1e-8)
    with jax.transfer_guard_host_to_device("disallow"):
        again = jaxode.odesolve(f, z0, ts, p, rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(again, first)
    assert Options(rtol=1e-6).arrays()[0] is Options(rtol=1e-6).arrays()[0]
    assert Options(rtol=1).arrays()[0].dtype != Options(rtol=1.0).arrays()[0].dtype  # 1 and 1.0 apart


def test_cached_options_are_checked_by_type_and_value():
    """``Options.cached`` keeps one object per set of values with their types: ``throw=1`` is
    refused even after ``throw=True`` was made (1 == True as a key), ``rtol=1`` and
    ``rtol=1.0`` stay apart, and an array tolerance (unhashable) is made anew."""
    assert Options.cached(rtol=1e-7, throw=True) is Options.cached(rtol=1e-7, throw=True)
    with pytest.raises(TypeError, match="throw must be True or False"):
        Options.cached(rtol=1e-7, throw=1)
    assert type(Options.cached(rtol=1).rtol) is int and type(Options.cached(rtol=1.0).rtol) is float
    rtol = jnp.asarray(1e-7)
    assert Options.cached(rtol=rtol).rtol is rtol
