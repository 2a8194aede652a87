"""The time-stepping loop over a ``Method``: where to step, which steps to accept, where the
outputs fall, when the solve has failed.

``Loop`` offers the pieces that the drivers (``jaxode.drivers``) run: ``init()`` builds the
first ``LoopState``; ``attempt(state, target)`` makes one step attempt towards ``target`` and
accepts or rejects it; ``step(state)`` is one attempt plus the outputs it reaches;
``running(state)`` says whether the solve goes on; ``finish(state)`` sets its final status.

Outputs are written in one of three ways (the writers at the end of this module):

* **stop at outputs** (a fixed-step method, and the adjoint's backward solve, which passes
  ``at_output``): each step is clipped to land on the next output time; there the output is
  recorded and ``at_output(i, y)`` may replace the state (the adjoint adds ``∂L/∂ys[i]`` and
  re-anchors ``z``). A fixed-step grid restarts at each output time; an adaptive one keeps its
  step size;
* **interpolate** (an adaptive forward solve): the step size is the controller's alone and
  every output time inside an accepted step is read off the method's dense output, one by one
  in a small while loop (``_write_while``), or
* by masking all of them at once (``_write_masked``), which can be transposed (the
  reverse-differentiable drivers).

``save_dense`` also keeps every accepted step's interpolant (``DenseSteps``, at most
``max_steps`` of them) for ``odesolve(dense=True)``.

Time: a solve backwards in time (decreasing ``ts``) runs forwards in ``s = -t`` with the field
``-f(y, -s)``. Time is carried in the floating dtype of ``ts``, at least float32
(``time_dtype``), whatever the state's dtype; ``field`` receives ``t`` in that dtype. Step sizes
live in the time dtype and are cast to the state dtype only where they multiply state
increments; each step is the one the time really advanced by, ``h = (t + h_try) - t`` as
rounded, so that ``y`` and ``t`` never drift apart at large ``|t|``. Error norms and tolerances
are in the state dtype, at least float32 (``control.error_dtype``).

Steps: at most ``max_dt`` long; a step that would cross a time of ``jump_ts`` (a known
discontinuity of ``f``) is shortened to end on it, its stages evaluated no later than the last
representable time before it, and the solve restarts there with a fresh ``f`` evaluated just
after it (no first-same-as-last reuse across the jump).

Failures (status codes in ``errors``), read off the state: more than ``max_steps`` step
attempts; a step size that underflows (``t + h == t`` at the current time); a non-finite state
(the loop does not start from a non-finite ``y0`` or ``f(y0, t0)``); an invalid traced
tolerance, ``dt0`` or ``max_dt`` (no step is taken). Outputs not reached stay NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax

from . import errors, events, progress_bar
from .control import error_dtype, initial_step, step_factor
from .methods import Method


class Info(NamedTuple):
    """Statistics of a solve (JAX arrays; batched under ``vmap``).

    Attributes:
        num_steps: step attempts, ``num_accepted + num_rejected``.
        num_accepted: accepted steps.
        num_rejected: rejected steps.
        nfe: evaluations of the vector field, including the first-step selection (for the
            adjoint's backward solve: evaluations of the augmented field, one ``jax.vjp`` of
            ``f`` each).
        status: 0 on success; 1 max_steps reached; 2 step size underflow; 3 non-finite state
            (also a non-finite ``z0`` or ``f(z0, t0)``); 4 invalid traced ``rtol``, ``atol``,
            ``dt0`` or ``max_dt`` (no step taken).
        num_jacobians: Jacobians of the field evaluated by implicit methods (0 for explicit
            ones); each costs about ``n + 1`` forward-mode evaluations, which ``nfe`` does not
            count.
        final_time: how far the solve got: ``ts[-1]`` on success, else the time of the last
            accepted step (in the dtype of ``ts``, at least float32; not differentiated).
        event_time: with ``events``: the time the solve ended, ``t*`` of the terminal event
            that fired, else ``ts[-1]`` (differentiable; NaN if the solve failed); else ``None``.
        event_state: with ``events``: the state there (NaN if the solve failed); else ``None``.
        event_index: with ``events``: the terminal event that fired, ``-1`` if none.
        num_events: with ``events``: how many events (terminal or not) fired. (With events,
            ``max_steps`` reached after some fired is status 6, ``errors.EVENTS_MAX_STEPS``;
            more events than ``max_events``, status 7, ``errors.TOO_MANY_EVENTS``.)
    """

    num_steps: Array
    num_accepted: Array
    num_rejected: Array
    nfe: Array
    status: Array
    num_jacobians: Array
    final_time: Array
    event_time: Array | None = None
    event_state: Any = None
    event_index: Array | None = None
    num_events: Array | None = None


def time_dtype(ts_dtype) -> jnp.dtype:
    """The dtype time is carried in: that of ``ts``, at least float32."""
    return jnp.promote_types(ts_dtype, jnp.float32)


class StepRecord(NamedTuple):
    """Where one step attempt evaluated the field, for quadratures along the solution."""

    inputs: Array  # (m, n): the method's nodes (StepResult.nodes)
    times: Array  # (m,): their times (real time)
    h: Array  # the step, signed in real time; 0 if the attempt was rejected


class DenseSteps(NamedTuple):
    """Every accepted step's interpolant (in the forward-running time ``s``); slot ``k`` holds
    the ``k``-th accepted step, slots past ``num_accepted`` keep ``t = inf``."""

    t: Array  # (max_steps,) start times
    h: Array  # (max_steps,)
    y: Array  # (max_steps, n) start states
    coefficients: Array  # (max_steps, d, n)


class LoopState(NamedTuple):
    """The loop's carry (time in the forward-running variable ``s``)."""

    t: Array  # current time
    y: Array  # state at t, (n,)
    f: Array  # field at (y, t), (n,)
    h: Array  # next step to try (> 0)
    ratio_prev: Array  # error ratio of the last accepted step (PI controller)
    method_state: Any  # the method's carry at the last accepted step
    ys: Array | None  # outputs, (T, n); NaN where not reached
    dense: DenseSteps | None  # with save_dense
    counts: Array  # int32 (..., 7): the counters below, one buffer of the carry (see ``counted``)
    event: Any = None  # events.EventCarry, with events

    # the counters, read off ``counts`` (its last axis: also for a batch of states)
    i_out = property(lambda self: self.counts[..., 0])  # index of the next output time
    num_accepted = property(lambda self: self.counts[..., 1])
    num_rejected = property(lambda self: self.counts[..., 2])
    nfe = property(lambda self: self.counts[..., 3])
    num_jacobians = property(lambda self: self.counts[..., 4])
    # whether the last step attempt (its state and error) was finite
    finite = property(lambda self: self.counts[..., 5] > 0)
    # a failure found by ``init`` (the loop does not run), else set by ``finish``
    status = property(lambda self: self.counts[..., 6])

    def counted(self, **values) -> LoopState:
        """The state with the counters named in ``values`` replaced (``i_out=...``, ...).

        The seven counters are one ``int32`` array: each scalar in a loop's carry is a buffer
        of its own, and on a small system, whose step costs well under a microsecond, each
        costs the step a few percent (three scalars made into one array: 1.19 -> 1.01 of the
        step's time, ``methods.auto.AutoState``)."""
        old = [self.counts[..., k] for k in range(len(_COUNTERS))]
        new = [jnp.asarray(values.pop(name, o)).astype(jnp.int32) for name, o in zip(_COUNTERS, old)]
        if values:
            raise TypeError(f"LoopState.counted: not a counter: {sorted(values)}")
        return self._replace(counts=jnp.stack(new, axis=-1))


