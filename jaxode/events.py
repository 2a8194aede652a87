"""Events: zero crossings of conditions along the solution, terminal or with a state update.

``Event(condition, direction=0, terminal=True, update=None)``: an event happens at a time ``t*``
where ``condition(z, t, params)`` crosses zero along the solution (in the direction of
integration, from ``ts[0]`` towards ``ts[-1]``).

Detection (on accepted steps only; ``after_step``, called by ``Loop.step``): each condition is
evaluated at the step's end and at ``interior_points`` equally spaced interior points of the
step's dense output, ``θ_j = j / (K + 1)``. With the value carried from the step's start these
``K + 2`` values split the step into ``K + 1`` pieces; the event fires in the first piece whose
ends change sign in the event's ``direction`` (upward: ``c_a < 0 <= c_b``; downward:
``c_a > 0 >= c_b``). The interior points catch a condition that dips through zero and back
inside one step (a double sign change, which a check at the ends alone misses); a dip between
two neighbouring points is still missed: raise ``interior_points`` (or lower ``max_dt``) if the
condition can change sign twice within a fraction ``1/(K+1)`` of a step.

Location: in that piece, a bracketing root finder (Chandrupatla's, 1997: inverse quadratic
interpolation with a bisection safeguard) on ``g(θ) = condition(interpolant(θ), t + θh)``,
until the bracket is below the resolution of the time (``eps · max(|t|, h)``) or ``g = 0``.
The solve's state at ``t*`` is the dense output there (no overshoot). (Under ``jax.vmap``,
where a ``lax.cond`` on a batched predicate runs both branches, the root finders run only in
the steps where an event fired for some element, and with terminal events only no restart is
prepared at all.) With terminal events only, the solves of the adjoint, backprop and
checkpoint modes locate them after the loop instead (``Loop.locate_events_after``): the step in
which one fires ends the loop whole and is kept; the root finders run once, on it, and the
outputs written past ``t*`` are masked again (under ``jax.vmap``: not in every step in which
some problem's event fired; differentiated as in the step). When several events fire in one
step, the earliest ``t*`` wins, ties going to the lower index; the step is truncated at
``t*``: outputs up to ``t*`` are written, and

* a terminal event stops the solve: later outputs stay NaN, the status is 0;
* a non-terminal one replaces the state by ``update(z(t*), t*, params)`` (or keeps it) and the
  solve restarts at ``t*`` with a fresh ``f`` (no first-same-as-last reuse across the reset).

After an event the value carried for the event that fired is ``c(z⁺) - c(z(t*))`` (exactly 0
when the update leaves the condition unchanged, as a bounce that only flips the velocity, or
without an update), and a carried value of exactly 0 is replaced by the condition's rate of
change ``dc/dt = ∂c/∂z · f + ∂c/∂t`` there: the side the solution moves to. So an event does
not fire again at the time it just fired, and a state reset away from the surface (a neuron's
``v → v_reset``) is seen from its new side. The same rule applies at ``ts[0]``. One exception:
an update that changed the state but left it on the surface moving as in a crossing of the
event's ``direction`` (a ball at rest, whose bounce leaves a velocity pointing down by
rounding) carries the opposite sign, so the event fires again at once instead of being
crossed unseen; a ball bouncing to rest then ends in the Zeno error, never falls through.

Derivatives. The root finder is never differentiated: ``θ*`` is defined implicitly by
``g(θ*, p) = 0`` (``p``: the step's start, interpolant, time, step, and the parameters), so
``dθ* = -(∂g/∂p · dp) / (∂g/∂θ)`` (a ``custom_jvp``), which is the implicit function theorem
``dt* = -(∂c/∂z · dz(t*) + ∂c/∂θ dθ) / (∂c/∂z · ż(t*) + ∂c/∂t)`` on the computed solution
(``ż`` the interpolant's slope). The ``"backprop"`` and ``"checkpoint"`` modes differentiate
the loop through it; the adjoint's jump condition is in ``jaxode.event_adjoint``.

Zeno behaviour (events ever closer together) spends ``max_steps`` (each event ends a step)
and fails with ``errors.EVENTS_MAX_STEPS``, whose message mentions events. With
``odesolve(max_events=M)`` an (M+1)-th event fails the solve (``errors.TOO_MANY_EVENTS``); ``M``
sizes the records of the events that the adjoint and reversible gradients keep.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax

from .while_loops import max_in_batch

__all__ = ["Event"]

_MAX_ITERATIONS = 100


@dataclasses.dataclass(frozen=True)
class Event:
    """An event for ``odesolve(..., events=...)`` (see the module docstring).

    Args:
        condition: ``condition(z, t, params) -> scalar``: the event happens where it crosses 0.
            ``z`` is shaped like ``z0``; the result a real floating-point scalar.
        direction: ``+1``: only upward crossings (negative to positive, in the direction of
            integration), ``-1``: only downward, ``0`` (default): both.
        terminal: stop the solve at the event (default ``True``).
        update: for a non-terminal event, ``update(z, t, params) -> z`` replaces the state at
            ``t*`` (a bounce, a dose, a reset); ``None`` (default) keeps it.
        interior_points: interior points of each step's dense output at which the condition is
            also checked (default 3), to catch a double sign change inside one step.
    """

    condition: Callable[[Any, Array, Any], Array]
    direction: int = dataclasses.field(default=0, kw_only=True)
    terminal: bool = dataclasses.field(default=True, kw_only=True)
    update: Callable[[Any, Array, Any], Any] | None = dataclasses.field(default=None, kw_only=True)
    interior_points: int = dataclasses.field(default=3, kw_only=True)

    def __post_init__(self):
        if not callable(self.condition):
            raise TypeError(f"Event: condition must be callable, got {self.condition!r}")
        if isinstance(self.direction, bool) or self.direction not in (-1, 0, 1):
            raise ValueError(f"Event: direction must be -1, 0 or 1, got {self.direction!r}")
        if not isinstance(self.terminal, bool):
            raise TypeError(f"Event: terminal must be True or False, got {self.terminal!r}")
        if self.update is not None and not callable(self.update):
            raise TypeError(f"Event: update must be callable or None, got {self.update!r}")
        if self.update is not None and self.terminal:
            raise ValueError("Event: an update needs terminal=False (a terminal event stops the solve)")
        points = self.interior_points
        if isinstance(points, bool) or not isinstance(points, int) or points < 0:
            raise ValueError(f"Event: interior_points must be an integer >= 0, got {points!r}")
        object.__setattr__(self, "direction", int(self.direction))


def check_events(events) -> tuple[Event, ...] | None:
    """``events`` (an ``Event``, a list or tuple of them, or ``None``) as a tuple or ``None``."""
    if events is None:
        return None
    if isinstance(events, Event):
        events = (events,)
    if not isinstance(events, (list, tuple)) or not events:
        raise TypeError(f"events must be a jaxode.Event or a non-empty list of them, got {events!r}")
    for i, ev in enumerate(events):
        if not isinstance(ev, Event):
            raise TypeError(f"events[{i}] must be a jaxode.Event, got {ev!r}")
    return tuple(events)


def check_max_events(max_events, events) -> int | None:
    """``max_events``: ``None`` or a positive ``int``, and only with events."""
    if max_events is None:
        return None
    if isinstance(max_events, bool) or not isinstance(max_events, (int, np.integer)) or max_events < 1:
        raise ValueError(f"max_events must be a positive int or None, got {max_events!r}")
    if events is None:
        raise ValueError("max_events bounds the events of a solve: pass events= too")
    return int(max_events)


def record_slots(max_events: int | None, max_steps: int) -> int:
    """The slots of a record with one entry per event: each event ends a step, so at most
    ``max_steps`` of them fire, and at most ``max_events`` where that is given."""
    return max_steps if max_events is None else min(max_events, max_steps)


def _eval_shape(fn, name: str, z0, t, params):
    """``fn(z0, t, params)``'s shapes and dtypes, traced abstractly; a failure names ``name``."""
    try:
        return eqx.filter_eval_shape(fn, z0, t, params)
    except Exception as e:
        raise TypeError(f"calling {name}(z, t, params) failed: {type(e).__name__}: {e}") from e


