"""The continuous adjoint with events: the jump conditions at event times.

The forward solve (``Loop`` with ``events``) also records every non-terminal event: its time
``τ``, the state just before it ``z⁻ = z(τ⁻)`` and which event fired. The backward solve of
``[z, a, a_θ]`` (as in ``jaxode.adjoint``, ``a = ∂L/∂z``, ``a_θ = ∂L/∂θ``) lands exactly on each
event time (as on a time of ``jump_ts``) and applies there the adjoint's jump condition.

**Jump at a reset** ``z⁺ = u(z⁻, τ, θ)``, ``τ`` defined by ``c(z⁻, τ, θ) = 0``. A perturbation
``δz⁻`` of the state before the event moves the event to ``τ + δτ`` with
``δτ = -(c_z·δz⁻ + c_θ δθ) / ċ``, ``ċ = c_z·f⁻ + c_t`` (``f^∓ = f(z^∓, τ)``), and the state
after it, compared at the same time, by ``δz⁺ = u_z δz⁻ + u_θ δθ + (u_z f⁻ + u_t - f⁺) δτ``.
With ``a⁺·δz⁺ = a⁻·δz⁻ + (a_θ⁻ - a_θ⁺)·δθ``:

    κ   = a⁺·(u_z f⁻ + u_t - f⁺) / ċ
    a⁻  = a⁺ u_z - κ c_z
    a_θ⁻ = a_θ⁺ + a⁺ u_θ - κ c_θ

and ``z`` is re-anchored to the recorded ``z⁻``. (Without an update, ``u`` is the identity and
``f⁺ = f⁻``: ``κ = 0``, no jump.)

**Terminal event** at ``τ`` (the solve ends there): ``event_time = τ`` and
``event_state = z(τ)`` move with the state before it as ``dτ = -c_z·δz/ċ`` and
``dz(τ) = δz + f dτ``, so the backward solve starts at ``τ`` from

    κ = (∂L/∂z(τ)·f + ∂L/∂τ) / ċ,   a(τ⁻) = ∂L/∂z(τ) - κ c_z,   a_θ(τ⁻) = -κ c_θ;

outputs after ``τ`` (NaN, not reached) get no cotangent. Without a terminal event
``event_time = ts[-1]`` and ``event_state = ys[-1]`` add to ``∂L/∂ts[-1]`` and ``∂L/∂ys[-1]``.

**Times**: ``∂L/∂ts[i] = ∂L/∂ys[i]·f(ys[i], ts[i])`` for the outputs reached (``i >= 1``), and
``∂L/∂ts[0] = -a(t_0⁺)·f(z0, t_0)`` (shifting the start with ``z0`` fixed is the perturbation
``δz0 = -f δt_0``, events included).

**Interpolating adjoint** (an implicit method, or ``adjoint_interpolate=True``): ``z`` is not
integrated backwards but read off forward re-solves (``jaxode.interpolated_adjoint``) on the
outputs reached, the last interval ending at ``τ``; ``a`` starts there from the terminal jump
above. The re-solves replay the events that update the state, recording them as the forward
solve does; the backward solve of ``a`` lands on each and applies the jump above to ``a`` and
``a_θ`` (events without an update change nothing backwards).

Second derivatives of this mode are not supported (a clear error; ``"backprop"`` has them).
Memory: with a non-terminal event the record holds ``max_events`` slots of ``(τ, z⁻, index)``
(by default ``max_steps``: each event ends a step), ``max_events × n`` numbers;
``batched=True`` and ``jax.grad`` of ``jax.vmap`` over ``z0`` (the parameters shared): with
terminal events only, one shared parameter adjoint for the batch (``backward_shared``, as the
plain adjoint's ``batched=True``; the parameters then out of the backward error control); with
a non-terminal event, one backward solve per problem (per-problem parameter adjoints, summed
by JAX). Not covered: an event exactly at an output time other than ``ts[-1]``
is applied there too; one exactly at ``ts[-1]`` (non-terminal) is not.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax
from jax.flatten_util import ravel_pytree

from . import adjoint, errors, interpolated_adjoint
from . import events as events_module
from .drivers import integrate
from .forward import Config, Controls, FlatField, Solution
from .loop import info_of
from .while_loops import zero_cotangent


def _forward(field: FlatField, y0, ts, diff, nondiff, controls: Controls, cfg: Config, record: bool):
    """The forward solve with events; ``record``: keep the non-terminal events."""
    resets = not all(cfg.events.terminal)  # only non-terminal events need the record
    slots = events_module.record_slots(cfg.max_events, cfg.max_steps) if resets else 1
    events = cfg.events.for_loop((diff, nondiff), record=record, buffer=slots, after=True)
    state = integrate(
        lambda y, t: field(y, t, diff, nondiff), y0, ts, controls.rtol, controls.atol, controls.dt0,
        method=cfg.method, max_steps=cfg.max_steps, max_dt=controls.max_dt, jump_ts=controls.jump_ts,
        save_dense=cfg.dense, progress=cfg.progress, events=events,
    )
    direction = jnp.where(ts[-1] >= ts[0], 1, -1).astype(state.t.dtype)
    return state, info_of(state, direction)


def solve(field: FlatField, y0, ts, diff, nondiff, controls: Controls, adjoint_tols, cfg: Config) -> Solution:
    """The forward ``Solution`` with events, differentiated by the backward adjoint solve with
    the jump conditions (module docstring). ``batched``: ``jax.vmap`` of one problem's solve.

    With terminal events only, ``jax.grad`` of ``jax.vmap`` over ``y0`` (shared parameters)
    runs ``backward_shared``: the backward solves accumulate one parameter adjoint for the whole
    batch (``adjoint.shared_backsolve``), as the plain adjoint does.
    """
    if cfg.batched:
        single = cfg._replace(batched=False)
        one = lambda y: solve(field, y, ts, diff, nondiff, controls, adjoint_tols, single)
        return jax.vmap(one)(y0)
    args = (y0, ts, diff, nondiff, controls, adjoint_tols)
    run_one = _custom_solve(field, cfg, backward)
    if all(cfg.events.terminal) and not (cfg.interpolate or cfg.dense):
        run_many = _custom_solve(field, cfg, backward_shared, batch=True)
        out = adjoint.shared_parameters_under_vmap(run_one, run_many, args)
    else:
        out = run_one(*args)
    return Solution(*out, None)


def _custom_solve(field: FlatField, cfg: Config, backward_fn, batch: bool = False):
    """The solve ``(y0, ts, diff, nondiff, controls, adjoint_tols) -> (ys, info, dense)`` as a
    ``custom_vjp`` whose reverse pass is ``backward_fn`` (``backward``, or ``backward_shared``
    with ``batch``: ``y0`` of shape ``(B, n)``, one forward solve per problem)."""

    def forward(y0, ts, diff, nondiff, controls, record):
        run = lambda y: _forward(field, y, ts, diff, nondiff, controls, cfg, record=record)
        return jax.vmap(run)(y0) if batch else run(y0)

    @jax.custom_vjp
    def _solve(y0, ts, diff, nondiff, controls, adjoint_tols):
        state, info = forward(y0, ts, diff, nondiff, controls, record=False)
        return state.ys, info, state.dense

    def _fwd(y0, ts, diff, nondiff, controls, adjoint_tols):
        state, info = forward(y0, ts, diff, nondiff, controls, record=True)
        dt0 = state.h if cfg.method.adaptive else controls.dt0
        bwd_controls = controls._replace(rtol=adjoint_tols[0], atol=adjoint_tols[1], dt0=dt0)
        ev = state.event
        record = (ev.times, ev.states, ev.which, ev.stopped, ev.index)
        residuals = (state.ys, info, record, y0, ts, diff, nondiff, controls, adjoint_tols, bwd_controls)
        return (state.ys, info, state.dense), residuals

    def _bwd(residuals, cotangents):
        ys, info, record, y0, ts, diff, nondiff, controls, adjoint_tols, bwd_controls = residuals
        ct_ys, ct_info, ct_dense = cotangents
        ct_y0, ct_ts, ct_diff, bwd_status = _not_differentiable(lambda *a: backward_fn(field, cfg, *a))(
            ys, info, record, y0, ts, diff, nondiff, ct_ys, ct_info, bwd_controls, controls
        )
        # per problem (batch: (B,)); the shared cotangents fail if any problem failed
        status = jnp.where(info.status != errors.SUCCESS, info.status, bwd_status)
        status = errors.dense_not_differentiated(ct_dense, status)
        if cfg.throw:
            ct_y0, ct_ts, ct_diff = errors.raise_on_failure((ct_y0, ct_ts, ct_diff), jnp.max(status))
        else:
            any_failed = jnp.max(status) != errors.SUCCESS
            nan_if = lambda x: jnp.where(any_failed, jnp.nan, x)
            ct_ts, ct_diff = jax.tree_util.tree_map(nan_if, (ct_ts, ct_diff))
            ct_y0 = jnp.where((status != errors.SUCCESS)[..., None], jnp.nan, ct_y0)
        zeros = jax.tree_util.tree_map(zero_cotangent, (nondiff, controls, adjoint_tols))
        return (ct_y0, ct_ts, ct_diff) + zeros

    _solve.defvjp(_fwd, _bwd)
    return _solve


_SECOND_DERIVATIVES = (
    "jaxode: second derivatives (jax.hessian, jax.grad of jax.grad) of gradient=\"adjoint\" with "
    "events are not supported: use gradient=\"backprop\""
)


def _not_differentiable(fn):
    """``fn``, refusing to be differentiated itself (the backward solve with events)."""
    return errors.refuse_derivatives(fn, _SECOND_DERIVATIVES)


def _zero_if_none(ct, like):
    return jnp.zeros_like(like) if ct is None or getattr(ct, "dtype", None) == jax.dtypes.float0 else ct


class _Start(NamedTuple):
    """One problem's backward solve: its grid (the outputs reached; the others at ``τ``, with
    no cotangent) and where it starts (module docstring, terminal event)."""

    ts: Array  # (T,)
    ys: Array  # (T, n)
    ct: Array  # (T, n): ∂L/∂ys, zero where not reached
    a_end: Array  # (n,): a(τ⁻) (terminal event) or ∂L/∂event_state, before ct[-1]
    kappa: Array  # the terminal jump's κ, 0 without a terminal event
    ct_end: Array  # ∂L/∂event_state
    ct_tau: Array  # ∂L/∂event_time
    stopped: Array  # whether a terminal event ended the solve
    index: Array  # which


def _start(f_at, cond_at, theta, ts, ys, ct_ys, tau, z_end, ct_tau, ct_end, stopped, index, dtype) -> _Start:
    """The backward solve's ``_Start`` of one problem; ``f_at``, ``cond_at``: as
    ``_at_parameters`` gives them, taken at ``theta``; ``tau``, ``z_end``: the event time and
    state, ``ct_tau``, ``ct_end`` their cotangents; ``stopped``, ``index``: the terminal
    event's record."""
    num_out, _ = ys.shape
    ct_tau, ct_end = ct_tau.astype(dtype), ct_end.astype(dtype)
    ct_ys = jnp.where(jnp.isfinite(ys), ct_ys, 0).astype(ys.dtype)  # outputs not reached
    direction = jnp.where(ts[-1] >= ts[0], 1, -1).astype(ts.dtype)
    reached = (direction * ts <= direction * tau) | (jnp.arange(num_out) == 0)

    def terminal():
        f_end = f_at(z_end, tau, theta).astype(dtype)
        c_z, c_t = jax.grad(lambda z, t: cond_at(index, z, t, theta), argnums=(0, 1))(z_end, tau)
        cdot = jnp.dot(c_z.astype(dtype), f_end) + c_t.astype(dtype)
        kappa = (jnp.dot(ct_end, f_end) + ct_tau) / cdot
        return ct_end - kappa * c_z.astype(dtype), kappa

    a_end, kappa = lax.cond(stopped, terminal, lambda: (ct_end, jnp.zeros((), dtype)))
    return _Start(
        ts=jnp.where(reached, ts, tau), ys=jnp.where(reached[:, None], ys, z_end),
        ct=jnp.where(reached[:, None], ct_ys, 0).astype(dtype), a_end=a_end, kappa=kappa,
        ct_end=ct_end, ct_tau=ct_tau, stopped=stopped, index=index,
    )


