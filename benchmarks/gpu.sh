#!/usr/bin/env bash
# One-shot GPU check and timing for jaxode's mlp-batch workload (benchmarks/WORKLOADS.md).
#
#   bash benchmarks/gpu.sh            # on a lent GPU machine, from the repository root or anywhere
#   JAX_PLATFORMS=cpu bash benchmarks/gpu.sh --quick    # the same code path on a CPU (smoke test)
#
# Assumptions (the GPU machine cannot reach the internet):
#   * a CUDA-enabled jax (jax[cuda12] or similar) is preinstalled, with equinox and numpy;
#     `import jaxode` works, or `pip install --no-index --no-deps -e .` succeeds (jaxode itself
#     is pure Python; any missing wheel must come from a carried wheel cache, e.g. PIP_FIND_LINKS);
#   * diffrax is optional: timed too if importable, skipped otherwise;
#   * the CPU references are the cached files in benchmarks/reference/ (committed; built by
#     `python benchmarks/workloads.py` on a CPU machine): the scipy DOP853 trajectory and the
#     float64 gradient of mlp-batch at batch 256, t1 = 1.
#
# What it does, within 5 minutes (the whole Python part runs under `timeout`):
#   1. correctness on the device, batch 256, float32, rtol = atol = 1e-5, matmuls at "highest"
#      precision (TF32 would cost ~1e-3 relative error per matmul): for dopri5 and tsit5 the final
#      state must agree with the reference within 1000 tolerances (RMS of |y - y_ref| /
#      (atol + rtol |y_ref|)), as in run.py; the adjoint, backprop and checkpoint gradients must
#      be within 5e-2 relative of the float64 reference (CPU float32 gives ~6e-3). The same numbers at the
#      default matmul precision are printed for information;
#   2. timing at batch 4096 (--quick: 512): forward solve, adjoint, backprop and checkpoint
#      gradients of jaxode dopri5, and diffrax Dopri5 forward / BacksolveAdjoint /
#      RecursiveCheckpointAdjoint;
#      first call (compile) and steady median of 5 (--quick: 1) calls, printed as a table.
# Exit status: 0 when every check passes, 1 when one fails, 124 on timeout.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$HERE/.."

if ! python -c "import jaxode" 2>/dev/null; then
    echo "jaxode not importable: trying an offline editable install" >&2
    pip install --no-index --no-deps -e . >&2
fi

LIMIT="${GPU_SH_TIMEOUT:-290}"
exec timeout "$LIMIT" python - "$HERE" "$@" <<'PY'
import statistics
import sys
import time

here = sys.argv[1]
quick = "--quick" in sys.argv[2:]
sys.path.insert(0, here)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import workloads as W  # noqa: E402

import jaxode  # noqa: E402

t_start = time.perf_counter()
dev = jax.devices()[0]
print(f"device: {dev.platform} {getattr(dev, 'device_kind', '')}; jax {jax.__version__}; "
      f"jaxode {jaxode.__version__}; quick={quick}", flush=True)
try:
    import diffrax
except ImportError:
    diffrax = None
    print("diffrax not importable: timing jaxode only", flush=True)

MAX_STEPS = 4096
failures = []


def jax_inputs(w):
    return jnp.asarray(w.z0), jnp.asarray(w.ts), tuple(jnp.asarray(p) for p in w.params)


def jaxode_value_and_grad(w, solver, mode):
    def loss(p, z0, ts):
        ys = jaxode.odesolve(w.f, z0, ts, p, solver=solver, rtol=w.rtol, atol=w.atol, gradient=mode,
                             max_steps=MAX_STEPS)
        return W.mlp_loss(ys), ys

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


# ---- 1. correctness against the CPU references (batch 256) -------------------------------
w = W.mlp_batch(256)
z0, ts, params = jax_inputs(w)
ref_traj = W.reference_trajectory(w, compute=False)
ref_grad = W.reference_gradient(256, 1.0, compute=False)
if ref_traj is None or ref_grad is None:
    print("missing benchmarks/reference/*.npz: run `python benchmarks/workloads.py` on a CPU first")
    sys.exit(1)

