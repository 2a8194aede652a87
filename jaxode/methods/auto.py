"""Automatic stiffness switching (``solver="auto"``): tsit5 while the problem is not stiff,
rodas5p while it is.

Each accepted step estimates ``h·ρ``, the step times the spectral radius of ``∂f/∂y``:

* after an explicit step (Hairer's estimate in DOPRI5, *Solving ODEs II*, IV.2): the last two
  stages are both at ``t + h``, so ``ρ ≈ ‖k_s - k_{s-1}‖ / ‖y_new - Y_{s-1}‖``, the field's
  rate of change between two nearby states; at no cost. ``h·ρ`` beyond ``threshold`` (3.3;
  tsit5's stability interval on the negative real axis ends at -3.51) means the step size is
  held by stability, not accuracy: the problem is stiff;
* after a Rosenbrock step: ``ρ`` by a few power iterations with its Jacobian (``O(n²)`` each,
  small beside the LU's ``O(n³)``). ``h·ρ`` below ``threshold`` means the explicit method could
  take the same step stably: the problem is no longer stiff.

Hysteresis as in DOPRI5: a detection calling for a switch is a vote; ``reset_after``
consecutive detections that do not, clear the votes; ``to_stiff_after`` (or
``to_nonstiff_after``) votes switch the method, from the next step on. The method state
(``AutoState``) carries the current choice and the counters; the loop keeps it from the last
accepted step.

Both methods are compiled. Run by the plain while-loop drivers (``drivers.automatic``: the
forward solve, the adjoint's forward pass) on one problem, the loop runs in phases: an inner
``while_loop`` of explicit steps while the problem is not stiff, then one of Rosenbrock steps
while it is, and again (``phases``): no step pays for the choice. Elsewhere (under ``jax.vmap``,
in the differentiable drivers) one step runs under ``lax.cond``. The results are brought to one
structure: the error estimate as one array, the dense output as the interpolant's coefficients
(both quartic, in powers of ``θ``), and the quadrature nodes of Simpson's rule on the step (the
midpoint from the dense output; for tsit5 this quadrature is 4th order instead of its stages'
5th). Under ``jax.vmap`` (and ``batched=True``) ``lax.cond`` with a batched predicate runs both
branches on every step: there ``auto`` costs a Rosenbrock step each step, whatever the
problem; pick the method by hand if the batch is known to be (non-)stiff.

Counters (``Info``): ``nfe`` is that of the method that took each attempt (6 for tsit5, 8 for
rodas5p), ``num_jacobians`` counts the Rosenbrock attempts.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax.numpy as jnp
from jax import Array, lax

from .. import control
from .base import Field, Method, StepResult
from .explicit import ExplicitRK, weighted_sum
from .rosenbrock import SIMPSON_WEIGHTS, Rosenbrock, simpson_nodes

__all__ = ["AutoState", "AutoSwitch", "spectral_radius"]


class AutoState(NamedTuple):
    """Which method takes the next step, and the votes for a switch: one ``int32`` array
    ``(stiff, votes, calm)`` (one buffer of the loop's carry, updated by one fused operation
    per step; three scalars cost a small system's step ~20% more)."""

    packed: Array  # (3,) int32

    @staticmethod
    def of(stiff, votes, calm) -> AutoState:
        return AutoState(jnp.stack([jnp.asarray(x).astype(jnp.int32) for x in (stiff, votes, calm)]))

    stiff = property(lambda self: self.packed[0] > 0)  # the stiff method takes the next step
    votes = property(lambda self: self.packed[1])  # detections calling for a switch since the last reset
    calm = property(lambda self: self.packed[2])  # consecutive detections that did not


def spectral_radius(jac, iterations: int = 8) -> Array:
    """An estimate of the largest ``|λ|`` of ``jac`` ``(n, n)`` by power iteration from a fixed
    start vector (``‖J v‖ / ‖v‖`` after ``iterations`` normalised products)."""
    n = jac.shape[0]
    v = 1 + 0.5 * jnp.sin(1.0 + jnp.arange(n, dtype=jac.dtype))

    def body(_, v):
        w = jac @ v
        norm = jnp.linalg.norm(w)
        return jnp.where(norm > 0, w / jnp.where(norm > 0, norm, 1), v)

    v = lax.fori_loop(0, iterations, body, v / jnp.linalg.norm(v))
    return jnp.linalg.norm(jac @ v)


def _ratio(num, den) -> Array:
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), 0.0)