def check_functions(events: tuple[Event, ...], z0, t, params) -> None:
    """At trace time: each condition returns a real floating-point scalar, each update a state
    with ``z0``'s structure, shapes and dtypes."""
    for i, ev in enumerate(events):
        out = _eval_shape(ev.condition, f"events[{i}].condition", z0, t, params)
        leaves = jax.tree_util.tree_leaves(out)
        if len(leaves) != 1 or leaves[0].shape != () or not jnp.issubdtype(leaves[0].dtype, jnp.floating):
            got = [(x.shape, str(x.dtype)) for x in leaves] if leaves else out
            raise ValueError(
                f"events[{i}].condition(z, t, params) must return a real floating-point scalar, got {got}"
            )
        if ev.update is None:
            continue
        new = _eval_shape(ev.update, f"events[{i}].update", z0, t, params)
        s_in, s_out = jax.tree_util.tree_structure(z0), jax.tree_util.tree_structure(new)
        if s_in != s_out:
            raise ValueError(
                f"events[{i}].update must return the structure of z0: expected {s_in}, got {s_out}"
            )
        for a, b in zip(jax.tree_util.tree_leaves(z0), jax.tree_util.tree_leaves(new)):
            a = jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
            if (a.shape, a.dtype) != (b.shape, b.dtype):
                raise ValueError(
                    f"events[{i}].update must return arrays shaped and typed like z0: a leaf is "
                    f"{a.shape} {a.dtype} in z0 but {b.shape} {b.dtype} in the update's output"
                )


