"""The ways to run a ``Loop``, and the one rule that picks among the plain ones.

A driver takes ``build(differentiable) -> Loop`` and returns the finished ``LoopState``:

==============  =================================================================================
driver          how the loop runs
==============  =================================================================================
``nested``      two ``lax.while_loop``s: over the output times, and over the steps up to the next
                one. The inner loop carries only the state of size ``n`` (no outputs, no
                ``ts``), which XLA's CPU runtime runs inline when every buffer it touches is small
                (``_INLINE_BYTES``): for a small system a step is several times cheaper.
``flat``        one ``lax.while_loop`` over ``Loop.step``: for a large system, whose step costs
                what its field does, and under ``jax.vmap`` (each problem steps on without
                waiting for the others at every output time).
``automatic``   the rule: ``nested`` if a step's stages fit in ``_INLINE_BYTES``, else ``flat``;
                ``flat`` under ``jax.vmap`` in any case. Not reverse-differentiable. For a
                method with phases (``solver="auto"``) ``nested``, and ``flat`` up to
                ``_PHASED_BYTES``, run each phase in its own inner ``while_loop``
                (``_phased_while``), except under ``jax.vmap``.
``backprop``    ``while_loops.checkpointed_while`` over ``Loop.step`` (nested, checkpointed
                scans): reverse and forward mode; outputs written by masking.
``checkpoint``  ``while_loops.custom_vjp_while``: a ``custom_vjp`` around a plain while loop of
                the fast loop, recomputing the differentiable one's steps from checkpoints in the
                reverse pass; reverse mode only.
==============  =================================================================================

The gradient modes (``jaxode.gradients``) name the driver each one runs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import Array, lax

from . import errors
from .loop import Loop, LoopState, write_while
from .while_loops import checkpointed_while, custom_vjp_while, hoist, residual_bytes, tree_bytes

# XLA's CPU runtime runs a loop body inline when every buffer it touches is at most this big
# (ThunkExecutor's execute_sequential_buffer_threshold), else through its dataflow executor.
_INLINE_BYTES = 512
# The flat driver runs a method with phases in phases up to this size of a step's stages; beyond
# it a step's own cost dwarfs choosing its method by ``lax.cond``, while the ``lax.cond`` around
# a phase (``_phased_while``) copies the outputs. Measured (``benchmarks/auto_overhead.py``),
# auto / tsit5: n = 32, 2 kB: 1.21 per step, 1.08 in phases; (64, 32), 131 kB: 1.06 per step,
# 1.16 in phases.
_PHASED_BYTES = 16 * 1024

Build = Callable[[bool], Loop]


def integrate(field, y0, ts, rtol, atol, dt0, *, driver: str = "automatic", **options) -> LoopState:
    """Solves ``y' = field(y, t)``, ``y(ts[0]) = y0`` with the driver named ``driver`` and
    returns the final ``LoopState``; ``options`` are ``Loop``'s."""
    def build(differentiable: bool) -> Loop:
        return Loop(field, y0, ts, rtol, atol, dt0, differentiable=differentiable, **options)

    return DRIVERS[driver](build)


def flat(build: Build) -> LoopState:
    loop = build(False)
    return loop.finish(lax.while_loop(loop.running, lambda state: loop.step(state)[0], loop.init()))


def _flat_phased(build: Build) -> LoopState:
    loop = build(False)
    body = lambda lp: (lambda state: lp.step(state)[0])
    return loop.finish(_phased_while(loop, loop.running, body, loop.init(), lambda state: state))


def _has_phases(loop: Loop) -> bool:
    return hasattr(loop.method, "phases")


