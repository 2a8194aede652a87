"""Data-parallel solves and training with ``jax.sharding`` on 4 (forced) host devices.

The pytest process has already initialised JAX with one CPU device, so every check runs in
one subprocess, this file run as a script with ``XLA_FLAGS=--xla_force_host_platform_
device_count=4`` and ``JAX_ENABLE_X64=1``: ``_child()`` computes the sharded and the
single-device results and prints their differences, output shardings and collective counts
as JSON; the tests below assert on them. The float64 problems are solved at tight
tolerances, so "equal" means equal to 1e-6 (usually to rounding).

Placement: a 1-D mesh ``"batch"`` of 4 devices; initial conditions / windows sharded along
the batch (``P("batch")``), parameters replicated (``P()``). The single-device reference is
the same jitted function called with every input on device 0.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "data_parallel.py"
NUM_DEVICES = 4
TOL = 1e-6


def _load_example():
    if str(EXAMPLE.parent) not in sys.path:
        sys.path.append(str(EXAMPLE.parent))  # the example imports its sibling ``_common``
    spec = importlib.util.spec_from_file_location("data_parallel_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- the subprocess


def _child() -> dict:  # noqa: C901 - one long script of checks, each recorded in `res`
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jaxode
    from jaxode.nn import MLPField, NeuralODE

    assert jax.config.jax_enable_x64, "the child needs JAX_ENABLE_X64=1"
    assert jax.device_count() == NUM_DEVICES, jax.devices()
    dp = _load_example()
    assert dp.FORCED is False  # XLA_FLAGS came from the parent: the example must not touch it

    mesh = dp.make_mesh()
    rows, rep = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
    dev0 = jax.devices()[0]
    res: dict = {"mesh": dict(mesh.shape)}

    def spec(x):
        s = tuple(x.sharding.spec) if isinstance(x.sharding, NamedSharding) else ("single",)
        return [None if e is None else str(e) for e in s + (None,) * (x.ndim - len(s))]

    def gathers(jitted, *args):
        return len(re.findall(r"all-gather(?:-start)?\(", jitted.lower(*args).compile().as_text()))

    def maxdiff(a, b):
        la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
        assert len(la) == len(lb)
        return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(la, lb))

    def compare(name, fn, sharded_args, hlo=True):
        """``fn`` jitted on the sharded inputs vs on the same inputs on device 0."""
        t0 = time.perf_counter()
        jf = jax.jit(fn)
        out = jf(*sharded_args)
        ref = jf(*jax.device_put(sharded_args, dev0))
        leaves = jax.tree_util.tree_leaves(out)
        res[name] = {
            "err": maxdiff(out, ref),
            "specs": [spec(x) for x in leaves],
            "devices": [len(x.sharding.device_set) for x in leaves],
            "shard_shapes": [list(x.addressable_shards[0].data.shape) for x in leaves],
            "finite": bool(all(jnp.all(jnp.isfinite(x)) for x in leaves)),
            "gathers": gathers(jf, *sharded_args) if hlo else None,
            "seconds": time.perf_counter() - t0,
        }
        return out, ref

    # --- odesolve: the spiral field, a batch of 8 initial conditions, both gradient modes.
    A = jnp.array([[-0.1, 2.0], [-2.0, -0.1]])
    field = lambda z, t, a: (z**3) @ a
    z0 = jnp.stack([jnp.array([2.0, 0.0]) * (0.5 + 0.15 * i) for i in range(8)])
    ts = jnp.linspace(0.0, 1.5, 4)
    tight = dict(rtol=1e-9, atol=1e-9)
    zs, As = jax.device_put(z0, rows), jax.device_put(A, rep)

    def with_grads(solve):
        """``(ys, ∂L/∂z0, ∂L/∂A)`` for ``L = Σ sin(ys)``."""

        def fn(z, a):
            def loss(z, a):
                ys = solve(z, a)
                return jnp.sum(jnp.sin(ys)), ys

            (_, ys), (gz, ga) = jax.value_and_grad(loss, (0, 1), has_aux=True)(z, a)
            return ys, gz, ga

        return fn

    vmapped = {}
    for mode in ("adjoint", "backprop"):
        opts = dict(tight, gradient=mode, max_steps=4096 if mode == "adjoint" else 400)
        solve = lambda z, a, opts=opts: jax.vmap(lambda zi: jaxode.odesolve(field, zi, ts, a, **opts))(z)
        _, vmapped[mode] = compare(f"vmap_{mode}", with_grads(solve), (zs, As))

    # batched=True (per-sample steps, one shared parameter adjoint); throw=False, see the docs.
    solve_b = lambda z, a: jaxode.odesolve(field, z, ts, a, batched=True, throw=False, **tight)
    _, batched_ref = compare("batched_adjoint", with_grads(solve_b), (zs, As))
    res["batched_vs_vmap_ys"] = maxdiff(batched_ref[0], vmapped["adjoint"][0])
    res["batched_vs_vmap_grads"] = maxdiff(batched_ref[1:], vmapped["adjoint"][1:])

    # One (B, d) state, one shared step size (an all-reduce of the error norm per step).
    solve_j = lambda z, a: jaxode.odesolve(field, z, ts, a, throw=False, gradient="backprop",
                                           max_steps=400, **tight)
    compare("joint_backprop", with_grads(solve_j), (zs, As))

    # batched=True with throw=True (the default) keeps the outputs sharded too.
    jf = jax.jit(lambda z, a: jaxode.odesolve(field, z, ts, a, batched=True, **tight))
    out = jf(zs, As)
    res["batched_throw_true"] = {"specs": [spec(out)], "gathers": gathers(jf, zs, As)}

    # --- NeuralODE with an MLPField, vmapped over the sharded batch, adjoint gradients.
    node = NeuralODE(MLPField(2, width=8, depth=1, key=jax.random.key(0)), ts=ts, **tight)
    node = jax.device_put(node, rep)

    def node_fn(model, z):
        def loss(model):
            ys = jax.vmap(model)(z)
            return jnp.mean((ys - z[:, None]) ** 2), ys

        (_, ys), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
        return ys, grads

    node_out, _ = compare("node_vmap_adjoint", node_fn, (node, zs))
    res["node_grad_specs"] = [spec(x) for x in jax.tree_util.tree_leaves(node_out[1])]

    # --- shard_map: a per-device solve.
    def sm(fn, out_specs):
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P("batch"), P()), out_specs=out_specs,
                                     check_vma=False))

    t0 = time.perf_counter()
    # (a) per-sample solves on each device == the vmapped solve.
    f_sm = sm(lambda z, a: jax.vmap(lambda zi: jaxode.odesolve(field, zi, ts, a, **tight))(z), P("batch"))
    ys_sm = f_sm(zs, As)
    res["shard_map_vmap"] = {"err": maxdiff(ys_sm, vmapped["adjoint"][0]), "specs": [spec(ys_sm)],
                             "gathers": gathers(f_sm, zs, As)}

    # (b) gradients computed on each device (batched=True adjoint), summed with psum.
    def local_grads(z, a):
        (gz, ga) = jax.grad(lambda z, a: jnp.sum(jnp.sin(solve_b(z, a))), (0, 1))(z, a)
        return gz, jax.lax.psum(ga, "batch")

    f_g = sm(local_grads, (P("batch"), P()))
    g_sm = f_g(zs, As)
    res["shard_map_grads"] = {"err": maxdiff(g_sm, batched_ref[1:]), "specs": [spec(x) for x in g_sm],
                              "gathers": gathers(f_g, zs, As)}

    # (c) each device solves its 2 samples as ONE ODE with its own step sizes.
    def joint(z, a):
        ys, info = jaxode.odesolve(field, z, ts, a, full_output=True, **tight)
        return ys, info.num_steps[None]

    f_j = sm(joint, (P(None, "batch"), P("batch")))
    ys_j, steps_j = f_j(zs, As)
    one = jax.jit(joint)
    chunks = [one(*jax.device_put((z0[2 * i : 2 * i + 2], A), dev0)) for i in range(NUM_DEVICES)]
    res["shard_map_joint"] = {
        "err": maxdiff(ys_j, jnp.concatenate([c[0] for c in chunks], axis=1)),
        "specs": [spec(ys_j)],
        "steps": [int(s) for s in steps_j],
        "steps_single": [int(c[1][0]) for c in chunks],
        "gathers": gathers(f_j, zs, As),
    }
    res["shard_map_seconds"] = time.perf_counter() - t0

    # --- the example's training step: sharded vs unsharded, 3 Adam steps.
    t0 = time.perf_counter()
    data_ts, data_ys = dp.make_data(200)
    window, lr = 6, 1e-2
    tau = data_ts[:window] - data_ts[0]
    rng = np.random.default_rng(0)
    offsets = np.arange(window)
    batches = [data_ys[rng.integers(0, 200 - window, 8)[:, None] + offsets] for _ in range(3)]
    model = dp.make_model(8, jax.random.key(1), tau)
    params0, static = eqx.partition(model, eqx.is_inexact_array)
    optim = optax.adam(lr)

    steps = {}  # one compiled step per (strategy, placement), reused across checks

    def train(strategy, mesh_, batch_list, pad_to=1):
        key = (strategy, mesh_ is None)
        if key not in steps:
            steps[key] = dp.make_train_step(optim, static, strategy, mesh_)
        step = steps[key]
        params, opt_state = params0, optim.init(params0)
        if mesh_ is not None:
            params, opt_state = dp.replicate((params, opt_state), mesh_)
        losses = []
        for b in batch_list:
            (y_win,), mask = dp.pad_batch((b,), pad_to)
            if mesh_ is None:
                args = jax.device_put((y_win, mask), dev0)
            else:
                args = (dp.shard_batch(y_win, mesh_), dp.shard_batch(mask, mesh_))
            params, opt_state, loss, status = step(params, opt_state, *args)
            assert int(status) == 0
            losses.append(float(loss))
        return params, losses

    p_sh, l_sh = train("vmap", mesh, batches, NUM_DEVICES)
    p_1, l_1 = train("vmap", None, batches)
    res["train_vmap"] = {
        "param_err": maxdiff(p_sh, p_1), "loss_err": max(abs(a - b) for a, b in zip(l_sh, l_1)),
        "moved": maxdiff(p_1, params0), "specs": [spec(x) for x in jax.tree_util.tree_leaves(p_sh)],
    }

    # shard_map strategy: each device's windows are one ODE; the reference computes each
    # device's chunk on device 0 and combines the gradients as the psum does.
    p_sm, l_sm = train("shard_map", mesh, batches[:1], NUM_DEVICES)

    def chunk_total(params, y_win, mask):
        return dp.masked_sums(eqx.combine(params, static), y_win, mask, "shard_map")[0]

    chunk_grad = jax.jit(jax.value_and_grad(chunk_total))
    y_all, m_all = dp.pad_batch((batches[0],), NUM_DEVICES)[0][0], np.ones(8)
    tot, grads = 0.0, None
    for i in range(NUM_DEVICES):
        v, g = chunk_grad(params0, *jax.device_put((y_all[2 * i : 2 * i + 2], m_all[:2]), dev0))
        tot += float(v)
        grads = g if grads is None else jax.tree_util.tree_map(jnp.add, grads, g)
    grads = jax.tree_util.tree_map(lambda g: g / 8.0, grads)
    updates, _ = optim.update(grads, optim.init(params0), params0)
    res["train_shard_map"] = {"param_err": maxdiff(p_sm, optax.apply_updates(params0, updates)),
                              "loss_err": abs(l_sm[0] - tot / 8.0)}

    # --- uneven batch: 6 windows on 4 devices, padded to 8 with copies and masked out.
    uneven = [b[:6] for b in batches]
    (padded,), mask = dp.pad_batch((uneven[0],), NUM_DEVICES)
    res["pad"] = {"shape": list(padded.shape), "mask": mask.tolist(),
                  "copies_of_first": bool(np.all(padded[6:] == uneven[0][:1])),
                  "real_unchanged": bool(np.all(padded[:6] == uneven[0]))}
    p_sh, l_sh = train("vmap", mesh, uneven, NUM_DEVICES)
    p_1, l_1 = train("vmap", None, uneven)  # no padding: 6 windows on one device
    res["uneven"] = {"param_err": maxdiff(p_sh, p_1), "loss_err": max(abs(a - b) for a, b in zip(l_sh, l_1))}
    # The copies really are excluded: an unmasked mean over the 8 padded windows differs.
    ev = dp.make_eval(static, "vmap", mesh)
    y_pad, m_pad = dp.shard_batch(padded, mesh), dp.shard_batch(mask, mesh)
    masked, _ = ev(params0, y_pad, m_pad)
    unmasked, _ = ev(params0, y_pad, dp.shard_batch(np.ones(8), mesh))
    plain = l_1[0]  # the unpadded single-device loss of uneven[0] at params0
    res["uneven"].update(masked_vs_plain=abs(float(masked) - float(plain)),
                         unmasked_vs_plain=abs(float(unmasked) - float(plain)))
    res["train_seconds"] = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------- the tests


def _run_child() -> dict:
    import jax  # the child compiles like this process (tests/conftest.py: optimisations, emitters)

    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={NUM_DEVICES}"
    env = dict(os.environ, XLA_FLAGS=flags.strip(),
               JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu",
               JAX_DISABLE_MOST_OPTIMIZATIONS=str(int(jax.config.read("jax_disable_most_optimizations"))))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, proc.stdout[-3000:]
    res = json.loads(lines[-1])
    res["child_seconds"] = time.perf_counter() - t0
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """The child's results, computed once per test run: under pytest-xdist the first worker to
    get here runs the child (about a minute) and the others wait for its file."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # one folder for all workers of this run
    path = shared / "sharding_results.json"
    with open(shared / "sharding_results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            path.write_text(json.dumps(_run_child()))
    return json.loads(path.read_text())


BATCH = ["batch", None, None]


def test_work_is_split_over_four_devices(results):
    """The mesh spans the four devices and a sharded solve's output really is split: a
    quarter of the batch of 8 on each device (∂L/∂A replicated on all of them)."""
    assert results["mesh"] == {"batch": NUM_DEVICES}
    r = results["vmap_adjoint"]
    assert r["devices"] == [NUM_DEVICES] * 3
    assert r["shard_shapes"] == [[8 // NUM_DEVICES, 4, 2], [8 // NUM_DEVICES, 2], [2, 2]]


@pytest.mark.parametrize("name", ["vmap_adjoint", "vmap_backprop", "batched_adjoint"])
def test_sharded_solve_and_gradients_match_single_device(results, name):
    r = results[name]
    assert r["finite"]
    assert r["err"] < TOL, r
    ys_spec, gz_spec, ga_spec = r["specs"]
    assert ys_spec == BATCH  # (B, T, d): the solution stays sharded along the batch
    assert gz_spec == ["batch", None]  # ∂L/∂z0 sharded like z0
    assert ga_spec == [None, None]  # ∂L/∂A replicated like A
    assert r["gathers"] == 0, "the compiled program gathers arrays onto every device"


def test_batched_equals_vmap(results):
    # Per-sample steps in both; only the backward error control of θ's adjoint differs.
    assert results["batched_vs_vmap_ys"] < 1e-12
    assert results["batched_vs_vmap_grads"] < TOL


def test_joint_state_solve_sharded(results):
    r = results["joint_backprop"]
    assert r["finite"] and r["err"] < TOL, r
    assert r["specs"][0] == [None, "batch", None]  # ys (T, B, d)
    assert r["specs"][1] == ["batch", None]
    assert r["gathers"] == 0


def test_batched_with_throw_keeps_sharding(results):
    r = results["batched_throw_true"]
    assert r["specs"][0] == BATCH and r["gathers"] == 0


def test_neural_ode_sharded(results):
    r = results["node_vmap_adjoint"]
    assert r["finite"] and r["err"] < TOL, r
    assert r["specs"][0] == BATCH
    assert results["node_grad_specs"] and all(all(e is None for e in s) for s in results["node_grad_specs"])
    assert r["gathers"] == 0


def test_shard_map_per_sample_equals_vmap(results):
    r = results["shard_map_vmap"]
    assert r["err"] < TOL and r["specs"][0] == BATCH and r["gathers"] == 0, r


def test_shard_map_gradients_with_psum(results):
    r = results["shard_map_grads"]
    assert r["err"] < TOL, r
    assert r["specs"] == [["batch", None], [None, None]]
    assert r["gathers"] == 0


def test_shard_map_joint_solve_has_per_device_steps(results):
    r = results["shard_map_joint"]
    assert r["err"] < TOL and r["specs"][0] == [None, "batch", None] and r["gathers"] == 0, r
    assert r["steps"] == r["steps_single"]  # each device ran exactly its own chunk's solve
    assert len(set(r["steps"])) > 1, "larger initial conditions should need more steps"


def test_sharded_training_matches_unsharded(results):
    r = results["train_vmap"]
    assert r["moved"] > 1e-3  # the steps did change the parameters
    assert r["param_err"] < TOL and r["loss_err"] < TOL, r
    assert all(all(e is None for e in s) for s in r["specs"])  # parameters stay replicated


def test_shard_map_training_step(results):
    r = results["train_shard_map"]
    assert r["param_err"] < TOL and r["loss_err"] < TOL, r


def test_uneven_batch_is_padded_and_masked(results):
    p = results["pad"]
    assert p["shape"][0] == 8 and p["mask"] == [1.0] * 6 + [0.0] * 2
    assert p["copies_of_first"] and p["real_unchanged"]
    u = results["uneven"]
    assert u["param_err"] < TOL and u["loss_err"] < TOL, u
    assert u["masked_vs_plain"] < 1e-12
    assert u["unmasked_vs_plain"] > 1e-6  # the copies would have changed the loss


def test_pad_batch_errors_and_no_op():
    dp = _load_example()
    x = np.arange(8.0).reshape(4, 2)
    (same,), mask = dp.pad_batch((x,), 4)
    assert same.shape == (4, 2) and mask.tolist() == [1.0] * 4
    (padded, padded_y), mask = dp.pad_batch((x, np.arange(4)), 3)
    assert padded.shape == (6, 2) and padded_y.tolist() == [0, 1, 2, 3, 0, 0]
    assert mask.tolist() == [1, 1, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="common, nonzero batch"):
        dp.pad_batch((x, np.arange(3)), 2)
    with pytest.raises(ValueError, match="common, nonzero batch"):
        dp.pad_batch((np.zeros((0, 2)),), 2)


if __name__ == "__main__":
    print(json.dumps(_child()))
