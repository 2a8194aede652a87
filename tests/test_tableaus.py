"""The Butcher tableaus: order conditions (all rooted trees), dense output, FSAL, validation,
and user-defined tableaus passed as ``solver=``."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ADAPTIVE_SOLVERS, FIXED_ORDERS, FSAL, STAGES

import jaxode
from jaxode.methods.tableaus import SOLVERS, ButcherTableau, get_solver

# --- rooted trees and elementary weights (Butcher's theory, independent of the library) ---


@functools.cache
def trees(order: int) -> tuple:
    """All rooted trees with ``order`` nodes; a tree is the sorted tuple of its subtrees."""
    if order == 1:
        return ((),)
    out = set()
    for children in _forests(order - 1, order - 1):
        out.add(tuple(sorted(children)))
    return tuple(sorted(out))


@functools.cache
def _forests(nodes: int, max_part: int) -> tuple:
    """Multisets of trees with ``nodes`` nodes in all (parts of size <= max_part, non-increasing)."""
    if nodes == 0:
        return ((),)
    out = []
    for size in range(min(nodes, max_part), 0, -1):
        for t in trees(size):
            for rest in _forests(nodes - size, size):
                if rest and _size(rest[0]) == size and rest[0] < t:
                    continue  # keep a canonical order among equal sizes
                out.append((t,) + rest)
    return tuple(out)


def _size(tree) -> int:
    return 1 + sum(_size(c) for c in tree)


def _gamma(tree) -> int:
    return _size(tree) * math.prod(_gamma(c) for c in tree)


def _stage_weights(A, tree):
    """The vector ``Φ_i(τ)`` over the stages: the product over the children σ of ``A Φ(σ)``."""
    v = np.ones(A.shape[0])
    for child in tree:
        v = v * (A @ _stage_weights(A, child))
    return v


def _matrix(tab: ButcherTableau, with_extra: bool = False):
    rows = [()] + list(tab.a) + (list(tab.extra_a) if with_extra else [])
    n = len(rows)
    A = np.zeros((n, n))
    for i, row in enumerate(rows):
        A[i, : len(row)] = row
    return A


def order_residuals(tab: ButcherTableau, weights, order: int, A=None):
    """``max |b·Φ(τ) - 1/γ(τ)|`` over all trees with exactly ``order`` nodes."""
    A = _matrix(tab) if A is None else A
    w = np.asarray(weights, dtype=np.float64)
    return max(abs(w @ _stage_weights(A, t) - 1.0 / _gamma(t)) for t in trees(order))


def test_tree_counts():
    # A049 numbers of rooted trees: the test's own machinery must be right.
    assert [len(trees(n)) for n in range(1, 9)] == [1, 1, 2, 4, 9, 20, 48, 115]


ORDERS = {**FIXED_ORDERS, "bosh3": 3, "dopri5": 5, "tsit5": 5, "dopri8": 8}
EMBEDDED_ORDERS = {"bosh3": 2, "dopri5": 4, "tsit5": 4, "dopri8": 5}


@pytest.mark.parametrize("name", list(ORDERS))
def test_order_conditions(name):
    tab = SOLVERS[name]
    assert tab.order == ORDERS[name]
    # Every tree up to the order: the quadrature conditions b·c^(k-1) = 1/k among them.
    tol = 1e-13
    for order in range(1, tab.order + 1):
        assert order_residuals(tab, tab.b, order) < tol, (name, order)
    # ... and the method is not of a higher order than claimed.
    assert order_residuals(tab, tab.b, tab.order + 1) > 1e-6
    # Row sums of a equal c.
    np.testing.assert_allclose(_matrix(tab).sum(axis=1), tab.c, rtol=0, atol=1e-14)


def test_quadrature_conditions_spelled_out():
    # The low-order conditions written out, for readers: sum b = 1, b·c = 1/2, b·c^2 = 1/3, b·Ac = 1/6.
    for name in ("rk4", "bosh3", "dopri5", "tsit5", "dopri8"):
        tab = SOLVERS[name]
        b, c, A = np.array(tab.b), np.array(tab.c), _matrix(tab)
        np.testing.assert_allclose([b.sum(), b @ c, b @ c**2, b @ (A @ c)], [1, 1 / 2, 1 / 3, 1 / 6],
                                   rtol=0, atol=1e-13)


@pytest.mark.parametrize("name", ADAPTIVE_SOLVERS)
def test_embedded_method_order(name):
    tab = SOLVERS[name]
    bhat = np.array(tab.b) - np.array(tab.b_error)
    # The embedded solution b̂ = b - b_error has order error_order (DOP853: the 5th-order one).
    for order in range(1, EMBEDDED_ORDERS[name] + 1):
        assert order_residuals(tab, bhat, order) < 1e-13, (name, order)
    assert order_residuals(tab, bhat, EMBEDDED_ORDERS[name] + 1) > 1e-6
    # The error weights sum to zero (b and b̂ are both consistent).
    assert abs(sum(tab.b_error)) < 1e-12
    if tab.b_error3 is not None:  # DOP853's 3rd-order estimate
        b3 = np.array(tab.b) - np.array(tab.b_error3)
        for order in range(1, 4):
            assert order_residuals(tab, b3, order) < 1e-13, order


def test_error_orders_set_controller():
    assert {n: SOLVERS[n].error_order for n in ADAPTIVE_SOLVERS} == {
        "bosh3": 2, "dopri5": 4, "tsit5": 4, "dopri8": 7}
    for name in FIXED_ORDERS:
        assert SOLVERS[name].error_order is None and not SOLVERS[name].adaptive
    for name in ADAPTIVE_SOLVERS:
        assert SOLVERS[name].adaptive


DENSE_ORDERS = {"dopri5": 4, "tsit5": 4, "dopri8": 7}


def _dense_weights(tab: ButcherTableau, theta: float) -> np.ndarray:
    """b_i(θ) = Σ_j D_ij φ_j(θ): φ_j = θ^(j+1), or for the nested form (Hairer's contd8)
    φ_0 = θ, φ_1 = θ(1-θ), φ_2 = θ²(1-θ), φ_3 = θ²(1-θ)², ..."""
    D = np.array(tab.dense)
    if tab.dense_nested:
        factors = [theta] + [(1 - theta) if j % 2 == 0 else theta for j in range(D.shape[1] - 1)]
        basis = np.cumprod(factors)
    else:
        basis = theta ** np.arange(1, D.shape[1] + 1)
    return D @ basis


@pytest.mark.parametrize("name", list(DENSE_ORDERS))
def test_dense_output_reproduces_b_at_theta_1(name):
    tab = SOLVERS[name]
    w = _dense_weights(tab, 1.0)
    s = tab.num_stages
    np.testing.assert_allclose(w[:s], tab.b, rtol=0, atol=1e-12)
    np.testing.assert_allclose(w[s:], 0.0, rtol=0, atol=1e-12)  # extra stages do not change y_new


@pytest.mark.parametrize("name", list(DENSE_ORDERS))
def test_dense_output_slopes_at_step_ends(name):
    """The interpolant is C1 across steps: its slope h·b'(θ)·k is f(t0, y0) = k_1 at θ = 0 and
    f(t1, y_new) at θ = 1 (the FSAL stage: c = 1 and its row of A is b). (b(0) = 0 holds for
    any coefficients, so the slopes are what checks them at θ = 0.)"""
    tab = SOLVERS[name]
    A, s = _matrix(tab, with_extra=True), tab.num_stages
    slope = lambda theta: _dense_weights(tab, theta + 1e-30j).imag / 1e-30  # complex step: exact
    fsal = [i for i in range(s) if np.allclose(A[i, :s], tab.b, rtol=0, atol=1e-15)]
    assert len(fsal) == 1
    np.testing.assert_allclose(slope(0.0), np.eye(len(A))[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(slope(1.0), np.eye(len(A))[fsal[0]], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(DENSE_ORDERS))
def test_dense_output_order_conditions(name):
    """The continuous weights b(θ) satisfy b(θ)·Φ(τ) = θ^|τ|/γ(τ) up to the interpolant's order."""
    tab = SOLVERS[name]
    A = _matrix(tab, with_extra=True)
    for theta in (0.3, 0.5, 0.8):
        w = _dense_weights(tab, theta)
        for order in range(1, DENSE_ORDERS[name] + 1):
            res = max(abs(w @ _stage_weights(A, t) - theta**order / _gamma(t)) for t in trees(order))
            assert res < 1e-13, (name, theta, order, res)
        order = DENSE_ORDERS[name] + 1  # and not of a higher order than claimed
        assert max(abs(w @ _stage_weights(A, t) - theta**order / _gamma(t)) for t in trees(order)) > 1e-6
    if tab.extra_c:
        np.testing.assert_allclose(A[tab.num_stages:].sum(axis=1), tab.extra_c, atol=1e-13)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_fsal_flags_and_stages(name):
    tab = SOLVERS[name]
    assert bool(tab.fsal) == FSAL[name]
    if name in STAGES:
        assert tab.num_stages == STAGES[name]
    if tab.fsal:  # the last stage is f at (t + h, y_new)
        assert tab.c[-1] == 1 and tab.b[-1] == 0
        np.testing.assert_allclose(tab.a[-1], tab.b[:-1], rtol=0, atol=0)


def test_heun_is_explicit_trapezoid_and_rk4_is_classic():
    heun, rk4 = SOLVERS["heun"], SOLVERS["rk4"]
    assert heun.c == (0.0, 1.0) and heun.a == ((1.0,),) and heun.b == (0.5, 0.5)
    assert rk4.c == (0.0, 0.5, 0.5, 1.0)
    np.testing.assert_allclose(rk4.b, [1 / 6, 1 / 3, 1 / 3, 1 / 6], rtol=1e-15)


def test_get_solver():
    assert get_solver("dopri5") is SOLVERS["dopri5"]
    tab = SOLVERS["rk4"]
    assert get_solver(tab) is tab
    with pytest.raises(ValueError, match="unknown solver") as err:
        get_solver("rk45")
    for name in SOLVERS:  # the message lists every valid name
        assert name in str(err.value)
    assert jaxode.ButcherTableau is ButcherTableau
    assert set(jaxode.SOLVERS) == set(FSAL)


def test_tableau_is_hashable_static():
    tab = SOLVERS["tsit5"]
    assert hash(tab) == hash(dataclasses.replace(tab))
    assert tab == dataclasses.replace(tab)


RALSTON = dict(name="ralston", order=2, c=(0.0, 2 / 3), a=((2 / 3,),), b=(1 / 4, 3 / 4))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(c=(0.1, 2 / 3)), "c must start with 0"),
        (dict(a=((2 / 3,), (0.1, 0.2))), "rows"),
        (dict(a=((0.5,),)), "sum to c"),
        (dict(b=(0.25, 0.5)), "sum to 1"),
        (dict(b=(1.0,)), "entries"),
        (dict(b_error=(0.1, -0.1)), "both b_error and error_order"),
        (dict(error_order=1), "both b_error and error_order"),
        (dict(b_error=(0.1, -0.1, 0.0), error_order=1), "b_error"),
        (dict(dense=((1.0,),)), "dense"),
        (dict(extra_c=(0.5,)), "extra_a"),
    ],
)
def test_invalid_tableaus_raise(change, match):
    with pytest.raises(ValueError, match=match):
        ButcherTableau(**{**RALSTON, **change})


