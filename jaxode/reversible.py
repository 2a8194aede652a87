"""``gradient="reversible"``: exact gradients in constant memory by an algebraically reversible
solver (McCallum & Foster 2024, arXiv:2410.11648).

The forward pass solves with ``methods.reversible.Reversible`` (the two-state form of the chosen
explicit method, coupling ``λ``) and keeps, besides the outputs, only the final states
``(y_N, ŷ_N)`` and the start time of every accepted step (``max_steps + 1`` scalars: step ``n``
runs from ``t_n`` to ``t_{n+1}``, ``h_n = t_{n+1} - t_n`` exactly as the loop took it).

The reverse pass (``backward``) walks the steps from the last to the first. For step ``n`` it
reconstructs ``(y_n, ŷ_n)`` from ``(y_{n+1}, ŷ_{n+1})`` by the inverse step (exact up to
rounding; the two increments' ``jax.vjp``s serve both) and differentiates that one step,

    (y_n, ŷ_n, θ, t_n, t_{n+1}, ts) ↦ (y_{n+1}, ŷ_{n+1}, Σ_{i: ts_i ∈ (t_n, t_{n+1}]} ⟨∂L/∂ys[i], ys[i]⟩),

the outputs inside the step interpolated from it as in the forward pass, so their cotangents
enter there. The cotangents of ``(y, ŷ)`` are carried back; those of ``θ`` (the arrays ``f``
depends on) and ``ts`` are summed. Memory: O(1) states plus the step-time record, whatever the
number of steps. The result is the derivative of the computed solution with the step sizes
held fixed (as ``"backprop"`` and ``"checkpoint"`` take it): a step's start time moves with
``ts[0]``, or with the output time its previous step was clipped to land on (every output of a
fixed-step grid, the last one of an adaptive solve), and moves its later steps with it.

Events (``jaxode.events``; detection and location as in every mode, on the reversible step's
dense output). An event truncates its step ``n`` at ``s* = t_n + θ* h_n``: the forward pass
keeps, for each event that fired, the step's untruncated end ``(y_{n+1}, ŷ_{n+1})`` and its end
time, ``s*`` and which event it was (``EventMarks``). A terminal event ends the solve there
(``z(s*)`` the dense output, later outputs NaN). After a non-terminal one the solve goes on
from ``z⁺ = u(z(s*), s*)`` (``u`` the update, or the identity) and the scheme restarts as at
``t_0``, ``ŷ = y⁺``: an update is not invertible in general, and the pair after it does not
determine the one before, hence the record. The reverse pass reconstructs the steps between
events as above; at an event step it starts from the recorded end, and differentiates the
step's map to its outputs up to ``s*``, to ``s*`` and to ``z⁺`` (whose cotangent is the sum of
those of ``y⁺`` and ``ŷ⁺``; at a terminal event, those of ``info.event_state`` and
``event_time``). ``θ*`` is differentiated by the implicit function theorem on the step's dense
output (``events.root``'s rule, as the ``"backprop"`` mode does), and the update by its
``vjp``: the discrete counterpart of the adjoint's jump condition (``jaxode.event_adjoint``),
exact for the computed solution. Memory: with terminal events only, one recorded step; with
non-terminal ones the record has ``max_events`` slots (by default ``max_steps``: each event ends
a step) of ``2n + 4`` numbers, written only at events. Step sizes held fixed: the steps after
an event start at ``s*`` and move with it.

Reverse mode only (``jax.jvp`` raises JAX's custom_vjp error). Under ``jax.vmap`` and with
``batched=True`` each problem replays its own steps; the parameter cotangents are summed over
the batch by ``jax.vmap``'s rule for the unbatched inputs of a ``custom_vjp``. A reconstruction
that ends non-finite fails the gradient like a failed solve (raises, or NaN with
``throw=False``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax

from . import errors, event_adjoint
from . import events as events_module
from .forward import Config, Controls, FlatField, Solution
from .loop import Loop, LoopState, info_of
from .methods import Method
from .methods.reversible import Reversible, uncouple
from .while_loops import zero_cotangent


class EventMarks(NamedTuple):
    """The steps in which an event fired, slot ``j`` for the ``j``-th event of the solve (times in
    the forward-running variable ``s``)."""

    step: Array  # (M,) the accepted step n in which it fired
    end: Array  # (M,) t_{n+1} of that step as the method took it (before the truncation)
    time: Array  # (M,) the event time s*, where the solve stopped or went on
    which: Array  # (M,) the event that fired
    y: Array  # (M, n) y_{n+1} of the untruncated step
    yhat: Array  # (M, n) ŷ_{n+1} of it


class Record(NamedTuple):
    """What the forward pass keeps for the reverse pass."""

    y: Array  # y_N, (n,)
    yhat: Array  # ŷ_N, (n,)
    times: Array  # (max_steps + 1,): times[k] = t_k (forward-running time), k <= num_steps
    num_steps: Array  # accepted steps N
    marks: EventMarks | None = None  # with events
    num_events: Array | None = None  # with events: the slots of ``marks`` in use


def check_options(method: Method, coupling: float, dense: bool, jump_ts) -> Reversible:
    """The reversible form of ``method``, after checking what the mode needs (at trace time):
    an explicit method, ``0 < coupling <= 1``, no dense output, no jump times (``ValueError``
    naming the problem)."""
    if dense:
        raise ValueError('gradient="reversible" does not return a dense solution (dense=True): use '
                         '"backprop" or "checkpoint" for a differentiable DenseSolution')
    if jump_ts is not None:
        raise ValueError('gradient="reversible" does not support jump_ts; use "checkpoint" or '
                         '"backprop", or split the solve at the jump times')
    return Reversible(method, coupling)


def _event_slots(cfg: Config) -> int:
    """Slots of the event record: one per event that fired (``max_events``, by default
    ``max_steps``, where an event can restart the solve; one, the terminal event, otherwise)."""
    return 1 if all(cfg.events.terminal) else events_module.record_slots(cfg.max_events, cfg.max_steps)


def _names_the_event(cfg: Config) -> bool:
    """Whether the loop must record which event restarted the solve (several events, some not
    terminal): a terminal one is ``event.index``; a single event is event 0."""
    return len(cfg.events.terminal) > 1 and not all(cfg.events.terminal)


def forward(method: Reversible, field: FlatField, y0, ts, diff, nondiff, controls: Controls,
            cfg: Config) -> tuple[LoopState, Array]:
    """The solve, recording every accepted step's start time: ``(finished state, times)``
    (with events, ``forward_marked`` also returns their record)."""
    return forward_marked(method, field, y0, ts, diff, nondiff, controls, cfg)[:2]


def forward_marked(method: Reversible, field: FlatField, y0, ts, diff, nondiff, controls: Controls,
                   cfg: Config) -> tuple[LoopState, Array, EventMarks | None]:
    """The solve, recording every accepted step's start time, and with events the steps in which
    one fired: ``(finished state, times, marks)``. After an event that does not stop the
    solve the scheme restarts from the state it leaves, ``ŷ = y⁺`` (as at ``t_0``)."""
    events = None
    if cfg.events is not None:
        # the loop's own record, of one slot: which event the last reset was
        events = cfg.events.for_loop((diff, nondiff), record=_names_the_event(cfg), buffer=1)
    loop = Loop(
        lambda y, t: field(y, t, diff, nondiff), y0, ts, controls.rtol, controls.atol, controls.dt0,
        method=method, max_steps=cfg.max_steps, max_dt=controls.max_dt, progress=cfg.progress,
        events=events,
    )
    state = loop.init()
    times = jnp.zeros((cfg.max_steps + 1,), state.t.dtype).at[0].set(state.t)
    marks = None if events is None else _no_marks(_event_slots(cfg), y0, state.t.dtype)

    def body(carry):
        state, times, marks = carry
        new, _, taken = loop.step(state, with_attempt=True)
        k = state.num_accepted + 1
        times = times.at[k].set(jnp.where(new.num_accepted >= k, new.t, times[k]))
        if marks is not None:
            new, marks = _mark_event(state, new, taken, marks)
        return new, times, marks

    state, times, marks = lax.while_loop(lambda c: loop.running(c[0]), body, (state, times, marks))
    return loop.finish(state), times, marks


def _no_marks(slots: int, y0, tdtype) -> EventMarks:
    int_ = jnp.int32
    return EventMarks(jnp.full((slots,), -1, int_), jnp.zeros((slots,), tdtype), jnp.zeros((slots,), tdtype),
                      jnp.zeros((slots,), int_), jnp.zeros((slots,) + y0.shape, y0.dtype),
                      jnp.zeros((slots,) + y0.shape, y0.dtype))


def _mark_event(old: LoopState, new: LoopState, taken, marks: EventMarks) -> tuple[LoopState, EventMarks]:
    """Records the step from ``old`` to ``new`` if an event fired in it (``taken``: the attempt
    before the truncation), and restarts the scheme after a reset: ``ŷ = y⁺``."""
    fired = new.event.count > old.event.count
    j = jnp.minimum(old.event.count, marks.step.shape[0] - 1)
    ev = new.event
    which = ev.which[0] if ev.which is not None else 0  # the loop's one slot holds the last reset
    which = jnp.where(ev.stopped, ev.index, which)
    put = lambda buf, v: buf.at[j].set(jnp.where(fired, v, buf[j]))
    marks = EventMarks(put(marks.step, old.num_accepted), put(marks.end, taken.t_new),
                       put(marks.time, new.t), put(marks.which, which), put(marks.y, taken.y_new),
                       put(marks.yhat, new.method_state[0]))
    reset = fired & ~ev.stopped
    return new._replace(method_state=(jnp.where(reset, new.y, new.method_state[0]),)), marks


def _direction(ts) -> Array:
    return jnp.where(ts[-1] >= ts[0], 1, -1).astype(ts.dtype)


def backward(method: Reversible, field: FlatField, record: Record, ts, diff, nondiff, ct_ys, events=None,
             ct_event=None):
    """The reverse pass: ``(∂L/∂y0, ∂L/∂ts, ∂L/∂diff, (y_0, ŷ_0))`` from ``∂L/∂ys`` ``(T, n)``,
    with the reconstructed initial states (both equal ``y0`` up to the reconstruction's
    rounding). With ``events`` (``events.FlatEvents``): ``ct_event = (∂L/∂event_state,
    ∂L/∂event_time)``.

    Step ``n``, written as ``a = Ψ_h(ŷ_n)``, ``y_{n+1} = λ y_n + (1 - λ) ŷ_n + a``,
    ``b = Ψ_{-h}(y_{n+1})``, ``ŷ_{n+1} = ŷ_n - b``, is inverted and differentiated in one go:
    ``jax.vjp`` of ``b`` at ``y_{n+1}`` gives ``ŷ_n = ŷ_{n+1} + b``, then ``jax.vjp`` of ``a`` at
    ``ŷ_n`` gives ``y_n``; the cotangents then run back through the same two linearisations
    (each increment evaluated once per step). The outputs inside the step are a function of the
    step's values (``y_n, ŷ_n``, the stages of ``a``, ``y_{n+1}``, ``f(y_{n+1})``), whose ``vjp``
    is taken only for a step that holds outputs.

    A step in which an event fired starts instead from its recorded untruncated end
    ``(y_{n+1}, ŷ_{n+1})`` (the pair after the event, ``(y⁺, y⁺)``, does not determine it); its
    function is the outputs up to ``s*`` plus what the solve went on from: ``s* = t_n + θ* h``
    and ``z⁺ = u(y(θ*), s*)`` (``u`` the update, the identity for a terminal event), ``θ*`` the
    root of the condition on the step's dense output, differentiated by the implicit function
    theorem (``events.root``), so the cotangents of ``(y⁺, ŷ⁺)`` and ``s*`` enter there.
    """
    direction = _direction(ts)
    s_ts = direction * ts
    num_out = ts.shape[0]
    dtype, lam = record.y.dtype, method.coupling
    ct_ys = ct_ys.astype(dtype)
    # outputs an accepted step can have been clipped to land on (then its end moves with them)
    lands_on = jnp.arange(num_out) >= (1 if not method.adaptive else num_out - 1)
    hermite = method.base.tableau.dense is None
    marks = record.marks

    def g(diff):
        return lambda y, s: direction.astype(dtype) * field(y, direction * s, diff, nondiff)

    def back(y1, diff, t, t_new):  # (Ψ_{-h}(t_new, y1), f(y1, t_new))
        return method.backward_increment(g(diff), t, t_new, y1, t_new - t)

    def ahead(yhat, diff, t, t_new):  # (Ψ_h(t, ŷ), its stages)
        inc, ks, _, _ = method.forward_increment(g(diff), t, t_new, yhat, t_new - t)
        return inc, jnp.stack(ks)

    def coefficients(y, yhat, ks, y1, f1, diff, t, t_new):  # the step's dense output
        gd, h = g(diff), t_new - t
        f0 = gd(y, t) if hermite else None
        return method.interpolant(gd, t, y, h, (ks, f0, yhat), y1, f1)

    def dot_outputs(y, coeffs, t, h, s_ts, last, y_last):  # Σ_{i: t < s_ts[i] <= last} ⟨∂L/∂ys[i], ys[i]⟩
        values = jax.vmap(lambda th: method.interpolate(y, coeffs, th))(jnp.clip((s_ts - t) / h, 0, 1))
        values = jnp.where((s_ts == last)[:, None], y_last, values)
        inside = (s_ts > t) & (s_ts <= last)
        return jnp.sum(jnp.where(inside[:, None], ct_ys * values, 0))

    def outputs(y, yhat, ks, y1, f1, diff, t, t_new, s_ts):
        coeffs = coefficients(y, yhat, ks, y1, f1, diff, t, t_new)
        return dot_outputs(y, coeffs, t, t_new - t, s_ts, t_new, y1)

    def at_event(k, s_star, ct_plus, ct_star):
        """The event step's function: outputs up to ``s*``, ``⟨∂L/∂z⁺, z⁺⟩ + ∂L/∂s* s*``."""

        def fn(y, yhat, ks, y1, f1, diff, t, t_new, s_ts):
            coeffs = coefficients(y, yhat, ks, y1, f1, diff, t, t_new)
            h = t_new - t
            args = (diff, nondiff)
            located = lax.stop_gradient(jnp.clip((s_star - t) / h, 0, 1))
            theta = _root(events, method, k, located, (y, coeffs, t, h, direction, args))
            s_lin = t + theta * h
            s_out = s_lin + lax.stop_gradient(s_star - s_lin)  # the forward's s* exactly
            y_lin = method.interpolate(y, coeffs, theta)
            y_star = y_lin + jnp.where(lax.stop_gradient(theta >= 1), lax.stop_gradient(y1 - y_lin), 0)
            z_plus = events.for_loop(args).update(k, y_star, direction * s_out)
            return (dot_outputs(y, coeffs, t, h, s_ts, s_star, y_star) + jnp.sum(ct_plus * z_plus)
                    + ct_star * s_out)

        return fn

    def body(carry):
        n, r, y1, yhat1, ct_y1, ct_yhat1, ct_diff, ct_s_ts, ct_t1 = carry
        t, t_new = record.times[n], record.times[n + 1]
        is_event = False
        if marks is not None:  # an event step: from its recorded end; (y⁺, ŷ⁺) and s* enter its function
            j = jnp.maximum(r, 0)
            is_event = (r >= 0) & (marks.step[j] == n)
            ct_plus, ct_star = jnp.where(is_event, ct_y1 + ct_yhat1, 0), jnp.where(is_event, ct_t1, 0)
            y1, yhat1 = jnp.where(is_event, marks.y[j], y1), jnp.where(is_event, marks.yhat[j], yhat1)
            t_new = jnp.where(is_event, marks.end[j], t_new)
            ct_y1, ct_yhat1 = jnp.where(is_event, 0, ct_y1), jnp.where(is_event, 0, ct_yhat1)
            ct_t1 = jnp.where(is_event, 0, ct_t1)
        (b, f1), vjp_back = jax.vjp(back, y1, diff, t, t_new)
        yhat = yhat1 + b
        (a, ks), vjp_ahead = jax.vjp(ahead, yhat, diff, t, t_new)
        y = uncouple(y1, yhat, a, lam)
        primals = (y, yhat, ks, y1, f1, diff, t, t_new, s_ts)
        has_outputs = jnp.any((s_ts > t) & (s_ts <= t_new))
        zeros = lambda: jax.tree_util.tree_map(jnp.zeros_like, primals)
        one = jnp.ones((), dtype)
        plain = lambda: lax.cond(has_outputs, lambda: jax.vjp(outputs, *primals)[1](one), zeros)
        if marks is None:
            ct_out = plain()
        else:
            event_fn = at_event(marks.which[j], marks.time[j], ct_plus, ct_star)
            ct_out = lax.cond(is_event, lambda: jax.vjp(event_fn, *primals)[1](one), plain)
        o_y, o_yhat, o_ks, o_y1, o_f1, o_diff, o_t, o_tnew, o_sts = ct_out
        extra_y1, b_diff, b_t, b_tnew = vjp_back((-ct_yhat1, o_f1))
        ct_a = ct_y1 + o_y1 + extra_y1  # the cotangent of y_{n+1}, hence of a
        a_yhat, a_diff, a_t, a_tnew = vjp_ahead((ct_a, o_ks))
        ct_y = (ct_a if lam == 1 else lam * ct_a) + o_y
        ct_yhat = ct_yhat1 + a_yhat + o_yhat + (0 if lam == 1 else (1 - lam) * ct_a)
        ct_diff = jax.tree_util.tree_map(lambda *c: sum(c), ct_diff, b_diff, a_diff, o_diff)
        ct_t, end_moves = b_t + a_t + o_t, ct_t1 + b_tnew + a_tnew + o_tnew
        landed = (s_ts == t_new) & lands_on
        ct_s_ts = ct_s_ts + o_sts + jnp.where(landed, end_moves, 0)
        ct_t = ct_t + jnp.where(jnp.any(landed), 0, end_moves)
        r = r - jnp.asarray(is_event).astype(jnp.int32)
        return n - 1, r, y, yhat, ct_y, ct_yhat, ct_diff, ct_s_ts, ct_t

    zeros = jnp.zeros_like(record.y)
    ct_y_end, ct_t_end, r = zeros, jnp.zeros((), s_ts.dtype), jnp.zeros((), jnp.int32)
    if marks is not None:  # the state and time the solve ended at, z(τ) and τ
        ct_state, ct_time = ct_event
        ct_y_end = ct_state.astype(dtype)
        ct_t_end = (direction * ct_time).astype(s_ts.dtype)
        r = (record.num_events - 1).astype(jnp.int32)
    init = (record.num_steps - 1, r, record.y, record.yhat, ct_y_end, zeros,
            jax.tree_util.tree_map(jnp.zeros_like, diff), jnp.zeros_like(s_ts), ct_t_end)
    _, _, y0, yhat0, ct_y, ct_yhat, ct_diff, ct_s_ts, ct_t0 = lax.while_loop(lambda c: c[0] >= 0, body, init)
    ct_s_ts = ct_s_ts.at[0].add(ct_t0)
    ct_y0 = ct_y + ct_yhat + ct_ys[0]
    return ct_y0, (direction * ct_s_ts).astype(ts.dtype), ct_diff, (y0, yhat0)


