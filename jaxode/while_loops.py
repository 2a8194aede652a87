"""Reverse-differentiable while loops: ``checkpointed_while`` for ``gradient="backprop"``,
``custom_vjp_while`` for ``gradient="checkpoint"``.

**checkpointed_while** (reverse and forward mode).

JAX cannot transpose a ``lax.while_loop`` whose trip count depends on the data, and a
``lax.scan`` over ``max_steps`` iterations would pay for ``max_steps`` steps and store all of
them. ``checkpointed_while`` runs the loop body in blocks of ``B`` iterations, ``G =
ceil(sqrt(ceil(max_steps / B)))`` blocks to a group: an outer ``scan`` over the groups, a
``scan`` over a group's blocks, each block a ``jax.checkpoint``-ed inner ``scan``; a group, a
block or an iteration whose loop has finished is skipped by ``lax.cond``.

Cost for a solve of ``N`` steps (``N <= max_steps``), with ``S`` the size of the loop state and
``R`` that of one body's residuals (for a Runge–Kutta step with ``s`` stages, ``R ≈ s·S`` plus
the vector field's own intermediates):

* forward: ``N`` bodies, plus ``O(sqrt(max_steps / B))`` skipped groups and blocks and at most
  ``B - 1`` skipped iterations (the loop's predicate and a branch each; before the groups, the
  ``max_steps / B`` skipped blocks of a short solve cost more than its steps);
* reverse: the ``ceil(N / B)`` blocks that ran are recomputed once (``N`` more bodies) and
  transposed, with at most ``B - 1`` skipped iterations in the last one; a skipped block
  costs no body, only its stored input and a branch;
* memory: the block inputs, ``(max_steps / B) · S``, plus the residuals of one block, ``B · R``
  — independent of ``N``. ``B = sqrt(max_steps · S / R)`` minimises it, ``2 sqrt(max_steps · S · R)``;
  the caller passes ``R / S`` (``residual_ratio``; ``residual_bytes`` measures ``R``). ``S`` counts
  the state the body reads: a leaf it only writes (a solve's outputs) is not saved by the
  block checkpoint. For a Runge–Kutta step with an MLP field ``R / S`` is ~100, not ``s``.

A linearised ``lax.cond`` outputs the residuals of both branches, zeros for the branch not
taken. So the block's skip branch sits inside a ``jax.checkpoint`` (its residuals: the
block's input, the arrays the body closes over being the scan's invariants, not stacked per
block), and the block itself inside a second one: when the reverse pass recomputes a skipped
block, the zeros it writes are one block input, not the ``B · R`` residuals of a block's
iterations. (mlp-batch, max_steps 4096: the reverse pass 1.1x faster as one state, 1.9x under
``jax.vmap``; a running block is still recomputed once, the outer checkpoint's recomputation
of the inner one being dead code, which JAX removes unless the body has effects: with a
callback in it, ``progress=True`` say, a running block is recomputed twice.)

Under ``jax.vmap`` a batched predicate would turn ``lax.cond`` into a select that runs both
branches, and every block would run; so a block is skipped when the loop has finished for
every element of the batch (``max_in_batch``), and inside a block that runs, the iterations of
finished elements are masked, and those after every element has finished skipped. A masked
iteration is a select, ``where(going, body(where(going, state, init)), state)``, not a
``lax.cond`` on the batched predicate: JAX would make that a select too, but of branches that
take every array the body closes over per element (an MLP's weights copied per element, and
stacked per iteration by the scans), and a finished element steps from the loop's initial
state, whose step is finite (no ``0 · inf`` in the transpose). The bodies
run then follow the most steps any element takes, not ``max_steps``. What still grows with
``max_steps``, with or without ``jax.vmap``, is the memory laid out, ``O(sqrt(max_steps))``:
the skipped blocks' (zero) inputs are written and read back, and buffers beyond glibc's
``mmap`` threshold are mapped afresh, page by page, at every call (``benchmarks/RESULTS.md``,
T7).

**custom_vjp_while** (reverse mode only) computes the same derivative with a ``jax.custom_vjp``
around a plain ``lax.while_loop``, whose cost does not depend on ``max_steps``:

* forward: ``N`` bodies; the carry is copied into one of ``K`` checkpoint slots every
  ``stride`` iterations, ``stride`` starting at 1 and doubling (every other checkpoint
  dropped) each time the slots fill up;
* reverse: the checkpoints are visited last to first; from each, the ``stride`` iterations up
  to the next one are recomputed into a segment buffer and then differentiated one at a time
  (``jax.vjp`` of the body). When ``N <= K`` every iteration's carry is a checkpoint and
  nothing is recomputed beyond the body inside its ``vjp``: the reverse pass costs one body
  and one transposed body per iteration; beyond, ``N (1 - 1/stride)`` bodies more;
* memory: ``K + stride_max`` carries, with ``K = 2 ceil(sqrt(2 max_steps))`` (182 for
  ``max_steps = 4096``) and ``stride_max ≈ 2 max_steps / K``: ``O(sqrt(max_steps))``
  carries, plus one body's residuals. (``K = sqrt(2 max_steps)`` would minimise the memory;
  twice that costs ~40% more of it and spares the recomputation up to twice as many steps.)

Under ``jax.vmap`` each element keeps its own checkpoints; the loops run until the last
element is done. The forward loop's predicate is then "some element goes on" (``max_in_batch``)
and each element's carry stops by itself (``_advance``): with JAX's rule for a batched
predicate, XLA would select between the old and new carry, all K slots included, at every
iteration, a cost that grew with ``sqrt(max_steps)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax

State = TypeVar("State")


def checkpointed_while(
    cond: Callable[[State], bool],
    body: Callable[[State], State],
    init: State,
    max_steps: int,
    residual_ratio: float = 1.0,
) -> State:
    """``lax.while_loop(cond, body, init)`` for at most ``max_steps`` iterations, transposable.

    ``residual_ratio``: the size of one body's residuals relative to the state, ``R / S``; it
    sets the block length ``B = ceil(sqrt(max_steps / residual_ratio))``.
    """
    block = max(1, math.ceil(math.sqrt(max_steps / residual_ratio)))
    num_blocks = -(-max_steps // block)
    group = max(1, math.ceil(math.sqrt(num_blocks)))  # blocks per group
    num_groups = -(-num_blocks // group)

    def iteration(state, _):
        going = cond(state)

        def masked(state):  # under jax.vmap: see the module docstring
            pick = lambda a, b: jax.tree_util.tree_map(lambda x, y: jnp.where(going, x, y), a, b)
            return pick(body(pick(state, init)), state)

        return lax.cond(max_in_batch(going), masked, lambda s: s, state), None

    def skip_unless_running(run):
        return lambda state, _: (lax.cond(max_in_batch(cond(state)), run, lambda s: s, state), None)

    def run_block(state):
        return lax.scan(iteration, state, None, length=block)[0]

    # two checkpoints: see the module docstring
    block_step = jax.checkpoint(skip_unless_running(jax.checkpoint(run_block)))

    def run_group(state):
        return lax.scan(block_step, state, None, length=group)[0]

    return lax.scan(skip_unless_running(run_group), init, None, length=num_groups)[0]


def residual_bytes(body: Callable[[State], State], init: State) -> int:
    """The bytes the reverse pass keeps from one ``body(init)``: the residuals of
    ``jax.vjp(body, init)``, less the arrays ``body`` closes over (a ``scan`` keeps those once).
    Costs one more trace of ``body``."""
    closed = jax.make_jaxpr(lambda s: jax.tree_util.tree_leaves(jax.vjp(body, s)[1]))(init)
    shared = set(map(id, closed.jaxpr.constvars))
    return sum(_nbytes(v.aval) for v in closed.jaxpr.outvars if id(v) not in shared)


def tree_bytes(tree: Any) -> int:
    """The bytes of the arrays of a pytree."""
    return sum(_nbytes(jax.typeof(x)) for x in jax.tree_util.tree_leaves(tree))


def _nbytes(aval) -> int:
    return math.prod(aval.shape) * aval.dtype.itemsize


@jax.custom_batching.custom_vmap
def max_in_batch(x: Array) -> Array:
    """The scalar ``x`` itself; under ``jax.vmap``, its maximum over the batch, unbatched (for a
    boolean, whether it holds anywhere in the batch). A ``lax.cond`` on it stays a branch
    instead of becoming a select, and a batch sharded over devices is reduced, not gathered."""
    return x


@max_in_batch.def_vmap
def _max_in_batch_rule(axis_size, in_batched, x):
    del axis_size
    return (jnp.max(x) if in_batched[0] else x), False


@jax.custom_batching.custom_vmap
def _advance(going: Array, new: Any, old: Any) -> Any:
    """A loop's next carry ``new``, run by a loop body only where ``going`` holds; under
    ``jax.vmap``, where the loop runs on for the other elements of the batch, ``new`` where the
    element's ``going`` holds and ``old`` where it is done (a select of the carry it is given,
    only)."""
    return new


@_advance.def_vmap
def _advance_rule(axis_size, in_batched, going, new, old):
    batched = lambda x, b: x if b else jnp.broadcast_to(x, (axis_size,) + jnp.shape(x))
    going = batched(going, in_batched[0])

    def pick(n, o, n_batched, o_batched):
        n, o = batched(n, n_batched), batched(o, o_batched)
        return jnp.where(going.reshape((axis_size,) + (1,) * (n.ndim - 1)), n, o)

    out = jax.tree_util.tree_map(pick, new, old, in_batched[1], in_batched[2])
    return out, jax.tree_util.tree_map(lambda _: True, out)


def hoist(fn: Callable, *example) -> tuple[Callable, list]:
    """``fn`` as a function of the arrays it closes over: returns ``(run, consts)`` with
    ``run(consts, *args) == fn(*args)`` for arguments like ``example``. For the custom rules
    (``custom_vjp``, ``custom_vmap``) that must see those arrays as explicit inputs."""
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(*example)
    tree = jax.tree_util.tree_structure(shape)

    def run(consts, *args):
        flat = jax.tree_util.tree_leaves(args)
        return jax.tree_util.tree_unflatten(tree, jax.core.eval_jaxpr(closed.jaxpr, consts, *flat))

    return run, closed.consts


class _Tape(NamedTuple):
    """What the forward pass of ``custom_vjp_while`` keeps for the reverse pass."""

    slots: list  # the carry's leaves at iterations 0, stride, 2 stride, ..., each (K, ...)
    count: Array  # slots in use
    stride: Array  # iterations between checkpoints (a power of 2)


def custom_vjp_while(
    cond: Callable[[Any], Array],
    body: Callable[[Any, Any], tuple[Any, Any]],
    carry: Any,
    outputs: Any,
    max_steps: int,
    fast_body: Callable[[Any, Any], tuple[Any, Any]] | None = None,
) -> tuple[Any, Any]:
    """``while cond(carry): carry, outputs = body(carry, outputs)``, for at most ``max_steps``
    iterations, reverse-differentiable with respect to ``carry``, ``outputs`` and every array
    ``cond`` and ``body`` close over.

    ``outputs`` are written by the body and never read by it: they must not affect the new
    carry, and enter the new outputs linearly with coefficients that do not depend on their
    value (e.g. ``jnp.where(mask(carry), value(carry), outputs)``). They are therefore not
    checkpointed. ``fast_body``: the same function, not necessarily transposable (it runs
    the loop forward; ``body`` is recomputed and differentiated in the reverse pass).
    Integer and boolean leaves of the carry are carried along without cotangents.
    """
    fast_body = body if fast_body is None else fast_body
    carry_leaves, carry_tree = jax.tree_util.tree_flatten(carry)
    out_leaves, out_tree = jax.tree_util.tree_flatten(outputs)
    is_float = _is_inexact(carry_leaves)

    def as_flat(fn):
        def flat_fn(c, o):
            new_c, new_o = fn(carry_tree.unflatten(c), out_tree.unflatten(o))
            return jax.tree_util.tree_leaves(new_c), jax.tree_util.tree_leaves(new_o)

        return flat_fn

    run_body, body_consts = hoist(as_flat(body), carry_leaves, out_leaves)
    run_fast, fast_consts = hoist(as_flat(fast_body), carry_leaves, out_leaves)
    run_cond, cond_consts = hoist(lambda c: cond(carry_tree.unflatten(c)), carry_leaves)
    num_slots = 2 * math.ceil(math.sqrt(2 * max_steps))
    max_stride = 1
    while (num_slots - 1) * max_stride < max_steps:  # a stride doubles after K - 1 more of them
        max_stride *= 2

    def forward_loop(consts, c, o, tape):
        body_c, fast_c, cond_c = consts
        within_budget = lambda s: run_cond(cond_c, s[0]) & (s[3] < max_steps)

        def step(state):
            c, o, tape, k = state
            going = within_budget(state)  # False only for an element done while others go on
            if tape is not None:
                tape = _record(tape, c, k, num_slots, going)
            new_c, new_o = run_fast(fast_c, c, o)
            c, o, k = _advance(going, (new_c, new_o, k + 1), (c, o, k))
            return c, o, tape, k

        # under jax.vmap the loop runs while any element goes on, and each element's carry stops
        # by ``_advance``: JAX's own rule (a batched predicate) would select between the old and
        # the new tape, a copy of all K slots of every carry leaf at every iteration
        running = lambda s: max_in_batch(within_budget(s))
        return lax.while_loop(running, step, (c, o, tape, jnp.zeros((), jnp.int32)))

    @jax.custom_vjp
    def run(c, o, consts):
        return forward_loop(consts, c, o, None)[:2]

    def transposable_loop(c, o, consts):
        """The same loop, by ``checkpointed_while`` over ``body``: what the custom rules are
        differentiated as when they are differentiated themselves (second derivatives)."""
        body_c, _, cond_c = consts

        def step(state):
            c, o, k = state
            return *run_body(body_c, c, o), k + 1

        within_budget = lambda s: run_cond(cond_c, s[0]) & (s[2] < max_steps)
        return checkpointed_while(within_budget, step, (c, o, jnp.zeros((), jnp.int32)), max_steps)[:2]

    @jax.custom_jvp
    def taped_loop(c, o, consts):
        slots = [jnp.zeros((num_slots,) + jnp.shape(x), jnp.result_type(x)) for x in c]
        zero = jnp.zeros((), jnp.int32)
        return forward_loop(consts, c, o, _Tape(slots, zero, zero + 1))

    @taped_loop.defjvp
    def _taped_loop_jvp(primals, tangents):
        c, o, tape, steps = taped_loop(*primals)
        _, (t_c, t_o) = jax.jvp(transposable_loop, primals, tangents)
        # the tape is read by run_bwd, whose own derivative (reverse's) does not use it
        return (c, o, tape, steps), (t_c, t_o) + jax.tree_util.tree_map(zero_cotangent, (tape, steps))

    def run_fwd(c0, o, consts):
        c, o, tape, steps = taped_loop(c0, o, consts)
        return (c, o), (tape, steps, consts, c0)

    def run_bwd(residuals, cotangents):
        tape, steps, consts, c0 = residuals
        ct_c, ct_o = cotangents
        body_c = consts[0]
        float_consts = _is_inexact(body_c)
        ct_c, ct_o, ct_consts = reverse(tape, steps, consts, c0, _where(is_float, ct_c), ct_o)
        float0 = lambda xs: [zero_cotangent(x) for x in xs]
        ct_c = _merge(is_float, ct_c, float0(_where(is_float, c0, False)))
        ct_body = _merge(float_consts, ct_consts, float0(_where(float_consts, body_c, False)))
        return ct_c, ct_o, (ct_body, float0(consts[1]), float0(consts[2]))

    @jax.custom_jvp
    def reverse(tape, steps, consts, c0, ct_c, ct_o):
        """The cotangents of the float leaves of the initial carry, of the initial outputs and
        of the float body constants, from those of the final carry's float leaves and outputs."""
        return reverse_by_checkpoints(tape, steps, consts, ct_c, ct_o)

    @reverse.defjvp
    def _reverse_jvp(primals, tangents):
        """Differentiated as the transpose of ``transposable_loop`` (the tape is not used)."""
        _, _, consts, c0, ct_c, ct_o = primals
        _, _, t_consts, t_c0, t_ct_c, t_ct_o = tangents
        body_c = consts[0]
        float_consts = _is_inexact(body_c)

        def by_transposable_loop(body_float, c0_float, ct_c, ct_o):
            def fn(c_float, o, body_float):
                body_all = _merge(float_consts, body_float, _where(float_consts, body_c, False))
                c_all = _merge(is_float, c_float, _where(is_float, c0, False))
                new_c, new_o = transposable_loop(c_all, o, (body_all,) + tuple(consts[1:]))
                return _where(is_float, new_c), new_o

            zeros_o = [jnp.zeros_like(x) for x in ct_o]  # outputs enter linearly
            return jax.vjp(fn, c0_float, zeros_o, body_float)[1]((ct_c, ct_o))

        args = (_where(float_consts, body_c), _where(is_float, c0), ct_c, ct_o)
        t_args = (_where(float_consts, t_consts[0]), _where(is_float, t_c0), t_ct_c, t_ct_o)
        return jax.jvp(by_transposable_loop, args, t_args)

    def reverse_by_checkpoints(tape, steps, consts, ct_c, ct_o):
        """``reverse`` by the checkpoints (see the module docstring)."""
        body_c = consts[0]
        float_consts = _is_inexact(body_c)

        def vjp_body(c, ct_c, ct_o):
            """The cotangents of one iteration's inputs from those of its outputs."""
            static = [x for x, f in zip(c, is_float) if not f]
            static_consts = [x for x, f in zip(body_c, float_consts) if not f]

            def fn(c_float, o, consts_float):
                c_all = _merge(is_float, c_float, static)
                new_c, new_o = run_body(_merge(float_consts, consts_float, static_consts), c_all, o)
                return [x for x, f in zip(new_c, is_float) if f], new_o

            zeros_o = [jnp.zeros_like(x) for x in ct_o]  # outputs enter linearly: any value will do
            c_float = [x for x, f in zip(c, is_float) if f]
            consts_float = [x for x, f in zip(body_c, float_consts) if f]
            _, vjp = jax.vjp(fn, c_float, zeros_o, consts_float)
            return vjp((ct_c, ct_o))

        def segment(j, state):
            """Recomputes and differentiates the iterations from checkpoint ``j`` on."""
            ct_c, ct_o, ct_consts, buffer = state
            j = tape.count - 1 - j
            start = j * tape.stride
            length = jnp.minimum(tape.stride, steps - start)
            buffer = [b.at[0].set(s[j]) for b, s in zip(buffer, tape.slots)]

            def recompute(i, buffer):
                c = [b[i - 1] for b in buffer]
                new_c, _ = run_body(body_c, c, [jnp.zeros_like(x) for x in ct_o])
                return [b.at[i].set(x) for b, x in zip(buffer, new_c)]

            buffer = lax.fori_loop(1, length, recompute, buffer)

            def back(k, state):
                ct_c, ct_o, ct_consts = state
                c = [b[length - 1 - k] for b in buffer]
                d_c, d_o, d_consts = vjp_body(c, ct_c, ct_o)
                return d_c, d_o, [a + d for a, d in zip(ct_consts, d_consts)]

            ct_c, ct_o, ct_consts = lax.fori_loop(0, length, back, (ct_c, ct_o, ct_consts))
            return ct_c, ct_o, ct_consts, buffer

        ct_consts = [jnp.zeros_like(x) for x, f in zip(body_c, float_consts) if f]
        buffer = [jnp.zeros((max_stride,) + s.shape[1:], s.dtype) for s in tape.slots]
        return lax.fori_loop(0, tape.count, segment, (ct_c, ct_o, ct_consts, buffer))[:3]

    run.defvjp(run_fwd, run_bwd)
    c, o = run(carry_leaves, out_leaves, (body_consts, fast_consts, cond_consts))
    return carry_tree.unflatten(c), out_tree.unflatten(o)