def _terminal_parameters(cond_at, start: _Start, z_end, tau, theta):
    """``a_θ(τ⁻) = -κ c_θ`` of the terminal jump (module docstring); ``cond_at(k, z, t, θ)``."""
    c, vjp = jax.vjp(lambda th: cond_at(start.index, z_end, tau, th), theta)
    return vjp(-start.kappa.astype(c.dtype))[0]


def _time_cotangents(start: _Start, fs, a0, ts_dtype):
    """``∂L/∂ts`` from ``a(t_0)`` (``ct[0]`` included); ``fs``: the field at ``start``'s
    outputs (module docstring)."""
    ct_t = jnp.sum(start.ct * fs, axis=1)
    last = jnp.where(start.stopped, 0, jnp.dot(start.ct_end, fs[-1]) + start.ct_tau)
    ct_t = ct_t.at[-1].add(last)
    return ct_t.at[0].set(-jnp.dot(a0 - start.ct[0], fs[0])).astype(ts_dtype)


def _event_end(info, record, ct_info):
    """``(τ, z(τ), ∂L/∂τ, ∂L/∂z(τ), stopped, index)``: where the solve ended, and how."""
    tau, z_end = info.event_time, info.event_state
    ct_tau, ct_end = _zero_if_none(ct_info.event_time, tau), _zero_if_none(ct_info.event_state, z_end)
    return tau, z_end, ct_tau, ct_end, record[3], record[4]


