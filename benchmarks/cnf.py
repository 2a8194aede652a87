"""Benchmark: one CNF training step (``value_and_grad`` of the mean NLL): jaxode, diffrax, torchdiffeq.

Cases (float32, CPU unless JAX finds an accelerator):

* ``d=2, exact``: batch 512, a ``ConcatSquashField(2, 64, depth 3)``, exact trace;
* ``d=16, hutchinson``: batch 512, a ``ConcatSquashField(16, 64, depth 3)``, Hutchinson's
  trace with one Rademacher vector per sample.

The same field weights, data, noise, solver (tsit5; dopri5 for all three beside torchdiffeq), tolerances
(rtol 1e-3, atol 1e-5, RMS error norm over the whole state) and interval ``[0, 1]`` for every
variant:

* ``jaxode joint``: ``jaxode.nn.CNF.log_prob`` on the batch, solved as one state (the CNF's
  way), ``gradient="adjoint"`` and ``"checkpoint"``;
* ``jaxode vmap``: ``eqx.filter_vmap`` of the per-sample ``log_prob`` (independent solves);
* ``diffrax vmap``: diffrax's CNF pattern (its FFJORD example): ``diffeqsolve`` of
  ``(z, ∫tr)`` per sample under ``jax.vmap``, ``BacksolveAdjoint`` (the continuous adjoint)
  or ``RecursiveCheckpointAdjoint`` (diffrax's default, backprop with checkpoints);
* ``diffrax joint``: the same on the batch as one state (as jaxode's CNF does).

* ``torchdiffeq``: its CNF pattern (its ``examples/cnf.py``; written here from its
  description): ``odeint_adjoint`` or ``odeint`` (backprop through the solver) of ``(z, ∫tr)``
  for the batch as one state, the trace by autograd (one vector-Jacobian product per dimension;
  Hutchinson: ``εᵀ(∂f/∂z)`` by one, the same ``ε``), the same weights, float32, on the CPU.
  torchdiffeq has no tsit5, so it runs dopri5, and jaxode's and diffrax's joint variants are run
  with dopri5 beside it (same tolerances, the same RMS error norm over the whole state). Skipped, with a
  line saying so, when torch or torchdiffeq is not installed.

Measured: the wall time of a compiled step (its first, compiling call apart), ``--repeats``
interleaved rounds of one call per variant (the machine's load changes fall on all alike):
median, fastest and slowest; and the forward solve's steps (for ``vmap`` variants: the
largest over the batch, which sets the vectorised loop's length). All three libraries spend
``6 steps + 2`` forward evaluations with tsit5 or dopri5 (FSAL, and 2 for the first step);
torchdiffeq's steps are read off its evaluation count that way.

Run: ``python benchmarks/cnf.py [--repeats N] [--quick] [--no-vmap] [--case 2|16] [--weight-scale S]
[--out PATH.md]``.
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


def jaxode_step(field, x, eps, trace, gradient, joint, solver="tsit5"):
    cnf = CNF(field, trace=trace, rtol=RTOL, atol=ATOL, gradient=gradient, solver=solver)
    key = jax.random.key(0)

    def loss(cnf):
        if joint:
            log_p, info = cnf.log_prob(x, key, full_output=True)
            return -jnp.mean(log_p), info.num_steps
        log_p, info = eqx.filter_vmap(lambda xi, k: cnf.log_prob(xi, k, full_output=True))(
            x, jax.random.split(key, x.shape[0]))
        return -jnp.mean(log_p), jnp.max(info.num_steps)

    return eqx.filter_jit(eqx.filter_value_and_grad(loss, has_aux=True)), cnf


def diffrax_step(field, x, eps, trace, adjoint, joint, solver="tsit5"):
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

    method = diffrax.Tsit5() if solver == "tsit5" else diffrax.Dopri5()

    def solve(field, x, eps):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(aug), method, 0.0, 1.0, None, (x, jnp.zeros(x.shape[:-1], x.dtype)),
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


def torch_step(field, x, eps, trace, adjoint):
    """torchdiffeq's CNF pattern (its ``examples/cnf.py``): ``odeint`` (backprop through the
    solver) or ``odeint_adjoint`` of ``(z, ∫tr)`` for the batch as one state, dopri5, the trace
    by autograd, one vector-Jacobian product per dimension (exact) or ``εᵀ(∂f/∂z)`` by one
    vector-Jacobian product (Hutchinson, ``ε`` fixed), the same weights as ``field``.

    Returns ``(step, None)``: ``step(None)`` runs one training step (value and gradient of the
    mean NLL) and returns ``((loss, forward steps), grads)``, the forward steps from the
    forward solve's evaluation count (dopri5: 6 per attempted step after 2 at the start)."""
    import torch
    import torchdiffeq

    def param(a):
        return torch.nn.Parameter(torch.tensor(np.asarray(a), dtype=torch.float32))

    class ConcatSquash(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.w, self.b = param(layer.linear.weight), param(layer.linear.bias)
            self.wg, self.bg = param(layer.gate.weight[:, 0]), param(layer.gate.bias)
            self.wb = param(layer.hyper_bias.weight[:, 0])

        def forward(self, h, t):
            return (h @ self.w.T + self.b) * torch.sigmoid(self.wg * t + self.bg) + self.wb * t

    class Augmented(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([ConcatSquash(layer) for layer in field.layers])
            self.eps = torch.tensor(np.asarray(eps), dtype=torch.float32)
            self.nfe = 0

        def forward(self, t, state):
            self.nfe += 1
            z = state[0]
            with torch.enable_grad():
                z = z if z.requires_grad else z.requires_grad_(True)
                h = z
                for layer in self.layers[:-1]:
                    h = torch.tanh(layer(h, t))
                f = self.layers[-1](h, t)
                if trace == "exact":
                    tr = sum(torch.autograd.grad(f[:, i].sum(), z, create_graph=True)[0][:, i]
                             for i in range(z.shape[1]))
                else:
                    tr = (torch.autograd.grad(f, z, self.eps, create_graph=True)[0] * self.eps).sum(1)
            return f, tr

    def rms(tensors):  # the RMS over the whole state, as jaxode's and diffrax's error norm
        return torch.sqrt(sum((u**2).sum() for u in tensors) / sum(u.numel() for u in tensors))

    func = Augmented()
    xt = torch.tensor(np.asarray(x), dtype=torch.float32)
    ts = torch.tensor([0.0, 1.0])
    solve = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint
    log2pi = float(np.log(2 * np.pi))

    def step(_):
        func.zero_grad()
        func.nfe = 0
        z, tr = solve(func, (xt, torch.zeros(xt.shape[0])), ts, rtol=RTOL, atol=ATOL,
                      method="dopri5", options=dict(norm=rms))
        forward_steps = (func.nfe - 2) // 6
        log_p = -0.5 * (z[-1] ** 2).sum(1) - 0.5 * xt.shape[1] * log2pi + tr[-1]
        loss = -log_p.mean()
        loss.backward()
        return (loss.detach(), forward_steps), [p.grad for p in func.parameters()]

    return step, None


def _call(step, arg):
    """One step, waited for; returns ``(seconds, loss, forward steps)``."""
    t = time.perf_counter()
    (loss, steps), grads = step(arg)
    jax.block_until_ready(grads)
    return time.perf_counter() - t, float(loss), int(steps)


def measure_interleaved(variants, repeats: int) -> list[dict]:
    """Compiles every variant (its first call), then runs ``repeats`` rounds, one call of each
    variant per round, so that a change in the machine's load falls on all of them alike.
    Per variant: the median, fastest and slowest call (ms), the forward steps, the loss."""
    built = []
    for _, make in variants:
        step, arg = make()
        compile_s, loss, steps = _call(step, arg)
        built.append((step, arg, compile_s, loss, steps))
    times = [[] for _ in built]
    for _ in range(repeats):
        for k, (step, arg, *_rest) in enumerate(built):
            times[k].append(_call(step, arg)[0])
    return [{"step_ms": 1e3 * float(np.median(ts)), "min_ms": 1e3 * float(np.min(ts)),
             "max_ms": 1e3 * float(np.max(ts)), "steps": steps, "loss": loss, "compile_s": compile_s}
            for ts, (_, _, compile_s, loss, steps) in zip(times, built, strict=True)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="batch 64, 2 repeats")
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    p.add_argument("--weight-scale", type=float, default=1.0,
                   help="multiply the field's initial weights (a less trivial flow: more steps)")
    p.add_argument("--no-vmap", action="store_true", help="skip the per-sample (vmap) variants")
    p.add_argument("--case", choices=("all", "2", "16"), default="all",
                   help="run only d = 2 (exact trace) or d = 16 (Hutchinson)")
    args = p.parse_args(argv)
    batch = 64 if args.quick else 512
    repeats = 2 if args.quick else args.repeats
    have_diffrax = importlib.util.find_spec("diffrax") is not None
    lines = [
        f"CNF training step, batch {batch}, tsit5 (dopri5 where named) rtol={RTOL:g} atol={ATOL:g}, float32, "
        f"median of {repeats} interleaved rounds (after a compiling call), "
        f"initial weights x{args.weight_scale:g}",
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}",
    ]
    have_torch = all(importlib.util.find_spec(m) is not None for m in ("torch", "torchdiffeq"))
    if not have_torch:
        lines.append("torch/torchdiffeq: not installed here, skipped")
    if not have_diffrax:
        lines.append("diffrax: not installed here, skipped")
    lines += ["", "| case | variant | ms/step (median) | fastest-slowest | steps (forward) | loss "
              "| compile s |",
              "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    cases = [(d, trace) for d, trace in ((2, "exact"), (16, "hutchinson")) if args.case in ("all", str(d))]
    for d, trace in cases:
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
            ]
        if args.no_vmap:
            variants = [v for v in variants if " vmap" not in v[0]]
        if have_diffrax:
            variants += [
                ("diffrax joint, BacksolveAdjoint", dx("backsolve", True)),
                ("diffrax joint, RecursiveCheckpoint", dx("recursive", True)),
            ]
        # torchdiffeq has no tsit5: dopri5 for it, and for jaxode and diffrax beside it
        jd = lambda grad: lambda: jaxode_step(field, x, eps, trace, grad, True, "dopri5")  # noqa: E731
        variants += [
            ("jaxode joint, adjoint, dopri5", jd("adjoint")),
            ("jaxode joint, checkpoint, dopri5", jd("checkpoint")),
        ]
        if have_diffrax:
            dd = lambda adj: lambda: diffrax_step(field, x, eps, trace, adj, True, "dopri5")  # noqa: E731
            variants += [
                ("diffrax joint, BacksolveAdjoint, dopri5", dd("backsolve")),
                ("diffrax joint, RecursiveCheckpoint, dopri5", dd("recursive")),
            ]
        if have_torch:
            tq = lambda adjoint: lambda: torch_step(field, x, eps, trace, adjoint)  # noqa: E731
            variants += [
                ("torchdiffeq odeint_adjoint, dopri5", tq(True)),
                ("torchdiffeq odeint (backprop), dopri5", tq(False)),
            ]
        for (name, _), r in zip(variants, measure_interleaved(variants, repeats), strict=True):
            line = (f"| d={d}, {trace} | {name} | {r['step_ms']:.1f} | {r['min_ms']:.1f}-{r['max_ms']:.1f} | "
                    f"{r['steps']} | {r['loss']:.4f} | {r['compile_s']:.1f} |")
            lines.append(line)
            print(line, flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
