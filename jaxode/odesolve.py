"""``odesolve``: options → problem (checked inputs, flat states, hoisted closed-over arrays) →
gradient mode (``gradients.MODES``), run as a cached compiled function."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.flatten_util import ravel_pytree

from . import adjoint, errors, events, interpolated_adjoint
from .control import error_dtype
from .dense import DenseSolution
from .forward import Config, Controls, forward, forward_batched
from .gradients import MODES
from .loop import Info, time_dtype
from .methods import ButcherTableau, Method
from .options import Options

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


class _Static(NamedTuple):
    """The options that shape the compiled program (hashable: part of the cache key)."""

    config: Config
    gradient: str
    full_output: bool
    checked: bool  # ts, z0, rtol and atol were concrete and have been checked by value


def _as_state(z0: Any) -> Any:
    """``z0`` with its Python numbers (also inside lists and tuples) as JAX arrays; a Python
    ``int`` becomes a float, as jax's ``odeint`` and scipy take ``y0=1``."""

    def leaf(x):
        if isinstance(x, bool):
            return jnp.asarray(x)
        if isinstance(x, int):
            return jnp.asarray(x, dtype=jnp.result_type(float))
        if isinstance(x, (float, complex, np.number, np.ndarray)):
            return jnp.asarray(x)
        return x

    return jax.tree_util.tree_map(leaf, z0)


def _real_view(tree: Any) -> Any:
    """Complex leaves as real arrays with a trailing axis ``(real, imag)``: the solver works
    on real numbers, and JAX differentiates the split and the join by its own conventions."""
    split = lambda x: jnp.stack([jnp.real(x), jnp.imag(x)], -1) if _is_complex(x) else x
    return jax.tree_util.tree_map(split, tree)


def _complex_view(tree: Any, like: Any) -> Any:
    """The inverse of ``_real_view`` for leaves that are complex in ``like``."""
    join = lambda x, z: jax.lax.complex(x[..., 0], x[..., 1]) if _is_complex(z) else x
    return jax.tree_util.tree_map(join, tree, like)


def _is_complex(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.complexfloating)


def _prepare(f, z0, ts, params, rtol, atol, dt0, batched=False, checked=False) -> _Problem:
    ts = errors.check_ts(ts)
    ts = ts.astype(time_dtype(ts.dtype))  # time is carried in ts's dtype, at least float32
    if batched:
        errors.check_batch(z0)
        z0s, z0 = z0, jax.tree_util.tree_map(lambda x: x[0], z0)
    errors.check_output(f, z0, ts[0], params)
    if not checked:
        ts = errors.runtime_check_ts(ts)
    z_like = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), z0)
    y0, unravel_real = ravel_pytree(_real_view(z0))
    unravel = lambda y: _complex_view(unravel_real(y), z_like)
    dtype = y0.dtype
    params_dyn, params_static = eqx.partition(params, eqx.is_array)

    def flat_f(y, t, p_dyn):
        return ravel_pytree(_real_view(f(unravel(y), t, eqx.combine(p_dyn, params_static))))[0]

    converted, consts = jax.closure_convert(flat_f, y0, ts[0], params_dyn)
    diff, nondiff = eqx.partition((params_dyn, tuple(consts)), eqx.is_inexact_array)

    def field(y, t, diff, nondiff):
        p_dyn, hoisted = eqx.combine(diff, nondiff)
        return converted(y, t, p_dyn, *hoisted)

    if batched:
        y0 = jax.vmap(lambda z: ravel_pytree(_real_view(z))[0])(z0s)
    as_array = lambda x, dt: None if x is None else jnp.asarray(x, dt)
    tol = error_dtype(dtype)
    return _Problem(field, y0, ts, diff, nondiff, unravel, as_array(rtol, tol), as_array(atol, tol),
                    as_array(dt0, ts.dtype))


