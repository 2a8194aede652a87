"""gradient="reversible" beside "adjoint", "checkpoint" and "backprop" (issue 17).

    python benchmarks/reversible.py [--batch 256] [--horizons 1 16 64] [--tolerances 1e-3 1e-5]
                                    [--repeats 3] [--large] [--out benchmarks/results/reversible.md]
    JAX_ENABLE_X64=1 python benchmarks/reversible.py --convergence --horizons 16 \
                                    --tolerances 1e-5 1e-7 1e-9

mlp-batch (``workloads.mlp_batch``: the whole ``(batch, 32)`` state as one ODE, dopri5, float32,
``ts = linspace(0, t1, 11)``, loss ``mean(ys**2)``), for each ``t1`` and tolerance and mode:

* time: the median of ``repeats`` steady-state calls of the jitted ``value_and_grad``
  (``run.timed``);
* memory: XLA's compiled temporary memory of that function (``memory_analysis()``,
  ``temp_size_in_bytes``), which is what grows with the steps (static: it depends on
  ``max_steps``, not on ``t1``);
* gradient error: ``|g - g_ref| / |g_ref|`` against the float64 reference gradient
  (``workloads.reference_gradient``, dopri8 at rtol 1e-10, atol 1e-12), where cached.

And a large state (``--large``: a ``(64, 1024)`` state, ``tanh(z W) - z``), compiled only: the
temporary memory of each mode at ``max_steps`` 256 and 4096, where the checkpoint slots are the
memory. Writes a markdown table to ``--out`` and the rows as JSON beside it.

``--convergence`` (float64): the gradient and ``ys`` errors of "reversible" and "checkpoint" at
one horizon as the tolerance tightens, to ``results/reversible_convergence.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import workloads as W  # noqa: E402

MODES = ("reversible", "checkpoint", "backprop", "adjoint")


def _temp_mib(fn, *args) -> float:
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20


def mlp_rows(batch: int, horizons, tolerances, repeats: int, max_steps: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import peers as P
    from run import timed

    w = W.mlp_batch(batch)
    z0, _, params = P.jax_data(w)
    fns = {m: P.jaxode_grad_fn(w.f, "dopri5", m, max_steps=max_steps) for m in MODES}
    fwd = {g: jax.jit(lambda ts, tol, g=g: jaxode_info(w.f, z0, ts, params, tol, max_steps, g))
           for g in ("reversible", "adjoint")}
    rows = []
    for t1 in horizons:
        ts = jnp.linspace(0.0, t1, 11, dtype=jnp.float32)
        ref = W.reference_gradient(batch, t1, compute=False)
        for tol in tolerances:
            tol_a = jnp.asarray(tol, jnp.float32)
            steps = {g: int(fn(ts, tol_a).num_steps) for g, fn in fwd.items()}
            for mode in MODES:
                row = {"t1": t1, "tol": tol, "mode": mode,
                       "steps": steps["reversible" if mode == "reversible" else "adjoint"]}
                call = lambda fn=fns[mode]: jax.block_until_ready(fn(params, z0, ts, tol_a, tol_a))
                try:
                    row["temp_mib"] = _temp_mib(fns[mode], params, z0, ts, tol_a, tol_a)
                    stats, ((loss, _), grads) = timed(call, repeats)
                    row.update(median_s=stats["median_s"], loss=float(loss))
                    if ref is not None:
                        row["grad_error"] = W.gradient_error(grads, ref["grad"])
                except Exception as e:  # a failed solve (max_steps) is a result too
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[-1][:160]}"
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def jaxode_info(f, z0, ts, params, tol, max_steps, gradient):
    """The forward solve's ``Info`` (its steps: the base method's, or the reversible form's)."""
    import jaxode

    return jaxode.odesolve(f, z0, ts, params, solver="dopri5", rtol=tol, atol=tol, max_steps=max_steps,
                           full_output=True, throw=False, gradient=gradient)[1]


