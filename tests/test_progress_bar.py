"""``progress=True``: a tqdm bar appears, reaches the end, and the results are unchanged."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxode


def _field(z, t, p):
    return jnp.stack([z[1], -p * jnp.sin(z[0])])


@pytest.mark.parametrize("gradient", ["adjoint", pytest.param("backprop", marks=pytest.mark.slow)])
def test_progress_bar_appears_and_leaves_results_unchanged(capsys, gradient):
    ts = jnp.linspace(0.0, 20.0, 5)
    z0 = jnp.array([1.0, 0.0])
    plain, info = jaxode.odesolve(_field, z0, ts, 3.0, full_output=True, gradient=gradient)
    capsys.readouterr()
    opts = dict(full_output=True, progress=True, gradient=gradient)
    shown, shown_info = jaxode.odesolve(_field, z0, ts, 3.0, **opts)
    jax.effects_barrier()
    err = capsys.readouterr().err
    assert "jaxode t=20: 100%" in err
    np.testing.assert_array_equal(shown, plain)
    assert int(shown_info.num_steps) == int(info.num_steps)
    g = jax.grad(lambda p: jaxode.odesolve(_field, z0, ts, p, progress=True, gradient=gradient)[-1, 0])(3.0)
    g0 = jax.grad(lambda p: jaxode.odesolve(_field, z0, ts, p, gradient=gradient)[-1, 0])(3.0)
    np.testing.assert_allclose(g, g0, rtol=1e-13)


def test_progress_bar_backwards_and_off_by_default(capsys):
    ts = jnp.array([5.0, 0.0])
    jaxode.odesolve(_field, jnp.array([1.0, 0.0]), ts, 3.0, progress=True)
    jax.effects_barrier()
    err = capsys.readouterr().err
    assert "jaxode t=0: 100%" in err
    jaxode.odesolve(_field, jnp.array([1.0, 0.0]), ts, 3.0)
    jax.effects_barrier()
    assert capsys.readouterr().err == ""
    def debug_callbacks(progress):
        jaxpr = jax.make_jaxpr(lambda z: jaxode.odesolve(_field, z, ts, 3.0, progress=progress))(jnp.ones(2))
        return str(jaxpr).count("debug_callback")

    assert debug_callbacks(False) == 0 < debug_callbacks(True)  # no cost when off: nothing of it is traced