_COUNTERS = ("i_out", "num_accepted", "num_rejected", "nfe", "num_jacobians", "finite", "status")


class Attempt(NamedTuple):
    """One step attempt from ``(t, y)`` to ``(t_new, y_new)`` (forward-running time)."""

    accept: Array
    t: Array
    y: Array
    h: Array  # the step used, ``t_new - t``
    t_new: Array
    y_new: Array
    f_new: Array  # the step's own field at its end (before a jump's restart)
    dense: Any  # the method's StepResult.dense
    record: StepRecord


def info_of(state: LoopState, direction) -> Info:
    """The ``Info`` of a finished loop (``direction``: of real time, ``±1``)."""
    event_info = {}
    if state.event is not None:
        failed = state.status != errors.SUCCESS
        event_info = dict(
            event_time=jnp.where(failed, jnp.nan, direction * state.t),
            event_state=jnp.where(failed, jnp.nan, state.y),
            event_index=jnp.where(state.event.stopped, state.event.index, -1),
            num_events=state.event.count,
        )
    return Info(
        num_steps=state.num_accepted + state.num_rejected,
        num_accepted=state.num_accepted,
        num_rejected=state.num_rejected,
        nfe=state.nfe,
        status=state.status,
        num_jacobians=state.num_jacobians,
        final_time=lax.stop_gradient(direction * state.t),
        **event_info,
    )


