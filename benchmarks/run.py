"""jaxode's benchmark runner.

    python benchmarks/run.py [--suite adjoint|peers|overhead|traps|all] [--quick] [--repeats N]
                             [--out benchmarks/RESULTS.md]
    python benchmarks/run.py --render benchmarks/RESULTS.json   # re-write the report only

Writes the report (``--out``), its data (the same path with ``.json``) and PNG plots beside it.
Every measurement runs in a worker subprocess (``run.py --worker SPEC``): float64 workloads
with ``JAX_ENABLE_X64=1``, float32 ones without, and each peak-memory / first-call case in a
fresh process of its own. See benchmarks/README.md for what each suite measures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import numpy as np  # noqa: E402
import workloads as W  # noqa: E402

# A final state "agrees" with the reference when the RMS over its elements of
# |y - y_ref| / (atol + rtol |y_ref|) is at most this: the tolerances are local (per step), so
# the global error of a correct solver is typically 1-100 of them.
AGREE = {"spiral": 1000.0, "pendulum": 1000.0, "mlp-batch": 1000.0}
SLOW_CALL_S = 1.0  # steady calls slower than this get at most 2 samples
RESULT_TAG = "@@RESULT "


# =======================================================================================
# measuring


def now() -> float:
    return time.perf_counter()


def timed(call, repeats: int, target_s: float = 0.1) -> tuple[dict, object]:
    """Steady-state time of ``call`` (already compiled): median/min/max over ``repeats``.

    One warm-up call, which also calibrates: calls faster than ``target_s`` are looped
    ``number`` times per sample; calls slower than ``SLOW_CALL_S`` get at most 2 samples (the
    warm-up counted as one).
    """
    t0 = now()
    out = call()
    single = now() - t0
    samples = []
    if single >= SLOW_CALL_S:
        number, samples = 1, [single]
        reps = max(0, min(repeats, 2) - 1)
    else:
        number = max(1, min(2000, int(target_s / max(single, 1e-7))))
        reps = repeats
    for _ in range(reps):
        t0 = now()
        for _ in range(number):
            out = call()
        samples.append((now() - t0) / number)
    stats = {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "max_s": max(samples),
        "samples": len(samples),
        "number": number,
    }
    return stats, out


def timed_interleaved(calls: dict, repeats: int, numbers: dict | None = None) -> dict:
    """Steady-state times of several compiled ``calls`` (``{key: call}``), sampled in rounds
    of one sample of each, so that drift in the machine's load affects them alike (measured
    alone, the first of several calls ran ~1.5x slower than later ones in the same process):
    ``{key: {"median_s", "min_s", "max_s", "samples"}}``; ``numbers[key]`` calls per sample."""
    samples = {key: [] for key in calls}
    for _ in range(repeats):
        for key, call in calls.items():
            number = (numbers or {}).get(key, 1)
            t0 = now()
            for _ in range(number):
                call()
            samples[key].append((now() - t0) / number)
    return {key: {"median_s": float(np.median(v)), "min_s": float(np.min(v)), "max_s": float(np.max(v)),
                  "samples": len(v)} for key, v in samples.items()}


def proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def grad_error_or_none(grads, ref):
    return None if ref is None else W.gradient_error(grads, ref["grad"])


def jax_backend_warmup():
    import jax
    import jax.numpy as jnp

    jax.block_until_ready(jax.jit(lambda x: x + 1)(jnp.zeros(4)))


def jax_device() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform}: {getattr(d, 'device_kind', '')}"


# =======================================================================================
# worker tasks (each runs inside a subprocess)


def _check_forward(w, ys, ref) -> dict:
    ys = np.asarray(ys, np.float64).reshape(ref.shape)
    fs = W.final_scaled_error(ys[-1], ref[-1], w.rtol, w.atol)
    return {"rms_error": W.trajectory_error(ys, ref), "final_scaled_error": fs, "agrees": fs <= AGREE[w.name]}


def _run_cases(cases, check, repeats: int, count: bool = True) -> list[dict]:
    """Builds every case and makes its first call (timed: compile included); checks agreement
    (``check(output) -> dict`` with ``agrees``) before timing anything; then times the cases
    that agree and counts their field evaluations in separate runs."""
    rows, built = [], []
    for label, builder in cases:
        row = {"label": label}
        try:
            case = builder()
            row.update(library=case.library, method=case.method, note=case.note)
            t0 = now()
            out = case.call()
            row["first_s"] = now() - t0
            row.update(check(case.to_numpy(out)))
            if case.stats is not None:
                row.update(case.stats(out))
            if not row["agrees"]:
                raise AssertionError(f"{label}: final state disagrees with the reference "
                                     f"({row.get('final_scaled_error')} tolerances)")
            built.append((row, case))
        except Exception as e:  # a peer that fails is reported, not fatal
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        rows.append(row)
        print(f"  checked {label}: {row.get('error', 'ok')}", file=sys.stderr, flush=True)
    for row, case in built:
        try:
            row.update(timed(case.call, repeats)[0])
            if count and case.count is not None:
                row.update(case.count())
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        print(f"  timed {row['label']}: {row.get('median_s', float('nan')) * 1e3:.2f} ms",
              file=sys.stderr, flush=True)
    return rows


def task_forward(spec: dict) -> dict:
    """Peers, forward: every library on one workload."""
    import peers as P

    if spec["workload"] == "mlp-batch":
        w = W.mlp_batch(spec["batch"])
    else:
        w = W.get(spec["workload"])
    jax_backend_warmup()
    if P.available("torch"):
        P.torch_threads()
    ref = W.reference_trajectory(w)
    rows = _run_cases(P.forward_cases(w), lambda ys: _check_forward(w, ys, ref), spec["repeats"])
    return {"workload": w.key, "rows": rows, "device": jax_device()}


def _check_grad(w, out, ref_traj, ref_grad) -> dict:
    loss, ys, grads = out
    row = _check_forward(w, ys, ref_traj) if ref_traj is not None else {"agrees": True}
    row["loss"] = loss
    row["grad_error"] = grad_error_or_none(grads, ref_grad)
    if not all(np.all(np.isfinite(g)) for g in grads):
        row["agrees"] = False
    return row


def task_grad_peers(spec: dict) -> dict:
    """Peers, gradients on mlp-batch (batched), and the vmap cases."""
    import peers as P

    w = W.mlp_batch(spec["batch"])
    jax_backend_warmup()
    if P.available("torch"):
        P.torch_threads()
    ref_traj = W.reference_trajectory(w, compute=False)
    ref_grad = W.reference_gradient(spec["batch"], 1.0, compute=False)
    cases = P.grad_cases(w)
    solvers = spec.get("solvers", w.solvers)
    cases = [c for c in cases if any(s in c[0] for s in solvers)]
    rows = _run_cases(cases, lambda out: _check_grad(w, out, ref_traj, ref_grad), spec["repeats"])
    vmap_cases = [(f"jaxode {s} adjoint vmap", lambda s=s: P.jaxode_grad(w, s, "adjoint", vmap=True))
                  for s in solvers]
    vmap_cases += [(f"jaxode {s} adjoint batched=True",
                    lambda s=s: P.jaxode_grad(w, s, "adjoint", batched=True)) for s in solvers]
    vmap_cases.append(("jaxode dopri5 checkpoint vmap",
                       lambda: P.jaxode_grad(w, "dopri5", "checkpoint", vmap=True)))
    if P.available("diffrax") and spec.get("diffrax_vmap", True):
        vmap_cases.append(("diffrax dopri5 BacksolveAdjoint vmap",
                           lambda: P.diffrax_grad(w, "dopri5", "backsolve", vmap=True)))
    vrows = _run_cases(vmap_cases, lambda out: _check_grad(w, out, ref_traj, ref_grad),
                       min(spec["repeats"], 2), count=False)
    return {"workload": w.key, "rows": rows, "vmap_rows": vrows, "device": jax_device()}


def task_adjoint_grid(spec: dict) -> dict:
    """Adjoint suite: jaxode adjoint / adjoint+seminorm / backprop / checkpoint over horizons x
    tolerances."""
    import jax
    import jax.numpy as jnp
    import peers as P

    import jaxode

    batch, solver = spec["batch"], spec["solver"]
    w = W.mlp_batch(batch)
    z0, _, params = P.jax_data(w)
    jax_backend_warmup()
    modes = [("adjoint", False), ("adjoint", True), ("backprop", False), ("checkpoint", False)]
    fns = {m: P.jaxode_grad_fn(w.f, solver, m[0], m[1]) for m in modes}
    fwd = jax.jit(lambda z0, ts, p, tol: jaxode.odesolve(
        w.f, z0, ts, p, solver=solver, rtol=tol, atol=tol, max_steps=P.MAX_STEPS, full_output=True))

    bwd_fns = {
        sn: jax.jit(lambda z0, ts, p, tol, ct, sn=sn: jaxode.adjoint_backward_info(
            w.f, z0, ts, p, cotangent=ct, solver=solver, rtol=tol, atol=tol, max_steps=P.MAX_STEPS,
            adjoint_seminorm=sn))
        for sn in (False, True)
    }

    def bwd_info(ts, tol, seminorm, ys):
        ct = 2 * ys / ys.size  # d mean(ys**2) / d ys
        return bwd_fns[seminorm](z0, ts, params, tol, ct)

    rows = []
    compiled = set()
    for t1 in spec["horizons"]:
        ts = jnp.linspace(0.0, t1, 11, dtype=jnp.float32)
        ref_grad = W.reference_gradient(batch, t1, compute=False)
        ref_traj = W.reference_trajectory(W.mlp_batch(batch, t1), compute=False)
        for tol in spec["tolerances"]:
            tol_a = jnp.asarray(tol, jnp.float32)
            try:
                ys, finfo = fwd(z0, ts, params, tol_a)
                fwd_stats = {"fwd_steps": int(finfo.num_steps), "fwd_nfe": int(finfo.nfe),
                             "fwd_status": int(finfo.status)}
            except Exception as e:
                fwd_stats = {"fwd_error": f"{type(e).__name__}: {str(e)[:200]}"}
                ys = None
            losses = {}
            for mode in modes:
                label = mode[0] + (" seminorm" if mode[1] else "")
                row = {"label": label, "t1": t1, "tol": tol, **fwd_stats}
                call = lambda fn=fns[mode]: jax.block_until_ready(fn(params, z0, ts, tol_a, tol_a))
                try:
                    if mode not in compiled:  # the first call of this jitted gradient: compile
                        t0 = now()
                        call()
                        row["first_s"] = now() - t0
                        compiled.add(mode)
                    stats, out = timed(call, spec["repeats"])
                    (loss, ys_g), grads = out
                    losses[label] = float(loss)
                    row.update(stats, loss=float(loss), grad_error=grad_error_or_none(grads, ref_grad))
                    if ref_traj is not None:
                        row.update(_check_forward(W.mlp_batch(batch, t1, rtol=tol), ys_g, ref_traj))
                    if mode[0] == "adjoint" and ys is not None:
                        (_, (_, binfo)) = bwd_info(ts, tol_a, mode[1], ys)
                        row.update(bwd_steps=int(binfo.num_steps), bwd_nfe=int(binfo.nfe),
                                   bwd_status=int(binfo.status))
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    traceback.print_exc()
                rows.append(row)
                print(f"  {label} t1={t1} tol={tol}: {row.get('median_s', float('nan')) * 1e3:.1f} ms "
                      f"err={row.get('grad_error')}", file=sys.stderr, flush=True)
            # every mode runs the same forward solve: the losses must agree
            if len(losses) > 1:
                vals = np.array(list(losses.values()))
                spread = float(np.max(np.abs(vals - vals[0])) / max(abs(vals[0]), 1e-30))
                assert spread < 1e-4, f"t1={t1} tol={tol}: losses of the gradient modes differ: {losses}"
    return {"solver": solver, "batch": batch, "rows": rows, "device": jax_device()}


def task_memory(spec: dict) -> dict:
    """One case in a fresh process: first call of a jitted training step (compile included),
    then the peak RSS of one steady call above the RSS just before it."""
    import jax
    import jax.numpy as jnp
    import optax
    import peers as P

    batch, t1, lib, mode = spec["batch"], spec["t1"], spec["library"], spec["mode"]
    w = W.mlp_batch(batch, t1)
    z0, ts, params = P.jax_data(w)
    tol = jnp.asarray(w.rtol, jnp.float32)
    seminorm = spec.get("seminorm", False)
    if lib == "jaxode":
        grad_fn = P.jaxode_grad_fn(w.f, "dopri5", mode, seminorm)
        value_and_grad = lambda p: grad_fn(p, z0, ts, tol, tol)
    elif lib == "diffrax":
        grad_fn = P.diffrax_grad_fn(w.f, "dopri5", mode, w.rtol, w.atol)
        value_and_grad = lambda p: grad_fn(p, z0, ts)
    else:
        grad_fn = P.jax_odeint_grad_fn(w.f, w.rtol, w.atol)
        value_and_grad = lambda p: grad_fn(p, z0, ts)
    opt = optax.adam(1e-3)

    @jax.jit
    def train_step(p, state):
        (loss, _), grads = value_and_grad(p)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    state = opt.init(params)
    jax_backend_warmup()
    rss0 = proc_status_kib("VmRSS")
    t0 = now()
    out = jax.block_until_ready(train_step(params, state))
    first = now() - t0
    peak_first = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    loss = float(out[2])
    can_reset = reset_peak_rss()
    rss1 = proc_status_kib("VmRSS")
    t0 = now()
    jax.block_until_ready(train_step(params, state))
    steady = now() - t0
    hwm = proc_status_kib("VmHWM")
    row = {
        "library": lib, "mode": mode, "seminorm": seminorm, "t1": t1, "batch": batch,
        "first_s": first, "steady_s": steady, "loss": loss,
        "baseline_mib": rss0 / 1024 if rss0 else None,
        "process_peak_mib": (peak_first - rss0) / 1024 if rss0 else None,
        "call_peak_mib": (hwm - rss1) / 1024 if (can_reset and hwm and rss1) else None,
    }
    if lib == "jaxode":
        import jaxode

        _, info = jax.jit(lambda p: jaxode.odesolve(w.f, z0, ts, p, solver="dopri5", rtol=tol, atol=tol,
                                                     max_steps=P.MAX_STEPS, full_output=True))(params)
        row.update(fwd_steps=int(info.num_steps), fwd_nfe=int(info.nfe))
        if mode == "adjoint":
            ys = jaxode.odesolve(w.f, z0, ts, params, solver="dopri5", rtol=tol, atol=tol,
                                 max_steps=P.MAX_STEPS)
            (_, (_, binfo)) = jaxode.adjoint_backward_info(
                w.f, z0, ts, params, cotangent=2 * ys / ys.size, solver="dopri5", rtol=tol, atol=tol,
                max_steps=P.MAX_STEPS, adjoint_seminorm=seminorm)
            row.update(bwd_steps=int(binfo.num_steps), bwd_nfe=int(binfo.nfe))
    return row


def task_overhead(spec: dict) -> dict:
    """jaxode solve time / (NFE x time of one field evaluation), same process, same shapes."""
    import jax
    import peers as P

    w = W.mlp_batch(spec["batch"]) if spec["workload"] == "mlp-batch" else W.get(spec["workload"])
    z0, ts, params = P.jax_data(w)
    jax_backend_warmup()
    f_single = jax.jit(w.f)
    t_single, _ = timed(lambda: jax.block_until_ready(f_single(z0, ts[0], params)), spec["repeats"])
    k, unroll = 1000, 10

    @jax.jit
    def f_loop(z0, p):  # k dependent evaluations in one compiled loop, `unroll` per iteration
        def body(i, z):
            for j in range(unroll):
                z = z + 1e-6 * w.f(z, ts[0] + 1e-6 * (unroll * i + j).astype(z.dtype), p)
            return z

        return jax.lax.fori_loop(0, k // unroll, body, z0)

    jax.block_until_ready(f_loop(z0, params))
    t_loop, _ = timed(lambda: jax.block_until_ready(f_loop(z0, params)), spec["repeats"])
    f_eval = {"single_s": t_single["median_s"], "in_loop_s": t_loop["median_s"] / k}
    rows = []
    builders = [(f"jaxode {s}", lambda s=s: P.jaxode_forward(w, s)) for s in w.solvers]
    if P.available("diffrax"):
        builders += [(f"diffrax {s}", lambda s=s: P.diffrax_forward(w, s)) for s in w.solvers]
    for label, b in builders:
        case = b()
        case.call()
        stats, _ = timed(case.call, spec["repeats"])
        nfe = case.count()["nfe"]
        t = stats["median_s"]
        rows.append({
            "label": label, **stats, "nfe": nfe,
            "overhead_in_loop": t / (nfe * f_eval["in_loop_s"]),
            "overhead_single": t / (nfe * f_eval["single_s"]),
        })
        print(f"  {label}: {t * 1e3:.2f} ms, nfe {nfe}, overhead {rows[-1]['overhead_in_loop']:.2f}",
              file=sys.stderr, flush=True)
    return {"workload": w.key, "f_eval": f_eval, "rows": rows, "device": jax_device()}


def _grad_rel_diff(a, b) -> float:
    """``|a - b| / |b|`` over all leaves of two gradient pytrees."""
    import jax

    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    num = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
              for x, y in zip(la, lb, strict=True))
    den = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in lb)
    return float(np.sqrt(num / max(den, 1e-300)))


def task_node(spec: dict) -> dict:
    """The README's training pattern: a ``jaxode.nn.NeuralODE`` (``MLPField(2, width=64,
    depth=2)``, tsit5, rtol 1e-3, atol 1e-4, 20 output times in [0, 1]) on a batch of 2-D
    points, ``eqx.filter_value_and_grad`` of the MSE to ``z0 exp(-t)``: the batch under
    ``eqx.filter_vmap(model)`` (default adjoint; and ``checkpoint``), with ``batched=True``,
    as one state ``model(z0s)``, and diffrax's ``BacksolveAdjoint`` under ``jax.vmap`` (same
    field, Tsit5, PIDController, same tolerances). Each gradient is compared with a one-state
    ``checkpoint`` gradient at rtol = atol = 1e-6."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import peers as P

    from jaxode.nn import MLPField, NeuralODE

    batch = spec["batch"]
    jax_backend_warmup()
    field = MLPField(2, width=64, depth=2, key=jax.random.key(0))
    ts = jnp.linspace(0.0, 1.0, 20)
    z0s = jax.random.normal(jax.random.key(1), (batch, 2))
    data = jnp.stack([z0s * jnp.exp(-t) for t in ts], axis=1)  # (B, 20, 2): z' = -z

    def node(gradient="adjoint", batched=False, rtol=1e-3, atol=1e-4):
        return NeuralODE(field, ts=ts, rtol=rtol, atol=atol, gradient=gradient, batched=batched)

    patterns = {  # (B, 2) -> (B, 20, 2)
        "vmap": lambda m, z: eqx.filter_vmap(m)(z),
        "batched": lambda m, z: m(z),
        "one state": lambda m, z: m(z).swapaxes(0, 1),
    }

    def grad_fn(model, pattern):
        def loss(m):
            return jnp.mean((patterns[pattern](m, z0s) - data) ** 2)

        fn = eqx.filter_jit(eqx.filter_value_and_grad(loss))
        return lambda: jax.block_until_ready(fn(model))

    ref = grad_fn(node("checkpoint", rtol=1e-6, atol=1e-6), "one state")()[1]

    def jaxode_case(gradient, pattern, batched=False):
        call = grad_fn(node(gradient, batched), pattern)
        method = f"NeuralODE {gradient} " + ("batched=True" if batched else pattern)
        return P.Case("jaxode", method, call, lambda out: out)

    def diffrax_case():
        import diffrax

        def solve(m, z):
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(lambda t, y, f: f(y, t)), diffrax.Tsit5(), t0=ts[0], t1=ts[-1], dt0=None,
                y0=z, args=m.field, saveat=diffrax.SaveAt(ts=ts),
                stepsize_controller=diffrax.PIDController(rtol=1e-3, atol=1e-4), max_steps=P.MAX_STEPS,
                adjoint=diffrax.BacksolveAdjoint())
            return sol.ys

        def loss(m):
            return jnp.mean((jax.vmap(lambda z: solve(m, z))(z0s) - data) ** 2)

        fn = eqx.filter_jit(eqx.filter_value_and_grad(loss))
        return P.Case("diffrax", "Tsit5 BacksolveAdjoint vmap", lambda: jax.block_until_ready(fn(node())),
                      lambda out: out)

    def check(out):
        loss, grads = out
        finite = all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))
        return {"loss": float(loss), "grad_diff": _grad_rel_diff(grads, ref), "agrees": bool(finite)}

    cases = [
        ("adjoint one state", lambda: jaxode_case("adjoint", "one state")),
        ("adjoint vmap", lambda: jaxode_case("adjoint", "vmap")),
        ("adjoint batched=True", lambda: jaxode_case("adjoint", "batched", batched=True)),
        ("checkpoint vmap", lambda: jaxode_case("checkpoint", "vmap")),
    ]
    if spec.get("quick"):  # the T4 pair only
        cases = cases[:2]
    elif P.available("diffrax"):
        cases.append(("diffrax BacksolveAdjoint vmap", diffrax_case))
    rows = _run_cases(cases, check, spec["repeats"], count=False)
    return {"batch": batch, "rows": rows, "device": jax_device()}