def large_rows(max_steps_list=(256, 4096), batch: int = 64, dim: int = 1024) -> list[dict]:
    """Compiled temporary memory of a (batch, dim) float32 state's gradient, per mode."""
    import jax
    import jax.numpy as jnp

    import jaxode

    z0 = jnp.asarray(np.random.default_rng(0).normal(size=(batch, dim)), jnp.float32)
    weight = jnp.asarray(np.random.default_rng(1).normal(size=(dim, dim)) / np.sqrt(dim), jnp.float32)
    ts = jnp.linspace(0.0, 1.0, 11, dtype=jnp.float32)
    field = lambda z, t, p: jnp.tanh(z @ p) - z
    rows = []
    for mode in MODES:
        for max_steps in max_steps_list:
            loss = lambda p, mode=mode, m=max_steps: jnp.mean(jaxode.odesolve(
                field, z0, ts, p, solver="dopri5", rtol=1e-5, atol=1e-5, gradient=mode, max_steps=m) ** 2)
            rows.append({"mode": mode, "max_steps": max_steps,
                         "temp_mib": _temp_mib(jax.jit(jax.grad(loss)), weight)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def markdown(mlp: list[dict], large: list[dict], meta: dict) -> str:
    lines = ["# gradient=\"reversible\" beside the other gradient modes", "",
             f"mlp-batch, batch {meta['batch']}, dopri5, float32, one ODE for the whole batch; "
             f"max_steps {meta['max_steps']}; time: median of {meta['repeats']} steady-state calls of "
             "jit(value_and_grad); memory: XLA's compiled temporary memory of that function; gradient "
             "error: |g - g_ref| / |g_ref| against the float64 dopri8 reference "
             "(`workloads.reference_gradient`). Machine: " + meta["machine"] + ".", "",
             "The reference's own error (its dopri5 vs dopri8 gradients, both at rtol 1e-10): "
             + ", ".join(f"t1 = {t1:g}: {c}" for t1, c in _reference_checks(mlp, meta["batch"]))
             + ". Where it is large the gradient errors below say nothing.", "",
             "| t1 | tol | steps | mode | time (ms) | temp memory (MiB) | gradient error |",
             "|---:|---:|---:|---|---:|---:|---:|"]
    for r in mlp:
        time = f"{r['median_s'] * 1e3:.1f}" if "median_s" in r else r.get("error", "")
        err = f"{r['grad_error']:.2e}" if "grad_error" in r else "n/a"
        mem = f"{r['temp_mib']:.2f}" if "temp_mib" in r else ""
        lines.append(f"| {r['t1']:g} | {r['tol']:g} | {r['steps']} | {r['mode']} | {time} | {mem} | {err} |")
    if large:
        lines += ["", "Large state: a (64, 1024) float32 state, `tanh(z W) - z`, dopri5; compiled temporary "
                  "memory (MiB) of jit(grad), by max_steps (memory is static: it does not depend on t1).", "",
                  "| mode | " + " | ".join(f"max_steps {m}" for m in sorted({r['max_steps'] for r in large}))
                  + " |", "|---|" + "---:|" * len({r['max_steps'] for r in large})]
        for mode in MODES:
            cells = [f"{r['temp_mib']:.1f}" for r in large if r["mode"] == mode]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def convergence_rows(batch: int, t1: float, tolerances, max_steps: int = 16384) -> list[dict]:
    """float64 (needs ``JAX_ENABLE_X64=1``): the gradient error and the RMS error of ``ys``
    against the references, of "reversible" and "checkpoint", as the tolerance tightens."""
    import jax
    import jax.numpy as jnp

    import jaxode

    if not jax.config.jax_enable_x64:
        raise SystemExit("--convergence runs in float64: set JAX_ENABLE_X64=1")
    w = W.mlp_batch(batch, t1)
    z0 = jnp.asarray(w.z0, jnp.float64)
    ts = jnp.linspace(0.0, t1, 11)
    params = tuple(jnp.asarray(p, jnp.float64) for p in w.params)
    ref, ref_ys = W.reference_gradient(batch, t1, compute=False), W.reference_trajectory(w, compute=False)
    rows = []
    for tol in tolerances:
        for mode in ("reversible", "checkpoint"):
            def loss(p, mode=mode, tol=tol):
                ys = jaxode.odesolve(w.f, z0, ts, p, solver="dopri5", rtol=tol, atol=tol, gradient=mode,
                                     max_steps=max_steps)
                return W.mlp_loss(ys), ys

            (_, ys), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
            row = {"t1": t1, "tol": tol, "mode": mode, "grad_error": W.gradient_error(grads, ref["grad"])}
            if ref_ys is not None:
                row["ys_rms_error"] = W.trajectory_error(ys, ref_ys)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def convergence_markdown(rows: list[dict], batch: int) -> str:
    lines = ["# gradient=\"reversible\": accuracy as the tolerance tightens (float64)", "",
             f"mlp-batch, batch {batch}, t1 = {rows[0]['t1']:g}, dopri5, float64, one ODE for the batch; "
             "errors against the float64 references (gradient: dopri8 at rtol 1e-10; ys: scipy DOP853 at "
             "rtol 1e-10, RMS over all outputs).", "",
             "| tol | mode | gradient error | ys RMS error |", "|---:|---|---:|---:|"]
    for r in rows:
        ys = f"{r['ys_rms_error']:.2e}" if "ys_rms_error" in r else "n/a"
        lines.append(f"| {r['tol']:g} | {r['mode']} | {r['grad_error']:.2e} | {ys} |")
    return "\n".join(lines) + "\n"


def _reference_checks(rows: list[dict], batch: int) -> list[tuple[float, str]]:
    out = []
    for t1 in sorted({r["t1"] for r in rows}):
        ref = W.reference_gradient(batch, t1, compute=False)
        out.append((t1, "not cached" if ref is None else f"{ref['check']:.1e}"))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=W.MLP_BATCH)
    ap.add_argument("--horizons", type=float, nargs="+", default=[1.0, 16.0, 64.0])
    ap.add_argument("--tolerances", type=float, nargs="+", default=[1e-3, 1e-5])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=4096)
    ap.add_argument("--large", action="store_true", help="also the large-state memory table")
    ap.add_argument("--machine", default="2 shared CPU cores")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "reversible.md"))
    ap.add_argument("--from-json", action="store_true", help="rewrite --out from its JSON, running nothing")
    ap.add_argument("--convergence", action="store_true",
                    help="only the float64 accuracy-vs-tolerance table (first horizon; JAX_ENABLE_X64=1)")
    args = ap.parse_args(argv)
    if args.convergence:
        rows = convergence_rows(args.batch, args.horizons[0], args.tolerances)
        out = os.path.join(os.path.dirname(args.out), "reversible_convergence.md")
        with open(out, "w") as fh:
            fh.write(convergence_markdown(rows, args.batch))
        print(open(out).read())
        return 0
    if args.from_json:
        with open(os.path.splitext(args.out)[0] + ".json") as fh:
            saved = json.load(fh)
        mlp, large, meta = saved["mlp"], saved["large"], saved["meta"]
    else:
        mlp = mlp_rows(args.batch, args.horizons, args.tolerances, args.repeats, args.max_steps)
        large = large_rows() if args.large else []
        meta = {"batch": args.batch, "repeats": args.repeats, "max_steps": args.max_steps,
                "machine": args.machine}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(markdown(mlp, large, meta))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
        json.dump({"meta": meta, "mlp": mlp, "large": large}, fh, indent=1)
    print(open(args.out).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
