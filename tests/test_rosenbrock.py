"""The Rosenbrock methods ``rosenbrock23`` and ``rodas5p``: order conditions of their
coefficients (rooted trees, in the untransformed form recovered here from the stored one),
stability, dense output, observed convergence order, stiff problems against independent
references (``expm``, scipy's Radau), gradients in every mode, and the usual transforms."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from conftest import logistic_exact
from grad_utils import PARAMS, TS, Z0, central_difference, forced_oscillator, relative_error, weighted_loss
from scipy.integrate import solve_ivp
from test_tableaus import _gamma, trees

import jaxode
from jaxode.methods import METHODS, Rosenbrock
from jaxode.methods.rosenbrock import ROSENBROCK_TABLEAUS

NAMES = ("rosenbrock23", "rodas5p")
ORDERS = {"rosenbrock23": (2, 3), "rodas5p": (5, 4)}  # (y_new, embedded)
DENSE_ORDERS = {"rosenbrock23": 2, "rodas5p": 4}

# --- the coefficients -------------------------------------------------------------------------


def _ragged(rows, s):
    M = np.zeros((s, s))
    for i, row in enumerate(rows):
        M[i + 1, : len(row)] = row
    return M


@functools.cache
def standard_form(name):
    """``(α, Γ, b, b̂, dense_k)`` of the untransformed method, from the transformed data:
    ``Γ⁻¹ = diag(1/γ) - C``, ``α = a Γ``, ``b = m Γ``, ``D_k = D Γ``."""
    tab = ROSENBROCK_TABLEAUS[name]
    s = tab.num_stages
    G = np.linalg.inv(np.eye(s) / tab.gamma - _ragged(tab.c, s))
    A = _ragged(tab.a, s) @ G
    m, e = np.asarray(tab.m), np.asarray(tab.m_error)
    return A, G, m @ G, (m - e) @ G, np.asarray(tab.dense) @ G


def _stage_weights(A, B, tree):
    """Elementary weights of a Rosenbrock method (Hairer & Wanner II, IV.7): a vertex with one
    child contributes ``β = α + Γ`` (``J`` acts there too), one with several children ``α``."""
    if not tree:
        return np.ones(A.shape[0])
    if len(tree) == 1:
        return B @ _stage_weights(A, B, tree[0])
    v = np.ones(A.shape[0])
    for child in tree:
        v = v * (A @ _stage_weights(A, B, child))
    return v


def residual(A, G, weights, order, theta=1.0):
    """``max |w·Φ(τ) - θ^|τ| / γ(τ)|`` over the trees with ``order`` nodes."""
    B = A + G
    return max(abs(weights @ _stage_weights(A, B, t) - theta**order / _gamma(t)) for t in trees(order))


@pytest.mark.parametrize("name", NAMES)
def test_order_conditions(name):
    A, G, b, b_hat, _ = standard_form(name)
    p, q = ORDERS[name]
    for k in range(1, p + 1):
        assert residual(A, G, b, k) < 1e-10, (name, "y_new", k)
    for k in range(1, q + 1):
        assert residual(A, G, b_hat, k) < 1e-10, (name, "embedded", k)
    # the conditions have teeth: neither solution reaches one order more
    assert residual(A, G, b, p + 1) > 1e-4
    assert residual(A, G, b_hat, q + 1) > 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_stage_times_and_time_derivative_factors(name):
    """Non-autonomous consistency: ``α_i = Σ_j α_ij``, ``γ_i = Σ_j γ_ij``."""
    tab = ROSENBROCK_TABLEAUS[name]
    A, G, *_ = standard_form(name)
    np.testing.assert_allclose(A.sum(axis=1), tab.alpha, atol=1e-12)
    np.testing.assert_allclose(G.sum(axis=1), tab.gamma_sum, atol=1e-12)
    np.testing.assert_allclose(np.diag(G), tab.gamma, rtol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_l_stable(name):
    """``R(z) = 1 + z bᵀ(I - zβ)⁻¹ 1``: ``R(∞) = 0`` and ``|R| <= 1`` on the imaginary axis
    and in the left half-plane."""
    A, G, b, _, _ = standard_form(name)
    B, s = A + G, A.shape[0]
    R = lambda z: 1 + z * b @ np.linalg.solve(np.eye(s) - z * B, np.ones(s))
    assert abs(1 - b @ np.linalg.solve(B, np.ones(s))) < 1e-10
    for z in [1j * y for y in np.logspace(-2, 4, 50)] + [-x + 3j for x in np.logspace(-2, 4, 30)]:
        assert abs(R(z)) <= 1 + 1e-12, z


@pytest.mark.parametrize("name", NAMES)
def test_dense_output_conditions(name):
    """The dense output's weights ``b(θ) = Σ_j θ^j D_j`` satisfy the conditions ``θ^|τ|/γ(τ)``
    up to its order, and give ``y_new`` at ``θ = 1``."""
    A, G, b, _, dense_k = standard_form(name)
    for theta in (0.3, 0.5, 0.8, 1.0):
        w = sum(theta ** (j + 1) * row for j, row in enumerate(dense_k))
        for k in range(1, DENSE_ORDERS[name] + 1):
            assert residual(A, G, w, k, theta) < 1e-9, (theta, k)
    np.testing.assert_allclose(dense_k.sum(axis=0), b, atol=1e-12)


def test_registered():
    for name in NAMES:
        method = METHODS[name]
        assert isinstance(method, Rosenbrock) and method.order == ORDERS[name][0]
    assert METHODS["rodas5p"].error_order == 4 and METHODS["rosenbrock23"].error_order == 2


# --- convergence ------------------------------------------------------------------------------


def _manufactured(z, t, p):
    """Logistic growth and a forced linear decay: a nonlinear, non-autonomous field."""
    return jnp.stack([z[0] * (1 - z[0]), -2.0 * z[1] + jnp.sin(3.0 * t)])


def _manufactured_exact(t):
    # z1' = -2 z1 + sin 3t, z1(0) = 1: particular (2 sin 3t - 3 cos 3t) / 13
    z1 = (1 + 3 / 13) * np.exp(-2 * t) + (2 * np.sin(3 * t) - 3 * np.cos(3 * t)) / 13
    return np.array([logistic_exact(t), z1])


@pytest.mark.parametrize("name", NAMES)
def test_convergence_order(name):
    """Fixed steps (``dt0 = max_dt = h``, tolerances too loose to reject): the global error
    falls like ``h^p``."""
    p = ORDERS[name][0]
    hs = (0.1, 0.05, 0.025) if p == 2 else (0.25, 0.125, 0.0625)
    z0, ts = jnp.array([0.1, 1.0]), jnp.array([0.0, 2.0])
    errs = []
    for h in hs:
        ys, info = jaxode.odesolve(_manufactured, z0, ts, solver=name, dt0=h, max_dt=h, rtol=1e3,
                                   atol=1e3, full_output=True)
        assert int(info.num_rejected) == 0
        assert int(info.num_accepted) == round(2.0 / h)
        errs.append(np.max(np.abs(np.asarray(ys[-1]) - _manufactured_exact(2.0))))
    rates = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert np.all(rates > p - 0.3), (errs, rates)


# --- stiff problems ---------------------------------------------------------------------------

EIGS = -np.logspace(0, 4, 5)
Q = np.linalg.qr(np.random.default_rng(0).normal(size=(5, 5)))[0]
A_STIFF = Q @ np.diag(EIGS) @ Q.T
Z0_STIFF = np.linspace(1.0, -1.0, 5)
TS_STIFF = np.array([0.0, 0.1, 0.5, 2.0])


def _linear(z, t, p):
    return p * (jnp.asarray(A_STIFF, z.dtype) @ z)


def _expm_solution(s=1.0):
    return np.stack([scipy.linalg.expm(s * A_STIFF * t) @ Z0_STIFF for t in TS_STIFF])


@pytest.mark.parametrize("name", NAMES)
def test_stiff_linear_against_expm(name):
    """Eigenvalues -1 … -1e4: few steps (an explicit method needs thousands), and the
    error at the tolerance's level."""
    rtol = 1e-6 if name == "rodas5p" else 1e-4
    ys, info = jaxode.odesolve(_linear, jnp.asarray(Z0_STIFF), jnp.asarray(TS_STIFF), 1.0, solver=name,
                               rtol=rtol, atol=rtol, full_output=True)
    err = np.max(np.abs(np.asarray(ys) - _expm_solution()))
    assert err < 20 * rtol, err
    assert int(info.num_steps) < (60 if name == "rodas5p" else 200)
    assert int(info.num_jacobians) == int(info.num_steps)
    _, tsit = jaxode.odesolve(_linear, jnp.asarray(Z0_STIFF), jnp.asarray(TS_STIFF), 1.0, rtol=rtol,
                              atol=rtol, full_output=True, max_steps=20000)
    assert int(tsit.num_steps) > 20 * int(info.num_steps)


