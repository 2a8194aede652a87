"""The cost of events under ``jax.vmap``: what a step without an event spends on them.

Under ``jax.vmap`` a ``lax.cond`` on a batched predicate runs both branches; the events' root
finders and the restart after a non-terminal event must not run at every step because of it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from grad_utils import sub_jaxprs

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
    """For each root finder in ``jaxpr`` (``events.root``: a ``custom_jvp`` around a
    ``while_loop``): whether it runs inside a loop (``while_loop`` or ``scan``)."""
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        inner = [e.primitive.name for sub in sub_jaxprs(eqn) for e in sub.eqns]
        if name == "custom_jvp_call" and "while" in inner:
            found.append(inside_loop)
        for sub in sub_jaxprs(eqn):
            _root_finders(sub, inside_loop or name in ("while", "scan"), found)
    return found


@pytest.mark.parametrize("mode", ["backprop", "checkpoint", "adjoint"])
def test_terminal_events_are_located_after_the_loop(mode):
    """With terminal events only, the root finders run once, after the loop: under jax.vmap
    they no longer run in every step in which some problem's event fired. With a
    non-terminal event (here one that never fires) they run in the step, where a reset needs
    them."""

    def root_finders(events):
        def one(h):
            _, info = jaxode.odesolve(lambda z, t, g: jnp.stack([z[1], -g * jnp.ones_like(z[0])]),
                                      jnp.stack([h, 0.0]), jnp.array([0.0, 3.0]), G, events=events,
                                      gradient=mode, full_output=True)
            return info.event_time

        return _root_finders(jax.make_jaxpr(jax.vmap(one))(jnp.array([1.0, 5.0])).jaxpr)

    ground = jaxode.Event(lambda z, t, g: z[0])
    never = jaxode.Event(lambda z, t, g: z[0] + 1e6, terminal=False)
    assert root_finders([ground]) == [False]
    assert root_finders([ground, never]) == [True, True]