@dataclasses.dataclass(frozen=True)
class AutoSwitch(Method):
    """An explicit method and a Rosenbrock method, switched by stiffness (module docstring).

    Attributes:
        nonstiff: a first-same-as-last explicit method whose last two stages are at ``t + h``
            and whose dense output costs no evaluations (tsit5, dopri5).
        stiff: a Rosenbrock method with the same error order.
        threshold: the ``h·ρ`` above which the problem counts as stiff.
        to_stiff_after, to_nonstiff_after: votes needed to switch.
        reset_after: consecutive contrary detections that clear the votes.
        phase: ``None``: each step picks its method by ``lax.cond`` on the state; ``False`` or
            ``True``: the step is the explicit (or the Rosenbrock) one, whatever the state says
            (the methods of ``phases``, for a loop that runs each phase on its own).
    """

    nonstiff: ExplicitRK
    stiff: Rosenbrock
    threshold: float = 3.3
    to_stiff_after: int = 15
    to_nonstiff_after: int = 15
    reset_after: int = 6
    phase: bool | None = None

    name = "auto"
    adaptive = True
    implicit = True
    interpolant_nfe = 0
    quadrature_weights = SIMPSON_WEIGHTS
    order = property(lambda self: self.nonstiff.order)
    error_order = property(lambda self: self.nonstiff.error_order)
    num_stages = property(lambda self: max(self.nonstiff.num_stages, self.stiff.num_stages))

    def __post_init__(self):
        tab = self.nonstiff.tableau
        if not (tab.fsal and tab.c[-2] == 1 and tab.adaptive and not tab.extra_c and not tab.dense_nested):
            raise ValueError(f"auto: {tab.name!r} is not a first-same-as-last adaptive method with "
                             "its last two stages at t + h and a plain dense output")
        if self.stiff.error_order != tab.error_order:
            raise ValueError("auto: both methods need the same error order (one step-size controller)")

    def phases(self) -> tuple[AutoSwitch, AutoSwitch]:
        """The method fixed to each phase: ``(explicit, Rosenbrock)``, indexed by ``phase_of``."""
        return dataclasses.replace(self, phase=False), dataclasses.replace(self, phase=True)

    def phase_of(self, state: AutoState) -> Array:
        """The index into ``phases`` of the method that takes the next step."""
        return state.packed[0]

    def init(self, field: Field, t0, y0, f0) -> AutoState:
        return AutoState(jnp.zeros((3,), jnp.int32))

    def step(self, field: Field, t, y, h, f0, state: AutoState, t_end) -> StepResult:
        """A step of the method ``state`` names; the new state assumes the step is accepted
        (the loop keeps the old one otherwise)."""
        edtype = control.error_dtype(y.dtype)
        h_e = jnp.asarray(h).astype(edtype)
        degree = max(len(self.nonstiff.tableau.dense[0]), len(self.stiff.tableau.dense))

        def pack(r: StepResult, error, coefficients, rho):
            pad = degree - coefficients.shape[0]
            if pad:
                coefficients = jnp.concatenate([coefficients, jnp.zeros((pad,) + y.shape, y.dtype)])
            counts = jnp.asarray(r.nfe, jnp.int32), jnp.asarray(r.num_jacobians, jnp.int32)
            h_rho = h_e * rho.astype(edtype)
            return (r.y_new, r.f_new, error.astype(edtype), coefficients) + counts + (h_rho,)

        def explicit():
            r = self.nonstiff.step(field, t, y, h, f0, (), t_end)
            ks = list(r.dense)
            h_y = jnp.asarray(h).astype(y.dtype)
            s = len(ks)
            y_before = y + h_y * weighted_sum(self.nonstiff.tableau.a[s - 3], ks)  # stage s-1's input
            rho = _ratio(jnp.linalg.norm(ks[-1] - ks[-2]), jnp.linalg.norm(r.y_new - y_before))
            coefficients = self.nonstiff.interpolant(field, t, y, h, r.dense, r.y_new, r.f_new)
            return pack(r, r.error[0], coefficients, rho)

        def implicit():
            r, jac = self.stiff.step_with_jacobian(field, t, y, h, f0, (), t_end)
            return pack(r, r.error, r.dense, spectral_radius(jac))

        # only what differs leaves the cond (the quadrature nodes follow outside it, and are
        # dropped by XLA where nothing uses them)
        if self.phase is None:
            chosen = lax.cond(state.stiff, implicit, explicit)
        else:
            chosen = implicit() if self.phase else explicit()
        y_new, f_new, error, coefficients, nfe, num_jac, h_rho = chosen
        nodes = simpson_nodes(t, y, h, t_end, coefficients, y_new)
        result = StepResult(y_new, f_new, error, coefficients, nodes, nfe, num_jac, ())
        return result._replace(state=self._vote(state, lax.stop_gradient(h_rho)))

    def _vote(self, state: AutoState, h_rho) -> AutoState:
        """The state after an accepted step whose ``h·ρ`` is ``h_rho``."""
        stiff, votes, calm = state.stiff, state.votes, state.calm
        against = jnp.where(stiff, h_rho < self.threshold, h_rho > self.threshold)
        votes = jnp.where(against, votes + 1, votes)
        calm = jnp.where(against, 0, calm + 1)
        votes = jnp.where(calm >= self.reset_after, 0, votes)
        switch = votes >= jnp.where(stiff, self.to_nonstiff_after, self.to_stiff_after)
        return AutoState.of(stiff ^ switch, jnp.where(switch, 0, votes), jnp.where(switch, 0, calm))

    def interpolant(self, field: Field, t, y, h, dense, y_new, f_new) -> Array:
        """The coefficients computed by ``step`` (no evaluations)."""
        return dense
