"""gradient="reversible" beside "adjoint", "checkpoint" and "backprop" (issue 17).

    python benchmarks/reversible.py [--batch 256] [--horizons 1 16 64] [--tolerances 1e-3 1e-5]
                                    [--repeats 3] [--large] [--crossover] [--parts mlp large crossover]
                                    [--no-peers] [--out benchmarks/results/reversible.md]
    JAX_ENABLE_X64=1 python benchmarks/reversible.py --convergence --horizons 16 \
                                    --tolerances 1e-5 1e-7 1e-9
    JAX_ENABLE_X64=1 python benchmarks/reversible.py --fits

mlp-batch (``workloads.mlp_batch``: the whole ``(batch, 32)`` state as one ODE, dopri5, float32,
``ts = linspace(0, t1, 11)``, loss ``mean(ys**2)``), for each ``t1`` and tolerance and mode (jaxode's
four, and diffrax's ``BacksolveAdjoint`` and ``RecursiveCheckpointAdjoint`` through
``peers.diffrax_grad_fn``: Dopri5, PIDController at the same tolerances, ``dt0=None``):

* time: the median of ``repeats`` steady-state calls of the jitted ``value_and_grad``
  (``run.timed``);
* memory: XLA's compiled temporary memory of that function (``memory_analysis()``,
  ``temp_size_in_bytes``), which is what grows with the steps (static: it depends on
  ``max_steps``, not on ``t1``);
* gradient error: ``|g - g_ref| / |g_ref|`` against the float64 reference gradient
  (``workloads.reference_gradient``, dopri8 at rtol 1e-10, atol 1e-12), where cached.

And a large state (``--large``: a ``(64, 1024)`` state, ``tanh(z W) - z``), compiled only: the
temporary memory of each mode (diffrax's two included) at ``max_steps`` 256 and 4096, where the
checkpoint slots are the memory. ``--crossover``: on that state, fixed-step midpoint
(``dt0 = 1/N``, ``N`` = 16 .. 1024 steps over ``[0, 1]``, loss on ``z(1)``), the time of
jit(grad) of "reversible", "checkpoint" and diffrax's ``RecursiveCheckpointAdjoint`` with its
default checkpoint count (90 at ``max_steps`` 4096) and with 8: where recomputation starts to
cost. Writes a markdown table to ``--out`` and the rows as JSON beside it.

``--convergence`` (float64): the gradient and ``ys`` errors of "reversible" and "checkpoint" at
one horizon as the tolerance tightens, to ``results/reversible_convergence.md``.

``--fits`` (x64 on; float32 and float64 runs): the gradient error of "reversible", "checkpoint"
and "adjoint" on non-dissipative problems, where the scheme's parasitic mode stays damped (see
``jaxode/methods/reversible.py``): a Hamiltonian neural field (``hamiltonian_field``) and the
spiral, at ``t1`` 16 and 64, against a float64 dopri8 reference at rtol = atol = 1e-12, to
``results/reversible_fits.md`` (and ``.json``).
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
DIFFRAX = {"diffrax backsolve": "backsolve", "diffrax recursive": "recursive"}  # label -> peers name


def _temp_mib(fn, *args) -> float:
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2**20


def mlp_rows(batch: int, horizons, tolerances, repeats: int, max_steps: int,
             peers: bool = True) -> list[dict]:
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
            if peers:
                steps["diffrax"] = int(jax.jit(lambda ts, tol=tol: P.diffrax_solve(
                    w.f, z0, ts, params, "dopri5", tol, tol).stats["num_steps"])(ts))
            for mode in MODES + (tuple(DIFFRAX) if peers else ()):
                if mode in DIFFRAX:  # tolerances static: one compile per tolerance
                    fn = P.diffrax_grad_fn(w.f, "dopri5", DIFFRAX[mode], tol, tol)
                    args, step_key = (params, z0, ts), "diffrax"
                else:
                    fn, args = fns[mode], (params, z0, ts, tol_a, tol_a)
                    step_key = "reversible" if mode == "reversible" else "adjoint"
                row = {"t1": t1, "tol": tol, "mode": mode, "steps": steps[step_key]}
                call = lambda fn=fn, args=args: jax.block_until_ready(fn(*args))
                try:
                    row["temp_mib"] = _temp_mib(fn, *args)
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


def _large_problem(batch: int = 64, dim: int = 1024):
    """The large state: ``(z0 (batch, dim), W (dim, dim), field)``, ``field = tanh(z W) - z``, float32."""
    import jax.numpy as jnp

    z0 = jnp.asarray(np.random.default_rng(0).normal(size=(batch, dim)), jnp.float32)
    weight = jnp.asarray(np.random.default_rng(1).normal(size=(dim, dim)) / np.sqrt(dim), jnp.float32)
    return z0, weight, lambda z, t, p: jnp.tanh(z @ p) - z


def diffrax_loss(field, z0, ts, solver: str, adjoint, max_steps: int, rtol=None, atol=None):
    """``(p, dt0) -> mean(ys**2)`` of a diffrax solve of ``field`` (jaxode's signature):
    ``PIDController(rtol, atol)`` when ``rtol`` is given (then pass ``dt0=None``), else
    ``ConstantStepSize`` with step ``dt0``. ``solver``: ``"dopri5"`` or ``"midpoint"``."""
    import diffrax
    import jax.numpy as jnp

    controller = diffrax.ConstantStepSize() if rtol is None else diffrax.PIDController(rtol=rtol, atol=atol)
    method = {"dopri5": diffrax.Dopri5, "midpoint": diffrax.Midpoint}[solver]()

    def loss(p, dt0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(lambda t, y, args: field(y, t, args)), method, t0=ts[0], t1=ts[-1], dt0=dt0,
            y0=z0, args=p, saveat=diffrax.SaveAt(ts=ts), stepsize_controller=controller,
            max_steps=max_steps, adjoint=adjoint)
        return jnp.mean(sol.ys**2)

    return loss


def _diffrax_adjoint(mode: str, checkpoints: int | None = None):
    import diffrax

    if mode == "diffrax backsolve":
        return diffrax.BacksolveAdjoint()
    return diffrax.RecursiveCheckpointAdjoint(checkpoints=checkpoints)


def large_rows(max_steps_list=(256, 4096), batch: int = 64, dim: int = 1024,
               peers: bool = True) -> list[dict]:
    """Compiled temporary memory of a (batch, dim) float32 state's gradient, per mode (dopri5,
    rtol = atol = 1e-5; diffrax: Dopri5, PIDController, ``dt0=None``)."""
    import jax
    import jax.numpy as jnp

    import jaxode

    z0, weight, field = _large_problem(batch, dim)
    ts = jnp.linspace(0.0, 1.0, 11, dtype=jnp.float32)
    rows = []
    for mode in MODES + (tuple(DIFFRAX) if peers else ()):
        for max_steps in max_steps_list:
            if mode in DIFFRAX:
                loss = diffrax_loss(field, z0, ts, "dopri5", _diffrax_adjoint(mode), max_steps, 1e-5, 1e-5)
                grad = jax.jit(jax.grad(lambda p, loss=loss: loss(p, None)))
            else:
                grad = jax.jit(jax.grad(lambda p, mode=mode, m=max_steps: jnp.mean(jaxode.odesolve(
                    field, z0, ts, p, solver="dopri5", rtol=1e-5, atol=1e-5, gradient=mode,
                    max_steps=m) ** 2)))
            rows.append({"mode": mode, "max_steps": max_steps, "temp_mib": _temp_mib(grad, weight)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


CROSSOVER_MAX_STEPS = 4096
CROSSOVER = ("reversible", "checkpoint", "diffrax recursive", "diffrax recursive (8 checkpoints)")


def crossover_rows(steps_list=(16, 64, 256, 1024), rounds: int = 3) -> list[dict]:
    """On the large state, fixed-step midpoint over ``[0, 1]`` with ``dt0 = 1/N`` (traced: one
    compile per mode), loss ``mean(z(1)**2)``: per mode and ``N``, the time of jit(grad) and, per
    mode, its temporary memory (``max_steps`` 4096 everywhere). Timing: ``rounds`` rounds (5 for
    ``N <= 64``), each calling every mode once in turn, so that a disturbance of the shared
    machine hits all modes alike; ``min_s`` (the least disturbed call, reported) and ``median_s``."""
    import time

    import jax
    import jax.numpy as jnp

    import jaxode

    z0, weight, field = _large_problem()
    ts = jnp.array([0.0, 1.0], jnp.float32)
    grads, steps_of = {}, jax.jit(lambda dt0: jaxode.odesolve(
        field, z0, ts, weight, solver="midpoint", dt0=dt0, gradient="reversible", full_output=True,
        max_steps=CROSSOVER_MAX_STEPS)[1].num_steps)
    for mode in CROSSOVER:
        if mode.startswith("diffrax"):
            adjoint = _diffrax_adjoint("diffrax recursive", 8 if "8" in mode else None)
            loss = diffrax_loss(field, z0, ts, "midpoint", adjoint, CROSSOVER_MAX_STEPS)
            grads[mode] = jax.jit(jax.grad(loss))
        else:
            grads[mode] = jax.jit(jax.grad(lambda p, dt0, mode=mode: jnp.mean(jaxode.odesolve(
                field, z0, ts, p, solver="midpoint", dt0=dt0, gradient=mode,
                max_steps=CROSSOVER_MAX_STEPS)[-1] ** 2)))
    dt0s = {n: jnp.asarray(1.0 / n, jnp.float32) for n in steps_list}
    temp = {mode: _temp_mib(fn, weight, dt0s[steps_list[0]]) for mode, fn in grads.items()}
    rows = []
    for n, dt0 in dt0s.items():
        times = {mode: [] for mode in CROSSOVER}
        for _ in range(5 if n <= 64 else rounds):
            for mode in CROSSOVER:
                start = time.perf_counter()
                jax.block_until_ready(grads[mode](weight, dt0))
                times[mode].append(time.perf_counter() - start)
        for mode in CROSSOVER:
            rows.append({"steps": n, "jaxode_steps": int(steps_of(dt0)), "mode": mode,
                         "min_s": min(times[mode]), "median_s": float(np.median(times[mode])),
                         "samples": len(times[mode]), "temp_mib": temp[mode]})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def markdown(mlp: list[dict], large: list[dict], meta: dict, crossover: list[dict] = ()) -> str:
    lines = ["# gradient=\"reversible\" beside the other gradient modes"]
    if mlp:
        lines += mlp_markdown(mlp, meta)
    if large:
        lines += ["", "Large state: a (64, 1024) float32 state, `tanh(z W) - z`, dopri5 (diffrax: Dopri5), "
                  "rtol = atol = 1e-5, 11 outputs on [0, 1]; compiled temporary "
                  "memory (MiB) of jit(grad), by max_steps (memory is static: it does not depend on t1).", "",
                  "| mode | " + " | ".join(f"max_steps {m}" for m in sorted({r['max_steps'] for r in large}))
                  + " |", "|---|" + "---:|" * len({r['max_steps'] for r in large})]
        for mode in dict.fromkeys(r["mode"] for r in large):
            cells = [f"{r['temp_mib']:.1f}" for r in large if r["mode"] == mode]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    if crossover:
        lines += [""] + crossover_markdown(crossover)
    return "\n".join(lines) + "\n"


def mlp_markdown(mlp: list[dict], meta: dict) -> list[str]:
    lines = ["", f"mlp-batch, batch {meta['batch']}, dopri5, float32, one ODE for the whole batch; "
             f"max_steps {meta['max_steps']}; time: median of {meta['repeats']} steady-state calls of "
             "jit(value_and_grad); memory: XLA's compiled temporary memory of that function; gradient "
             "error: |g - g_ref| / |g_ref| against the float64 dopri8 reference "
             "(`workloads.reference_gradient`). Machine: " + meta["machine"] + ".", "",
             "The reference's own error (its dopri5 vs dopri8 gradients, both at rtol 1e-10): "
             + ", ".join(f"t1 = {t1:g}: {c}" for t1, c in _reference_checks(mlp, meta["batch"]))
             + ". Where it is large the gradient errors below say nothing.", "",
             "diffrax rows (diffrax 0.7.2): Dopri5, PIDController at the same rtol/atol, dt0=None (its first "
             "step 0.01), max_steps 4096, `peers.diffrax_grad_fn`. steps: step attempts (accepted + "
             "rejected), jaxode's `Info.num_steps` and diffrax's `stats['num_steps']`; jaxode's adjoint, "
             "checkpoint and backprop take the same steps (the 'adjoint' count).", "",
             "| t1 | tol | steps | mode | time (ms) | temp memory (MiB) | gradient error |",
             "|---:|---:|---:|---|---:|---:|---:|"]
    for r in mlp:
        time = f"{r['median_s'] * 1e3:.1f}" if "median_s" in r else r.get("error", "")
        err = f"{r['grad_error']:.2e}" if "grad_error" in r else "n/a"
        mem = f"{r['temp_mib']:.2f}" if "temp_mib" in r else ""
        lines.append(f"| {r['t1']:g} | {r['tol']:g} | {r['steps']} | {r['mode']} | {time} | {mem} | {err} |")
    return lines


def crossover_markdown(rows: list[dict]) -> list[str]:
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    temp = {r["mode"]: r["temp_mib"] for r in rows}
    lines = ["Crossover: the same (64, 1024) state, fixed-step midpoint over [0, 1] with dt0 = 1/N (the "
             "same method and steps in both libraries; diffrax Midpoint, ConstantStepSize), loss "
             "mean(z(1)**2), max_steps 4096; time (ms) of jit(grad) per N: the fastest of 3 rounds (5 "
             "for N <= 64) that call every mode once in turn; "
             "'rev / x': reversible's time over mode x's (below 1: reversible faster). Temporary memory "
             "(MiB, static): " + ", ".join(f"{m} {temp[m]:.1f}" for m in modes) + ". Recomputation: jaxode's "
             "checkpoint keeps K = 182 states at max_steps 4096 (none up to 182 steps, at most one more "
             "forward pass beyond); diffrax's default is 90 checkpoints at max_steps 4096 (online binomial "
             "checkpointing: the recomputation grows with N / checkpoints); 'reversible' recomputes nothing "
             "but costs about twice the evaluations per step.", "",
             "| N | " + " | ".join(modes) + " | " + " | ".join(f"rev / {m}" for m in modes[1:]) + " |",
             "|---:|" + "---:|" * (2 * len(modes) - 1)]
    for n in dict.fromkeys(r["steps"] for r in rows):
        t = {r["mode"]: r.get("min_s", r["median_s"]) for r in rows if r["steps"] == n}
        lines.append(f"| {n} | " + " | ".join(f"{t[m] * 1e3:.0f}" for m in modes) + " | "
                     + " | ".join(f"{t[modes[0]] / t[m]:.2f}" for m in modes[1:]) + " |")
    return lines


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


# ---------------------------------------------------------------------------------------
# where it fits: non-dissipative problems (float32 and float64; run with JAX_ENABLE_X64=1)

FITS_DIM, FITS_HIDDEN, FITS_BATCH = 16, 64, 64  # q, p in R^16 (a 32-dim state), 64 hidden units
FITS_MODES = ("reversible", "checkpoint", "adjoint")


def hamiltonian_field(z, t, params):
    """``J ∇H(z)`` for ``H(z) = |z|²/2 + Σ_k a_k log cosh(w_k · z + b_k)`` on ``z = (q, p)``
    ``(..., 2d)``: ``∇H = z + (a ⊙ tanh(z W + b)) Wᵀ``, ``J ∇H = (∂H/∂p, -∂H/∂q)``. With
    ``a > 0`` the Hessian of ``H`` is positive definite, so the Jacobian ``J ∇²H`` has imaginary
    eigenvalues only: every linearised mode oscillates, none decays; ``H`` is conserved.
    ``params = (W (2d, m), a (m,), b (m,))``."""
    import jax.numpy as jnp

    w, a, b = params
    grad_h = z + (a * jnp.tanh(z @ w + b)) @ w.T
    dq, dp = jnp.split(grad_h, 2, axis=-1)
    return jnp.concatenate([dp, -dq], axis=-1)


def fits_problems() -> dict:
    """``name -> (field, z0, params)`` in float64 numpy: the Hamiltonian neural field (batch 64,
    ``W ~ N(0, 1.5² / 2d)``, ``a ~ U(0.5, 1.5)``, ``b ~ N(0, 0.1²)``, ``z0 ~ N(0, 1)``, rng(2)) and
    the spiral (``workloads.spiral``: ``z³ A``, weakly damped)."""
    rng = np.random.default_rng(2)
    d2 = 2 * FITS_DIM
    params = (rng.normal(0.0, 1.5 / np.sqrt(d2), size=(d2, FITS_HIDDEN)), rng.uniform(0.5, 1.5, FITS_HIDDEN),
              rng.normal(0.0, 0.1, FITS_HIDDEN))
    spiral = W.spiral()
    return {"hamiltonian": (hamiltonian_field, rng.normal(size=(FITS_BATCH, d2)), params),
            "spiral": (spiral.f, spiral.z0, spiral.params)}


def _fits_loss(field, z0, ts, solver, tol, mode, max_steps):
    import jax.numpy as jnp

    import jaxode

    def loss(p):
        ys, info = jaxode.odesolve(field, z0, ts, p, solver=solver, rtol=tol, atol=tol, gradient=mode,
                                   max_steps=max_steps, full_output=True, throw=False)
        return jnp.mean(ys**2), (ys, info.num_steps)

    return loss


def fits_reference(name: str, t1: float) -> dict:
    """float64 dopri8 at rtol = atol = 1e-12 ("checkpoint"): gradient and ys; ``check``: the
    dopri5 gradient at the same tolerances against it. Cached in ``benchmarks/reference/``."""
    import jax

    path = os.path.join(W.REFERENCE_DIR, f"grad_fits_{name}_t1{t1:g}.npz")
    if os.path.exists(path):
        d = np.load(path)
        grad = [d[f"arr_{i}"] for i in range(len(d.files) - 3)]
        return {"grad": grad, "ys": d["ys"], "check": float(d["check"])}
    field, z0, params = fits_problems()[name]
    ts = np.linspace(0.0, t1, 11)
    out = {}
    for solver in ("dopri8", "dopri5"):
        loss = _fits_loss(field, z0, ts, solver, 1e-12, "checkpoint", 200_000)
        (_, (ys, _)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        out[solver] = ([np.asarray(x) for x in g], np.asarray(ys))
    check = W.gradient_error(out["dopri5"][0], out["dopri8"][0])
    os.makedirs(W.REFERENCE_DIR, exist_ok=True)
    np.savez(path, *out["dopri8"][0], ys=out["dopri8"][1], check=check, t1=t1)
    return {"grad": out["dopri8"][0], "ys": out["dopri8"][1], "check": check}


def fits_rows(horizons=(16.0, 64.0), tolerances=None, max_steps: int = 16384) -> list[dict]:
    """Per problem, ``t1``, dtype, tolerance and mode (dopri5): steps, the gradient error and the
    RMS error of ``ys`` against ``fits_reference``."""
    import jax
    import jax.numpy as jnp

    if not jax.config.jax_enable_x64:
        raise SystemExit("--fits compares float32 and float64 runs: set JAX_ENABLE_X64=1")
    tolerances = tolerances or {"float32": (1e-4, 1e-6), "float64": (1e-6, 1e-9)}
    rows = []
    for name, (field, z0, params) in fits_problems().items():
        for t1 in horizons:
            ref = fits_reference(name, t1)
            for dtype in ("float32", "float64"):
                cast = lambda x, dtype=dtype: jnp.asarray(x, dtype)
                ts, z0_d, p_d = cast(np.linspace(0.0, t1, 11)), cast(z0), tuple(cast(x) for x in params)
                for tol in tolerances[dtype]:
                    for mode in FITS_MODES:
                        loss = _fits_loss(field, z0_d, ts, "dopri5", tol, mode, max_steps)
                        (_, (ys, steps)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(p_d)
                        row = {"problem": name, "t1": t1, "dtype": dtype, "tol": tol, "mode": mode,
                               "steps": int(steps), "grad_error": W.gradient_error(g, ref["grad"]),
                               "ys_rms_error": W.trajectory_error(ys, ref["ys"]), "ref_check": ref["check"]}
                        rows.append(row)
                        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


def fits_markdown(rows: list[dict]) -> str:
    lines = ["# gradient=\"reversible\" where it fits: non-dissipative problems", "",
             "dopri5, 11 outputs on [0, t1], loss mean(ys**2), max_steps 16384, default coupling 0.999; "
             "errors against a float64 dopri8 reference at rtol = atol = 1e-12 (its own error: the dopri5 "
             "gradient at "
             "the same tolerances against it, 'ref check'). Gradient error |g - g_ref| / |g_ref| over the "
             "field's parameters; ys error: RMS over all outputs. `python benchmarks/reversible.py --fits` "
             "(JAX_ENABLE_X64=1; the float32 rows cast state, times and parameters to float32).", "",
             "- hamiltonian: `J ∇H`, `H(z) = |z|²/2 + Σ_k a_k log cosh(w_k·z + b_k)`, `a > 0` "
             "(`hamiltonian_field`): a neural field whose Jacobian has imaginary eigenvalues only (no mode "
             "decays); batch 64 × 32-dim state (q, p ∈ R^16), 64 hidden units, one ODE for the batch.",
             "- spiral: `workloads.spiral`'s field `z³ A`, `A = [[-0.1, 2], [-2, -0.1]]`, z0 = (2, 0): "
             "rotation with weak damping.", "",
             "The dissipative class for contrast is mlp-batch (`reversible.md`, "
             "`reversible_convergence.md`): there the reversible gradient error is far above checkpoint's "
             "at t1 ≥ 16.", "",
             "| problem | t1 | dtype | tol | ref check | mode | steps | gradient error | ys RMS error |",
             "|---|---:|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['problem']} | {r['t1']:g} | {r['dtype']} | {r['tol']:g} | {r['ref_check']:.1e} | "
                     f"{r['mode']} | {r['steps']} | {r['grad_error']:.2e} | {r['ys_rms_error']:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=W.MLP_BATCH)
    ap.add_argument("--horizons", type=float, nargs="+", default=[1.0, 16.0, 64.0])
    ap.add_argument("--tolerances", type=float, nargs="+", default=[1e-3, 1e-5])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=4096)
    ap.add_argument("--large", action="store_true", help="also the large-state memory table")
    ap.add_argument("--crossover", action="store_true", help="also the large-state time-vs-steps table")
    ap.add_argument("--steps", type=int, nargs="+", default=[16, 64, 256, 1024],
                    help="the crossover's step counts N")
    ap.add_argument("--parts", nargs="+", choices=("mlp", "large", "crossover"), default=None,
                    help="run only these parts; the others are kept from the JSON beside --out")
    ap.add_argument("--no-peers", action="store_true", help="leave diffrax out")
    ap.add_argument("--machine", default="2 shared CPU cores")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "reversible.md"))
    ap.add_argument("--from-json", action="store_true", help="rewrite --out from its JSON, running nothing")
    ap.add_argument("--convergence", action="store_true",
                    help="only the float64 accuracy-vs-tolerance table (first horizon; JAX_ENABLE_X64=1)")
    ap.add_argument("--fits", action="store_true",
                    help="only the non-dissipative accuracy table, to results/reversible_fits.md "
                         "(JAX_ENABLE_X64=1)")
    args = ap.parse_args(argv)
    if args.convergence:
        rows = convergence_rows(args.batch, args.horizons[0], args.tolerances)
        out = os.path.join(os.path.dirname(args.out), "reversible_convergence.md")
        with open(out, "w") as fh:
            fh.write(convergence_markdown(rows, args.batch))
        print(open(out).read())
        return 0
    if args.fits:
        rows = fits_rows()
        out = os.path.join(os.path.dirname(args.out), "reversible_fits")
        with open(out + ".md", "w") as fh:
            fh.write(fits_markdown(rows))
        with open(out + ".json", "w") as fh:
            json.dump(rows, fh, indent=1)
        print(open(out + ".md").read())
        return 0
    json_path = os.path.splitext(args.out)[0] + ".json"
    saved = {"mlp": [], "large": [], "crossover": [], "meta": None}
    if os.path.exists(json_path) and (args.from_json or args.parts):
        with open(json_path) as fh:
            saved.update(json.load(fh))
    parts = set(args.parts or ([] if args.from_json else
                               ["mlp"] + ["large"] * args.large + ["crossover"] * args.crossover))
    peers = not args.no_peers
    if "mlp" in parts:
        saved["mlp"] = mlp_rows(args.batch, args.horizons, args.tolerances, args.repeats, args.max_steps,
                                peers)
        saved["meta"] = {"batch": args.batch, "repeats": args.repeats, "max_steps": args.max_steps,
                         "machine": args.machine}
    if "large" in parts:
        saved["large"] = large_rows(peers=peers)
    if "crossover" in parts:
        saved["crossover"] = crossover_rows(tuple(args.steps))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(markdown(saved["mlp"], saved["large"], saved["meta"], saved["crossover"]))
    with open(json_path, "w") as fh:
        json.dump(saved, fh, indent=1)
    print(open(args.out).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