def _root(events, method: Reversible, k, theta, args) -> Array:
    """``θ*`` of event ``k`` located at ``theta`` on a step's dense output, with the implicit
    function theorem's derivative (``events.root``, on a bracket of width 0: one evaluation)."""
    zero = jnp.zeros((), theta.dtype)

    def branch(condition):
        g = functools.partial(events_module._g, method.interpolate, condition)
        return lambda theta, args: events_module.root(g, (theta, theta, zero, zero, zero), args)

    branches = [branch(c) for c in events.conditions]
    return branches[0](theta, args) if len(branches) == 1 else lax.switch(k, branches, theta, args)


def _one_problem(field: FlatField, method: Reversible, cfg: Config):
    """The custom_vjp solve of one problem: ``(y0, ts, diff, nondiff, controls) -> (ys, info, h)``."""

    def run(y0, ts, diff, nondiff, controls):
        state, times, marks = forward_marked(method, field, y0, ts, diff, nondiff, controls, cfg)
        out = (state.ys, info_of(state, _direction(ts)), state.h)
        count = None if marks is None else state.event.count
        record = Record(state.y, state.method_state[0], times, state.num_accepted, marks, count)
        return out, record, state.status

    @jax.custom_vjp
    def solve(y0, ts, diff, nondiff, controls):
        return run(y0, ts, diff, nondiff, controls)[0]

    def fwd(y0, ts, diff, nondiff, controls):
        out, record, status = run(y0, ts, diff, nondiff, controls)
        return out, (record, ts, diff, nondiff, controls, status)

    def bwd(residuals, cotangents):
        record, ts, diff, nondiff, controls, status = residuals
        ct_ys, ct_info = cotangents[0], cotangents[1]
        ct_event = None
        if cfg.events is not None:
            zero_if_none = event_adjoint._zero_if_none
            ct_event = (zero_if_none(ct_info.event_state, record.y), zero_if_none(ct_info.event_time, ts[0]))
        ct_y0, ct_ts, ct_diff, (y0, yhat0) = backward(method, field, record, ts, diff, nondiff, ct_ys,
                                                      cfg.events, ct_event)
        finite = jnp.all(jnp.isfinite(y0)) & jnp.all(jnp.isfinite(yhat0))
        reconstructed = jnp.where(finite, errors.SUCCESS, errors.NONFINITE)
        status = jnp.where(status != errors.SUCCESS, status, reconstructed)
        cts = (ct_y0, ct_ts, ct_diff)
        if cfg.throw:
            cts = errors.raise_on_failure(cts, status)
        else:
            cts = jax.tree_util.tree_map(lambda x: jnp.where(status != errors.SUCCESS, jnp.nan, x), cts)
        return cts + jax.tree_util.tree_map(zero_cotangent, (nondiff, controls))

    solve.defvjp(fwd, bwd)
    return solve


def solve(field: FlatField, y0, ts, diff, nondiff, controls: Controls, adjoint_tols, cfg: Config) -> Solution:
    """The mode's entry in ``gradients.MODES``: the reversible solve, differentiated by
    ``backward`` (``adjoint_tols`` unused). ``batched``: ``jax.vmap`` over ``y0``."""
    method = check_options(cfg.method, cfg.reversible_coupling, cfg.dense, controls.jump_ts)
    one = _one_problem(field, method, cfg)
    if cfg.batched:
        ys, info, h = jax.vmap(one, in_axes=(0, None, None, None, None))(y0, ts, diff, nondiff, controls)
    else:
        ys, info, h = one(y0, ts, diff, nondiff, controls)
    return Solution(ys, info, None, h)
