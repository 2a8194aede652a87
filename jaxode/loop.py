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
``errors``): more than ``max_steps`` steps, a step size that underflows, a non-finite state.
Outputs not reached stay NaN.

The loop body is shared by two drivers: ``lax.while_loop`` for a solve that is not
reverse-differentiated, and ``backprop.checkpointed_while`` (nested, checkpointed scans) for
``gradient="backprop"``; there outputs are written by masking rather than an inner while loop
so that the whole body can be transposed, and step sizes are held constant under
differentiation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax

from . import errors
from .backprop import checkpointed_while
from .interpolation import dense_coefficients, evaluate
from .step import error_ratio, initial_step, rk_step, stage_times, step_factor
from .tableaus import ButcherTableau


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
    nfe: Array  # field evaluations
    status: Array  # errors.SUCCESS, or the failure


def integrate(field, y0, ts, rtol, atol, dt0, *, tableau, max_steps, differentiable=False, **options):
    """Solves ``y' = field(y, t)``, ``y(ts[0]) = y0`` and returns the final ``LoopState``.

    The arguments are those of ``make_loop``; ``differentiable`` picks the reverse-differentiable
    driver (``backprop.checkpointed_while``) over ``lax.while_loop``.
    """
    init, step, running = make_loop(
        field, y0, ts, rtol, atol, dt0, tableau=tableau, max_steps=max_steps,
        differentiable=differentiable, **options,
    )
    body = lambda state: step(state)[0]  # noqa: E731
    if differentiable:
        return checkpointed_while(running, body, init(), max_steps, residual_ratio=tableau.num_stages)
    return lax.while_loop(running, body, init())


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
) -> tuple[LoopState, Callable, Callable]:
    """The loop for ``y' = field(y, t)``, ``y(ts[0]) = y0``: ``(init, step, running)``.

    ``init()`` builds the first state (evaluating ``field`` once or twice);
    ``step(state) -> (state, StepRecord)`` makes one step attempt; ``running(state)`` says
    whether the loop goes on. ``integrate`` drives them; the adjoint's batched backward solve
    drives them itself.

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
    dtype = y0.dtype
    direction = jnp.where(ts[-1] >= ts[0], 1, -1).astype(dtype)
    s_ts = direction * ts.astype(dtype)
    num_out = ts.shape[0]

    def g(y, s):
        return direction * field(y, direction * s)

    int_ = jnp.int32

    def init() -> LoopState:
        f0 = g(y0, s_ts[0])
        span = s_ts[-1] - s_ts[0]
        if dt0 is None:
            h0 = initial_step(g, s_ts[0], y0, f0, span, tableau.order, rtol, atol, segments)
            nfe0 = 2
        else:
            h0 = jnp.asarray(dt0, dtype)
            nfe0 = 1
        if differentiable:
            h0 = lax.stop_gradient(h0)
        ys = jnp.full((num_out, n), jnp.nan, dtype).at[0].set(y0) if save_outputs else None
        return LoopState(
            t=s_ts[0], y=y0, f=f0, h=jnp.asarray(h0, dtype), ratio_prev=jnp.ones((), dtype),
            ys=ys, i_out=jnp.ones((), int_), num_accepted=jnp.zeros((), int_),
            num_rejected=jnp.zeros((), int_), nfe=jnp.asarray(nfe0, int_),
            status=jnp.asarray(errors.SUCCESS, int_),
        )

    def step_fn(state: LoopState) -> tuple[LoopState, StepRecord]:
        t, y, h = state.t, state.y, state.h
        target = s_ts[state.i_out] if stop_at_outputs else s_ts[-1]
        eps = jnp.finfo(dtype).eps
        landed = t + h >= target - 64 * eps * jnp.maximum(jnp.abs(t), jnp.abs(target))
        h_used = jnp.where(landed, target - t, h)
        t_new = jnp.where(landed, target, t + h_used)
        step = rk_step(tableau, g, t, y, h_used, state.f, t_new)
        finite = jnp.all(jnp.isfinite(step.y_new))
        if tableau.adaptive:
            ratio = error_ratio(step, y, rtol, atol, segments)
            finite = finite & jnp.isfinite(ratio)
            ratio = jnp.where(finite, ratio, jnp.inf)
            accept = finite & (ratio <= 1)
        else:
            ratio = jnp.zeros((), dtype)
            accept = finite
        nfe = state.nfe + tableau.num_stages - 1
        if tableau.fsal:
            f_new = step.f_new
        else:
            f_new = g(step.y_new, t_new)
            nfe = nfe + 1
        y_new, ys, i_out = step.y_new, state.ys, state.i_out

        if stop_at_outputs:
            arrived = accept & landed
            if ys is not None:
                ys = ys.at[i_out].set(jnp.where(arrived, y_new, ys[i_out]))
            if jump is not None:
                y_jumped = jump(i_out, y_new)
                y_new = jnp.where(arrived, y_jumped, y_new)
                again = arrived & (i_out < num_out - 1)  # not needed after the last output
                f_new = lax.cond(again, lambda: g(y_jumped, t_new), lambda: f_new)
                nfe = nfe + again.astype(int_)
            i_out = i_out + arrived.astype(int_)
        else:
            in_step = accept & (s_ts[jnp.minimum(i_out, num_out - 1)] <= t_new)

            def coefficients():
                return dense_coefficients(tableau, g, t, y, h_used, step.stages, y_new, f_new)

            if tableau.extra_c:  # costly extra stages: only when an output needs them
                degree = len(tableau.dense[0])
                coeffs = lax.cond(in_step, coefficients, lambda: jnp.zeros((degree, n), dtype))
                nfe = nfe + in_step.astype(int_) * len(tableau.extra_c)
            else:
                coeffs = coefficients()
            write = _write_masked if differentiable else _write_while
            nested = tableau.dense_nested
            ys, i_out = write(ys, i_out, s_ts, accept, t, h_used, t_new, y, y_new, coeffs, nested)

        h_next = h
        if tableau.adaptive:
            factor = step_factor(ratio, state.ratio_prev, accept, tableau.error_order)
            h_next = _next_step_size(h, h_used, factor, accept, landed & stop_at_outputs)
        if differentiable:
            h_next = lax.stop_gradient(h_next)

        num_accepted = state.num_accepted + accept.astype(int_)
        num_rejected = state.num_rejected + (~accept).astype(int_)
        # a step too small to move t (rejected, or accepted with t frozen) ends the solve
        tiny = h_next <= 16 * eps * jnp.maximum(jnp.abs(t), jnp.abs(target))
        status = _status(
            state.status, tableau.adaptive, accept, finite, tiny, i_out < num_out,
            num_accepted + num_rejected >= max_steps,
        )
        record = StepRecord(
            inputs=jnp.stack(step.inputs),
            times=direction * jnp.stack(stage_times(tableau, t, h_used, t_new)),
            h=jnp.where(accept, direction * h_used, 0),
        )
        new_state = LoopState(
            t=jnp.where(accept, t_new, t),
            y=jnp.where(accept, y_new, y),
            f=jnp.where(accept, f_new, state.f),
            h=h_next,
            ratio_prev=jnp.where(accept, ratio, state.ratio_prev),
            ys=ys,
            i_out=i_out,
            num_accepted=num_accepted,
            num_rejected=num_rejected,
            nfe=nfe,
            status=status,
        )
        return new_state, record

    def running(state: LoopState) -> Array:
        return (state.i_out < num_out) & (state.status == errors.SUCCESS)

    return init, step_fn, running


def _next_step_size(h, h_used, factor, accept, landed_at_stop):
    """The controller's next step from the one used; a step shortened to land on an output
    time it stops at keeps the size it had before; a rejection never grows the step."""
    h_next = h_used * factor
    h_next = jnp.where(accept & landed_at_stop, jnp.maximum(h_next, h), h_next)
    return jnp.where(accept | (h_next < h), h_next, h)


def _status(status, adaptive: bool, accept, finite, tiny, unfinished, out_of_steps):
    """The loop's status after a step attempt (``errors`` codes; the first failure stays)."""
    if adaptive:  # a non-finite value makes the step shrink until it is tiny
        failure = jnp.where(~accept & ~finite, errors.NONFINITE, errors.STEP_SIZE_UNDERFLOW)
        status = jnp.where(tiny & unfinished, failure, status)
    else:
        status = jnp.where(~finite, errors.NONFINITE, status)
    unfinished = unfinished & (status == errors.SUCCESS)
    return jnp.where(unfinished & out_of_steps, errors.MAX_STEPS_REACHED, status).astype(jnp.int32)


