"""One explicit Runge–Kutta step, the error norm, the PI step-size controller, the first step.

All functions act on flat state vectors ``y`` of shape ``(n,)`` and a vector field
``field(y, t) -> dy/dt`` of the same shape; time runs forwards (the loop maps a backwards
solve onto a forwards one).

Dtypes: ``t`` and ``h`` are in the time dtype, ``y`` in the state dtype (see ``loop``); ``h`` is
cast to the state dtype where it multiplies state increments, and the error norm is computed in
at least float32 (``error_dtype``), so that a float16 or bfloat16 state neither overflows nor
flushes its scaled errors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
from jax import Array

from .tableaus import ButcherTableau

Field = Callable[[Array, Array], Array]

SAFETY = 0.9
FACTOR_MIN = 0.2
FACTOR_MAX = 10.0


class Step(NamedTuple):
    """The result of one step attempt.

    Attributes:
        y_new: the solution at ``t + h``, shape ``(n,)``.
        f_new: ``f(y_new, t + h)`` when the method is FSAL, else ``None``.
        error: the local error estimate ``h Σ e_i k_i`` (``None`` for fixed-step methods).
        error3: DOP853's second (3rd-order) estimate, else ``None``.
        stages: the stage derivatives ``k_i``, a list of ``s`` arrays of shape ``(n,)``.
        inputs: the states ``y + h Σ_j a_ij k_j`` at which the stages were evaluated.
    """

    y_new: Array
    f_new: Array | None
    error: Array | None
    error3: Array | None
    stages: list
    inputs: list


def error_dtype(state_dtype):
    """The dtype of error norms and tolerances: the state's, at least float32."""
    return jnp.promote_types(state_dtype, jnp.float32)


def _divide(x, scale, zero_over_zero):
    """``x / scale`` where ``scale > 0``; where ``scale == 0`` (``atol = 0`` at a zero component):
    ``zero_over_zero`` if ``x == 0``, else ``inf`` (no relative tolerance can accept it)."""
    positive = scale > 0
    quotient = x / jnp.where(positive, scale, 1)
    return jnp.where(positive, quotient, jnp.where(x == 0, zero_over_zero, jnp.inf))


def weighted_sum(weights, vectors):
    """``Σ_i w_i v_i`` over the nonzero weights (Python floats; unrolled for XLA to fuse)."""
    terms = [w * v for w, v in zip(weights, vectors) if w != 0]
    if not terms:
        return jnp.zeros_like(vectors[0])
    return sum(terms[1:], terms[0])


def stage_times(tableau: ButcherTableau, t, h, t_new) -> list:
    """``t + c_i h``, never past ``t_new`` (the end of the step, which ``t + h`` may miss by
    rounding) and exactly ``t_new`` where ``c_i = 1``."""
    return [t_new if c == 1 else jnp.minimum(t + c * h, t_new) for c in tableau.c]


def rk_step(tableau: ButcherTableau, field: Field, t, y, h, f0, t_new=None) -> Step:
    """One step of ``tableau`` from ``(t, y)`` with step ``h``, reusing ``f0 = f(y, t)``.

    ``t_new``: the time the step ends at (default ``t + h``); stages never go past it.
    ``h`` and the times are in the time dtype; the state increments use ``h`` cast to ``y``'s
    dtype, the error estimates are in ``error_dtype``.
    """
    times = stage_times(tableau, t, h, t + h if t_new is None else t_new)
    h_y = jnp.asarray(h).astype(y.dtype)
    ks, inputs = [f0], [y]
    for a_i, t_i in zip(tableau.a, times[1:]):
        inputs.append(y + h_y * weighted_sum(a_i, ks))
        ks.append(field(inputs[-1], t_i))
    y_new = y + h_y * weighted_sum(tableau.b, ks)
    edtype = error_dtype(y.dtype)
    h_e, ks_e = jnp.asarray(h).astype(edtype), [k.astype(edtype) for k in ks]
    error = None if tableau.b_error is None else h_e * weighted_sum(tableau.b_error, ks_e)
    error3 = None if tableau.b_error3 is None else h_e * weighted_sum(tableau.b_error3, ks_e)
    return Step(y_new, ks[-1] if tableau.fsal else None, error, error3, ks, inputs)


def rms_norm(x, segments) -> Array:
    """The largest RMS norm over the ``segments`` ``[(start, stop), ...]`` of ``x``.

    With a single segment covering ``x`` this is the usual RMS norm; with several, each part
    of the state is controlled on its own (no part can dilute another's error).
    """
    return jnp.max(jnp.stack([jnp.sqrt(jnp.mean(x[a:b] ** 2)) for a, b in segments]))


def error_ratio(step: Step, y, rtol, atol, segments) -> Array:
    """The scaled error ``‖err / (atol + rtol max(|y|, |y_new|))‖``: a step is accepted at ≤ 1.

    For DOP853 the two estimates are combined per segment as
    ``|e5|² / sqrt(|e5|² + 0.01 |e3|²)`` (Hairer, Nørsett & Wanner, II.10). A NaN or inf in
    the estimate gives an infinite ratio. Where the scale is 0 (``atol = 0`` and the component
    0 at both ends) an error of exactly 0 counts as 0, any other as infinite. Computed in
    ``error_dtype``.
    """
    edtype = error_dtype(y.dtype)
    y, y_new = y.astype(edtype), step.y_new.astype(edtype)
    scale = atol + rtol * jnp.maximum(jnp.abs(y), jnp.abs(y_new))
    scaled = _divide(step.error.astype(edtype), scale, 0.0)
    per_part = [jnp.sqrt(jnp.mean(scaled[a:b] ** 2)) for a, b in segments]
    if step.error3 is not None:
        scaled3 = _divide(step.error3.astype(edtype), scale, 0.0)
        combined = []
        for (a, b), e5 in zip(segments, per_part):
            e3 = jnp.sqrt(jnp.mean(scaled3[a:b] ** 2))
            denom = jnp.sqrt(e5**2 + 0.01 * e3**2)
            zero_or_nan = jnp.where(jnp.isnan(denom), jnp.nan, 0.0)
            combined.append(jnp.where(denom > 0, e5**2 / jnp.where(denom > 0, denom, 1), zero_or_nan))
        per_part = combined
    ratio = jnp.max(jnp.stack(per_part))
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
