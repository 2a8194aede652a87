"""Shared problems and finite-difference helpers for the gradient tests (float64)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

TOL = dict(rtol=1e-10, atol=1e-10)


def forced_oscillator(z, t, p):
    """A nonlinear, non-autonomous field with dict parameters: a damped, driven pendulum."""
    theta, omega = z[0], z[1]
    return jnp.stack([p["a"] * omega, -p["b"] * jnp.sin(theta) - 0.1 * omega + 0.3 * jnp.cos(p["w"] * t)])


PARAMS = {"a": jnp.array(1.1), "b": jnp.array(2.0), "w": jnp.array(1.3)}
Z0 = jnp.array([0.8, -0.3])
TS = jnp.array([0.0, 0.4, 1.1, 1.7, 2.5])
WEIGHTS = jnp.arange(1.0, 6.0)[:, None] * jnp.array([1.0, -0.5])


def weighted_loss(ys):
    """A loss on every output time, so each cotangent ∂L/∂ys[i] matters."""
    return jnp.sum(WEIGHTS * ys**2) + jnp.sum(jnp.sin(ys))


def central_difference(fun, x, eps=1e-6):
    """The gradient of scalar ``fun`` at the pytree ``x`` by central differences, leaf by leaf
    (in float64; a float64 array leaf keeps its weak type, or each perturbed leaf would be a new
    compile of the solve that ``fun`` calls)."""
    leaves, treedef = jax.tree_util.tree_flatten(x)
    grads = []
    for i, leaf in enumerate(leaves):
        g = np.zeros(np.shape(leaf), dtype=np.float64)
        for j in range(g.size):
            plus = leaves[:i] + [_moved(leaf, j, eps)] + leaves[i + 1 :]
            minus = leaves[:i] + [_moved(leaf, j, -eps)] + leaves[i + 1 :]
            g.flat[j] = (fun(treedef.unflatten(plus)) - fun(treedef.unflatten(minus))) / (2 * eps)
        grads.append(g)
    return treedef.unflatten(grads)


def _moved(leaf, j, delta):
    """``leaf`` with its ``j``-th element moved by ``delta``, as a float64 array."""
    if isinstance(leaf, jax.Array) and leaf.dtype == jnp.float64:
        return leaf.reshape(-1).at[j].add(delta).reshape(leaf.shape)  # dtype and weak type kept
    moved = np.array(leaf, dtype=np.float64)
    moved.flat[j] += delta
    return jnp.asarray(moved)


def directional_difference(fun, x, direction, eps=1e-6):
    """``d/dε fun(x + ε v)`` at 0 by a central difference (for many-parameter models)."""
    shift = lambda s: jax.tree_util.tree_map(lambda a, v: a + s * v, x, direction)
    return (fun(shift(eps)) - fun(shift(-eps))) / (2 * eps)


def relative_error(a, b):
    a = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(a)])
    b = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(b)])
    return np.linalg.norm(a - b) / np.linalg.norm(b)


class TimeMLP(eqx.Module):
    """A small Equinox MLP field ``f(z, t) = MLP([z, t])`` that holds its weights."""

    mlp: eqx.nn.MLP

    def __init__(self, dim, key):
        self.mlp = eqx.nn.MLP(dim + 1, dim, 8, 2, activation=jnp.tanh, key=key)

    def __call__(self, z, t, params=None):
        return self.mlp(jnp.concatenate([z, jnp.reshape(t, (1,)).astype(z.dtype)]))


def random_like(tree, key):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    draws = [jax.random.normal(k, jnp.shape(x), jnp.result_type(x)) for k, x in zip(keys, leaves)]
    return treedef.unflatten(draws)


def impact_exact(h, g):
    """The falling ball's impact time and velocity, from rest at height ``h``."""
    t = jnp.sqrt(2 * h / g)
    return t, -g * t


def bouncing_exact(h, g, e, t, bounces: int):
    """Height, and time of the last bounce, at ``t`` after ``bounces >= 1`` bounces of a ball
    dropped from rest at ``h`` (each bounce takes ``2 e^k v1 / g``: a geometric series in ``e``)."""
    t1 = jnp.sqrt(2 * h / g)
    v1 = g * t1
    tk = t1 + sum(2 * e**j * v1 / g for j in range(1, bounces))
    s = t - tk
    return e**bounces * v1 * s - g * s**2 / 2, tk


def sub_jaxprs(eqn) -> list:
    """The jaxprs an equation holds (a loop's cond and body, a cond's branches, a call's)."""
    out = []
    for value in eqn.params.values():
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, jax.extend.core.ClosedJaxpr):
                out.append(v.jaxpr)
            elif isinstance(v, jax.extend.core.Jaxpr):
                out.append(v)
    return out
