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
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array
from jax.flatten_util import ravel_pytree

from . import errors
from .loop import LoopState, integrate
from .tableaus import ButcherTableau

# field(y, t, diff_args, nondiff_args) -> dy/dt on flat states
FlatField = Callable[[Array, Array, object, object], Array]


class Info(NamedTuple):
    """Statistics of a solve (JAX integer arrays; batched under ``vmap``).

    Attributes:
        num_steps: step attempts, ``num_accepted + num_rejected``.
        num_accepted: accepted steps.
        num_rejected: rejected steps.
        nfe: evaluations of the vector field, including the first-step selection (for the
            adjoint's backward solve: evaluations of the augmented field, one ``jax.vjp`` of
            ``f`` each).
        status: 0 on success; 1 max_steps reached; 2 step size underflow; 3 non-finite state.
    """

    num_steps: Array
    num_accepted: Array
    num_rejected: Array
    nfe: Array
    status: Array


class Config(NamedTuple):
    """The static options of a solve."""

    tableau: ButcherTableau
    max_steps: int
    seminorm: bool = False
    throw: bool = True


def info_of(state: LoopState, extra_nfe: int = 0) -> Info:
    return Info(
        num_steps=state.num_accepted + state.num_rejected,
        num_accepted=state.num_accepted,
        num_rejected=state.num_rejected,
        nfe=state.nfe + extra_nfe,
        status=state.status,
    )


def forward(
    field: FlatField, y0, ts, diff, nondiff, rtol, atol, dt0, cfg: Config,
    differentiable: bool = False, last_step: bool = False,
):
    """The plain solve: ``(ys, info)`` with ``ys`` of shape ``(len(ts), n)`` (and, with
    ``last_step``, the step size the controller proposed at the end)."""
    state = integrate(
        lambda y, t: field(y, t, diff, nondiff), y0, ts, rtol, atol, dt0,
        tableau=cfg.tableau, max_steps=cfg.max_steps, differentiable=differentiable,
    )
    return (state.ys, info_of(state)) + ((state.h,) if last_step else ())


def backward(field: FlatField, ys, ts, diff, nondiff, ct_ys, rtol, atol, dt0, cfg: Config):
    """The backward augmented solve: ``(∂L/∂y0, ∂L/∂ts, ∂L/∂diff, info)``.

    ``ys``: the forward outputs ``(T, n)``; ``ct_ys``: ``∂L/∂ys``, same shape; ``dt0``: the
    first step to try (``None``: automatic). ``info.nfe`` counts evaluations of the augmented
    field (one ``jax.vjp`` of ``f`` each); ``∂L/∂ts`` takes ``T - 1`` more evaluations of ``f``
    at the outputs, in one batch (removed by XLA when ``ts`` is not differentiated).
    """
    num_out, n = ys.shape
    theta, unravel = ravel_pytree(diff)
    p = theta.shape[0]
    dtype = jnp.result_type(ys.dtype, theta.dtype) if p else ys.dtype
    ct_ys = ct_ys.astype(ys.dtype)

    def augmented(y, t):
        z, a = y[:n].astype(ys.dtype), y[n : 2 * n].astype(ys.dtype)
        fz, vjp = jax.vjp(lambda z, t, th: field(z, t, unravel(th), nondiff), z, t, theta)
        gz, gt, gth = vjp(a)
        return jnp.concatenate([fz, -gz, -gth, -gt[None]]).astype(dtype)

    ys_rev, ct_rev = ys[::-1], ct_ys[::-1]

    def jump(i, y):
        return y.at[:n].set(ys_rev[i].astype(dtype)).at[n : 2 * n].add(ct_rev[i].astype(dtype))

    y_init = jnp.concatenate(
        [ys[-1], ct_ys[-1], jnp.zeros(p, dtype), jnp.zeros(1, dtype)]
    ).astype(dtype)
    parts = ((0, n), (n, 2 * n)) if cfg.seminorm else ((0, n), (n, 2 * n), (2 * n, 2 * n + p + 1))
    state = integrate(
        augmented, y_init, ts[::-1], rtol, atol, dt0, tableau=cfg.tableau,
        max_steps=cfg.max_steps, jump=jump, save_outputs=False, segments=parts,
    )
    y = state.y
    fs = jax.vmap(lambda yi, ti: field(yi, ti.astype(ys.dtype), diff, nondiff))(ys[1:], ts[1:])
    ct_t = jnp.sum(ct_ys[1:] * fs, axis=1)
    ct_ts = jnp.concatenate([(y[-1] - jnp.sum(ct_t))[None], ct_t]).astype(ts.dtype)
    ct_y0 = y[n : 2 * n].astype(ys.dtype)
    ct_diff = unravel(y[2 * n : 2 * n + p])
    return ct_y0, ct_ts, ct_diff, info_of(state)


def _zero_cotangent(x):
    if x is None:
        return None
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(jnp.shape(x), jax.dtypes.float0)


def solve(field: FlatField, y0, ts, diff, nondiff, rtol, atol, dt0, adjoint_rtol, adjoint_atol, cfg: Config):
    """``(ys, info)`` whose reverse-mode derivative is given by the backward adjoint solve."""

    @jax.custom_vjp
    def _solve(y0, ts, diff, nondiff, rtol, atol, dt0, adjoint_rtol, adjoint_atol):
        return forward(field, y0, ts, diff, nondiff, rtol, atol, dt0, cfg)

    def _fwd(y0, ts, diff, nondiff, rtol, atol, dt0, adjoint_rtol, adjoint_atol):
        ys, info, last_step = forward(field, y0, ts, diff, nondiff, rtol, atol, dt0, cfg, last_step=True)
        if cfg.tableau.adaptive:  # the backward solve starts with the forward's last step size
            dt0 = last_step
        return (ys, info), (ys, ts, diff, nondiff, rtol, atol, dt0, adjoint_rtol, adjoint_atol)

    def _bwd(residuals, cotangents):
        ys, ts, diff, nondiff, rtol, atol, dt0, adjoint_rtol, adjoint_atol = residuals
        ct_ys, _ = cotangents
        ct_y0, ct_ts, ct_diff, info = backward(
            field, ys, ts, diff, nondiff, ct_ys, adjoint_rtol, adjoint_atol, dt0, cfg
        )
        failed = info.status != errors.SUCCESS
        if cfg.throw:  # attached to every cotangent: any one that is used carries the check
            ct_y0, ct_ts, ct_diff = errors.raise_on_failure((ct_y0, ct_ts, ct_diff), info.status)
        else:
            nan_if_failed = lambda x: jnp.where(failed, jnp.nan, x)  # noqa: E731
            ct_y0, ct_ts, ct_diff = jax.tree_util.tree_map(nan_if_failed, (ct_y0, ct_ts, ct_diff))
        unused = (nondiff, rtol, atol, dt0, adjoint_rtol, adjoint_atol)
        zeros = jax.tree_util.tree_map(_zero_cotangent, unused)
        return (ct_y0, ct_ts, ct_diff) + zeros

    _solve.defvjp(_fwd, _bwd)
    return _solve(y0, ts, diff, nondiff, rtol, atol, dt0, adjoint_rtol, adjoint_atol)