def _van_der_pol(z, t, mu):
    return jnp.stack([z[1], mu * ((1 - z[0] ** 2) * z[1]) - z[0]])


@functools.cache
def _radau(fun, z0, t1, ts, rtol=1e-10, atol=1e-12):
    sol = solve_ivp(fun, (0.0, t1), np.asarray(z0), method="Radau", t_eval=np.asarray(ts), rtol=rtol,
                    atol=atol)
    assert sol.success
    return sol.y.T


def _vdp_numpy(t, z, mu=1000.0):
    return [z[1], mu * (1 - z[0] ** 2) * z[1] - z[0]]


def test_van_der_pol_stiff():
    """μ = 1000 on [0, 2]: rodas5p and rosenbrock23 in a few dozen steps (13 and 21 measured),
    tsit5 needs about 1700 (runs out of 1000)."""
    ts = (0.0, 0.5, 1.0, 2.0)
    z0 = jnp.array([2.0, 0.0])
    ref = _radau(_vdp_numpy, (2.0, 0.0), 2.0, ts)
    for name, rtol in (("rodas5p", 1e-6), ("rosenbrock23", 1e-4)):
        ys, info = jaxode.odesolve(_van_der_pol, z0, jnp.array(ts), 1000.0, solver=name, rtol=rtol,
                                   atol=rtol, full_output=True)
        assert int(info.num_steps) < 50, (name, info)
        np.testing.assert_allclose(np.asarray(ys), ref, rtol=10 * rtol, atol=10 * rtol)
    ys, info = jaxode.odesolve(_van_der_pol, z0, jnp.array(ts), 1000.0, solver="tsit5", rtol=1e-6,
                               atol=1e-6, full_output=True, throw=False, max_steps=1000)
    assert int(info.status) == 1  # max_steps reached


