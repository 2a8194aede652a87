"""Dense output: the solution anywhere inside an accepted step.

Inside a step from ``t`` to ``t + h`` every method's interpolant has the form

    y(t + θh) = y + Σ_{j=1}^{d} θ^j C_j,        θ ∈ [0, 1],

(or DOP853's nested form ``y + θ(C_1 + (1-θ)(C_2 + θ(C_3 + ...)))``) with ``C`` of shape
``(d, n)`` computed once per step; evaluating an output then costs ``d`` fused multiply-adds
per element. ``C_j = h Σ_i D_ij k_i`` for a tableau with its own dense
output matrix ``D`` (dopri5, tsit5: 4th order; dopri8: 7th order, with 3 extra stages);
otherwise the cubic Hermite interpolant through ``y, y_new`` with slopes ``f(y), f(y_new)``
(3rd order).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array

from .step import Field, weighted_sum
from .tableaus import ButcherTableau


def dense_coefficients(tableau: ButcherTableau, field: Field, t, y, h, stages, y_new, f_new) -> Array:
    """The coefficients ``C`` (shape ``(d, n)``) of the interpolant of one step.

    Evaluates ``field`` ``len(tableau.extra_c)`` times (the extra stages), no more. ``t``, ``h``
    in the time dtype; ``h`` is cast to the state dtype where it scales state increments.
    """
    h_y = jnp.asarray(h).astype(y.dtype)
    if tableau.dense is None:
        delta = y_new - y
        f0 = stages[0]
        return jnp.stack([h_y * f0, 3 * delta - h_y * (2 * f0 + f_new), h_y * (f0 + f_new) - 2 * delta])
    ks = list(stages)
    for c_i, a_i in zip(tableau.extra_c, tableau.extra_a):
        ks.append(field(y + h_y * weighted_sum(a_i, ks), t + c_i * h))
    degree = len(tableau.dense[0])
    return jnp.stack([h_y * weighted_sum([row[j] for row in tableau.dense], ks) for j in range(degree)])


def evaluate(y, coefficients, theta, nested: bool = False) -> Array:
    """``y + Σ_j θ^j C_j`` by Horner's rule (``nested``: with alternating factors ``1-θ``,
    ``θ``, as in Hairer's ``contd8``); ``theta`` is a scalar (cast to the state dtype)."""
    theta = jnp.asarray(theta).astype(y.dtype)
    acc = coefficients[-1]
    for j in range(len(coefficients) - 2, -1, -1):
        factor = 1 - theta if nested and j % 2 == 0 else theta
        acc = coefficients[j] + factor * acc
    return y + theta * acc
