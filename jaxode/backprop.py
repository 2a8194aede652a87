"""A reverse-differentiable while loop, for ``gradient="backprop"``.

JAX cannot transpose a ``lax.while_loop`` whose trip count depends on the data, and a
``lax.scan`` over ``max_steps`` iterations would pay for ``max_steps`` steps and store all of
them. ``checkpointed_while`` runs the loop body in blocks of ``B`` iterations: an outer
``scan`` over ``ceil(max_steps / B)`` blocks, each block a ``jax.checkpoint``-ed inner ``scan``,
and a block (or an iteration) whose loop has finished is skipped by ``lax.cond``.

Cost for a solve of ``N`` steps (``N <= max_steps``), with ``S`` the size of the loop state and
``R`` that of one body's residuals (for a Runge–Kutta step with ``s`` stages, ``R ≈ s·S`` plus
the vector field's own intermediates):

* forward: ``N`` bodies, plus ``O(max_steps / B)`` skipped blocks (a few scalar operations each);
* reverse: the ``ceil(N / B)`` blocks that ran are recomputed once (``N`` more bodies) and
  transposed, with at most ``B - 1`` skipped iterations in the last one; skipped blocks cost
  nothing;
* memory: the block inputs, ``(max_steps / B) · S``, plus the residuals of one block, ``B · R``
  — independent of ``N``. ``B = sqrt(max_steps · S / R)`` minimises it, ``2 sqrt(max_steps · S · R)``;
  the loop passes ``B = ceil(sqrt(max_steps / s))``, i.e. ``O(sqrt(max_steps · s) · S)`` memory.

Under ``jax.vmap`` the skip predicates become batched and ``lax.cond`` turns into a select, so
there the cost is that of ``max_steps`` steps: batch the initial conditions into one state, or
lower ``max_steps``, when differentiating a vmapped solve in backprop mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import jax
from jax import lax

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

    def guarded(state, _):
        return lax.cond(cond(state), body, lambda s: s, state), None

    @jax.checkpoint
    def run(state):
        return lax.scan(guarded, state, None, length=block)[0]

    def run_block(state, _):
        return lax.cond(cond(state), run, lambda s: s, state), None

    return lax.scan(run_block, init, None, length=num_blocks)[0]