def task_backprop_steps(spec: dict) -> dict:
    """mlp-batch, ``gradient="backprop"``: gradient time at several ``max_steps`` (the solve
    takes the same steps at each), for the batch under ``jax.vmap`` and as one state. The
    gradients at every ``max_steps`` must agree (the same computed solution)."""
    import jax
    import jax.numpy as jnp
    import peers as P

    batch = spec["batch"]
    w = W.mlp_batch(batch)
    z0, ts, params = P.jax_data(w)
    tol = jnp.asarray(w.rtol, jnp.float32)
    jax_backend_warmup()
    rows, first_grads = [], {}
    for pattern in ("vmap", "one state"):
        calls, pattern_rows = {}, []
        for max_steps in spec["max_steps"]:
            fn = P.jaxode_grad_fn(w.f, "dopri5", "backprop", vmap=pattern == "vmap", max_steps=max_steps)
            call = lambda fn=fn: jax.block_until_ready(fn(params, z0, ts, tol, tol))
            row = {"label": f"backprop {pattern} max_steps={max_steps}", "pattern": pattern,
                   "max_steps": max_steps}
            try:
                t0 = now()
                out = call()
                row["first_s"] = now() - t0
                grads = out[1]
                row["loss"] = float(out[0][0])
                if not all(np.all(np.isfinite(np.asarray(g))) for g in grads):
                    raise AssertionError("non-finite gradient")
                base = first_grads.setdefault(pattern, grads)
                row["grad_diff_vs_first"] = _grad_rel_diff(grads, base)
                if row["grad_diff_vs_first"] > 1e-4:
                    raise AssertionError(
                        f"gradient differs across max_steps: {row['grad_diff_vs_first']:.2e}")
                call()
                calls[max_steps] = call
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                traceback.print_exc()
            pattern_rows.append(row)
        stats = timed_interleaved(calls, spec["repeats"])
        for row in pattern_rows:
            row.update(stats.get(row["max_steps"], {}))
            print(f"  {row['label']}: {row.get('median_s', float('nan')) * 1e3:.1f} ms", file=sys.stderr,
                  flush=True)
        rows += pattern_rows
    return {"batch": batch, "rows": rows, "device": jax_device()}


