"""The interpolating adjoint: the backward solve reads ``z`` off the forward solution.

The backsolve adjoint (``adjoint.backward``) integrates ``z`` backwards in time together with
``a``. For a stiff problem that is hopeless: a mode decaying like ``e^{-λt}`` forwards grows
like ``e^{λt}`` backwards (with ``λ = 1e3`` over one time unit, by ``e^{1000}``). Here ``z`` is
never integrated backwards. On each output interval ``[t_{i-1}, t_i]``, last to first:

1. ``z`` is re-solved forwards from the stored ``ys[i-1]`` to ``t_i`` (same method and
   tolerances), keeping its steps' interpolants, at most ``4 · _SEGMENT`` (128) step attempts.
   If that reaches ``t_i`` (the common case: outputs closer than 128 steps),
   ``a' = -a·∂f/∂z(z(t), t)`` is solved backwards over the interval, from
   ``a(t_i) = a(t_i⁺) + ∂L/∂ys[i]``, with the same method, ``z(t)`` read off those
   interpolants. Its Jacobian, ``-(∂f/∂z)ᵀ``, is ``n × n``: what an implicit method factorises.
2. Otherwise (and always for a batch, under ``vmap``, where a ``lax.cond`` would run both
   branches) by segments: ``z`` is re-solved over the whole interval keeping a checkpoint
   ``(t, z, h)`` every ``_SEGMENT`` (32) accepted steps; then segment by segment, last to first,
   ``z`` is re-solved from the segment's checkpoint keeping its interpolants and ``a`` is solved
   back over the segment as in 1. Memory: ``max_steps / 32`` checkpoints and 128 steps'
   interpolants, whatever the number of steps.
3. the parameter and time adjoints, ``a_θ = ∫ a·∂f/∂θ dt`` and ``a_t = -∫ a·∂f/∂t dt``
   (backwards), are quadratures on each accepted step's nodes with the method's weights
   (``Method.quadrature_weights``: for a Runge–Kutta method exactly the update the augmented
   state would get), by one ``jax.vjp`` of ``f`` over the nodes. They are never part of the
   state, so never of a Jacobian or an LU, and never of the error control (as with
   ``adjoint_seminorm``), however many parameters there are.

Then ``∂L/∂z0 = a(t_0)``, ``∂L/∂θ = a_θ(t_0)``, and ``∂L/∂ts`` as in ``jaxode.adjoint``. The
gradient is that of the continuous adjoint, as accurate as the re-solved ``z`` and the
backward solve's tolerances allow; unlike the backsolve adjoint, errors in ``z`` do not grow
backwards. Cost: every interval is solved forwards twice (once in the forward pass; three times
when by segments), and each backward step takes one more ``jax.vjp`` of ``f`` per node for the
quadratures. (Each backward solve picks its first step afresh: ``a`` jumps by ``∂L/∂ys[i]`` at
every output, and a stiff ``a`` then has a fast transient of its own to resolve.)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from . import errors
from . import events as events_module
from .dense import evaluate_steps
from .drivers import integrate
from .forward import Config, Controls, FlatField
from .loop import Info, Loop, LoopState


def backward(
    field: FlatField, ys, ts, diff, nondiff, ct_ys, controls: Controls, bwd_controls: Controls, cfg: Config,
    batched: bool = False, start=None, jump=None,
):
    """``(∂L/∂y0, ∂L/∂ts, ∂L/∂diff, info)`` by the interpolating adjoint (module docstring).

    ``controls``: the forward solve's (for the re-solves); ``bwd_controls``: the backward
    solve's tolerances. ``ys``, ``ct_ys``: ``(T, n)``. ``batched``: the function is to be
    vmapped (then no ``lax.cond``). ``start``: ``(a, a_θ)`` at ``ts[-1]`` before its output's
    cotangent is added (default zeros; the event adjoint's jump condition at a terminal event);
    equal consecutive times (outputs past a terminal event) are skipped. ``jump(a, τ, z⁻, k)``:
    with ``cfg.events``, the adjoint's jump ``(a⁻, Δa_θ)`` across a reset (``jaxode.event_adjoint``);
    the re-solves then replay the events that update the state. ``info`` sums the
    backward solves' steps; its ``nfe`` also counts the re-solves' evaluations and the
    quadratures' vjps.
    """
    num_out, n = ys.shape
    theta, unravel = ravel_pytree(diff)
    dtype = ys.dtype
    method = cfg.method
    weights = jnp.asarray(method.quadrature_weights, dtype)
    ct_ys = ct_ys.astype(dtype)
    dt0 = None if method.adaptive else controls.dt0
    options = dict(method=method, max_steps=cfg.max_steps, max_dt=controls.max_dt, jump_ts=controls.jump_ts)
    resets = None if jump is None else _resets(cfg.events, (diff, nondiff))

    def f(z, t, th):
        return field(z, t, unravel(th), nondiff)

    fz = lambda z, t: f(z, t, theta)

    def reset_jump(a, tau, z_minus, k):  # the re-solves' records index the resetting events only
        return jump(a, tau, z_minus, resets.index[k])

    def adjoint_over(part, t0, t1, a):
        return _adjoint(f, theta, part, t0, t1, a, dt0, bwd_controls, weights, options, reset_jump)

    def segments(i, a, info):
        """The interval by checkpointed segments, last to first: ``(a, ∂θ, ∂t, info)``."""
        span = jnp.stack([ts[i - 1], ts[i]])
        slots, count, first = _checkpoints(fz, ys[i - 1], span, controls, dt0, options, resets)
        info = _add(info, first, backward=False)

        def segment(j, carry):
            a, ct_theta, ct_time, info = carry
            k = count - 1 - j
            t_end = jnp.where(k + 1 < count, slots.t[jnp.minimum(k + 1, slots.t.shape[0] - 1)], ts[i])
            seg_dt0 = slots.h[k] if method.adaptive else controls.dt0
            part = _resolve(fz, slots.t[k], slots.y[k], seg_dt0, t_end, controls, options, resets)
            a, d_theta, d_time, seg_info = adjoint_over(part, slots.t[k], t_end, a)
            return a, ct_theta + d_theta, ct_time + d_time, _add(info, seg_info, backward=True)

        zeros = (jnp.zeros_like(theta), jnp.zeros((), ts.dtype))
        return lax.fori_loop(0, count, segment, (a,) + zeros + (info,))

    def interval(carry, i):
        """The backward solve over ``[t_{i-1}, t_i]``: from one re-solve when the interval's steps
        fit in one segment's storage, else by ``segments``."""
        a, ct_theta, ct_time, before = carry
        a_before = a = a + ct_ys[i]
        info = before
        if batched:  # under vmap a cond runs both branches: always by segments
            a, d_theta, d_time, info = segments(i, a, info)
        else:
            whole = _resolve(fz, ts[i - 1], ys[i - 1], dt0, ts[i], controls, options, resets)

            def at_once(a, info):
                a, d_theta, d_time, part_info = adjoint_over(whole, ts[i - 1], ts[i], a)
                return a, d_theta, d_time, _add(info, part_info, backward=True)

            fits = whole.status == errors.SUCCESS
            tried = _info(whole, 1)._replace(status=jnp.asarray(errors.SUCCESS, jnp.int32))  # its cost only
            by_segments = lambda a, info: segments(i, a, _add(info, tried, backward=False))
            a, d_theta, d_time, info = lax.cond(fits, at_once, by_segments, a, info)
        # an empty interval (outputs past a terminal event, all at its time) changes nothing
        empty = ts[i - 1] == ts[i]
        a = jnp.where(empty, a_before, a)
        d_theta, d_time = jnp.where(empty, 0, d_theta), jnp.where(empty, 0, d_time)
        info = jax.tree_util.tree_map(lambda old, new: jnp.where(empty, old, new), before, info)
        return (a, ct_theta + d_theta, ct_time + d_time, info), None

    zero = jnp.zeros((), jnp.int32)
    info = Info(zero, zero, zero, zero, zero, zero, ts[-1])
    a_end, ct_theta_end = (jnp.zeros(n, dtype), jnp.zeros_like(theta)) if start is None else start
    carry = (a_end.astype(dtype), ct_theta_end.astype(theta.dtype), jnp.zeros((), ts.dtype), info)
    (a, ct_theta, ct_time, info), _ = lax.scan(interval, carry, jnp.arange(num_out - 1, 0, -1))
    fs = jax.vmap(lambda yi, ti: field(yi, ti, diff, nondiff))(ys[1:], ts[1:])
    ct_t = jnp.sum(ct_ys[1:] * fs, axis=1)
    ct_ts = jnp.concatenate([(ct_time - jnp.sum(ct_t))[None], ct_t]).astype(ts.dtype)
    ct_y0 = a + ct_ys[0]
    return ct_y0, ct_ts, unravel(ct_theta), info._replace(final_time=lax.stop_gradient(info.final_time))


_SEGMENT = 32  # accepted steps between the checkpoints of an interval's first re-solve


class _Slots(NamedTuple):
    """Checkpoints of a re-solve: real time, state, next step size; ``(C,)``, ``(C, n)``, ``(C,)``."""

    t: jax.Array
    y: jax.Array
    h: jax.Array


def _checkpoints(fz, y0, span, controls: Controls, dt0, options, resets=None
                 ) -> tuple[_Slots, jax.Array, Info]:
    """Solves ``z`` over ``span`` from ``y0`` (replaying ``resets``), keeping ``(t, z, h)`` at its
    start and after every ``_SEGMENT``-th accepted step (with resets: the first after it that
    did not end at a reset, so that every reset lies inside a segment, where its re-solve
    replays it): ``(slots, count, info)``."""
    events = None if resets is None else resets.for_loop()
    loop = Loop(fz, y0, span, controls.rtol, controls.atol, dt0, save_outputs=False, events=events, **options)
    capacity = -(-options["max_steps"] // _SEGMENT) + 1
    state = loop.init()
    slots = _Slots(jnp.zeros(capacity, span.dtype).at[0].set(span[0]),
                   jnp.zeros((capacity,) + y0.shape, y0.dtype).at[0].set(y0),
                   jnp.zeros(capacity, state.h.dtype).at[0].set(state.h))

    def body(c):
        state, slots, count, since = c
        new, _ = loop.step(state)
        since = since + (new.num_accepted - state.num_accepted)
        due = (since >= _SEGMENT) & loop.running(new)
        if events is not None:
            due = due & (new.event.count == state.event.count)
        k = jnp.minimum(count, capacity - 1)
        put = lambda buf, x: buf.at[k].set(jnp.where(due, x, buf[k]))
        slots = _Slots(put(slots.t, loop.direction * new.t), put(slots.y, new.y), put(slots.h, new.h))
        return new, slots, count + due.astype(jnp.int32), jnp.where(due, 0, since)

    init = (state, slots, jnp.ones((), jnp.int32), jnp.zeros((), jnp.int32))
    state, slots, count, _ = lax.while_loop(lambda c: loop.running(c[0]), body, init)
    state = loop.finish(state)
    return slots, count, _info(state, loop.direction)


def _resolve(fz, t0, y0, dt0, t1, controls: Controls, options, resets=None) -> LoopState:
    """``z`` re-solved from ``(t0, y0)`` to ``t1`` (first step ``dt0``, ``None``: chosen), keeping
    every step's interpolant, at most ``4 _SEGMENT`` step attempts (else a ``MAX_STEPS`` status)."""
    local = dict(options, max_steps=4 * _SEGMENT)
    events = None if resets is None else resets.for_loop(record=True, buffer=4 * _SEGMENT)
    return integrate(fz, y0, jnp.stack([t0, t1]), controls.rtol, controls.atol, dt0, driver="flat",
                     save_outputs=False, save_dense=True, events=events, **local)


def _adjoint(f, theta, part: LoopState, t0, t1, a1, dt0, bwd_controls: Controls, weights, options, jump=None):
    """``a`` solved back from ``a(t1) = a1`` to ``t0`` over the re-solve ``part`` of ``[t0, t1]``
    (first step ``dt0``; ``None``: chosen afresh, as ``a`` jumps by ``∂L/∂ys[i]`` there), ``z``
    read off its interpolants, with the quadratures: ``(a(t0), ∂L/∂θ part, ∂L/∂t part, info)``;
    ``info`` also counts ``part``'s evaluations."""
    method = options["method"]
    span = jnp.stack([t0, t1])
    direction = jnp.where(t1 >= t0, 1, -1).astype(span.dtype)

    def z_at(t):  # continued past the part's ends: some methods' stages lie beyond their step
        # side="left": at a reset, a backward step starting there needs z⁻
        return evaluate_steps(part.dense, t0, direction * part.t, direction, method, t, extrapolate=True,
                              side="left", search="compare_all")

    def adjoint_field(a, t):
        _, vjp = jax.vjp(lambda z: f(z, t, theta), z_at(t))
        return -vjp(a)[0]

    replayed = part.event  # the resets the re-solve replayed (None without)
    if replayed is not None:  # landing on each, then the jump condition (in ``body``)
        jump_ts = options["jump_ts"]
        jump_ts = replayed.times if jump_ts is None else jnp.concatenate([jump_ts, replayed.times])
        options = dict(options, jump_ts=jump_ts)
    loop = Loop(adjoint_field, a1, span[::-1], bwd_controls.rtol, bwd_controls.atol, dt0, save_outputs=False,
                **options)

    def at_reset(state, accepted):
        """``state`` with the jump condition applied if it just landed on a reset, and its
        contribution to ``∂L/∂θ``."""
        t = loop.direction * state.t
        match = accepted & (replayed.times == t)
        j = jnp.argmax(match)

        def apply():
            a, d_theta = jump(state.y, replayed.times[j], replayed.states[j], replayed.which[j])
            f_after = loop.g(a.astype(state.y.dtype), jnp.nextafter(state.t, jnp.inf))
            new = state._replace(y=a.astype(state.y.dtype), f=f_after).counted(nfe=state.nfe + 1)
            return new, d_theta.astype(theta.dtype)

        return lax.cond(jnp.any(match), apply, lambda: (state, jnp.zeros_like(theta)))

    def quadratures(record, counted):
        """``-h Σ_j w_j a_j·∂f/∂(θ, t)(z(t_j), t_j)`` over the step's nodes, if ``counted``."""
        z = jax.vmap(z_at)(record.times)
        at_nodes = lambda th, tt: jax.vmap(lambda zj, tj: f(zj, tj, th))(z, tt)
        _, vjp = jax.vjp(at_nodes, theta, record.times)
        cotangent = jnp.where(counted, -(record.h * weights)[:, None] * record.inputs, 0)
        d_theta, d_times = vjp(cotangent.astype(a1.dtype))
        return d_theta, jnp.sum(d_times)

    def body(c):
        state, acc_theta, acc_time = c
        new, record = loop.step(state)
        accepted = new.num_accepted > state.num_accepted
        d_theta, d_time = quadratures(record, accepted)
        if replayed is not None:
            new, jump_theta = at_reset(new, accepted)
            d_theta = d_theta + jump_theta
        return new, acc_theta + d_theta, acc_time + d_time

    init = (loop.init(), jnp.zeros_like(theta), jnp.zeros((), span.dtype))
    state, d_theta, d_time = lax.while_loop(lambda c: loop.running(c[0]), body, init)
    state = loop.finish(state)
    info = _info(state, loop.direction)
    quadrature_nfe = len(weights) * state.num_accepted
    info = info._replace(nfe=info.nfe + part.nfe + quadrature_nfe,
                         num_jacobians=info.num_jacobians + part.num_jacobians)
    status = jnp.where(part.status != errors.SUCCESS, part.status, state.status)
    return state.y, d_theta, d_time, info._replace(status=status)


def _resets(flat, args):
    """The events that change the state (non-terminal, with an update), bound to ``args``, for
    the re-solves; ``None`` if there are none. Their record's indices are mapped back to
    ``flat``'s."""
    keep = [k for k, (u, terminal) in enumerate(zip(flat.updates, flat.terminal))
            if u is not None and not terminal]
    if not keep:
        return None
    only = events_module.FlatEvents(tuple(flat.events[k] for k in keep), [flat.conditions[k] for k in keep],
                                    [flat.updates[k] for k in keep])
    return _Resets(only, args, jnp.asarray(keep, jnp.int32))


class _Resets(NamedTuple):
    flat: object  # events.FlatEvents of the resetting events
    args: object
    index: jax.Array  # (E',) their indices among all the events

    def for_loop(self, record: bool = False, buffer: int = 1):
        return self.flat.for_loop(self.args, record=record, buffer=buffer)


def _info(state, direction) -> Info:
    return Info(state.num_accepted + state.num_rejected, state.num_accepted, state.num_rejected, state.nfe,
                state.status, state.num_jacobians, direction * state.t)


def _add(total: Info, part: Info, backward: bool) -> Info:
    """``total`` with ``part``'s evaluations added, its first failure kept; for a ``backward``
    solve also its steps, and the time it reached."""
    failed = total.status != errors.SUCCESS
    total = total._replace(
        nfe=total.nfe + part.nfe, num_jacobians=total.num_jacobians + part.num_jacobians,
        status=jnp.where(failed, total.status, part.status),
    )
    if not backward:
        return total
    return total._replace(
        num_steps=total.num_steps + part.num_steps, num_accepted=total.num_accepted + part.num_accepted,
        num_rejected=total.num_rejected + part.num_rejected,
        final_time=jnp.where(failed | (part.status != errors.SUCCESS), total.final_time, part.final_time),
    )


def backward_batched(
    field: FlatField, ys, ts, diff, nondiff, ct_ys, controls: Controls, bwd_controls: Controls, cfg: Config
):
    """``backward`` for a batch ``(B, T, n)`` sharing its parameters: per problem, summed."""
    one = lambda y, c: backward(field, y, ts, diff, nondiff, c, controls, bwd_controls, cfg, batched=True)
    ct_y0, ct_ts, ct_diff, info = jax.vmap(one)(ys, ct_ys)
    total = lambda x: jnp.sum(x, axis=0)
    return ct_y0, total(ct_ts), jax.tree_util.tree_map(total, ct_diff), info