class FlatEvents:
    """The events on flat states: ``conditions[k](y, t, args) -> scalar`` and
    ``updates[k](y, t, args) -> y`` (or ``None``), ``args = (diff, nondiff)`` of the solve;
    ``max_events``: more fail the solve (``errors.TOO_MANY_EVENTS``), or ``None``."""

    def __init__(self, events: tuple[Event, ...], conditions, updates, max_events: int | None = None):
        self.events, self.conditions, self.updates = events, tuple(conditions), tuple(updates)
        self.max_events = max_events
        self.directions = tuple(ev.direction for ev in events)
        self.terminal = tuple(ev.terminal for ev in events)
        self.points = max(ev.interior_points for ev in events)

    def for_loop(self, args, record: bool = False, buffer: int = 0, after: bool = False) -> LoopEvents:
        """The events bound to a solve's arrays, for ``Loop(events=...)``; ``record``: keep the
        non-terminal events (time, state before the update, index) in ``buffer`` slots;
        ``after``: locate terminal events after the loop where the loop allows it
        (``Loop.locate_events_after``), for a caller that reads the final state only."""
        return LoopEvents(self, args, record, buffer, after)


class LoopEvents(NamedTuple):
    flat: FlatEvents
    args: Any
    record: bool
    buffer: int
    after: bool = False

    def values(self, y, t, args=None) -> Array:
        """All conditions at ``(y, t)`` (real time), ``(E,)``, in the state's dtype (>= float32)."""
        args = self.args if args is None else args
        dtype = jnp.promote_types(y.dtype, jnp.float32)
        return jnp.stack([jnp.asarray(c(y, t, args)).astype(dtype) for c in self.flat.conditions])

    def update(self, k, y, t) -> Array:
        """The update of event ``k`` (identity for one without)."""
        branches = [
            (lambda y, t, u=u: u(y, t, self.args)) if u is not None else (lambda y, t: y)
            for u in self.flat.updates
        ]
        if len(branches) == 1:
            return branches[0](y, t)
        return lax.switch(k, branches, y, t)


class _Fired(NamedTuple):
    """The step in which a terminal event fired, kept whole for ``locate_after_loop``."""

    y: Array  # (n,) the state at its start
    coeffs: Array  # its interpolant
    t_h: Array  # (2,) its start and size


class EventCarry(NamedTuple):
    """The events' part of ``LoopState``."""

    c: Array  # (E,) the conditions at the current state (only their signs are used)
    flags: Array  # int32 (..., 3): stopped, index, count (one buffer of the loop's carry)
    times: Array | None  # (M,) real times of the non-terminal events (with record), NaN after
    states: Array | None  # (M, n) the states just before their updates
    which: Array | None  # (M,) their indices
    fired: _Fired | None = None  # with Loop.locate_events_after: the step in which one fired

    stopped = property(lambda self: self.flags[..., 0] > 0)  # a terminal event fired
    index = property(lambda self: self.flags[..., 1])  # the terminal event that fired, -1 if none
    count = property(lambda self: self.flags[..., 2])  # events fired so far


def _flags(stopped, index, count) -> Array:
    return jnp.stack([jnp.asarray(x).astype(jnp.int32) for x in (stopped, index, count)], axis=-1)


def _side(values, rates) -> Array:
    """Values with exact zeros replaced by the rates of change (the side the solution moves to)."""
    return jnp.where(values == 0, rates.astype(values.dtype), values)


