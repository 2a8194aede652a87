"""Dense output: the solution anywhere inside an accepted step.

Inside a step from ``t`` to ``t + h`` every method's interpolant has the form

    y(t + θh) = y + Σ_{j=1}^{d} θ^j C_j,        θ ∈ [0, 1],

(or DOP853's nested form ``y + θ(C_1 + (1-θ)(C_2 + θ(C_3 + ...)))``) with ``C`` of shape
``(d, n)`` computed once per step by the method (``Method.interpolant``); evaluating an output
then costs ``d`` fused multiply-adds per element. A method without an interpolant of its own
uses the cubic Hermite one through ``y, y_new`` with slopes ``f(y), f(y_new)`` (3rd order).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import Array


def hermite_coefficients(y, h, f0, y_new, f_new) -> Array:
    """The coefficients ``(3, n)`` of the cubic Hermite interpolant of a step (``h`` cast to the
    state dtype)."""
    h_y = jnp.asarray(h).astype(y.dtype)
    delta = y_new - y
    return jnp.stack([h_y * f0, 3 * delta - h_y * (2 * f0 + f_new), h_y * (f0 + f_new) - 2 * delta])


def evaluate(y, coefficients, theta, nested: bool = False) -> Array:
    """``y + Σ_j θ^j C_j`` by Horner's rule (``nested``: with alternating factors ``1-θ``,
    ``θ``, as in Hairer's ``contd8``); ``theta`` is a scalar (cast to the state dtype)."""
    theta = jnp.asarray(theta).astype(y.dtype)
    acc = coefficients[-1]
    for j in range(len(coefficients) - 2, -1, -1):
        factor = 1 - theta if nested and j % 2 == 0 else theta
        acc = coefficients[j] + factor * acc
    return y + theta * acc