def _phased_while(loop: Loop, cond, body_of: Callable[[Loop], Callable], carry, state_of):
    """``lax.while_loop(cond, body_of(loop), carry)``, where ``loop.method`` may have phases
    (``methods.auto.AutoSwitch.phases``: one method per phase, ``phase_of(method_state)`` the
    current one): then each pass of the outer loop runs one inner ``while_loop`` per phase,
    stepping with that phase's method while ``cond`` holds and the state is in that phase, so
    that no step chooses its method at run time. ``state_of(carry)``: the ``LoopState``.

    Every phase but the first (where a non-stiff solve spends all its steps) runs under a
    ``lax.cond`` on whether it is entered: XLA hoists a loop's invariants out of it (for a
    Rosenbrock step, the Jacobian's identity basis pushed through the field: O(n²)), and would
    compute them even for a phase that takes no step. Under ``jax.vmap`` every problem would
    wait for the others to leave a phase: callers run this on one problem only."""
    if not _has_phases(loop):
        return lax.while_loop(cond, body_of(loop), carry)
    which = loop.method.phase_of
    phases = []
    for method in loop.method.phases():
        phase_loop = copy.copy(loop)
        phase_loop.method = method
        phases.append(phase_loop)

    def run_phase(k: int, carry):
        in_phase = lambda c: cond(c) & (which(state_of(c).method_state) == k)
        run = lambda c: lax.while_loop(in_phase, body_of(phases[k]), c)
        return run(carry) if k == 0 else lax.cond(in_phase(carry), run, lambda c: c, carry)

    def outer(carry):
        for k in range(len(phases)):
            carry = run_phase(k, carry)
        return carry

    return lax.while_loop(cond, outer, carry)


def _stage_bytes(loop: Loop) -> int:
    return loop.method.num_stages * loop.y0.size * loop.y0.dtype.itemsize


def is_large(loop: Loop) -> bool:
    """Whether a step's stages exceed ``_INLINE_BYTES``: then its cost is the field's, and the
    flat driver runs it."""
    return _stage_bytes(loop) > _INLINE_BYTES


def automatic(build: Build) -> LoopState:
    loop = build(False)
    if is_large(loop) or loop.save_dense or loop.events is not None:  # events: Loop.step
        if _has_phases(loop) and _stage_bytes(loop) <= _PHASED_BYTES:
            return _vmapped_as(lambda: _flat_phased(build), lambda: flat(build))
        return flat(build)
    return _vmapped_as(lambda: nested(build), lambda: flat(build))


def backprop(build: Build) -> LoopState:
    loop = build(True)
    body = lambda state: loop.step(state)[0]
    init = loop.init()
    ratio = _step_residual_ratio(loop, init)
    state = checkpointed_while(loop.running, body, init, loop.max_steps, residual_ratio=ratio)
    return loop.finish(state)


def _step_residual_ratio(loop: Loop, init: LoopState) -> float:
    """``R / S`` of a step for ``checkpointed_while``'s block length: ``R``, what the reverse
    pass keeps of a step, about its ``s`` stages and the residuals of their field evaluations,
    ``s (n + field's)``; ``S``, the carry the step reads (the outputs are written, never read:
    the block checkpoint does not keep them). For an MLP field ``R / S`` is ~100, not ``s``."""
    try:
        field = residual_bytes(lambda y: loop.field(y, init.t), init.y)
    except Exception:  # a field JAX cannot differentiate: nor can the loop be, any block will do
        field = 0
    step = loop.method.num_stages * field + _stage_bytes(loop)
    return step / max(1, tree_bytes(init._replace(ys=None, dense=None)))


def checkpoint(build: Build) -> LoopState:
    """The outputs (``ys``, and the dense steps) are written by the body and never read: they
    are passed to ``custom_vjp_while`` apart from the carry, and not checkpointed."""
    loop, fast = build(True), build(False)

    def outputs_apart(step):
        def body(carry, outputs):
            ys, dense = outputs
            new = step(carry._replace(ys=ys, dense=dense))[0]
            return new._replace(ys=None, dense=None), (new.ys, new.dense)

        return body

    state = loop.init()
    carry, (ys, dense) = custom_vjp_while(
        loop.running, outputs_apart(loop.step), state._replace(ys=None, dense=None), (state.ys, state.dense),
        loop.max_steps, fast_body=outputs_apart(fast.step),
    )
    return loop.finish(carry._replace(ys=ys, dense=dense))


class _LastStep(NamedTuple):
    """The last accepted step of the inner loop, to interpolate the outputs inside it."""

    t: Array
    h: Array
    t_new: Array
    y: Array
    y_new: Array
    f_new: Array
    dense: Any  # the method's StepResult.dense if its interpolant costs evaluations, else the coefficients