def task_eager(spec: dict) -> dict:
    """Eager ``odesolve`` and eager ``jax.grad`` (outside ``jax.jit``), repeated with the same
    field object, against the same computation inside ``jax.jit``; and one eager call with a
    fresh ``lambda`` (a cache miss: compiles again)."""
    import jax
    import jax.numpy as jnp
    import peers as P

    import jaxode

    w = W.mlp_batch(spec["batch"]) if spec["workload"] == "mlp-batch" else W.get(spec["workload"])
    z0, ts, params = P.jax_data(w)
    jax_backend_warmup()

    def solve(p, f=w.f):
        return jaxode.odesolve(f, z0, ts, p, solver="dopri5", rtol=w.rtol, atol=w.atol, max_steps=P.MAX_STEPS)

    def loss(p):
        return jnp.mean(solve(p) ** 2)

    jitted_solve = jax.jit(solve)
    with_arrays = jax.jit(lambda p, z0, ts: jaxode.odesolve(w.f, z0, ts, p, solver="dopri5", rtol=w.rtol,
                                                           atol=w.atol, max_steps=P.MAX_STEPS))
    fns = {"eager odesolve": solve, "jit odesolve": jitted_solve,
           # what the eager call runs: z0 and ts arguments of the compiled solve, not constants
           "jit odesolve, z0 and ts as arguments": lambda p: with_arrays(p, z0, ts),
           "eager jax.grad": jax.grad(loss), "jit jax.grad": jax.jit(jax.grad(loss)),
           # JAX's own floor: eager differentiation of a compiled call, no jaxode Python per call
           "eager jax.grad of jax.jit(odesolve)": jax.grad(lambda p: jnp.mean(jitted_solve(p) ** 2))}
    rows, outs, calls = [], {}, {}
    for label, fn in fns.items():
        call = lambda fn=fn: jax.block_until_ready(fn(params))
        row = {"label": label}
        t0 = now()
        call()
        row["first_s"] = now() - t0
        t0 = now()
        outs[label] = call()
        row["second_s"] = now() - t0
        row["number"] = max(1, min(2000, int(0.1 / max(row["second_s"], 1e-7))))
        rows.append(row)
        calls[label] = call
    stats = timed_interleaved(calls, spec["repeats"], {row["label"]: row["number"] for row in rows})
    for row in rows:
        row.update(stats[row["label"]])
        print(f"  {row['label']}: second {row['second_s'] * 1e3:.2f} ms, "
              f"steady {row['median_s'] * 1e3:.3f} ms", file=sys.stderr, flush=True)
    for a, b in (("eager odesolve", "jit odesolve"), ("eager jax.grad", "jit jax.grad"),
                 ("eager jax.grad of jax.jit(odesolve)", "jit jax.grad")):
        diff = _grad_rel_diff(outs[a], outs[b])
        assert diff < 1e-5, f"{a} and {b} disagree: {diff:.2e}"
    t0 = now()
    jax.block_until_ready(solve(params, f=lambda z, t, p: w.f(z, t, p)))
    fresh = now() - t0
    return {"workload": w.key, "rows": rows, "fresh_lambda_s": fresh, "device": jax_device()}


