"""The ESDIRK methods ``kvaerno3`` and ``kvaerno5`` (jaxode/methods/esdirk.py): their tableaus
(order conditions, stiff accuracy, L-stability), one step (order, Newton iteration, implicit
derivatives), stiff solves against independent references, and gradients against float64
finite differences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import Recorder
from grad_utils import relative_error
from scipy.integrate import solve_ivp
from scipy.linalg import expm
from test_tableaus import _gamma, _stage_weights, trees

import jaxode
from jaxode.methods import METHODS, get_method
from jaxode.methods.esdirk import ESDIRK, KVAERNO3, KVAERNO5, TABLEAUS, ESDIRKTableau

NAMES = ("kvaerno3", "kvaerno5")
ORDERS = {"kvaerno3": (3, 2), "kvaerno5": (5, 4)}


# --- the tableaus ------------------------------------------------------------------------


def full_matrix(tab: ESDIRKTableau) -> np.ndarray:
    """``A`` (s, s) with the diagonal ``γ`` (0 for the explicit first stage)."""
    s = tab.num_stages
    A = np.zeros((s, s))
    for i, row in enumerate(tab.a, start=1):
        A[i, :i] = row
        A[i, i] = tab.gamma
    return A


def residual(A, weights, order):
    """``max |w·Φ(τ) - 1/γ(τ)|`` over the rooted trees with ``order`` nodes."""
    w = np.asarray(weights, np.float64)
    return max(abs(w @ _stage_weights(A, t) - 1.0 / _gamma(t)) for t in trees(order))


def stage_amplification(tab: ESDIRKTableau, z: complex) -> np.ndarray:
    """The stages ``Y = (I - zA)⁻¹ 1`` of a step of ``y' = λy`` from ``y = 1``, ``z = hλ``: the last
    is ``R(z)`` (stiffly accurate: ``R(z) = 1 + z bᵀ(I - zA)⁻¹1`` without its cancellation)."""
    A, s = full_matrix(tab), tab.num_stages
    return np.linalg.solve(np.eye(s) - z * A, np.ones(s))


def stability_function(tab: ESDIRKTableau, z: complex) -> complex:
    return stage_amplification(tab, z)[-1]


@pytest.mark.parametrize("name", NAMES)
def test_order_conditions(name):
    tab = TABLEAUS[name]
    p, q = ORDERS[name]
    assert (tab.order, tab.error_order) == (p, q)
    A = full_matrix(tab)
    np.testing.assert_allclose(A.sum(axis=1), tab.c, rtol=0, atol=1e-15)
    for order in range(1, p + 1):
        assert residual(A, tab.b, order) < 1e-14, (name, order)
    assert residual(A, tab.b, p + 1) > 1e-6  # not of a higher order than claimed
    for order in range(1, q + 1):
        assert residual(A, tab.b_hat, order) < 1e-14, (name, "embedded", order)
    assert residual(A, tab.b_hat, q + 1) > 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_stiffly_accurate_and_l_stable(name):
    tab = TABLEAUS[name]
    A = full_matrix(tab)
    # stiffly accurate: b is the last row of A (y_new is the last stage), and so is the
    # embedded solution (the one before it, also at c = 1)
    np.testing.assert_array_equal(A[-1], tab.b)
    np.testing.assert_array_equal(A[-2], tab.b_hat)
    assert tab.c[-1] == tab.c[-2] == 1
    # singly diagonal with an explicit first stage
    assert A[0, 0] == 0 and np.all(np.diag(A)[1:] == tab.gamma)
    # L-stable: R(z) -> 0 as z -> -inf (like 1/z), and |R| <= 1 on the imaginary axis
    r = np.array([abs(stability_function(tab, -(10.0**k))) for k in (6, 8, 10)])
    assert r[-1] < 1e-9
    np.testing.assert_allclose(r[:-1] / r[1:], 100, rtol=1e-3)
    z = 1e6  # the same from the full formula, whose cancellation costs digits
    s = tab.num_stages
    full = 1 - z * np.asarray(tab.b) @ np.linalg.solve(np.eye(s) + z * A, np.ones(s))
    np.testing.assert_allclose(full, stability_function(tab, -z), rtol=1e-4)
    for y in np.logspace(-3, 4, 200):
        assert abs(stability_function(tab, 1j * y)) <= 1 + 1e-12
    for x in -np.logspace(-3, 6, 100):  # and on the negative real axis
        assert abs(stability_function(tab, x)) <= 1 + 1e-12


def test_kvaerno3_gamma_is_the_l_stability_root():
    g = KVAERNO3.gamma
    assert abs(6 * g**3 - 18 * g**2 + 9 * g - 1) < 1e-15


def test_registered_and_invalid_tableaus():
    assert isinstance(METHODS["kvaerno3"], ESDIRK) and METHODS["kvaerno5"].tableau is KVAERNO5
    assert get_method("kvaerno5").quadrature_weights == tuple(b for b in KVAERNO5.b if b != 0)
    with pytest.raises(ValueError, match="unknown solver") as err:
        get_method("kvaerno4")
    assert "'kvaerno3'" in str(err.value) and "'kvaerno5'" in str(err.value)
    with pytest.raises(ValueError, match="sum to c"):
        ESDIRKTableau("bad", 1, 0, 0.5, (0.0, 1.0), ((0.4,),), (0.5, 0.5))
    with pytest.raises(ValueError, match="b_hat"):
        ESDIRKTableau("bad", 1, 0, 0.5, (0.0, 1.0), ((0.5,),), (0.5, 0.6))


# --- one step ----------------------------------------------------------------------------


def nonlinear(y, t):
    return -2.0 * t * y**2  # y = 1 / (t^2 + C)


def nonlinear_exact(t, t0, y0):
    return 1.0 / (t**2 + 1.0 / y0 - t0**2)


def tight_state(method, y0):
    """The method's carry with tolerances far below the local errors measured."""
    return method.init_with_tolerances(nonlinear, 0.0, y0, y0, 1e-12, 1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_global_order_with_fixed_steps(name):
    """Fixed steps of size h on [0.3, 2.3] (Newton converged to round-off): the global error
    behaves like h^p."""
    method = METHODS[name]
    y0 = jnp.array([0.8])

    @jax.jit
    def solve(num):
        h = 2.0 / num

        def body(i, carry):
            y, converged = carry
            t = 0.3 + i * h
            st = method.step(nonlinear, t, y, h, nonlinear(y, t), tight_state(method, y0), t + h)
            return st.y_new, converged & st.error[1]

        y, converged = jax.lax.fori_loop(0, num, body, (y0, True))
        return y[0], converged

    nums = np.array([10, 20, 40])
    results = [solve(num) for num in nums]
    assert all(bool(ok) for _, ok in results)
    errs = np.array([abs(float(y) - nonlinear_exact(2.3, 0.3, 0.8)) for y, _ in results])
    np.testing.assert_allclose(np.log2(errs[:-1] / errs[1:]), method.order, atol=0.3)


def pendulum(y, t):
    return jnp.stack([y[1], -jnp.sin(y[0]) + 0.3 * jnp.cos(t)])


@pytest.mark.parametrize("name", NAMES)
def test_one_step_local_error_estimate_and_fsal(name):
    """The error estimate behaves like h^(q+1); f_new is f at (t + h, y_new) up to the Newton
    tolerance; the quadrature over the nodes reproduces the step."""
    method = METHODS[name]
    y0, t0 = jnp.array([0.8, 0.2]), 0.3
    state = method.init_with_tolerances(pendulum, t0, y0, y0, 1e-12, 1e-12)
    step = jax.jit(lambda h: method.step(pendulum, t0, y0, h, pendulum(y0, t0), state, t0 + h))
    hs = 0.2 * 0.5 ** np.arange(3)
    steps = [step(h) for h in hs]
    ests = np.array([float(jnp.abs(st.error[0][0])) for st in steps])
    np.testing.assert_allclose(np.log2(ests[:-1] / ests[1:]), method.error_order + 1, atol=0.2)
    for st, h in zip(steps, hs):
        assert bool(st.error[1])  # converged
        np.testing.assert_allclose(st.f_new, pendulum(st.y_new, t0 + h), rtol=1e-10)
        inputs, times = st.nodes
        quad = h * sum(w * pendulum(x, tt) for w, x, tt in zip(method.quadrature_weights, inputs, times))
        np.testing.assert_allclose(st.y_new - y0, quad, rtol=1e-10)
        assert st.num_jacobians == 1 and method.num_stages - 1 <= int(st.nfe) <= 10 * (method.num_stages - 1)


def test_stage_times_past_the_step_only_without_a_jump(recorder):
    """Kværnø 5's third stage is at t + 1.23 h; on a step that ends on a jump of f (``t_end``
    just before ``t + h``) no stage is evaluated past ``t_end``."""
    method = METHODS["kvaerno5"]
    y0 = jnp.array([0.8, 0.2])

    def field(y, t):
        recorder.record(t)
        return pendulum(y, t)

    state = method.init_with_tolerances(field, 0.0, y0, y0, 1e-8, 1e-8)
    step = jax.jit(lambda t_end: method.step(field, 0.0, y0, 1.0, pendulum(y0, 0.0), state, t_end).y_new)
    step(1.0)
    times = recorder.collect()
    np.testing.assert_allclose(times.max(), KVAERNO5.c[2], rtol=1e-15)
    recorder.clear()
    before = float(np.nextafter(1.0, 0.0))
    step(before)
    assert recorder.collect().max() == before


def stiff_scalar(y, t, p=50.0):
    """A stiff nonlinear scalar problem: y' = -p (y - cos t)^3 - p (y - cos t) - sin t."""
    d = y - jnp.cos(t)
    return -p * d**3 - p * d - jnp.sin(t)


@pytest.mark.parametrize("name", NAMES)
def test_newton_failure_rejects_the_step(name):
    """A huge step on a strongly nonlinear problem: the iteration cannot converge within its
    iterations; the step reports it and its error ratio is infinite, whatever its estimate."""
    method = METHODS[name]
    y0 = jnp.array([30.0])
    state = method.init_with_tolerances(stiff_scalar, 0.0, y0, y0, 1e-6, 1e-6)
    st = method.step(stiff_scalar, 0.0, y0, 3.0, stiff_scalar(y0, 0.0), state, 3.0)  # (see below)
    assert not bool(st.error[1])
    assert float(method.error_ratio(st, y0, 1e-6, 1e-6, ((0, 1),))) == np.inf
    # a one-iteration method can only converge where one iteration suffices
    strict = ESDIRK(method.tableau, max_iterations=1)
    st = strict.step(stiff_scalar, 0.0, y0, 0.5, stiff_scalar(y0, 0.0), state, 0.5)
    assert not bool(st.error[1]) and int(st.nfe) == 1  # the later stages are not iterated


@pytest.mark.parametrize("name", NAMES)
def test_newton_iterations_are_not_differentiated(name):
    """The step's derivative is the implicit one: its linearisation holds no loop (the
    iterations are not unrolled or differentiated), and it equals a central difference of the
    step solved to round-off."""
    method = METHODS[name]
    y0, h = jnp.array([0.8, 1.3]), 0.2

    def step(y, p):
        field = lambda y, t: p * nonlinear(y, t)
        return method.step(field, 0.3, y, h, field(y, 0.3), tight_state(method, y0), 0.3 + h).y_new

    _, linear = jax.linearize(step, y0, 1.0)
    jaxpr = jax.make_jaxpr(linear)(y0, 1.0)
    primitives = set()

    def collect(jaxpr):
        for eqn in jaxpr.eqns:
            primitives.add(eqn.primitive.name)
            for value in eqn.params.values():
                for inner in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(inner, "jaxpr", inner)
                    if hasattr(inner, "eqns"):
                        collect(inner)

    collect(jaxpr.jaxpr)
    assert not primitives & {"while", "scan"}, primitives
    assert "div" in primitives  # the substitutions solving the linearised stage equations (methods.lu)
    tangent = linear(jnp.array([1.0, -0.5]), 0.7)
    eps = 1e-6
    fd = (step(y0 + eps * jnp.array([1.0, -0.5]), 1.0 + 0.7 * eps)
          - step(y0 - eps * jnp.array([1.0, -0.5]), 1.0 - 0.7 * eps)) / (2 * eps)
    np.testing.assert_allclose(tangent, fd, rtol=1e-7)
    # reverse mode (a while loop cannot be transposed: this runs only if it is not differentiated)
    grad = jax.grad(lambda p: jnp.sum(step(y0, p)))(1.0)
    np.testing.assert_allclose(grad, jnp.sum(linear(jnp.zeros(2), 1.0)), rtol=1e-12)


# --- stiff solves ------------------------------------------------------------------------

# an explicit method needs over 14,000 steps on [0, 5]; kvaerno3 took 970, kvaerno5 98
STEPS_LINEAR = {"kvaerno3": 1400, "kvaerno5": 150}
EIGENVALUES = np.array([-1.0, -30.0, -1e3, -1e4])
_V = np.array([[1.0, 0.3, 0.0, 0.2], [0.0, 1.0, 0.4, 0.0], [0.1, 0.0, 1.0, 0.5], [0.0, 0.2, 0.0, 1.0]])
STIFF_A = _V @ np.diag(EIGENVALUES) @ np.linalg.inv(_V)
Z_LINEAR = jnp.array([1.0, -2.0, 0.5, 3.0])


def linear_field(z, t, a):
    return a @ z


@pytest.mark.parametrize("name", NAMES)
def test_stiff_linear_system_matches_expm_in_few_steps(name):
    ts = jnp.array([0.0, 0.01, 0.1, 1.0, 5.0])
    ys, info = jaxode.odesolve(linear_field, Z_LINEAR, ts, jnp.asarray(STIFF_A), solver=name,
                               rtol=1e-6, atol=1e-8, full_output=True)
    exact = np.stack([expm(STIFF_A * t) @ np.asarray(Z_LINEAR) for t in np.asarray(ts)])
    np.testing.assert_allclose(ys, exact, rtol=0, atol=1e-5)
    # an explicit method needs |h λ_max| < ~3.5, over 14,000 steps on [0, 5]
    assert int(info.num_steps) < (STEPS_LINEAR[name]), info
    assert int(info.status) == 0 and int(info.num_jacobians) == int(info.num_steps)


def test_dense_output_is_cubic_hermite():
    """``dense=True``: the accepted steps' Hermite interpolants, 3rd order inside each step,
    against expm at times between the outputs."""
    ts = jnp.array([0.0, 0.1, 1.0, 5.0])
    ys, info, sol = jaxode.odesolve(linear_field, Z_LINEAR, ts, jnp.asarray(STIFF_A), solver="kvaerno5",
                                    rtol=1e-8, atol=1e-10, full_output=True, dense=True)
    times = np.linspace(0.2, 5.0, 17)
    exact = np.stack([expm(STIFF_A * t) @ np.asarray(Z_LINEAR) for t in times])
    np.testing.assert_allclose(sol(jnp.asarray(times)), exact, rtol=0, atol=1e-6)
    np.testing.assert_allclose(sol(ts), ys, rtol=0, atol=1e-14)


def test_decreasing_ts_stiff_backwards():
    """Backwards in time, ``z' = -A z`` is the stiff decaying system: from t = 5 to 0."""
    ts = jnp.array([5.0, 4.9, 4.0, 0.0])
    ys, info = jaxode.odesolve(linear_field, Z_LINEAR, ts, -jnp.asarray(STIFF_A), solver="kvaerno5",
                               rtol=1e-6, atol=1e-8, full_output=True)
    exact = np.stack([expm(STIFF_A * (5.0 - t)) @ np.asarray(Z_LINEAR) for t in np.asarray(ts)])
    np.testing.assert_allclose(ys, exact, rtol=0, atol=1e-5)
    assert int(info.num_steps) < STEPS_LINEAR["kvaerno5"]


def vdp(z, t, mu):
    x, v = z[0], z[1]
    return jnp.stack([v, mu * (1 - x**2) * v - x])


def vdp_np(t, z, mu=1000.0):
    return [z[1], mu * (1 - z[0] ** 2) * z[1] - z[0]]


@pytest.fixture(scope="module")
def vdp_reference():
    ts = np.array([0.0, 1.0, 10.0, 30.0])
    sol = solve_ivp(vdp_np, (0, 30.0), [2.0, 0.0], method="Radau", t_eval=ts, rtol=1e-12, atol=1e-12)
    assert sol.success
    return ts, sol.y.T


@pytest.mark.parametrize("name", NAMES)
def test_van_der_pol_stiff_in_far_fewer_steps_than_tsit5(name, vdp_reference):
    """Van der Pol with μ = 1000 on [0, 30] (on its slow manifold, where the Jacobian has an
    eigenvalue near -μ(x² - 1) ≈ -3000): against scipy's Radau, in a hundredth of tsit5's steps."""
    ts, ref = vdp_reference
    opts = dict(rtol=1e-6, atol=1e-8, full_output=True, max_steps=100_000)
    ys, info = jaxode.odesolve(vdp, jnp.array([2.0, 0.0]), jnp.asarray(ts), 1000.0, solver=name, **opts)
    np.testing.assert_allclose(ys, ref, rtol=1e-4, atol=1e-6)
    _, explicit = jaxode.odesolve(vdp, jnp.array([2.0, 0.0]), jnp.asarray(ts), 1000.0, solver="tsit5", **opts)
    assert int(info.num_steps) * 100 < int(explicit.num_steps), (info, explicit)


def robertson(y, t, k):
    y1, y2, y3 = y[0], y[1], y[2]
    return jnp.stack([-k[0] * y1 + k[2] * y2 * y3, k[0] * y1 - k[1] * y2**2 - k[2] * y2 * y3, k[1] * y2**2])


ROBERTSON_K = (0.04, 3e7, 1e4)


@pytest.fixture(scope="module")
def robertson_reference():
    ts = np.concatenate([[0.0], np.logspace(-4, 5, 10)])
    fun = lambda t, y: np.asarray(robertson(np.asarray(y), t, ROBERTSON_K))  # noqa: E731
    jac = lambda t, y: np.asarray(jax.jacfwd(robertson)(jnp.asarray(y), t, jnp.asarray(ROBERTSON_K)))  # noqa: E731
    sol = solve_ivp(fun, (0, 1e5), [1.0, 0.0, 0.0], method="Radau", t_eval=ts, rtol=1e-10,
                    atol=1e-14, jac=jac)
    assert sol.success
    return ts, sol.y.T


@pytest.mark.parametrize("name", NAMES)
def test_robertson_to_1e5_against_radau(name, robertson_reference):
    """Robertson's kinetics to t = 1e5 (log-spaced outputs, read off the dense output):
    relative errors at the tolerance's level, y2 ~ 1e-5 included."""
    ts, ref = robertson_reference
    k = jnp.asarray(ROBERTSON_K)
    ys, info = jaxode.odesolve(robertson, jnp.array([1.0, 0.0, 0.0]), jnp.asarray(ts), k, solver=name,
                               rtol=1e-7, atol=1e-12, full_output=True, max_steps=20_000)
    assert int(info.status) == 0
    np.testing.assert_allclose(ys[1:], ref[1:], rtol=2e-4, atol=5e-11)
    assert int(info.num_steps) < (2000 if name == "kvaerno3" else 400), info


@pytest.mark.parametrize("name", [NAMES[0]] + [pytest.param(n, marks=pytest.mark.slow) for n in NAMES[1:]])
def test_huge_first_step_is_rejected_and_the_solve_recovers(name):
    """dt0 = 50 on the stiff nonlinear scalar: the first attempt (the whole interval, h = 3)
    is the step whose iteration fails above; it is rejected and the solve meets its tolerance.
    A method allowed two iterations per stage fails at least as often, and still never
    accepts an unconverged stage: its solution is as accurate."""
    ts = jnp.array([0.0, 1.0, 3.0])
    field = lambda y, t, p: stiff_scalar(y, t)  # noqa: E731
    ref = solve_ivp(lambda t, y: np.asarray(stiff_scalar(jnp.asarray(y), t)), (0, 3), [30.0], method="Radau",
                    t_eval=np.asarray(ts), rtol=1e-12, atol=1e-12)
    rejected = []
    for method in (METHODS[name], ESDIRK(TABLEAUS[name], max_iterations=2)):
        ys, info = jaxode.odesolve(field, jnp.array([30.0]), ts, solver=method, dt0=50.0, rtol=1e-7,
                                   atol=1e-9, full_output=True)
        np.testing.assert_allclose(ys[:, 0], ref.y[0], rtol=0, atol=1e-5)
        assert int(info.status) == 0 and int(info.num_rejected) >= 1
        rejected.append(int(info.num_rejected))
    assert rejected[1] >= rejected[0]


def test_nfe_counts_every_field_evaluation():
    """``info.nfe`` is the number of evaluations of ``f`` (Newton iterations included), apart
    from one primal evaluation inside each Jacobian (``info.num_jacobians``)."""
    recorder = Recorder()

    def f(y, t, p):
        recorder.record(t)
        return stiff_scalar(y, t)

    ys, info = jaxode.odesolve(f, jnp.array([2.0]), jnp.array([0.0, 2.0]), solver="kvaerno3", rtol=1e-6,
                               atol=1e-8, full_output=True)
    count = len(recorder.collect())
    assert int(info.nfe) > 3 * int(info.num_steps)  # Newton iterations counted
    assert count == int(info.nfe) + int(info.num_jacobians), (count, info)


# --- transformations and dtypes ----------------------------------------------------------


def test_jit_vmap_and_batched_agree():
    ts = jnp.array([0.0, 0.3, 3.0])
    z0s = jnp.array([[2.0, 0.0], [1.5, 0.1], [-1.8, 0.5]])
    opts = dict(solver="kvaerno5", rtol=1e-7, atol=1e-9, max_steps=10_000)
    solve = jax.jit(lambda z0: jaxode.odesolve(vdp, z0, ts, 200.0, **opts))
    one_by_one = np.stack([solve(z0) for z0 in z0s])
    np.testing.assert_allclose(jax.jit(jax.vmap(solve))(z0s), one_by_one, rtol=1e-12, atol=1e-14)
    batched = jaxode.odesolve(vdp, z0s, ts, 200.0, batched=True, **opts)
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-12, atol=1e-14)
    for z0, ys in zip(z0s, one_by_one):
        ref = solve_ivp(lambda t, z: vdp_np(t, z, 200.0), (0, 3), np.asarray(z0), method="Radau",
                        t_eval=np.asarray(ts), rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(ys, ref.y.T, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_float32(name):
    ts = jnp.array([0.0, 0.1, 1.0, 5.0], dtype=jnp.float32)
    a = jnp.asarray(STIFF_A, jnp.float32)
    ys, info = jaxode.odesolve(linear_field, Z_LINEAR.astype(jnp.float32), ts, a, solver=name, rtol=1e-4,
                               atol=1e-6, full_output=True)
    assert ys.dtype == jnp.float32 and int(info.status) == 0
    exact = np.stack([expm(STIFF_A * t) @ np.asarray(Z_LINEAR) for t in np.asarray(ts, np.float64)])
    np.testing.assert_allclose(ys, exact, rtol=0, atol=1e-3)


# --- gradients ---------------------------------------------------------------------------


def kinetics(z, t, p):
    """A mildly stiff, nonlinear, non-autonomous two-species system with two parameters."""
    return jnp.stack([-p[0] * z[0] + p[1] * z[1] * jnp.sin(t), p[0] * z[0] - 50 * p[1] * z[1] ** 2])


P0, Z0, TS = jnp.array([1.5, 2.0]), jnp.array([1.0, 0.5]), jnp.array([0.0, 0.5, 2.0])


def kinetics_loss(name, mode):
    @jax.jit
    def loss(p, z0):
        ys = jaxode.odesolve(kinetics, z0, TS, p, solver=name, rtol=1e-10, atol=1e-10, gradient=mode,
                             max_steps=20_000)
        return jnp.sum(ys**2 * jnp.array([1.0, 3.0]))

    return loss


def central(loss, p, z0, eps=1e-6):
    x = jnp.concatenate([p, z0])
    fun = lambda x: loss(x[:2], x[2:])  # noqa: E731
    return np.array([(fun(x + eps * e) - fun(x - eps * e)) / (2 * eps) for e in np.eye(4)])


@pytest.mark.parametrize("name, mode", [("kvaerno3", "backprop"), ("kvaerno5", "backprop"),
                                        pytest.param("kvaerno5", "checkpoint", marks=pytest.mark.slow)])
def test_gradients_match_finite_differences(name, mode):
    loss = kinetics_loss(name, mode)
    grad = np.concatenate(jax.grad(loss, argnums=(0, 1))(P0, Z0))
    assert relative_error(grad, central(loss, P0, Z0)) < 1e-6


def test_forward_mode_backprop_matches_finite_differences():
    loss = kinetics_loss("kvaerno5", "backprop")
    direction = jnp.array([0.3, -1.0, 0.5, 2.0])
    _, tangent = jax.jvp(lambda x: loss(x[:2], x[2:]), (jnp.concatenate([P0, Z0]),), (direction,))
    expected = central(loss, P0, Z0) @ np.asarray(direction)
    np.testing.assert_allclose(tangent, expected, rtol=1e-6)


@pytest.mark.slow
def test_batched_adjoint_quadrature_over_the_stages():
    """``batched=True`` with the (default) adjoint accumulates the parameter adjoint by the
    quadrature over the method's nodes (its stages, weights b): against backprop."""
    z0s = jnp.stack([Z0, jnp.array([0.3, 0.9])])

    def loss(mode, p):
        ys = jaxode.odesolve(kinetics, z0s, TS, p, solver="kvaerno5", rtol=1e-10, atol=1e-10, gradient=mode,
                             batched=True, max_steps=20_000)
        return jnp.sum(ys**2)

    adjoint = jax.jit(jax.grad(lambda p: loss("adjoint", p)))(P0)
    exact = jax.jit(jax.grad(lambda p: loss("backprop", p)))(P0)
    assert relative_error(adjoint, exact) < 1e-5