for precision in ("highest", "default"):
    checked = precision == "highest"
    with jax.default_matmul_precision(precision):
        for solver in ("dopri5", "tsit5"):
            fwd = jax.jit(lambda z0, ts, p, s=solver: jaxode.odesolve(
                w.f, z0, ts, p, solver=s, rtol=w.rtol, atol=w.atol, max_steps=MAX_STEPS, full_output=True))
            ys, info = fwd(z0, ts, params)
            ys = np.asarray(ys, np.float64)
            fs = W.final_scaled_error(ys[-1], ref_traj[-1], w.rtol, w.atol)
            ok = bool(np.isfinite(fs) and fs <= 1000)
            print(f"[{precision:7s}] {solver} forward: steps {int(info.num_steps)}, nfe {int(info.nfe)}, "
                  f"final error {fs:.3g} tolerances, RMS error {W.trajectory_error(ys, ref_traj):.3g}"
                  f"  {'ok' if ok else 'FAIL'}", flush=True)
            if checked and not ok:
                failures.append(f"{solver} forward final state")
        for mode in ("adjoint", "backprop", "checkpoint"):
            (loss, _), g = jaxode_value_and_grad(w, "dopri5", mode)(params, z0, ts)
            err = W.gradient_error([np.asarray(x) for x in g], ref_grad["grad"])
            ok = bool(np.isfinite(err) and err <= 5e-2)
            print(f"[{precision:7s}] dopri5 {mode} gradient: error {err:.3g} (loss {float(loss):.6g}, "
                  f"reference {ref_grad['loss']:.6g})  {'ok' if ok else 'FAIL'}", flush=True)
            if checked and not ok:
                failures.append(f"dopri5 {mode} gradient")

# ---- 2. timing at a large batch ----------------------------------------------------------
batch = 512 if quick else 4096
repeats = 1 if quick else 5
wb = W.mlp_batch(batch)
z0, ts, params = jax_inputs(wb)


def time_it(fn, *args):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - t0)
    return first, statistics.median(samples), min(samples)


cases = [
    ("jaxode dopri5 forward", jax.jit(lambda z0, ts, p: jaxode.odesolve(
        wb.f, z0, ts, p, solver="dopri5", rtol=wb.rtol, atol=wb.atol, max_steps=MAX_STEPS))),
    ("jaxode dopri5 adjoint grad", jaxode_value_and_grad(wb, "dopri5", "adjoint")),
    ("jaxode dopri5 backprop grad", jaxode_value_and_grad(wb, "dopri5", "backprop")),
    ("jaxode dopri5 checkpoint grad", jaxode_value_and_grad(wb, "dopri5", "checkpoint")),
]
if diffrax is not None:
    def diffrax_fn(adjoint):
        kw = {} if adjoint is None else {"adjoint": adjoint}

        def solve(z0, ts, p):
            return diffrax.diffeqsolve(
                diffrax.ODETerm(lambda t, y, a: wb.f(y, t, a)), diffrax.Dopri5(), t0=ts[0], t1=ts[-1],
                dt0=None, y0=z0, args=p, saveat=diffrax.SaveAt(ts=ts),
                stepsize_controller=diffrax.PIDController(rtol=wb.rtol, atol=wb.atol),
                max_steps=MAX_STEPS, **kw).ys

        if adjoint is None:
            return jax.jit(lambda z0, ts, p: solve(z0, ts, p))
        return jax.jit(jax.value_and_grad(lambda p, z0, ts: W.mlp_loss(solve(z0, ts, p))))

    cases += [
        ("diffrax Dopri5 forward", diffrax_fn(None)),
        ("diffrax Dopri5 BacksolveAdjoint grad", diffrax_fn(diffrax.BacksolveAdjoint())),
        ("diffrax Dopri5 RecursiveCheckpointAdjoint grad", diffrax_fn(diffrax.RecursiveCheckpointAdjoint())),
    ]

rows = []
for name, fn in cases:
    args = (z0, ts, params) if "forward" in name else (params, z0, ts)
    try:
        first, med, mn = time_it(fn, *args)
        rows.append((name, f"{first:.2f}", f"{med * 1e3:.2f}", f"{mn * 1e3:.2f}"))
    except Exception as e:  # a peer failing must not hide the rest
        rows.append((name, "error", type(e).__name__, str(e)[:60]))
    print(f"timed {name}", flush=True)

print(f"\nmlp-batch, batch {batch}, float32, rtol = atol = 1e-5, default matmul precision, "
      f"{repeats} steady calls after a warm-up")
header = ("case", "first call s", "median ms", "min ms")
widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(4)]
for r in [header] + rows:
    print("  ".join(str(c).ljust(wd) for c, wd in zip(r, widths)).rstrip())
print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
if failures:
    print("FAILED checks: " + ", ".join(failures))
    sys.exit(1)
print("all checks passed")
PY