def odesolve(
    f: Callable[[Any, Array, Any], Any],
    z0: Any,
    ts: Array,
    params: Any = None,
    *,
    solver: str | ButcherTableau | Method = "tsit5",
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
    max_dt: float | Array | None = None,
    jump_ts: Array | None = None,
    dense: bool = False,
    progress: bool = False,
    adjoint_interpolate: bool | None = None,
    reversible_coupling: float = 0.999,
    events: events.Event | list[events.Event] | None = None,
    max_events: int | None = None,
):
    """Solves ``dz/dt = f(z, t, params)``, ``z(ts[0]) = z0`` and returns ``z`` at every ``ts``.

    Args:
        f: the vector field ``f(z, t, params) -> dz/dt``; ``z`` has the structure, shapes and
            dtypes of ``z0`` and so must the result. Any callable, an Equinox module included;
            arrays it closes over or holds are differentiated like ``params``.
        z0: the initial state: a floating-point or complex array, a Python or NumPy number, or a
            pytree of them (Python numbers become arrays of the default float dtype). Complex
            leaves are integrated as pairs of real numbers (real and imaginary parts, each an
            element of the error norm); gradients follow JAX's convention for complex inputs.
            A state with no elements returns ``len(ts)`` empty copies at once.
        ts: the output times, shape ``(T,)`` with ``T >= 2``, strictly increasing or strictly
            decreasing (a solve backwards in time). ``ys[0]`` is ``z0``.
        params: any pytree passed to ``f`` (default ``None``).
        solver: ``"euler"``, ``"midpoint"``, ``"heun"``, ``"rk4"`` (fixed step; need ``dt0``),
            ``"bosh3"``, ``"dopri5"``, ``"tsit5"`` (default), ``"dopri8"`` (adaptive), or a
            ``jaxode.ButcherTableau``; for stiff problems ``"rosenbrock23"``, ``"rodas5p"``
            (Rosenbrock methods: one exact Jacobian and LU per step, ``jaxode.methods.rosenbrock``),
            ``"kvaerno3"``, ``"kvaerno5"`` (ESDIRK methods, stages by a simplified Newton
            iteration, ``jaxode.methods.esdirk``) or ``"auto"`` (tsit5, switching to rodas5p while
            the problem is stiff); or any ``jaxode.Method``.
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
            held fixed, by checkpointed nested scans (see ``jaxode.while_loops``);
            ``"checkpoint"``: the same derivative, reverse mode only, by a ``custom_vjp``
            around the step loop that checkpoints states and recomputes steps on the way
            back; faster, and its cost does not grow with ``max_steps``;
            ``"reversible"``: the solve uses the algebraically reversible two-state form of the
            (explicit) solver (McCallum & Foster 2024; see ``jaxode.methods.reversible``), whose
            steps the reverse pass inverts one by one: the exact derivative of that computed
            solution, reverse mode only, memory O(1) states plus one time per step; the
            scheme is unstable for modes decaying faster than ``-ln λ`` per step (README,
            "Reversible gradients").
        adjoint_rtol, adjoint_atol: tolerances of the backward solve (default: the forward ones).
        adjoint_seminorm: leave the parameter and time adjoints out of the backward error
            control (Kidger et al. 2021); usually fewer backward steps (default ``False``).
        batched: ``z0``'s leaves carry a leading batch axis of ``B`` independent initial
            conditions; each is solved with its own step sizes, exactly as
            ``jax.vmap(odesolve, (None, 0, None, None))`` would, and ``ys`` gets the batch axis
            first, ``(B, T, ...)``; the parameters are shared, and their adjoints are summed
            over the batch inside one backward solve (left out of the backward error control,
            as with ``adjoint_seminorm``). ``jax.grad`` of a loss of ``jax.vmap`` of the
            adjoint solve over ``z0`` alone does the same by itself; ``vmap`` of ``grad``
            (per-sample gradients) or batched parameters keep one parameter adjoint per
            problem. ``f`` still sees one problem's ``z``. Default ``False``.
        throw: on failure (more than ``max_steps`` steps, step size underflow, a non-finite
            state) raise an error naming the cause, also under ``jax.jit`` and when only a
            derivative or ``info`` is used (default ``True``); with ``False`` the outputs not
            reached are NaN, ``info.status`` is nonzero, and every derivative is NaN.
        full_output: also return an ``Info`` (default ``False``).
        max_dt: the longest step (a magnitude; jax odeint's ``hmax``, solve_ivp's
            ``max_step``); default ``None``, no bound. May be traced.
        jump_ts: times at which ``f`` is discontinuous in ``t`` (any order; those outside the
            interval are ignored). The solver lands exactly on each, evaluating no stage
            past it, and restarts there with ``f`` evaluated just after it, so a jump costs
            no cascade of rejected steps. May be traced. Default ``None``.
        dense: also return a ``jaxode.DenseSolution``, which evaluates the solution at any
            time of the interval from the accepted steps' interpolants (``sol(t)``), under
            ``jit`` and ``vmap``; it holds ``max_steps`` steps, so its memory is
            ``max_steps × (d + 1) × n`` numbers (``d``: the interpolant's degree).
            Differentiable with ``gradient="backprop"`` or ``"checkpoint"``; with the adjoint,
            a gradient that reaches it raises (it would not be computed). Default ``False``.
        progress: show a tqdm progress bar of the solve's time, updated from inside the
            compiled loop a few hundred times per solve at most (default ``False``: nothing
            of it is compiled).
        adjoint_interpolate: the adjoint's backward solve reads ``z`` off the forward
            solution (re-solved forwards on each output interval from the stored output,
            its interpolants kept) instead of integrating ``z`` backwards, and integrates the
            parameter adjoint as a quadrature along the steps (see
            ``jaxode.interpolated_adjoint``). Needed where ``z`` cannot be integrated backwards
            (stiff problems: the default for implicit methods); for an explicit method it
            costs one more forward solve and gives gradients whose error does not grow
            backwards. Memory: a checkpoint every 32 steps and one segment's interpolants.
            Default ``None``: ``True`` for implicit methods, ``False`` for explicit ones.
        reversible_coupling: ``λ`` of ``gradient="reversible"``,
            ``y_{n+1} = λ y_n + (1 - λ) ŷ_n + Ψ_h(ŷ_n)``, ``0 < λ <= 1`` (default 0.999): smaller
            damps the scheme's parasitic mode more but amplifies the reconstruction's rounding
            by ``λ^{-N}`` over ``N`` steps. Ignored by the other modes.
        events: a ``jaxode.Event`` or a list of them (default ``None``): zero crossings of
            conditions of the solution, located on the dense output; a terminal event stops the
            solve there (later outputs NaN, status 0), a non-terminal one may update the state
            and the solve goes on (see ``jaxode.events``). ``info.event_time``,
            ``event_state``, ``event_index`` and ``num_events`` report them; every gradient
            mode differentiates through them.
        max_events: the most events (terminal or not) the solve may fire; ``None`` (default)
            allows ``max_steps`` of them, as each event ends a step; more fail the solve (status 7). With
            non-terminal events ``gradient="adjoint"`` and ``"reversible"`` keep a record of
            each event for the backward pass, allocated up front: ``max_events`` slots of
            ``n`` (adjoint) or ``2n`` (reversible) numbers. Set it where ``max_steps × n`` is
            too much memory.

    Returns:
        ``ys``, with the structure of ``z0`` and each leaf given a leading axis of length
        ``T``; with ``full_output=True``, ``(ys, info)``; with ``dense=True``, ``(ys, sol)``
        or ``(ys, info, sol)``.

    Raises:
        ValueError, TypeError: bad input, before any work where the input is concrete.
        SolveError: a failed solve (``throw=True``) in an eager call. Under the caller's
            ``jax.jit`` JAX raises it wrapped in a ``JaxRuntimeError`` whose last line is the
            ``SolveError`` with its message.

    Compilation cache: an eager call (outside ``jax.jit``) runs a compiled solve kept in a
    cache (a ``jax.jit`` of the solve per key, the 256 most recent kept), keyed on ``f`` and
    the non-array parts of ``params`` (by type and hash: for a function, its identity), the
    shapes, dtypes and weak types of the arrays (``z0``,
    ``ts``, ``params``, the arrays held by an Equinox module ``f``: ``jnp.array(1.1)`` and
    ``jnp.asarray(np.float64(1.1))`` are two keys) and the static options. A repeated
    call with the same ``f`` object costs about what a call inside ``jax.jit`` does; a fresh
    ``lambda`` on every call, or Python numbers as ``params`` that change, compile again.
    As with ``jax.jit``, a global array that ``f`` reads is baked into its compiled solve.
    Inside ``jax.vmap`` called eagerly the solve is traced on every call: put the vmapped
    function in ``jax.jit``.
    """
    opts = Options.cached(
        solver=solver, rtol=rtol, atol=atol, dt0=dt0, max_steps=max_steps, gradient=gradient,
        adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol, adjoint_seminorm=adjoint_seminorm,
        batched=batched, throw=throw, full_output=full_output, max_dt=max_dt, jump_ts=jump_ts,
        dense=dense, progress=progress, adjoint_interpolate=adjoint_interpolate,
        reversible_coupling=reversible_coupling, events=events, max_events=max_events,
    )
    z0, ts = _checked_inputs(z0, ts)
    checked = all(errors.is_concrete(x) for x in (ts, rtol, atol, *jax.tree_util.tree_leaves(z0)))
    static = _Static(_config(opts), opts.gradient, opts.full_output, checked)
    return _run_compiled(f, z0, ts, params, opts.arrays(), static)


