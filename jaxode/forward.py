"""The forward solve of a flat problem: the loop, run by a driver, to ``(ys, info)``.

Every gradient mode runs its forward pass here (``jaxode.gradients`` names the driver); the
adjoint's backward solve runs the same loop on the augmented field (``jaxode.adjoint``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array

from .drivers import integrate
from .loop import DenseSteps, info_of
from .methods import Method

# field(y, t, diff_args, nondiff_args) -> dy/dt on flat states
FlatField = Callable[[Array, Array, object, object], Array]


class Config(NamedTuple):
    """The static options of a solve."""

    method: Method
    max_steps: int
    seminorm: bool = False
    throw: bool = True
    batched: bool = False  # y0 is (B, n): B problems, each with its own steps, shared args
    dense: bool = False  # also return every accepted step's interpolant
    progress: bool = False
    interpolate: bool = False  # the adjoint reads z off the forward solution (interpolated_adjoint)
    reversible_coupling: float = 0.999  # λ of gradient="reversible"
    events: Any = None  # Event objects (odesolve's options), then events.FlatEvents in a solve
    max_events: int | None = None  # the most events (None: max_steps)


class Controls(NamedTuple):
    """The step controls of a solve, traced (changing them does not recompile)."""

    rtol: Array
    atol: Array
    dt0: Array | None = None
    max_dt: Array | None = None
    jump_ts: Array | None = None


class Solution(NamedTuple):
    """What a forward solve returns: the outputs ``(T, n)``, the statistics, the dense steps
    (with ``Config.dense``) and the step size the controller proposed at the end."""

    ys: Array
    info: object
    dense: DenseSteps | None
    last_step: Array


def forward(
    field: FlatField, y0, ts, diff, nondiff, controls: Controls, cfg: Config, driver: str = "automatic"
) -> Solution:
    """The plain solve of ``y' = field(y, t, diff, nondiff)`` by the driver named ``driver``."""
    if driver in ("backprop", "checkpoint"):  # the loop itself is differentiated
        field = _no_derivative_where_nonfinite(field)
    state = integrate(
        lambda y, t: field(y, t, diff, nondiff), y0, ts, controls.rtol, controls.atol, controls.dt0,
        driver=driver, method=cfg.method, max_steps=cfg.max_steps, max_dt=controls.max_dt,
        jump_ts=controls.jump_ts, save_dense=cfg.dense, progress=cfg.progress,
        events=None if cfg.events is None else cfg.events.for_loop((diff, nondiff), after=True),
    )
    direction = jnp.where(ts[-1] >= ts[0], 1, -1).astype(state.t.dtype)
    return Solution(state.ys, info_of(state, direction), state.dense, state.h)


def forward_batched(
    field: FlatField, y0s, ts, diff, nondiff, controls: Controls, cfg: Config, **options
) -> Solution:
    """``forward`` for ``y0s`` of shape ``(B, n)``: each problem with its own step sizes."""
    return jax.vmap(lambda y0: forward(field, y0, ts, diff, nondiff, controls, cfg, **options))(y0s)


def _no_derivative_where_nonfinite(field: FlatField) -> FlatField:
    """``field``, with a zero derivative at an evaluation whose input or value is not finite.

    Such an evaluation belongs to a step attempt that is rejected (or to a failed solve): its
    cotangents are zero, but ``0 · ∂f/∂z`` with an infinite ``∂f/∂z`` (``z³`` at an overflowed
    stage, say) is NaN and would poison every gradient. So the derivative is taken from
    ``jax.linearize``, with the residuals of a non-finite evaluation set to 0 (those that are
    the field's parameters themselves kept: they are finite and shared), and its tangent masked,
    ``where(ok, J₀ v, 0)``: the transpose, ``J₀ᵀ where(ok, c, 0)``, is then ``0 · 0``. Masking
    the residuals rather than the parameters' tangent keeps that tangent shared under
    ``jax.vmap``, where a per-element mask would make the parameters' tangents and transposed
    products per element (a weight-sized array per element and stage).
    """

    @jax.custom_jvp
    def masked(y, t, diff, nondiff):
        return field(y, t, diff, nondiff)

    @masked.defjvp
    def _jvp(primals, tangents):
        y, t = primals[:2]
        out, linear = jax.linearize(field, *primals)
        ok = jnp.all(jnp.isfinite(y)) & jnp.all(jnp.isfinite(t)) & jnp.all(jnp.isfinite(out))
        shared = {id(x) for x in jax.tree_util.tree_leaves(primals[2:])}

        def zero_unless_ok(r):
            if id(r) in shared:
                return r
            return jnp.where(ok, r, jnp.zeros((), jnp.result_type(r)))

        def mask(v):
            dtype = jnp.result_type(v)
            return jnp.where(ok, v, 0).astype(dtype) if jnp.issubdtype(dtype, jnp.inexact) else v

        t_out = jax.tree_util.tree_map(zero_unless_ok, linear)(*tangents)
        return out, jax.tree_util.tree_map(mask, t_out)

    return masked
