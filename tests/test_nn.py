"""Tests of jaxode.nn: the fields, NeuralODE's gradients, composability and errors."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpy.testing import assert_allclose

import jaxode
from jaxode.nn import ConcatSquashField, MLPField, NeuralODE, ODEBlock

# The project's tests run in float64 (tests/conftest.py); set here too so this file runs alone.
jax.config.update("jax_enable_x64", True)

TS = jnp.linspace(0.0, 1.0, 6)
Z0 = jnp.array([0.7, -0.4])


def small_field(seed=0, **kw):
    kw = {"width": 8, "depth": 2, **kw}
    return MLPField(2, key=jax.random.key(seed), **kw)


def tree_allclose(a, b, **kw):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb) and la
    for x, y in zip(la, lb, strict=True):
        assert_allclose(np.asarray(x), np.asarray(y), **kw)


# ---------------------------------------------------------------- fields


@pytest.mark.parametrize("cls", [MLPField, ConcatSquashField])
@pytest.mark.parametrize("shape", [(3,), (5, 3), (2, 4, 3)])
def test_field_output_shape_and_dtype(cls, shape):
    f = cls(3, width=7, depth=2, key=jax.random.key(0))
    z = jax.random.normal(jax.random.key(1), shape)
    out = f(z, 0.3)
    assert out.shape == shape and out.dtype == z.dtype
    # leading axes are a batch: each row is the field of that row alone
    flat = z.reshape(-1, 3)
    rows = jnp.stack([f(r, 0.3) for r in flat])
    assert_allclose(np.asarray(out).reshape(-1, 3), np.asarray(rows), rtol=1e-12, atol=1e-14)


def test_field_float32_state_with_float64_weights():
    f = small_field()  # float64 weights under x64
    z = jnp.array([0.1, 0.2], jnp.float32)
    assert f(z, 0.0).dtype == jnp.float32


def test_mlp_field_math_depth0_and_depth1():
    f0 = MLPField(2, width=5, depth=0, key=jax.random.key(0))
    (lin,) = f0.layers
    z, t = jnp.array([0.3, -1.2]), 0.7
    assert_allclose(f0(z, t), lin.weight @ jnp.array([0.3, -1.2, 0.7]) + lin.bias, rtol=1e-13)

    f1 = MLPField(2, width=5, depth=1, activation=jnp.sin, key=jax.random.key(1))
    l1, l2 = f1.layers
    assert l1.weight.shape == (5, 3) and l2.weight.shape == (2, 5)
    expected = l2.weight @ jnp.sin(l1.weight @ jnp.array([0.3, -1.2, 0.7]) + l1.bias) + l2.bias
    assert_allclose(f1(z, t), expected, rtol=1e-13)


def test_mlp_field_time_dependence_and_autonomous():
    f = small_field()
    assert not np.allclose(f(Z0, 0.0), f(Z0, 1.0))
    fa = small_field(autonomous=True)
    assert fa.layers[0].weight.shape == (8, 2)
    assert_allclose(fa(Z0, 0.0), fa(Z0, 5.0), rtol=0, atol=0)


def test_mlp_field_scale_shrinks_output_layer():
    f1, f2 = small_field(), small_field(scale=0.01)
    assert_allclose(f2.layers[-1].weight, 0.01 * f1.layers[-1].weight, rtol=1e-14)
    tree_allclose(f1.layers[:-1], f2.layers[:-1], rtol=0, atol=0)


def test_concat_squash_math():
    f = ConcatSquashField(2, width=4, depth=0, key=jax.random.key(3))
    (layer,) = f.layers
    z, t = jnp.array([0.3, -1.2]), 0.7
    w, b = layer.linear.weight, layer.linear.bias
    wg, bg = layer.gate.weight[:, 0], layer.gate.bias
    wb = layer.hyper_bias.weight[:, 0]
    assert layer.hyper_bias.bias is None
    expected = (w @ z + b) * jax.nn.sigmoid(wg * t + bg) + wb * t
    assert_allclose(f(z, t), expected, rtol=1e-13)

    g = ConcatSquashField(2, width=4, depth=1, activation=jnp.tanh, key=jax.random.key(4))
    l1, l2 = g.layers

    def cs(layer, h):
        return (layer.linear.weight @ h + layer.linear.bias) * jax.nn.sigmoid(
            layer.gate.weight[:, 0] * t + layer.gate.bias
        ) + layer.hyper_bias.weight[:, 0] * t

    assert_allclose(g(z, t), cs(l2, jnp.tanh(cs(l1, z))), rtol=1e-13)


# ---------------------------------------------------------------- NeuralODE: values and gradients


def test_neural_ode_outputs_match_odesolve():
    f = small_field()
    ys = jaxode.odesolve(f, Z0, TS, None, rtol=1e-8, atol=1e-8)
    node = NeuralODE(f, ts=TS, rtol=1e-8, atol=1e-8)
    assert_allclose(node(Z0), ys, rtol=0, atol=0)
    interval = NeuralODE(f, t0=0.0, t1=1.0, rtol=1e-8, atol=1e-8)
    out = interval(Z0)
    assert out.shape == Z0.shape
    ys2 = jaxode.odesolve(f, Z0, jnp.array([0.0, 1.0]), None, rtol=1e-8, atol=1e-8)
    assert_allclose(out, ys2[-1], rtol=0, atol=0)
    assert ODEBlock is NeuralODE
    assert interval.t0 == 0.0 and interval.t1 == 1.0


@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_neural_ode_gradients_equal_direct_odesolve(gradient):
    f = small_field()
    opts = dict(rtol=1e-9, atol=1e-9, gradient=gradient)
    weights = jnp.linspace(0.5, 1.5, len(TS))[:, None]
    node = NeuralODE(f, ts=TS, **opts)

    def loss_node(node, z0):
        return jnp.sum(weights * node(z0) ** 2)

    def loss_direct(field, z0):  # the field held by f: odesolve hoists its arrays
        return jnp.sum(weights * jaxode.odesolve(field, z0, TS, None, **opts) ** 2)

    def grad(loss, m):  # gradients with respect to the module's arrays and z0
        return eqx.filter_jit(eqx.filter_grad(lambda mz: loss(*mz)))((m, Z0))

    g_node, gz_node = grad(loss_node, node)
    g_direct, gz_direct = grad(loss_direct, f)
    assert jax.tree_util.tree_structure(g_node.field) == jax.tree_util.tree_structure(g_direct)
    tree_allclose(g_node.field, g_direct, rtol=1e-12, atol=1e-14)
    assert_allclose(gz_node, gz_direct, rtol=1e-12, atol=1e-14)
    # and the gradient is not trivially zero
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(g_node.field)) > 1e-3


def test_gradient_option_passes_through():
    """Each mode reaches odesolve: "backprop" differentiates through the solver, so forward
    mode works and its tangent is the derivative (a central difference along the tangent);
    "adjoint" and "checkpoint" are reverse-only custom_vjps, which JAX refuses to jvp."""
    f = small_field()
    tangent = jax.tree_util.tree_map(lambda w: jnp.linspace(-1.0, 1.0, w.size).reshape(w.shape), f)
    run = lambda m, gradient: NeuralODE(m, ts=TS, gradient=gradient, rtol=1e-11, atol=1e-11)(Z0)
    primal, tan = jax.jvp(lambda m: run(m, "backprop"), (f,), (tangent,))
    shifted = lambda eps: run(jax.tree_util.tree_map(lambda w, v: w + eps * v, f, tangent), "backprop")
    assert_allclose(primal, run(f, "adjoint"), rtol=0, atol=0)  # the same forward solve
    assert_allclose(tan, (shifted(1e-6) - shifted(-1e-6)) / 2e-6, rtol=1e-6, atol=1e-8)
    assert float(jnp.max(jnp.abs(tan))) > 1e-2
    for mode in ("adjoint", "checkpoint"):
        with pytest.raises(TypeError, match="custom_vjp"):
            jax.jvp(lambda m, mode=mode: run(m, mode), (f,), (tangent,))



def test_reversible_coupling_reaches_odesolve():
    """``reversible_coupling`` is odesolve's λ: the outputs equal odesolve's with the same λ
    (and differ between two λ), and the gradients (field weights and z0) equal odesolve's.
    Coarse Euler steps, so that ``y`` and ``ŷ`` differ and λ visibly enters."""
    f = small_field()
    opts = dict(solver="euler", dt0=0.1, gradient="reversible")
    weights = jnp.linspace(0.5, 1.5, len(TS))[:, None]

    def grad(loss, m):
        return eqx.filter_jit(eqx.filter_grad(lambda mz: loss(*mz)))((m, Z0))

    outs = {}
    for lam in (0.5, 1.0):
        node = NeuralODE(f, ts=TS, reversible_coupling=lam, **opts)
        assert node.options.reversible_coupling == lam
        direct = lambda field, z0, lam=lam: jaxode.odesolve(
            field, z0, TS, None, reversible_coupling=lam, **opts)
        outs[lam] = node(Z0)
        assert_allclose(outs[lam], direct(f, Z0), rtol=0, atol=0)
        g_node, gz_node = grad(lambda m, z0: jnp.sum(weights * m(z0) ** 2), node)
        g_direct, gz_direct = grad(lambda m, z0, direct=direct: jnp.sum(weights * direct(m, z0) ** 2), f)
        tree_allclose(g_node.field, g_direct, rtol=1e-12, atol=1e-14)
        assert_allclose(gz_node, gz_direct, rtol=1e-12, atol=1e-14)
    assert float(jnp.max(jnp.abs(outs[0.5] - outs[1.0]))) > 1e-4  # λ changes the solve
    assert NeuralODE(f, ts=TS).options.reversible_coupling == 0.999  # odesolve's default

def test_only_field_weights_are_trainable_arrays():
    f = small_field()
    node = NeuralODE(f, ts=TS)
    leaves = jax.tree_util.tree_leaves(eqx.filter(node, eqx.is_inexact_array))
    assert len(leaves) == len(jax.tree_util.tree_leaves(eqx.filter(f, eqx.is_inexact_array))) == 6


@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_gradient_matches_central_finite_differences(gradient):
    field = MLPField(2, width=3, depth=1, key=jax.random.key(7))
    if gradient == "backprop":  # the exact derivative of a fixed-step solve
        opts, tol = dict(solver="rk4", dt0=0.05), dict(rtol=1e-7, atol=1e-10)
    else:  # the continuous adjoint: matches up to the solver tolerance
        opts, tol = dict(solver="dopri8", rtol=1e-12, atol=1e-12), dict(rtol=1e-5, atol=1e-8)
    node = NeuralODE(field, ts=jnp.array([0.0, 0.5, 1.0]), gradient=gradient, **opts)

    def loss(theta):
        m = eqx.combine(unravel(theta), static)
        ys = m(Z0)
        return jnp.sum(ys[1:] ** 2) + jnp.sum(jnp.sin(ys[-1]))

    from jax.flatten_util import ravel_pytree

    params, static = eqx.partition(node, eqx.is_inexact_array)
    theta, unravel = ravel_pytree(params)
    assert theta.shape == (3 * 3 + 3 + 2 * 3 + 2,)
    grad = jax.jit(jax.grad(loss))(theta)
    loss = jax.jit(loss)
    eps = 1e-6
    fd = np.array([(loss(theta.at[i].add(eps)) - loss(theta.at[i].add(-eps))) / (2 * eps)
                   for i in range(theta.shape[0])])
    assert_allclose(np.asarray(grad), fd, **tol)


# ---------------------------------------------------------------- composability


class Model(eqx.Module):
    """A larger Equinox model with a NeuralODE layer inside."""

    encoder: eqx.nn.Linear
    ode: NeuralODE
    readout: eqx.nn.Linear

    def __init__(self, key, gradient):
        k1, k2, k3 = jax.random.split(key, 3)
        self.encoder = eqx.nn.Linear(3, 4, key=k1)
        # a small max_steps: under vmap, backprop's loop costs max_steps steps (jaxode.while_loops)
        self.ode = NeuralODE(
            MLPField(4, width=8, depth=1, key=k2), rtol=1e-5, atol=1e-5, gradient=gradient, max_steps=64
        )
        self.readout = eqx.nn.Linear(4, 1, key=k3)

    def __call__(self, x):
        return self.readout(self.ode(self.encoder(x)))[0]


@pytest.mark.parametrize("gradient", ["adjoint", "backprop"])
def test_filter_jit_grad_optax_reduces_loss(gradient):
    x = jax.random.normal(jax.random.key(0), (16, 3))
    y = jnp.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2]
    model = Model(jax.random.key(1), gradient)

    def loss_fn(model):
        return jnp.mean((eqx.filter_vmap(model)(x) - y) ** 2)

    optim = optax.adam(1e-2)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        # the ODE layer's weights get a nonzero gradient
        g_ode = jax.tree_util.tree_leaves(eqx.filter(grads.ode, eqx.is_inexact_array))
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt_state, loss, sum(jnp.sum(g**2) for g in g_ode)

    field_before = model.ode.field
    losses = []
    for _ in range(30):
        model, opt_state, loss, g_ode = step(model, opt_state)
        losses.append(float(loss))
        assert float(g_ode) > 0
    assert losses[-1] < 0.5 * losses[0]
    assert not np.allclose(model.ode.field.layers[0].weight, field_before.layers[0].weight)


def test_filter_vmap_equals_loop():
    node = NeuralODE(small_field(), ts=TS, rtol=1e-8, atol=1e-8)
    z0s = jax.random.normal(jax.random.key(2), (5, 2))
    batched = eqx.filter_vmap(node)(z0s)
    solve = eqx.filter_jit(lambda node, z: node(z))  # one compilation for the loop
    loop = jnp.stack([solve(node, z) for z in z0s])
    assert batched.shape == (5, len(TS), 2)
    assert_allclose(batched, loop, rtol=1e-12, atol=1e-13)
    # the batch as one (B, d) state: shared steps, same answers to within the tolerance
    joint = node(z0s)
    assert joint.shape == (len(TS), 5, 2)
    assert_allclose(jnp.swapaxes(joint, 0, 1), loop, rtol=1e-5, atol=1e-6)


def test_batched_option_equals_filter_vmap():
    f = small_field()
    opts = dict(rtol=1e-8, atol=1e-8)
    z0s = jax.random.normal(jax.random.key(5), (3, 2))

    @eqx.filter_jit
    def run(node_b, node_v):  # outputs and adjoint gradients, batched=True vs filter_vmap
        g_b = eqx.filter_grad(lambda m: jnp.sum(m(z0s)[..., 0] ** 2))(node_b)
        g_v = eqx.filter_grad(lambda m: jnp.sum(eqx.filter_vmap(m)(z0s)[..., 0] ** 2))(node_v)
        return node_b(z0s), eqx.filter_vmap(node_v)(z0s), g_b.field, g_v.field

    ys_b, ys_v, g_b, g_v = run(NeuralODE(f, TS, batched=True, **opts), NeuralODE(f, TS, **opts))
    assert ys_b.shape == (3, len(TS), 2)
    assert_allclose(ys_b, ys_v, rtol=1e-12, atol=1e-13)
    tree_allclose(g_b, g_v, rtol=1e-6, atol=1e-9)
    # the interval mode returns z(t1) per problem
    z1 = eqx.filter_jit(lambda m: m(z0s))(NeuralODE(f, batched=True, **opts))
    assert z1.shape == (3, 2)
    assert_allclose(z1, ys_b[:, -1], rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="leading batch axis"):
        NeuralODE(f, batched=True)(jnp.float64(1.0))


def test_filter_vmap_over_times_and_jit_no_recompile():
    node = NeuralODE(small_field(), ts=TS, rtol=1e-8, atol=1e-8)
    starts = jnp.array([0.0, 0.3, 1.1])
    ts_batch = starts[:, None] + jnp.linspace(0.0, 0.5, 4)[None, :]
    z0s = jax.random.normal(jax.random.key(3), (3, 2))
    traces = []

    @eqx.filter_jit
    def run(node, z0s, ts_batch):
        traces.append(1)
        return eqx.filter_vmap(lambda z, t: node(z, t))(z0s, ts_batch)

    out = run(node, z0s, ts_batch)
    run(node, z0s + 1.0, ts_batch + 0.1)
    assert len(traces) == 1
    for i in range(3):
        ref = jaxode.odesolve(node.field, z0s[i], ts_batch[i], None, rtol=1e-8, atol=1e-8)
        assert_allclose(out[i], ref, rtol=1e-12, atol=1e-13)


def test_full_output_and_pytree_state():
    node = NeuralODE(small_field(), ts=TS, full_output=True)
    ys, info = node(Z0)
    assert ys.shape == (len(TS), 2) and int(info.nfe) > 0 and int(info.status) == 0
    assert int(info.num_steps) == int(info.num_accepted) + int(info.num_rejected)
    ys2 = node(Z0, full_output=False)
    assert_allclose(ys2, ys, rtol=0, atol=0)

    def rotation(z, t, params):
        return {"x": -z["y"], "y": z["x"]}

    out = NeuralODE(rotation, t0=0.0, t1=jnp.pi / 2, rtol=1e-10, atol=1e-10)({"x": jnp.array(1.0),
                                                                              "y": jnp.array(0.0)})
    assert_allclose(out["x"], 0.0, atol=1e-8)
    assert_allclose(out["y"], 1.0, atol=1e-8)


# ---------------------------------------------------------------- errors


def test_unknown_solver_lists_names():
    with pytest.raises(ValueError, match="unknown solver 'rk45'") as e:
        NeuralODE(small_field(), solver="rk45")
    for name in ("euler", "rk4", "tsit5", "dopri5", "dopri8"):
        assert name in str(e.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(t0=1.0, t1=1.0), "empty interval"),
        (dict(ts=[0.0, 0.5, 0.4, 1.0]), "strictly increasing or strictly decreasing"),
        (dict(ts=[0.0, 0.0, 1.0]), "strictly increasing or strictly decreasing"),
        (dict(ts=[0.0]), "at least two times"),
        (dict(ts=[[0.0, 1.0]]), "1-D"),
        (dict(ts=[0.0, np.nan]), "finite"),
        (dict(rtol=-1e-3), "rtol must be >= 0"),
        (dict(gradient="forward"), "unknown gradient mode"),
        (dict(solver="rk4"), "pass dt0"),
        (dict(solver="euler", dt0=-0.1), "dt0 must be > 0"),
        (dict(max_steps=0), "max_steps"),
        (dict(adjoint_atol=-1.0), "adjoint_atol must be >= 0"),
        (dict(reversible_coupling=1.5), r"reversible_coupling must be in \(0, 1\]"),
        (dict(reversible_coupling=0.0, gradient="reversible"), r"reversible_coupling must be in \(0, 1\]"),
    ],
)
def test_bad_configuration_raises_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeuralODE(small_field(), **kwargs)


def test_backwards_interval_is_allowed():
    f = small_field()
    back = NeuralODE(f, t0=1.0, t1=0.0, rtol=1e-10, atol=1e-10)
    fwd = NeuralODE(f, t0=0.0, t1=1.0, rtol=1e-10, atol=1e-10)
    assert_allclose(back(fwd(Z0)), Z0, rtol=1e-7, atol=1e-8)


def test_field_output_shape_mismatch_names_shapes():
    def bad(z, t, params):
        return jnp.concatenate([z, z])

    node = NeuralODE(bad, ts=TS)
    with pytest.raises(ValueError, match=r"state of shape \(2,\) to an output of shape \(4,\)"):
        node(Z0)


def test_state_size_mismatch_names_shapes():
    node = NeuralODE(MLPField(3, width=4, key=jax.random.key(0)), ts=TS)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\).*got z of shape \(2,\)"):
        node(Z0)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3\).*shape \(2,\)"):
        ConcatSquashField(3, key=jax.random.key(0))(Z0, 0.0)


def test_field_raising_other_errors_is_reported_with_state_shape():
    w = jnp.ones((3, 3))

    def bad(z, t, params):
        return w @ z  # (3, 3) @ (2,): a shape error inside the field

    with pytest.raises(TypeError, match=r"NeuralODE: the vector field failed on a state of shape \(2,\)"):
        NeuralODE(bad, ts=TS)(Z0)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(width=0), "width"), (dict(depth=-1), "depth"), (dict(width=2.5), "width")],
)
def test_bad_field_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MLPField(2, key=jax.random.key(0), **kwargs)
    with pytest.raises(ValueError, match=match):
        ConcatSquashField(2, key=jax.random.key(0), **kwargs)


def test_non_callable_field_and_integer_state():
    with pytest.raises(TypeError, match="callable"):
        NeuralODE(jnp.ones(3))
    with pytest.raises(TypeError, match="floating-point"):
        NeuralODE(small_field())(jnp.array([1, 2]))