TASKS = {
    "forward": task_forward,
    "grad_peers": task_grad_peers,
    "adjoint_grid": task_adjoint_grid,
    "memory": task_memory,
    "overhead": task_overhead,
    "node": task_node,
    "backprop_steps": task_backprop_steps,
    "eager": task_eager,
}


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    result = TASKS[spec["task"]](spec)
    print(RESULT_TAG + json.dumps(result, default=_json_default), flush=True)


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.bool_):
        return bool(x)
    raise TypeError(type(x))


# =======================================================================================
# orchestration


def spawn(spec: dict, x64: bool = False, timeout: float = 1800, env: dict | None = None) -> dict:
    """Runs one task in a fresh subprocess (``env``: variables added to its environment);
    returns its result, or ``{"error": ...}``."""
    env = {**os.environ, **(env or {})}
    env["JAX_ENABLE_X64"] = "1" if x64 else "0"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    cmd = [sys.executable, os.path.join(HERE, "run.py"), "--worker", json.dumps(spec)]
    t0 = now()
    try:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "spec": spec}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith(RESULT_TAG):
            out = json.loads(line[len(RESULT_TAG):])
            if isinstance(out, dict):
                out["wall_s"] = now() - t0
            return out
    return {"error": f"worker exited with {proc.returncode} and no result", "spec": spec}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Config:
    def __init__(self, quick: bool, repeats: int | None):
        self.quick = quick
        self.batch = W.QUICK_BATCH if quick else W.MLP_BATCH
        self.repeats = repeats if repeats is not None else (1 if quick else 5)
        self.horizons = (1.0, 4.0) if quick else W.horizons()
        self.tolerances = (1e-3, 1e-5) if quick else (1e-3, 1e-5, 1e-7)

    def as_dict(self) -> dict:
        return {"quick": self.quick, "batch": self.batch, "repeats": self.repeats,
                "horizons": list(self.horizons), "tolerances": list(self.tolerances)}


