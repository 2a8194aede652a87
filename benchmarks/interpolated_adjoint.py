"""The interpolating adjoint against the backsolve adjoint and the exact modes, on mlp-batch.

    python benchmarks/interpolated_adjoint.py [--batch 256] [--repeats 3] [--out PATH.md]

mlp-batch (float32, see WORKLOADS.md) at t1 in {1, 16}, tolerance 1e-5: the gradient of the
mean-square loss w.r.t. the MLP's weights by ``gradient="adjoint"`` (backsolve: ``z``
integrated backwards), ``adjoint_interpolate=True`` (``z`` read off forward re-solves) and
``gradient="checkpoint"`` (the exact derivative of the computed solution); its relative error
against the cached float64 reference (``workloads.reference_gradient``) and its time (median of
``--repeats`` calls after the compiling one).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import workloads as W  # noqa: E402

import jaxode  # noqa: E402

MODES = {
    "adjoint (backsolve)": dict(gradient="adjoint"),
    "adjoint (interpolating)": dict(gradient="adjoint", adjoint_interpolate=True),
    "checkpoint (exact)": dict(gradient="checkpoint"),
}


def measure(batch: int, t1: float, tol: float, options: dict, repeats: int) -> tuple[float, float]:
    w = W.mlp_batch(batch, t1, rtol=tol)
    z0, ts = jnp.asarray(w.z0), jnp.asarray(w.ts)
    params = tuple(jnp.asarray(p) for p in w.params)
    loss = lambda p: W.mlp_loss(jaxode.odesolve(W.mlp_field, z0, ts, p, rtol=tol, atol=tol, max_steps=16384,
                                                **options))
    grad = jax.jit(jax.grad(loss))
    g = jax.block_until_ready(grad(params))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(grad(params))
        times.append(time.perf_counter() - t0)
    ref = W.reference_gradient(batch, t1)
    return W.gradient_error([jnp.asarray(x, jnp.float64) for x in g], ref["grad"]), statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "interpolated_adjoint.md"))
    args = ap.parse_args()
    rows = []
    for t1 in (1.0, 16.0):
        for label, options in MODES.items():
            err, secs = measure(args.batch, t1, args.tol, options, args.repeats)
            rows.append(f"| {t1:g} | {label} | {err:.2e} | {secs * 1e3:.0f} |")
            print(rows[-1], flush=True)
    text = "\n".join([
        "# Interpolating vs backsolve adjoint (mlp-batch)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"jax {jax.__version__}. Batch {args.batch}, float32, rtol = atol = {args.tol:g}; gradient of the "
        "mean-square loss w.r.t. the weights; error: relative 2-norm against the float64 reference; "
        f"time: median of {args.repeats} calls after compiling.",
        "",
        "| t1 | mode | gradient error | time (ms) |",
        "|---|---|---|---|",
        *rows,
    ]) + "\n"
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
