"""The time-stepping loop: steps, writes the outputs that fall in each step, counts, fails.

One loop serves every solve:

* the forward solve of an adaptive method (``dense`` outputs): the step size is set by the
  error controller alone and every output time inside an accepted step is interpolated, so
  many output times cost little beyond the steps;
* a fixed-step method, and the adjoint's backward solve (``stop`` at outputs): each step
  is clipped to land on the next output time; there the output is recorded and an optional
  ``jump(i, y)`` replaces the state (the adjoint adds ``∂L/∂ys[i]`` and re-anchors ``z``).
  A fixed-step grid restarts at each output time; an adaptive one keeps its step size.

A solve backwards in time (decreasing ``ts``) runs forwards in ``s = -t`` with the field
``-f(y, -s)``. The loop stops at the last output, or on a failure (status codes in
``errors``): more than ``max_steps`` steps, a step size that underflows (``t + h == t``
at the current time), a non-finite state (the loop does not start from a non-finite ``y0``
or ``f(y0, t0)``), an invalid traced tolerance or ``dt0`` (none is started either).
Outputs not reached stay NaN.

Time dtype (``time_dtype``): time is carried in the floating dtype of ``ts``, at least
float32 (float16 and bfloat16 ``ts`` are promoted), whatever the state's dtype: a float32
state may run on float64 times, and a float16 state runs on float32 times. ``field``
receives ``t`` in that dtype. Step sizes live in the time dtype and are cast to the state
dtype only where they multiply state increments; each step is the one the time really
advanced by, ``h = (t + h_try) - t`` as rounded, so that ``y`` and ``t`` never drift apart
at large ``|t|``. Error norms and tolerances are in the state dtype, at least float32
(``step.error_dtype``).

The step attempt is shared by three drivers: ``Loop.solve``, nested ``lax.while_loop``s (over
the output times, and over the steps up to the next one), for a small system that is not
reverse-differentiated; a flat ``lax.while_loop`` over ``Loop.step`` for a large one, and under
``jax.vmap`` (each problem then steps on without waiting for the others at each output time);
and ``backprop.checkpointed_while`` (nested, checkpointed scans) over ``Loop.step`` for
``gradient="backprop"``, where outputs are written by masking so that the whole body can be
transposed, and step sizes are held constant under differentiation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax

from . import errors
from .backprop import checkpointed_while, custom_vjp_while, hoist
from .interpolation import dense_coefficients, evaluate
from .step import error_dtype, error_ratio, initial_step, rk_step, stage_times, step_factor
from .tableaus import ButcherTableau

# XLA's CPU runtime runs a loop body inline when every buffer it touches is at most this big
# (ThunkExecutor's execute_sequential_buffer_threshold), else through its dataflow executor.
_INLINE_BYTES = 512


def time_dtype(ts_dtype) -> jnp.dtype:
    """The dtype time is carried in: that of ``ts``, at least float32."""
    return jnp.promote_types(ts_dtype, jnp.float32)


class StepRecord(NamedTuple):
    """What one step attempt evaluated, for quadratures along the solution (real time)."""

    inputs: Array  # (s, n): the states at which the stages were evaluated
    times: Array  # (s,): their times
    h: Array  # the step, signed in real time; 0 if the attempt was rejected


class LoopState(NamedTuple):
    """The loop's carry (time in the forward-running variable ``s``)."""

    t: Array  # current time
    y: Array  # state at t, (n,)
    f: Array  # field at (y, t), (n,)
    h: Array  # next step to try (> 0)
    ratio_prev: Array  # error ratio of the last accepted step (PI controller)
    ys: Array | None  # outputs, (T, n); NaN where not reached
    i_out: Array  # index of the next output time
    num_accepted: Array
    num_rejected: Array
    nfe: Array  # field evaluations besides the step attempts' (all of them after ``Loop.finish``)
    finite: Array  # whether the last step attempt (its state and error) was finite
    status: Array  # a failure found by ``init`` (the loop does not run), else set by ``Loop.finish``


