"""``odesolve``: checks the inputs, flattens pytrees, hoists closed-over arrays, picks the
gradient mode."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.flatten_util import ravel_pytree

from . import adjoint, errors
from .adjoint import Config, Info
from .tableaus import ButcherTableau, get_solver

__all__ = ["odesolve", "adjoint_backward_info", "Info"]


class _Problem(NamedTuple):
    field: Callable  # field(y, t, diff, nondiff) on flat states
    y0: Array  # (n,)
    ts: Array
    diff: Any  # the differentiable (floating-point) arrays f depends on
    nondiff: Any  # the other arrays
    unravel: Callable  # (n,) -> pytree like z0
    rtol: Array
    atol: Array
    dt0: Array | None


def _prepare(f, z0, ts, params, rtol, atol, dt0, tableau: ButcherTableau, batched=False) -> _Problem:
    ts = errors.check_ts(ts)
    errors.check_z0(z0)
    if batched:
        errors.check_batch(z0)
        z0s, z0 = z0, jax.tree_util.tree_map(lambda x: x[0], z0)
    errors.check_output(f, z0, ts[0], params)
    if not errors.is_concrete(ts):
        ts = errors.runtime_check_ts(ts)
    y0, unravel = ravel_pytree(z0)
    dtype = y0.dtype
    params_dyn, params_static = eqx.partition(params, eqx.is_array)

    def flat_f(y, t, p_dyn):
        return ravel_pytree(f(unravel(y), t, eqx.combine(p_dyn, params_static)))[0]

    converted, consts = jax.closure_convert(flat_f, y0, ts[0].astype(dtype), params_dyn)
    diff, nondiff = eqx.partition((params_dyn, tuple(consts)), eqx.is_inexact_array)

    def field(y, t, diff, nondiff):
        p_dyn, hoisted = eqx.combine(diff, nondiff)
        return converted(y, t, p_dyn, *hoisted)

    if batched:
        y0 = jax.vmap(lambda z: ravel_pytree(z)[0])(z0s)
    as_array = lambda x: None if x is None else jnp.asarray(x, dtype)  # noqa: E731
    return _Problem(field, y0, ts, diff, nondiff, unravel, as_array(rtol), as_array(atol), as_array(dt0))


def odesolve(
    f: Callable[[Any, Array, Any], Any],
    z0: Any,
    ts: Array,
    params: Any = None,
    *,
    solver: str | ButcherTableau = "tsit5",
    rtol: float | Array = 1e-6,
    atol: float | Array = 1e-6,
    dt0: float | Array | None = None,
    max_steps: int = 4096,
    gradient: str = "adjoint",
    adjoint_rtol: float | Array | None = None,
    adjoint_atol: float | Array | None = None,
    adjoint_seminorm: bool = False,
    batched: bool = False,
    throw: bool = True,
    full_output: bool = False,
):
    """Solves ``dz/dt = f(z, t, params)``, ``z(ts[0]) = z0`` and returns ``z`` at every ``ts``.

    Args:
        f: the vector field ``f(z, t, params) -> dz/dt``; ``z`` has the structure, shapes and
            dtypes of ``z0`` and so must the result. Any callable, an Equinox module included;
            arrays it closes over or holds are differentiated like ``params``.
        z0: the initial state: a floating-point array or a pytree of them.
        ts: the output times, shape ``(T,)`` with ``T >= 2``, strictly increasing or strictly
            decreasing (a solve backwards in time). ``ys[0]`` is ``z0``.
        params: any pytree passed to ``f`` (default ``None``).
        solver: ``"euler"``, ``"midpoint"``, ``"heun"``, ``"rk4"`` (fixed step; need ``dt0``),
            ``"bosh3"``, ``"dopri5"``, ``"tsit5"`` (default), ``"dopri8"`` (adaptive), or a
            ``jaxode.ButcherTableau``.
        rtol, atol: tolerances (default ``1e-6`` each): a step is accepted when the RMS norm of
            its error estimate divided by ``atol + rtol * max(|z_n|, |z_{n+1}|)`` is <= 1.
            Traced values are fine: changing them does not recompile.
        dt0: the step of a fixed-step solver (landing exactly on each output time, the grid
            restarting there); for an adaptive solver the first step to try (default ``None``:
            Hairer's automatic choice). A magnitude: the direction comes from ``ts``.
        max_steps: the most steps, accepted and rejected, of the whole solve (default 4096).
        gradient: ``"adjoint"`` (default): reverse mode by the continuous adjoint method, one
            backward solve of the augmented system, memory independent of the number of
            steps; ``"backprop"``: reverse (and forward) mode through the solver's own
            operations, the exact derivative of the computed solution with the step sizes
            held fixed, by checkpointed nested scans (see ``jaxode.backprop``);
            ``"checkpoint"``: the same derivative, reverse mode only, by a ``custom_vjp``
            around the step loop that checkpoints states and recomputes steps on the way
            back; faster, and its cost does not grow with ``max_steps``.
        adjoint_rtol, adjoint_atol: tolerances of the backward solve (default: the forward ones).
        adjoint_seminorm: leave the parameter and time adjoints out of the backward error
            control (Kidger et al. 2021); usually fewer backward steps (default ``False``).
        batched: ``z0``'s leaves carry a leading batch axis of ``B`` independent initial
            conditions; each is solved with its own step sizes, exactly as
            ``jax.vmap(odesolve, (None, 0, None, None))`` would, and ``ys`` gets the batch axis
            first, ``(B, T, ...)``. The difference is in the adjoint gradient: the parameters are
            shared, so their adjoints are summed over the batch inside one backward solve
            (they are then left out of the backward error control, as with
            ``adjoint_seminorm``), rather than carried per problem as ``jax.vmap`` of the
            adjoint must do — per-sample parameter adjoints cost ``B × len(params)`` memory and
            traffic at every stage. Use it for a loss summed over a batch that wants
            per-sample step sizes. ``f`` still sees one problem's ``z``. Default ``False``.
        throw: on failure (more than ``max_steps`` steps, step size underflow, a non-finite
            state) raise an error naming the cause, also under ``jax.jit`` and when only a
            derivative or ``info`` is used (default ``True``); with ``False`` the outputs not
            reached are NaN, ``info.status`` is nonzero, and every derivative is NaN.
        full_output: also return an ``Info`` (default ``False``).

    Returns:
        ``ys``, with the structure of ``z0`` and each leaf given a leading axis of length
        ``T``; with ``full_output=True``, ``(ys, info)``.
    """
    tableau = get_solver(solver)
    errors.check_options(tableau, rtol, atol, dt0, max_steps, gradient)
    for name, v in (("adjoint_rtol", adjoint_rtol), ("adjoint_atol", adjoint_atol)):
        if v is not None and errors.is_concrete(v) and np.any(np.asarray(v) < 0):
            raise ValueError(f"{name} must be >= 0, got {v}")
    pb = _prepare(f, z0, ts, params, rtol, atol, dt0, tableau, batched)
    cfg = Config(tableau, max_steps, adjoint_seminorm, throw, batched)
    if gradient == "adjoint":
        a_rtol = pb.rtol if adjoint_rtol is None else jnp.asarray(adjoint_rtol, pb.y0.dtype)
        a_atol = pb.atol if adjoint_atol is None else jnp.asarray(adjoint_atol, pb.y0.dtype)
        ys, info = adjoint.solve(
            pb.field, pb.y0, pb.ts, pb.diff, pb.nondiff, pb.rtol, pb.atol, pb.dt0, a_rtol, a_atol, cfg
        )
    else:
        solve = adjoint.forward_batched if batched else adjoint.forward
        ys, info = solve(
            pb.field, pb.y0, pb.ts, pb.diff, pb.nondiff, pb.rtol, pb.atol, pb.dt0, cfg,
            gradient=gradient,
        )
    if throw:  # on info too: a caller may use info alone
        ys, info = errors.raise_on_failure((ys, info), info.status)
    else:
        ys = errors.nan_gradient_on_failure(ys, info.status)
    ys = jax.vmap(jax.vmap(pb.unravel))(ys) if batched else jax.vmap(pb.unravel)(ys)
    return (ys, info) if full_output else ys


def adjoint_backward_info(
    f, z0, ts, params=None, cotangent=None, **options
) -> tuple[Any, tuple[Info, Info]]:
    """Runs the adjoint's forward and backward solves; returns the gradients and both infos.

    For benchmarks and diagnostics: the same computation as ``jax.vjp`` of ``odesolve`` with
    ``gradient="adjoint"``, with the backward solve's statistics made visible.

    Args:
        f, z0, ts, params: as for ``odesolve``.
        cotangent: ``∂L/∂ys``, a pytree like ``ys`` (default: ones).
        options: ``odesolve``'s keyword options (``solver``, ``rtol``, ``atol``, ``dt0``,
            ``max_steps``, ``adjoint_rtol``, ``adjoint_atol``, ``adjoint_seminorm``).

    Returns:
        ``((∂L/∂z0, ∂L/∂ts), (forward_info, backward_info))``, ``∂L/∂z0`` flat, shape ``(n,)``.
    """
    tableau = get_solver(options.get("solver", "tsit5"))
    rtol, atol = options.get("rtol", 1e-6), options.get("atol", 1e-6)
    dt0, max_steps = options.get("dt0"), options.get("max_steps", 4096)
    errors.check_options(tableau, rtol, atol, dt0, max_steps, "adjoint")
    pb = _prepare(f, z0, ts, params, rtol, atol, dt0, tableau)
    cfg = Config(tableau, max_steps, options.get("adjoint_seminorm", False))
    ys, fwd_info, last_step = adjoint.forward(
        pb.field, pb.y0, pb.ts, pb.diff, pb.nondiff, pb.rtol, pb.atol, pb.dt0, cfg, last_step=True
    )
    ct = jnp.ones_like(ys) if cotangent is None else jax.vmap(lambda c: ravel_pytree(c)[0])(cotangent)
    a_rtol = pb.rtol if options.get("adjoint_rtol") is None else options["adjoint_rtol"]
    a_atol = pb.atol if options.get("adjoint_atol") is None else options["adjoint_atol"]
    ct_y0, ct_ts, _, bwd_info = adjoint.backward(
        pb.field, ys, pb.ts, pb.diff, pb.nondiff, ct, jnp.asarray(a_rtol, pb.y0.dtype),
        jnp.asarray(a_atol, pb.y0.dtype), last_step if tableau.adaptive else pb.dt0, cfg,
    )
    return (ct_y0, ct_ts), (fwd_info, bwd_info)
