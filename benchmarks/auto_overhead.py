"""The cost of ``solver="auto"`` on non-stiff problems against plain ``tsit5`` (issue 14: at most
~10% more).

Three non-stiff problems, float64, rtol 1e-6, atol 1e-8, 21 outputs on ``[0, 20]``: a damped
pendulum (n = 2, the nested driver), an MLP field ``tanh(z W) - 0.1 z`` with n = 32 (the flat
driver), and the same field on a ``(64, 32)`` batch as one state. On a non-stiff problem auto
takes tsit5's steps exactly (same ``nfe``); what it adds per step is its ``lax.cond`` between
the two methods (the Rosenbrock branch compiled but not run), Hairer's stiffness estimate (two
norms) and the switching votes. Time: the fastest of ``--repeats`` calls of the jitted solve
(steady state; fastest rather than median because the machine is shared).

    python benchmarks/auto_overhead.py [--repeats 51] [--out benchmarks/results/auto_overhead.md]
"""

from __future__ import annotations

import argparse
import os
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

import jaxode  # noqa: E402


def _pendulum(z, t, p):
    return jnp.stack([z[1], -p[0] * jnp.sin(z[0]) - p[1] * z[1]])


def _mlp(z, t, w):
    return jnp.tanh(z @ w) - 0.1 * z


def cases():
    w = jax.random.normal(jax.random.PRNGKey(0), (32, 32)) / 6
    return [("damped pendulum, n = 2", _pendulum, jnp.array([1.0, 0.0]), jnp.array([9.81, 0.1])),
            ("MLP field, n = 32", _mlp, jnp.full(32, 0.3), w),
            ("MLP field, (64, 32) batch as one state", _mlp, jnp.full((64, 32), 0.3), w)]


def fastest(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=51)
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out", default=os.path.join(here, "results", "auto_overhead.md"))
    args = parser.parse_args(argv)
    ts = jnp.linspace(0.0, 20.0, 21)
    rows = []
    for name, field, z0, p in cases():
        row = [name]
        for solver in ("tsit5", "auto"):
            run = lambda z0, p, s=solver: jaxode.odesolve(field, z0, ts, p, solver=s, rtol=1e-6, atol=1e-8,
                                                          full_output=True)
            solve = jax.jit(run)
            _, info = solve(z0, p)
            row += [fastest(solve, (z0, p), args.repeats), int(info.nfe)]
        rows.append(row)
        print(row, flush=True)
    lines = [
        "# `solver=\"auto\"` on non-stiff problems, against `tsit5`", "",
        f"`python benchmarks/auto_overhead.py --repeats {args.repeats}` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"jax {jax.__version__}, {os.cpu_count()} shared cores, load {os.getloadavg()[0]:.1f}). "
        "Fastest of the repeats, after a compiling call.", "",
        "| problem | tsit5 (ms) | nfe | auto (ms) | nfe | auto / tsit5 |", "|---|---|---|---|---|---|",
    ]
    for name, t_ts, n_ts, t_auto, n_auto in rows:
        cells = [name, f"{t_ts * 1e3:.3f}", n_ts, f"{t_auto * 1e3:.3f}", n_auto, f"{t_auto / t_ts:.2f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += [
        "", "Reading: the same steps and evaluations; what auto adds is a fixed cost per step, about "
        "0.1 µs (n = 2, nested driver) to 1 µs (n = 32, flat driver), which XLA's CPU runtime "
        "spends on the `lax.cond` between the methods (its operands and results pass through "
        "buffers, and no fusion crosses it; measured by replacing the cond with the explicit "
        "branch: the n = 32 ratio falls to 1.06). Where a step costs more than a few µs (the "
        "batch) this is within the issue's ~10%; on the smallest systems, whose whole step costs "
        "0.4-2 µs, it is 30-45%: the target is missed there.",
    ]
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