def memory_cases(cfg: Config) -> list[dict]:
    import peers as P

    cases = []
    for t1 in cfg.horizons:
        cases.append({"library": "jaxode", "mode": "adjoint", "t1": t1})
        if not cfg.quick:
            cases.append({"library": "jaxode", "mode": "adjoint", "seminorm": True, "t1": t1})
        cases.append({"library": "jaxode", "mode": "backprop", "t1": t1})
        cases.append({"library": "jaxode", "mode": "checkpoint", "t1": t1})
        if t1 == 1.0:  # first call only: reversible is inaccurate on this dissipative field
            cases.append({"library": "jaxode", "mode": "reversible", "t1": t1})
        if P.available("diffrax") and not cfg.quick:
            cases += [{"library": "diffrax", "mode": "backsolve", "t1": t1},
                      {"library": "diffrax", "mode": "recursive", "t1": t1}]
        if P.available("jax.experimental.ode") and (not cfg.quick or t1 == 1.0):
            cases.append({"library": "jax odeint", "mode": "adjoint", "t1": t1})
    return cases


def suite_adjoint(cfg: Config) -> dict:
    log("adjoint suite: horizons x tolerances grid (one process)")
    grid = spawn({"task": "adjoint_grid", "batch": cfg.batch, "solver": "dopri5", "repeats": cfg.repeats,
                  "horizons": list(cfg.horizons), "tolerances": list(cfg.tolerances)})
    mem = []
    for case in memory_cases(cfg):
        log(f"adjoint suite: memory / first call, fresh process: {case}")
        r = spawn({"task": "memory", "batch": cfg.batch, **case})
        mem.append({**case, **r} if "error" in r else r)
    log("adjoint suite: vmap vs batched gradients (in the peers' gradient process)")
    return {"grid": grid, "memory": mem}


