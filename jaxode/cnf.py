"""Continuous normalising flows (Chen et al. 2018, §4; FFJORD, Grathwohl et al. 2019).

A CNF maps data ``x`` at ``t0`` to the base distribution, a standard normal, at ``t1`` by
``dz/dt = f(z, t)``, ``z(t0) = x``. By the instantaneous change of variables,
``d log p(z(t))/dt = -tr(∂f/∂z)``, so::

    log p(x) = log N(z(t1); 0, I) + ∫_{t0}^{t1} tr(∂f/∂z(z(t), t)) dt.

The trace is integrated in the same ``jaxode.odesolve`` as ``z``: the state is
``(z, ∫tr)`` (with ``regularize=True``, also the two regularisers below). A batch
``(B, d)`` is solved as one state, the field mapped over the samples with ``jax.vmap``; the
step sizes are shared by the batch and controlled by the RMS error over all of it (cheaper
per training step than ``B`` independent solves, see benchmarks/cnf.py; use
``eqx.filter_vmap(cnf.log_prob)`` for independent per-sample solves).

The trace, per sample:

* ``trace="exact"``: ``tr J`` from the ``d`` columns of ``J = ∂f/∂z`` (``d`` Jacobian-vector
  products, vectorised): exact, cost ``O(d)`` evaluations, for small ``d``.
* ``trace="hutchinson"``: ``εᵀ J ε`` with one Rademacher ``ε`` per sample drawn from ``key``
  and held fixed along the solve; ``E[εᵀ J ε] = tr J``, so ``log_prob`` is unbiased. One
  Jacobian-vector product per evaluation.

Regularisers (Finlay et al. 2020, "How to train your neural ODE"), integrated in the same
solve and returned per sample: the kinetic energy ``∫ ||f||² dt`` and the Jacobian's
Frobenius norm ``∫ ||∂f/∂z||_F² dt``: ``||J ε||²`` (Hutchinson, the same ``ε``,
``E||Jε||² = ||J||_F²``) with ``trace="hutchinson"``, the exact ``Σ J_ij²`` with ``"exact"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import Array

from .odesolve import odesolve

__all__ = ["CNF"]

_TRACES = ("exact", "hutchinson")
_OPTIONS = ("solver", "rtol", "atol", "dt0", "max_steps", "gradient", "adjoint_rtol",
            "adjoint_atol", "adjoint_seminorm", "throw")


def standard_normal_log_prob(z: Array) -> Array:
    """``log N(z; 0, I)`` over the last axis: ``-||z||²/2 - d/2 log 2π``; shape ``z.shape[:-1]``."""
    d = z.shape[-1]
    return -0.5 * jnp.sum(z**2, axis=-1) - 0.5 * d * math.log(2 * math.pi)


def _exact_terms(f: Callable[[Array], Array], z: Array) -> tuple[Array, Array, Array]:
    """``(f(z), tr J, ||J||_F²)`` for one sample ``z`` ``(d,)``, ``J = ∂f/∂z`` by ``d`` JVPs."""
    eye = jnp.eye(z.shape[-1], dtype=z.dtype)
    fz, cols = jax.vmap(lambda v: jax.jvp(f, (z,), (v,)), out_axes=(None, 0))(eye)  # cols[j] = J e_j
    return fz, jnp.trace(cols), jnp.sum(cols**2)


def _hutchinson_terms(f: Callable[[Array], Array], z: Array, eps: Array) -> tuple[Array, Array, Array]:
    """``(f(z), εᵀJε, ||Jε||²)`` for one sample ``z`` and its noise ``ε`` (both ``(d,)``)."""
    fz, jeps = jax.jvp(f, (z,), (eps,))
    return fz, jnp.dot(eps, jeps), jnp.sum(jeps**2)


class CNF(eqx.Module):
    """A continuous normalising flow: ``log p(x)`` and samples of ``dz/dt = field(z, t)``.

    Args:
        field: ``field(z, t) -> dz/dt`` for one sample ``z`` of shape ``(d,)`` and a scalar
            ``t`` (e.g. ``jaxode.nn.ConcatSquashField``); an Equinox module holding its
            weights, which are the CNF's only arrays (so ``eqx.filter_grad`` and optax see
            exactly them).
        data_size: ``d`` (default: ``field.data_size``).
        t0, t1: data live at ``t0``, the standard normal at ``t1`` (default 0 and 1).
        trace: ``"exact"`` (default) or ``"hutchinson"`` (needs a ``key`` in ``log_prob``).
        odesolve_options: passed to ``jaxode.odesolve``: ``solver``, ``rtol``, ``atol``,
            ``dt0``, ``max_steps``, ``gradient`` (``"adjoint"``, ``"backprop"`` or
            ``"checkpoint"``), ``adjoint_rtol``, ``adjoint_atol``, ``adjoint_seminorm``,
            ``throw``; ``odesolve``'s defaults otherwise.

    Raises:
        ValueError: an unknown ``trace`` or option, ``t0 == t1``, no ``data_size``.
    """

    field: Callable[..., Array]
    data_size: int = eqx.field(static=True)
    t0: float = eqx.field(static=True)
    t1: float = eqx.field(static=True)
    trace: str = eqx.field(static=True)
    options: tuple[tuple[str, Any], ...] = eqx.field(static=True)

    def __init__(
        self,
        field: Callable[..., Array],
        *,
        data_size: int | None = None,
        t0: float = 0.0,
        t1: float = 1.0,
        trace: str = "exact",
        **odesolve_options: Any,
    ):
        if trace not in _TRACES:
            raise ValueError(f"CNF: unknown trace {trace!r}: use one of {_TRACES}")
        unknown = sorted(set(odesolve_options) - set(_OPTIONS))
        if unknown:
            hint = (" (a batch is solved as one state; eqx.filter_vmap(cnf.log_prob) gives "
                    "independent solves)" if "batched" in unknown else "")
            raise ValueError(f"CNF: unknown odesolve option(s) {unknown}; valid: {_OPTIONS}{hint}")
        if data_size is None:
            data_size = getattr(field, "data_size", None)
            if data_size is None:
                raise ValueError("CNF: pass data_size= (the field has no data_size attribute)")
        if isinstance(data_size, bool) or not isinstance(data_size, int) or data_size < 1:
            raise ValueError(f"CNF: data_size must be an integer >= 1, got {data_size!r}")
        if float(t0) == float(t1):
            raise ValueError(f"CNF: t0 and t1 must differ, got t0 = t1 = {t0}")
        self.field = field
        self.data_size = data_size
        self.t0, self.t1 = float(t0), float(t1)
        self.trace = trace
        self.options = tuple(sorted(odesolve_options.items()))

    def _check_x(self, x: Array) -> Array:
        x = jnp.asarray(x)
        if x.ndim not in (1, 2) or x.shape[-1] != self.data_size:
            raise ValueError(
                f"CNF: x must have shape (d,) or (B, d) with d = {self.data_size}, got {x.shape}"
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"CNF: x must be floating point, got dtype {x.dtype}")
        return x

    def _noise(self, key: Array | None, shape: tuple[int, ...]) -> Array | None:
        if self.trace == "exact":
            return None
        if key is None:
            raise ValueError("CNF(trace='hutchinson'): log_prob needs a key for the noise")
        # int8 ±1: not a floating-point array, so odesolve does not differentiate it.
        return jax.random.rademacher(key, shape, dtype=jnp.int8)

    def log_prob(
        self, x: Array, key: Array | None = None, *, regularize: bool = False, full_output: bool = False
    ) -> Any:
        """``log p(x)`` under the flow, per sample.

        Args:
            x: data, ``(d,)`` or a batch ``(B, d)``.
            key: a ``jax.random`` key for Hutchinson's noise (required by
                ``trace="hutchinson"``, ignored by ``"exact"``).
            regularize: also return ``(kinetic, frobenius)``: ``∫||f||² dt`` and
                ``∫||∂f/∂z||_F² dt`` along each sample's path (from ``t0`` to ``t1``).
            full_output: also return ``odesolve``'s ``Info`` (``nfe``, ...), last.

        Returns:
            ``log_p``, shape ``()`` or ``(B,)``; with ``regularize``, ``(log_p, (kinetic,
            frobenius))``, each shaped like ``log_p``; with ``full_output``, ``(that, info)``.
        """
        x = self._check_x(x)
        single = x.ndim == 1
        xb = x[None] if single else x
        eps = self._noise(key, xb.shape)
        zeros = jnp.zeros(xb.shape[:1], xb.dtype)
        state0 = (xb, zeros) + ((zeros, zeros) if regularize else ())
        ts = jnp.asarray([self.t0, self.t1], xb.dtype)
        ys, info = odesolve(
            _augmented, state0, ts, (self.field, eps), full_output=True, **dict(self.options)
        )
        z1, integrals = ys[0][-1], [y[-1] for y in ys[1:]]
        if single:
            z1, integrals = z1[0], [y[0] for y in integrals]
        log_p = standard_normal_log_prob(z1) + integrals[0]
        out = (log_p, tuple(integrals[1:])) if regularize else log_p
        return (out, info) if full_output else out

    def sample(self, key: Array, num: int, *, dtype: Any = None) -> Array:
        """``num`` samples: ``z(t1) ~ N(0, I)`` solved back to ``t0``; shape ``(num, d)``.

        ``dtype``: of the samples (default JAX's default float dtype).
        """
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f"CNF.sample: num must be an integer >= 1, got {num!r}")
        dtype = jnp.result_type(float) if dtype is None else dtype
        z1 = jax.random.normal(key, (num, self.data_size), dtype)
        return self.inverse(z1)

    def inverse(self, z1: Array) -> Array:
        """The map from the base space back to data: ``z(t1) = z1`` solved to ``t0``; ``(B, d)``."""
        z1 = self._check_x(z1)
        ts = jnp.asarray([self.t1, self.t0], z1.dtype)
        return odesolve(_batched_field, z1, ts, self.field, **dict(self.options))[-1]

    def forward(self, x: Array, ts: Array | None = None) -> Array:
        """The map from data to the base space: ``z(t)`` at ``ts`` (default ``[t0, t1]``) from
        ``z(t0) = x``; shape ``(T,) + x.shape``."""
        x = self._check_x(x)
        ts = jnp.asarray([self.t0, self.t1] if ts is None else ts, x.dtype)
        return odesolve(_batched_field, x, ts, self.field, **dict(self.options))


def _batched_field(z: Array, t: Array, field: Callable[..., Array]) -> Array:
    """``field`` on every sample of ``z`` ``(..., d)`` at the shared time ``t``."""
    single = lambda zi: field(zi, t)
    for _ in range(z.ndim - 1):
        single = jax.vmap(single)
    return single(z)


def _augmented(state: tuple[Array, ...], t: Array, params: tuple[Any, Any]) -> tuple[Array, ...]:
    """``d/dt (z, ∫tr)``, or ``d/dt (z, ∫tr, ∫||f||², ∫||J||_F²)`` when ``state`` has four
    entries, for a batch ``z`` ``(B, d)`` (the integrals ``(B,)``)."""
    field, eps = params
    z = state[0]
    f = lambda zi: field(zi, t)
    if eps is None:
        fz, tr, frob = jax.vmap(lambda zi: _exact_terms(f, zi))(z)
    else:
        fz, tr, frob = jax.vmap(lambda zi, e: _hutchinson_terms(f, zi, e))(z, eps.astype(z.dtype))
    if len(state) == 2:
        return fz, tr.astype(z.dtype)
    return fz, tr.astype(z.dtype), jnp.sum(fz**2, axis=-1).astype(z.dtype), frob.astype(z.dtype)
