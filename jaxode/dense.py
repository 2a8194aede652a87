"""``DenseSolution``: the solution at any time of the interval, from the accepted steps.

``odesolve(..., dense=True)`` keeps every accepted step's start ``(t_k, y_k)``, length ``h_k``
and interpolant coefficients ``C_k`` (``loop.DenseSteps``, ``max_steps`` slots). At a time
``t`` in step ``k``, ``t_k <= t <= t_k + h_k``, the solution is the method's dense output

    z(t) = interpolate(y_k, C_k, θ),   θ = (t - t_k) / h_k,

the same numbers ``odesolve`` writes for an output time inside that step. Outside the solved
interval (before ``ts[0]``, after ``ts[-1]``, or past where a failed solve stopped) the value is
NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import Array

from .loop import DenseSteps
from .methods import Method


class DenseSolution(eqx.Module):
    """The solution of ``odesolve(..., dense=True)`` as a function of time.

    ``sol(t)`` (or ``sol.evaluate(t)``): ``t`` a scalar, or an array of times of any shape
    ``S``; returns a pytree like ``z0`` with leaves of shape ``S + leaf.shape`` (with
    ``batched=True``, ``(B,) + S + leaf.shape``). Works under ``jit``, ``vmap`` and ``grad``
    (see ``odesolve``'s ``dense`` for the gradient modes that differentiate it).

    Attributes:
        steps: the accepted steps (forward-running time ``s = direction · t``).
        t0, t1: the interval solved, ``t1`` where the solve stopped (``info.final_time``).
        direction: ``+1`` for increasing ``ts``, ``-1`` for decreasing.
    """

    steps: DenseSteps
    t0: Array
    t1: Array
    direction: Array
    method: Method = eqx.field(static=True)
    unravel: Callable = eqx.field(static=True)
    batched: bool = eqx.field(static=True)

    @classmethod
    def of(cls, steps: DenseSteps, info, ts: Array, method: Method, unravel: Callable, batched: bool):
        direction = jnp.where(ts[-1] >= ts[0], 1, -1).astype(ts.dtype)
        t0 = jnp.broadcast_to(ts[0], jnp.shape(info.final_time))
        return cls(steps, t0, info.final_time, direction, method, unravel, batched)

    def __call__(self, t) -> Any:
        return self.evaluate(t)

    def evaluate(self, t) -> Any:
        """The solution at ``t`` (see the class docstring)."""
        t = jnp.asarray(t)
        if self.batched:
            one = lambda steps, t0, t1: evaluate_steps(steps, t0, t1, self.direction, self.method, t)
            flat = jax.vmap(one)(self.steps, self.t0, self.t1)  # (B,) + S + (n,)
            return jax.vmap(lambda y: self._unravel_all(y, t.shape))(flat)
        flat = evaluate_steps(self.steps, self.t0, self.t1, self.direction, self.method, t)
        return self._unravel_all(flat, t.shape)

    def _unravel_all(self, flat, shape) -> Any:
        flat = flat.reshape((-1, flat.shape[-1]))
        tree = jax.vmap(self.unravel)(flat)
        return jax.tree_util.tree_map(lambda x: x.reshape(shape + x.shape[1:]), tree)


def evaluate_steps(
    steps: DenseSteps, t0, t1, direction, method: Method, t, extrapolate: bool = False, side: str = "right",
    search: str = "scan",
) -> Array:
    """The flat solution ``S + (n,)`` at the times ``t`` (shape ``S``) from the dense ``steps``
    of a solve from ``t0`` to ``t1``: NaN outside, or with ``extrapolate`` the first or last
    step's interpolant continued there. At a time where one step ends and the next begins, the
    next one (``side="right"``) or the one ending there (``"left"``, for a solve that runs back:
    across a reset the state before it). ``search``: ``jnp.searchsorted``'s method for the step
    (``"scan"``: a binary search, a loop of ``log2(K)`` iterations; ``"compare_all"``: one
    comparison with each of the ``K`` steps, no loop: faster for few steps, as the
    interpolating adjoint's 128)."""
    s = direction * t.astype(steps.t.dtype)
    s0, s1 = direction * t0, direction * t1

    def one(s):
        k = jnp.searchsorted(steps.t, s, side=side, method=search)
        k = jnp.clip(k - 1, 0, steps.t.shape[0] - 1)
        theta = (s - steps.t[k]) / steps.h[k]
        y = method.interpolate(steps.y[k], steps.coefficients[k], theta)
        return y if extrapolate else jnp.where((s >= s0) & (s <= s1), y, jnp.nan)

    return jax.vmap(one)(s.reshape(-1)).reshape(s.shape + steps.y.shape[-1:])
