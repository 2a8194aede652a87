"""Explicit Runge–Kutta methods: one step of a Butcher tableau, its error and dense output.

With ``s`` stages, from ``(t, y)`` by ``h`` (``tableaus`` holds the coefficients)::

    k_i   = f(y + h Σ_{j<i} a_ij k_j, t + c_i h)        i = 0 .. s-1,  k_0 = f(y, t)
    y_new = y + h Σ_i b_i k_i                           (order p)
    err   = h Σ_i e_i k_i,   e = b - b̂                   (order q of the embedded b̂)

A first-same-as-last (FSAL) method's last stage is ``f(y_new, t + h)``, reused as the next
step's ``k_0``; any other evaluates ``f(y_new, t + h)`` once more (the loop carries it). The
dense output is the tableau's own (``C_j = h Σ_i D_ij k_i``, with DOP853's extra stages), or
cubic Hermite.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import Array

from .. import control
from ..interpolation import evaluate, hermite_coefficients
from .base import Field, Method, StepResult
from .tableaus import ButcherTableau


def weighted_sum(weights, vectors):
    """``Σ_i w_i v_i`` over the nonzero weights (Python floats; unrolled for XLA to fuse)."""
    terms = [w * v for w, v in zip(weights, vectors) if w != 0]
    if not terms:
        return jnp.zeros_like(vectors[0])
    return sum(terms[1:], terms[0])


def stage_times(tableau: ButcherTableau, t, h, t_end) -> list:
    """``t + c_i h``, never past ``t_end`` (the end of the step, which ``t + h`` may miss by
    rounding, or the last time before a jump) and exactly ``t_end`` where ``c_i = 1``."""
    return [t_end if c == 1 else jnp.minimum(t + c * h, t_end) for c in tableau.c]


@dataclasses.dataclass(frozen=True)
class ExplicitRK(Method):
    """The ``Method`` of an explicit Runge–Kutta tableau (see the module docstring)."""

    tableau: ButcherTableau

    name = property(lambda self: self.tableau.name)
    order = property(lambda self: self.tableau.order)
    error_order = property(lambda self: self.tableau.error_order)
    adaptive = property(lambda self: self.tableau.adaptive)
    num_stages = property(lambda self: self.tableau.num_stages)
    interpolant_nfe = property(lambda self: len(self.tableau.extra_c))

    @property
    def quadrature_weights(self) -> tuple[float, ...]:
        return tuple(b for b in self.tableau.b if b != 0)

    def step(self, field: Field, t, y, h, f0, state, t_end) -> StepResult:
        """One step; ``h`` and the times in the time dtype; the stage combinations and the
        error estimates in ``control.error_dtype`` (the state's dtype, at least float32: a
        float16 or bfloat16 state is rounded once per stage input, not once per term)."""
        tab = self.tableau
        times = stage_times(tab, t, h, t_end)
        edtype = control.error_dtype(y.dtype)
        h_e, y_e = jnp.asarray(h).astype(edtype), y.astype(edtype)
        ks, ks_e, inputs = [f0], [f0.astype(edtype)], [y]
        for a_i, t_i in zip(tab.a, times[1:]):
            inputs.append((y_e + h_e * weighted_sum(a_i, ks_e)).astype(y.dtype))
            ks.append(field(inputs[-1], t_i))
            ks_e.append(ks[-1].astype(edtype))
        y_new = (y_e + h_e * weighted_sum(tab.b, ks_e)).astype(y.dtype)
        f_new = ks[-1] if tab.fsal else field(y_new, t_end)
        errors = [h_e * weighted_sum(e, ks_e) for e in (tab.b_error, tab.b_error3) if e is not None]
        used = [i for i, b in enumerate(tab.b) if b != 0]
        nodes = (jnp.stack([inputs[i] for i in used]), jnp.stack([times[i] for i in used]))
        nfe = tab.num_stages - (1 if tab.fsal else 0)
        return StepResult(y_new, f_new, tuple(errors) or None, jnp.stack(ks), nodes, nfe, 0, state)

    def error_ratio(self, result: StepResult, y, rtol, atol, segments) -> Array:
        """The RMS norm of the scaled error; for DOP853 its two estimates combined per segment
        as ``|e5|² / sqrt(|e5|² + 0.01 |e3|²)`` (Hairer, Nørsett & Wanner, II.10)."""
        if len(result.error) == 1:
            return control.error_ratio(result.error[0], y, result.y_new, rtol, atol, segments)
        scale = control.error_scale(y, result.y_new, rtol, atol)
        combined = []
        for e5, e3 in zip(*(control.scaled_rms(e, scale, segments) for e in result.error)):
            denom = jnp.sqrt(e5**2 + 0.01 * e3**2)
            zero_or_nan = jnp.where(jnp.isnan(denom), jnp.nan, 0.0)
            combined.append(jnp.where(denom > 0, e5**2 / jnp.where(denom > 0, denom, 1), zero_or_nan))
        ratio = jnp.max(jnp.stack(combined))
        return jnp.where(jnp.isnan(ratio), jnp.inf, ratio)

    def interpolant(self, field: Field, t, y, h, dense, y_new, f_new) -> Array:
        """The coefficients ``C`` ``(d, n)`` from the stages ``dense`` ``(s, n)``: the tableau's
        dense output (evaluating ``field`` at its extra stages, no more), or cubic Hermite."""
        tab = self.tableau
        if tab.dense is None:
            return hermite_coefficients(y, h, dense[0], y_new, f_new)
        h_y = jnp.asarray(h).astype(y.dtype)
        ks = list(dense)
        for c_i, a_i in zip(tab.extra_c, tab.extra_a):
            ks.append(field(y + h_y * weighted_sum(a_i, ks), t + c_i * h))
        degree = len(tab.dense[0])
        return jnp.stack([h_y * weighted_sum([row[j] for row in tab.dense], ks) for j in range(degree)])

    def interpolate(self, y, coefficients, theta) -> Array:
        return evaluate(y, coefficients, theta, self.tableau.dense_nested)
