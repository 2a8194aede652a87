"""Rosenbrock methods: linearly implicit one-step methods for stiff problems.

With ``s`` stages, from ``(t, y)`` by ``h``, ``J = ∂f/∂y (y, t)`` and ``f_t = ∂f/∂t (y, t)``
(both exact, from JAX, once per step), the method solves ``s`` linear systems with one matrix
(Hairer & Wanner, *Solving ODEs II*, IV.7, in their transformed form (7.25))::

    (I - γ h J) u_i = γ h f(y + Σ_{j<i} a_ij u_j, t + α_i h) + γ Σ_{j<i} c_ij u_j + γ γ_i h² f_t
    y_new = y + Σ_i m_i u_i                         (order p)
    err   = Σ_i e_i u_i,   e = m - m̂                 (m̂: the embedded method)

so a step costs one Jacobian, one LU factorisation of ``I - γ h J`` (``(n, n)``, reused by
all stages) and ``s`` triangular solves; no Newton iteration. The untransformed form
``k_i = h f(y + Σ α_ij k_j) + h J Σ_{j≤i} γ_ij k_j + γ_i h² f_t``, ``y_new = y + Σ b_i k_i``
(whose coefficients the order conditions are written in) is the same method with
``u = Γ k``, ``a = A Γ⁻¹``, ``c = diag(1/γ) - Γ⁻¹``, ``m = b Γ⁻¹``.

The dense output is linear in the stage increments: ``y(t + θh) = y + Σ_j θ^j C_j`` with
``C_j = Σ_i D_ji u_i`` (``RosenbrockTableau.dense``).

The named methods (data below):

================  =====  ==============  ===========================================
name              order  error estimate  dense output
================  =====  ==============  ===========================================
``rosenbrock23``  2      3rd order       Shampine & Reichelt's (quadratic, 2nd order)
``rodas5p``       5      4th order       Steinebach's (quartic, 4th order)
================  =====  ==============  ===========================================

``rosenbrock23``: Shampine & Reichelt, *The MATLAB ODE suite*, SIAM J. Sci. Comput. 18 (1997)
(``ode23s``): ``d = 1/(2 + √2)``, L-stable, its error estimated against a 3rd-order solution
(the error of the 2nd-order one is controlled; no local extrapolation). Its last stage is
``f(y_new, t + h)`` (first same as last). ``rodas5p``: Steinebach, *Construction of
Rosenbrock–Wanner method Rodas5P and numerical benchmarks within the Julia Differential
Equations package*, BIT 63 (2023): 8 stages, stiffly accurate, L-stable; its coefficients as
published (and as in OrdinaryDiffEq.jl's Rosenbrock tableaus).

Costs, counted in ``Info``: one Jacobian per step attempt (``num_jacobians``; ``∂f/∂y`` and
``∂f/∂t`` together, one ``jax.vmap`` of ``n + 1`` forward-mode JVPs of ``f``: roughly ``n + 1``
evaluations' worth, *not* counted in ``nfe``); ``nfe`` counts the plain evaluations of ``f``:
``s - 1`` stages (the first is the loop's ``f(y, t)``) plus ``f(y_new, t + h)`` unless the last
stage is it (``rodas5p``: 8 a step, ``rosenbrock23``: 2). The Jacobian is dense ``(n, n)`` and
its LU costs ``O(n³)``: sensible up to a few hundred state components; a batch of small
systems belongs in ``jax.vmap`` or ``batched=True`` (a Jacobian per sample), not in one big
state. A step whose state or error is not finite (a singular ``I - γ h J``, an overflow) is
rejected by the loop and retried with a smaller step.

Quadrature (``StepResult.nodes``, for the batched adjoint's parameter integral): Simpson's rule
on the step, ``h (g(y) + 4 g(y(t + h/2)) + g(y_new)) / 6``, with the midpoint state from the
dense output: exact for cubics in ``t``, so its error per step is ``O(h⁵)`` plus ``h`` times
the dense output's error there (``O(h⁵)`` for ``rodas5p``, ``O(h³)`` for ``rosenbrock23``):
the quadrature keeps each method's global order (4 and 2 at least).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from .. import control
from ..interpolation import evaluate
from .base import Field, Method, StepResult
from .explicit import weighted_sum
from .lu import factor as lu_factor
from .lu import solve as lu_solve

__all__ = ["Rosenbrock", "RosenbrockTableau", "ROSENBROCK_TABLEAUS"]


def _rows(matrix) -> tuple[tuple[float, ...], ...]:
    """The strictly lower triangle of a square matrix as ragged rows (rows 1 .. s-1)."""
    m = np.asarray(matrix, dtype=np.float64)
    return tuple(tuple(float(x) for x in m[i, :i]) for i in range(1, m.shape[0]))


def _lower_inverse(L) -> np.ndarray:
    """The inverse of a lower-triangular matrix by forward substitution (exactly lower)."""
    n = L.shape[0]
    inv = np.zeros_like(L)
    for j in range(n):
        inv[j, j] = 1 / L[j, j]
        for i in range(j + 1, n):
            inv[i, j] = -(L[i, j:i] @ inv[j:i, j]) / L[i, i]
    return inv


@dataclasses.dataclass(frozen=True)
class RosenbrockTableau:
    """The coefficients of a Rosenbrock method in the transformed form (module docstring).

    Attributes:
        name: a label used in messages.
        order: the order ``p`` of ``y_new``.
        error_order: the order ``q`` of the embedded solution (the estimate behaves like
            ``h^(q+1)``, or ``h^(p+1)`` when the embedded solution is the more accurate one).
        gamma: the diagonal ``γ``.
        a: ``a_ij``, ``s - 1`` rows, row ``i`` (stage ``i + 1``) holding ``i + 1`` entries.
        c: ``c_ij``, rows as ``a``.
        alpha: the ``s`` stage times ``α_i`` (``t + α_i h``).
        gamma_sum: the ``s`` factors ``γ_i = Σ_{j≤i} γ_ij`` of ``h² f_t``.
        m: the ``s`` weights of ``y_new``.
        m_error: the ``s`` weights ``m - m̂`` of the error estimate.
        dense: ``D``, ``degree`` rows of ``s``: ``C_j = Σ_i D_ji u_i``.
    """

    name: str
    order: int
    error_order: int
    gamma: float
    a: tuple[tuple[float, ...], ...]
    c: tuple[tuple[float, ...], ...]
    alpha: tuple[float, ...]
    gamma_sum: tuple[float, ...]
    m: tuple[float, ...]
    m_error: tuple[float, ...]
    dense: tuple[tuple[float, ...], ...]

    def __post_init__(self):
        s = len(self.alpha)
        for label, rows in (("a", self.a), ("c", self.c)):
            if len(rows) != s - 1 or any(len(row) != i + 1 for i, row in enumerate(rows)):
                raise ValueError(f"tableau {self.name!r}: {label} needs {s - 1} rows, row i holding i + 1")
        for label in ("gamma_sum", "m", "m_error"):
            if len(getattr(self, label)) != s:
                raise ValueError(f"tableau {self.name!r}: {label} must have {s} entries")
        if any(len(row) != s for row in self.dense):
            raise ValueError(f"tableau {self.name!r}: each row of dense must have {s} entries")

    @property
    def num_stages(self) -> int:
        return len(self.alpha)

    @property
    def fsal(self) -> bool:
        """Whether the last stage is evaluated at ``(y_new, t + h)`` (first same as last)."""
        return self.alpha[-1] == 1 and self.m[-1] == 0 and tuple(self.m[:-1]) == self.a[-1]

    @classmethod
    def from_standard(cls, name, order, error_order, alpha, Gamma, b, b_hat, dense_k) -> RosenbrockTableau:
        """The transformed tableau of a method given in the untransformed form: ``alpha``
        ``(s, s)`` strictly lower, ``Gamma`` ``(s, s)`` lower with ``γ`` on its diagonal, the
        weights ``b`` and ``b_hat``, and the dense output ``dense_k`` in terms of ``k``."""
        A, G = np.asarray(alpha, np.float64), np.asarray(Gamma, np.float64)
        G_inv = _lower_inverse(G)
        gamma = float(G[0, 0])
        return cls(
            name=name, order=order, error_order=error_order, gamma=gamma,
            a=_rows(A @ G_inv), c=_rows(np.diag(1 / np.diag(G)) - G_inv),
            alpha=tuple(float(x) for x in A.sum(axis=1)), gamma_sum=tuple(float(x) for x in G.sum(axis=1)),
            m=tuple(float(x) for x in np.asarray(b) @ G_inv),
            m_error=tuple(float(x) for x in (np.asarray(b) - np.asarray(b_hat)) @ G_inv),
            dense=tuple(tuple(float(x) for x in row) for row in np.asarray(dense_k) @ G_inv),
        )


def _rosenbrock23() -> RosenbrockTableau:
    """Shampine & Reichelt's ode23s written as a Rosenbrock method with exact Jacobian.

    Their step, with ``W = I - h d J``: ``k1 = W⁻¹(F0 + h d T)``, ``F1 = f(y + h k1/2)``,
    ``k2 = W⁻¹(F1 - k1) + k1``, ``y_new = y + h k2``, ``F2 = f(y_new)``,
    ``k3 = W⁻¹(F2 - e32 (k2 - F1) - 2 (k1 - F0) + h d T)``, ``err = h (k1 - 2 k2 + k3) / 6``;
    eliminating ``F0``, ``F1`` with the stage equations gives ``K = h k`` in the standard form
    with ``α21 = 1/2``, ``α32 = 1``, ``γ21 = -d``, ``γ31 = d (e32 - 2)``, ``γ32 = -e32 d``,
    ``b = (0, 1, 0)``, ``b̂ = (1/6, 2/3, 1/6)``; the dense output
    ``y + (θ(1-θ) K1 + θ(θ-2d) K2) / (1 - 2d)``.
    """
    d = 1 / (2 + math.sqrt(2))
    e32 = 6 + math.sqrt(2)
    alpha = [[0, 0, 0], [0.5, 0, 0], [0, 1, 0]]
    Gamma = [[d, 0, 0], [-d, d, 0], [d * (e32 - 2), -e32 * d, d]]
    dense_k = np.array([[1, -2 * d, 0], [-1, 1, 0]]) / (1 - 2 * d)
    return RosenbrockTableau.from_standard(
        "rosenbrock23", 2, 2, alpha, Gamma, [0, 1, 0], [1 / 6, 2 / 3, 1 / 6], dense_k
    )


def _rodas5p() -> RosenbrockTableau:
    """Steinebach's Rodas5P (BIT 2023), transformed form as published.

    Stages 7 and 8 are evaluated at ``t + h`` from the previous stage's argument plus its
    increment (``a_7 = (a_6, 1)``, ``a_8 = (a_6, 1, 1)``), ``y_new`` is stage 8's argument
    plus ``u_8`` (stiffly accurate) and the error estimate is ``u_8``. The published dense
    output is ``(1-θ) y + θ (y_new + (1-θ)(k1 + θ (k2 + θ k3)))`` with ``k_j = Σ_i H_ji u_i``;
    in powers of θ: ``C_1 = y_new - y + k1``, ``C_2 = k2 - k1``, ``C_3 = k3 - k2``, ``C_4 = -k3``.
    """
    a6 = (-7.502846399306121, 2.561846144803919, -11.627539656261098, -0.18268767659942256,
          0.030198172008377946)
    a = (
        (3.0,),
        (2.849394379747939, 0.45842242204463923),
        (-6.954028509809101, 2.489845061869568, -10.358996098473584),
        (2.8029986275628964, 0.5072464736228206, -0.3988312541770524, -0.04721187230404641),
        a6,
        a6 + (1.0,),
        a6 + (1.0, 1.0),
    )
    c = (
        (-14.155112264123755,),
        (-17.97296035885952, -2.859693295451294),
        (147.12150275711716, -1.41221402718213, 71.68940251302358),
        (165.43517024871676, -0.4592823456491126, 42.90938336958603, -5.961986721573306),
        (24.854864614690072, -3.0009227002832186, 47.4931110020768, 5.5814197821558125,
         -0.6610691825249471),
        (30.91273214028599, -3.1208243349937974, 77.79954646070892, 34.28646028294783,
         -19.097331116725623, -28.087943162872662),
        (37.80277123390563, -3.2571969029072276, 112.26918849496327, 66.9347231244047,
         -40.06618937091002, -54.66780262877968, -9.48861652309627),
    )
    H = np.array([
        [25.948786856663858, -2.5579724845846235, 10.433815404888879, -2.3679251022685204,
         0.524948541321073, 1.1241088310450404, 0.4272876194431874, -0.17202221070155493],
        [-9.91568850695171, -0.9689944594115154, 3.0438037242978453, -24.495224566215796,
         20.176138334709044, 15.98066361424651, -6.789040303419874, -6.710236069923372],
        [11.419903575922262, 2.8879645146136994, 72.92137995996029, 80.12511834622643,
         -52.072871366152654, -59.78993625266729, -0.15582684282751913, 4.883087185713722],
    ])
    m = np.array(a6 + (1.0, 1.0, 1.0))
    dense = np.stack([m + H[0], H[1] - H[0], H[2] - H[1], -H[2]])
    gamma = 0.21193756319429014
    return RosenbrockTableau(
        name="rodas5p", order=5, error_order=4, gamma=gamma, a=a, c=c,
        alpha=(0.0, 0.6358126895828704, 0.4095798393397535, 0.9769306725060716,
               0.4288403609558664, 1.0, 1.0, 1.0),
        gamma_sum=(gamma, -0.42387512638858027, -0.3384627126235924, 1.8046452872882734,
                   2.325825639765069, 0.0, 0.0, 0.0),
        m=tuple(float(x) for x in m), m_error=(0.0,) * 7 + (1.0,),
        dense=tuple(tuple(float(x) for x in row) for row in dense),
    )


ROSENBROCK_TABLEAUS: dict[str, RosenbrockTableau] = {
    tab.name: tab for tab in (_rosenbrock23(), _rodas5p())
}


def derivatives(field: Field, t, y) -> tuple[Array, Array]:
    """``J = ∂f/∂y`` ``(n, n)`` and ``f_t = ∂f/∂t`` ``(n,)`` at ``(y, t)``, in ``y``'s dtype: one
    ``jax.vmap`` of ``n + 1`` forward-mode JVPs (the last one along ``t``)."""
    n = y.shape[0]
    t = jnp.asarray(t)
    y_dirs = jnp.concatenate([jnp.eye(n, dtype=y.dtype), jnp.zeros((1, n), y.dtype)])
    t_dirs = jnp.zeros((n + 1,), t.dtype).at[n].set(1)
    jvp = lambda dy, dt: jax.jvp(field, (y, t), (dy, dt))[1]
    columns = jax.vmap(jvp)(y_dirs, t_dirs).astype(y.dtype)  # (n + 1, n): row j = ∂f/∂x_j
    return columns[:n].T, columns[n]


SIMPSON_WEIGHTS = (1 / 6, 2 / 3, 1 / 6)


def simpson_nodes(t, y, h, t_end, coefficients, y_new) -> tuple[Array, Array]:
    """The nodes of Simpson's rule on a step, ``(y, y(t + h/2), y_new)`` ``(3, n)`` at
    ``(t, t + h/2, t_end)``, the midpoint from the dense output ``coefficients``."""
    t_mid = jnp.minimum(t + 0.5 * h, t_end)
    return jnp.stack([y, evaluate(y, coefficients, 0.5), y_new]), jnp.stack([t, t_mid, t_end])


@dataclasses.dataclass(frozen=True)
class Rosenbrock(Method):
    """The ``Method`` of a Rosenbrock tableau (see the module docstring)."""

    tableau: RosenbrockTableau

    adaptive = True
    implicit = True
    interpolant_nfe = 0
    quadrature_weights = SIMPSON_WEIGHTS
    name = property(lambda self: self.tableau.name)
    order = property(lambda self: self.tableau.order)
    error_order = property(lambda self: self.tableau.error_order)
    num_stages = property(lambda self: self.tableau.num_stages)

    def step(self, field: Field, t, y, h, f0, state, t_end) -> StepResult:
        """One step: the Jacobian and ``f_t`` at ``(y, t)``, one LU, ``s`` stages; ``dense``
        holds the interpolant's coefficients ``(degree, n)``. The stage increments and the
        linear algebra are in ``control.error_dtype`` (the state's dtype, at least float32),
        the stages' states in the state's dtype."""
        return self.step_with_jacobian(field, t, y, h, f0, state, t_end)[0]

    def step_with_jacobian(self, field: Field, t, y, h, f0, state, t_end) -> tuple[StepResult, Array]:
        """``step``, and the Jacobian ``∂f/∂y (y, t)`` it used (for a stiffness estimate)."""
        tab = self.tableau
        ld = control.error_dtype(y.dtype)  # linear algebra in at least float32 (no float16 LU)
        y_l, h_l = y.astype(ld), jnp.asarray(h).astype(ld)
        gh = tab.gamma * h_l
        jac, f_t = (x.astype(ld) for x in derivatives(field, t, y))
        lu = lu_factor(jnp.eye(y.shape[0], dtype=ld) - gh * jac)
        times = [t_end if al == 1 else jnp.minimum(t + al * h, t_end) for al in tab.alpha]
        us = []
        f_i = f0
        for i in range(tab.num_stages):
            if i > 0:
                y_i = (y_l + weighted_sum(tab.a[i - 1], us)).astype(y.dtype)
                f_i = field(y_i, times[i])
            rhs = gh * f_i.astype(ld)
            if i > 0 and any(tab.c[i - 1]):
                rhs = rhs + tab.gamma * weighted_sum(tab.c[i - 1], us)
            if tab.gamma_sum[i] != 0:
                rhs = rhs + (tab.gamma * tab.gamma_sum[i]) * h_l**2 * f_t
            us.append(lu_solve(lu, rhs))
        if tab.fsal:
            y_new, f_new, nfe = y_i, f_i, tab.num_stages - 1
        else:
            y_new = (y_l + weighted_sum(tab.m, us)).astype(y.dtype)
            f_new, nfe = field(y_new, t_end), tab.num_stages
        error = weighted_sum(tab.m_error, us)  # in control.error_dtype, as the loop expects
        coefficients = jnp.stack([weighted_sum(row, us) for row in tab.dense]).astype(y.dtype)
        nodes = simpson_nodes(t, y, h, t_end, coefficients, y_new)
        return StepResult(y_new, f_new, error, coefficients, nodes, nfe, 1, state), jac

    def interpolant(self, field: Field, t, y, h, dense, y_new, f_new) -> Array:
        """The coefficients computed by ``step`` (no evaluations)."""
        return dense
