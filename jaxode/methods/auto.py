"""Automatic stiffness switching (``solver="auto"``): tsit5 while the problem is not stiff,
rodas5p while it is.

The test is ``h·ρ``, the step times the spectral radius of ``∂f/∂y``, against ``threshold``
(3.3; tsit5's stability interval on the negative real axis ends at -3.51):

* while explicit, a check now and then (see the hysteresis below; every step while a
  detection is pending) estimates ``ρ`` by power iteration with ``∂f/∂y`` at the step's start, one
  forward-mode JVP of ``f`` per iteration (``spectral_radius_of``). ``h·ρ`` beyond
  ``threshold`` means the step size is held by stability, not accuracy: the problem is stiff.
  (Hairer's estimate from the last two stages, ``‖k_s - k_{s-1}‖ / ‖y_new - Y_{s-1}‖``, as in
  DOPRI5, costs nothing but fails at tight tolerances: the stage difference lies along the
  smooth solution, the stiff mode is damped below the tolerance and barely enters it. On
  Robertson's kinetics at rtol 1e-8 it read ``h·ρ`` 0.2-0.8 where the truth was 3.3-3.5, and
  auto took 11,363 tsit5 steps where rodas5p takes 350.)
* after every Rosenbrock step: ``ρ`` by power iteration with its Jacobian (``O(n²)`` each,
  small beside the LU's ``O(n³)``). ``h·ρ`` below ``threshold`` means the explicit method could
  take the same step stably: the problem is no longer stiff.

Hysteresis: ``to_stiff_after`` consecutive detections while explicit switch to the Rosenbrock
method; a check that detects nothing clears them, and the next check comes ``check_every``
(16) steps later, or after a calm check twice as many steps as the last interval, up to
``check_every_max`` (512; DOPRI5 checks every 1000th step). While stiff, each step calling
for a switch back is a vote, ``reset_after`` consecutive steps that do not clear the votes
(as in DOPRI5), ``to_nonstiff_after`` votes switch back. The method state (``AutoState``)
carries the phase and the counters; the loop keeps it from the last accepted step.

Three phases, each a method of its own (``phases``): explicit steps that only count down to
the next check, explicit steps with the check, Rosenbrock steps. Run by the plain while-loop
drivers (``drivers.automatic``: the forward solve, the adjoint's forward pass) on one problem,
the loop runs in phases, an inner ``while_loop`` per phase: no step pays for the choice, and a
non-stiff solve pays for a check (``power_iterations`` JVPs of ``f``) after 16, 48, 112, ...
steps. Elsewhere (under ``jax.vmap``, in the differentiable drivers) one step runs under
``lax.switch``. The results are brought to one structure: the error estimate as one array,
the dense output as the interpolant's coefficients (both quartic, in powers of ``θ``), and the
quadrature nodes of Simpson's rule on the step (the midpoint from the dense output; for tsit5
this quadrature is 4th order instead of its stages' 5th). Under ``jax.vmap`` (and
``batched=True``) ``lax.switch`` with a batched index runs every branch on every step: there
``auto`` costs a Rosenbrock step and a check each step, whatever the problem; pick the method
by hand if the batch is known to be (non-)stiff.

Counters (``Info``): ``nfe`` is that of the method that took each attempt (6 for tsit5, 8 for
rodas5p; the check's JVPs are not counted), ``num_jacobians`` counts the Rosenbrock attempts.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax

from .. import control
from .base import Field, Method, StepResult
from .explicit import ExplicitRK
from .rosenbrock import SIMPSON_WEIGHTS, Rosenbrock, simpson_nodes

__all__ = ["AutoState", "AutoSwitch", "spectral_radius", "spectral_radius_of"]


EXPLICIT, CHECK, STIFF = 0, 1, 2  # the phases: their index into ``AutoSwitch.phases()``


class AutoState(NamedTuple):
    """The phase of the next step and the counters: one ``int32`` array ``(phase, votes,
    count, interval)`` (one buffer of the loop's carry, updated by one fused operation per
    step; three scalars cost a small system's step ~20% more). ``count``: while explicit, the
    steps left to the next check; while stiff, the consecutive steps that did not vote.
    ``interval``: the steps from the last check to the next."""

    packed: Array  # (4,) int32

    @staticmethod
    def of(phase, votes, count, interval) -> AutoState:
        parts = (phase, votes, count, interval)
        return AutoState(jnp.stack([jnp.asarray(x).astype(jnp.int32) for x in parts]))

    phase = property(lambda self: self.packed[0])
    stiff = property(lambda self: self.packed[0] == STIFF)  # the stiff method takes the next step
    votes = property(lambda self: self.packed[1])
    count = property(lambda self: self.packed[2])
    interval = property(lambda self: self.packed[3])


def spectral_radius(jac, iterations: int = 8) -> Array:
    """An estimate of the largest ``|λ|`` of ``jac`` ``(n, n)`` (``spectral_radius_of``)."""
    return spectral_radius_of(lambda v: jac @ v, jac.shape[0], jac.dtype, iterations)


def spectral_radius_of(matvec, n: int, dtype, iterations: int = 8) -> Array:
    """An estimate of the largest ``|λ|`` of the linear map ``matvec`` on ``R^n`` by power
    iteration from a fixed start vector: ``‖A v‖`` after ``iterations`` normalised products
    (its error shrinks like ``|λ_2 / λ_1|^iterations``)."""
    v = 1 + 0.5 * jnp.sin(1.0 + jnp.arange(n, dtype=dtype))

    def body(_, v):
        w = matvec(v)
        norm = jnp.linalg.norm(w)
        return jnp.where(norm > 0, w / jnp.where(norm > 0, norm, 1), v)

    v = lax.fori_loop(0, iterations, body, v / jnp.linalg.norm(v))
    return jnp.linalg.norm(matvec(v))


@dataclasses.dataclass(frozen=True)
class AutoSwitch(Method):
    """An explicit method and a Rosenbrock method, switched by stiffness (module docstring).

    Attributes:
        nonstiff: a first-same-as-last explicit method whose dense output costs no evaluations
            (tsit5, dopri5).
        stiff: a Rosenbrock method with the same error order.
        threshold: the ``h·ρ`` above which the problem counts as stiff.
        check_every: accepted explicit steps to the first check, and from a check that
            detected stiffness (or a switch back) to the next; each calm check doubles the
            interval to the next, up to ``check_every_max``.
        check_every_max: the longest interval between checks.
        to_stiff_after: consecutive detections (one check a step) that switch to ``stiff``.
        to_nonstiff_after: votes that switch back.
        reset_after: consecutive Rosenbrock steps without a vote that clear the votes.
        power_iterations: products with ``∂f/∂y`` per estimate of ``ρ``.
        phase: ``None``: each step picks its method by ``lax.switch`` on the state; ``EXPLICIT``,
            ``CHECK`` or ``STIFF``: the step is that phase's, whatever the state says (the
            methods of ``phases``, for a loop that runs each phase on its own).
    """

    nonstiff: ExplicitRK
    stiff: Rosenbrock
    threshold: float = 3.3
    check_every: int = 16
    check_every_max: int = 512
    to_stiff_after: int = 3
    to_nonstiff_after: int = 15
    reset_after: int = 6
    power_iterations: int = 8
    phase: int | None = None

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
        if not (tab.fsal and tab.adaptive and not tab.extra_c and not tab.dense_nested):
            raise ValueError(f"auto: {tab.name!r} is not a first-same-as-last adaptive method "
                             "with a plain dense output")
        if self.stiff.error_order != tab.error_order:
            raise ValueError("auto: both methods need the same error order (one step-size controller)")
        votes = min(self.to_stiff_after, self.to_nonstiff_after)
        if not 1 <= self.check_every <= self.check_every_max or votes < 1:
            raise ValueError("auto: need 1 <= check_every <= check_every_max, and to_stiff_after and "
                             "to_nonstiff_after >= 1")

    def phases(self) -> tuple[AutoSwitch, AutoSwitch, AutoSwitch]:
        """The method fixed to each phase, indexed by ``phase_of``: ``EXPLICIT``, ``CHECK``,
        ``STIFF``."""
        return tuple(dataclasses.replace(self, phase=k) for k in (EXPLICIT, CHECK, STIFF))

    def phase_of(self, state: AutoState) -> Array:
        """The index into ``phases`` of the method that takes the next step."""
        return state.phase

    def init(self, field: Field, t0, y0, f0) -> AutoState:
        """Explicit, the first check after ``check_every`` steps."""
        return AutoState.of(EXPLICIT, 0, self.check_every, self.check_every)

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

        def explicit(check: bool):
            r = self.nonstiff.step(field, t, y, h, f0, (), t_end)
            coefficients = self.nonstiff.interpolant(field, t, y, h, r.dense, r.y_new, r.f_new)
            rho = self._rho(field, t, y) if check else jnp.zeros((), edtype)
            return pack(r, r.error[0], coefficients, rho)

        def implicit():
            r, jac = self.stiff.step_with_jacobian(field, t, y, h, f0, (), t_end)
            return pack(r, r.error, r.dense, spectral_radius(jac, self.power_iterations))

        branches = (lambda: explicit(False), lambda: explicit(True), implicit)
        # only what differs leaves the switch (the quadrature nodes follow outside it, and are
        # dropped by XLA where nothing uses them)
        chosen = lax.switch(state.phase, branches) if self.phase is None else branches[self.phase]()
        y_new, f_new, error, coefficients, nfe, num_jac, h_rho = chosen
        nodes = simpson_nodes(t, y, h, t_end, coefficients, y_new)
        result = StepResult(y_new, f_new, error, coefficients, nodes, nfe, num_jac, ())
        return result._replace(state=self._next(state, lax.stop_gradient(h_rho)))

    def _rho(self, field: Field, t, y) -> Array:
        """``ρ(∂f/∂y (y, t))`` by power iteration, each product one JVP of ``f`` (no gradient
        flows through it)."""
        y, t = lax.stop_gradient(y), lax.stop_gradient(t)
        matvec = lambda v: jax.jvp(lambda z: field(z, t), (y,), (v.astype(y.dtype),))[1]
        ld = control.error_dtype(y.dtype)
        return spectral_radius_of(lambda v: matvec(v).astype(ld), y.shape[0], ld, self.power_iterations)

    def _next(self, state: AutoState, h_rho) -> AutoState:
        """The state after an accepted step of phase ``self.phase`` (``None``: the state's)
        whose ``h·ρ`` is ``h_rho`` (read in the ``CHECK`` and ``STIFF`` phases only)."""
        rules = (self._count_down, self._check, self._vote_back)
        if self.phase is not None:
            return rules[self.phase](state, h_rho)
        candidates = [rule(state, h_rho).packed for rule in rules]  # a few integer operations each
        return AutoState(jnp.select([state.phase == k for k in range(2)], candidates[:2], candidates[2]))

    def _count_down(self, state: AutoState, h_rho) -> AutoState:
        count = state.count - 1
        return AutoState.of(jnp.where(count > 0, EXPLICIT, CHECK), state.votes, count, state.interval)

    def _check(self, state: AutoState, h_rho) -> AutoState:
        """A detection is a vote and calls the check again at the next step; none clears the
        votes and waits twice as long as last time (``check_every`` after a detection)."""
        detected = h_rho > self.threshold
        votes = jnp.where(detected, state.votes + 1, 0)
        switch = votes >= self.to_stiff_after
        phase = jnp.where(switch, STIFF, jnp.where(detected, CHECK, EXPLICIT))
        calm_again = ~detected & (state.votes == 0)  # this check and the one before
        doubled = jnp.minimum(2 * state.interval, self.check_every_max)
        interval = jnp.where(calm_again, doubled, self.check_every)
        return AutoState.of(phase, jnp.where(switch, 0, votes), jnp.where(switch, 0, interval), interval)

    def _vote_back(self, state: AutoState, h_rho) -> AutoState:
        """While stiff: a step the explicit method could take stably is a vote for it."""
        against = h_rho < self.threshold
        votes = jnp.where(against, state.votes + 1, state.votes)
        calm = jnp.where(against, 0, state.count + 1)
        votes = jnp.where(calm >= self.reset_after, 0, votes)
        switch = votes >= self.to_nonstiff_after
        return AutoState.of(jnp.where(switch, EXPLICIT, STIFF), jnp.where(switch, 0, votes),
                            jnp.where(switch, self.check_every, calm), self.check_every)

    def interpolant(self, field: Field, t, y, h, dense, y_new, f_new) -> Array:
        """The coefficients computed by ``step`` (no evaluations)."""
        return dense
