"""``odesolve`` end to end: convergence and accuracy against analytic and independent reference
solutions, pytrees, dtypes, time direction, jit, vmap, and the returned info."""

from __future__ import annotations

import ast
import inspect
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ADAPTIVE_SOLVERS, FIXED_ORDERS, FIXED_SOLVERS, logistic_exact, reference

import jaxode

# ---- fixed-step order of convergence -----------------------------------------------------------

CONVERGENCE_PROBLEMS = {
    # y' = -2 t y^2, y(0) = 1: y = 1 / (1 + t^2) (nonlinear, non-autonomous)
    "rational": (lambda z, t, p: -2.0 * t * z**2, 1.0, 3.0, 1.0 / 10.0),
    # the logistic equation y' = y (1 - y), y(0) = 0.1
    "logistic": (lambda z, t, p: z * (1 - z), 0.1, 4.0, float(logistic_exact(4.0))),
}


@pytest.mark.parametrize("problem", list(CONVERGENCE_PROBLEMS))
@pytest.mark.parametrize("name", FIXED_SOLVERS)
def test_fixed_step_order_of_convergence(name, problem):
    f, y0, t_end, y_end = CONVERGENCE_PROBLEMS[problem]
    solve = jax.jit(lambda dt: jaxode.odesolve(f, jnp.array([y0]), jnp.array([0.0, t_end]), solver=name,
                                               dt0=dt)[-1, 0])
    dts = 0.2 * 0.5 ** np.arange(4)
    errs = np.array([abs(float(solve(dt)) - y_end) for dt in dts])
    orders = np.log2(errs[:-1] / errs[1:])
    assert np.all(np.abs(orders - FIXED_ORDERS[name]) < 0.3), orders


# ---- adaptive solvers: analytic solutions ------------------------------------------------------

A_LIN = jnp.array([[-0.5, 2.0, 0.0], [-2.0, -0.5, 1.0], [0.0, 0.0, -0.2]])  # a damped spiral, non-normal
Z0_LIN = jnp.array([1.0, 0.5, -1.0])
TS_LIN = jnp.linspace(0.0, 5.0, 6)


def _errors_at_both_tolerances(solve, error_of):
    out = {}
    for tol in (1e-6, 1e-9):
        ys, info = solve(tol)
        assert int(info.status) == 0
        out[tol] = error_of(ys)
    return out


@pytest.mark.parametrize("name", ADAPTIVE_SOLVERS)
def test_linear_system_matches_matrix_exponential(name):
    solve = jax.jit(lambda tol: jaxode.odesolve(lambda z, t, A: A @ z, Z0_LIN, TS_LIN, A_LIN, solver=name,
                                                rtol=tol, atol=tol, full_output=True, max_steps=100_000))
    exact = np.stack([jax.scipy.linalg.expm(A_LIN * t) @ Z0_LIN for t in TS_LIN])
    errs = _errors_at_both_tolerances(solve, lambda ys: np.max(np.abs(np.asarray(ys) - exact)))
    for tol, err in errs.items():
        assert err < 20 * tol, (tol, err)
    assert errs[1e-9] < 0.05 * errs[1e-6]  # tighter tolerance, proportionally smaller error


def kepler(z, t, p):
    q, v = z[:2], z[2:]
    return jnp.concatenate([v, -q / jnp.sum(q**2) ** 1.5])


@pytest.mark.parametrize("name", ADAPTIVE_SOLVERS)
def test_kepler_orbit_closes_after_one_period(name):
    """An ellipse of eccentricity 0.3 (GM = 1, semi-major axis 1: period 2π), from periapsis:
    at half a period it is at apoapsis, after one period back at the start."""
    e = 0.3
    z0 = jnp.array([1 - e, 0.0, 0.0, np.sqrt((1 + e) / (1 - e))])
    apo = np.array([-(1 + e), 0.0, 0.0, -np.sqrt((1 - e) / (1 + e))])
    ts = jnp.array([0.0, np.pi, 2 * np.pi])
    solve = jax.jit(lambda tol: jaxode.odesolve(kepler, z0, ts, solver=name, rtol=tol, atol=tol,
                                                full_output=True, max_steps=100_000))
    exact = np.stack([np.asarray(z0), apo, np.asarray(z0)])
    errs = _errors_at_both_tolerances(solve, lambda ys: np.max(np.abs(np.asarray(ys) - exact)))
    # a global error over a whole orbit (the phase error grows along it): a bounded multiple
    for tol, err in errs.items():
        assert err < 200 * tol, (tol, err)
    assert errs[1e-9] < 0.05 * errs[1e-6]