def test_user_tableau_ralston_converges_with_order_2():
    ralston = ButcherTableau(**RALSTON)
    assert not ralston.adaptive and not ralston.fsal
    assert order_residuals(ralston, ralston.b, 2) < 1e-15

    def f(z, t, p):
        return -2.0 * t * z**2  # y = 1 / (1 + t^2): nonlinear and non-autonomous

    ts = jnp.array([0.0, 2.0])
    solve = jax.jit(lambda dt: jaxode.odesolve(f, jnp.array([1.0]), ts, solver=ralston, dt0=dt)[-1, 0])
    dts = np.array([0.1, 0.05, 0.025, 0.0125])
    errs = np.array([abs(float(solve(dt)) - 1 / 5) for dt in dts])
    orders = np.log2(errs[:-1] / errs[1:])
    assert np.all(np.abs(orders - 2) < 0.3), orders


def test_user_adaptive_tableau_heun_euler():
    """A user's embedded pair (Heun–Euler: 2nd order with a 1st-order estimate) runs adaptively
    and meets its tolerance."""
    heun_euler = ButcherTableau(name="heun_euler", order=2, c=(0.0, 1.0), a=((1.0,),), b=(0.5, 0.5),
                                b_error=(0.5 - 1.0, 0.5), error_order=1)
    ts = jnp.linspace(0.0, 3.0, 4)
    ys, info = jaxode.odesolve(lambda z, t, p: z * (1 - z), jnp.array([0.1]), ts, solver=heun_euler,
                               rtol=1e-7, atol=1e-7, full_output=True)
    np.testing.assert_allclose(ys[:, 0], 1 / (1 + 9 * np.exp(-np.asarray(ts))), rtol=0, atol=2e-6)
    assert int(info.num_steps) > 20  # a 2nd-order method needs many steps at 1e-7