def _at_parameters(field, flat, unravel, nondiff, dtype):
    """The field ``f_at(z, t, θ)`` and the ``k``-th condition ``cond_at(k, z, t, θ)`` at the
    flat parameters ``θ``, the state taken in its dtype ``dtype``."""
    f_at = lambda z, t, th: field(z.astype(dtype), t, unravel(th), nondiff)
    cond_at = lambda k, z, t, th: flat.for_loop((unravel(th), nondiff)).values(z.astype(dtype), t)[k]
    return f_at, cond_at


def backward_shared(field, cfg: Config, ys, info, record, y0, ts, diff, nondiff, ct_ys, ct_info,
                    controls: Controls, fwd_controls: Controls):
    """``backward`` for a batch sharing its parameters, with terminal events only: ``ys``,
    ``ct_ys`` of shape ``(B, T, n)``, ``info`` and ``record`` per problem. The backward solves
    of ``[z, a, a_t]`` accumulate one parameter adjoint (``adjoint.shared_backsolve``: the
    parameters out of the error control), and the terminal jumps' ``-κ c_θ`` are summed by
    one ``jax.vjp`` over the batch."""
    theta, unravel = ravel_pytree(diff)
    dtype = ys.dtype
    f_at, cond_at = _at_parameters(field, cfg.events, unravel, nondiff, dtype)
    start_one = lambda *a: _start(f_at, cond_at, theta, ts, *a, dtype)
    starts = jax.vmap(start_one)(ys, ct_ys, *_event_end(info, record, ct_info))
    states, ct_theta = adjoint.shared_backsolve(
        field, starts.ys, starts.ts, diff, nondiff, starts.ct, starts.a_end, controls, cfg
    )
    batch_cond = lambda ks, zs, taus, th: jax.vmap(cond_at, (0, 0, 0, None))(ks, zs, taus, th)
    terminal = _terminal_parameters(batch_cond, starts, info.event_state, info.event_time, theta)
    a0 = states.y[:, ys.shape[2] : 2 * ys.shape[2]]
    fs = jax.vmap(jax.vmap(lambda z, t: f_at(z, t, theta)))(starts.ys, starts.ts).astype(dtype)
    ct_ts = jnp.sum(jax.vmap(lambda s, f, a: _time_cotangents(s, f, a, ts.dtype))(starts, fs, a0), axis=0)
    ct_diff = jax.tree_util.tree_map(jnp.add, ct_theta, unravel(terminal.astype(theta.dtype)))
    return a0, ct_ts, ct_diff, states.status