def _write_while(ys, i_out, s_ts, accept, t, h, t_new, y, y_new, coeffs, nested):
    """Writes the outputs in ``(t, t_new]`` one by one (cost: the outputs in this step)."""
    num_out = s_ts.shape[0]

    def more(carry):
        i, _ = carry
        return accept & (i < num_out) & (s_ts[jnp.minimum(i, num_out - 1)] <= t_new)

    def write(carry):
        i, ys = carry
        value = jnp.where(s_ts[i] == t_new, y_new, evaluate(y, coeffs, (s_ts[i] - t) / h, nested))
        return i + 1, ys.at[i].set(value)

    i_out, ys = lax.while_loop(more, write, (i_out, ys))
    return ys, i_out


def _write_masked(ys, i_out, s_ts, accept, t, h, t_new, y, y_new, coeffs, nested):
    """Writes the outputs in ``(t, t_new]`` by masking all of them (reverse-differentiable)."""
    inside = accept & (s_ts > t) & (s_ts <= t_new)
    theta = jnp.clip((s_ts - t) / h, 0, 1)
    values = jax.vmap(lambda th: evaluate(y, coeffs, th, nested))(theta)
    values = jnp.where((s_ts == t_new)[:, None], y_new, values)
    return jnp.where(inside[:, None], values, ys), i_out + jnp.sum(inside).astype(i_out.dtype)