class Loop:
    """The loop for ``y' = field(y, t)``, ``y(ts[0]) = y0`` (see the module docstring).

    Args:
        field: the vector field on flat states, ``(n,), scalar -> (n,)``.
        y0: the initial state, shape ``(n,)``.
        ts: the output times, shape ``(T,)``, strictly monotonic.
        rtol, atol: tolerances of the error control (ignored by fixed-step methods).
        dt0: the first step size (a magnitude), or ``None`` to choose it automatically;
            the step size of a fixed-step method.
        method: the ``Method`` that takes the steps.
        max_steps: the most step attempts (accepted + rejected) of the whole solve.
        at_output: ``at_output(i, y) -> y`` applied on landing at ``ts[i]`` (``i >= 1``);
            implies stopping at every output time.
        save_outputs: whether to keep the ``(T, n)`` outputs in ``LoopState.ys``.
        segments: ``[(start, stop), ...]`` parts of ``y`` whose RMS errors are combined by
            max (default: all of ``y``).
        differentiable: write outputs by masking and hold step sizes constant under
            differentiation (for the reverse-differentiable drivers).
        max_dt: the longest step (a magnitude), or ``None``.
        jump_ts: times at which ``f`` is discontinuous, ``(J,)``, or ``None``.
        save_dense: keep every accepted step's interpolant (``LoopState.dense``).
        progress: show a progress bar of the solve's time.
        events: ``events.LoopEvents``: detect and handle events after each accepted step
            (``events.after_step``), or ``None``. Terminal events only are located after the
            loop (``finish``) where ``events.after`` allows it and the outputs are interpolated
            (``locate_events_after``).
        at_jump: ``at_jump(t, y) -> y`` applied on landing at a time of ``jump_ts`` (real time
            ``t``), before ``f`` is evaluated just after it; ``None``: nothing.
    """

    def __init__(
        self,
        field: Callable[[Array, Array], Array],
        y0: Array,
        ts: Array,
        rtol,
        atol,
        dt0,
        *,
        method: Method,
        max_steps: int,
        at_output: Callable[[Array, Array], Array] | None = None,
        save_outputs: bool = True,
        segments: tuple | None = None,
        differentiable: bool = False,
        max_dt=None,
        jump_ts=None,
        save_dense: bool = False,
        progress: bool = False,
        events=None,
        at_jump: Callable[[Array, Array], Array] | None = None,
    ):
        self.field, self.method, self.max_steps, self.y0 = field, method, max_steps, y0
        self.at_output, self.save_outputs, self.save_dense = at_output, save_outputs, save_dense
        self.differentiable, self.progress = differentiable, progress
        self.events, self.at_jump = events, at_jump
        self.n = y0.shape[0]
        self.segments = ((0, self.n),) if segments is None else segments
        self.stop_at_outputs = at_output is not None or not method.adaptive
        self.dtype, tdtype = y0.dtype, time_dtype(ts.dtype)
        self.tdtype, self.edtype = tdtype, error_dtype(y0.dtype)
        self.direction = jnp.where(ts[-1] >= ts[0], 1, -1).astype(tdtype)
        self.s_ts = self.direction * ts.astype(tdtype)
        self.num_out = ts.shape[0]
        self.eps = jnp.finfo(tdtype).eps
        if method.adaptive:
            rtol, atol = jnp.asarray(rtol, self.edtype), jnp.asarray(atol, self.edtype)
        self.rtol, self.atol, self.dt0 = rtol, atol, dt0
        self.max_dt = None if max_dt is None else jnp.asarray(max_dt, tdtype)
        self.s_jumps = None if jump_ts is None else self.direction * jnp.asarray(jump_ts, tdtype).reshape(-1)
        # terminal events only, located once after the loop (events.locate_after_loop)
        self.locate_events_after = (
            events is not None and events.after and all(events.flat.terminal)
            and not self.stop_at_outputs and not save_dense and at_jump is None
        )

    def g(self, y, s):
        """The field in the forward-running time ``s``."""
        return self.direction.astype(self.dtype) * self.field(y, self.direction * s)

    def init(self) -> LoopState:
        """The first state (one or two evaluations of ``field``; none of the attempts')."""
        s0, y0, method = self.s_ts[0], self.y0, self.method
        f0 = self.g(y0, s0)
        span = self.s_ts[-1] - s0
        if self.max_dt is not None:
            span = jnp.minimum(span, self.max_dt)
        if self.dt0 is None:
            segs = self.segments
            h0 = initial_step(self.g, s0, y0, f0, span, method.order, self.rtol, self.atol, segs)
            nfe0 = 2
        else:
            h0, nfe0 = self.dt0, 1
        h0 = jnp.asarray(h0).astype(self.tdtype)
        if self.differentiable:
            h0 = lax.stop_gradient(h0)
        ys = None
        if self.save_outputs:
            ys = jnp.full((self.num_out, self.n), jnp.nan, self.dtype).at[0].set(y0)
        finite = jnp.all(jnp.isfinite(y0)) & jnp.all(jnp.isfinite(f0))
        status = jnp.where(
            self._valid_options(),
            jnp.where(finite, errors.SUCCESS, errors.NONFINITE),
            errors.INVALID_TOLERANCE,
        )
        if self.progress:
            progress_bar.open(self.direction * s0, self.direction * self.s_ts[-1])
        int_ = jnp.int32
        return LoopState(
            t=s0, y=y0, f=f0, h=h0, ratio_prev=jnp.ones((), self.edtype),
            method_state=method.init_with_tolerances(self.g, s0, y0, f0, self.rtol, self.atol),
            ys=ys, dense=self._empty_dense(),
            counts=jnp.zeros(len(_COUNTERS), int_),
            event=None if self.events is None else events.init_carry(self, y0, s0, f0),
        ).counted(i_out=1, nfe=nfe0, finite=True, status=status)

    def _valid_options(self) -> Array:
        """Whether the (possibly traced) tolerances are finite, >= 0 and not both 0 (adaptive
        methods only), and ``dt0`` and ``max_dt``, if given, finite and > 0."""
        valid = jnp.ones((), bool)
        if self.method.adaptive:
            rtol, atol = self.rtol, self.atol
            for tol in (rtol, atol):
                valid = valid & jnp.all(jnp.isfinite(tol)) & jnp.all(tol >= 0)
            valid = valid & ~jnp.any((rtol == 0) & (atol == 0))
        for step in (self.dt0, self.max_dt):
            if step is not None:
                valid = valid & jnp.all(jnp.isfinite(step)) & jnp.all(jnp.asarray(step) > 0)
        return valid

    def _next_jump(self, t) -> Array:
        """The first jump time after ``t`` (``inf`` if none)."""
        later = self.s_jumps > t
        return jnp.min(jnp.where(later, self.s_jumps, jnp.inf), initial=jnp.inf)

    def attempt(self, state: LoopState, target) -> tuple[LoopState, Attempt]:
        """One step attempt towards ``target`` (clipped to end on it, and on the next jump
        time). Leaves ``ys``, ``dense``, ``i_out`` and ``status`` alone."""
        method, int_ = self.method, jnp.int32
        t, y, h = state.t, state.y, state.h
        if self.max_dt is not None:
            h = jnp.minimum(h, self.max_dt)
        goal = target
        if self.s_jumps is not None:
            jump = self._next_jump(t)
            target = jnp.minimum(goal, jump)
        t_try = t + h
        landed = t_try >= target - 64 * self.eps * jnp.maximum(jnp.abs(t), jnp.abs(target))
        t_new = jnp.where(landed, target, t_try)
        h_used = t_new - t  # the step the time really advanced by
        on_jump = False if self.s_jumps is None else landed & (jump <= goal)
        t_end = t_new
        if self.s_jumps is not None:  # (times next to a jump are not differentiated)
            t_end = jnp.where(on_jump, jnp.nextafter(lax.stop_gradient(t_new), -jnp.inf), t_new)
        step = method.step(self.g, t, y, h_used, state.f, state.method_state, t_end)
        finite = jnp.all(jnp.isfinite(step.y_new))
        for error in jax.tree_util.tree_leaves(step.error):
            finite = finite & jnp.all(jnp.isfinite(error))
        if method.adaptive:
            # step control only, never differentiated: the norm's derivative at a zero error is inf
            ratio = lax.stop_gradient(method.error_ratio(step, y, self.rtol, self.atol, self.segments))
            ratio = jnp.where(finite, ratio, jnp.inf)
            accept = finite & (ratio <= 1)
            factor = step_factor(ratio, state.ratio_prev, accept, method.error_order).astype(self.tdtype)
            keep_h = (landed & self.stop_at_outputs) | on_jump
            h_next = _next_step_size(state.h, h_used, factor, accept, keep_h)
        else:
            ratio = jnp.zeros((), self.edtype)
            accept = finite
            h_next = state.h
        if self.differentiable:
            h_next = lax.stop_gradient(h_next)
        f_next, nfe, y_next = step.f_new, state.nfe + step.nfe, step.y_new
        if self.s_jumps is not None:  # restart after a jump: f just after it
            restart = accept & on_jump
            if self.at_jump is not None:
                jumped = lambda: self.at_jump(self.direction * t_new, step.y_new)
                y_next = lax.cond(restart, jumped, lambda: step.y_new)
            after = lambda: self.g(y_next, jnp.nextafter(lax.stop_gradient(t_new), jnp.inf))
            f_next = lax.cond(restart, after, lambda: step.f_new)
            nfe = nfe + restart.astype(int_)
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(accept, a, b), new, old)
        new_state = state._replace(
            t=jnp.where(accept, t_new, t),
            y=jnp.where(accept, y_next, y),
            f=jnp.where(accept, f_next, state.f),
            h=h_next,
            ratio_prev=jnp.where(accept, ratio, state.ratio_prev),
            method_state=keep(step.state, state.method_state),
        ).counted(
            num_accepted=state.num_accepted + accept.astype(int_),
            num_rejected=state.num_rejected + (~accept).astype(int_),
            nfe=nfe,
            num_jacobians=state.num_jacobians + step.num_jacobians,
            finite=finite,
        )
        inputs, times = step.nodes
        record = StepRecord(inputs, self.direction * times, jnp.where(accept, self.direction * h_used, 0))
        if self.progress:
            attempts = new_state.num_accepted + new_state.num_rejected
            progress_bar.update(self.direction * new_state.t, attempts, self.max_steps)
        at = Attempt(accept, t, y, h_used, t_new, step.y_new, step.f_new, step.dense, record)
        return new_state, at

    def arrive(self, state: LoopState, i, arrived) -> LoopState:
        """On arriving at output ``i``: ``at_output``, and the field at the state it gives."""
        y = self.at_output(i, state.y)
        again = arrived & (i < self.num_out - 1)  # not needed after the last output
        f = lax.cond(again, lambda: self.g(y, state.t), lambda: state.f)
        nfe = state.nfe + again.astype(jnp.int32)
        return state._replace(y=jnp.where(arrived, y, state.y), f=f).counted(nfe=nfe)

    def coefficients(self, at: Attempt) -> Array:
        """The interpolant of an attempt (``method.interpolant_nfe`` evaluations); ``at`` may be
        any record with the fields ``t, y, h, dense, y_new, f_new``."""
        return self.method.interpolant(self.g, at.t, at.y, at.h, at.dense, at.y_new, at.f_new)

    def lazy_coefficients(self, state: LoopState, at: Attempt, needed) -> tuple[LoopState, Array]:
        """The interpolant, computed only if ``needed`` when it costs evaluations (else zeros)."""
        if not self.method.interpolant_nfe:
            return state, self.coefficients(at)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(self.coefficients, at))
        coeffs = lax.cond(needed, lambda: self.coefficients(at), lambda: zeros)
        nfe = state.nfe + needed.astype(jnp.int32) * self.method.interpolant_nfe
        return state.counted(nfe=nfe), coeffs

    def step(self, state: LoopState, with_attempt: bool = False):
        """One step attempt, and the outputs (and dense steps) it reaches: ``(new state,
        StepRecord)``; ``with_attempt``: also the ``Attempt`` as the method took it (before an
        event truncated it)."""
        i, int_ = state.i_out, jnp.int32
        if self.stop_at_outputs:
            new, at = self.attempt(state, self.s_ts[i])
            taken = at
            if self.events is not None or self.save_dense:
                new, coeffs = self.lazy_coefficients(new, at, at.accept)
            if self.events is not None:  # the step truncated at an event
                new, at = events.after_step(self, state, new, at, coeffs)
            # landed on the output time itself, not on a jump time (or event) before it
            arrived = at.accept & (at.t_new >= self.s_ts[i])
            ys = new.ys
            if ys is not None:
                ys = ys.at[i].set(jnp.where(arrived, at.y_new, ys[i]))
            if self.at_output is not None:
                new = self.arrive(new, i, arrived)
            new = new._replace(ys=ys).counted(i_out=i + arrived.astype(int_))
            if self.save_dense:
                new = new._replace(dense=self._write_dense(state, new, at, coeffs))
            return (new, at.record, taken) if with_attempt else (new, at.record)
        new, at = self.attempt(state, self.s_ts[-1])
        taken = at
        in_step = at.accept & (self.s_ts[jnp.minimum(i, self.num_out - 1)] <= at.t_new)
        needed = at.accept if (self.save_dense or self.events is not None) else in_step
        new, coeffs = self.lazy_coefficients(new, at, needed)
        if self.events is not None:  # the step truncated at an event
            new, at = events.after_step(self, state, new, at, coeffs)
        if new.ys is None:  # only the outputs passed
            inside = at.accept & (self.s_ts > at.t) & (self.s_ts <= at.t_new)
            ys, i_out = None, i + jnp.sum(inside).astype(int_)
        else:
            write = write_masked if self.differentiable else write_while  # transposable, or cheaper
            ys, i_out = write(new.ys, i, self.s_ts, at.accept, at, coeffs, self.method)
        if self.save_dense:
            new = new._replace(dense=self._write_dense(state, new, at, coeffs))
        new = new._replace(ys=ys).counted(i_out=i_out)
        return (new, at.record, taken) if with_attempt else (new, at.record)

    def coefficients_shape(self) -> jax.ShapeDtypeStruct:
        """The shape and dtype of a step's interpolant (``coefficients``)."""
        s0, y0, one, method = self.s_ts[0], self.y0, jnp.ones((), self.tdtype), self.method

        def probe():
            st = method.step(self.g, s0, y0, one, y0, method.init(self.g, s0, y0, y0), s0)
            return method.interpolant(self.g, s0, y0, one, st.dense, st.y_new, st.f_new)

        return jax.eval_shape(probe)

    def _empty_dense(self) -> DenseSteps | None:
        if not self.save_dense:
            return None
        shape, m = self.coefficients_shape(), self.max_steps
        return DenseSteps(
            t=jnp.full((m,), jnp.inf, self.tdtype), h=jnp.ones((m,), self.tdtype),
            y=jnp.zeros((m, self.n), self.dtype), coefficients=jnp.zeros((m,) + shape.shape, shape.dtype),
        )

    def _write_dense(self, old: LoopState, new: LoopState, at: Attempt, coeffs) -> DenseSteps:
        """Slot ``old.num_accepted`` gets the attempt's interpolant, if it was accepted."""
        k = jnp.minimum(old.num_accepted, self.max_steps - 1)
        put = lambda buf, value: buf.at[k].set(jnp.where(at.accept, value, buf[k]))
        d = new.dense
        return DenseSteps(put(d.t, at.t), put(d.h, at.h), put(d.y, at.y), put(d.coefficients, coeffs))

    def failure(self, state: LoopState) -> Array:
        """Why the solve cannot go on (``errors`` codes), read off its state: a failure found by
        ``init``; a step too small to move ``t`` at the current time, ``t + h == t`` (or a NaN
        step; a non-finite field brings it about by shrinking the step); for a fixed-step
        method, a non-finite state at once; or ``max_steps`` spent."""
        stuck = ~(state.t + state.h > state.t)  # also for a NaN h
        code = jnp.where(stuck, jnp.where(state.finite, errors.STEP_SIZE_UNDERFLOW, errors.NONFINITE), 0)
        if not self.method.adaptive:
            code = jnp.where(state.finite, code, errors.NONFINITE)
        code = jnp.where(state.status != errors.SUCCESS, state.status, code)
        if self.events is not None and self.events.flat.max_events is not None:
            too_many = state.event.count > self.events.flat.max_events
            code = jnp.where((code == errors.SUCCESS) & too_many, errors.TOO_MANY_EVENTS, code)
        out_of_steps = state.num_accepted + state.num_rejected >= self.max_steps
        code = jnp.where((code == errors.SUCCESS) & out_of_steps, errors.MAX_STEPS_REACHED, code)
        if self.events is not None:  # with events fired, the message mentions them (Zeno)
            zeno = (code == errors.MAX_STEPS_REACHED) & (state.event.count > 0)
            code = jnp.where(zeno, errors.EVENTS_MAX_STEPS, code)
        return code.astype(jnp.int32)

    def running(self, state: LoopState) -> Array:
        going = (state.i_out < self.num_out) & (self.failure(state) == errors.SUCCESS)
        return going if self.events is None else going & ~state.event.stopped

    def finish(self, state: LoopState) -> LoopState:
        """The final state with its ``status`` (0 after a terminal event)."""
        if self.locate_events_after:
            state = events.locate_after_loop(self, state)
        failed = self.failure(state)
        if self.progress:
            progress_bar.close(self.direction * state.t)
        unfinished = state.i_out < self.num_out
        if self.events is not None:
            unfinished = unfinished & ~state.event.stopped
        status = jnp.where(unfinished, failed, errors.SUCCESS)
        return state.counted(status=status)


