"""Input validation (at trace time where the input is concrete) and runtime failure reports.

A failure found while the compiled program runs (a failed solve, invalid traced input) raises
``SolveError`` from a host callback. Under ``jax.jit`` JAX re-raises it wrapped in a
``JaxRuntimeError`` whose text ends with the ``SolveError`` line; ``odesolve`` runs its own
compiled function and unwraps it, so an eager call raises the ``SolveError`` itself.
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from .while_loops import max_in_batch

SUCCESS = 0
MAX_STEPS_REACHED = 1
STEP_SIZE_UNDERFLOW = 2
NONFINITE = 3
INVALID_TOLERANCE = 4
DENSE_NOT_DIFFERENTIABLE = 5
EVENTS_MAX_STEPS = 6
TOO_MANY_EVENTS = 7

STATUS_MESSAGES = (
    "",
    "jaxode: the solve took max_steps steps (accepted and rejected) without reaching the final "
    "time; raise max_steps or loosen rtol/atol; if the problem is stiff (an explicit solver's "
    "steps limited by stability), use a stiff solver: solver=\"rodas5p\", \"kvaerno5\" or \"auto\"",
    "jaxode: the step size underflowed (the step became too small for the time's precision); "
    "the problem may be stiff or singular, or rtol/atol too tight for the dtype",
    "jaxode: the solution became non-finite (NaN or inf): an adaptive solver's shrinking steps did "
    "not avoid it; with a fixed-step solver, try a smaller dt0",
    "jaxode: invalid traced rtol, atol, dt0 or max_dt (NaN, inf or negative, both tolerances 0, "
    "or dt0 or max_dt <= 0): rtol and atol must be finite and >= 0, not both 0, dt0 and max_dt "
    "finite and > 0; no step was taken",
    "jaxode: the dense solution of gradient=\"adjoint\" is not differentiated (the adjoint method "
    "gives the gradients of ys only): use gradient=\"backprop\" or \"checkpoint\" to differentiate it",
    "jaxode: the solve took max_steps steps (accepted and rejected) without reaching the final "
    "time, with events firing: events ever closer together (Zeno behaviour, e.g. a ball bouncing "
    "to rest) end a step each; stop the solve with a terminal event, or raise max_steps",
    "jaxode: more events fired than max_events; raise max_events (it sizes the record of the "
    "events that gradient=\"adjoint\" and \"reversible\" keep for the backward pass)",
)


class SolveError(RuntimeError):
    """A solve failed, or a traced input was invalid; the message names the cause."""


SolveError.__module__ = "jaxode"  # shown as ``jaxode.SolveError``


def _callback_failure(record: logging.LogRecord) -> bool:
    """Drops JAX's log of a callback that raised, when it raised a ``SolveError``: the error
    itself carries the message (the log would print a second, long traceback)."""
    return not (record.exc_info and isinstance(record.exc_info[1], SolveError))


logging.getLogger("jax._src.callback").addFilter(_callback_failure)


def _raise_first_failure(codes, messages):
    """Host side of ``fail_if``: raises the message of the first nonzero code (if any)."""
    codes = np.asarray(codes)
    failed = codes[codes != 0]
    if failed.size:
        raise _short_traceback(SolveError(messages[int(failed[0])]))
    return np.zeros(codes.shape, np.int32)


def _short_traceback(error: SolveError) -> SolveError:
    """``error`` as raised from a finished generator: its traceback is one frame with no
    caller, so the text that JAX wraps around it is short and ends with the message."""

    def raiser():
        raise error
        yield

    try:
        next(raiser())
    except SolveError as e:
        return e


def fail_if(x, code, messages):
    """``x`` unchanged, with a check made when the program runs: if ``code`` (an integer array,
    batched under ``vmap``) is nonzero anywhere, raise ``SolveError(messages[code])``.

    The check is a host callback taken only when a code is nonzero (under ``vmap``, on the
    largest code of the batch); its zero result is added to every floating leaf of ``x``, so
    any output that is used carries the check.
    """
    token = _failure_token(code, messages)
    return jax.tree_util.tree_map(lambda a: a + token.astype(a.dtype) if _is_float(a) else a, x)


def _failure_token(code, messages) -> Array:
    """A zero (int32 scalar) whose computation raises ``SolveError(messages[code])`` when the
    program runs, if ``code`` is nonzero: add it to a value to attach the check to it."""
    code = max_in_batch(jnp.max(jax.lax.stop_gradient(jnp.asarray(code, jnp.int32))))
    messages = tuple(messages)

    def check(code):
        return jax.pure_callback(
            lambda c: _raise_first_failure(c, messages), jax.ShapeDtypeStruct((), jnp.int32), code,
            vmap_method="broadcast_all",
        )

    return jax.lax.cond(code != 0, check, lambda c: jnp.zeros((), jnp.int32), code)


def _is_float(a) -> bool:
    return jnp.issubdtype(jnp.result_type(a), jnp.inexact)


def is_concrete(x) -> bool:
    """Whether ``x`` has a value now (not a tracer)."""
    return not isinstance(x, jax.core.Tracer)


def check_ts(ts) -> Array:
    """Checks the output times: a 1-D array of >= 2 finite, strictly monotonic values."""
    ts = ts if isinstance(ts, jax.Array) else jnp.asarray(ts)
    if ts.ndim != 1:
        raise ValueError(f"ts must be a 1-D array of times, got shape {ts.shape}")
    if ts.shape[0] < 2:
        raise ValueError(f"ts must hold at least two times (start and end), got {ts.shape[0]}")
    if not jnp.issubdtype(ts.dtype, jnp.floating):
        ts = ts.astype(jnp.result_type(float))
    if is_concrete(ts):
        _check_values_once("ts", ts, _check_ts_values)
    return ts


def _check_ts_values(ts) -> None:
    v = np.asarray(ts)
    if not np.all(np.isfinite(v)):
        raise ValueError("ts must be finite, got a NaN or inf")
    d = np.diff(v)
    if not (np.all(d > 0) or np.all(d < 0)):
        raise ValueError("ts must be strictly increasing or strictly decreasing")


# the JAX arrays whose values passed a check, by (check, id): a JAX array is immutable, so an
# eager call given the same array again (a training loop's ts, z0) skips the host transfer
_VALUES_CHECKED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _check_values_once(kind: str, x, check: Callable) -> None:
    """``check(x)``, skipped for a JAX array that passed it before (a NumPy array may change
    in place: always checked)."""
    key, immutable = (kind, id(x)), isinstance(x, jax.Array)
    if immutable and _VALUES_CHECKED.get(key) is x:
        return
    check(x)
    if immutable:
        _VALUES_CHECKED[key] = x


def runtime_check_ts(ts) -> Array:
    """The same check for traced ``ts``, as an error raised by the compiled program."""
    d = jnp.diff(ts)
    bad = ~(jnp.all(d > 0) | jnp.all(d < 0)) | ~jnp.all(jnp.isfinite(ts))
    message = "jaxode: ts must be finite and strictly increasing or strictly decreasing"
    return fail_if(ts, bad.astype(jnp.int32), ("", message))


def check_z0(z0) -> None:
    """``z0`` holds floating-point or complex arrays, finite where their values are known."""
    leaves = jax.tree_util.tree_leaves(z0)
    if not leaves:
        raise ValueError("z0 must hold at least one array")
    for i, leaf in enumerate(leaves):
        dtype = leaf.dtype if isinstance(leaf, jax.Array) else jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"z0 must hold floating-point (or complex) arrays, got dtype {dtype}; "
                "convert it, e.g. jnp.asarray(z0, dtype=float)"
            )
        if is_concrete(leaf):
            where = "" if len(leaves) == 1 else f" (leaf {i})"
            _check_values_once("z0", leaf, lambda v, where=where: _check_finite_z0(v, where))


def _check_finite_z0(leaf, where: str) -> None:
    if not np.all(np.isfinite(np.asarray(leaf))):
        raise ValueError(f"z0 must be finite: the initial state{where} holds a NaN or inf")


def is_empty(z0) -> bool:
    """Whether the state has no elements at all."""
    return sum(int(np.prod(jnp.shape(x))) for x in jax.tree_util.tree_leaves(z0)) == 0


def check_batch(z0) -> None:
    """With ``batched=True`` every leaf of ``z0`` has the same leading (batch) axis."""
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree_util.tree_leaves(z0)}
    if None in sizes:
        raise ValueError("with batched=True every leaf of z0 needs a leading batch axis; got a scalar")
    if len(sizes) != 1:
        raise ValueError(
            f"with batched=True every leaf of z0 must have the same leading batch axis, got {sorted(sizes)}"
        )


_ORDER_HINT = (
    "jaxode calls f(z, t, params), with z shaped like z0 and t a scalar (torchdiffeq and "
    "scipy call f(t, y): swap the first two arguments, and take params third)"
)


def check_output(f, z0, t, params, who: str = "") -> None:
    """Checks at trace time that ``f(z0, t, params)`` matches ``z0``'s structure, shapes, dtypes;
    ``who`` (e.g. ``"NeuralODE: "``) prefixes the messages. A ``ValueError`` raised by ``f``
    itself stays one (the fields of ``jaxode.nn`` name a wrong state size so)."""
    shapes = jax.tree_util.tree_map(lambda x: tuple(jnp.shape(x)), z0)
    try:
        out = eqx.filter_eval_shape(f, z0, t, params)
    except Exception as e:
        kind = ValueError if isinstance(e, ValueError) else TypeError
        failure = f"{type(e).__name__}: {e}"
        message = f"{who}the vector field failed on a state of shape {shapes}: {failure}"
        raise kind(f"{message}\n{_ORDER_HINT}") from e
    s_in, s_out = jax.tree_util.tree_structure(z0), jax.tree_util.tree_structure(out)
    if s_in != s_out:
        hint = _ORDER_HINT
        if isinstance(z0, (list, tuple)) and s_out == jax.tree_util.tree_structure(0):
            hint = "z0 is a Python list or tuple (a pytree of scalars): pass jnp.asarray(z0)"
        raise ValueError(
            f"{who}f(z, t, params) must return the structure of z0: expected {s_in}, got {s_out}; {hint}"
        )
    for i, (a, b) in enumerate(zip(jax.tree_util.tree_leaves(z0), jax.tree_util.tree_leaves(out))):
        a = jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
        if a.shape != b.shape:
            raise ValueError(f"{who}the vector field maps a state of shape {a.shape} to an output of shape "
                             f"{b.shape} (leaf {i}): f(z, t, params) must return arrays shaped like z0; "
                             f"{_ORDER_HINT}")
        if a.dtype != b.dtype:
            raise TypeError(f"{who}f(z, t, params) must return the dtypes of z0: leaf {i} is "
                            f"{a.dtype} in z0 but {b.dtype} in f's output")


def check_options(
    method, rtol, atol, dt0, max_steps, adjoint_rtol=None, adjoint_atol=None, max_dt=None
) -> None:
    """Checks the solve options, by value where they are concrete (traced tolerances, ``dt0``
    and ``max_dt`` are checked when the program runs: status ``INVALID_TOLERANCE``)."""
    if not isinstance(max_steps, (int, np.integer)) or isinstance(max_steps, bool) or max_steps < 1:
        raise ValueError(f"max_steps must be an integer >= 1, got {max_steps!r}")
    for name, v in (("rtol", rtol), ("atol", atol)):
        if is_concrete(v) and np.any(np.asarray(v) < 0):
            raise ValueError(f"{name} must be >= 0, got {v}")
        if is_concrete(v) and not np.all(np.isfinite(np.asarray(v))):
            raise ValueError(f"{name} must be finite, got {v}")
    if method.adaptive and is_concrete(rtol) and is_concrete(atol):
        if np.any((np.asarray(rtol) == 0) & (np.asarray(atol) == 0)):
            raise ValueError("rtol and atol cannot both be 0: no step would meet the tolerance")
    for name, v in (("adjoint_rtol", adjoint_rtol), ("adjoint_atol", adjoint_atol)):
        if v is not None and is_concrete(v) and not np.all(np.asarray(v) >= 0):  # NaN too
            raise ValueError(f"{name} must be >= 0, got {v}")
        if v is not None and is_concrete(v) and not np.all(np.isfinite(np.asarray(v))):
            raise ValueError(f"{name} must be finite, got {v}")
    if dt0 is None:
        if not method.adaptive:
            raise ValueError(
                f"solver {method.name!r} has a fixed step: pass dt0 (the step size)"
            )
    elif is_concrete(dt0) and not np.all(np.asarray(dt0) > 0):
        raise ValueError(f"dt0 must be > 0 (a magnitude; the direction comes from ts), got {dt0}")
    if max_dt is not None and is_concrete(max_dt):
        if np.ndim(max_dt) != 0 or not np.isreal(max_dt) or not np.all(np.asarray(max_dt) > 0):
            raise ValueError(f"max_dt must be a real scalar > 0 (a magnitude), got {max_dt}")
        if np.isnan(max_dt):
            raise ValueError(f"max_dt must be a real scalar > 0 (a magnitude), got {max_dt}")


def check_jump_ts(jump_ts):
    """``jump_ts`` checked (1-D, real; finite where concrete): a tuple of floats if concrete
    (hashable, as a static option may need to be), else the traced array, flattened."""
    jump_ts = jnp.asarray(jump_ts) if not isinstance(jump_ts, jax.core.Tracer) else jump_ts
    if jump_ts.ndim > 1:
        raise ValueError(f"jump_ts must be a 1-D array of times, got shape {jump_ts.shape}")
    if not jnp.issubdtype(jump_ts.dtype, jnp.integer) and not jnp.issubdtype(jump_ts.dtype, jnp.floating):
        raise TypeError(f"jump_ts must hold real times, got dtype {jump_ts.dtype}")
    if is_concrete(jump_ts) and not np.all(np.isfinite(np.asarray(jump_ts))):
        raise ValueError(f"jump_ts must be finite, got {jump_ts}")
    if is_concrete(jump_ts):
        return tuple(float(x) for x in np.asarray(jump_ts).reshape(-1))
    return jump_ts.reshape(-1)


def solve_error_message(error: BaseException) -> str | None:
    """The ``SolveError`` message inside the error JAX raised for a failed callback, if any."""
    text = str(error)
    marker = "SolveError: "
    if marker not in text:
        return None
    return text[text.rindex(marker) + len(marker):].strip()


def raise_on_failure(x, status):
    """Raises (also under ``jit``) the message of ``status`` if it is not ``SUCCESS``.

    The check is made on a scalar that is then added (as 0) to every leaf of ``x``: any
    output that is used carries the check, and a sharded output keeps its sharding (a check
    attached to the whole array would make XLA replicate it onto every device). Derivatives
    carry it too: tangents (and so cotangents) are multiplied by ``1 + 0`` taken from the
    check, so ``jit(grad(...))`` or a ``jvp`` whose primal outputs are dead still raises.
    """
    return _guarded(True, x, jax.lax.stop_gradient(jnp.max(status)))


def nan_gradient_on_failure(x, status):
    """``x`` unchanged, but its tangents (and so the cotangents of whatever ``x`` came
    from) are NaN where ``status`` is not ``SUCCESS``: a failed solve has no gradient.

    ``status``: a scalar, or one per leading index of every leaf of ``x`` (a batch).
    """
    return _guarded(False, x, jax.lax.stop_gradient(status))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _guarded(throw: bool, x, status):
    return _guard_and_scale(throw, x, status)[0]


@_guarded.defjvp
def _guarded_jvp(throw, primals, tangents):
    x, status = primals
    out, scale = _guard_and_scale(throw, x, status)

    def scaled(t):
        if not jnp.issubdtype(t.dtype, jnp.inexact):  # float0: integer leaves have no tangent
            return t
        return t * jnp.reshape(scale, scale.shape + (1,) * (t.ndim - scale.ndim)).astype(t.dtype)

    return out, jax.tree_util.tree_map(scaled, tangents[0])


def _guard_and_scale(throw: bool, x, status):
    """``(x with the check attached, tangent scale)``: the check's ``1 + 0`` with ``throw``,
    else 1, or NaN where failed."""
    if not throw:
        return x, jnp.where(status != SUCCESS, jnp.nan, 1.0)
    token = _failure_token(status, STATUS_MESSAGES)
    return jax.tree_util.tree_map(lambda a: a + token.astype(a.dtype), x), 1.0 + token


def refuse_derivatives(fn, message: str):
    """``fn``, raising ``NotImplementedError(message)`` if it is differentiated itself (a
    backward solve that runs ``lax.while_loop``s: a second derivative of its mode)."""

    @jax.custom_jvp
    def run(*args):
        return fn(*args)

    @run.defjvp
    def _jvp(primals, tangents):
        raise NotImplementedError(message)

    return run


def dense_not_differentiated(ct_dense, status):
    """``status``, or ``DENSE_NOT_DIFFERENTIABLE`` if the cotangent of the dense steps (``None``
    when none were kept) is nonzero anywhere: an adjoint mode that does not differentiate them
    was asked to."""
    leaves = jax.tree_util.tree_leaves(ct_dense)
    if not leaves:
        return status
    used = jnp.any(jnp.stack([jnp.any(c != 0) for c in leaves]))
    return jnp.where(used, DENSE_NOT_DIFFERENTIABLE, status)