def _values_and_rates(loop, y, s, f) -> tuple[Array, Array]:
    """The conditions at ``(y, s)`` and their rates of change along ``ds``, ``(E,)`` each."""
    ev = loop.events
    return jax.jvp(lambda y, s: ev.values(y, loop.direction * s), (y, s), (f, jnp.ones_like(s)))


def init_carry(loop, y0, s0, f0) -> EventCarry:
    ev, n = loop.events, y0.shape[0]
    c, rate = _values_and_rates(loop, y0, s0, f0)
    times = states = which = None
    if ev.record:
        m = ev.buffer
        times = jnp.full((m,), jnp.nan, loop.tdtype)
        states = jnp.zeros((m, n), y0.dtype)
        which = jnp.zeros((m,), jnp.int32)
    fired = None
    if loop.locate_events_after:
        zeros = lambda x: jnp.zeros(x.shape, x.dtype)
        coeffs = jax.tree_util.tree_map(zeros, loop.coefficients_shape())
        fired = _Fired(jnp.zeros_like(y0), coeffs, jnp.zeros((2,), loop.tdtype))
    return EventCarry(lax.stop_gradient(_side(c, rate)), _flags(False, -1, 0), times, states, which, fired)


def _crossings(a, b, directions) -> Array:
    """Whether each pair of consecutive values ``a -> b`` crosses zero in the event's direction."""
    up = (a < 0) & (b >= 0)
    down = (a > 0) & (b <= 0)
    d = jnp.asarray(directions)
    return jnp.where(d > 0, up, jnp.where(d < 0, down, up | down))


class _Step(NamedTuple):
    """An accepted step's dense output, from ``(t, y)`` to ``(t_new, y_new)``, ``h = t_new - t``
    (forward-running time)."""

    t: Array
    h: Array
    y: Array
    coeffs: Array
    t_new: Array
    y_new: Array


class _Crossing(NamedTuple):
    """Where each condition changes sign in a step: in ``[lo, hi]`` of ``θ`` (values ``v_lo``,
    ``v_hi`` there) if ``fired``; ``c_end``: the conditions at the step's end. ``(E,)`` each."""

    fired: Array
    lo: Array
    hi: Array
    v_lo: Array
    v_hi: Array
    c_end: Array


def _crossing(loop, c_start, accept, step: _Step) -> _Crossing:
    """The detection of the module docstring: the conditions at ``interior_points`` and at the
    step's end, with ``c_start`` carried from its start (only an ``accept``-ed step fires)."""
    ev, d, flat = loop.events, loop.direction, loop.events.flat
    interp = lambda th: loop.method.interpolate(step.y, step.coeffs, th)
    thetas = tuple(j / (flat.points + 1) for j in range(1, flat.points + 1))
    rows = [c_start] + [ev.values(interp(th), d * (step.t + th * step.h)) for th in thetas]
    c_end = ev.values(step.y_new, d * step.t_new)
    values = lax.stop_gradient(jnp.stack(rows + [c_end]))  # (K + 2, E)
    grid = jnp.asarray((0.0,) + thetas + (1.0,), loop.tdtype)
    cross = _crossings(values[:-1], values[1:], flat.directions)  # (K + 1, E)
    j = jnp.argmax(cross, axis=0)
    idx = jnp.arange(len(flat.conditions))
    fired = accept & jnp.any(cross, axis=0)
    return _Crossing(fired, grid[j], grid[j + 1], values[j, idx], values[j + 1, idx], c_end)