class Attempt(NamedTuple):
    """One step attempt from ``(t, y)`` to ``(t_new, y_new)`` (forward-running time)."""

    accept: Array
    landed: Array  # the step was shortened to end exactly on its target time
    t: Array
    y: Array
    h: Array  # the step used, ``t_new - t``
    t_new: Array
    y_new: Array
    stages: Array  # (s, n): the stage derivatives k_i
    record: StepRecord


class _LastStep(NamedTuple):
    """The last accepted step, to interpolate the outputs inside it (``Loop.solve``)."""

    t: Array
    h: Array
    t_new: Array
    y: Array
    y_new: Array
    dense: Array  # its interpolant's coefficients (d, n); its stages (s, n) if it needs extra ones


class Loop(NamedTuple):
    """A solve's loop (see ``make_loop``)."""

    init: Callable[[], LoopState]
    step: Callable[[LoopState], tuple[LoopState, StepRecord]]
    running: Callable[[LoopState], Array]
    finish: Callable[[LoopState], LoopState]
    solve: Callable[[], LoopState]


def integrate(field, y0, ts, rtol, atol, dt0, *, tableau, max_steps, gradient=None, **options):
    """Solves ``y' = field(y, t)``, ``y(ts[0]) = y0`` and returns the final ``LoopState``.

    The arguments are those of ``make_loop``; ``gradient`` picks a reverse-differentiable
    driver: ``"backprop"``, ``backprop.checkpointed_while``; ``"checkpoint"``,
    ``backprop.custom_vjp_while``. Otherwise a system whose stages fit in
    ``_INLINE_BYTES`` runs ``Loop.solve`` (nested loops; the flat loop under ``jax.vmap``), and
    a larger one the flat ``lax.while_loop`` over ``Loop.step`` (there the step's own cost
    dominates and the nested loops gain nothing).
    """
    args = (field, y0, ts, rtol, atol, dt0)
    options = dict(options, tableau=tableau, max_steps=max_steps)
    loop = make_loop(*args, differentiable=gradient is not None, **options)
    body = lambda state: loop.step(state)[0]  # noqa: E731
    if gradient == "backprop":
        stages = tableau.num_stages
        state = checkpointed_while(loop.running, body, loop.init(), max_steps, residual_ratio=stages)
        return loop.finish(state)
    if gradient == "checkpoint":
        fast = make_loop(*args, **options)

        def outputs_apart(step):
            def body(carry, ys):
                new = step(carry._replace(ys=ys))[0]
                return new._replace(ys=None), new.ys

            return body

        state = loop.init()
        carry, ys = custom_vjp_while(
            loop.running, outputs_apart(loop.step), state._replace(ys=None), state.ys, max_steps,
            fast_body=outputs_apart(fast.step),
        )
        return loop.finish(carry._replace(ys=ys))
    flat = lambda: loop.finish(lax.while_loop(loop.running, body, loop.init()))  # noqa: E731
    if _is_large(tableau, y0):
        return flat()
    return _vmapped_as(loop.solve, flat)


def _is_large(tableau: ButcherTableau, y0) -> bool:
    """Whether a step's stages exceed ``_INLINE_BYTES``: then its cost is the field's, and the
    flat driver runs it."""
    return tableau.num_stages * y0.size * y0.dtype.itemsize > _INLINE_BYTES


def _vmapped_as(fn: Callable[[], Any], vmappable: Callable[[], Any]):
    """``fn()``, whose ``jax.vmap`` is computed as ``jax.vmap`` of ``vmappable()`` instead.

    ``fn`` and ``vmappable`` compute the same thing (here: ``Loop.solve`` and the flat loop).
    The nested loops of ``solve`` are the faster for one problem, but under ``jax.vmap`` every
    problem would wait for the others at each output time; the flat loop lets each problem
    step on by itself. Everything the two functions close over is passed in explicitly, as
    ``custom_vmap`` requires to see what is batched.
    """
    run_fn, fn_consts = hoist(fn)
    run_flat, flat_consts = hoist(vmappable)

    @jax.custom_batching.custom_vmap
    def run(fn_consts, flat_consts):
        return run_fn(fn_consts)

    @run.def_vmap
    def _rule(axis_size, in_batched, fn_consts, flat_consts):
        in_axes = [0 if batched else None for batched in in_batched[1]]
        out = jax.vmap(run_flat, in_axes=(in_axes,), axis_size=axis_size)(flat_consts)
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return run(fn_consts, flat_consts)