def _record(tape: _Tape, carry: list, iteration: Array, num_slots: int, going=True) -> _Tape:
    """Checkpoints ``carry`` if ``iteration`` is a multiple of the stride (and the element
    ``going`` on); when the slots are full, keeps every other one and doubles the stride."""
    due = (iteration % tape.stride == 0) & going
    # always written: when not due, into the next free slot, which the next checkpoint overwrites
    slots = [s.at[tape.count].set(x) for s, x in zip(tape.slots, carry)]
    count = tape.count + due.astype(tape.count.dtype)
    full = count == num_slots

    def thin(slots, count, stride):
        half = num_slots // 2
        thinned = [s.at[:half].set(s[::2]) for s in slots]
        # under jax.vmap, only for the elements whose slots are full
        return ([jnp.where(full, a, b) for a, b in zip(thinned, slots)],
                jnp.where(full, count - half, count), jnp.where(full, stride * 2, stride))

    # a branch, not a select of every slot at every iteration, also under jax.vmap
    slots, count, stride = lax.cond(max_in_batch(full), thin, lambda *a: a, slots, count, tape.stride)
    return _Tape(slots, count, stride)


def _is_inexact(xs: list) -> list:
    return [jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in xs]


def _where(mask: list, xs: list, value: bool = True) -> list:
    """The ``xs`` whose ``mask`` is ``value``."""
    return [x for x, m in zip(xs, mask) if m == value]


def _merge(mask: list, chosen: list, others: list) -> list:
    """Interleaves ``chosen`` (where ``mask``) and ``others`` (elsewhere) back into one list."""
    chosen, others = iter(chosen), iter(others)
    return [next(chosen) if m else next(others) for m in mask]


def zero_cotangent(x):
    """The zero cotangent of ``x``: zeros for floating point, ``float0`` for integers."""
    if x is None:
        return None
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(jnp.shape(x), jax.dtypes.float0)