def _first_event(loop, step: _Step, crossing: _Crossing):
    """The earliest of the events that fired in ``step`` (ties: the lowest index), located by
    the root finders: ``(k, s*, y*)``; ``s* = t_new``, ``y* = y_new`` exactly when it falls on
    the step's end (or when none fired)."""
    ev, d, flat, tdtype = loop.events, loop.direction, loop.events.flat, loop.tdtype
    fired, num = crossing.fired, len(flat.conditions)
    eps = jnp.maximum(jnp.finfo(tdtype).eps, jnp.finfo(crossing.v_lo.dtype).eps).astype(tdtype)
    h_safe = jnp.where(step.h > 0, step.h, 1)
    atol = eps * jnp.maximum(jnp.abs(step.t) / h_safe, 1)
    step_args = (step.y, step.coeffs, step.t, step.h, d, ev.args)

    def locate_all():
        thetas_star = []
        for e in range(num):
            g = functools.partial(_g, loop.method.interpolate, flat.conditions[e])
            # a bracket of width 0 where the event did not fire: under jax.vmap (where lax.cond
            # runs both branches) its root finder stops after one evaluation
            lo, hi = jnp.where(fired[e], crossing.lo[e], 1), jnp.where(fired[e], crossing.hi[e], 1)
            bracket = (lo, hi, crossing.v_lo[e], crossing.v_hi[e], atol)
            locate = lambda g=g, bracket=bracket: root(g, bracket, step_args)
            thetas_star.append(lax.cond(fired[e], locate, lambda: jnp.ones((), tdtype)))
        return jnp.stack(thetas_star)

    # under jax.vmap, the root finders run only in the steps where an event fired somewhere
    theta_all = lax.cond(max_in_batch(jnp.any(fired)), locate_all, lambda: jnp.ones((num,), tdtype))
    key = jnp.where(fired, lax.stop_gradient(theta_all), jnp.inf)
    k = jnp.argmin(key).astype(jnp.int32)
    theta = theta_all[k]
    end = lax.stop_gradient(theta >= 1)
    s_lin = step.t + theta * step.h
    s_star = s_lin + jnp.where(end, lax.stop_gradient(step.t_new - s_lin), 0)
    y_lin = loop.method.interpolate(step.y, step.coeffs, theta)
    y_star = y_lin + jnp.where(end, lax.stop_gradient(step.y_new - y_lin), 0)
    return k, s_star, y_star


def after_step(loop, old, new, at, coeffs):
    """Detects and handles the events of the attempt ``at`` (from ``old`` to ``new``; see the
    module docstring). Returns ``(new, at)`` with the step truncated at the first event: ``at``'s
    ``t_new, y_new`` are then ``t*`` and the state there (for the output writers)."""
    if loop.locate_events_after:
        return _detect_only(loop, old, new, at, coeffs)
    ev, carry, d = loop.events, old.event, loop.direction
    flat = ev.flat
    idx = jnp.arange(len(flat.conditions))
    step = _Step(at.t, at.h, at.y, coeffs, at.t_new, at.y_new)
    crossing = _crossing(loop, carry.c, at.accept, step)
    k, s_star, y_star = _first_event(loop, step, crossing)
    any_fired = jnp.any(crossing.fired)
    terminal = any_fired & jnp.asarray(flat.terminal)[k]
    reset = any_fired & ~jnp.asarray(flat.terminal)[k]

    def restart():
        y_plus = ev.update(k, y_star, d * s_star)
        f_plus = loop.g(y_plus, s_star)
        c_plus, rate = _values_and_rates(loop, y_plus, s_star, f_plus)
        c_star = ev.values(y_star, d * s_star)
        c_plus = jnp.where(idx == k, c_plus - c_star, c_plus)
        # an update that leaves the state on the surface moving as in a crossing of the event's
        # direction (a ball at rest whose bounce leaves it falling): it fires again at once
        dirs = jnp.asarray(flat.directions)
        again = jnp.any(y_plus != y_star) & (dirs != 0) & (jnp.sign(rate) == dirs) & (idx == k)
        return y_plus, f_plus, _side(c_plus, jnp.where(again, -rate, rate))

    def go_on():
        return new.y, new.f, jnp.where(at.accept, crossing.c_end, carry.c)

    if all(flat.terminal):  # no restart to prepare (under jax.vmap, lax.cond would run it)
        y_next, f_next, c_next = go_on()
    else:
        y_next, f_next, c_next = lax.cond(reset, restart, go_on)
    y_next = jnp.where(terminal, y_star, y_next)
    times, states, which = carry.times, carry.states, carry.which
    if ev.record:
        slot = jnp.minimum(carry.count, ev.buffer - 1)
        put = lambda buf, v: buf.at[slot].set(jnp.where(reset, v, buf[slot]))
        times, states, which = put(times, d * s_star), put(states, y_star), put(which, k)
    flags = _flags(carry.stopped | terminal, jnp.where(terminal, k, carry.index), carry.count + any_fired)
    event = carry._replace(c=lax.stop_gradient(c_next), flags=flags, times=times, states=states, which=which)
    new = new._replace(
        t=jnp.where(any_fired, s_star, new.t), y=y_next, f=f_next, event=event,
    ).counted(nfe=new.nfe + reset.astype(jnp.int32))
    at = at._replace(
        t_new=jnp.where(any_fired, s_star, at.t_new), y_new=jnp.where(any_fired, y_star, at.y_new),
    )
    return new, at