def _robertson(z, t, k):
    r1, r2, r3 = k[0] * z[0], k[1] * z[1] ** 2, k[2] * z[1] * z[2]
    return jnp.stack([-r1 + r3, r1 - r2 - r3, r2])


def _robertson_numpy(t, z):
    r1, r2, r3 = 0.04 * z[0], 3e7 * z[1] ** 2, 1e4 * z[1] * z[2]
    return [-r1 + r3, r1 - r2 - r3, r2]


ROBERTSON_TS = (0.0,) + tuple(np.logspace(-5, 5, 11))
ROBERTSON_K = jnp.array([0.04, 3e7, 1e4])


@pytest.mark.parametrize("name", NAMES)
def test_robertson(name):
    """Robertson's kinetics to t = 1e5 against scipy's Radau at tight tolerance, every
    component to its relative tolerance (y2 ~ 1e-5 .. 1e-10 included)."""
    ref = _radau(_robertson_numpy, (1.0, 0.0, 0.0), 1e5, ROBERTSON_TS, 1e-11, 1e-16)
    rtol = 1e-6 if name == "rodas5p" else 1e-4
    ys, info = jaxode.odesolve(_robertson, jnp.array([1.0, 0.0, 0.0]), jnp.array(ROBERTSON_TS), ROBERTSON_K,
                               solver=name, rtol=rtol, atol=1e-12, full_output=True)
    assert int(info.num_steps) < (300 if name == "rodas5p" else 1500), info
    ys = np.asarray(ys)
    np.testing.assert_allclose(ys[1:], ref[1:], rtol=30 * rtol, atol=1e-11)
    np.testing.assert_allclose(ys.sum(axis=1), 1.0, atol=1e-9)  # mass is conserved (linear invariant)


