"""Where gradient="reversible" fits (jaxode/methods/reversible.py, the stability analysis): on a
non-dissipative field its gradient error is that of "checkpoint" (both exact derivatives of
their own solutions, so both are off the true gradient by the discretisation); on a
dissipative one its parasitic mode makes it far less accurate. Errors against a float64
reference at rtol = atol = 1e-12 (dopri5 "checkpoint", whose own error is ~1e-10 here).
The full measurement (float32 too, t1 = 64, the spiral) is benchmarks/reversible.py --fits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxode

jax.config.update("jax_enable_x64", True)

_RNG = np.random.default_rng(0)
PARAMS = (jnp.asarray(_RNG.normal(0.0, 0.75, (4, 8))), jnp.asarray(_RNG.uniform(0.5, 1.5, 8)),
          jnp.asarray(_RNG.normal(0.0, 0.1, 8)))
Z0 = jnp.asarray(_RNG.normal(size=(4,)))


def hamiltonian(z, t, params):
    """``J ∇H``, ``H(z) = |z|²/2 + Σ_k a_k log cosh(w_k · z + b_k)``, ``a > 0``: ``∇²H`` is
    positive definite, so the Jacobian ``J ∇²H`` has imaginary eigenvalues: nothing decays."""
    w, a, b = params
    grad_h = z + (a * jnp.tanh(z @ w + b)) @ w.T
    dq, dp = jnp.split(grad_h, 2)
    return jnp.concatenate([dp, -dq])


def damped(z, t, params):
    """The same field minus ``2 z``: every mode decays at rate about 2."""
    return hamiltonian(z, t, params) - 2.0 * z


def _gradients(field, t1):
    """``mode -> jit(grad)(params, tol)`` of ``Σ ys²`` over 5 outputs on ``[0, t1]`` (dopri5)."""
    ts = jnp.linspace(0.0, t1, 5)

    def grad(mode):
        loss = lambda p, tol: jnp.sum(jaxode.odesolve(field, Z0, ts, p, rtol=tol, atol=tol, solver="dopri5",
                                                      gradient=mode, max_steps=100_000) ** 2)
        return jax.jit(jax.grad(loss))

    return {mode: grad(mode) for mode in ("reversible", "checkpoint")}


def _errors(field, t1, tolerances):
    """``{tol: (reversible's relative gradient error, checkpoint's)}``."""
    grads = _gradients(field, t1)
    flat = lambda g: np.concatenate([np.ravel(x) for x in g])
    ref = flat(grads["checkpoint"](PARAMS, 1e-12))
    err = lambda mode, tol: np.linalg.norm(flat(grads[mode](PARAMS, tol)) - ref) / np.linalg.norm(ref)
    return {tol: (err("reversible", tol), err("checkpoint", tol)) for tol in tolerances}


def test_non_dissipative_gradient_error_is_that_of_checkpoint():
    errors = _errors(hamiltonian, 16.0, (1e-6, 1e-8))
    for tol, (rev, ckpt) in errors.items():
        assert rev <= 3 * ckpt, (tol, rev, ckpt)
    assert errors[1e-8][0] < errors[1e-6][0] / 10  # and it falls with the tolerance


@pytest.mark.slow
def test_dissipative_gradient_error_is_far_above_checkpoints():
    """The documented limitation: with modes decaying faster than ``-ln λ`` per step the
    parasitic mode grows, whatever the tolerance."""
    ((rev, ckpt),) = _errors(damped, 4.0, (1e-8,)).values()
    assert ckpt < 1e-6
    assert rev > 100 * ckpt, (rev, ckpt)
