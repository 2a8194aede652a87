"""The drivers (``jaxode.drivers``) run the same loop: equal results and statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import reference

from jaxode import drivers
from jaxode.loop import info_of
from jaxode.methods import METHODS


def _field(y, t):
    return jnp.stack([y[1], -y[0] - 0.1 * y[1] + jnp.cos(t)])


@pytest.mark.parametrize("name", ["tsit5", pytest.param("dopri8", marks=pytest.mark.slow), "rk4"])
@pytest.mark.parametrize("options", [{}, {"max_dt": 0.3, "jump_ts": jnp.array([1.1, 2.5])}])
def test_drivers_agree(name, options):
    ts = jnp.concatenate([jnp.linspace(0.0, 0.1, 9), jnp.array([2.0, 4.0])])
    y0 = jnp.array([1.0, 0.0])
    dt0 = 0.05 if name == "rk4" else None
    opts = dict(method=METHODS[name], max_steps=500, **options)
    run = lambda driver: drivers.integrate(_field, y0, ts, 1e-8, 1e-8, dt0, driver=driver, **opts)
    results = {d: jax.jit(lambda d=d: run(d))() for d in ("nested", "flat", "backprop", "checkpoint")}
    ref = results["flat"]
    exact = reference(lambda t, y: np.asarray(_field(jnp.asarray(y), t)), y0, ts)
    np.testing.assert_allclose(ref.ys, exact, atol=1e-5 if name == "rk4" else 1e-6)
    for driver, state in results.items():
        np.testing.assert_allclose(state.ys, ref.ys, rtol=1e-12, atol=1e-14, err_msg=driver)
        for field in ("num_steps", "num_rejected", "nfe", "status"):
            got, want = getattr(info_of(state, 1), field), getattr(info_of(ref, 1), field)
            assert int(got) == int(want), (driver, field)


def test_backprop_solve_of_a_field_jax_cannot_differentiate():
    """``gradient="backprop"`` sizes its blocks from the field's measured residuals, a
    ``jax.vjp`` traced at trace time; a field JAX cannot differentiate (a ``pure_callback``)
    must still solve when nothing differentiates it (it raised "Pure callbacks do not support
    JVP" at that measurement)."""
    import jaxode

    def f(z, t, k):
        return jax.pure_callback(lambda z: -np.asarray(z), jax.ShapeDtypeStruct(z.shape, z.dtype), z)

    ts = jnp.array([0.0, 1.0])
    ys = jaxode.odesolve(f, jnp.ones(2), ts, None, gradient="backprop", rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(np.asarray(ys)[-1], np.exp(-1.0) * np.ones(2), rtol=1e-6)
