"""gradient="reversible" (issue 17): the gradient is the exact derivative of the reversible
solve's own solution (float64 central differences of the same forward solve), the
reconstruction's rounding over 10,000 steps, the base method's order, memory that does not grow
with the steps beyond the step-time record, the linear stability matrix of the docstring,
composability (jit, vmap, batched, pytrees, Equinox), failures and bad input."""

from __future__ import annotations

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import failure_cause, logistic_exact
from grad_utils import (
    PARAMS,
    TS,
    Z0,
    TimeMLP,
    central_difference,
    directional_difference,
    forced_oscillator,
    random_like,
    relative_error,
    weighted_loss,
)

import jaxode
from jaxode import reversible
from jaxode.forward import Config, Controls
from jaxode.methods import Method, get_method
from jaxode.methods.reversible import Reversible

# fixed step: dt0 commensurate with no output interval (a grid landing within rounding of an
# output time would change its step count under a finite-difference perturbation of ts)
FIXED = dict(solver="rk4", dt0=0.045)
ADAPTIVE = dict(solver="tsit5", rtol=1e-11, atol=1e-11)
SETTINGS = {"fixed": FIXED, "adaptive": ADAPTIVE}


def _loss(settings, **extra):
    def loss(z0, ts, params):
        ys = jaxode.odesolve(forced_oscillator, z0, ts, params, gradient="reversible", **settings, **extra)
        return weighted_loss(ys)

    return jax.jit(loss)


@pytest.fixture(scope="module", params=sorted(SETTINGS))
def case(request):
    """(settings, jitted loss, its jitted gradient w.r.t. z0, ts, params)."""
    loss = _loss(SETTINGS[request.param])
    return request.param, loss, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


@pytest.mark.parametrize("wrt", [0, 1, 2], ids=["z0", "ts", "params"])
def test_gradient_is_derivative_of_the_reversible_solve(case, wrt):
    """Relative error <= 1e-7 against central differences of the same reversible solve."""
    _, loss, grad = case
    args = [Z0, TS, PARAMS]
    exact = grad(*args)[wrt]

    def of(x):
        return float(loss(*[x if i == wrt else a for i, a in enumerate(args)]))

    numeric = central_difference(of, args[wrt], eps=1e-6)
    assert relative_error(exact, numeric) <= 1e-7


def test_gradient_backwards_in_time(case):
    """Decreasing ts: the same check for z0 and ts (the time cotangents change sign)."""
    _, loss, grad = case
    ts = TS[::-1]
    g_z0, g_ts, _ = grad(Z0, ts, PARAMS)
    assert relative_error(g_z0, central_difference(lambda z: float(loss(z, ts, PARAMS)), Z0)) <= 1e-7
    assert relative_error(g_ts, central_difference(lambda t: float(loss(Z0, t, PARAMS)), ts)) <= 1e-7


@pytest.mark.parametrize("kind", sorted(SETTINGS))
def test_gradient_wrt_module_weights(kind):
    """An Equinox field holding its weights: the directional derivative along random weights."""
    field = TimeMLP(2, jax.random.PRNGKey(0))
    ts = jnp.array([0.0, 0.3, 1.0])

    @eqx.filter_jit
    def loss(model):
        ys = jaxode.odesolve(model, Z0, ts, gradient="reversible", **SETTINGS[kind])
        return jnp.sum(ys**2)

    grad = eqx.filter_jit(eqx.filter_grad(loss))(field)
    weights, static = eqx.partition(field, eqx.is_inexact_array)
    direction = random_like(weights, jax.random.PRNGKey(1))
    leaves = jax.tree_util.tree_leaves
    grad_weights = leaves(eqx.filter(grad, eqx.is_inexact_array))
    along = sum(jnp.vdot(a, b) for a, b in zip(grad_weights, leaves(direction)))
    numeric = directional_difference(lambda w: float(loss(eqx.combine(w, static))), weights, direction)
    assert abs(float(along) - numeric) <= 1e-7 * abs(numeric)