def suite_peers(cfg: Config) -> dict:
    out = {"forward": {}}
    for name, x64 in (("spiral", True), ("pendulum", True), ("mlp-batch", False)):
        log(f"peers suite: forward, {name}")
        out["forward"][name] = spawn({"task": "forward", "workload": name, "batch": cfg.batch,
                                      "repeats": cfg.repeats}, x64=x64)
    return out


def suite_gradients(cfg: Config) -> dict:
    log("peers/adjoint suites: mlp-batch gradients of every library, and vmap")
    spec = {"task": "grad_peers", "batch": cfg.batch, "repeats": cfg.repeats}
    if cfg.quick:  # one tableau, no diffrax vmap (its compile alone takes ~25 s)
        spec.update(solvers=["dopri5"], diffrax_vmap=False)
    return spawn(spec)


# glibc's malloc: allocations up to 32 MiB from the heap (not mmap), freed memory kept: a
# program's large temporaries are then not mapped (and page-faulted) afresh at every call
MALLOC_KEEPS_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(4 << 30),
                       "MALLOC_TOP_PAD_": str(256 << 20)}


def suite_traps(cfg: Config) -> dict:
    """Issue 12's speed traps: the README's NeuralODE + ``eqx.filter_vmap`` pattern (adjoint
    under vmap vs one state), vmapped ``backprop`` at several ``max_steps``, eager calls vs
    jitted ones."""
    out = {}
    log("traps suite: NeuralODE + eqx.filter_vmap (README pattern), batch 128")
    out["node"] = spawn({"task": "node", "batch": 128, "repeats": cfg.repeats, "quick": cfg.quick})
    max_steps = [256, 1024] if cfg.quick else [256, 1024, 4096]
    log(f"traps suite: vmapped backprop gradient at max_steps {max_steps}")
    spec = {"task": "backprop_steps", "batch": 16 if cfg.quick else 128, "repeats": max(cfg.repeats, 7),
            "max_steps": max_steps}
    out["backprop_steps"] = spawn(spec)
    log("traps suite: the same, glibc's malloc keeping freed memory (MALLOC_* variables)")
    out["backprop_steps_malloc"] = spawn(spec, env=MALLOC_KEEPS_MEMORY)
    out["eager"] = {}
    for name, x64 in (("spiral", True),) + ((("mlp-batch", False),) if not cfg.quick else ()):
        log(f"traps suite: eager vs jitted calls, {name}")
        out["eager"][name] = spawn({"task": "eager", "workload": name, "batch": cfg.batch,
                                    "repeats": cfg.repeats}, x64=x64)
    return out