def make_loop(
    field: Callable[[Array, Array], Array],
    y0: Array,
    ts: Array,
    rtol,
    atol,
    dt0,
    *,
    tableau: ButcherTableau,
    max_steps: int,
    jump: Callable[[Array, Array], Array] | None = None,
    save_outputs: bool = True,
    segments: tuple | None = None,
    differentiable: bool = False,
) -> Loop:
    """The loop for ``y' = field(y, t)``, ``y(ts[0]) = y0``.

    Returns a ``Loop``: ``init()`` builds the first state (evaluating ``field`` once or twice);
    ``step(state) -> (state, StepRecord)`` makes one step attempt and writes the outputs it
    reaches; ``running(state)`` says whether the loop goes on (failures are read off the
    state, not tracked step by step); ``finish(state)`` sets the final ``status`` and
    ``nfe``; ``solve()`` runs the whole solve as two nested ``lax.while_loop``s, an outer one
    over the output times (writing all outputs inside the step that reached the next one)
    and an inner one stepping up to the next of them. The inner loop carries only the state
    of size ``n`` (no outputs, no ``ts``): XLA's CPU runtime runs a loop body inline when its
    buffers are all small (<= 512 bytes) or it has at most 8 operations, which for small
    systems makes a step several times cheaper.
    ``integrate`` drives ``solve`` for such small systems, and ``step`` otherwise, under
    ``lax.while_loop`` or ``backprop.checkpointed_while``; the adjoint's batched backward
    solve drives ``step`` itself.

    Args:
        field: the vector field on flat states, ``(n,), scalar -> (n,)``.
        y0: the initial state, shape ``(n,)``.
        ts: the output times, shape ``(T,)``, strictly monotonic.
        rtol, atol: tolerances of the error control (ignored by fixed-step methods).
        dt0: the first step size (a magnitude), or ``None`` to choose it automatically;
            the step size of a fixed-step method.
        tableau: the Runge–Kutta method.
        max_steps: the most step attempts (accepted + rejected) of the whole solve.
        jump: ``jump(i, y) -> y`` applied on landing at ``ts[i]`` (``i >= 1``); implies
            stopping at every output time.
        save_outputs: whether to keep the ``(T, n)`` outputs in ``LoopState.ys``.
        segments: ``[(start, stop), ...]`` parts of ``y`` whose RMS errors are combined by
            max (default: all of ``y``).
        differentiable: write outputs by masking and hold step sizes constant under
            differentiation (for the reverse-differentiable driver).
    """
    n = y0.shape[0]
    segments = ((0, n),) if segments is None else segments
    stop_at_outputs = jump is not None or not tableau.adaptive
    dtype, tdtype, edtype = y0.dtype, time_dtype(ts.dtype), error_dtype(y0.dtype)
    direction = jnp.where(ts[-1] >= ts[0], 1, -1).astype(tdtype)
    s_ts = direction * ts.astype(tdtype)
    num_out = ts.shape[0]
    int_ = jnp.int32
    eps = jnp.finfo(tdtype).eps
    if tableau.adaptive:
        rtol, atol = jnp.asarray(rtol, edtype), jnp.asarray(atol, edtype)

    def g(y, s):
        return direction.astype(dtype) * field(y, direction * s)

    def init() -> LoopState:
        f0 = g(y0, s_ts[0])
        span = s_ts[-1] - s_ts[0]
        if dt0 is None:
            h0 = initial_step(g, s_ts[0], y0, f0, span, tableau.order, rtol, atol, segments)
            nfe0 = 2
        else:
            h0 = dt0
            nfe0 = 1
        h0 = jnp.asarray(h0).astype(tdtype)
        if differentiable:
            h0 = lax.stop_gradient(h0)
        ys = jnp.full((num_out, n), jnp.nan, dtype).at[0].set(y0) if save_outputs else None
        finite = jnp.all(jnp.isfinite(y0)) & jnp.all(jnp.isfinite(f0))
        status = jnp.where(
            _valid_options(rtol, atol, dt0, tableau.adaptive),
            jnp.where(finite, errors.SUCCESS, errors.NONFINITE),
            errors.INVALID_TOLERANCE,
        )
        return LoopState(
            t=s_ts[0], y=y0, f=f0, h=h0, ratio_prev=jnp.ones((), edtype),
            ys=ys, i_out=jnp.ones((), int_), num_accepted=jnp.zeros((), int_),
            num_rejected=jnp.zeros((), int_), nfe=jnp.asarray(nfe0, int_),
            finite=jnp.ones((), bool), status=status.astype(int_),
        )

    def attempt(state: LoopState, target) -> tuple[LoopState, Attempt]:
        """One step attempt towards ``target`` (clipped to end on it). Leaves ``ys``,
        ``i_out`` and ``status`` alone."""
        t, y, h = state.t, state.y, state.h
        t_try = t + h
        landed = t_try >= target - 64 * eps * jnp.maximum(jnp.abs(t), jnp.abs(target))
        t_new = jnp.where(landed, target, t_try)
        h_used = t_new - t  # the step the time really advanced by
        step = rk_step(tableau, g, t, y, h_used, state.f, t_new)
        finite = jnp.all(jnp.isfinite(step.y_new))
        if tableau.adaptive:
            # step control only, never differentiated: the norm's derivative at a zero error is inf
            ratio = lax.stop_gradient(error_ratio(step, y, rtol, atol, segments))
            for error in (step.error, step.error3):
                finite = finite & (True if error is None else jnp.all(jnp.isfinite(error)))
            ratio = jnp.where(finite, ratio, jnp.inf)
            accept = finite & (ratio <= 1)
        else:
            ratio = jnp.zeros((), edtype)
            accept = finite
        f_new = step.f_new if tableau.fsal else g(step.y_new, t_new)
        h_next = h
        if tableau.adaptive:
            factor = step_factor(ratio, state.ratio_prev, accept, tableau.error_order).astype(tdtype)
            h_next = _next_step_size(h, h_used, factor, accept, landed & stop_at_outputs)
        if differentiable:
            h_next = lax.stop_gradient(h_next)
        num_accepted = state.num_accepted + accept.astype(int_)
        num_rejected = state.num_rejected + (~accept).astype(int_)
        new_state = state._replace(
            t=jnp.where(accept, t_new, t),
            y=jnp.where(accept, step.y_new, y),
            f=jnp.where(accept, f_new, state.f),
            h=h_next,
            ratio_prev=jnp.where(accept, ratio, state.ratio_prev),
            num_accepted=num_accepted,
            num_rejected=num_rejected,
            finite=finite,
        )
        record = StepRecord(
            inputs=jnp.stack(step.inputs),
            times=direction * jnp.stack(stage_times(tableau, t, h_used, t_new)),
            h=jnp.where(accept, direction * h_used, 0),
        )
        stages = jnp.stack(step.stages)
        return new_state, Attempt(accept, landed, t, y, h_used, t_new, step.y_new, stages, record)

    def arrive(state: LoopState, i, arrived) -> LoopState:
        """On arriving at output ``i``: the jump, and the field at the state it gives."""
        y = jump(i, state.y)
        again = arrived & (i < num_out - 1)  # not needed after the last output
        f = lax.cond(again, lambda: g(y, state.t), lambda: state.f)
        return state._replace(y=jnp.where(arrived, y, state.y), f=f, nfe=state.nfe + again.astype(int_))

    def coefficients(at: Attempt | _LastStep, stages, f_new):
        return dense_coefficients(tableau, g, at.t, at.y, at.h, list(stages), at.y_new, f_new)

    def step(state: LoopState) -> tuple[LoopState, StepRecord]:
        i = state.i_out
        if stop_at_outputs:
            new, at = attempt(state, s_ts[i])
            arrived = at.accept & at.landed
            ys = new.ys
            if ys is not None:
                ys = ys.at[i].set(jnp.where(arrived, at.y_new, ys[i]))
            if jump is not None:
                new = arrive(new, i, arrived)
            return new._replace(ys=ys, i_out=i + arrived.astype(int_)), at.record
        new, at = attempt(state, s_ts[-1])
        in_step = at.accept & (s_ts[jnp.minimum(i, num_out - 1)] <= at.t_new)
        if tableau.extra_c:  # costly extra stages: only when an output needs them
            degree = len(tableau.dense[0])
            zeros = jnp.zeros((degree, n), dtype)
            coeffs = lax.cond(in_step, lambda: coefficients(at, at.stages, new.f), lambda: zeros)
            new = new._replace(nfe=new.nfe + in_step.astype(int_) * len(tableau.extra_c))
        else:
            coeffs = coefficients(at, at.stages, new.f)
        write = _write_masked if differentiable else _write_while  # transposable, or cheaper
        ys, i_out = write(new.ys, i, s_ts, at.accept, at, coeffs, tableau.dense_nested)
        return new._replace(ys=ys, i_out=i_out), at.record

    def failure(state: LoopState) -> Array:
        """Why the solve cannot go on (``errors`` codes), read off its state: a failure found by
        ``init``; a step too small to move ``t`` at the current time, ``t + h == t`` (or a NaN
        step; a non-finite field brings it about by shrinking the step); for a fixed-step
        method, a non-finite state at once; or ``max_steps`` spent."""
        stuck = ~(state.t + state.h > state.t)  # also for a NaN h
        code = jnp.where(stuck, jnp.where(state.finite, errors.STEP_SIZE_UNDERFLOW, errors.NONFINITE), 0)
        if not tableau.adaptive:
            code = jnp.where(state.finite, code, errors.NONFINITE)
        code = jnp.where(state.status != errors.SUCCESS, state.status, code)
        out_of_steps = state.num_accepted + state.num_rejected >= max_steps
        return jnp.where((code == errors.SUCCESS) & out_of_steps, errors.MAX_STEPS_REACHED, code).astype(int_)

    def running(state: LoopState) -> Array:
        return (state.i_out < num_out) & (failure(state) == errors.SUCCESS)

    def finish(state: LoopState) -> LoopState:
        """The final state with its ``status``, and its ``nfe`` counting the step attempts'."""
        failed = failure(state)
        per_attempt = tableau.num_stages - (1 if tableau.fsal else 0)
        return state._replace(
            status=jnp.where(state.i_out < num_out, failed, errors.SUCCESS).astype(int_),
            nfe=state.nfe + per_attempt * (state.num_accepted + state.num_rejected),
        )

    def step_until(state: LoopState, until, clip_to, last: _LastStep | None):
        """The inner loop: steps (each clipped to end at ``clip_to`` at the latest) until
        ``state.t`` reaches ``until`` or the solve fails; with ``last``, also returns the last
        step (the accepted one that got there). Carries nothing of size ``T``."""

        def body(carry):
            new, at = attempt(carry[0], clip_to)
            if last is None:
                return (new,)
            dense = at.stages if tableau.extra_c else coefficients(at, at.stages, new.f)
            return new, _LastStep(at.t, at.h, at.t_new, at.y, at.y_new, dense)

        more = lambda carry: (carry[0].t < until) & (failure(carry[0]) == errors.SUCCESS)  # noqa: E731
        carry = (state._replace(ys=None),) + ((last,) if last is not None else ())
        carry = lax.while_loop(more, body, carry)
        return carry[0]._replace(ys=state.ys), (carry[1] if last is not None else None)

    def write(ys, i, arrived, value):
        """``ys[i] = value`` if ``arrived``, else NaN (not reached)."""
        if ys is None:
            return None
        return lax.dynamic_update_index_in_dim(ys, jnp.where(arrived, value, jnp.nan), i, 0)

    def solve() -> LoopState:
        state = init()
        if stop_at_outputs:
            def outer(state):
                i = state.i_out
                target = lax.dynamic_index_in_dim(s_ts, i, keepdims=False)
                new, _ = step_until(state, target, target, None)
                arrived = new.t >= target
                new = new._replace(ys=write(new.ys, i, arrived, new.y))
                if jump is not None:
                    new = arrive(new, i, arrived)
                return new._replace(i_out=i + arrived.astype(int_))

            return finish(lax.while_loop(running, outer, state))

        degree = 3 if tableau.dense is None else len(tableau.dense[0])
        dense_rows = tableau.num_stages if tableau.extra_c else degree
        one, s_end = jnp.ones((), tdtype), s_ts[-1]
        last = _LastStep(state.t, one, state.t, y0, y0, jnp.zeros((dense_rows, n), dtype))

        def outer(carry):
            state, last = carry
            i = state.i_out
            target = lax.dynamic_index_in_dim(s_ts, i, keepdims=False)
            new, last = step_until(state, target, s_end, last)
            arrived = new.t >= target  # else the solve failed
            if tableau.extra_c:  # the extra stages once per step with outputs
                coeffs = coefficients(last, last.dense, new.f)
                new = new._replace(nfe=new.nfe + arrived.astype(int_) * len(tableau.extra_c))
            else:
                coeffs = last.dense
            ys, i_out = _write_while(new.ys, i, s_ts, arrived, last, coeffs, tableau.dense_nested)
            return new._replace(ys=ys, i_out=i_out), last

        return finish(lax.while_loop(lambda carry: running(carry[0]), outer, (state, last))[0])

    return Loop(init, step, running, finish, solve)


