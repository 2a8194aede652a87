"""Step-size control: the error norm, the PI controller, the first step.

All functions act on flat states ``y`` of shape ``(n,)``; time runs forwards (the loop maps a
backwards solve onto a forwards one). Error norms and tolerances are computed in at least
float32 (``error_dtype``), so that a float16 or bfloat16 state neither overflows nor flushes its
scaled errors; ``t`` and ``h`` are in the time dtype (see ``loop``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
from jax import Array

Field = Callable[[Array, Array], Array]

SAFETY = 0.9
FACTOR_MIN = 0.2
FACTOR_MAX = 10.0


def error_dtype(state_dtype):
    """The dtype of error norms and tolerances: the state's, at least float32."""
    return jnp.promote_types(state_dtype, jnp.float32)


def _divide(x, scale, zero_over_zero):
    """``x / scale`` where ``scale > 0``; where ``scale == 0`` (``atol = 0`` at a zero component):
    ``zero_over_zero`` if ``x == 0``, else ``inf`` (no relative tolerance can accept it)."""
    positive = scale > 0
    quotient = x / jnp.where(positive, scale, 1)
    return jnp.where(positive, quotient, jnp.where(x == 0, zero_over_zero, jnp.inf))


def rms_norm(x, segments) -> Array:
    """The largest RMS norm over the ``segments`` ``[(start, stop), ...]`` of ``x``.

    With a single segment covering ``x`` this is the usual RMS norm; with several, each part
    of the state is controlled on its own (no part can dilute another's error).
    """
    return jnp.max(jnp.stack([jnp.sqrt(jnp.mean(x[a:b] ** 2)) for a, b in segments]))


def error_scale(y, y_new, rtol, atol) -> Array:
    """``atol + rtol max(|y|, |y_new|)``, the scale of each component's error, in ``error_dtype``."""
    edtype = error_dtype(y.dtype)
    return atol + rtol * jnp.maximum(jnp.abs(y.astype(edtype)), jnp.abs(y_new.astype(edtype)))


def scaled_rms(error, scale, segments) -> list:
    """The RMS norm of ``error / scale`` over each of the ``segments`` (a list of scalars).

    Where the scale is 0 (``atol = 0`` and the component 0 at both ends) an error of exactly
    0 counts as 0, any other as infinite.
    """
    scaled = _divide(error.astype(scale.dtype), scale, 0.0)
    return [jnp.sqrt(jnp.mean(scaled[a:b] ** 2)) for a, b in segments]


def error_ratio(error, y, y_new, rtol, atol, segments) -> Array:
    """The scaled error ``‖err / (atol + rtol max(|y|, |y_new|))‖``: a step is accepted at ≤ 1.

    The largest RMS norm over the ``segments``; a NaN or inf in the estimate gives an infinite
    ratio. Computed in ``error_dtype``.
    """
    ratio = jnp.max(jnp.stack(scaled_rms(error, error_scale(y, y_new, rtol, atol), segments)))
    return jnp.where(jnp.isnan(ratio), jnp.inf, ratio)


def step_factor(ratio, ratio_prev, accepted, error_order: int) -> Array:
    """The PI controller: the factor by which to multiply the step just tried.

    After an accepted step ``h_new = h · safety · ratio^(-α) · ratio_prev^β`` with
    ``k = error_order + 1``, ``β = 0.2 / k``, ``α = 1/k - 0.75 β`` (the PI controller of
    Hairer's DOPRI5 and DOP853 codes: β = 0.04 for a 5(4) pair; Hairer, Nørsett & Wanner,
    *Solving ODEs I*, IV.2 and II.4); after a rejected one ``h · safety · ratio^(-1/k)``.
    The factor is clipped to ``[0.2, 10]`` (``[0.2, 1]`` after a rejection); a non-finite
    ratio gives 0.2.
    """
    k = error_order + 1
    beta = 0.2 / k
    alpha = 1.0 / k - 0.75 * beta
    ratio = jnp.maximum(ratio, 1e-10)
    pi = SAFETY * ratio ** (-alpha) * jnp.maximum(ratio_prev, 1e-4) ** beta
    integral = SAFETY * ratio ** (-1.0 / k)
    factor = jnp.where(accepted, jnp.clip(pi, FACTOR_MIN, FACTOR_MAX), jnp.clip(integral, FACTOR_MIN, 1))
    return jnp.where(jnp.isfinite(ratio), factor, FACTOR_MIN)


def initial_step(field: Field, t0, y0, f0, span, order: int, rtol, atol, segments) -> Array:
    """The first step size (Hairer, Nørsett & Wanner, *Solving ODEs I*, II.4), at most ``span``.

    Uses one evaluation of ``field`` beyond ``f0 = f(y0, t0)``: an explicit Euler step of
    ``h0 = 0.01 ‖y0‖ / ‖f0‖`` estimates the second derivative ``d2``, and
    ``h1 = (0.01 / max(‖f0‖, d2))^(1/p)`` with ``p = order`` (the exponent of Hairer's ``HINIT``
    in DOPRI5 and DOP853, ``IORD``; scipy's ``1/(error_estimator_order + 1)`` is the same
    number): ``1/5`` for the 5(4) pairs, ``1/8`` for DOP853, ``1/3`` for Bogacki–Shampine.

    Components whose scale is 0 (``atol = 0`` and ``y0`` 0 there) are left out of the norms.
    The probe's step is the one the time ``t0 + h0`` really advanced by. Norms in
    ``error_dtype``; the result in the dtype of ``t0`` and ``span`` (or wider).
    """
    edtype = error_dtype(y0.dtype)
    t0 = jnp.asarray(t0)
    scale = atol + jnp.abs(y0.astype(edtype)) * rtol
    norm = lambda x: rms_norm(_divide(jnp.where(scale > 0, x.astype(edtype), 0), scale, 0.0), segments)
    d0, d1 = norm(y0), norm(f0)
    h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / jnp.where(d1 > 0, d1, 1))
    h0 = jnp.minimum(h0, span)
    t1 = t0 + h0.astype(t0.dtype)
    h0 = jnp.where(t1 > t0, t1 - t0, h0)
    f1 = field(y0 + h0.astype(y0.dtype) * f0, t1)
    d2 = norm(f1 - f0) / h0
    dmax = jnp.maximum(d1, d2)
    h1 = jnp.where(
        dmax <= 1e-15,
        jnp.maximum(1e-6, h0 * 1e-3),
        (0.01 / jnp.where(dmax > 0, dmax, 1)) ** (1.0 / order),
    )
    return jnp.minimum(jnp.minimum(100 * h0, h1), span)
