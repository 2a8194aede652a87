"""ESDIRK methods: singly diagonally implicit Runge–Kutta methods with an explicit first stage.

With ``s`` stages, diagonal ``γ`` and ``k_0 = g(y, t)``, a step from ``(t, y)`` by ``h`` solves
one implicit equation per stage ``i = 1 .. s-1``::

    Y_i = y + h Σ_{j<i} a_ij k_j + h γ g(Y_i, t + c_i h),     k_i = g(Y_i, t + c_i h)
    y_new = Y_{s-1}                      (stiffly accurate: b = the last row of A)
    err   = h Σ_i (b_i - b̂_i) k_i        (b̂: the embedded method, itself a stage: Y_{s-2})

Each stage is solved by a simplified Newton iteration with one Jacobian ``J = ∂g/∂y(y, t)``
(``jax.jacfwd``, dense ``(n, n)``) and one LU of ``I - hγJ`` per step attempt, shared by all
stages::

    (I - hγJ) ΔY = -(Y - y - h Σ a_ij k_j - hγ g(Y, t_i)),   Y ← Y + ΔY

from the predictor ``Y⁰ = y + h Σ a_ij k_j + hγ k_{i-1}``. Convergence is measured against the
tolerances (Hairer & Wanner, *Solving ODEs II*, IV.8): with ``‖·‖`` the RMS norm scaled by
``atol + rtol max(|y|, |Y|)``, the rate ``θ_k = ‖ΔY_k‖ / ‖ΔY_{k-1}‖`` and ``η_k = θ_k / (1 - θ_k)``,
the iteration stops when ``η_k ‖ΔY_k‖ <= κ`` (``κ = 0.01``; at the first iteration ``η`` is the
last one known, as ``max(η_old, eps)^0.8`` at the start of a step). It fails when ``θ_k >= 1``,
when ``θ_k^(m-k) / (1 - θ_k) ‖ΔY_k‖ > κ`` (it would not converge within the ``m``
iterations allowed) or after ``m`` iterations; a failed stage makes the step's error ratio
infinite, so the controller rejects it and tries a smaller step. ``k_i`` is read off the stage
equation, ``k_i = (Y_i - y - h Σ a_ij k_j) / (hγ)``, which does not amplify the iteration's
error by a stiff ``J`` (and costs no evaluation); ``f_new = k_{s-1}`` (first same as last).
``StepResult.nfe`` counts the iterations' evaluations of ``g``; the Jacobian (``n`` JVPs, and
the one evaluation of ``g`` inside them) counts in ``num_jacobians``.

Derivatives: each stage is a ``lax.custom_root`` of ``F(Y) = Y - y - h Σ a_ij k_j - hγ g(Y, t_i)``:
its derivative is the implicit one, ``dY = (I - hγ ∂g/∂Y(Y*))⁻¹ (∂F/∂(y, h, θ, ...) · d(...))``,
with the exact Jacobian at the converged stage (dense, one LU per stage), never the unrolled
iterations; forward and reverse mode. The step's Jacobian and LU are not differentiated.

Dense output: the cubic Hermite interpolant through ``y, y_new`` with slopes ``f(y), f_new``
(3rd order; Kværnø publishes none). Quadrature nodes: the stages, with the weights ``b``.

Jacobians are dense: an ``n × n`` matrix and its LU per step, ``n`` JVPs of ``g`` to build it.
That is cheap up to a few hundred states; a batch of small systems belongs in ``jax.vmap`` or
``batched=True`` (a Jacobian per problem), not in one large state.

Kværnø 5(4)'s third stage has ``c = 1.23``: it evaluates ``g`` past the end of the step (as
diffrax's Kvaerno5 does), except on a step that ends on a time of ``jump_ts``, where every
stage time is clipped to the step's end.

Coefficients: A. Kværnø, "Singly diagonally implicit Runge–Kutta methods with an explicit
first stage", BIT 44 (2004) 489–502 (the 3(2) method's ``γ`` is the root of
``6γ³ - 18γ² + 9γ - 1 = 0`` in ``(0.4, 0.5)``, to full precision here).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax

from .. import control
from ..interpolation import hermite_coefficients
from .base import Field, Method, StepResult
from .explicit import weighted_sum
from .lu import factor as lu_factor
from .lu import solve as lu_solve


@dataclasses.dataclass(frozen=True)
class ESDIRKTableau:
    """A stiffly accurate ESDIRK method (hashable).

    Attributes:
        name: a label for messages.
        order: the order ``p`` of ``y_new``.
        error_order: the order ``q`` of the embedded solution.
        gamma: the diagonal ``γ`` of the implicit stages.
        c: the ``s`` nodes, ``c[0] = 0``, ``c[-1] = 1``.
        a: the ``s - 1`` rows below the diagonal: row ``i - 1`` holds ``a_i0 .. a_i(i-1)``.
        b_hat: the ``s`` weights of the embedded solution.
    """

    name: str
    order: int
    error_order: int
    gamma: float
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b_hat: tuple[float, ...]

    def __post_init__(self):
        s = len(self.c)
        if s < 2 or self.c[0] != 0 or self.c[-1] != 1:
            raise ValueError(f"tableau {self.name!r}: c must start with 0 and end with 1")
        if len(self.a) != s - 1 or any(len(row) != i + 1 for i, row in enumerate(self.a)):
            raise ValueError(f"tableau {self.name!r}: a must have {s - 1} rows, row i holding i + 1 entries")
        for i, row in enumerate(self.a):
            if abs(sum(row) + self.gamma - self.c[i + 1]) > 1e-12:
                raise ValueError(f"tableau {self.name!r}: row {i + 1} of a plus gamma does not sum to c")
        if len(self.b_hat) != s or abs(sum(self.b_hat) - 1) > 1e-12:
            raise ValueError(f"tableau {self.name!r}: b_hat must have {s} entries summing to 1")

    @property
    def num_stages(self) -> int:
        return len(self.c)

    @property
    def b(self) -> tuple[float, ...]:
        """The weights of ``y_new``: the last row of ``A`` (stiffly accurate)."""
        return self.a[-1] + (self.gamma,)

    @property
    def b_error(self) -> tuple[float, ...]:
        return tuple(x - y for x, y in zip(self.b, self.b_hat))


_G3 = 0.43586652150845899942  # the root of 6γ³ - 18γ² + 9γ - 1 in (0.4, 0.5)
_K3_ROW2 = ((-4 * _G3**2 + 6 * _G3 - 1) / (4 * _G3), (-2 * _G3 + 1) / (4 * _G3))
KVAERNO3 = ESDIRKTableau(
    name="kvaerno3",
    order=3,
    error_order=2,
    gamma=_G3,
    c=(0.0, 2 * _G3, 1.0, 1.0),
    a=(
        (_G3,),
        _K3_ROW2,
        (
            (6 * _G3 - 1) / (12 * _G3),
            -1 / ((24 * _G3 - 12) * _G3),
            (-6 * _G3**2 + 6 * _G3 - 1) / (6 * _G3 - 3),
        ),
    ),
    b_hat=_K3_ROW2 + (_G3, 0.0),
)

_K5_ROW5 = (0.13855640231268224, 0.0, -0.04245337201752043, 0.02446657898003141, 0.61943039072480676)
KVAERNO5 = ESDIRKTableau(
    name="kvaerno5",
    order=5,
    error_order=4,
    gamma=0.26,
    c=(0.0, 0.52, 1.230333209967908, 0.8957659843500759, 0.43639360985864756, 1.0, 1.0),
    a=(
        (0.26,),
        (0.13, 0.84033320996790809),
        (0.22371961478320505, 0.47675532319799699, -0.06470895363112615),
        (0.16648564323248321, 0.10450018841591720, 0.03631482272098715, -0.13090704451073998),
        _K5_ROW5,
        (0.13659751177640291, 0.0, -0.05496908796538376, -0.04118626728321046, 0.62993304899016403,
         0.06962479448202728),
    ),
    b_hat=_K5_ROW5 + (0.26, 0.0),
)

TABLEAUS = {"kvaerno3": KVAERNO3, "kvaerno5": KVAERNO5}


class NewtonState(NamedTuple):
    """An ESDIRK method's carry: the tolerances its iteration is measured by, and the last
    contraction estimate ``η`` (for the first iteration of the next stage)."""

    rtol: Array
    atol: Array
    eta: Array


class _Stage(NamedTuple):
    """The simplified Newton iteration's carry."""

    iterations: Array  # increments computed so far
    y: Array  # the current iterate
    norm: Array  # the scaled norm of the last increment
    eta: Array  # θ / (1 - θ) of the last increment (or the one carried in)
    status: Array  # 0 running, 1 converged, 2 failed