# ---- adaptive solvers against scipy's DOP853 at rtol=1e-13 ------------------------------------------

PROBLEMS = {
    "van_der_pol": (lambda t, z: [z[1], (1 - z[0] ** 2) * z[1] - z[0]], [2.0, 0.0]),
    "lotka_volterra": (lambda t, z: [1.5 * z[0] - z[0] * z[1], -3.0 * z[1] + z[0] * z[1]], [1.0, 1.0]),
    "damped_pendulum": (lambda t, z: [z[1], -0.25 * z[1] - 5.0 * np.sin(z[0])], [np.pi - 0.1, 0.0]),
}
TS_REF = np.linspace(0.0, 10.0, 11)


def _switch_field(z, t, k):
    """The three problems in one field (k selects), so that one compiled solve serves them all."""
    return jax.lax.switch(k, [
        lambda z: jnp.stack([z[1], (1 - z[0] ** 2) * z[1] - z[0]]),
        lambda z: jnp.stack([1.5 * z[0] - z[0] * z[1], -3.0 * z[1] + z[0] * z[1]]),
        lambda z: jnp.stack([z[1], -0.25 * z[1] - 5.0 * jnp.sin(z[0])]),
    ], z)


@pytest.fixture(scope="module")
def references():
    return {name: reference(fun, y0, TS_REF) for name, (fun, y0) in PROBLEMS.items()}


@pytest.mark.parametrize("name", ADAPTIVE_SOLVERS)
def test_agrees_with_scipy_dop853(name, references):
    solve = jax.jit(lambda z0, k, tol: jaxode.odesolve(_switch_field, z0, jnp.asarray(TS_REF), k, solver=name,
                                                       rtol=tol, atol=tol, full_output=True,
                                                       max_steps=100_000))
    for k, (problem, (_, y0)) in enumerate(PROBLEMS.items()):
        ref = references[problem]
        errs = {}
        for tol in (1e-6, 1e-9):
            ys, info = solve(jnp.asarray(y0), k, tol)
            assert int(info.status) == 0
            errs[tol] = np.max(np.abs(np.asarray(ys) - ref)) / (1 + np.max(np.abs(ref)))
            assert errs[tol] < 30 * tol, (problem, tol, errs[tol])
        assert errs[1e-9] < 0.05 * errs[1e-6], (problem, errs)


# ---- states, dtypes, time direction ----------------------------------------------------------------


