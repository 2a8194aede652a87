"""The cost of events under ``jax.vmap``: what a step without an event spends on them.

Under ``jax.vmap`` a ``lax.cond`` on a batched predicate runs both branches; the events' root
finders and the restart after a non-terminal event must not run at every step because of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxode

G = 9.81
pytestmark = pytest.mark.usefixtures("optimized")  # counts what runs once XLA has pruned the program


def _counts(mode, batched):
    """Field and condition evaluations of a falling-ball solve with a terminal event (one
    problem, or a batch of one under jax.vmap), its impact time and its nfe."""
    field_calls, condition_calls = [], []

    def field(z, t, g):
        jax.debug.callback(lambda: field_calls.append(1), ordered=True)
        return jnp.stack([z[1], -g * jnp.ones_like(z[0])])

    def condition(z, t, g):
        jax.debug.callback(lambda: condition_calls.append(1), ordered=True)
        return z[0]

    def impact(h):
        _, info = jaxode.odesolve(field, jnp.stack([h, 0.0]), jnp.array([0.0, 3.0]), G,
                                  events=jaxode.Event(condition), solver="tsit5", rtol=1e-6, atol=1e-6,
                                  gradient=mode, full_output=True)
        return info.event_time, info.nfe

    h = jnp.array([5.0])
    fn = jax.jit(jax.vmap(impact)) if batched else jax.jit(lambda h: impact(h[0]))
    t_star, nfe = fn(h)
    jax.effects_barrier()
    return float(np.ravel(t_star)[0]), int(np.ravel(nfe)[0]), len(field_calls), len(condition_calls)


@pytest.mark.parametrize("mode", ["backprop", "checkpoint", "adjoint"])
def test_vmap_adds_no_field_or_condition_evaluations(mode):
    """A batch of one under jax.vmap evaluates the field and the condition as often as the
    unbatched solve (before: the restart after a non-terminal event, one field evaluation, was
    computed at every step although every event is terminal, and a root finder ran at every
    step although none fired); the field as often as nfe says; the impact time is sqrt(2h/g)."""
    single, batched = _counts(mode, False), _counts(mode, True)
    t_star, nfe, field_calls, condition_calls = batched
    assert t_star == pytest.approx(np.sqrt(2 * 5.0 / G), rel=1e-12)
    assert single == batched
    assert field_calls == nfe


def _root_finders(jaxpr, inside_loop=False, found=None):
    """For each root finder (``events.root``, a ``custom_jvp``) in ``jaxpr``: whether it runs
    inside a ``while_loop``."""
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "custom_jvp_call":
            found.append(inside_loop)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    _root_finders(sub, inside_loop or eqn.primitive.name == "while", found)
    return found


def test_terminal_events_are_located_after_the_loop_under_vmap():
    """The adjoint mode's forward solve locates terminal events once, after its loop: under
    jax.vmap the root finders no longer run in every step where some problem's event fired
    (before: inside the loop, as the checkpoint mode's differentiated loop still does)."""

    def impact(mode):
        def one(h):
            _, info = jaxode.odesolve(lambda z, t, g: jnp.stack([z[1], -g * jnp.ones_like(z[0])]),
                                      jnp.stack([h, 0.0]), jnp.array([0.0, 3.0]), G,
                                      events=jaxode.Event(lambda z, t, g: z[0]), gradient=mode,
                                      full_output=True)
            return info.event_time

        return jax.make_jaxpr(jax.vmap(one))(jnp.array([1.0, 5.0])).jaxpr

    adjoint, checkpoint = _root_finders(impact("adjoint")), _root_finders(impact("checkpoint"))
    assert adjoint and not any(adjoint)
    assert any(checkpoint)  # the walk sees a root finder inside a loop