def _config(opts: Options) -> Config:
    return Config(opts.method, opts.max_steps, opts.adjoint_seminorm, opts.throw, opts.batched,
                  opts.dense, opts.progress, opts.interpolate, opts.reversible_coupling, opts.events,
                  opts.max_events)


def _checked_inputs(z0, ts):
    """``(z0, ts)`` as arrays, checked before any work (by value where they are concrete)."""
    z0 = _as_state(z0)
    errors.check_z0(z0)
    return z0, errors.check_ts(ts)


def _run_compiled(f, z0, ts, params, arrays, static: _Static):
    """``_solve`` through the cache of compiled functions (``_run_cached``; see ``odesolve``'s
    notes). ``arrays``: ``Options.arrays()``."""
    args = (f, z0, ts, params, arrays, static)
    if adjoint.batch_traced(args):  # under jax.vmap the adjoint's own batching rule must see the solve
        return _solve(*args)
    return _run_cached(_solve, *args)


def _run_cached(fn: Callable, *args):
    """``fn(*args)``, run by a ``jax.jit`` of ``fn`` kept per ``fn``, structure of ``args`` and
    non-array leaves; an eager call waits for its result, so that a failure raises here as a
    ``SolveError``. With a non-array leaf that cannot be hashed (``f``, a parameter) ``fn``
    runs without the cache."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    is_array = [_is_array(x) for x in leaves]
    dynamic = [x for x, a in zip(leaves, is_array) if a]
    statics = tuple(_ARRAY if a else (type(x), x) for x, a in zip(leaves, is_array))
    try:
        compiled = _compiled(fn, tree, statics)
    except TypeError:
        return fn(*args)
    return _run_eagerly_raising(compiled, *dynamic)


def _is_array(x) -> bool:
    """Whether a leaf is an argument of the compiled function (``equinox.is_array``), with the
    common case first."""
    return type(x) is _ArrayImpl or isinstance(x, (jax.Array, np.ndarray, np.generic))


_ARRAY = object()  # the place of an array among the leaves of ``_compiled``'s key
_ArrayImpl = type(jnp.zeros(()))


@functools.lru_cache(maxsize=256)
def _compiled(fn: Callable, tree, statics: tuple) -> Callable:
    """``jax.jit`` of ``fn`` for arguments of structure ``tree`` whose non-array leaves are
    ``statics`` (``(type, value)`` pairs; ``_ARRAY`` where an array goes): it takes the arrays.
    (``equinox.filter_jit`` does the same with ~0.1 ms more of Python per call.)"""

    def run(*arrays):
        it = iter(arrays)
        leaves = [next(it) if x is _ARRAY else x[1] for x in statics]
        return fn(*jax.tree_util.tree_unflatten(tree, leaves))

    return jax.jit(run)


def _run_eagerly_raising(compiled: Callable, *args):
    """``compiled(*args)``; called eagerly, it waits for the result and raises a failure as the
    ``SolveError`` itself (JAX would wrap it in a ``JaxRuntimeError``)."""
    try:
        out = compiled(*args)
        if not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(out)):
            jax.block_until_ready(out)
    except jax.errors.JaxRuntimeError as e:
        message = errors.solve_error_message(e)
        if message is None:
            raise
        raise errors.SolveError(message) from None
    return out


def _solve(f, z0, ts, params, arrays, static: _Static):
    """The solve of ``odesolve`` (its inputs already checked by value where concrete)."""
    cfg = static.config
    if errors.is_empty(z0):
        return _empty_solve(z0, ts, cfg.batched, static.full_output, cfg.dense)
    rtol, atol, dt0, adjoint_rtol, adjoint_atol, max_dt, jump_ts = arrays
    pb = _prepare(f, z0, ts, params, rtol, atol, dt0, cfg.batched, static.checked)
    controls = Controls(pb.rtol, pb.atol, pb.dt0, _as(max_dt, pb.ts.dtype), _as(jump_ts, pb.ts.dtype))
    adjoint_tols = (_as(adjoint_rtol, pb.rtol.dtype, pb.rtol), _as(adjoint_atol, pb.atol.dtype, pb.atol))
    field, diff, nondiff, mode = pb.field, pb.diff, pb.nondiff, MODES[static.gradient]
    if cfg.events is not None:
        field, diff, nondiff, cfg, mode = _with_events(f, z0, params, pb, cfg, static.gradient)
    sol = mode(field, pb.y0, pb.ts, diff, nondiff, controls, adjoint_tols, cfg)
    ys, info, dense = sol.ys, sol.info, sol.dense
    if cfg.events is not None:
        unravel = jax.vmap(pb.unravel) if cfg.batched else pb.unravel
        info = info._replace(event_state=unravel(info.event_state))
    if cfg.throw:  # on info and the dense steps too: a caller may use them alone
        ys, info, dense = errors.raise_on_failure((ys, info, dense), info.status)
    else:
        ys = errors.nan_gradient_on_failure(ys, info.status)
        if dense is not None:
            dense = errors.nan_gradient_on_failure(dense, info.status)
    ys = jax.vmap(jax.vmap(pb.unravel))(ys) if cfg.batched else jax.vmap(pb.unravel)(ys)
    out = (ys, info) if static.full_output else (ys,)
    if cfg.dense:
        out += (DenseSolution.of(dense, info, pb.ts, cfg.method, pb.unravel, cfg.batched),)
    return out if len(out) > 1 else out[0]


def _with_events(f, z0, params, pb: _Problem, cfg: Config, gradient: str):
    """The problem with its events attached: ``(field, diff, nondiff, cfg, mode)`` (see
    ``events.attach``); the adjoint mode's is ``event_adjoint.solve``."""
    from . import event_adjoint

    z_one = jax.tree_util.tree_map(lambda x: x[0], z0) if cfg.batched else z0
    y_one = pb.y0[0] if cfg.batched else pb.y0
    ravel = lambda tree: ravel_pytree(_real_view(tree))[0]
    field, diff, nondiff, flat = events.attach(
        cfg.events, pb.field, pb.diff, pb.nondiff, z_one, pb.ts[0], y_one, params, pb.unravel, ravel,
        cfg.max_events,
    )
    mode = event_adjoint.solve if gradient == "adjoint" else MODES[gradient]
    return field, diff, nondiff, cfg._replace(events=flat), mode


