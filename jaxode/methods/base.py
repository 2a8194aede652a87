"""The ``Method`` interface: what the loop asks of a time-stepping method.

The loop (``jaxode.loop``) knows time: where to step, which steps to accept, where the
outputs fall, when the solve has failed. A method knows one step: given ``(t, y)``, a step
``h`` and the field ``f(y, t)`` at the start, it returns the state at ``t + h``, an estimate
of the step's local error, the field at the end, and what is needed to interpolate inside the
step. The loop never looks inside a step; a method never looks at the loop's clock.

A method is a frozen (hashable) dataclass: it is a static argument of the compiled solve.
Every array it handles is a flat state ``(n,)`` in the state dtype; times and ``h`` are in the
time dtype (cast to the state dtype where they scale state increments). Time always runs
forwards here (the loop maps a backwards solve onto a forwards one).

One step::

    result = method.step(field, t, y, h, f0, state, t_end)      # -> StepResult
    ratio  = method.error_ratio(result, y, rtol, atol, segments)  # accept when <= 1
    coeffs = method.interpolant(field, t, y, h, result.dense, result.y_new, result.f_new)
    y(t + θh) = method.interpolate(y, coeffs, θ)                  # θ in [0, 1]

* ``state`` is the method's own carry (``init``): nothing for a Runge–Kutta method, a second
  state for a reversible scheme, a reusable Jacobian for an implicit one. The loop keeps the
  state of the last accepted step. The loop starts it by ``init_with_tolerances``, which
  passes ``rtol`` and ``atol`` on to a method whose step needs them (an ESDIRK method's Newton
  iteration) and is ``init`` otherwise.
* ``t_end`` is the latest time any stage may be evaluated at: ``t + h`` itself, or just
  before it when the step ends on a discontinuity of ``f`` (``jump_ts``).
* A method that cannot complete a step on its own terms (a Newton iteration that does not
  converge) returns an error ratio of ``inf``: the controller rejects it and shrinks ``h``.
* ``interpolant`` may evaluate ``field`` (``interpolant_nfe`` times: DOP853's extra stages);
  the loop then calls it only for steps that contain an output time.
* ``result.nodes`` are the states and times at which ``field`` was evaluated with the weights
  ``quadrature_weights`` (``∫_t^{t+h} g ≈ h Σ_i w_i g(nodes_i)``): the batched adjoint
  accumulates its parameter adjoint by this quadrature instead of carrying it in the state.
* ``result.nfe`` and ``result.num_jacobians`` count the work of the attempt (Python ints or
  traced integers), summed by the loop into ``Info``.

Adding a method means writing one such class (``explicit.ExplicitRK`` is the first) and naming
it in ``jaxode.methods.METHODS``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, NamedTuple

from jax import Array

from .. import control
from ..interpolation import evaluate

Field = Callable[[Array, Array], Array]


class StepResult(NamedTuple):
    """One step attempt of a method from ``(t, y)`` to ``t + h``.

    Attributes:
        y_new: the state at ``t + h``, ``(n,)``.
        f_new: ``field(y_new, t_end)``, ``(n,)``.
        error: the local error estimate, in the method's own form (read by its
            ``error_ratio``); ``None`` for a fixed-step method.
        dense: what ``interpolant`` needs of the step (e.g. the stage derivatives).
        nodes: ``(inputs, times)``, ``(m, n)`` and ``(m,)``: where the field was evaluated,
            matching ``quadrature_weights``.
        nfe: evaluations of the field in this attempt.
        num_jacobians: Jacobians of the field evaluated in this attempt.
        state: the method's carry after the step.
    """

    y_new: Array
    f_new: Array
    error: Any
    dense: Any
    nodes: tuple[Array, Array]
    nfe: Any
    num_jacobians: Any
    state: Any


class Method(abc.ABC):
    """A time-stepping method (see the module docstring for the contract).

    Subclasses are frozen dataclasses with these attributes:
        name: a label for messages.
        order: the order of ``y_new``.
        error_order: the order of the embedded error estimate (``None`` if not adaptive); sets
            the controller's exponents.
        adaptive: whether the step size is chosen by the error controller (else ``dt0`` is
            the step and the grid lands on every output time).
        num_stages: field evaluations per step, roughly: sizes the backprop driver's blocks.
        interpolant_nfe: field evaluations that ``interpolant`` costs.
        quadrature_weights: the weights of ``StepResult.nodes``.
        implicit: whether the method solves with the field's Jacobian (a stiff method): then
            the adjoint reads ``z`` off the forward solution (``jaxode.interpolated_adjoint``)
            instead of integrating it backwards.
    """

    name: str
    order: int
    error_order: int | None
    adaptive: bool
    num_stages: int
    interpolant_nfe: int
    quadrature_weights: tuple[float, ...]
    implicit: bool = False

    def init(self, field: Field, t0: Array, y0: Array, f0: Array) -> Any:
        """The method's carry at the start (default: none)."""
        return ()

    def init_with_tolerances(self, field: Field, t0: Array, y0: Array, f0: Array, rtol, atol) -> Any:
        """The carry at the start, for a method that needs the error tolerances in its step (an
        implicit method's Newton iteration measures its convergence by them); the loop calls
        this. Default: ``init``."""
        return self.init(field, t0, y0, f0)

    @abc.abstractmethod
    def step(self, field: Field, t, y, h, f0, state, t_end) -> StepResult:
        """One step attempt from ``(t, y)`` by ``h``, reusing ``f0 = field(y, t)``."""

    def error_ratio(self, result: StepResult, y, rtol, atol, segments) -> Array:
        """The scaled error of the step (accepted at <= 1; ``inf`` if not finite)."""
        return control.error_ratio(result.error, y, result.y_new, rtol, atol, segments)

    @abc.abstractmethod
    def interpolant(self, field: Field, t, y, h, dense, y_new, f_new) -> Array:
        """The coefficients of the step's dense output (``interpolant_nfe`` evaluations)."""

    def interpolate(self, y, coefficients, theta) -> Array:
        """The dense output ``y(t + θh)`` from the step's coefficients (``θ`` a scalar)."""
        return evaluate(y, coefficients, theta)