def _detect_only(loop, old, new, at, coeffs):
    """``after_step`` with terminal events only, located after the loop
    (``Loop.locate_events_after``): a step in which one fires is kept whole (``_Fired``) and
    stops the loop; ``new`` and ``at`` are left as they are (the outputs past ``t*`` are
    written, then masked by ``locate_after_loop``). Under ``jax.vmap`` the root finders then
    run once, after the loop, not in every step in which some problem's event fired."""
    carry = old.event
    step = _Step(at.t, at.h, at.y, coeffs, at.t_new, at.y_new)
    crossing = _crossing(loop, carry.c, at.accept, step)
    fired = jnp.any(crossing.fired)
    kept = _Fired(at.y, coeffs, jnp.stack([at.t, at.h]))
    kept = jax.tree_util.tree_map(lambda a, b: jnp.where(fired, a, b), kept, carry.fired)
    c = jnp.where(at.accept & ~fired, crossing.c_end, carry.c)  # the step's start: for the location
    flags = _flags(carry.stopped | fired, carry.index, carry.count + fired)
    return new._replace(event=carry._replace(c=lax.stop_gradient(c), flags=flags, fired=kept)), at


def locate_after_loop(loop, state):
    """The final state of a loop with ``locate_events_after``: a terminal event that fired in
    the last step is located there (as ``after_step`` would have); the state becomes ``(t*,
    z(t*))`` and the outputs after ``t*`` are NaN again."""
    carry = state.event
    kept, stopped = carry.fired, carry.stopped
    step = _Step(kept.t_h[0], kept.t_h[1], kept.y, kept.coeffs, state.t, state.y)
    k, s_star, y_star = _first_event(loop, step, _crossing(loop, carry.c, stopped, step))
    ys = state.ys
    if ys is not None:
        ys = jnp.where((stopped & (loop.s_ts > s_star))[:, None], jnp.nan, ys)
    event = carry._replace(flags=_flags(stopped, jnp.where(stopped, k, -1), carry.count))
    return state._replace(
        t=jnp.where(stopped, s_star, state.t), y=jnp.where(stopped, y_star, state.y), ys=ys, event=event,
    )


def _g(interpolate, condition, theta, args):
    """The condition along a step's dense output, ``g(θ) = c(y(t + θh), t + θh)`` (``t``, ``h``
    in the forward-running time, ``direction`` the sign of real time)."""
    y, coeffs, t, h, direction, cargs = args
    return condition(interpolate(y, coeffs, theta), direction * (t + theta * h), cargs)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def root(g, bracket, args) -> Array:
    """The root of ``θ -> g(θ, args)`` in ``bracket = (lo, hi, g_lo, g_hi, atol)``, whose values
    at the ends have opposite signs (``g_hi`` may be 0); differentiated implicitly."""
    lo, hi, g_lo, g_hi, atol = bracket
    found = _chandrupatla(lambda th: g(th, args), lo, hi, g_lo, g_hi, atol)
    return jnp.where(g_hi == 0, hi, found)


@root.defjvp
def _root_jvp(g, primals, tangents):
    """``dθ* = -(∂g/∂args · dargs) / (∂g/∂θ)`` at ``θ*`` (the bracket has no derivative)."""
    bracket, args = primals
    theta = root(g, bracket, args)
    _, num = jax.jvp(lambda a: g(theta, a), (args,), (tangents[1],))
    _, den = jax.jvp(lambda th: g(th, args), (theta,), (jnp.ones_like(theta),))
    ok = den != 0
    dtheta = jnp.where(ok, -num / jnp.where(ok, den, 1), 0).astype(theta.dtype)
    return theta, dtheta