def test_gradient_is_not_the_base_methods():
    """The reversible solve is a different discretisation: its values differ from the base
    method's at the level of the (loose) tolerance, and its gradient is that of its own values
    (checked above), so at a loose tolerance it differs from "backprop"'s of tsit5 too."""
    loose = dict(solver="tsit5", rtol=1e-4, atol=1e-4)
    rev = jaxode.odesolve(forced_oscillator, Z0, TS, PARAMS, gradient="reversible", **loose)
    base = jaxode.odesolve(forced_oscillator, Z0, TS, PARAMS, gradient="backprop", **loose)
    diff = float(jnp.max(jnp.abs(rev - base)))
    assert 1e-9 < diff < 1e-2


# ---- reconstruction ----------------------------------------------------------------------------------


def _flat_oscillator(y, t, diff, nondiff):
    a, b = diff
    return jnp.stack([a * y[1], -b * jnp.sin(y[0]) - 0.05 * y[1] + 0.3 * jnp.cos(1.3 * t)]).astype(y.dtype)


def _reconstruction_error(dtype, coupling, num_steps=10_000, dt=0.01):
    """Max |y_0 - y0|, |ŷ_0 - y0| after num_steps rk4 steps forward and as many inverted ones."""
    y0 = jnp.array([0.8, -0.3], dtype)
    ts = jnp.array([0.0, num_steps * dt], dtype)
    cfg = Config(get_method("rk4"), num_steps + 2, reversible_coupling=coupling)
    method = Reversible(cfg.method, coupling)
    diff = (jnp.asarray(1.1, dtype), jnp.asarray(2.0, dtype))
    controls = Controls(jnp.asarray(0.0), jnp.asarray(1.0), jnp.asarray(dt, dtype))

    @jax.jit
    def run(y0):
        state, times = reversible.forward(method, _flat_oscillator, y0, ts, diff, (), controls, cfg)
        record = reversible.Record(state.y, state.method_state[0], times, state.num_accepted)
        ct = jnp.zeros((2, 2), dtype)
        _, _, _, (y, yhat) = reversible.backward(method, _flat_oscillator, record, ts, diff, (), ct)
        return state.num_accepted, jnp.maximum(jnp.max(jnp.abs(y - y0)), jnp.max(jnp.abs(yhat - y0)))

    steps, error = run(y0)
    assert int(steps) in (num_steps, num_steps + 1)  # the last step may be a rounding sliver
    return float(error)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_reconstruction_error_over_10000_steps(dtype):
    """Measured (2-core CPU, rk4, dt 0.01, |y| ~ 1): λ = 0.999: 9e-2 in float32, 5e-11 in
    float64; λ = 1: 8e-5 and 2e-13. The bound is the docstring's ``ε λ^{-N}`` growth with a
    factor 200 for the Jacobians' amplification (35 measured); at λ = 1 it grows no faster than
    ``ε N``."""
    eps, n = float(jnp.finfo(dtype).eps), 10_000
    coupled = _reconstruction_error(dtype, 0.999, n)
    assert coupled <= 200 * eps * 0.999 ** (-n)
    plain = _reconstruction_error(dtype, 1.0, n)
    assert plain <= 100 * eps * n
    assert plain < coupled  # the 1/λ amplification is what dominates


# ---- forward accuracy ----------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["euler", "midpoint", "heun", "rk4"])
def test_order_of_the_base_method(solver):
    """The global error on the logistic equation (known solution) falls as dt^p, p the base
    method's order: the slope fitted over dt = 0.1 .. 0.025 is within 0.25 of p."""
    order = get_method(solver).order
    ts = jnp.array([0.0, 2.0])
    exact = logistic_exact(2.0)
    field = lambda y, t, p: y * (1 - y)
    dts = [0.1, 0.05, 0.025]
    solve = lambda dt: jaxode.odesolve(field, jnp.array(0.1), ts, solver=solver, dt0=dt,
                                       gradient="reversible")
    errs = [abs(float(solve(dt)[-1]) - exact) for dt in dts]
    slope = np.polyfit(np.log(dts), np.log(errs), 1)[0]
    assert abs(slope - order) <= 0.25, (errs, slope)


