"""Neural-ODE building blocks as Equinox modules.

* ``MLPField``: a multilayer perceptron vector field ``f(z, t) = MLP([z, t])``.
* ``ConcatSquashField``: FFJORD's "concat-squash" field, time entering every layer through a
  gate and a bias.
* ``NeuralODE`` (alias ``ODEBlock``): a layer ``z0 -> z(t1)`` (or ``z0 -> z(ts)``) that solves
  ``dz/dt = field(z, t)`` with ``jaxode.odesolve``.
* ``CNF`` (defined in ``jaxode.cnf``): a continuous normalising flow, ``log_prob`` and
  ``sample``, with exact or Hutchinson traces and Finlay et al.'s regularisers.

The fields follow ``odesolve``'s calling convention ``f(z, t, params=None) -> dz/dt``; their
weights live in the module and are differentiated because ``odesolve`` hoists the arrays a
vector field holds. So ``eqx.filter_grad`` of a loss of ``NeuralODE(...)(z0)`` differentiates
the field's weights, by the continuous adjoint method or by backpropagation through the
solver (``gradient=``)::

    import equinox as eqx, jax, jax.numpy as jnp, optax, jaxode.nn as jnn

    field = jnn.MLPField(2, width=32, depth=2, key=jax.random.key(0))
    ode = jnn.NeuralODE(field, ts=jnp.linspace(0.0, 1.0, 11))   # z0 (2,) -> ys (11, 2)
    loss = lambda m, z0, y: jnp.mean((eqx.filter_vmap(m)(z0) - y) ** 2)
    grads = eqx.filter_grad(loss)(ode, z0_batch, ys_batch)   # same tree as ode

Shapes. Both fields take ``z`` of shape ``(..., d)``: the last axis holds the ``d`` state
features and any leading axes are a batch, evaluated independently with the same (scalar)
time ``t``; the result has ``z``'s shape and dtype. There are two ways to solve a batch:

* ``eqx.filter_vmap(node)(z0s)`` with ``z0s`` of shape ``(B, d)``: ``B`` independent solves,
  each with its own adaptive steps (the answer for each element equals an unbatched solve);
* ``node(z0s)`` directly: one solve of the ``(B, d)`` state, whose step sizes are shared and
  controlled by the RMS error over the whole batch (cheaper per step; the answers agree with
  the independent solves to within the tolerances).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from . import errors
from .methods import ButcherTableau
from .odesolve import odesolve
from .options import Options

__all__ = ["MLPField", "ConcatSquashField", "NeuralODE", "ODEBlock", "CNF"]


def _check_size(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_sizes(data_size: int, width: int, depth: int) -> tuple[int, int, int]:
    """An MLP's sizes checked: ``data_size >= 1``, ``width >= 1``, ``depth >= 0`` hidden layers."""
    checked = _check_size("data_size", data_size, 1), _check_size("width", width, 1)
    return checked + (_check_size("depth", depth, 0),)


def _dense(layer: eqx.nn.Linear, h: Array) -> Array:
    """``h @ W.T + b`` for ``h`` of shape ``(..., in)``: an ``eqx.nn.Linear`` on the last axis."""
    out = h @ layer.weight.T
    return out if layer.bias is None else out + layer.bias


def _check_input(name: str, z: Array, data_size: int) -> None:
    if jnp.ndim(z) < 1 or jnp.shape(z)[-1] != data_size:
        raise ValueError(
            f"{name} was built for states of shape (..., {data_size}) (data_size={data_size}), "
            f"got z of shape {tuple(jnp.shape(z))}"
        )


def _time_column(t: Array, z: Array) -> Array:
    """The scalar ``t`` as a column ``(..., 1)`` matching ``z``'s batch axes and dtype."""
    t = jnp.asarray(t, z.dtype)
    if t.ndim != 0:
        raise ValueError(f"t must be a scalar time, got shape {t.shape}")
    return jnp.broadcast_to(t, z.shape[:-1] + (1,))