def _chandrupatla(g, lo, hi, g_lo, g_hi, atol) -> Array:
    """Chandrupatla's bracketing root finder (inverse quadratic interpolation where it is safe,
    else bisection), in the dtype of ``lo``; stops when ``g = 0``, the bracket is below
    ``2 eps |θ| + atol``, or after ``_MAX_ITERATIONS`` evaluations."""
    dtype = jnp.result_type(lo)
    eps = jnp.finfo(dtype).eps
    g_lo, g_hi = g_lo.astype(dtype), g_hi.astype(dtype)
    # a: the newest point; b: the last one with the opposite sign; c: the one dropped
    init = dict(a=hi, fa=g_hi, b=lo, fb=g_lo, c=lo, fc=g_lo, t=jnp.asarray(0.5, dtype),
                i=jnp.zeros((), jnp.int32), done=jnp.zeros((), bool))

    def body(s):
        x = s["a"] + s["t"] * (s["b"] - s["a"])
        fx = jnp.asarray(g(x)).astype(dtype)
        same = jnp.sign(fx) == jnp.sign(s["fa"])
        c, fc = jnp.where(same, s["a"], s["b"]), jnp.where(same, s["fa"], s["fb"])
        b, fb = jnp.where(same, s["b"], s["a"]), jnp.where(same, s["fb"], s["fa"])
        a, fa = x, fx
        xm = jnp.where(jnp.abs(fa) < jnp.abs(fb), a, b)
        fm = jnp.where(jnp.abs(fa) < jnp.abs(fb), fa, fb)
        tol = 2 * eps * jnp.abs(xm) + atol
        width = jnp.abs(b - a)
        tlim = tol / jnp.where(width > 0, width, 1)
        done = (fm == 0) | (tlim > 0.5) | (width == 0) | ~jnp.isfinite(fx)
        xi = (a - b) / jnp.where(c != b, c - b, 1)
        phi = (fa - fb) / jnp.where(fc != fb, fc - fb, 1)
        iqi = (phi**2 < xi) & ((1 - phi) ** 2 < 1 - xi)
        den = lambda u: jnp.where(u != 0, u, 1)
        t_iqi = (fa / den(fb - fa) * fc / den(fb - fc)
                 + (c - a) / den(b - a) * fa / den(fc - fa) * fb / den(fc - fb))
        t = jnp.clip(jnp.where(iqi, t_iqi, 0.5), tlim, 1 - tlim)
        return dict(a=a, fa=fa, b=b, fb=fb, c=c, fc=fc, t=t, i=s["i"] + 1, done=done)

    final = lax.while_loop(lambda s: ~s["done"] & (s["i"] < _MAX_ITERATIONS), body, init)
    best = jnp.where(jnp.abs(final["fa"]) < jnp.abs(final["fb"]), final["a"], final["b"])
    return jnp.clip(best, jnp.minimum(lo, hi), jnp.maximum(lo, hi))


def attach(events: tuple[Event, ...], field, diff, nondiff, z0, t0, y0, params, unravel, ravel,
           max_events: int | None = None):
    """The solve's problem with its events: ``(field, diff, nondiff, FlatEvents)``.

    The conditions and updates are checked (``check_functions``), put on flat states
    (``unravel``: ``(n,) -> z``, ``ravel``: ``z -> (n,)``) and closure-converted like the field:
    arrays they close over or hold become arguments, differentiated like ``params``. The new
    ``diff`` and ``nondiff`` are ``(field's, events')`` pairs; the new field takes them.
    """
    check_functions(events, z0, t0, params)
    params_dyn, params_static = eqx.partition(params, eqx.is_array)
    as_params = lambda p_dyn: eqx.combine(p_dyn, params_static)
    converted, consts = [], []
    for ev in events:
        flat_c = lambda y, t, p, fn=ev.condition: jnp.asarray(fn(unravel(y), t, as_params(p)))
        flat_u = lambda y, t, p, fn=ev.update: ravel(fn(unravel(y), t, as_params(p)))
        for fn, flat in ((ev.condition, flat_c), (ev.update, flat_u)):
            if fn is None:
                converted.append(None)
                consts.append(())
                continue
            conv, cs = jax.closure_convert(flat, y0, t0, params_dyn)
            converted.append(conv)
            consts.append(tuple(cs))
    ev_diff, ev_nondiff = eqx.partition(tuple(consts), eqx.is_inexact_array)

    def bind(i):
        def call(y, t, args):
            d, nd = args
            p_dyn = eqx.combine(d[0], nd[0])[0]
            return converted[i](y, t, p_dyn, *eqx.combine(d[1], nd[1])[i])

        return None if converted[i] is None else call

    def new_field(y, t, d, nd):
        return field(y, t, d[0], nd[0])

    conditions = [bind(2 * k) for k in range(len(events))]
    updates = [bind(2 * k + 1) for k in range(len(events))]
    flat = FlatEvents(events, conditions, updates, max_events)
    return new_field, (diff, ev_diff), (nondiff, ev_nondiff), flat
