"""Same workloads, two versions of jaxode, one run: did a change alter speed or results?

    python benchmarks/before_after.py BEFORE_DIR [AFTER_DIR] [--repeats N] [--rounds R] [--out PATH.md]

``BEFORE_DIR`` and ``AFTER_DIR`` are source trees holding a ``jaxode`` package (default
``AFTER_DIR``: this repository); e.g. ``git worktree add /tmp/before <commit>``. Each case runs
in a fresh subprocess per version, the versions alternating, ``R`` rounds each (so background
load hits both alike); a round reports the median of ``N`` steady-state calls (after the
compiling one). The report gives, per case, the median over rounds for each version, their
ratio (after / before), and the largest difference of the outputs (the same numbers are
expected: a refactor must not change what is computed).

Cases (from ``workloads.py``): spiral forward (2 states, 100 outputs; the nested driver),
spiral gradients in the three modes, mlp-batch forward and adjoint gradient (batch 64, float32;
the flat driver), pendulum forward, ``jax.vmap`` of the spiral over 64 initial states, and
``batched=True`` adjoint gradients of them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CASES = ("spiral-forward", "spiral-grad-adjoint", "spiral-grad-backprop", "spiral-grad-checkpoint",
         "mlp-forward", "mlp-grad-adjoint", "pendulum-forward", "spiral-vmap-forward", "spiral-batched-grad")


def _case(name: str):
    """``(call, x64)``: a compiled zero-argument function returning an array, for ``name``."""
    import jax
    import jax.numpy as jnp
    import workloads as W

    import jaxode

    if name.startswith("spiral"):
        w = W.get("spiral")
        z0, ts, params = jnp.asarray(w.z0), jnp.asarray(w.ts), tuple(map(jnp.asarray, w.params))
        opts = dict(rtol=w.rtol, atol=w.atol)
        if name == "spiral-forward":
            return jax.jit(lambda: jaxode.odesolve(W.spiral_field, z0, ts, params, **opts))
        if name.startswith("spiral-grad-"):
            mode = name.removeprefix("spiral-grad-")
            loss = lambda p: jnp.sum(jaxode.odesolve(W.spiral_field, z0, ts, p, gradient=mode, **opts) ** 2)
            return jax.jit(lambda: jax.grad(loss)(params)[0])
        z0s = z0[None] * jnp.linspace(0.5, 1.5, 64)[:, None]
        if name == "spiral-vmap-forward":
            one = lambda z: jaxode.odesolve(W.spiral_field, z, ts, params, **opts)
            return jax.jit(lambda: jax.vmap(one)(z0s))
        batched = lambda p: jaxode.odesolve(W.spiral_field, z0s, ts, p, batched=True, **opts)
        loss = lambda p: jnp.sum(batched(p)[:, -1] ** 2)
        return jax.jit(lambda: jax.grad(loss)(params)[0])
    if name.startswith("mlp"):
        w = W.get("mlp-batch", batch=64)
        z0, ts = jnp.asarray(w.z0), jnp.asarray(w.ts)
        params = jax.tree_util.tree_map(jnp.asarray, w.params)
        opts = dict(rtol=1e-5, atol=1e-5)
        if name == "mlp-forward":
            return jax.jit(lambda: jaxode.odesolve(W.mlp_field, z0, ts, params, **opts))
        loss = lambda p: W.mlp_loss(jaxode.odesolve(W.mlp_field, z0, ts, p, **opts))
        return jax.jit(lambda: jax.tree_util.tree_leaves(jax.grad(loss)(params))[0])
    w = W.get("pendulum")
    z0, ts, params = jnp.asarray(w.z0), jnp.asarray(w.ts), tuple(map(jnp.asarray, w.params))
    return jax.jit(lambda: jaxode.odesolve(W.pendulum_field, z0, ts, params, rtol=w.rtol, atol=w.atol))


def _x64(name: str) -> bool:
    return not name.startswith("mlp")


def worker(name: str, repeats: int) -> None:
    """Runs one case in this process and prints ``{"times": [...], "out": [...]}``."""
    import jax
    import numpy as np

    call = _case(name)
    out = jax.block_until_ready(call())  # compiles
    times = []
    for _ in range(repeats):
        number, t0 = 0, time.perf_counter()
        while True:  # loop fast calls for at least 20 ms per sample
            out = jax.block_until_ready(call())
            number += 1
            if time.perf_counter() - t0 > 0.02:
                break
        times.append((time.perf_counter() - t0) / number)
    flat = np.ravel(np.asarray(out, dtype=np.float64))
    print("@@" + json.dumps({"times": times, "out": flat[:4096].tolist()}))


def _run(tree: str, name: str, repeats: int) -> dict:
    x64 = "1" if _x64(name) else "0"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, HERE]), JAX_ENABLE_X64=x64)
    proc = subprocess.run([sys.executable, __file__, "--worker", name, "--repeats", str(repeats)],
                          capture_output=True, text=True, env=env, cwd=HERE)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@")]
    if proc.returncode or not line:
        raise RuntimeError(f"{name} in {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[0][2:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("before", nargs="?")
    ap.add_argument("after", nargs="?", default=ROOT)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default=None)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.repeats)
    import numpy as np

    rows = []
    for name in args.cases.split(","):
        medians = {"before": [], "after": []}
        outs = {}
        for _ in range(args.rounds):
            for label, tree in (("before", args.before), ("after", args.after)):
                result = _run(tree, name, args.repeats)
                medians[label].append(statistics.median(result["times"]))
                outs[label] = np.asarray(result["out"])
        before, after = statistics.median(medians["before"]), statistics.median(medians["after"])
        same_shape = outs["after"].shape == outs["before"].shape
        diff = float(np.max(np.abs(outs["after"] - outs["before"]))) if same_shape else float("nan")
        scale = float(np.max(np.abs(outs["before"])))
        spread = tuple(f(medians[k]) for k in ("before", "after") for f in (min, max))
        rows.append((name, before, after, after / before, diff / scale if scale else diff, *spread))
        print(f"{name:24s} before {before * 1e3:9.3f} ms  after {after * 1e3:9.3f} ms  "
              f"ratio {after / before:5.2f}  max rel diff {rows[-1][4]:.1e}", flush=True)
    lines = [
        "# Before / after",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, Python "
        f"{platform.python_version()}. Before: `{args.before}`; after: `{args.after}`. Each cell: the "
        f"median over {args.rounds} rounds (fresh processes, versions alternating) of the median of "
        f"{args.repeats} steady-state calls; [min, max] of the round medians.",
        "",
        "| case | before (ms) | after (ms) | after / before | max relative difference of the outputs |",
        "|---|---|---|---|---|",
    ]
    for name, b, a, r, d, bmin, bmax, amin, amax in rows:
        lines.append(f"| {name} | {b * 1e3:.3f} [{bmin * 1e3:.3f}, {bmax * 1e3:.3f}] | {a * 1e3:.3f} "
                     f"[{amin * 1e3:.3f}, {amax * 1e3:.3f}] | {r:.2f} | {d:.1e} |")
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