class MLPField(eqx.Module):
    """A multilayer perceptron vector field that takes the time as an input.

    Math, for ``z`` in ``R^d`` and hidden width ``w``, ``depth = L >= 0`` hidden layers and
    activation ``σ``::

        h_0 = [z, t]                          (d + 1,)   (just z when autonomous=True)
        h_k = σ(W_k h_(k-1) + b_k)            (w,)       k = 1 .. L
        f(z, t) = σ_out(W_(L+1) h_L + b_(L+1))  (d,)

    ``depth=0`` is the affine field ``W [z, t] + b``. The weights are ``eqx.nn.Linear``
    layers with Equinox's default initialisation (uniform in ``±1/sqrt(fan_in)``).

    Shapes: ``z`` of shape ``(..., d)``, the leading axes a batch sharing the scalar ``t``;
    returns ``dz/dt`` of ``z``'s shape and dtype (the output is cast to ``z``'s dtype, so
    float32 weights serve float64 states and vice versa).

    Args:
        data_size: ``d``, the number of state features (the last axis of ``z``).
        width: ``w``, the hidden width (default 64).
        depth: ``L``, the number of hidden layers (default 2).
        activation: ``σ`` (default ``jnp.tanh``).
        final_activation: ``σ_out`` on the output (default: identity).
        autonomous: if ``True`` the time is not an input: ``f(z, t) = MLP(z)`` (default
            ``False``).
        scale: multiplies the output layer's initial weights and bias (default 1.0); a small
            value starts the flow near the identity map.
        dtype: the weights' dtype (default: JAX's default float dtype).
        key: a ``jax.random`` key for the initial weights (keyword only).
    """

    layers: tuple[eqx.nn.Linear, ...]
    data_size: int = eqx.field(static=True)
    width: int = eqx.field(static=True)
    depth: int = eqx.field(static=True)
    activation: Callable[[Array], Array] = eqx.field(static=True)
    final_activation: Callable[[Array], Array] | None = eqx.field(static=True)
    autonomous: bool = eqx.field(static=True)

    def __init__(
        self,
        data_size: int,
        width: int = 64,
        depth: int = 2,
        activation: Callable[[Array], Array] = jnp.tanh,
        final_activation: Callable[[Array], Array] | None = None,
        *,
        autonomous: bool = False,
        scale: float = 1.0,
        dtype: Any = None,
        key: Array,
    ):
        self.data_size, self.width, self.depth = _check_sizes(data_size, width, depth)
        self.activation = activation
        self.final_activation = final_activation
        self.autonomous = bool(autonomous)
        sizes = [self.data_size + (0 if self.autonomous else 1)] + [self.width] * self.depth
        sizes.append(self.data_size)
        keys = jax.random.split(key, len(sizes) - 1)
        layers = [
            eqx.nn.Linear(i, o, dtype=dtype, key=k)
            for i, o, k in zip(sizes[:-1], sizes[1:], keys, strict=True)
        ]
        if scale != 1.0:
            last = layers[-1]
            last = eqx.tree_at(lambda m: (m.weight, m.bias), last, (last.weight * scale, last.bias * scale))
            layers[-1] = last
        self.layers = tuple(layers)

    def __call__(self, z: Array, t: Array | float, params: Any = None) -> Array:
        """``dz/dt = f(z, t)`` for ``z`` of shape ``(..., d)``; ``params`` is ignored."""
        z = jnp.asarray(z)
        _check_input("MLPField", z, self.data_size)
        h = z if self.autonomous else jnp.concatenate([z, _time_column(t, z)], axis=-1)
        for layer in self.layers[:-1]:
            h = self.activation(_dense(layer, h))
        out = _dense(self.layers[-1], h)
        if self.final_activation is not None:
            out = self.final_activation(out)
        return out.astype(z.dtype)