# --- gradients --------------------------------------------------------------------------------


def _stiff_loss_fn(name, gradient):
    w = jnp.asarray(np.arange(1.0, 6.0))

    def loss(z0, s):
        ys = jaxode.odesolve(_linear, z0, jnp.asarray(TS_STIFF), s, solver=name, rtol=1e-9, atol=1e-9,
                             gradient=gradient)
        return jnp.sum(w * ys[-1])

    return loss, np.asarray(w)


@pytest.mark.parametrize("gradient", [pytest.param("backprop", marks=pytest.mark.slow), "checkpoint"])
def test_gradient_stiff_linear_against_expm(gradient):
    """``L = w·exp(sAT) z0``: ``∂L/∂z0 = exp(sAT)ᵀ w`` and ``∂L/∂s = w·exp(sAT) AT z0``."""
    loss, w = _stiff_loss_fn("rodas5p", gradient)
    s, T = 1.0, TS_STIFF[-1]
    E = scipy.linalg.expm(s * A_STIFF * T)
    g_z0, g_s = jax.grad(loss, argnums=(0, 1))(jnp.asarray(Z0_STIFF), jnp.asarray(s))
    np.testing.assert_allclose(np.asarray(g_z0), E.T @ w, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(float(g_s), w @ E @ (A_STIFF * T) @ Z0_STIFF, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "name, gradient",
    [pytest.param("rodas5p", "backprop", marks=pytest.mark.slow),
     pytest.param("rodas5p", "checkpoint", marks=pytest.mark.slow), ("rodas5p", "adjoint"),
     ("rosenbrock23", "backprop")],
)
def test_gradient_against_finite_differences(name, gradient):
    """A nonlinear, non-autonomous field with dict parameters (∂f/∂t, second derivatives
    through the Jacobian and the LU solves): every mode against float64 central differences."""
    tol = 1e-10 if name == "rodas5p" else 1e-8

    def loss(z0, params):
        ys = jaxode.odesolve(forced_oscillator, z0, TS, params, solver=name, rtol=tol, atol=tol,
                             gradient=gradient, max_steps=100000)
        return weighted_loss(ys)

    grads = jax.grad(loss, argnums=(0, 1))(Z0, PARAMS)
    fd = central_difference(lambda x: loss(*x), (Z0, PARAMS), eps=1e-5)
    assert relative_error(grads, fd) < (1e-6 if name == "rodas5p" else 1e-4)


def test_gradient_forward_mode_backprop():
    """``jax.jvp`` through the Rosenbrock step (backprop mode) against a central difference."""
    def solve(s):
        return jaxode.odesolve(_linear, jnp.asarray(Z0_STIFF), jnp.asarray(TS_STIFF), s, solver="rodas5p",
                               rtol=1e-9, atol=1e-9, gradient="backprop")

    _, tangent = jax.jvp(solve, (jnp.asarray(1.0),), (jnp.asarray(1.0),))
    fd = (solve(1.0 + 1e-6) - solve(1.0 - 1e-6)) / 2e-6
    np.testing.assert_allclose(np.asarray(tangent), np.asarray(fd), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_gradient_batched_adjoint():
    """``batched=True`` with the adjoint: the parameter adjoint by the method's quadrature
    nodes (Simpson on the dense output), against central differences."""
    z0s = jnp.stack([Z0, Z0 * 0.5, -Z0])

    def loss(params):
        ys = jaxode.odesolve(forced_oscillator, z0s, TS, params, solver="rodas5p", rtol=1e-10, atol=1e-10,
                             batched=True)
        return jnp.sum(jax.vmap(weighted_loss)(ys))

    assert relative_error(jax.grad(loss)(PARAMS), central_difference(loss, PARAMS, eps=1e-5)) < 1e-6


# --- transforms, dtypes, directions, counters ------------------------------------------------


def test_jit_vmap_batched_agree():
    z0s = jnp.stack([jnp.asarray(Z0_STIFF), -jnp.asarray(Z0_STIFF)])
    kw = dict(solver="rodas5p", rtol=1e-7, atol=1e-7)
    solve = lambda z0, s: jaxode.odesolve(_linear, z0, jnp.asarray(TS_STIFF), s, **kw)
    jitted = jax.jit(solve)(z0s[1], 1.0)
    vmapped = jax.jit(jax.vmap(solve, (0, None)))(z0s, 1.0)
    batched = jaxode.odesolve(_linear, z0s, jnp.asarray(TS_STIFF), 1.0, batched=True, **kw)
    exact = _expm_solution()
    np.testing.assert_allclose(np.asarray(jitted), -exact, atol=1e-5)
    np.testing.assert_allclose(np.asarray(vmapped[0]), exact, atol=1e-5)
    np.testing.assert_allclose(np.asarray(vmapped), np.asarray(batched), atol=1e-12)
    # vmap over the parameter too (a stiffness per problem)
    per_s = jax.jit(jax.vmap(solve, (None, 0)))(z0s[0], jnp.array([1.0, 0.5]))
    np.testing.assert_allclose(np.asarray(per_s[1]), _expm_solution(0.5), atol=1e-5)


def _expm_at(ts, s=1.0):
    return np.stack([scipy.linalg.expm(s * A_STIFF * t) @ Z0_STIFF for t in ts])


@pytest.mark.parametrize("name", NAMES)
def test_float32(name):
    ys, info = jaxode.odesolve(_linear, jnp.asarray(Z0_STIFF, jnp.float32),
                               jnp.asarray(TS_STIFF, jnp.float32), jnp.float32(1.0), solver=name, rtol=1e-4,
                               atol=1e-5, full_output=True)
    assert ys.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ys), _expm_solution(), atol=2e-3)
    assert int(info.num_steps) < 200