def test_pytree_state_of_mixed_shapes():
    z0 = {"x": jnp.array([1.0, 2.0]), "m": (jnp.arange(6.0).reshape(2, 3), jnp.array(0.5))}

    def f(z, t, p):
        x, (m, s) = z["x"], z["m"]
        return {"x": -x, "m": (-p["rate"] * m, -2.0 * s + jnp.sum(x))}

    ts = jnp.linspace(0.0, 2.0, 5)
    ys, info = jaxode.odesolve(f, z0, ts, {"rate": 0.5}, rtol=1e-10, atol=1e-10, full_output=True)
    assert set(ys) == {"x", "m"} and isinstance(ys["m"], tuple)
    assert ys["x"].shape == (5, 2) and ys["m"][0].shape == (5, 2, 3) and ys["m"][1].shape == (5,)
    t = np.asarray(ts)
    np.testing.assert_allclose(ys["x"], np.exp(-t)[:, None] * np.array([1.0, 2.0]), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(ys["m"][0], np.exp(-0.5 * t)[:, None, None] * np.arange(6.0).reshape(2, 3),
                               rtol=1e-8, atol=1e-10)
    # s' = -2 s + 3 e^{-t}: s = 0.5 e^{-2t} + 3 (e^{-t} - e^{-2t})
    np.testing.assert_allclose(ys["m"][1], 0.5 * np.exp(-2 * t) + 3 * (np.exp(-t) - np.exp(-2 * t)),
                               rtol=1e-8, atol=1e-10)
    assert int(info.status) == 0


def _float32_oscillator(name, num_out, **opts):
    z0 = jnp.array([1.0, 0.0], dtype=jnp.float32)
    ts = jnp.linspace(0.0, 6.0, num_out, dtype=jnp.float32)
    f = lambda z, t, p: jnp.stack([z[1], -z[0]])
    ys, info = jaxode.odesolve(f, z0, ts, solver=name, rtol=1e-6, atol=1e-6, full_output=True, **opts)
    t64 = np.asarray(ts, np.float64)
    exact = np.stack([np.cos(t64), -np.sin(t64)], axis=1)
    return ys, info, np.max(np.abs(np.asarray(ys, np.float64) - exact))


@pytest.mark.parametrize("name, opts", [("tsit5", {}), ("dopri5", {}), ("rk4", {"dt0": 0.05})])
def test_float32_end_to_end(name, opts):
    ys, info, err = _float32_oscillator(name, 50, **opts)
    assert ys.dtype == jnp.float32
    assert int(info.status) == 0
    assert err < 2e-5, err


def test_float32_dopri8_dense_output():
    ys, info, err = _float32_oscillator("dopri8", 50)
    assert ys.dtype == jnp.float32 and int(info.status) == 0
    assert err < 2e-5, err


def test_float32_pytree_keeps_each_dtype():
    z0 = (jnp.array([1.0], dtype=jnp.float32), jnp.array([[2.0, 3.0]], dtype=jnp.float32))
    ys = jaxode.odesolve(lambda z, t, p: (-z[0], -2 * z[1]), z0, jnp.array([0.0, 1.0], dtype=jnp.float32))
    assert ys[0].dtype == jnp.float32 and ys[1].dtype == jnp.float32
    np.testing.assert_allclose(ys[1][-1], np.exp(-2.0) * np.array([[2.0, 3.0]]), rtol=2e-5)


@pytest.mark.parametrize("name", ["tsit5", "rk4"])
def test_decreasing_ts_solves_backwards(name):
    f = lambda z, t, p: z * (1 - z)
    ts_fwd = jnp.array([0.0, 1.5, 3.0, 8.0])
    opts = dict(solver=name, rtol=1e-10, atol=1e-10, dt0=0.01 if name == "rk4" else None)
    solve = jax.jit(lambda z0, ts: jaxode.odesolve(f, z0, ts, **opts))
    back = solve(jnp.array([logistic_exact(8.0)]), ts_fwd[::-1])
    np.testing.assert_allclose(back[:, 0], logistic_exact(np.asarray(ts_fwd[::-1])), rtol=0, atol=1e-8)
    # the forward solve reversed: the backward solve from its end reproduces it
    fwd = solve(jnp.array([0.1]), ts_fwd)
    again = solve(fwd[-1], ts_fwd[::-1])
    np.testing.assert_allclose(again[::-1], fwd, rtol=0, atol=1e-8)


def test_single_interval_and_first_output_is_z0():
    z0 = jnp.array([0.8, 0.3])
    ys, info = jaxode.odesolve(lambda z, t, p: -2.0 * t * z**2, z0, jnp.array([0.5, 2.5]), rtol=1e-10,
                               atol=1e-10, full_output=True)
    assert ys.shape == (2, 2)
    np.testing.assert_array_equal(ys[0], z0)
    exact = 1.0 / (2.5**2 + 1.0 / np.asarray(z0) - 0.5**2)
    np.testing.assert_allclose(ys[1], exact, rtol=1e-8)
    assert int(info.num_steps) >= 3


def test_equinox_module_field_with_its_own_weights():
    class Linear(eqx.Module):
        weight: jax.Array

        def __call__(self, z, t, params):
            return self.weight @ z

    ys = jaxode.odesolve(Linear(A_LIN), Z0_LIN, TS_LIN, rtol=1e-10, atol=1e-10)
    exact = np.stack([jax.scipy.linalg.expm(A_LIN * t) @ Z0_LIN for t in TS_LIN])
    np.testing.assert_allclose(ys, exact, atol=1e-8)


def test_documented_defaults():
    params = inspect.signature(jaxode.odesolve).parameters
    expected = dict(solver="tsit5", rtol=1e-6, atol=1e-6, dt0=None, max_steps=4096, gradient="adjoint",
                    throw=True, full_output=False)
    assert {k: params[k].default for k in expected} == expected
    documented = _documented_defaults(jaxode.odesolve.__doc__)
    for name in (*expected, "adjoint_seminorm", "batched"):  # the docstring states each default
        assert name in documented, name
        assert documented[name] == params[name].default, (name, documented[name])


def _documented_defaults(doc: str) -> dict:
    """``{option: default}`` as stated in the entries of a docstring's ``Args:`` section
    ("default ``1e-6``", "(default 4096)", "``"tsit5"`` (default)"), parsed as literals."""
    args = doc.split("Args:")[1].split("Returns:")[0]
    entries = re.split(r"\n {8}(?=\w+(?:, \w+)*: )", args)
    found = {}
    for entry in entries:
        names, _, text = entry.partition(": ")
        text = " ".join(text.split())
        m = (re.search(r"default[: ]+``([^`]+)``", text, re.I) or re.search(r"\(default (\S+?)\)", text)
             or re.search(r"``([^`]+)`` \(default\)", text))
        if m:
            for name in names.split(", "):
                found[name.strip()] = ast.literal_eval(m.group(1))
    return found


def test_full_output_info():
    ys, info = jaxode.odesolve(lambda z, t, p: -z, jnp.array([1.0]), jnp.array([0.0, 1.0]), full_output=True)
    for field in ("num_steps", "num_accepted", "num_rejected", "nfe", "status"):
        value = getattr(info, field)
        assert isinstance(value, jax.Array) and value.shape == () and jnp.issubdtype(value.dtype, jnp.integer)
    assert int(info.num_steps) == int(info.num_accepted) + int(info.num_rejected) > 0
    assert int(info.status) == 0 and int(info.nfe) > int(info.num_steps)
    assert isinstance(info, jaxode.Info)
    np.testing.assert_allclose(ys[-1, 0], np.exp(-1.0), rtol=1e-5)


# ---- jit: traced tolerances and step do not recompile ----------------------------------------------


def test_traced_rtol_atol_dt0_do_not_recompile():
    traces = []
    f = lambda z, t, p: jnp.stack([z[1], (1 - z[0] ** 2) * z[1] - z[0]])

    @jax.jit
    def solve(z0, rtol, atol, dt0):
        traces.append(None)
        return jaxode.odesolve(f, z0, jnp.array([0.0, 5.0]), rtol=rtol, atol=atol, dt0=dt0, full_output=True)

    ref = reference(lambda t, z: [z[1], (1 - z[0] ** 2) * z[1] - z[0]], [2.0, 0.0], [0.0, 5.0])[-1]
    z0 = jnp.array([2.0, 0.0])
    runs = [solve(z0, 1e-4, 1e-4, 0.1), solve(z0, 1e-9, 1e-9, 0.1), solve(z0, 1e-9, 1e-9, 1e-3),
            solve(z0 + 0.0, 1e-6, 1e-8, 0.01)]
    assert len(traces) == 1
    steps = [int(info.num_steps) for _, info in runs]
    errs = [np.max(np.abs(np.asarray(ys[-1]) - ref)) for ys, _ in runs]
    assert steps[1] > 2 * steps[0]  # the traced tolerance is really used
    assert errs[1] < 1e-3 * errs[0]
    assert steps[2] != steps[1]  # ... and the traced first step
    assert len(traces) == 1


def test_traced_fixed_step_does_not_recompile():
    traces = []

    @jax.jit
    def solve(dt0):
        traces.append(None)
        return jaxode.odesolve(lambda z, t, p: -z, jnp.array([1.0]), jnp.array([0.0, 1.0]), solver="rk4",
                               dt0=dt0, full_output=True)

    for dt0, n in ((0.1, 10), (0.3, 4), (0.25, 4), (0.7, 2)):
        ys, info = solve(dt0)
        assert int(info.num_steps) == n
        np.testing.assert_allclose(ys[-1, 0], np.exp(-1.0), rtol=0.1 * dt0**4)
    assert len(traces) == 1


# ---- vmap ----------------------------------------------------------------------------------------------


def _vdp(z, t, mu):
    return jnp.stack([z[1], mu * (1 - z[0] ** 2) * z[1] - z[0]])


@pytest.fixture(scope="module")
def vdp_solve():
    return jax.jit(lambda z0, mu, ts: jaxode.odesolve(_vdp, z0, ts, mu, rtol=1e-8, atol=1e-8,
                                                      full_output=True))


@pytest.mark.parametrize("axes", [(0, None, None), (None, 0, None), (None, None, 0)],
                         ids=["z0", "params", "ts"])
def test_vmap_equals_python_loop(vdp_solve, axes):
    z0 = jnp.array([[2.0, 0.0], [0.5, 1.0], [-1.0, 0.3]])
    mu = jnp.array([1.0, 25.0, 0.2])  # mu = 25: stiff-ish, many more steps
    ts = jnp.array([[0.0, 1.0, 4.0], [0.0, 2.0, 6.0], [-1.0, 0.0, 3.0]])
    batched = jax.jit(jax.vmap(vdp_solve, in_axes=axes))
    args = [a if ax == 0 else a[0] for a, ax in zip((z0, mu, ts), axes)]
    ys, info = batched(*args)
    assert ys.shape == (3, 3, 2) and info.num_steps.shape == (3,)
    for i in range(3):
        one = [a[i] if ax == 0 else a for a, ax in zip(args, axes)]
        ys_i, info_i = vdp_solve(*one)
        np.testing.assert_allclose(ys[i], ys_i, rtol=1e-12, atol=1e-14)
        for field in ("num_steps", "num_accepted", "num_rejected", "nfe", "status"):
            assert int(getattr(info, field)[i]) == int(getattr(info_i, field)), (i, field)
    assert len(set(np.asarray(info.num_steps).tolist())) > 1  # each element has its own step count
    if axes[1] == 0:
        assert int(info.num_steps[1]) > 1.3 * int(info.num_steps[0])  # the stiff-ish element


# ---- states of every kind: Python numbers, lists, NumPy, empty, complex ----------------------------

TS_DECAY = jnp.array([0.0, 0.5, 1.0])
DECAY = np.exp(-np.asarray(TS_DECAY))


@pytest.mark.parametrize("z0", [1.0, 1, np.float64(1.0), np.array([1.0]), [1.0, 2.0], (1.0, {"b": 2.0})],
                         ids=["float", "int", "np-scalar", "np-array", "list", "nested"])
def test_python_and_numpy_states(z0):
    ys = jaxode.odesolve(lambda z, t, p: jax.tree_util.tree_map(lambda x: -x, z), z0, TS_DECAY,
                         rtol=1e-10, atol=1e-10)
    for y, x in zip(jax.tree_util.tree_leaves(ys), jax.tree_util.tree_leaves(z0), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.multiply.outer(DECAY, np.asarray(x, float)), rtol=1e-8)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_empty_state_returns_at_once(batched, gradient):
    z0 = jnp.zeros((3, 0)) if batched else jnp.zeros((0,))
    ys, info = jaxode.odesolve(lambda z, t, p: -z, z0, TS_DECAY, max_steps=4, batched=batched,
                               gradient=gradient, full_output=True)
    assert ys.shape == ((3, 3, 0) if batched else (3, 0))
    assert np.all(np.asarray(info.status) == 0) and np.all(np.asarray(info.num_steps) == 0)
    grad = jax.grad(lambda z0: jnp.sum(jaxode.odesolve(lambda z, t, p: -z, z0, TS_DECAY, batched=batched,
                                                       gradient=gradient)))(z0)
    assert grad.shape == z0.shape


W_COMPLEX, DAMP = 2.0, 0.1


def _complex_field(z, t, w):
    return (-1j * w - DAMP) * z  # z(t) = exp((-i w - damp) t) z0


@pytest.mark.parametrize("dtype", [jnp.complex64, jnp.complex128])
def test_complex_state_matches_the_exponential(dtype):
    z0 = jnp.array([1.0 + 0.5j, -0.3j], dtype)
    tol = 1e-5 if dtype == jnp.complex64 else 1e-10
    w = jnp.asarray(W_COMPLEX, z0.real.dtype)
    ys = jaxode.odesolve(_complex_field, z0, TS_LIN, w, rtol=tol, atol=tol)
    assert ys.dtype == dtype
    exact = np.exp((-1j * W_COMPLEX - DAMP) * np.asarray(TS_LIN))[:, None] * np.asarray(z0)
    np.testing.assert_allclose(np.asarray(ys), exact, atol=50 * tol)


@pytest.mark.parametrize("gradient", ["adjoint", "backprop", "checkpoint"])
def test_complex_state_gradients_follow_jax_conventions(gradient):
    z0, t1, weight = jnp.array([1.0 + 0.5j]), TS_LIN[-1], 0.3 - 0.7j

    def loss(z0, w):
        ys = jaxode.odesolve(_complex_field, z0, TS_LIN, w, rtol=1e-11, atol=1e-11, gradient=gradient)
        return jnp.real(ys[-1, 0] * weight)

    def exact(z0, w):
        return jnp.real(z0[0] * jnp.exp((-1j * w - DAMP) * t1) * weight)

    got = jax.grad(loss, argnums=(0, 1))(z0, W_COMPLEX)
    want = jax.grad(exact, argnums=(0, 1))(z0, W_COMPLEX)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(want[0]), rtol=1e-7)
    np.testing.assert_allclose(float(got[1]), float(want[1]), rtol=1e-7)