def _as(x, dtype, default=None):
    """``x`` as an array of ``dtype``, or ``default`` if ``x`` is ``None``."""
    return default if x is None else jnp.asarray(x, dtype)


def _empty_solve(z0, ts, batched: bool, full_output: bool, dense: bool):
    """A state with no elements: nothing to integrate; ``ys`` holds ``len(ts)`` empty copies
    (after the batch axis, if ``batched``)."""
    if dense:
        raise ValueError("dense=True needs a state with at least one element")
    axis = 1 if batched else 0
    ys = jax.tree_util.tree_map(lambda x: jnp.repeat(jnp.expand_dims(x, axis), ts.shape[0], axis), z0)
    batch = (jnp.shape(jax.tree_util.tree_leaves(z0)[0])[0],) if batched else ()
    zero = jnp.zeros(batch, jnp.int32)
    final = jnp.broadcast_to(ts[-1].astype(time_dtype(ts.dtype)), batch)
    info = Info(num_steps=zero, num_accepted=zero, num_rejected=zero, nfe=zero, status=zero,
                num_jacobians=zero, final_time=final)
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
        options: ``odesolve``'s keyword options (a ``jaxode.Options``'s fields): ``solver``,
            ``rtol``, ``atol``, ``dt0``, ``max_steps``, ``adjoint_rtol``, ``adjoint_atol``,
            ``adjoint_seminorm``, ``throw`` (a failed forward or backward solve raises, as in
            ``odesolve``; with ``False`` the infos' ``status`` says so), ``batched`` (``z0``'s
            leading axis holds independent problems, solved as ``odesolve(batched=True)``'s
            adjoint does). ``gradient`` may only be ``"adjoint"``; ``full_output`` is ignored
            (the infos are always returned).

    Returns:
        ``((∂L/∂z0, ∂L/∂ts), (forward_info, backward_info))``, ``∂L/∂z0`` flat, shape ``(n,)``
        (``(B, n)`` and infos of shape ``(B,)`` with ``batched=True``).

    Raises:
        TypeError: an unknown option (the message names it).
        ValueError: a bad option value, or ``gradient`` other than ``"adjoint"``.
    """
    opts = Options(**options)  # TypeError naming an unknown key
    if opts.gradient != "adjoint":
        raise ValueError(f"adjoint_backward_info runs the adjoint method: gradient must be "
                         f"'adjoint', got {opts.gradient!r}")
    if opts.dense:
        raise ValueError("adjoint_backward_info: dense=True is not supported")
    if opts.events is not None:
        raise ValueError("adjoint_backward_info: events are not supported")
    z0, ts = _checked_inputs(z0, ts)
    return _run_cached(_backward_info, f, z0, ts, params, cotangent, opts.arrays(), _config(opts))


def _backward_info(f, z0, ts, params, cotangent, arrays, cfg: Config):
    """``adjoint_backward_info``'s solves, compiled as ``odesolve``'s are."""
    rtol, atol, dt0, adjoint_rtol, adjoint_atol, max_dt, jump_ts = arrays
    pb = _prepare(f, z0, ts, params, rtol, atol, dt0, cfg.batched)
    controls = Controls(pb.rtol, pb.atol, pb.dt0, _as(max_dt, pb.ts.dtype), _as(jump_ts, pb.ts.dtype))
    run_forward, backward = (forward_batched, adjoint.backward_batched) if cfg.batched else (
        forward, adjoint.backward)
    sol = run_forward(pb.field, pb.y0, pb.ts, pb.diff, pb.nondiff, controls, cfg)
    ys, fwd_info = sol.ys, sol.info
    flat = lambda c: ravel_pytree(c)[0]
    if cotangent is None:
        ct = jnp.ones_like(ys)
    else:
        ct = jax.vmap(jax.vmap(flat))(cotangent) if cfg.batched else jax.vmap(flat)(cotangent)
    bwd_controls = controls._replace(
        rtol=_as(adjoint_rtol, pb.rtol.dtype, pb.rtol), atol=_as(adjoint_atol, pb.atol.dtype, pb.atol),
        dt0=sol.last_step if cfg.method.adaptive else pb.dt0,
    )
    args = (pb.field, ys, pb.ts, pb.diff, pb.nondiff, ct)
    if cfg.interpolate:
        interpolated = interpolated_adjoint.backward_batched if cfg.batched else interpolated_adjoint.backward
        ct_y0, ct_ts, _, bwd_info = interpolated(*args, controls, bwd_controls, cfg)
    else:
        ct_y0, ct_ts, _, bwd_info = backward(*args, bwd_controls, cfg)
    out = (ct_y0, ct_ts), (fwd_info, bwd_info)
    if cfg.throw:  # like odesolve: a failed solve raises, also when only the infos are used
        fwd_status, bwd_status = jnp.max(fwd_info.status), jnp.max(bwd_info.status)
        out = errors.raise_on_failure(out, jnp.where(fwd_status != 0, fwd_status, bwd_status))
    return out