@dataclasses.dataclass(frozen=True)
class ESDIRK(Method):
    """The ``Method`` of an ESDIRK tableau (see the module docstring).

    Attributes:
        tableau: the coefficients.
        max_iterations: the most Newton iterations per stage.
        kappa: the iteration stops when its estimated error is below ``kappa`` times the
            tolerance.
    """

    tableau: ESDIRKTableau
    max_iterations: int = 10
    kappa: float = 0.01

    name = property(lambda self: self.tableau.name)
    order = property(lambda self: self.tableau.order)
    error_order = property(lambda self: self.tableau.error_order)
    num_stages = property(lambda self: self.tableau.num_stages)
    adaptive = True
    implicit = True
    interpolant_nfe = 0

    @property
    def quadrature_weights(self) -> tuple[float, ...]:
        return tuple(b for b in self.tableau.b if b != 0)

    def init(self, field: Field, t0, y0, f0) -> NewtonState:
        """A carry with tolerances of 1e-6 (for a step taken outside the loop, which starts the
        carry by ``init_with_tolerances``)."""
        edtype = control.error_dtype(y0.dtype)
        one = jnp.ones((), edtype)
        return NewtonState(1e-6 * one, 1e-6 * one, one)

    def init_with_tolerances(self, field: Field, t0, y0, f0, rtol, atol) -> NewtonState:
        edtype = control.error_dtype(y0.dtype)
        return NewtonState(jnp.asarray(rtol, edtype), jnp.asarray(atol, edtype), jnp.ones((), edtype))

    def step(self, field: Field, t, y, h, f0, state: NewtonState, t_end) -> StepResult:
        """One attempt: ``s - 1`` Newton solves sharing one Jacobian and LU; a stage whose
        iteration fails leaves the later ones unsolved (no evaluations) and the step rejected."""
        tab, n = self.tableau, y.shape[0]
        times = self._stage_times(t, h, t_end)
        h_y = jnp.asarray(h).astype(y.dtype)
        hg = h_y * tab.gamma
        jac = lax.stop_gradient(jax.jacfwd(field)(y, t))
        lu = lax.stop_gradient(lu_factor(jnp.eye(n, dtype=y.dtype) - hg * jac))
        safe_hg = jnp.where(hg == 0, 1, hg)
        eps = jnp.finfo(state.eta.dtype).eps
        eta = jnp.maximum(state.eta, eps) ** 0.8
        ks, inputs, converged, nfe = [f0], [y], jnp.ones((), bool), jnp.zeros((), jnp.int32)
        for row, t_i in zip(tab.a, times[1:]):
            rhs = y + h_y * weighted_sum(row, ks)
            y_i, (ok, iterations, eta) = self._solve_stage(
                field, t_i, rhs, hg, rhs + hg * ks[-1], lu, y, state, eta, converged
            )
            converged, nfe = converged & ok, nfe + iterations
            ks.append((y_i - rhs) / safe_hg)
            inputs.append(y_i)
        y_new = inputs[-1]
        edtype = control.error_dtype(y.dtype)
        error = jnp.asarray(h).astype(edtype) * weighted_sum(tab.b_error, [k.astype(edtype) for k in ks])
        used = [i for i, b in enumerate(tab.b) if b != 0]
        nodes = (jnp.stack([inputs[i] for i in used]), jnp.stack([times[i] for i in used]))
        new_state = state._replace(eta=eta)
        return StepResult(y_new, ks[-1], (error, converged), f0, nodes, nfe, 1, new_state)

    def error_ratio(self, result: StepResult, y, rtol, atol, segments) -> Array:
        """The scaled RMS error; ``inf`` if a stage's Newton iteration did not converge."""
        error, converged = result.error
        ratio = control.error_ratio(error, y, result.y_new, rtol, atol, segments)
        return jnp.where(converged, ratio, jnp.inf)

    def interpolant(self, field: Field, t, y, h, dense, y_new, f_new) -> Array:
        """Cubic Hermite through ``y, y_new`` with slopes ``dense = f(y)`` and ``f_new``."""
        return hermite_coefficients(y, h, dense, y_new, f_new)

    def _stage_times(self, t, h, t_end) -> list:
        """``t + c_i h``; ``t_end`` where ``c_i = 1``; at most ``t_end`` where ``c_i < 1``, and where
        ``c_i > 1`` only if the step ends on a jump (``t_end < t + h``)."""
        on_jump = t_end < t + h
        times = []
        for c in self.tableau.c:
            if c == 1:
                times.append(t_end)
            elif c < 1:
                times.append(jnp.minimum(t + c * h, t_end))
            else:
                times.append(jnp.where(on_jump, t_end, t + c * h))
        return times

    def _solve_stage(self, field, t_i, rhs, hg, guess, lu, y, state, eta, active):
        """``Y`` with ``Y = rhs + hγ g(Y, t_i)``, differentiated implicitly, and
        ``(converged, iterations, η)``; no iteration at all unless ``active``."""

        def residual(stage):
            return stage - rhs - hg * field(stage, t_i)

        def solve(fun, start):
            return self._newton(fun, start, lu, y, state, eta, active)

        # (the auxiliary outputs travel as floats: custom_root gives them tangents of their dtype)
        stage, (ok, iterations, eta) = lax.custom_root(residual, guess, solve, _tangent_solve, has_aux=True)
        return stage, (lax.stop_gradient(ok) > 0, lax.stop_gradient(iterations).astype(jnp.int32), eta)

    def _newton(self, residual, start, lu, y, state: NewtonState, eta, active):
        """The simplified Newton iteration (see the module docstring)."""
        m, kappa = self.max_iterations, self.kappa
        edtype = state.eta.dtype
        y_abs = jnp.abs(y.astype(edtype))

        def norm(delta, stage):
            scale = state.atol + state.rtol * jnp.maximum(y_abs, jnp.abs(stage.astype(edtype)))
            return control.scaled_rms(delta, scale, ((0, y.shape[0]),))[0]

        def body(c: _Stage) -> _Stage:
            delta = -lu_solve(lu, residual(c.y))
            stage = c.y + delta
            size = norm(delta, stage)
            later = c.iterations >= 1
            theta = size / jnp.where(later, c.norm, 1)
            eta = jnp.where(later, theta / jnp.where(theta < 1, 1 - theta, 1), c.eta)
            done = c.iterations + 1
            converged = jnp.isfinite(size) & ((size == 0) | ((~later | (theta < 1)) & (eta * size <= kappa)))
            hopeless = later & ((theta >= 1) | (theta ** (m - done) / (1 - theta) * size > kappa))
            failed = ~jnp.isfinite(size) | hopeless | (done >= m)
            status = jnp.where(converged, 1, jnp.where(failed, 2, 0))
            return _Stage(done, stage, size, eta, status)

        init = _Stage(
            jnp.zeros((), jnp.int32), start, jnp.ones((), edtype), jnp.asarray(eta, edtype),
            jnp.where(active, 0, 2),
        )
        out = lax.while_loop(lambda c: c.status == 0, body, init)
        return out.y, ((out.status == 1).astype(edtype), out.iterations.astype(edtype), out.eta)


def _tangent_solve(linear, rhs):
    """``x`` with ``linear(x) = rhs`` (``linear``: the stage equation linearised at the converged
    stage, ``I - hγ ∂g/∂Y``), by a dense LU of its matrix. A non-finite matrix (a failed,
    rejected attempt, whose cotangents are zero) gives zero, not NaN."""
    matrix = jax.jacfwd(linear)(jnp.zeros_like(rhs))
    finite = jnp.all(jnp.isfinite(matrix))
    matrix = jnp.where(finite, matrix, jnp.eye(rhs.shape[0], dtype=matrix.dtype))
    return jnp.where(finite, lu_solve(lu_factor(matrix), rhs), 0)
