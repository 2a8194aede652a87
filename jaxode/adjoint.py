"""The continuous adjoint method (Chen et al. 2018, Algorithm 1) through ``jax.custom_vjp``.

For ``z' = f(z, t, θ)`` with outputs ``ys[i] = z(t_i)`` and a loss ``L(ys)``, the adjoint
``a(t) = ∂L/∂z(t)`` and the parameter and time adjoints solve, backwards from ``t_N`` to
``t_0``, the augmented system

    d/dt [z, a, a_θ, a_t] = [f, -a·∂f/∂z, -a·∂f/∂θ, -a·∂f/∂t],

from ``[ys[N], ∂L/∂ys[N], 0, 0]``. All three products come from one ``jax.vjp`` of ``f`` per
stage. It is **one** adaptive solve across the output times: on landing at ``t_i`` the
cotangent ``∂L/∂ys[i]`` is added to ``a`` and ``z`` is re-anchored to the stored ``ys[i]``,
while the step size and controller state carry on. Then

    ∂L/∂z0 = a(t_0),   ∂L/∂θ = a_θ(t_0) = ∫ a·∂f/∂θ dt,
    ∂L/∂t_i = ∂L/∂ys[i] · f(ys[i], t_i)   (i >= 1),
    ∂L/∂t_0 = a_t(t_0) - Σ_{i>=1} ∂L/∂t_i     (= -a(t_0⁺)·f(z0, t_0)).

The forward pass stores only ``ys`` and the inputs, so memory does not grow with the number
of steps. The backward error control takes the RMS norm of each part (``z``, ``a``, and the
parameter and time adjoints) and combines them by max, so thousands of parameter adjoints
cannot dilute the control of ``z`` and ``a``; with ``seminorm=True`` the parameter and time
adjoints are left out of the error control (Kidger, Chen & Lyons, "Hey, that's not an ODE",
2021), which usually saves backward steps at equal gradient accuracy.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from . import errors, interpolated_adjoint
from .drivers import integrate
from .forward import Config, Controls, FlatField, Solution, forward, forward_batched
from .loop import Loop, info_of
from .while_loops import zero_cotangent

try:  # JAX has no public name for it; without it, vmap of the adjoint keeps per-sample adjoints
    from jax._src.interpreters.batching import BatchTracer as _BatchTracer
except ImportError:  # pragma: no cover
    _BatchTracer = ()


def _backward_info(state, ts) -> object:
    """The ``Info`` of a backward solve (its time runs from ``ts[-1]`` to ``ts[0]``)."""
    return info_of(state, jnp.where(ts[0] >= ts[-1], 1, -1).astype(state.t.dtype))


def backward(
    field: FlatField, ys, ts, diff, nondiff, ct_ys, controls: Controls, cfg: Config, driver: str = "automatic"
):
    """The backward augmented solve: ``(∂L/∂y0, ∂L/∂ts, ∂L/∂diff, info)``.

    ``ys``: the forward outputs ``(T, n)``; ``ct_ys``: ``∂L/∂ys``, same shape; ``controls``:
    the backward solve's (its ``dt0`` the first step to try, ``None``: automatic; the same
    ``max_dt`` and ``jump_ts`` as the forward solve). ``info.nfe`` counts evaluations of the
    augmented field (one ``jax.vjp`` of ``f`` each); ``∂L/∂ts`` takes ``T - 1`` more
    evaluations of ``f`` at the outputs, in one batch (removed by XLA when ``ts`` is not
    differentiated). ``driver``: as for ``forward``.
    """
    num_out, n = ys.shape
    theta, unravel = ravel_pytree(diff)
    p = theta.shape[0]
    dtype = jnp.result_type(ys.dtype, theta.dtype) if p else ys.dtype
    ct_ys = ct_ys.astype(ys.dtype)

    def augmented(y, t):
        # y may be wider than the state (float64 θ, float32 z): f gets z in the state's dtype
        # and t in the time dtype, as it was traced
        z, a = y[:n].astype(ys.dtype), y[n : 2 * n].astype(ys.dtype)
        fz, vjp = jax.vjp(lambda z, t, th: field(z, t, unravel(th), nondiff), z, t, theta)
        gz, gt, gth = vjp(a)
        return jnp.concatenate([fz, -gz, -gth, -gt[None]]).astype(dtype)

    ys_rev, ct_rev = ys[::-1], ct_ys[::-1]

    def at_output(i, y):
        return y.at[:n].set(ys_rev[i].astype(dtype)).at[n : 2 * n].add(ct_rev[i].astype(dtype))

    y_init = jnp.concatenate([ys[-1], ct_ys[-1], jnp.zeros(p, dtype), jnp.zeros(1, dtype)]).astype(dtype)
    parts = ((0, n), (n, 2 * n)) if cfg.seminorm else ((0, n), (n, 2 * n), (2 * n, 2 * n + p + 1))
    state = integrate(
        augmented, y_init, ts[::-1], controls.rtol, controls.atol, controls.dt0, driver=driver,
        method=cfg.method, max_steps=cfg.max_steps, at_output=at_output, save_outputs=False,
        segments=parts, max_dt=controls.max_dt, jump_ts=controls.jump_ts,
    )
    y = state.y
    fs = jax.vmap(lambda yi, ti: field(yi, ti, diff, nondiff))(ys[1:], ts[1:])
    ct_t = jnp.sum(ct_ys[1:] * fs, axis=1)
    ct_ts = jnp.concatenate([(y[-1] - jnp.sum(ct_t))[None], ct_t]).astype(ts.dtype)
    ct_y0 = y[n : 2 * n].astype(ys.dtype)
    ct_diff = unravel(y[2 * n : 2 * n + p])
    return ct_y0, ct_ts, ct_diff, _backward_info(state, ts)


def backward_batched(field: FlatField, ys, ts, diff, nondiff, ct_ys, controls: Controls, cfg: Config):
    """``backward`` for a batch sharing its parameters: ``ys``, ``ct_ys`` of shape ``(B, T, n)``
    (the backward solve: ``shared_backsolve``)."""
    batch, num_out, n = ys.shape
    zeros = jnp.zeros((batch, n), ys.dtype)
    states, ct_theta = shared_backsolve(
        field, ys, jnp.broadcast_to(ts, (batch, num_out)), diff, nondiff, ct_ys, zeros, controls, cfg
    )
    y = states.y
    f_out = jax.vmap(jax.vmap(lambda yi, ti: field(yi, ti, diff, nondiff)), (0, None))
    ct_t = jnp.sum(ct_ys[:, 1:] * f_out(ys[:, 1:], ts[1:]), axis=2)
    ct_t0 = y[:, -1] - jnp.sum(ct_t, axis=1)
    ct_ts = jnp.concatenate([jnp.sum(ct_t0)[None], jnp.sum(ct_t, axis=0)]).astype(ts.dtype)
    info = jax.vmap(lambda s: _backward_info(s, ts))(states)
    return y[:, n : 2 * n], ct_ts, ct_theta, info


def shared_backsolve(
    field: FlatField, ys, ts, diff, nondiff, ct_ys, a_start, controls: Controls, cfg: Config
):
    """The backward solves of a batch sharing its parameters: ``(states, ∂L/∂diff)``.

    ``ys``, ``ct_ys``: ``(B, T, n)``; ``ts``: ``(B, T)``, each problem's output times;
    ``a_start``: ``(B, n)``, added to ``a`` at ``ts[:, -1]`` (with ``ct_ys[:, -1]``).
    ``states``: the final ``LoopState``s ``(B,)``, whose ``y`` is ``[z, a, a_t]`` at ``ts[:, 0]``.

    Each problem solves ``[z, a, a_t]`` backwards with its own step sizes (as under
    ``jax.vmap``), and the parameter adjoint of the whole batch,
    ``Σ_b ∫ a_b·∂f/∂θ(z_b, t) dt``, is accumulated in one shared vector: every accepted step
    adds ``-h Σ_i w_i a_i·∂f/∂θ(z_i, t_i)`` over the method's quadrature nodes (for a
    Runge–Kutta method: its stages with their weights ``b_i``, exactly the update the ``a_θ``
    component would get) by one ``jax.vjp`` over the nodes of all problems. Nothing of size
    ``B × len(θ)`` is ever formed, which is what makes ``jax.vmap`` of the plain adjoint
    expensive. The parameter adjoint is therefore left out of the error control (the
    seminorm); ``z`` and ``a`` are controlled per problem. ``controls.dt0``: ``(B,)`` first
    steps, or ``None``.
    """
    batch, num_out, n = ys.shape
    dt0s = None if controls.dt0 is None else jnp.broadcast_to(controls.dt0, (batch,))
    theta, unravel = ravel_pytree(diff)
    dtype = ys.dtype
    ct_ys = ct_ys.astype(dtype)
    method = cfg.method

    def augmented(y, t):
        fz, vjp = jax.vjp(lambda z, t: field(z, t, diff, nondiff), y[:n], t)
        gz, gt = vjp(y[n : 2 * n])
        return jnp.concatenate([fz, -gz, -gt[None].astype(dtype)])

    def loop_for(ys_b, ts_b, ct_b, a_b, dt0_b):
        ys_rev, ct_rev = ys_b[::-1], ct_b[::-1]
        y_init = jnp.concatenate([ys_b[-1], ct_b[-1] + a_b.astype(dtype), jnp.zeros(1, dtype)])
        return Loop(
            augmented, y_init, ts_b[::-1], controls.rtol, controls.atol, dt0_b, method=method,
            max_steps=cfg.max_steps, save_outputs=False, segments=((0, n), (n, 2 * n)),
            at_output=lambda i, y: y.at[:n].set(ys_rev[i]).at[n : 2 * n].add(ct_rev[i]),
            max_dt=controls.max_dt, jump_ts=controls.jump_ts,
        )

    problems = (ys, ts, ct_ys, a_start, dt0s)

    weights = jnp.asarray(method.quadrature_weights, dtype)

    def parameter_increment(record, counted, y_start, t_start):
        """``-Σ_b h_b Σ_i w_i a_bi·∂f/∂θ(z_bi, t_bi)`` over the problems whose last step
        attempt was ``counted`` (accepted while running).

        The others are excluded by selection, not by a zero factor: a rejected attempt's
        nodes may be non-finite (or where ``f`` is), and ``0·NaN`` is NaN. Their nodes are
        replaced by the attempt's start (an accepted state) and their cotangents by exact
        zeros.
        """
        if theta.shape[0] == 0:
            return jnp.zeros_like(theta)
        keep = counted[:, None, None]
        inputs = jnp.where(keep, record.inputs, y_start[:, None, :])
        times = jnp.where(keep[..., 0], record.times, t_start[:, None])
        z, a = inputs[..., :n], inputs[..., n : 2 * n]
        f_one = lambda z, t, th: field(z, t, unravel(th), nondiff)
        f_all = lambda th: jax.vmap(jax.vmap(lambda z, t: f_one(z, t, th)))(z, times)
        _, vjp = jax.vjp(f_all, theta)
        cotangent = jnp.where(keep, -(record.h[:, None] * weights[None, :])[..., None] * a, 0)
        return vjp(cotangent.astype(dtype))[0]

    def step_one(state, *problem):
        """One step attempt of a problem still running (else its state is kept), whether it is
        counted in the parameter adjoint (running and accepted), and where it started."""
        loop = loop_for(*problem)
        active = loop.running(state)
        new, record = loop.step(state)
        counted = active & (new.num_accepted > state.num_accepted)
        new = jax.tree_util.tree_map(lambda x, y: jnp.where(active, x, y), new, state)
        return new, record, counted, state.y, loop.direction * state.t

    def running_all(carry):
        states, _ = carry
        return jnp.any(jax.vmap(lambda s, *a: loop_for(*a).running(s))(states, *problems))

    def body(carry):
        states, acc = carry
        states, record, counted, y_start, t_start = jax.vmap(step_one)(states, *problems)
        return states, acc + parameter_increment(record, counted, y_start, t_start)

    init = jax.vmap(lambda *a: loop_for(*a).init())(*problems)
    states, ct_theta = jax.lax.while_loop(running_all, body, (init, jnp.zeros_like(theta)))
    states = jax.vmap(lambda s, *a: loop_for(*a).finish(s))(states, *problems)
    return states, unravel(ct_theta)


def solve(field: FlatField, y0, ts, diff, nondiff, controls: Controls, adjoint_tols, cfg: Config) -> Solution:
    """The forward ``Solution``, whose reverse-mode derivative is given by the backward
    adjoint solve. ``adjoint_tols``: ``(rtol, atol)`` of the backward solve.

    With ``cfg.dense`` the dense steps are returned but not differentiated: a cotangent
    reaching them fails the gradient (``errors.DENSE_NOT_DIFFERENTIABLE``).
    """
    if cfg.batched:
        fwd_solve = lambda *a, **o: forward_batched(field, *a, cfg, **o)
        backward_of = interpolated_adjoint.backward_batched if cfg.interpolate else _backsolve_batched
        bwd_solve = _not_differentiable(lambda *a: backward_of(field, *a, cfg))
    elif cfg.interpolate:
        fwd_solve = lambda *a, **o: _differentiated_by_backprop(forward, field, cfg, **o)(*a)
        bwd_solve = _not_differentiable(lambda *a: interpolated_adjoint.backward(field, *a, cfg))
    else:  # the rules themselves differentiable: second derivatives
        fwd_solve = lambda *a, **o: _differentiated_by_backprop(forward, field, cfg, **o)(*a)
        bwd_solve = lambda *a: _differentiated_by_backprop(_backsolve, field, cfg)(*a)

    @jax.custom_vjp
    def _solve(y0, ts, diff, nondiff, controls, adjoint_tols):
        sol = fwd_solve(y0, ts, diff, nondiff, controls)
        return sol.ys, sol.info, sol.dense

    def _fwd(y0, ts, diff, nondiff, controls, adjoint_tols):
        sol = fwd_solve(y0, ts, diff, nondiff, controls)
        # the backward solve starts with the forward's last step size
        dt0 = sol.last_step if cfg.method.adaptive else controls.dt0
        bwd_controls = controls._replace(rtol=adjoint_tols[0], atol=adjoint_tols[1], dt0=dt0)
        residuals = (sol.ys, ts, diff, nondiff, controls, adjoint_tols, bwd_controls, sol.info.status)
        return (sol.ys, sol.info, sol.dense), residuals

    def _bwd(residuals, cotangents):
        ys, ts, diff, nondiff, controls, adjoint_tols, bwd_controls, fwd_status = residuals
        ct_ys, _, ct_dense = cotangents
        ct_y0, ct_ts, ct_diff, info = bwd_solve(ys, ts, diff, nondiff, ct_ys, controls, bwd_controls)
        # a failed forward solve (NaN outputs) fails the backward one: report the forward's cause
        fwd_status = jnp.max(fwd_status)
        status = jnp.where(fwd_status != errors.SUCCESS, fwd_status, jnp.max(info.status))
        status = errors.dense_not_differentiated(ct_dense, status)
        failed = status != errors.SUCCESS
        if cfg.throw:  # attached to every cotangent: any one that is used carries the check
            ct_y0, ct_ts, ct_diff = errors.raise_on_failure((ct_y0, ct_ts, ct_diff), status)
        else:
            nan_if_failed = lambda x: jnp.where(failed, jnp.nan, x)
            ct_ts, ct_diff = jax.tree_util.tree_map(nan_if_failed, (ct_ts, ct_diff))
            # batched: only the failed problems' rows (status (B,), ct_y0 (B, n)), as under vmap
            problem_failed = (info.status != errors.SUCCESS) | (status == errors.DENSE_NOT_DIFFERENTIABLE)
            ct_y0 = jnp.where(problem_failed[..., None], jnp.nan, ct_y0)
        zeros = jax.tree_util.tree_map(zero_cotangent, (nondiff, controls, adjoint_tols))
        return (ct_y0, ct_ts, ct_diff) + zeros

    _solve.defvjp(_fwd, _bwd)
    args = (y0, ts, diff, nondiff, controls, adjoint_tols)
    if cfg.batched or cfg.dense:  # (the shared rule below gives the dense steps no tangents)
        return _as_solution(_solve(*args))
    many = lambda *args: _solve_batched(field, cfg, *args)
    return _as_solution(shared_parameters_under_vmap(_solve, many, args))


def _backsolve(field, ys, ts, diff, nondiff, ct_ys, controls, bwd_controls, cfg, **options):
    """``backward`` with the forward ``controls`` unused (the signature of the interpolating one)."""
    return backward(field, ys, ts, diff, nondiff, ct_ys, bwd_controls, cfg, **options)


def _backsolve_batched(field, ys, ts, diff, nondiff, ct_ys, controls, bwd_controls, cfg):
    return backward_batched(field, ys, ts, diff, nondiff, ct_ys, bwd_controls, cfg)


def _as_solution(out) -> Solution:
    ys, info, dense = out
    return Solution(ys, info, dense, None)


def _solve_batched(field, cfg: Config, *args):
    sol = solve(field, *args, cfg._replace(batched=True))
    return sol.ys, sol.info, sol.dense


def batch_traced(values) -> bool:
    """Whether ``jax.vmap`` is the innermost transformation of any leaf of ``values``. For the
    tangents of a ``custom_jvp`` rule: the rule then runs within the vmap (``grad(vmap(f))``);
    under ``vmap(grad(f))`` its tangents are the differentiation's own tracers, the vmap
    outside them."""
    return any(isinstance(t, _BatchTracer) for t in jax.tree_util.tree_leaves(values))


def _float_tangents(tangents):
    """The tangents without the ``float0`` ones (integer inputs), which are rebuilt by
    ``_all_tangents`` (``custom_vmap`` passes no ``float0`` arrays)."""
    is_float0 = lambda t: getattr(t, "dtype", None) == jax.dtypes.float0
    return jax.tree_util.tree_map(lambda t: None if is_float0(t) else t, tangents)


def _all_tangents(primals, tangents):
    """``tangents`` completed with ``float0`` zeros for the integer leaves of ``primals``."""
    def one(p, t):
        return zero_cotangent(p) if t is None else t

    return jax.tree_util.tree_map(one, primals, tangents, is_leaf=lambda x: x is None)


def _broadcast(tree, batched, axis_size):
    """Every leaf of ``tree`` with a leading batch axis (added where ``batched`` is False)."""
    def one(x, b):
        return x if b else jnp.broadcast_to(x, (axis_size,) + jnp.shape(x))

    return jax.tree_util.tree_map(one, tree, batched)


def shared_parameters_under_vmap(one: Callable, many: Callable, args: tuple):
    """``one(*args)`` (the adjoint solve of one problem, ``args = (y0, ts, diff, ...)``), whose
    reverse mode under ``jax.vmap`` over ``y0`` alone is that of ``many`` (the ``batched=True``
    solve): one shared parameter adjoint for the whole batch, rather than one per problem.

    ``grad(vmap(f))`` sums the per-problem parameter cotangents anyway, but ``jax.vmap`` of
    ``one``'s ``custom_vjp`` would carry ``B × len(θ)`` adjoints through the backward solve.
    The reverse mode is a ``custom_jvp`` whose rule, when ``jax.vmap`` batches its tangents
    (``grad(vmap(f))``; not ``vmap(grad(f))``, which wants per-problem gradients), goes
    through ``custom_vmap``: its rule sees the whole batch and calls ``jax.jvp`` of ``many``
    (linearized and transposed by ``many``'s ``custom_vjp``). Other batchings (``ts``, the
    parameters or the tolerances batched) take ``jax.jvp`` of ``jax.vmap(one)``. The
    parameters are then left out of the backward error control, as with ``batched=True``.
    Tangents: of ``ys``, and with events of ``info.event_time`` and ``info.event_state``.
    """

    @jax.custom_jvp
    def run(*args):
        return one(*args)

    @jax.custom_batching.custom_vmap
    def vmapped_jvp(primals, tangents):
        return _jvp_of(one, primals, tangents)

    @vmapped_jvp.def_vmap
    def _rule(axis_size, in_batched, primals, tangents):
        return _batched_jvp(one, many, axis_size, in_batched, primals, tangents)

    @run.defjvp
    def _jvp(primals, tangents):
        if batch_traced(tangents):
            _check_no_batched_closure(one, primals)
            (ys, info, dense), (ys_dot, time_dot, state_dot) = vmapped_jvp(primals, _float_tangents(tangents))
            info_dot = jax.tree_util.tree_map(zero_cotangent, info)
            if info.event_time is not None:
                info_dot = info_dot._replace(event_time=time_dot, event_state=state_dot)
            return (ys, info, dense), (ys_dot, info_dot, jax.tree_util.tree_map(zero_cotangent, dense))
        return jax.jvp(one, primals, tangents)

    return run(*args)


def _check_no_batched_closure(fn, args) -> None:
    """Raises if ``fn`` closes over an array that ``jax.vmap`` batches (its ``custom_vjp``
    rules would, and ``custom_vmap`` cannot take it)."""
    if any(isinstance(c, _BatchTracer) for c in jax.make_jaxpr(fn)(*args).consts):
        raise ValueError(
            "jaxode: under jax.grad of jax.vmap, the vector field closes over an array that the vmap "
            "batches; pass it to odesolve through params instead"
        )


def _jvp_of(fn, primals, tangents):
    """``(fn(*primals), the tangents of ys, info.event_time, info.event_state)`` (``None``
    for the last two without events; ``Info``'s other fields have none)."""
    out, (ys_dot, info_dot, _) = jax.jvp(fn, primals, _all_tangents(primals, tangents))
    return out, (ys_dot, info_dot.event_time, info_dot.event_state)


def _batched_jvp(one, many, axis_size, in_batched, primals, tangents, folded=False):
    """The vmap rule of the jvp: ``many`` for a batch over ``y0`` alone, else ``vmap(one)``.

    ``folded``: ``primals[0]`` already holds a batch of problems for ``many`` (an outer
    ``jax.vmap`` around an inner one: the two batch axes are merged into one).
    """
    p_batched, t_batched = in_batched
    leaves = jax.tree_util.tree_leaves
    arg_batched = [any(leaves(pb)) or any(leaves(tb)) for pb, tb in zip(p_batched, t_batched)]
    # an argument batched anywhere (primal or tangent, any leaf) is batched everywhere
    widen = lambda x, flags, b: _broadcast(x, flags, axis_size) if b else x
    primals = tuple(map(widen, primals, p_batched, arg_batched))
    tangents = tuple(map(widen, tangents, t_batched, arg_batched))
    if arg_batched[0] and not any(arg_batched[1:]):
        if folded:
            merge = lambda x: x.reshape((-1,) + x.shape[2:])
            split = lambda x: x.reshape((axis_size, -1) + x.shape[1:])
            y0s = merge(primals[0])
            y0s_dot = None if tangents[0] is None else merge(tangents[0])
            out = _shared_jvp(one, many, (y0s,) + primals[1:], (y0s_dot,) + tangents[1:])
            out = jax.tree_util.tree_map(split, out)
        else:
            out = _shared_jvp(one, many, primals, tangents)
    else:
        in_axes = tuple(0 if b else None for b in arg_batched)
        fn = many if folded else one
        out = _jvp_of(jax.vmap(fn, in_axes), primals, tangents)
    return out, jax.tree_util.tree_map(lambda _: True, out)


def _shared_jvp(one, many, primals, tangents):
    """``jax.jvp`` of ``many`` on a batch; inside an outer ``jax.vmap`` (its tangents batched),
    through a ``custom_vmap`` whose rule merges the outer batch axis into the batch."""
    if not batch_traced(tangents):
        return _jvp_of(many, primals, tangents)

    @jax.custom_batching.custom_vmap
    def nested(primals, tangents):
        return _jvp_of(many, primals, tangents)

    @nested.def_vmap
    def _rule(axis_size, in_batched, primals, tangents):
        return _batched_jvp(one, many, axis_size, in_batched, primals, tangents, folded=True)

    return nested(primals, tangents)


_SECOND_DERIVATIVES = (
    "jaxode: second derivatives (jax.hessian, jax.grad of jax.grad) of the adjoint with "
    "batched=True or with the interpolating adjoint are not supported: use gradient=\"backprop\" "
    "(or the backsolve adjoint without batched)"
)


def _not_differentiable(fn: Callable) -> Callable:
    """``fn``, refusing to be differentiated itself with a message naming the alternative
    (the batched and the interpolating backward solves run ``lax.while_loop``s)."""
    return errors.refuse_derivatives(fn, _SECOND_DERIVATIVES)


def _differentiated_by_backprop(solve: Callable, field: FlatField, cfg: Config, **options) -> Callable:
    """``solve(field, *arrays, cfg, **options)`` (``forward`` or ``backward``) as a function of
    ``arrays``, whose derivatives, when it is differentiated itself, are those of the same
    solve run by the backprop driver (checkpointed scans, step sizes held constant).

    The plain drivers (``lax.while_loop``) can be differentiated in forward mode only, and
    their ``jax.vmap`` rule does not compose with it. This makes the custom rules of ``solve``
    below differentiable, so second derivatives of the adjoint mode (``jax.hessian``,
    ``jax.grad`` of ``jax.grad``) work; a first-order gradient runs the plain drivers only.
    """

    @jax.custom_jvp
    def run(*arrays):
        return solve(field, *arrays, cfg, **options)

    @run.defjvp
    def _jvp(primals, tangents):
        by_backprop = lambda *a: solve(field, *a, cfg, driver="backprop", **options)
        return jax.jvp(by_backprop, primals, tangents)

    return run
