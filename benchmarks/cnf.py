"""Benchmark: one CNF training step (``value_and_grad`` of the mean NLL) with jaxode vs diffrax.

Cases (float32, CPU unless JAX finds an accelerator):

* ``d=2, exact``: batch 512, a ``ConcatSquashField(2, 64, depth 3)``, exact trace;
* ``d=16, hutchinson``: batch 512, a ``ConcatSquashField(16, 64, depth 3)``, Hutchinson's
  trace with one Rademacher vector per sample.

The same field weights, data, noise, solver (tsit5), tolerances (rtol 1e-3, atol 1e-5, RMS
error norm over the whole state) and interval ``[0, 1]`` for every variant:

* ``jaxode joint``: ``jaxode.nn.CNF.log_prob`` on the batch, solved as one state (the CNF's
  way), ``gradient="adjoint"`` and ``"checkpoint"``;
* ``jaxode vmap``: ``eqx.filter_vmap`` of the per-sample ``log_prob`` (independent solves);
* ``diffrax vmap``: diffrax's CNF pattern (its FFJORD example): ``diffeqsolve`` of
  ``(z, ∫tr)`` per sample under ``jax.vmap``, ``BacksolveAdjoint`` (the continuous adjoint)
  or ``RecursiveCheckpointAdjoint`` (diffrax's default, backprop with checkpoints);
* ``diffrax joint``: the same on the batch as one state (as jaxode's CNF does).

Measured: the median wall time of a compiled step over ``--repeats`` calls (after one
compiling call) and the forward solve's steps (for ``vmap`` variants: the largest over the
batch, which sets the vectorised loop's length). PyTorch/torchdiffeq: skipped when not
installed (printed).

Run: ``python benchmarks/cnf.py [--repeats N] [--quick] [--out PATH.md]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from jaxode.cnf import standard_normal_log_prob
from jaxode.nn import CNF, ConcatSquashField

RTOL, ATOL = 1e-3, 1e-5


def case_data(d: int, batch: int, key):
    """Data: a mixture of two Gaussians in ``R^d`` (a non-trivial flow from the start)."""
    k1, k2 = jax.random.split(key)
    sign = jnp.where(jax.random.bernoulli(k1, 0.5, (batch, 1)), 1.0, -1.0)
    return 1.5 * sign + 0.5 * jax.random.normal(k2, (batch, d))


def jaxode_step(field, x, eps, trace, gradient, joint):
    cnf = CNF(field, trace=trace, rtol=RTOL, atol=ATOL, gradient=gradient)
    key = jax.random.key(0)

    def loss(cnf):
        if joint:
            log_p, info = cnf.log_prob(x, key, full_output=True)
            return -jnp.mean(log_p), info.num_steps
        log_p, info = eqx.filter_vmap(lambda xi, k: cnf.log_prob(xi, k, full_output=True))(
            x, jax.random.split(key, x.shape[0]))
        return -jnp.mean(log_p), jnp.max(info.num_steps)

    return eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True)), cnf


def diffrax_step(field, x, eps, trace, adjoint, joint):
    import diffrax

    def aug(t, state, args):
        field, eps = args
        z = state[0]

        def one(zi, ei):
            f = lambda u: field(u, t)
            if trace == "exact":
                fz, cols = jax.vmap(lambda v: jax.jvp(f, (zi,), (v,)), out_axes=(None, 0))(
                    jnp.eye(zi.shape[-1], dtype=zi.dtype))
                return fz, jnp.trace(cols)
            fz, jeps = jax.jvp(f, (zi,), (ei,))
            return fz, jnp.dot(ei, jeps)

        if z.ndim == 1:
            return one(z, eps)
        return jax.vmap(one)(z, eps)

    adj = diffrax.BacksolveAdjoint() if adjoint == "backsolve" else diffrax.RecursiveCheckpointAdjoint()

    def solve(field, x, eps):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(aug), diffrax.Tsit5(), 0.0, 1.0, None, (x, jnp.zeros(x.shape[:-1], x.dtype)),
            args=(field, eps), stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
            adjoint=adj, max_steps=4096,
        )
        z1, tr = sol.ys[0][-1], sol.ys[1][-1]
        return standard_normal_log_prob(z1) + tr, sol.stats["num_steps"]

    def loss(field):
        if joint:
            log_p, steps = solve(field, x, eps)
            return -jnp.mean(log_p), steps
        log_p, steps = jax.vmap(solve, in_axes=(None, 0, 0))(field, x, eps)
        return -jnp.mean(log_p), jnp.max(steps)

    return eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True)), field


def measure(step, arg, repeats: int) -> dict:
    t = time.perf_counter()
    (loss, steps), grads = step(arg)
    jax.block_until_ready(grads)
    compile_s = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        (loss, steps), grads = step(arg)
        jax.block_until_ready(grads)
        times.append(time.perf_counter() - t)
    return {"step_ms": 1e3 * float(np.median(times)), "min_ms": 1e3 * float(np.min(times)),
            "steps": int(steps), "loss": float(loss), "compile_s": compile_s}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="batch 64, 2 repeats")
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    p.add_argument("--weight-scale", type=float, default=1.0,
                   help="multiply the field's initial weights (a less trivial flow: more steps)")
    args = p.parse_args(argv)
    batch = 64 if args.quick else 512
    repeats = 2 if args.quick else args.repeats
    have_diffrax = importlib.util.find_spec("diffrax") is not None
    lines = [
        f"CNF training step, batch {batch}, tsit5 rtol={RTOL:g} atol={ATOL:g}, float32, "
        f"median of {repeats} (after a compiling call), initial weights x{args.weight_scale:g}",
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}",
    ]
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchdiffeq") is None:
        lines.append("torch/torchdiffeq: not installed here, skipped")
    if not have_diffrax:
        lines.append("diffrax: not installed here, skipped")
    lines += ["", "| case | variant | ms/step | steps (forward) | loss | compile s |",
              "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for d, trace in ((2, "exact"), (16, "hutchinson")):
        key = jax.random.key(d)
        field = ConcatSquashField(d, 64, 3, key=jax.random.fold_in(key, 1))
        scale = lambda w: w * args.weight_scale if eqx.is_inexact_array(w) else w  # noqa: E731
        field = jax.tree_util.tree_map(scale, field)
        x = case_data(d, batch, jax.random.fold_in(key, 2))
        # the noise jaxode's CNF draws from key(0) (its joint variant), for diffrax too
        eps = jax.random.rademacher(jax.random.key(0), (batch, d), dtype=jnp.int8).astype(x.dtype)
        variants = [
            ("jaxode joint, adjoint", lambda: jaxode_step(field, x, eps, trace, "adjoint", True)),
            ("jaxode joint, checkpoint", lambda: jaxode_step(field, x, eps, trace, "checkpoint", True)),
            ("jaxode vmap, adjoint", lambda: jaxode_step(field, x, eps, trace, "adjoint", False)),
        ]
        if have_diffrax:
            dx = lambda adj, joint: lambda: diffrax_step(field, x, eps, trace, adj, joint)  # noqa: E731
            variants += [
                ("diffrax vmap, BacksolveAdjoint", dx("backsolve", False)),
                ("diffrax vmap, RecursiveCheckpoint", dx("recursive", False)),
                ("diffrax joint, BacksolveAdjoint", dx("backsolve", True)),
                ("diffrax joint, RecursiveCheckpoint", dx("recursive", True)),
            ]
        for name, make in variants:
            step, arg = make()
            r = measure(step, arg, repeats)
            line = (f"| d={d}, {trace} | {name} | {r['step_ms']:.1f} | {r['steps']} | {r['loss']:.4f} | "
                    f"{r['compile_s']:.1f} |")
            lines.append(line)
            print(line, flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