def nested(build: Build) -> LoopState:
    loop = build(False)
    state = loop.init()
    if loop.stop_at_outputs:
        return loop.finish(lax.while_loop(loop.running, lambda s: _to_next_output(loop, s), state))
    lazy = loop.method.interpolant_nfe > 0
    s_end = loop.s_ts[-1]

    def last_of(at):
        dense = at.dense if lazy else loop.coefficients(at)
        return _LastStep(at.t, at.h, at.t_new, at.y, at.y_new, at.f_new, dense)

    shape = jax.eval_shape(lambda: last_of(loop.attempt(state, s_end)[1]))
    last = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shape)

    def outer(carry):
        state, last = carry
        i = state.i_out
        target = lax.dynamic_index_in_dim(loop.s_ts, i, keepdims=False)
        new, last = _steps_until(loop, state, target, s_end, last, last_of)
        arrived = new.t >= target  # else the solve failed
        if lazy:  # the interpolant's extra evaluations once per step with outputs
            new, coeffs = loop.lazy_coefficients(new, last, arrived)
        else:
            coeffs = last.dense
        ys, i_out = write_while(new.ys, i, loop.s_ts, arrived, last, coeffs, loop.method)
        return new._replace(ys=ys).counted(i_out=i_out), last

    return loop.finish(lax.while_loop(lambda carry: loop.running(carry[0]), outer, (state, last))[0])


def _to_next_output(loop: Loop, state: LoopState) -> LoopState:
    """The steps up to the next output time (each clipped to land on it), and the output there."""
    i = state.i_out
    target = lax.dynamic_index_in_dim(loop.s_ts, i, keepdims=False)
    new, _ = _steps_until(loop, state, target, target)
    arrived = new.t >= target
    if new.ys is not None:
        value = jnp.where(arrived, new.y, jnp.nan)
        new = new._replace(ys=lax.dynamic_update_index_in_dim(new.ys, value, i, 0))
    if loop.at_output is not None:
        new = loop.arrive(new, i, arrived)
    return new.counted(i_out=i + arrived.astype(jnp.int32))


def _steps_until(loop: Loop, state: LoopState, until, clip_to, last=None, last_of=None):
    """The inner loop: steps (each clipped to end at ``clip_to`` at the latest) until
    ``state.t`` reaches ``until`` or the solve fails; with ``last``, also returns the last
    step (the accepted one that got there). Carries nothing of size ``T``."""

    def body_of(lp: Loop):
        def body(carry):
            new, at = lp.attempt(carry[0], clip_to)
            return (new,) if last is None else (new, last_of(at))

        return body

    def more(carry):
        return (carry[0].t < until) & (loop.failure(carry[0]) == errors.SUCCESS)

    carry = (state._replace(ys=None),) + (() if last is None else (last,))
    carry = _phased_while(loop, more, body_of, carry, lambda c: c[0])
    return carry[0]._replace(ys=state.ys), (carry[1] if last is not None else None)


def _vmapped_as(fn: Callable[[], Any], vmappable: Callable[[], Any]):
    """``fn()``, whose ``jax.vmap`` is computed as ``jax.vmap`` of ``vmappable()`` instead.

    ``fn`` and ``vmappable`` compute the same thing (here: the nested and the flat drivers).
    The nested loops are the faster for one problem, but under ``jax.vmap`` every problem
    would wait for the others at each output time; the flat loop lets each problem step on by
    itself. Everything the two functions close over is passed in explicitly, as
    ``custom_vmap`` requires to see what is batched.
    """
    run_fn, fn_consts = hoist(fn)
    run_flat, flat_consts = hoist(vmappable)

    @jax.custom_batching.custom_vmap
    def run(fn_consts, flat_consts):
        return run_fn(fn_consts)

    @run.def_vmap
    def _rule(axis_size, in_batched, fn_consts, flat_consts):
        in_axes = [0 if batched else None for batched in in_batched[1]]
        out = jax.vmap(run_flat, in_axes=(in_axes,), axis_size=axis_size)(flat_consts)
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return run(fn_consts, flat_consts)


DRIVERS: dict[str, Callable[[Build], LoopState]] = {
    "nested": nested,
    "flat": flat,
    "automatic": automatic,
    "backprop": backprop,
    "checkpoint": checkpoint,
}
