"""``solver="auto"``: tsit5 while the problem is not stiff, rodas5p while it is; the
stiffness estimates, the hysteresis, and the cost on a non-stiff problem."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grad_utils import (
    PARAMS,
    TS,
    Z0,
    central_difference,
    forced_oscillator,
    relative_error,
    sub_jaxprs,
    weighted_loss,
)
from test_rosenbrock import A_STIFF, _manufactured, _radau, _van_der_pol, _vdp_numpy

import jaxode
from jaxode.drivers import integrate
from jaxode.methods import METHODS, AutoSwitch
from jaxode.methods.auto import AutoState, spectral_radius

AUTO = METHODS["auto"]


def test_switches_on_van_der_pol():
    """μ = 1000 on [0, 2]: tsit5 needs ~1700 steps; auto switches to rodas5p within a few
    dozen steps (Jacobians counted) and finishes accurately."""
    ts = (0.0, 0.5, 1.0, 2.0)
    ref = _radau(_vdp_numpy, (2.0, 0.0), 2.0, ts)
    ys, info = jaxode.odesolve(_van_der_pol, jnp.array([2.0, 0.0]), jnp.array(ts), 1000.0, solver="auto",
                               rtol=1e-6, atol=1e-6, full_output=True)
    assert int(info.num_steps) < 60, info
    assert int(info.num_jacobians) > 0
    np.testing.assert_allclose(np.asarray(ys), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t1", [10.0, 40.0])
def test_non_stiff_stays_explicit(t1):
    """On a non-stiff problem auto is tsit5: the same steps, the same outputs, no Jacobian, and
    at most 10% more evaluations (measured: none more)."""
    ts = jnp.linspace(0.0, t1, 6)
    z0 = jnp.array([0.1, 1.0])
    kw = dict(rtol=1e-7, atol=1e-7, full_output=True, max_steps=10000)
    ys, info = jaxode.odesolve(_manufactured, z0, ts, solver="auto", **kw)
    ys_t, info_t = jaxode.odesolve(_manufactured, z0, ts, solver="tsit5", **kw)
    assert int(info.num_jacobians) == 0
    assert int(info.nfe) <= 1.1 * int(info_t.nfe)
    np.testing.assert_allclose(np.asarray(ys), np.asarray(ys_t), rtol=1e-12, atol=1e-12)


def _window(z, t, p):
    """Prothero–Robinson with a stiff window: ``λ(t)`` from -1 to -1000 on about [2, 5]; the
    solution is exactly ``z = p cos t`` from ``z(0) = p``, whatever ``λ``."""
    lam = -(1 + 999 * 0.5 * (jnp.tanh(20 * (t - 2)) - jnp.tanh(20 * (t - 5))))
    return lam * (z - p * jnp.cos(t)) - p * jnp.sin(t)


TS_WINDOW = jnp.linspace(0.0, 8.0, 9)


def test_switches_to_stiff_and_back():
    """Into rodas5p in the stiff window and back to tsit5 after it: the final state is not
    stiff, some steps took a Jacobian and at least 20 did not, and the whole solve takes far
    fewer steps than tsit5 (1064 measured)."""
    field = lambda y, t: _window(y, t, 1.0)
    state = integrate(field, jnp.array([1.0]), TS_WINDOW, 1e-6, 1e-6, None, method=AUTO, max_steps=10000)
    assert not bool(state.method_state.stiff)
    steps, jacobians = int(state.num_accepted + state.num_rejected), int(state.num_jacobians)
    assert 0 < jacobians < steps - 20
    # nfe: 2 for the first step, 8 per rodas5p attempt, 6 per tsit5 attempt
    assert int(state.nfe) == 2 + 8 * jacobians + 6 * (steps - jacobians)
    ys, info = jaxode.odesolve(_window, jnp.array([1.0]), TS_WINDOW, 1.0, solver="auto", rtol=1e-6,
                               atol=1e-6, full_output=True)
    np.testing.assert_allclose(np.asarray(ys[:, 0]), np.cos(np.asarray(TS_WINDOW)), atol=1e-5)
    _, info_t = jaxode.odesolve(_window, jnp.array([1.0]), TS_WINDOW, 1.0, rtol=1e-6, atol=1e-6,
                                full_output=True, max_steps=10000)
    assert int(info.num_steps) * 4 < int(info_t.num_steps)


@pytest.mark.parametrize("gradient", [pytest.param("backprop", marks=pytest.mark.slow), "checkpoint"])
def test_gradient_across_switches(gradient):
    """``z(8) = p cos 8``: ``dz(8)/dp = cos 8``, through the steps of both methods."""
    def final(p):
        ys = jaxode.odesolve(_window, jnp.array([1.0]) * p, TS_WINDOW, p, solver="auto", rtol=1e-9,
                             atol=1e-9, gradient=gradient)
        return ys[-1, 0]

    np.testing.assert_allclose(float(jax.grad(final)(jnp.asarray(1.3))), np.cos(8.0), rtol=1e-6)


def test_vmap_mixed_batch():
    """Under ``jax.vmap`` a stiff and a non-stiff problem (both branches run): each as alone."""
    solve = lambda z0, p: jaxode.odesolve(_window, z0, TS_WINDOW, p, solver="auto", rtol=1e-7, atol=1e-7)
    ps = jnp.array([1.0, 2.0])
    ys = jax.jit(jax.vmap(solve))(ps[:, None], ps)
    exact = np.asarray(ps)[:, None] * np.cos(np.asarray(TS_WINDOW))
    np.testing.assert_allclose(np.asarray(ys[..., 0]), exact, atol=1e-5)


def _has(jaxpr, primitive: str) -> bool:
    return any(e.primitive.name == primitive or any(_has(s, primitive) for s in sub_jaxprs(e))
               for e in jaxpr.eqns)


def _per_step_choices(jaxpr) -> int:
    """How many ``cond``s of ``jaxpr`` (at any depth) choose between steps: a branch factorises
    a matrix (a Rosenbrock step) and none runs a loop of steps (``while``)."""
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "cond":
            branches = [b.jaxpr for b in eqn.params["branches"]]
            count += any(_has(b, "lu") for b in branches) and not any(_has(b, "while") for b in branches)
        count += sum(_per_step_choices(sub) for sub in sub_jaxprs(eqn))
    return count


@pytest.mark.parametrize("shape", [(1,), (48, 1)], ids=["nested", "flat"])
def test_phases_take_the_steps_of_the_cond(shape):
    """On one problem the loop runs each method in its own inner loop (no step chooses by
    ``lax.cond``), in the nested driver (a small state) and the flat one (a large state); it
    takes the same steps as the per-step choice that ``jax.vmap`` runs, through the stiff window
    and back."""
    z0 = jnp.ones(shape)
    solve = lambda z0: jaxode.odesolve(_window, z0, TS_WINDOW, 1.0, solver="auto", rtol=1e-6, atol=1e-6,
                                       full_output=True)
    ys, info = jax.jit(solve)(z0)
    ys_v, info_v = jax.jit(jax.vmap(solve))(z0[None])
    assert int(info.num_jacobians) > 0 and int(info.num_jacobians) < int(info.num_accepted) - 20
    for name in ("num_accepted", "num_rejected", "nfe", "num_jacobians"):
        assert int(getattr(info, name)) == int(getattr(info_v, name)[0]), name
    np.testing.assert_allclose(np.asarray(ys), np.asarray(ys_v[0]), rtol=1e-12, atol=1e-12)
    assert _per_step_choices(jax.make_jaxpr(solve)(z0).jaxpr) == 0
    per_step = lambda z0: integrate(lambda y, t: _window(y, t, 1.0), z0.reshape(-1), TS_WINDOW, 1e-6, 1e-6,
                                    None, method=AUTO, max_steps=1000, driver="flat").y
    assert _per_step_choices(jax.make_jaxpr(per_step)(z0).jaxpr) > 0  # what the check would see


def _run_votes(method, stiff, detections):
    state = AutoState.of(stiff, 0, 0)
    modes = []
    for h_rho in detections:
        state = method._vote(state, jnp.asarray(h_rho))
        modes.append(bool(state.stiff))
    return modes


def test_hysteresis():
    """15 votes switch; 6 calm detections in a row clear them; one calm detection does not."""
    auto = AUTO
    stiff, calm = 10.0, 1.0
    assert _run_votes(auto, False, [stiff] * 14) == [False] * 14
    assert _run_votes(auto, False, [stiff] * 15)[-1]
    assert not _run_votes(auto, False, [stiff] * 10 + [calm] * 6 + [stiff] * 10)[-1]
    assert _run_votes(auto, False, [stiff] * 10 + [calm] * 5 + [stiff] * 5)[-1]
    back = _run_votes(auto, True, [calm] * 15)
    assert back == [True] * 14 + [False]


def test_spectral_radius():
    rng = np.random.default_rng(1)
    for M in (A_STIFF, rng.normal(size=(6, 6)) @ np.diag([1, 2, 3, 4, 5, 50.0])):
        rho = float(spectral_radius(jnp.asarray(M)))
        exact = np.max(np.abs(np.linalg.eigvals(M)))
        assert 0.8 * exact < rho < 1.2 * exact, (rho, exact)


@pytest.mark.parametrize("lam, h", [(-50.0, 0.01), (-2.0, 0.3), (-1e3, 1e-4)])
def test_explicit_steps_stiffness_estimate_is_h_lambda_on_a_linear_problem(monkeypatch, lam, h):
    """On ``y' = λ y`` Hairer's estimate is exact: ``k_s - k_{s-1} = λ (y_new - Y_{s-1})``, so
    the vote sees ``h·ρ = h|λ|`` after an explicit step (and, on ``y' = A y``, a value between
    ``h`` times the smallest and the largest ``|λ|``)."""
    seen = []
    monkeypatch.setattr(AutoSwitch, "_vote", lambda self, state, h_rho: seen.append(h_rho) or state)
    explicit = AUTO.phases()[0]
    for A in (np.array([[lam]]), np.diag([lam, lam / 10])):
        A = jnp.asarray(A)
        field = lambda y, t, A=A: A @ y
        y0 = jnp.ones(A.shape[0])
        explicit.step(field, 0.0, y0, h, field(y0, 0.0), explicit.init(field, 0.0, y0, y0), h)
    np.testing.assert_allclose(seen[0], h * abs(lam), rtol=1e-10)
    assert h * abs(lam) / 10 * (1 - 1e-12) <= seen[1] <= h * abs(lam) * (1 + 1e-12)


def test_validation():
    with pytest.raises(ValueError, match="error order"):
        AutoSwitch(METHODS["dopri5"], METHODS["rosenbrock23"])
    with pytest.raises(ValueError, match="first-same-as-last"):
        AutoSwitch(METHODS["dopri8"], METHODS["rodas5p"])


@pytest.mark.slow
@pytest.mark.parametrize("batched", [False, True])
def test_adjoint_non_stiff(batched):
    """The adjoint (plain, and batched with its Simpson quadrature) through auto on a non-stiff
    problem, against central differences."""
    z0 = jnp.stack([Z0, -Z0]) if batched else Z0

    def loss(params):
        ys = jaxode.odesolve(forced_oscillator, z0, TS, params, solver="auto", rtol=1e-10, atol=1e-10,
                             batched=batched)
        return jnp.sum(jax.vmap(weighted_loss)(ys)) if batched else weighted_loss(ys)

    assert relative_error(jax.grad(loss)(PARAMS), central_difference(loss, PARAMS, eps=1e-5)) < 1e-6