# ---- eager calls run a cached compiled solve ----------------------------------------------------


def test_repeated_eager_calls_trace_the_field_once():
    traces = []

    def f(z, t, k):
        traces.append(None)  # runs when f is traced, not when the compiled solve runs
        return -k * z

    first = jaxode.odesolve(f, jnp.ones(2), TS_DECAY, jnp.asarray(1.0))
    count = len(traces)
    for k in (1.0, 2.0, 3.0):  # new parameter values and tolerances: the same compiled solve
        ys = jaxode.odesolve(f, jnp.ones(2), TS_DECAY, jnp.asarray(k), rtol=1e-7 * k)
        np.testing.assert_allclose(np.asarray(ys[:, 0]), np.exp(-k * np.asarray(TS_DECAY)), rtol=1e-5)
    assert len(traces) == count, "an eager call with the same f, shapes and options traced f again"
    np.testing.assert_allclose(np.asarray(first[:, 0]), DECAY, rtol=1e-5)


def test_eager_cache_keys_python_numbers_by_type_and_falls_back_when_unhashable():
    """The compiled-solve cache keys a Python number in ``params`` by type and value: ``2`` and
    ``2.0`` (equal, the same hash) are two compiled solves, and ``f`` sees the type it was
    given. A non-array leaf that cannot be hashed solves without the cache, correctly."""
    seen = []

    def f(z, t, k):
        seen.append(type(k))
        return -k * z

    ts = jnp.array([0.0, 0.5])
    for k in (2, 2.0):
        ys = jaxode.odesolve(f, jnp.ones(1), ts, k)
        np.testing.assert_allclose(np.asarray(ys)[-1], np.exp(-1.0), rtol=1e-5)
    assert set(seen) == {int, float}

    class Rate:  # not hashable: defines __eq__ without __hash__
        def __init__(self, k):
            self.k = k

        def __eq__(self, other):
            return isinstance(other, Rate) and other.k == self.k

    ys = jaxode.odesolve(lambda z, t, r: -r.k * z, jnp.ones(1), ts, Rate(2.0))
    np.testing.assert_allclose(np.asarray(ys)[-1], np.exp(-1.0), rtol=1e-5)