class _ConcatSquash(eqx.Module):
    """One concat-squash layer: ``(W h + b) * sigmoid(W_g t + b_g) + W_b t``."""

    linear: eqx.nn.Linear
    gate: eqx.nn.Linear
    hyper_bias: eqx.nn.Linear

    def __init__(self, in_size: int, out_size: int, dtype: Any, key: Array):
        k1, k2, k3 = jax.random.split(key, 3)
        self.linear = eqx.nn.Linear(in_size, out_size, dtype=dtype, key=k1)
        self.gate = eqx.nn.Linear(1, out_size, dtype=dtype, key=k2)
        self.hyper_bias = eqx.nn.Linear(1, out_size, use_bias=False, dtype=dtype, key=k3)

    def __call__(self, h: Array, t_col: Array) -> Array:
        return _dense(self.linear, h) * jax.nn.sigmoid(_dense(self.gate, t_col)) + _dense(
            self.hyper_bias, t_col
        )


class ConcatSquashField(eqx.Module):
    """FFJORD's "concat-squash" vector field (Grathwohl et al. 2019).

    Every layer ``k`` maps ``h`` to ``(W_k h + b_k) * sigmoid(W_gk t + b_gk) + W_bk t``: the
    time gates each output unit and shifts it. With ``depth = L`` hidden layers of width
    ``w`` and activation ``σ``::

        h_0 = z                                (d,)
        h_k = σ(CS_k(h_(k-1), t))              (w,)   k = 1 .. L
        f(z, t) = CS_(L+1)(h_L, t)             (d,)

    Shapes: ``z`` of shape ``(..., d)``, the leading axes a batch sharing the scalar ``t``;
    returns ``dz/dt`` of ``z``'s shape and dtype.

    Args:
        data_size: ``d``, the number of state features (the last axis of ``z``).
        width: ``w``, the hidden width (default 64).
        depth: ``L``, the number of hidden layers (default 2; 0 gives one concat-squash layer).
        activation: ``σ`` (default ``jnp.tanh``).
        dtype: the weights' dtype (default: JAX's default float dtype).
        key: a ``jax.random`` key for the initial weights (keyword only).
    """

    layers: tuple[_ConcatSquash, ...]
    data_size: int = eqx.field(static=True)
    width: int = eqx.field(static=True)
    depth: int = eqx.field(static=True)
    activation: Callable[[Array], Array] = eqx.field(static=True)

    def __init__(
        self,
        data_size: int,
        width: int = 64,
        depth: int = 2,
        activation: Callable[[Array], Array] = jnp.tanh,
        *,
        dtype: Any = None,
        key: Array,
    ):
        self.data_size, self.width, self.depth = _check_sizes(data_size, width, depth)
        self.activation = activation
        sizes = [self.data_size] + [self.width] * self.depth + [self.data_size]
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(
            _ConcatSquash(i, o, dtype, k) for i, o, k in zip(sizes[:-1], sizes[1:], keys, strict=True)
        )

    def __call__(self, z: Array, t: Array | float, params: Any = None) -> Array:
        """``dz/dt = f(z, t)`` for ``z`` of shape ``(..., d)``; ``params`` is ignored."""
        z = jnp.asarray(z)
        _check_input("ConcatSquashField", z, self.data_size)
        t_col = _time_column(t, z)
        h = z
        for layer in self.layers[:-1]:
            h = self.activation(layer(h, t_col))
        return self.layers[-1](h, t_col).astype(z.dtype)


def _as_times(ts: Any, what: str) -> tuple[float, ...]:
    """Concrete output times as a tuple of floats, checked as ``odesolve`` checks ``ts``."""
    try:
        v = np.asarray(ts, dtype=np.float64)
    except (TypeError, jax.errors.TracerArrayConversionError) as e:
        raise ValueError(
            f"NeuralODE: {what} must be concrete numbers at construction (pass traced times to "
            f"__call__(z0, ts) instead), got {ts!r}"
        ) from e
    try:
        errors.check_ts(v)
    except ValueError as e:
        raise ValueError(f"NeuralODE: {e}") from None
    return tuple(float(x) for x in v)