@pytest.mark.parametrize("name", NAMES)
def test_decreasing_ts(name):
    """Backwards in time (a non-stiff, non-autonomous problem: ``z1``'s decay grows by ``e⁴``
    backwards, and the global error with it: measured 2.5e-8 (rodas5p) and 6.5e-5
    (rosenbrock23, 2nd order) at rtol 1e-8)."""
    ts = jnp.array([2.0, 1.5, 0.5, 0.0])
    z2 = jnp.asarray(_manufactured_exact(2.0))
    ys = jaxode.odesolve(_manufactured, z2, ts, solver=name, rtol=1e-8, atol=1e-8)
    ref = np.stack([_manufactured_exact(float(t)) for t in ts])
    bound = 1e-7 if name == "rodas5p" else 2e-4
    np.testing.assert_allclose(np.asarray(ys), ref, rtol=0, atol=bound)


def test_jacobians_counted_and_nfe():
    """One Jacobian per step attempt; nfe: 2 per attempt for rosenbrock23 (last stage = f(y_new))
    and 8 for rodas5p, plus the two of the first-step selection."""
    for name, per_step in (("rosenbrock23", 2), ("rodas5p", 8)):
        _, info = jaxode.odesolve(_robertson, jnp.array([1.0, 0.0, 0.0]), jnp.array([0.0, 1.0, 10.0]),
                                  ROBERTSON_K, solver=name, rtol=1e-5, atol=1e-10, full_output=True)
        steps = int(info.num_accepted) + int(info.num_rejected)
        assert int(info.num_jacobians) == steps > 0
        assert int(info.nfe) == per_step * steps + 2