def suite_overhead(cfg: Config) -> dict:
    out = {}
    for name, x64 in (("mlp-batch", False), ("spiral", True)):
        log(f"overhead suite: {name}")
        out[name] = spawn({"task": "overhead", "workload": name, "batch": cfg.batch,
                           "repeats": max(cfg.repeats, 3)}, x64=x64)
    return out


# =======================================================================================
# machine and report


def git_info() -> str:
    """The commit the library was measured at (``-dirty`` when jaxode/ has local changes)."""
    root = os.path.dirname(HERE)
    try:
        head = subprocess.run(["git", "-C", root, "log", "-1", "--format=%h %cI", "--", "jaxode"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "jaxode"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + (" (dirty)" if dirty else "")


def machine_info() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as fh:
            models = [ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")]
        info["cpu"] = models[0] if models else platform.processor()
        info["logical_cpus"] = len(models)
    except OSError:
        info["cpu"] = platform.processor()
    try:
        with open("/proc/meminfo") as fh:
            kib = int(next(ln for ln in fh if ln.startswith("MemTotal")).split()[1])
        info["ram_gib"] = round(kib / 2**20, 1)
    except (OSError, StopIteration):
        pass
    try:
        with open("/etc/os-release") as fh:
            for ln in fh:
                if ln.startswith("PRETTY_NAME="):
                    info["os"] = ln.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=("adjoint", "peers", "overhead", "traps", "all"), default="all")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run: 1 repeat, batch 64, fewer cases")
    ap.add_argument("--repeats", type=int, default=None, help="timed samples per case (default 5; quick 1)")
    ap.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--render", metavar="JSON", help="only re-write the report from saved results")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    import report

    if args.render:
        with open(args.render) as fh:
            results = json.load(fh)
        report.write(results, args.out)
        return 0
    cfg = Config(args.quick, args.repeats)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    import peers as P

    results = {
        "config": cfg.as_dict(),
        "suite": args.suite,
        "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": P.versions(),
    }
    results["versions"]["jaxode commit (last change to jaxode/)"] = git_info()
    t0 = now()
    # the references are built (slowly, once) before any timing
    log("references")
    for w in (W.spiral(), W.pendulum(), W.mlp_batch(cfg.batch)):
        W.reference_trajectory(w)
    W.reference_gradient(cfg.batch, 1.0)
    if not cfg.quick:
        for t1 in cfg.horizons:
            W.reference_gradient(cfg.batch, t1)
            W.reference_trajectory(W.mlp_batch(cfg.batch, t1))
    if args.suite in ("peers", "all"):
        results["peers"] = suite_peers(cfg)
    if args.suite in ("adjoint", "peers", "all"):
        results["gradients"] = suite_gradients(cfg)
    if args.suite in ("adjoint", "all"):
        results["adjoint"] = suite_adjoint(cfg)
    if args.suite in ("overhead", "all"):
        results["overhead"] = suite_overhead(cfg)
    if args.suite in ("traps", "all"):
        results["traps"] = suite_traps(cfg)
    results["wall_s"] = now() - t0
    results["machine"]["loadavg_end"] = os.getloadavg()
    stem = os.path.splitext(args.out)[0]
    with open(stem + ".json", "w") as fh:
        json.dump(results, fh, indent=1, default=_json_default)
    report.write(results, args.out)
    log(f"done in {results['wall_s']:.0f} s: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