def test_adaptive_error_follows_the_tolerance():
    """tsit5's reversible form on the logistic equation: the error at t = 2 falls with the
    tolerance (within a factor 30 of rtol at rtol 1e-6 .. 1e-10)."""
    field = lambda y, t, p: y * (1 - y)
    for tol in (1e-6, 1e-8, 1e-10):
        y = jaxode.odesolve(field, jnp.array(0.1), jnp.array([0.0, 0.7, 2.0]), rtol=tol, atol=tol,
                            gradient="reversible")
        assert np.max(np.abs(np.asarray(y) - logistic_exact(np.array([0.0, 0.7, 2.0])))) <= 30 * tol


# ---- linear stability ------------------------------------------------------------------------------------


@pytest.mark.parametrize("z", [-0.5, -0.01, 0.3, 0.2j, -0.1 + 1j])
@pytest.mark.parametrize("coupling", [0.999, 0.9, 1.0])
def test_linear_stability_matrix(z, coupling):
    """One step on y' = μy (z = hμ, h = 1) is the docstring's M, with det M = λ."""
    method = Reversible(get_method("rk4"), coupling)
    R = lambda w: 1 + w + w**2 / 2 + w**3 / 6 + w**4 / 24  # rk4's stability function
    mu = jnp.asarray(z, jnp.complex128)
    field = lambda y, t: mu * y

    def step(y, yhat):
        res = method.step(field, 0.0, y, 1.0, field(y, 0.0), (yhat,), 1.0)
        return res.y_new, res.state[0]

    cols = [step(jnp.array([1.0 + 0j]), jnp.array([0j])), step(jnp.array([0j]), jnp.array([1.0 + 0j]))]
    m = np.array([[complex(cols[j][i][0]) for j in range(2)] for i in range(2)])
    lam, r, rm = coupling, R(z), R(-z)
    expected = np.array([[lam, r - lam], [-lam * (rm - 1), 1 - (rm - 1) * (r - lam)]])
    np.testing.assert_allclose(m, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(m), lam, rtol=1e-12)


def test_parasitic_mode_of_a_decaying_solution_grows_as_predicted():
    """y' = -10 y, rk4, h = 0.1 (z = -1, far beyond -ln λ): the solve's error grows by the
    larger eigenvalue of M per step (here λ e^{|z|}-like, > 1): the scheme is unstable for a
    decaying mode, as the docstring says, and its error ratio is that eigenvalue."""
    lam, z = 0.999, -1.0
    R = lambda w: 1 + w + w**2 / 2 + w**3 / 6 + w**4 / 24
    m = np.array([[lam, R(z) - lam], [-lam * (R(-z) - 1), 1 - (R(-z) - 1) * (R(z) - lam)]])
    rho = np.max(np.abs(np.linalg.eigvals(m)))
    assert rho > 1
    ts = jnp.arange(0.0, 4.05, 0.1)
    ys = jaxode.odesolve(lambda y, t, p: -10.0 * y, jnp.array([1.0]), ts, solver="rk4", dt0=0.1,
                         gradient="reversible")[:, 0]
    ratios = np.asarray(ys[-5:] / ys[-6:-1])  # the parasitic mode dominates by then
    np.testing.assert_allclose(np.abs(ratios), rho, rtol=1e-3)


# ---- memory ------------------------------------------------------------------------------------------------