def _as_float(name: str, value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError(f"NeuralODE: {name} must be a number, got {value!r}") from e


class NeuralODE(eqx.Module):
    """A layer that solves ``dz/dt = field(z, t)`` from ``z0`` (Chen et al. 2018's ODE block).

    Two modes:

    * an interval (``ts=None``; ``t0``, ``t1``, default 0 and 1): ``node(z0)`` returns
      ``z(t1)``, with ``z0``'s shape: a drop-in replacement for a residual block;
    * output times ``ts`` (``T >= 2``, strictly monotonic, ``ts[0]`` the time of ``z0``):
      ``node(z0)`` returns ``ys`` with a leading axis of length ``T``, ``ys[i] = z(ts[i])``.

    ``node(z0, ts)`` solves at other times ``ts`` (may be a traced array, e.g. a batch of
    time windows under ``vmap``) and returns all of ``ys``.

    ``z0`` may be an array of any shape the field accepts (for the fields here, ``(d,)`` or a
    batch ``(..., d)`` solved jointly) or a pytree. The module is a pytree: its only arrays
    are the field's, so ``eqx.filter_grad``, ``eqx.filter_jit``, ``eqx.filter_vmap`` and
    ``optax`` (on ``eqx.filter(node, eqx.is_inexact_array)``) see exactly the field's weights.
    The times and the solve options (``node.options``, a ``jaxode.Options`` of Python values)
    are static fields: changing them retraces a jitted caller. To vary the tolerances without
    retracing (a sweep, a schedule), pass them per call, ``node(z0, rtol=r, atol=a)``: those
    may be traced arrays, and they are never trainable leaves.

    Args:
        field: the vector field ``field(z, t, params) -> dz/dt`` (``params`` is passed as
            ``None``), e.g. an ``MLPField``; any callable, usually an Equinox module holding
            its weights.
        ts: output times, or ``None`` for the interval mode.
        t0, t1: the interval of the interval mode (``t0 != t1``; ``t1 < t0`` solves backwards).
        solver, rtol, atol, dt0, max_steps, gradient, adjoint_rtol, adjoint_atol,
            adjoint_seminorm, reversible_coupling, throw: passed to ``jaxode.odesolve`` (same
            defaults: ``"tsit5"``, 1e-6, 1e-6, ``None``, 4096, ``"adjoint"``, ..., 0.999);
            concrete numbers, kept in ``node.options`` (``reversible_coupling``: ``λ`` of
            ``gradient="reversible"``, in ``(0, 1]``). ``rtol``/``atol`` are the defaults of ``__call__``'s.
        batched: passed to ``odesolve``: ``z0`` carries a leading axis of ``B`` independent
            initial conditions, each solved with its own steps (as under ``eqx.filter_vmap``,
            with the parameter adjoints summed inside one backward solve); the field sees one
            problem's ``z``; the output gets the batch axis first: ``(B, ...)`` for ``z(t1)``,
            ``(B, T, ...)`` for ``ys``. Default ``False``.
        full_output: if ``True`` ``node(z0)`` returns ``(out, info)`` with
            ``odesolve``'s ``Info`` (``nfe``, ``num_steps``, ...).

    Raises:
        ValueError: at construction for an unknown solver (the message lists the names), an
            empty interval, times that are not strictly monotonic, bad tolerances,
            ``max_steps``, ``gradient``, ``reversible_coupling`` or a fixed-step solver without
            ``dt0``; at the first
            call if the field's output shape differs from the state's (the message names both).
    """

    field: Callable[..., Any]
    ts: tuple[float, ...] = eqx.field(static=True)
    output_all: bool = eqx.field(static=True)
    options: Options = eqx.field(static=True)

    def __init__(
        self,
        field: Callable[..., Any],
        ts: Sequence[float] | Array | None = None,
        *,
        t0: float = 0.0,
        t1: float = 1.0,
        solver: str | ButcherTableau = "tsit5",
        rtol: float = 1e-6,
        atol: float = 1e-6,
        dt0: float | None = None,
        max_steps: int = 4096,
        gradient: str = "adjoint",
        adjoint_rtol: float | None = None,
        adjoint_atol: float | None = None,
        adjoint_seminorm: bool = False,
        reversible_coupling: float = 0.999,
        batched: bool = False,
        throw: bool = True,
        full_output: bool = False,
    ):
        if not callable(field):
            raise TypeError(f"NeuralODE: field must be callable as field(z, t, params), got {field!r}")
        self.field = field
        if ts is None:
            t0, t1 = _as_float("t0", t0), _as_float("t1", t1)
            if not (math.isfinite(t0) and math.isfinite(t1)):
                raise ValueError(f"NeuralODE: the interval must be finite, got t0={t0}, t1={t1}")
            if t0 == t1:
                raise ValueError(f"NeuralODE: empty interval t0 == t1 == {t0}; give t0 != t1")
            self.ts, self.output_all = (t0, t1), False
        else:
            self.ts, self.output_all = _as_times(ts, "ts"), True
        # Python floats: the options are a static (hashed) field, never a trainable leaf
        numbers = {name: _as_float(name, v) for name, v in (
            ("rtol", rtol), ("atol", atol), ("dt0", dt0), ("adjoint_rtol", adjoint_rtol),
            ("adjoint_atol", adjoint_atol))}
        try:
            self.options = Options(
                solver=solver, max_steps=max_steps, gradient=gradient,
                adjoint_seminorm=bool(adjoint_seminorm), reversible_coupling=reversible_coupling,
                batched=bool(batched), throw=bool(throw),
                full_output=bool(full_output), **numbers,
            )
        except (ValueError, TypeError) as e:
            raise type(e)(f"NeuralODE: {e}") from None

    @property
    def t0(self) -> float:
        """The time of ``z0``."""
        return self.ts[0]

    @property
    def t1(self) -> float:
        """The last time solved to."""
        return self.ts[-1]

    def __call__(
        self,
        z0: Any,
        ts: Array | None = None,
        *,
        rtol: float | Array | None = None,
        atol: float | Array | None = None,
        full_output: bool | None = None,
    ) -> Any:
        """Solves from ``z0`` at ``self.t0`` (or ``ts[0]``).

        Args:
            z0: the initial state (an array, e.g. ``(d,)``, or a pytree).
            ts: optional output times ``(T,)`` overriding the module's; then all of ``ys``
                (leading axis ``T``) is returned.
            rtol, atol: override the module's tolerances for this call; may be traced (e.g.
                arguments of a jitted function), so a sweep over them does not recompile.
            full_output: overrides the module's ``full_output`` for this call.

        Returns:
            ``z(t1)`` (shape of ``z0``) in the interval mode, else ``ys`` (leading axis
            ``T``); with ``full_output``, ``(that, info)``.
        """
        leaves = jax.tree_util.tree_leaves(z0)
        if not leaves:
            raise ValueError("NeuralODE: z0 must hold at least one array")
        dtype = jnp.result_type(*leaves)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"NeuralODE: z0 must hold floating-point arrays, got dtype {dtype}")
        opts = self.options
        output_all = self.output_all or ts is not None
        times = jnp.asarray(self.ts if ts is None else ts, dtype=dtype)
        if opts.batched:
            if any(jnp.ndim(x) < 1 for x in leaves):
                raise ValueError("NeuralODE(batched=True): z0's leaves need a leading batch axis")
            first = jax.tree_util.tree_map(lambda x: x[0], z0)
            errors.check_output(self.field, first, times[0], None, "NeuralODE: ")
        else:
            errors.check_output(self.field, z0, times[0], None, "NeuralODE: ")
        overrides = {k: v for k, v in (("rtol", rtol), ("atol", atol)) if v is not None}
        options = {**opts.as_dict(), **overrides, "full_output": True}
        ys, info = odesolve(self.field, z0, times, None, **options)
        if output_all:
            out = ys
        elif opts.batched:  # (B, T, ...) -> (B, ...)
            out = jax.tree_util.tree_map(lambda y: y[:, -1], ys)
        else:
            out = jax.tree_util.tree_map(lambda y: y[-1], ys)
        want_info = opts.full_output if full_output is None else full_output
        return (out, info) if want_info else out

ODEBlock = NeuralODE
"""An alias of ``NeuralODE``, the name used for the ODE-Net block of Chen et al. (2018)."""

from .cnf import CNF  # noqa: E402  (cnf imports odesolve only, never this module)
