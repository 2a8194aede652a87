"""The algebraically reversible form of an explicit Runge–Kutta method (McCallum & Foster 2024,
"Efficient, accurate and stable gradients for neural ODEs", arXiv:2410.11648).

Two coupled states ``(y, ŷ)``, ``ŷ_0 = y_0``; one step from ``t_n`` by ``h``::

    y_{n+1} = λ y_n + (1 - λ) ŷ_n + Ψ_h(t_n, ŷ_n)
    ŷ_{n+1} = ŷ_n - Ψ_{-h}(t_{n+1}, y_{n+1})

where ``Ψ_h(t, u)`` is the base method's increment (its ``y_new - u``) over a step ``h`` from
``(t, u)`` and ``λ`` the coupling, ``0 < λ <= 1``. The step is inverted algebraically, with the
same two increments, in the opposite order::

    ŷ_n = ŷ_{n+1} + Ψ_{-h}(t_{n+1}, y_{n+1})
    y_n = (y_{n+1} - (1 - λ) ŷ_n - Ψ_h(t_n, ŷ_n)) / λ

Order: that of the base method, ``p``. ``Ψ_h`` and ``-Ψ_{-h}`` are both order-``p`` approximations
of the flow's increment, so ``y`` and ``ŷ`` each carry one step of order ``p`` per step and stay
``O(h^p)`` apart; the coupling term ``(1 - λ)(ŷ_n - y_n)`` is then a perturbation of order
``p + 1`` per step (and ``(1 - λ)`` small besides).

Linear stability on ``y' = μy``: with ``R(z)`` the base method's stability function, ``z = hμ``,
``Ψ_h(u) = (R(z) - 1) u`` and ``Ψ_{-h}(u) = (R(-z) - 1) u``, one step is ``(y, ŷ) ↦ M (y, ŷ)``::

    M = [[λ,                      R(z) - λ                         ],
         [-λ(R(-z) - 1),          1 - (R(-z) - 1)(R(z) - λ)         ]]

with ``det M = λ`` and ``tr M = 1 + λ - X``, ``X = (R(-z) - 1)(R(z) - λ)``: the two eigenvalues
have product ``λ``. For real ``z`` the scheme is stable (both ``|ρ| <= 1``) iff
``|tr M| <= 1 + λ``, i.e. ``0 <= X <= 2(1 + λ)``. For small ``z`` the principal eigenvalue is
``ρ_1 ≈ R(z)`` and the parasitic one ``ρ_2 = λ / ρ_1 ≈ λ R(-z)``: at ``λ = 1`` they are ``R(z)``
and ``R(-z) ≈ 1/R(z)`` (the map preserves volume; a decaying mode's partner grows), and ``λ < 1``
damps the parasitic mode by ``λ`` per step. Hence: oscillatory and weakly damped modes
(``|R(z)| ≈ 1``, ``z`` near the imaginary axis) are stable for every ``λ < 1``
(``|ρ_2| ≈ λ``), while a decaying mode is stable only while ``|R(z)| ≳ λ``: on the negative real
axis ``|z| ≲ -ln λ ≈ 1 - λ`` (0.001 at the default). Beyond it the parasitic mode grows by
``λ/|R(z)|`` per step, about ``λ^N e^{|μ| T}`` over a solve of length ``T``: it stays invisible
while that product times the local error (the parasitic mode's source) stays below the
tolerance, which limits how strongly dissipative a system the scheme can follow over a long
horizon. The step-size controller does not see this mode (the error estimate is that of
``Ψ_h``), and smaller steps only help once ``|z| < -ln λ``: on ``y' = -10 y`` over ``[0, 2]`` the
error is 15 at ``rtol = 1e-6``. ``tests/test_reversible.py`` checks ``M`` against the
implementation and the growth of that mode in a solve.

Round-off of the reconstruction: each inverted step divides by ``λ``, so a rounding error made
at step ``k`` (a few ulps of ``|y|``) reaches ``y_0`` multiplied by about ``λ^{-k}`` (and by the
increments' Jacobians, which for a non-dissipative problem stay O(1)): over ``N`` steps the
reconstructed ``y_0`` is off by about ``ε |y| Σ_k λ^{-k}``, i.e. ``~ε |y| N`` while
``N(1 - λ) << 1`` and growing like ``ε |y| λ^{-N} / (1 - λ)`` beyond (``ε`` the unit round-off).
Measured (``tests/test_reversible.py``, a driven pendulum, rk4, ``N = 10⁴`` steps): at
``λ = 0.999`` (``λ^{-N} ≈ 2·10⁴``) 9e-2 in float32 and 5e-11 in float64; at ``λ = 1`` 8e-5 and
2e-13. So in float32, ``N(1 - λ)`` should stay below ~5 (``λ >= 0.9995`` for 10⁴ steps), at the
price of less damping of the parasitic mode; the gradient is the derivative of the computed
solution at the reconstructed states, so this error enters it directly.

Cost per step: ``s`` evaluations for ``Ψ_h`` (its error estimate and dense output are the base
method's, taken on ``ŷ_n``) and, for ``Ψ_{-h}``, ``f(y_{n+1}, t_{n+1})`` (the loop's next ``f``)
plus the stages up to the last with a nonzero weight ``b_i``: ``2s - 1`` for a first-same-as-last
pair, ``2s`` otherwise. Dense output of ``y`` inside the step: the base method's interpolant of
``Ψ_h`` on ``ŷ_n``, shifted by the coupling term linearly in ``θ``
(``y_n + θ(1 - λ)(ŷ_n - y_n) + [P(θ) - ŷ_n]``, which ends on ``y_{n+1}``), or, for a tableau
without one, cubic Hermite on ``(y_n, f(y_n), y_{n+1}, f(y_{n+1}))``.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from .. import control
from ..interpolation import hermite_coefficients
from .base import Field, Method, StepResult
from .explicit import ExplicitRK, stage_times, weighted_sum


def increment(tableau, field: Field, t, y, h, k0, t_end, num_stages: int | None = None):
    """``Ψ_h(t, y) = h Σ_i b_i k_i`` of an explicit tableau, and its stages ``k_i`` (a list),
    inputs and times; ``k0 = field(y, t)`` given. ``num_stages``: how many stages to evaluate
    (default all; fewer when the stages past the last nonzero ``b_i`` are not needed)."""
    s = tableau.num_stages if num_stages is None else num_stages
    times = stage_times(tableau, t, h, t_end)[:s]
    h_y = jnp.asarray(h).astype(y.dtype)
    ks, inputs = [k0], [y]
    for a_i, t_i in zip(tableau.a[: s - 1], times[1:]):
        inputs.append(y + h_y * weighted_sum(a_i, ks))
        ks.append(field(inputs[-1], t_i))
    return h_y * weighted_sum(tableau.b[:s], ks), ks, inputs, times


def solution_stages(tableau) -> int:
    """The stages ``y_new`` needs: up to the last nonzero weight ``b_i``."""
    return max(i for i, b in enumerate(tableau.b) if b != 0) + 1


def reversed_field(field: Field) -> Field:
    """``(u, s) ↦ -field(u, -s)``: a forward step of it from ``-t`` by ``h`` is a step of
    ``field`` from ``t`` by ``-h`` (in ``s = -t``)."""
    return lambda u, s: -field(u, -s)


@dataclasses.dataclass(frozen=True)
class Reversible(Method):
    """The reversible two-state form of the explicit method ``base`` with coupling ``λ``
    (see the module docstring). The method state is ``(ŷ,)``; the loop's ``y`` is ``y``. After
    an event that restarts the solve, ``gradient="reversible"`` restarts the pair as at ``t_0``,
    ``ŷ = y⁺`` (``jaxode.reversible``)."""

    base: ExplicitRK
    coupling: float = 0.999

    def __post_init__(self):
        if not isinstance(self.base, ExplicitRK):
            raise ValueError(
                f'gradient="reversible" needs an explicit Runge–Kutta solver (a name such as "tsit5", '
                f"or a jaxode.ButcherTableau); {getattr(self.base, 'name', self.base)!r} is not explicit"
            )
        check_coupling(self.coupling)

    name = property(lambda self: f"reversible {self.base.name}")
    order = property(lambda self: self.base.order)
    error_order = property(lambda self: self.base.error_order)
    adaptive = property(lambda self: self.base.adaptive)
    num_stages = property(lambda self: 2 * self.base.num_stages)
    interpolant_nfe = property(lambda self: self.base.interpolant_nfe if self.base.tableau.dense else 0)
    quadrature_weights = property(lambda self: self.base.quadrature_weights)

    def init(self, field: Field, t0, y0, f0):
        return (y0,)

    def step(self, field: Field, t, y, h, f0, state, t_end) -> StepResult:
        """One step of both states; ``f0 = field(y, t)`` only enters the Hermite dense output.
        The error estimate is the base method's for ``Ψ_h(ŷ_n)``. A non-finite ``ŷ_{n+1}`` makes
        ``y_{n+1}`` NaN, so that the loop sees the step as non-finite."""
        tab = self.base.tableau
        (yhat,) = state
        inc, ks, inputs, times = self.forward_increment(field, t, t_end, yhat, h)
        y_new = couple(y, yhat, inc, self.coupling)
        back, f_new = self.backward_increment(field, t, t_end, y_new, h)
        yhat_new = yhat - back
        y_new = jnp.where(jnp.all(jnp.isfinite(yhat_new)), y_new, jnp.nan)
        edtype = control.error_dtype(y.dtype)
        h_e, ks_e = jnp.asarray(h).astype(edtype), [k.astype(edtype) for k in ks]
        errs = [h_e * weighted_sum(e, ks_e) for e in (tab.b_error, tab.b_error3) if e is not None]
        used = [i for i, b in enumerate(tab.b) if b != 0]
        nodes = (jnp.stack([inputs[i] for i in used]), jnp.stack([times[i] for i in used]))
        nfe = tab.num_stages + solution_stages(tab)
        dense = (jnp.stack(ks), f0, yhat)
        return StepResult(y_new, f_new, tuple(errs) or None, dense, nodes, nfe, 0, (yhat_new,))

    def forward_increment(self, field: Field, t, t_end, yhat, h):
        """``Ψ_h(t, ŷ)`` with every stage of the base tableau (for its error estimate and dense
        output): ``(increment, stages, stage inputs, stage times)``."""
        return increment(self.base.tableau, field, t, yhat, h, field(yhat, t), t_end)

    def backward_increment(self, field: Field, t, t_end, y_new, h):
        """``(Ψ_{-h}(t_end, y_new), field(y_new, t_end))``: the step back from ``t_end`` to ``t``
        (``h = t_end - t``), its stages up to the last nonzero weight."""
        tab = self.base.tableau
        f_new = field(y_new, t_end)
        back = increment(tab, reversed_field(field), -t_end, y_new, h, -f_new, -t, solution_stages(tab))[0]
        return back, f_new

    def error_ratio(self, result: StepResult, y, rtol, atol, segments):
        return self.base.error_ratio(result, y, rtol, atol, segments)

    def interpolant(self, field: Field, t, y, h, dense, y_new, f_new):
        """The base interpolant of ``Ψ_h`` on ``ŷ_n`` with ``(1 - λ)(ŷ_n - y_n)`` added to its
        first coefficient (the one of ``θ``), or Hermite on ``y`` if the tableau has none.
        ``dense``: ``(stages of Ψ_h (s, n), field(y, t) (only for Hermite), ŷ_n)``."""
        ks, f0, yhat = dense
        if self.base.tableau.dense is None:
            return hermite_coefficients(y, h, f0, y_new, f_new)
        coefficients = self.base.interpolant(field, t, yhat, h, ks, None, None)
        return coefficients.at[0].add((1 - self.coupling) * (yhat - y))

    def interpolate(self, y, coefficients, theta):
        return self.base.interpolate(y, coefficients, theta)


def couple(y, yhat, inc, lam: float):
    """``λ y + (1 - λ) ŷ + Ψ`` (exactly ``y + Ψ`` at ``λ = 1``)."""
    if lam == 1:
        return y + inc
    return lam * y + (1 - lam) * yhat + inc


def uncouple(y_new, yhat, inc, lam: float):
    """The inverse of ``couple`` in ``y``: ``(y_new - (1 - λ) ŷ - Ψ) / λ``."""
    if lam == 1:
        return y_new - inc
    return (y_new - (1 - lam) * yhat - inc) / lam


def check_coupling(coupling) -> float:
    """``coupling`` as a float in ``(0, 1]``; ``ValueError`` naming it otherwise."""
    try:
        value = float(coupling)
    except (TypeError, ValueError):
        raise TypeError(f"reversible_coupling must be a real number in (0, 1], got {coupling!r}") from None
    if not (0 < value <= 1):
        raise ValueError(f"reversible_coupling must be in (0, 1] (λ of the reversible scheme), "
                         f"got {coupling!r}")
    return value