def _next_step_size(h, h_used, factor, accept, landed_at_stop):
    """The controller's next step from the one used; a step shortened to land on an output
    time it stops at (or on a jump) keeps the size it had before; a rejection shrinks the step (by
    ``factor < 1``) from the smaller of the one tried and the one used, which rounding of
    ``t + h`` (or landing on an output time) may have made longer: else it could be tried
    again and again."""
    h_next = h_used * factor
    h_next = jnp.where(accept & landed_at_stop, jnp.maximum(h_next, h), h_next)
    return jnp.where(accept, h_next, factor * jnp.minimum(h, h_used))


def write_while(ys, i_out, s_ts, accept, step: Attempt, coeffs, method: Method):
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
        value = jnp.where(s_i == t_new, y_new, method.interpolate(y, coeffs, (s_i - t) / h))
        return i + 1, lax.dynamic_update_index_in_dim(ys, value, i, 0)

    i_out, ys = lax.while_loop(more, write, (i_out, ys))
    return ys, i_out


def write_masked(ys, i_out, s_ts, accept, step: Attempt, coeffs, method: Method):
    """Writes the outputs in ``step``'s ``(t, t_new]``, if ``accept``, by masking all of them
    (reverse-differentiable)."""
    t, h, t_new, y, y_new = step.t, step.h, step.t_new, step.y, step.y_new
    inside = accept & (s_ts > t) & (s_ts <= t_new)
    theta = jnp.clip((s_ts - t) / h, 0, 1)
    values = jax.vmap(lambda th: method.interpolate(y, coeffs, th))(theta)
    values = jnp.where((s_ts == t_new)[:, None], y_new, values)
    return jnp.where(inside[:, None], values, ys), i_out + jnp.sum(inside).astype(i_out.dtype)