def _valid_options(rtol, atol, dt0, adaptive: bool) -> Array:
    """Whether the (possibly traced) tolerances are finite, >= 0 and not both 0 (adaptive
    methods only) and ``dt0``, if given, finite and > 0."""
    valid = jnp.ones((), bool)
    if adaptive:
        for tol in (rtol, atol):
            valid = valid & jnp.all(jnp.isfinite(tol)) & jnp.all(tol >= 0)
        valid = valid & ~jnp.any((rtol == 0) & (atol == 0))
    if dt0 is not None:
        valid = valid & jnp.all(jnp.isfinite(dt0)) & jnp.all(jnp.asarray(dt0) > 0)
    return valid


def _next_step_size(h, h_used, factor, accept, landed_at_stop):
    """The controller's next step from the one used; a step shortened to land on an output
    time it stops at keeps the size it had before; a rejection shrinks the step (by
    ``factor < 1``) from the smaller of the one tried and the one used, which rounding of
    ``t + h`` (or landing on an output time) may have made longer: else it could be tried
    again and again."""
    h_next = h_used * factor
    h_next = jnp.where(accept & landed_at_stop, jnp.maximum(h_next, h), h_next)
    return jnp.where(accept, h_next, factor * jnp.minimum(h, h_used))


def _write_while(ys, i_out, s_ts, accept, step: Attempt | _LastStep, coeffs, nested):
    """Writes the outputs in ``step``'s ``(t, t_new]`` one by one, if ``accept`` (cost: the
    outputs in this step)."""
    num_out = s_ts.shape[0]
    t, h, t_new, y, y_new = step.t, step.h, step.t_new, step.y, step.y_new

    def more(carry):
        i, _ = carry
        return accept & (i < num_out) & (s_ts[jnp.minimum(i, num_out - 1)] <= t_new)

    def write(carry):
        i, ys = carry
        s_i = lax.dynamic_index_in_dim(s_ts, i, keepdims=False)
        value = jnp.where(s_i == t_new, y_new, evaluate(y, coeffs, (s_i - t) / h, nested))
        return i + 1, lax.dynamic_update_index_in_dim(ys, value, i, 0)

    i_out, ys = lax.while_loop(more, write, (i_out, ys))
    return ys, i_out


def _write_masked(ys, i_out, s_ts, accept, step: Attempt, coeffs, nested):
    """Writes the outputs in ``step``'s ``(t, t_new]``, if ``accept``, by masking all of them
    (reverse-differentiable)."""
    t, h, t_new, y, y_new = step.t, step.h, step.t_new, step.y, step.y_new
    inside = accept & (s_ts > t) & (s_ts <= t_new)
    theta = jnp.clip((s_ts - t) / h, 0, 1)
    values = jax.vmap(lambda th: evaluate(y, coeffs, th, nested))(theta)
    values = jnp.where((s_ts == t_new)[:, None], y_new, values)
    return jnp.where(inside[:, None], values, ys), i_out + jnp.sum(inside).astype(i_out.dtype)
