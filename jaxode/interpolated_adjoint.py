"""The interpolating adjoint: the backward solve reads ``z`` off the forward solution.

The backsolve adjoint (``adjoint.backward``) integrates ``z`` backwards in time together with
``a``. For a stiff problem that is hopeless: a mode decaying like ``e^{-λt}`` forwards grows
like ``e^{λt}`` backwards (with ``λ = 1e3`` over one time unit, by ``e^{1000}``). Here ``z`` is
never integrated backwards. On each output interval ``[t_{i-1}, t_i]``, last to first:

1. ``z`` is re-solved forwards from the stored ``ys[i-1]`` to ``t_i`` (same method and
   tolerances), keeping every accepted step's interpolant: memory grows with the steps of one
   interval (at most ``max_steps``), not of the whole solve;
2. ``a' = -a·∂f/∂z(z(t), t)`` is solved backwards from ``a(t_i) = a(t_i⁺) + ∂L/∂ys[i]`` to
   ``t_{i-1}`` with the same method, ``z(t)`` read off those interpolants. Its Jacobian,
   ``-(∂f/∂z)ᵀ``, is ``n × n``: what an implicit method factorises;
3. the parameter and time adjoints, ``a_θ = ∫ a·∂f/∂θ dt`` and ``a_t = -∫ a·∂f/∂t dt``
   (backwards), are quadratures on each accepted step's nodes with the method's weights
   (``Method.quadrature_weights``: for a Runge–Kutta method exactly the update the augmented
   state would get), by one ``jax.vjp`` of ``f`` over the nodes. They are never part of the
   state, so never of a Jacobian or an LU, and never of the error control (as with
   ``adjoint_seminorm``), however many parameters there are.

Then ``∂L/∂z0 = a(t_0)``, ``∂L/∂θ = a_θ(t_0)``, and ``∂L/∂ts`` as in ``jaxode.adjoint``. The
gradient is that of the continuous adjoint, as accurate as the re-solved ``z`` and the
backward solve's tolerances allow; unlike the backsolve adjoint, errors in ``z`` do not grow
backwards. Cost: every interval is solved forwards twice (once in the forward pass), and each
backward step takes one more ``jax.vjp`` of ``f`` per node for the quadratures.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from . import errors
from .dense import evaluate_steps
from .drivers import integrate
from .forward import Config, Controls, FlatField
from .loop import Info, Loop


def backward(
    field: FlatField, ys, ts, diff, nondiff, ct_ys, controls: Controls, bwd_controls: Controls, cfg: Config
):
    """``(∂L/∂y0, ∂L/∂ts, ∂L/∂diff, info)`` by the interpolating adjoint (module docstring).

    ``controls``: the forward solve's (for the re-solves); ``bwd_controls``: the backward
    solve's tolerances. ``ys``, ``ct_ys``: ``(T, n)``. ``info`` sums the backward solves'
    steps; its ``nfe`` also counts the re-solves' evaluations and the quadratures' vjps.
    """
    num_out, n = ys.shape
    theta, unravel = ravel_pytree(diff)
    dtype = ys.dtype
    method = cfg.method
    weights = jnp.asarray(method.quadrature_weights, dtype)
    direction = jnp.where(ts[-1] >= ts[0], 1, -1).astype(ts.dtype)
    ct_ys = ct_ys.astype(dtype)
    dt0 = None if method.adaptive else controls.dt0
    options = dict(method=method, max_steps=cfg.max_steps, max_dt=controls.max_dt, jump_ts=controls.jump_ts)

    def f(z, t, th):
        return field(z, t, unravel(th), nondiff)

    def interval(carry, i):
        a, ct_theta, ct_time, info = carry
        span = jnp.stack([ts[i - 1], ts[i]])
        resolve = integrate(lambda z, t: f(z, t, theta), ys[i - 1], span, controls.rtol, controls.atol, dt0,
                            driver="flat", save_outputs=False, save_dense=True, **options)

        def z_at(t):
            return evaluate_steps(resolve.dense, ts[i - 1], direction * resolve.t, direction, method, t)

        def adjoint_field(a, t):
            _, vjp = jax.vjp(lambda z: f(z, t, theta), z_at(t))
            return -vjp(a)[0]

        tols = (bwd_controls.rtol, bwd_controls.atol)
        loop = Loop(adjoint_field, a + ct_ys[i], span[::-1], *tols, dt0, save_outputs=False, **options)

        def quadratures(record, counted):
            """``-h Σ_j w_j a_j·∂f/∂(θ, t)(z(t_j), t_j)`` over the step's nodes, if ``counted``."""
            z = jax.vmap(z_at)(record.times)
            at_nodes = lambda th, tt: jax.vmap(lambda zj, tj: f(zj, tj, th))(z, tt)
            _, vjp = jax.vjp(at_nodes, theta, record.times)
            cotangent = jnp.where(counted, -(record.h * weights)[:, None] * record.inputs, 0)
            d_theta, d_times = vjp(cotangent.astype(dtype))
            return d_theta, jnp.sum(d_times)

        def body(c):
            state, acc_theta, acc_time = c
            new, record = loop.step(state)
            d_theta, d_time = quadratures(record, new.num_accepted > state.num_accepted)
            return new, acc_theta + d_theta, acc_time + d_time

        init = (loop.init(), jnp.zeros_like(theta), jnp.zeros((), ts.dtype))
        state, d_theta, d_time = lax.while_loop(lambda c: loop.running(c[0]), body, init)
        state = loop.finish(state)
        failed = jnp.where(resolve.status != errors.SUCCESS, resolve.status, state.status)
        quadrature_nfe = len(method.quadrature_weights) * state.num_accepted
        info = info._replace(
            num_steps=info.num_steps + state.num_accepted + state.num_rejected,
            num_accepted=info.num_accepted + state.num_accepted,
            num_rejected=info.num_rejected + state.num_rejected,
            nfe=info.nfe + state.nfe + resolve.nfe + quadrature_nfe,
            num_jacobians=info.num_jacobians + state.num_jacobians + resolve.num_jacobians,
            status=jnp.where(info.status != errors.SUCCESS, info.status, failed),
            final_time=jnp.where(failed != errors.SUCCESS, info.final_time, ts[i - 1]),
        )
        return (state.y, ct_theta + d_theta, ct_time + d_time, info), None

    zero = jnp.zeros((), jnp.int32)
    info = Info(zero, zero, zero, zero, zero, zero, ts[-1])
    carry = (jnp.zeros(n, dtype), jnp.zeros_like(theta), jnp.zeros((), ts.dtype), info)
    (a, ct_theta, ct_time, info), _ = lax.scan(interval, carry, jnp.arange(num_out - 1, 0, -1))
    fs = jax.vmap(lambda yi, ti: field(yi, ti, diff, nondiff))(ys[1:], ts[1:])
    ct_t = jnp.sum(ct_ys[1:] * fs, axis=1)
    ct_ts = jnp.concatenate([(ct_time - jnp.sum(ct_t))[None], ct_t]).astype(ts.dtype)
    ct_y0 = a + ct_ys[0]
    return ct_y0, ct_ts, unravel(ct_theta), info._replace(final_time=lax.stop_gradient(info.final_time))


def backward_batched(
    field: FlatField, ys, ts, diff, nondiff, ct_ys, controls: Controls, bwd_controls: Controls, cfg: Config
):
    """``backward`` for a batch ``(B, T, n)`` sharing its parameters: per problem, summed."""
    one = lambda y, c: backward(field, y, ts, diff, nondiff, c, controls, bwd_controls, cfg)
    ct_y0, ct_ts, ct_diff, info = jax.vmap(one)(ys, ct_ys)
    total = lambda x: jnp.sum(x, axis=0)
    return ct_y0, total(ct_ts), jax.tree_util.tree_map(total, ct_diff), info
