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
from test_rosenbrock import A_STIFF, _manufactured, _radau, _robertson, _van_der_pol, _vdp_numpy

import jaxode
from jaxode.drivers import integrate
from jaxode.methods import METHODS, AutoSwitch
from jaxode.methods.auto import CHECK, EXPLICIT, STIFF, AutoState, spectral_radius

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


def test_switches_at_a_tight_tolerance():
    """Robertson's kinetics at rtol 1e-8: tsit5's steps are held at its stability limit
    (``h·ρ`` 3.3-3.5) from t ~ 0.1 on. Hairer's estimate from the last two stages saw 0.2-0.8
    there (the stage difference is along the smooth solution; the stiff mode, damped below the
    tolerance, barely enters it), so auto stayed explicit to t = 16 (11,363 tsit5 steps to
    1e5 against rodas5p's 350). The periodic check (power iteration on ``∂f/∂y``) sees it."""
    ts = jnp.array([0.0, 1e-2, 1.0, 1e2])
    z0, k = jnp.array([1.0, 0.0, 0.0]), jnp.array([0.04, 3e7, 1e4])
    kw = dict(rtol=1e-8, atol=1e-14, full_output=True, max_steps=20000)
    ys, info = jaxode.odesolve(_robertson, z0, ts, k, solver="auto", **kw)
    ys_r, info_r = jaxode.odesolve(_robertson, z0, ts, k, solver="rodas5p", **kw)
    assert int(info.num_steps) < 2 * int(info_r.num_steps), (info.num_steps, info_r.num_steps)
    np.testing.assert_allclose(np.asarray(ys), np.asarray(ys_r), rtol=1e-6, atol=1e-13)


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
    np.testing.assert_allclose(np.asarray(ys), np.asarray(ys_v[0]), rtol=1e-10, atol=1e-10)  # rounding
    assert _per_step_choices(jax.make_jaxpr(solve)(z0).jaxpr) == 0
    per_step = lambda z0: integrate(lambda y, t: _window(y, t, 1.0), z0.reshape(-1), TS_WINDOW, 1e-6, 1e-6,
                                    None, method=AUTO, max_steps=1000, driver="flat").y
    assert _per_step_choices(jax.make_jaxpr(per_step)(z0).jaxpr) > 0  # what the check would see


def _phases(state, detections, method=AUTO):
    """The phase after each accepted step whose ``h·ρ`` is ``detections[i]``, from ``state``."""
    phases = []
    for h_rho in detections:
        state = method._next(state, jnp.asarray(h_rho))
        phases.append(int(state.phase))
    return phases


def test_hysteresis():
    """Explicit: the first check after 16 steps, then after twice as many as the last interval
    (32, 64, ..., 512) while the checks are calm; 3 consecutive detections switch; a calm one
    clears them and waits 16 steps again. Stiff (as DOPRI5): 15 votes switch back, 6 calm
    steps in a row clear them, 5 do not."""
    stiff, calm = 10.0, 1.0
    E, C, S = EXPLICIT, CHECK, STIFF
    start = AUTO.init(None, 0.0, None, None)
    assert _phases(start, [stiff] * 16) == [E] * 15 + [C]  # nothing read before the check
    checks = [i for i, p in enumerate(_phases(start, [calm] * 1200)) if p == C]
    assert checks == [15, 48, 113, 242, 499, 1012]  # the check step, then the interval
    checking = AutoState.of(C, 0, 0, 64)
    assert _phases(checking, [stiff] * 3) == [C, C, S]
    assert _phases(checking, [stiff, stiff, calm] + [stiff] * 17) == [C, C, E] + [E] * 15 + [C, C]
    on = AutoState.of(S, 0, 0, 16)
    assert _phases(on, [calm] * 15) == [S] * 14 + [E]
    assert _phases(on, [calm] * 10 + [stiff] * 6 + [calm] * 10)[-1] == S
    assert _phases(on, [calm] * 10 + [stiff] * 5 + [calm] * 5)[-1] == E
    back = AUTO._next(AutoState.of(S, 14, 0, 16), jnp.asarray(calm))
    assert int(back.count) == AUTO.check_every and int(back.votes) == 0


def test_spectral_radius():
    rng = np.random.default_rng(1)
    for M in (A_STIFF, rng.normal(size=(6, 6)) @ np.diag([1, 2, 3, 4, 5, 50.0])):
        rho = float(spectral_radius(jnp.asarray(M)))
        exact = np.max(np.abs(np.linalg.eigvals(M)))
        assert 0.8 * exact < rho < 1.2 * exact, (rho, exact)


@pytest.mark.parametrize("lam, h", [(-50.0, 0.01), (-2.0, 0.3), (-1e3, 1e-4)])
def test_check_sees_h_lambda(monkeypatch, lam, h):
    """The check's estimate after an explicit step on ``y' = A y`` is ``h ρ(A)``: exact for
    ``A = λ``, to 1e-6 for ``diag(λ, λ/10)``, to 1e-4 for a non-normal ``A`` with eigenvalues
    ``λ`` and ``λ/3`` (8 power iterations); the steps that only count down read nothing."""
    seen = []
    record = lambda self, state, h_rho: seen.append((self.phase, h_rho)) or state
    monkeypatch.setattr(AutoSwitch, "_next", record)
    rng = np.random.default_rng(0)
    V = rng.normal(size=(2, 2))
    for A in (np.array([[lam]]), np.diag([lam, lam / 10]), V @ np.diag([lam, lam / 3]) @ np.linalg.inv(V)):
        A = jnp.asarray(A)
        field = lambda y, t, A=A: A @ y
        y0 = jnp.ones(A.shape[0])
        for method in AUTO.phases()[:2]:
            method.step(field, 0.0, y0, h, field(y0, 0.0), method.init(field, 0.0, y0, y0), h)
    assert [phase for phase, _ in seen] == [EXPLICIT, CHECK] * 3
    assert all(float(h_rho) == 0 for phase, h_rho in seen if phase == EXPLICIT)
    np.testing.assert_allclose(seen[1][1], h * abs(lam), rtol=1e-12)
    np.testing.assert_allclose(seen[3][1], h * abs(lam), rtol=1e-6)
    np.testing.assert_allclose(seen[5][1], h * abs(lam), rtol=1e-4)


def test_validation():
    with pytest.raises(ValueError, match="error order"):
        AutoSwitch(METHODS["dopri5"], METHODS["rosenbrock23"])
    with pytest.raises(ValueError, match="first-same-as-last"):
        AutoSwitch(METHODS["dopri8"], METHODS["rodas5p"])
    for bad in (dict(check_every=0), dict(check_every=64, check_every_max=32), dict(to_stiff_after=0)):
        with pytest.raises(ValueError, match="check_every"):
            AutoSwitch(METHODS["tsit5"], METHODS["rodas5p"], **bad)


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