def test_singular_matrix_rejects_step():
    """``I - γhJ`` (nearly) singular at the first try: the step is rejected and retried
    smaller, never accepted. ``z' = sin z`` from ``z0 = 0.1`` with ``h0 = 1/(γ cos z0)``;
    exactly ``tan(z/2) = tan(z0/2) e^t``."""
    tab = ROSENBROCK_TABLEAUS["rodas5p"]
    z0 = 0.1
    h0 = 1 / (tab.gamma * np.cos(z0))
    ys, info = jaxode.odesolve(lambda z, t, p: jnp.sin(z), jnp.array([z0]), jnp.array([0.0, 6.0]),
                               solver="rodas5p", dt0=h0, rtol=1e-8, atol=1e-8, full_output=True)
    exact = 2 * np.arctan(np.tan(z0 / 2) * np.exp(6.0))
    np.testing.assert_allclose(float(ys[-1, 0]), exact, rtol=1e-6)
    assert int(info.num_rejected) >= 1


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_state(dtype):
    """A float16/bfloat16 state: stages in its dtype, the Jacobian, LU and increments in float32
    (XLA has no float16 LU)."""
    decay = jnp.array([1.0, 100.0])
    ys = jaxode.odesolve(lambda z, t, p: -z * decay.astype(z.dtype), jnp.array([1.0, 2.0], dtype),
                         jnp.array([0.0, 1.0]), solver="rodas5p", rtol=1e-2, atol=1e-2)
    assert ys.dtype == dtype
    np.testing.assert_allclose(np.asarray(ys[-1], np.float32), [np.exp(-1.0), 0.0], atol=1e-2)


@pytest.mark.parametrize("name", NAMES)
def test_dense_solution_between_outputs(name):
    """``dense=True``: the method's own interpolant between the steps, against ``expm``, to the
    order of the dense output (rosenbrock23's is 2nd order)."""
    rtol = 1e-7
    _, sol = jaxode.odesolve(_linear, jnp.asarray(Z0_STIFF), jnp.asarray(TS_STIFF), 1.0, solver=name,
                             rtol=rtol, atol=rtol, dense=True, max_steps=2000)
    t_eval = np.array([0.03, 0.21, 0.77, 1.3, 1.95])
    values = np.stack([np.asarray(sol(t)) for t in t_eval])
    bound = 1e-7 if name == "rodas5p" else 2e-5  # measured 1.0e-8 and 3.4e-6
    np.testing.assert_allclose(values, _expm_at(t_eval), atol=bound)


def test_blow_up_fails_loudly():
    """``z' = z²`` from 1 blows up at t = 1: with ``throw=False`` the status says so and the
    outputs past it are NaN; with ``throw=True`` the solve raises."""
    square = lambda z, t, p: z**2
    ys, info = jaxode.odesolve(square, jnp.array([1.0]), jnp.array([0.0, 0.5, 2.0]), solver="rodas5p",
                               throw=False, full_output=True)
    assert int(info.status) != 0
    np.testing.assert_allclose(float(ys[1, 0]), 2.0, rtol=1e-5)
    assert np.isnan(float(ys[2, 0]))
    with pytest.raises(Exception, match="jaxode"):
        jaxode.odesolve(square, jnp.array([1.0]), jnp.array([0.0, 0.5, 2.0]), solver="rodas5p")