def _temp_bytes(mode, t1, max_steps, n=1024):
    """XLA's temporary memory of jit(grad) of a float32 solve of n states."""
    z0 = jnp.full((n,), 0.3, jnp.float32)
    ts = jnp.linspace(0.0, t1, 3).astype(jnp.float32)
    field = lambda z, t, p: jnp.tanh(p * z) - 0.5 * z

    def loss(p):
        ys = jaxode.odesolve(field, z0, ts, p, rtol=1e-5, atol=1e-5, max_steps=max_steps, gradient=mode)
        return jnp.sum(ys**2)

    compiled = jax.jit(jax.grad(loss)).lower(jnp.float32(0.9)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_memory_does_not_grow_with_the_steps():
    """Equal at t1 = 1 and 64 (same max_steps); from max_steps 256 to 4096 it grows by the
    step-time record only (a float32 per step, at most 2 × 4 bytes allowed: keeping even one
    4 KiB state per 128 steps would exceed it). Measured: 4.5 bytes per step; "checkpoint"
    grows by 432 and "backprop" by 647 bytes per step here."""
    assert _temp_bytes("reversible", 1.0, 256) == _temp_bytes("reversible", 64.0, 256)
    growth = _temp_bytes("reversible", 1.0, 4096) - _temp_bytes("reversible", 1.0, 256)
    assert growth <= 2 * 4 * (4096 - 256)


# ---- composability ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_vmap_and_batched_equal_a_loop():
    """jit(grad) of a loss of jax.vmap over z0, and of batched=True: both equal the sum of the
    per-problem gradients (z0 rows, params and ts) computed one by one."""
    z0s = jnp.stack([Z0, Z0 * 0.5, -Z0])
    kw = dict(gradient="reversible", **ADAPTIVE)

    def one(z0, ts, p):
        return weighted_loss(jaxode.odesolve(forced_oscillator, z0, ts, p, **kw))

    def vmapped(z0s, ts, p):
        return jnp.sum(jax.vmap(one, (0, None, None))(z0s, ts, p))

    def batched(z0s, ts, p):
        ys = jaxode.odesolve(forced_oscillator, z0s, ts, p, batched=True, **kw)
        return jnp.sum(jax.vmap(weighted_loss)(ys))

    g_one = jax.jit(jax.grad(one, argnums=(0, 1, 2)))
    loop = [g_one(z, TS, PARAMS) for z in z0s]
    expected = (jnp.stack([g[0] for g in loop]), sum(g[1] for g in loop),
                jax.tree_util.tree_map(lambda *x: sum(x), *[g[2] for g in loop]))
    for fn in (vmapped, batched):
        got = jax.jit(jax.grad(fn, argnums=(0, 1, 2)))(z0s, TS, PARAMS)
        assert relative_error(got, expected) <= 1e-10, fn.__name__


def test_pytree_state():
    """A dict state gives the same gradient as the equivalent flat state."""
    def tree_field(z, t, p):
        flat = forced_oscillator(jnp.stack([z["x"], z["v"]]), t, p)
        return {"x": flat[0], "v": flat[1]}

    def tree_loss(z0):
        ys = jaxode.odesolve(tree_field, z0, TS, PARAMS, gradient="reversible", **ADAPTIVE)
        return weighted_loss(jnp.stack([ys["x"], ys["v"]], axis=1))

    g = jax.jit(jax.grad(tree_loss))({"x": Z0[0], "v": Z0[1]})
    flat = jax.jit(jax.grad(lambda z: weighted_loss(jaxode.odesolve(
        forced_oscillator, z, TS, PARAMS, gradient="reversible", **ADAPTIVE))))(Z0)
    np.testing.assert_allclose([g["x"], g["v"]], flat, rtol=1e-12)


def test_full_output_and_coupling_one():
    """info counts 2s - 1 evaluations per tsit5 step (plus the first-step selection's 2), and
    λ = 1 is allowed (its gradient is checked against differences too)."""
    ys, info = jaxode.odesolve(forced_oscillator, Z0, TS, PARAMS, gradient="reversible", full_output=True,
                               rtol=1e-6, atol=1e-6)
    assert int(info.status) == 0
    assert int(info.nfe) == 2 + 13 * int(info.num_steps)
    loss = _loss(FIXED, reversible_coupling=1.0)
    g = jax.grad(loss)(Z0, TS, PARAMS)
    assert relative_error(g, central_difference(lambda z: float(loss(z, TS, PARAMS)), Z0)) <= 1e-7


# ---- failures and bad input --------------------------------------------------------------------------------


def _blow(z, t, p):
    return p * z**2  # z = 1 / (1 - p t): singular at t = 1 for p = 1


BLOW_TS = jnp.array([0.0, 0.5, 0.9, 1.5])


def _blow_loss(max_steps, throw=True):
    def loss(p, z0=None):
        z0 = jnp.array([1.0]) if z0 is None else z0
        ys = jaxode.odesolve(_blow, z0, BLOW_TS, p, gradient="reversible", max_steps=max_steps, throw=throw)
        return jnp.sum(ys)

    return loss


@pytest.mark.parametrize("max_steps, cause", [(20, "max_steps"), (4096, "underflow")])
def test_failed_solve_raises_under_jit_of_grad(max_steps, cause):
    grad = jax.jit(jax.grad(_blow_loss(max_steps)))
    with pytest.raises(Exception) as err:
        jax.block_until_ready(grad(1.0))
    assert re.search(cause, failure_cause(err.value))


def test_failed_solve_without_throw_has_nan_gradients():
    """Only the failed problem of a vmapped batch gets NaN; the other its exact gradient."""
    grad = jax.jit(jax.vmap(jax.grad(_blow_loss(20, throw=False), argnums=(0, 1))))
    g_p, g_z0 = grad(jnp.array([1.0, 0.2]), jnp.array([[1.0], [1.0]]))
    assert np.isnan(g_p[0]) and np.all(np.isnan(g_z0[0]))
    z = 1 / (1 - 0.2 * np.asarray(BLOW_TS))  # Σ_i ∂z(t_i)/∂p = Σ t_i z_i², ∂z(t_i)/∂z0 = z_i²
    np.testing.assert_allclose(g_p[1], np.sum(np.asarray(BLOW_TS) * z**2), rtol=1e-4)
    np.testing.assert_allclose(g_z0[1], [np.sum(z**2)], rtol=1e-4)


@pytest.mark.parametrize("coupling", [0.0, -0.5, 1.5, float("nan")])
def test_bad_coupling(coupling):
    with pytest.raises(ValueError, match="reversible_coupling must be in"):
        jaxode.odesolve(forced_oscillator, Z0, TS, PARAMS, gradient="reversible",
                        reversible_coupling=coupling)


class _NotExplicit(Method):
    """A stand-in for an implicit method (only its type matters here)."""

    name, order, error_order, adaptive = "implicit", 1, None, False
    num_stages, interpolant_nfe, quadrature_weights = 1, 0, (1.0,)

    def step(self, field, t, y, h, f0, state, t_end):
        raise NotImplementedError

    def interpolant(self, field, t, y, h, dense, y_new, f_new):
        raise NotImplementedError


def test_not_explicit_method():
    with pytest.raises(ValueError, match="explicit"):
        jaxode.odesolve(forced_oscillator, Z0, TS, PARAMS, solver=_NotExplicit(), dt0=0.1,
                        gradient="reversible")
    with pytest.raises(ValueError, match="explicit"):
        Reversible(_NotExplicit())


@pytest.mark.parametrize("option", [dict(dense=True), dict(jump_ts=[0.5])])
def test_unsupported_options(option):
    with pytest.raises(ValueError, match='gradient="reversible" does not'):
        jaxode.odesolve(forced_oscillator, Z0, TS, PARAMS, gradient="reversible", **option)


def test_forward_mode_refused():
    solve = lambda z0: jaxode.odesolve(forced_oscillator, z0, TS, PARAMS, gradient="reversible")
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(solve, (Z0,), (Z0,))