def backward(field, cfg: Config, ys, info, record, y0, ts, diff, nondiff, ct_ys, ct_info, controls: Controls,
             fwd_controls: Controls):
    """The backward solve with the jump conditions: ``(∂L/∂y0, ∂L/∂ts, ∂L/∂diff, status)``.
    ``controls``: the backward solve's; ``fwd_controls``: the forward's, for the re-solves of
    the interpolating adjoint (``cfg.interpolate``)."""
    num_out, n = ys.shape
    times, states, which, _, _ = record
    flat = cfg.events
    theta, unravel = ravel_pytree(diff)
    p = theta.shape[0]
    dtype = jnp.result_type(ys.dtype, theta.dtype) if p else ys.dtype
    z_end = info.event_state

    f_at, cond_at = _at_parameters(field, flat, unravel, nondiff, ys.dtype)
    upd_at = lambda k, z, t, th: flat.for_loop((unravel(th), nondiff)).update(k, z.astype(ys.dtype), t)

    # the grid of the backward solve, and its start: at τ (terminal event) or ts[-1]
    start = _start(f_at, cond_at, theta, ts, ys, ct_ys, *_event_end(info, record, ct_info), dtype)
    ts_b, ys_b, ct_b = start.ts, start.ys, start.ct
    a_end = start.a_end
    ath_end = _terminal_parameters(cond_at, start, z_end, info.event_time, theta).astype(dtype)
    fs = jax.vmap(lambda yi, ti: field(yi, ti, diff, nondiff))(ys_b, ts_b).astype(dtype)
    time_cotangents = lambda a0: _time_cotangents(start, fs, a0, ts.dtype)

    def adjoint_jump(a, tau_j, z_minus, k):
        """``(a⁻, a_θ⁻ - a_θ⁺)`` across the recorded reset ``(τ_j, z⁻, k)`` (module docstring)."""
        f_minus = f_at(z_minus, tau_j, theta).astype(dtype)
        z_plus, vjp_u = jax.vjp(lambda z, t, th: upd_at(k, z, t, th), z_minus, tau_j, theta)
        f_plus = f_at(z_plus, tau_j, theta).astype(dtype)
        au_z, au_t, au_th = vjp_u(a.astype(ys.dtype))
        _, vjp_c = jax.vjp(lambda z, t, th: cond_at(k, z, t, th), z_minus, tau_j, theta)
        c_z, c_t, c_th = vjp_c(jnp.ones((), jnp.promote_types(ys.dtype, jnp.float32)))
        cdot = jnp.dot(c_z.astype(dtype), f_minus) + c_t.astype(dtype)
        kappa = (jnp.dot(au_z.astype(dtype), f_minus) + au_t.astype(dtype) - jnp.dot(a, f_plus)) / cdot
        a_minus = au_z.astype(dtype) - kappa * c_z.astype(dtype)
        return a_minus, au_th.astype(dtype) - kappa * c_th.astype(dtype)

    if cfg.interpolate:
        a0, _, ct_diff, bwd_info = interpolated_adjoint.backward(
            field, ys_b, ts_b, diff, nondiff, ct_b, fwd_controls, controls, cfg, start=(a_end, ath_end),
            jump=adjoint_jump)
        return a0.astype(ys.dtype), time_cotangents(a0.astype(dtype)), ct_diff, bwd_info.status
    a_end = a_end + ct_b[-1]

    def jump(t, y):
        """The jump condition of the recorded event at time ``t`` (identity if none)."""
        match = times == t
        j = jnp.argmax(match)

        def apply():
            a, a_th = y[n : 2 * n], y[2 * n : 2 * n + p]
            a_minus, d_th = adjoint_jump(a, times[j], states[j], which[j])
            return jnp.concatenate([states[j].astype(dtype), a_minus, a_th + d_th])

        return lax.cond(jnp.any(match), apply, lambda: y)

    def augmented(y, t):
        z, a = y[:n].astype(ys.dtype), y[n : 2 * n].astype(ys.dtype)
        fz, vjp = jax.vjp(lambda z, th: f_at(z, t, th), z, theta)
        gz, gth = vjp(a)
        return jnp.concatenate([fz, -gz, -gth]).astype(dtype)

    ts_rev, ys_rev, ct_rev = ts_b[::-1], ys_b[::-1], ct_b[::-1]

    def at_output(i, y):
        y = jump(ts_rev[i], y)  # an event exactly at an output time
        return y.at[:n].set(ys_rev[i].astype(dtype)).at[n : 2 * n].add(ct_rev[i])

    jumps = times
    if controls.jump_ts is not None:  # the user's, and the event times
        jumps = jnp.concatenate([controls.jump_ts.astype(times.dtype), times])
    y_init = jnp.concatenate([z_end.astype(dtype), a_end, ath_end])
    parts = ((0, n), (n, 2 * n)) if (cfg.seminorm or p == 0) else ((0, n), (n, 2 * n), (2 * n, 2 * n + p))
    state = integrate(
        augmented, y_init, ts_rev, controls.rtol, controls.atol, controls.dt0, method=cfg.method,
        max_steps=cfg.max_steps, at_output=at_output, save_outputs=False, segments=parts,
        max_dt=controls.max_dt, jump_ts=jumps, at_jump=jump,
    )
    y = state.y
    a0 = y[n : 2 * n]
    return a0.astype(ys.dtype), time_cotangents(a0), unravel(y[2 * n : 2 * n + p]), state.status
