"""The stiff suite: jaxode's stiff methods against diffrax's ESDIRKs and scipy's implicit solvers.

Problems (float64; Hairer & Wanner, *Solving ODEs II*, and their test set):

* ``robertson``: Robertson's kinetics, ``k = (0.04, 3e7, 1e4)``, ``y0 = (1, 0, 0)``, to
  ``t = 1e5``, outputs at 0 and 13 log-spaced times from 1e-4 to 1e5.
* ``vdp``: Van der Pol, ``x'' = μ(1 - x²)x' - x``, ``μ = 1e3``, ``y0 = (2, 0)``, on [0, 3000]
  (about two periods, with their fast jumps), 11 equally spaced outputs.
* ``vdp6``: Van der Pol with ``μ = 1e6`` in Hairer's scaled form ``y1' = y2``,
  ``y2' = ((1 - y1²) y2 - y1) / ε``, ``ε = 1/μ² = 1e-12``, on [0, 2] from the slow manifold
  (``y2(0) = -2/3 + 10ε/81``), 11 outputs; reference at rtol 1e-10 (see the summary's caveats).
* ``hires``: HIRES (8 species, plant physiology), on [0, 321.8122], 11 outputs.
* ``orego``: the Oregonator (Belousov–Zhabotinsky), ``y0 = (1, 2, 3)``, on [0, 360], 11 outputs.

References: scipy ``solve_ivp(method="Radau")`` at ``rtol = 1e-12`` (``atol`` a thousandth of
the problem's smallest ``atol`` below), with the exact Jacobian (``jax.jacfwd``), computed on
each run (a few seconds).

Each solver runs at ``rtol`` in ``1e-4, 1e-6, 1e-8`` with ``atol = rtol × atol_scale`` of the
problem (Robertson 1e-6: ``y2`` is about 1e-5; HIRES 1e-2; VdP and OREGO 1). Reported: steps
(attempts, accepted + rejected, where the library says), evaluations of ``f``, Jacobians, the
steady time (median of ``--repeats`` calls after a first, compiling one; tolerances are traced,
so each jaxode/diffrax configuration compiles once per problem) and the error: the largest
``|y - y_ref| / (|y_ref| + atol_scale)`` over the outputs after ``t0``.

Solvers: jaxode's stiff methods present in ``jaxode.METHODS`` (``rosenbrock23``, ``rodas5p``,
``kvaerno3``, ``kvaerno5``, and ``auto`` if it is a valid solver; missing ones are skipped),
diffrax ``Kvaerno3`` / ``Kvaerno5`` (``PIDController(rtol, atol)``, ``SaveAt(ts)``, its own
Hermite interpolation, its default Newton solver), scipy ``Radau``, ``BDF``, ``LSODA`` with
numpy fields and scipy's own finite-difference Jacobians (their ``nfev`` includes those).

Written next to the markdown: a work-precision plot per problem, ``stiff_<problem>.png`` (error
against steady time, log-log, one line per solver through its rtols; failed solves are named in
the legend). The markdown opens with a summary of the issue's targets, each met or missed:
``rodas5p`` against diffrax Kvaerno5 (2× needed) and every scipy method (1× needed) on
Robertson and Van der Pol at matched error (the competitor's error at rtol 1e-6; rodas5p's
time at that error from its own runs, interpolated log-log between two rtols that bracket it,
never extrapolated; see ``time_at_error``), and the adjoint gradient of a Robertson parameter
fit against its forward solve (3× allowed), measured in its own section (``adjoint_section``:
``jax.grad`` of a least-squares loss in ``log k`` with each gradient mode, compiled, against
the compiled loss, and checked against float64 central differences).

    python benchmarks/stiff.py [--quick] [--repeats N] [--problems a,b] [--no-adjoint]
                               [--out benchmarks/results/stiff.md]

``--quick``: ``rtol`` in ``1e-4, 1e-6`` and (unless ``--repeats`` says otherwise) one timed call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("JAX_ENABLE_X64", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy.integrate import solve_ivp  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jaxode  # noqa: E402

JAXODE_STIFF = ("rosenbrock23", "rodas5p", "kvaerno3", "kvaerno5", "auto")
MAX_STEPS = 200_000


# --- the problems (JAX fields f(y, t); numpy twins for scipy) ---------------------------


def robertson(y, t, stack=jnp.stack):
    y1, y2, y3 = y[0], y[1], y[2]
    return stack([-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2**2, 3e7 * y2**2])


def vdp(y, t, stack=jnp.stack):
    return stack([y[1], 1e3 * (1 - y[0] ** 2) * y[1] - y[0]])


VDP6_EPS = 1e-12  # ε = 1/μ² for μ = 1e6


def vdp6(y, t, stack=jnp.stack):
    return stack([y[1], ((1 - y[0] ** 2) * y[1] - y[0]) / VDP6_EPS])


def hires(y, t, stack=jnp.stack):
    y1, y2, y3, y4, y5, y6, y7, y8 = (y[i] for i in range(8))
    return stack([
        -1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007,
        1.71 * y1 - 8.75 * y2,
        -10.03 * y3 + 0.43 * y4 + 0.035 * y5,
        8.32 * y2 + 1.71 * y3 - 1.12 * y4,
        -1.745 * y5 + 0.43 * y6 + 0.43 * y7,
        -280.0 * y6 * y8 + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
        280.0 * y6 * y8 - 1.81 * y7,
        -280.0 * y6 * y8 + 1.81 * y7,
    ])


def orego(y, t, stack=jnp.stack):
    y1, y2, y3 = y[0], y[1], y[2]
    return stack([
        77.27 * (y2 + y1 * (1 - 8.375e-6 * y1 - y2)),
        (y3 - (1 + y1) * y2) / 77.27,
        0.161 * (y1 - y3),
    ])


def _numpy_field(field: Callable) -> Callable:
    """The field on numpy arrays, as scipy calls it: ``fun(t, y)``."""
    return lambda t, y: field(y, t, stack=np.array)


@dataclass(frozen=True)
class Problem:
    name: str
    field: Callable
    y0: tuple
    ts: tuple
    atol_scale: float
    ref_rtol: float = 1e-12  # the reference's tolerance (scipy Radau)


PROBLEMS = {
    "robertson": Problem("robertson", robertson, (1.0, 0.0, 0.0),
                         tuple([0.0] + list(np.logspace(-4, 5, 13))), 1e-6),
    "vdp": Problem("vdp", vdp, (2.0, 0.0), tuple(np.linspace(0.0, 3000.0, 11)), 1.0),
    "vdp6": Problem("vdp6", vdp6, (2.0, -2 / 3 + 10 / 81 * VDP6_EPS), tuple(np.linspace(0.0, 2.0, 11)), 1.0,
                    ref_rtol=1e-10),
    "hires": Problem("hires", hires, (1.0, 0, 0, 0, 0, 0, 0, 0.0057),
                     tuple(np.linspace(0, 321.8122, 11)), 1e-2),
    "orego": Problem("orego", orego, (1.0, 2.0, 3.0), tuple(np.linspace(0.0, 360.0, 11)), 1.0),
}


def reference(pb: Problem) -> np.ndarray:
    jac = jax.jit(jax.jacfwd(pb.field))
    sol = solve_ivp(_numpy_field(pb.field), (pb.ts[0], pb.ts[-1]), np.array(pb.y0, float), method="Radau",
                    t_eval=np.array(pb.ts), rtol=pb.ref_rtol, atol=1e-3 * 1e-8 * pb.atol_scale,
                    jac=lambda t, y: np.asarray(jac(jnp.asarray(y), t)))
    assert sol.success, (pb.name, sol.message)
    return sol.y.T


def error(pb: Problem, ys: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ys[1:] - ref[1:]) / (np.abs(ref[1:]) + pb.atol_scale)))


# --- the solvers: each returns run(rtol, atol) -> (ys, stats) ------------------------------


def jaxode_solver(pb: Problem, name: str):
    field = lambda y, t, p: pb.field(y, t)  # noqa: E731
    ts, y0 = jnp.asarray(pb.ts), jnp.asarray(pb.y0)

    @jax.jit
    def solve(rtol, atol):
        return jaxode.odesolve(field, y0, ts, solver=name, rtol=rtol, atol=atol, full_output=True,
                               max_steps=MAX_STEPS, throw=False)

    def run(rtol, atol):
        ys, info = jax.block_until_ready(solve(rtol, atol))
        ok = int(info.status) == 0
        return np.asarray(ys), dict(steps=int(info.num_steps), nfe=int(info.nfe), jac=int(info.num_jacobians),
                                    ok=ok)

    return run


def diffrax_solver(pb: Problem, name: str):
    import diffrax as dfx

    term = dfx.ODETerm(lambda t, y, args: pb.field(y, t))
    ts, y0 = jnp.asarray(pb.ts), jnp.asarray(pb.y0)
    solver = getattr(dfx, name)()

    @jax.jit
    def solve(rtol, atol):
        sol = dfx.diffeqsolve(term, solver, ts[0], ts[-1], None, y0, saveat=dfx.SaveAt(ts=ts),
                              stepsize_controller=dfx.PIDController(rtol=rtol, atol=atol),
                              max_steps=MAX_STEPS, throw=False)
        return sol.ys, sol.stats["num_steps"], sol.result == dfx.RESULTS.successful

    def run(rtol, atol):
        ys, steps, ok = jax.block_until_ready(solve(rtol, atol))
        return np.asarray(ys), dict(steps=int(steps), nfe=None, jac=None, ok=bool(ok))

    return run


def scipy_solver(pb: Problem, method: str):
    fun = _numpy_field(pb.field)

    def run(rtol, atol):
        sol = solve_ivp(fun, (pb.ts[0], pb.ts[-1]), np.array(pb.y0, float), method=method,
                        t_eval=np.array(pb.ts), rtol=rtol, atol=atol)
        ys = sol.y.T if sol.success else np.full((len(pb.ts), len(pb.y0)), np.nan)
        return ys, dict(steps=None, nfe=int(sol.nfev), jac=int(sol.njev), ok=bool(sol.success))

    return run


def solvers(pb: Problem) -> dict[str, Callable]:
    out = {}
    for name in JAXODE_STIFF:
        try:
            jaxode.methods.get_method(name)
        except ValueError:
            continue
        out[f"jaxode {name}"] = jaxode_solver(pb, name)
    try:
        import diffrax  # noqa: F401

        for name in ("Kvaerno3", "Kvaerno5"):
            out[f"diffrax {name}"] = diffrax_solver(pb, name)
    except ImportError:
        pass
    for method in ("Radau", "BDF", "LSODA"):
        out[f"scipy {method}"] = scipy_solver(pb, method)
    return out


# --- the run -------------------------------------------------------------------------------


def measure(run: Callable, rtol: float, atol: float, repeats: int):
    start = time.perf_counter()
    ys, stats = run(rtol, atol)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(rtol, atol)
        times.append(time.perf_counter() - start)
    return ys, stats, first, statistics.median(times)


def _fmt(x, spec="d"):
    return "–" if x is None else format(x, spec)


HEADER = ("| solver | rtol | steps | nfe | Jacobians | time (ms) | first call (s) | error |\n"
          "|---|---|---|---|---|---|---|---|")


def row(label: str, rtol: float, stats: dict, first: float, steady: float, err) -> str:
    cells = [label, f"{rtol:g}", _fmt(stats["steps"]), _fmt(stats["nfe"]), _fmt(stats["jac"]),
             f"{steady * 1e3:.2f}", f"{first:.1f}", _fmt(err, ".1e") if stats["ok"] else "*failed*"]
    return "| " + " | ".join(cells) + " |"


@dataclass(frozen=True)
class Record:
    """One (solver, rtol) cell of a problem's table; ``error`` is None when the solve failed."""

    solver: str
    rtol: float
    seconds: float | None
    error: float | None


def problem_table(pb: Problem, rtols, repeats: int) -> tuple[list[str], list[Record]]:
    """The problem's markdown table and its records (failed solves kept, with ``error=None``)."""
    ref = reference(pb)
    lines = [f"## {pb.name}", "", f"![work-precision](stiff_{pb.name}.png)", "", HEADER]
    records = []
    for label, run in solvers(pb).items():
        for rtol in rtols:
            try:
                ys, stats, first, steady = measure(run, rtol, rtol * pb.atol_scale, repeats)
            except Exception as exc:  # a solver that raises is reported, not fatal
                lines.append(f"| {label} | {rtol:g} | | | | | | *error: {type(exc).__name__}* |")
                records.append(Record(label, rtol, None, None))
                print(lines[-1], flush=True)
                continue
            err = error(pb, ys, ref) if stats["ok"] else None
            if err is not None and not np.isfinite(err):  # a non-finite result counts as failed
                stats, err = dict(stats, ok=False), None
            lines.append(row(label, rtol, stats, first, steady, err))
            records.append(Record(label, rtol, steady, err))
            print(lines[-1], flush=True)
    return lines + [""], records


# --- the work-precision plot ----------------------------------------------------------------


def plot(pb: Problem, records: list[Record], path: str) -> None:
    """Error against steady time, log-log, one line per solver through its rtols (failed
    solves are left off the line and named in the legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    styles = {"jaxode": "-", "diffrax": "--", "scipy": ":"}
    markers = iter("osD^v<>ph*XP")
    for label in dict.fromkeys(r.solver for r in records):
        mine = [r for r in records if r.solver == label]
        ok = [r for r in mine if r.error is not None]
        failed = [f"{r.rtol:g}" for r in mine if r.error is None]
        name = label + (f" (failed at rtol {', '.join(failed)})" if failed else "")
        ax.plot([r.seconds * 1e3 for r in ok], [r.error for r in ok], styles[label.split()[0]],
                marker=next(markers), label=name)
        for r in ok:
            ax.annotate(f"{r.rtol:.0e}", (r.seconds * 1e3, r.error), fontsize=6, alpha=0.6,
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("time per solve (ms, median)")
    ax.set_ylabel("error: max |y - y_ref| / (|y_ref| + atol_scale)")
    ax.set_title(f"{pb.name}: work-precision (labels: rtol)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the targets at matched error -------------------------------------------------------------


def time_at_error(records: list[Record], solver: str, target: float) -> float | None:
    """The time ``solver`` needs for an error of at most ``target``: the least of (a) the times
    of its runs whose error is ``<= target`` and (b) where two consecutive rtols bracket
    ``target`` (error above it at the looser, at or below at the tighter), the time
    interpolated linearly in (log error, log time) at ``target``. None when no run reaches
    ``target`` (no extrapolation)."""
    runs = sorted((r for r in records if r.solver == solver and r.error is not None),
                  key=lambda r: -r.rtol)
    times = [r.seconds for r in runs if r.error <= target]
    for loose, tight in zip(runs, runs[1:]):
        if loose.error > target >= tight.error:
            w = np.log(loose.error / target) / np.log(loose.error / tight.error)
            times.append(float(np.exp((1 - w) * np.log(loose.seconds) + w * np.log(tight.seconds))))
    return min(times) if times else None


def matched(records: list[Record], fast: str, other: str, rtol: float):
    """``other`` at ``rtol`` against ``fast`` at ``other``'s error: (other's time, error;
    ``fast``'s time at that error, its speed-up), the last two None when not reached."""
    ref = next((r for r in records if r.solver == other and r.rtol == rtol), None)
    if ref is None or ref.error is None:
        return ref, None, None
    t = time_at_error(records, fast, ref.error)
    return ref, t, (ref.seconds / t if t else None)


def summary(results: dict[str, list[Record]], rtol: float, adjoint: dict | None) -> list[str]:
    """The targets of issue 14, met or missed, with the measured numbers."""
    fast = "jaxode rodas5p"
    lines = [
        "## Summary: the targets of issue 14", "",
        f"Rule: each competitor runs at rtol {rtol:g}; its error `e` there is the bar. "
        f"`{fast}`'s time at error `e` is the least of its runs with error <= `e` and, where two of "
        "its consecutive rtols bracket `e`, the time interpolated log-log on its work-precision "
        "curve at `e` (never extrapolated: if no rodas5p run reaches `e`, the target is missed). "
        "Speed-up = competitor's time / rodas5p's time at `e`. Times are medians on a loaded "
        "machine; treat ratios within ~1.5× as noise.", "",
        "| problem | competitor | its error @ rtol 1e-6 | its time (ms) | rodas5p time at that error (ms) "
        "| speed-up | needed | met? |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("robertson", "vdp", "vdp6"):
        if name not in results:
            continue
        recs = results[name]
        others = ([("diffrax Kvaerno5", 2.0)] + [(f"scipy {m}", 1.0) for m in ("Radau", "BDF", "LSODA")]
                  + [("jaxode kvaerno5", None)])  # the same method as diffrax's, for reference
        for other, needed in others:
            ref, t, speedup = matched(recs, fast, other, rtol)
            if ref is None:
                continue
            bar = "–" if needed is None else f">= {needed:g}×" if needed > 1 else "> 1×"
            if ref.error is None:
                cells = [name, other, "*failed*", "–", "–", "–", bar, "n/a (competitor failed)"]
            else:
                met = speedup is not None and speedup >= (needed or 0)
                verdict = "(no target)" if needed is None else "**met**" if met else "**missed**"
                cells = [name, other, f"{ref.error:.1e}", f"{ref.seconds * 1e3:.2f}",
                         "not reached" if t is None else f"{t * 1e3:.2f}",
                         "–" if speedup is None else f"{speedup:.1f}×", bar, verdict]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "", "Caveats: diffrax runs with its defaults (`PIDController(rtol, atol)`, its default "
        "Newton solver) and takes many more steps than jaxode's `kvaerno5`, the same method (see "
        "the steps columns), so much of the gap to diffrax Kvaerno5 is its step-size and Newton "
        "handling rather than the method; the `jaxode kvaerno5` rows compare rodas5p with that "
        "method in jaxode (no target). Van der Pol with μ = 1e6 is `vdp6`, in the ε = 1/μ² = 1e-12 "
        "form on [0, 2] from the slow manifold; its reference is scipy Radau at rtol 1e-10 (at "
        "1e-12 Radau stops: 'Required step size is less than spacing between numbers'), which "
        "agrees with scipy LSODA at rtol 1e-12 to ~1e-8, so its errors below ~1e-7 are not resolved.",
    ]
    if adjoint is not None:
        ratio = adjoint["ratio"]
        lines += ["", f"Adjoint gradient of the Robertson fit / its forward solve (rodas5p, rtol 1e-6): "
                  f"{ratio:.1f}× by medians, {adjoint['ratio_fastest']:.1f}× by fastest calls "
                  "(target <= 3×): "
                  f"**{'met' if ratio <= 3 else 'missed'}**; see the section below."]
    lines.append("")
    return lines


# --- the adjoint gradient of a Robertson parameter fit ----------------------------------------


def adjoint_section(repeats: int) -> tuple[list[str], dict]:
    """Times ``jax.grad`` of a Robertson fit's loss in each gradient mode against the forward
    solve of the same loss and checks the gradients against float64 central differences.

    The fit: ``log k`` (3,) are the unknowns, ``obs`` the solution at the true ``k`` at the
    suite's 13 log-spaced times with 1% multiplicative noise (seed 0), the loss
    ``mean(((y(t_i; k) - obs_i) / σ_i)**2)`` with ``σ_i = 0.01 |obs_i|``, evaluated at the
    start of a fit, ``k = k_true × (10, 0.1, 10)``; rodas5p at rtol 1e-6, atol 1e-12.
    Finite differences: step 1e-4 in ``log k`` of the loss solved at rtol 1e-10, atol 1e-16.
    """
    k_true = np.array([0.04, 3e7, 1e4])
    pb = PROBLEMS["robertson"]
    ts, y0 = jnp.asarray(pb.ts), jnp.asarray(pb.y0)

    def field(y, t, log_k):
        k1, k2, k3 = jnp.exp(log_k)
        a, b, c = y[0], y[1], y[2]
        return jnp.stack([-k1 * a + k3 * b * c, k1 * a - k2 * b**2 - k3 * b * c, k2 * b**2])

    truth = jaxode.odesolve(field, y0, ts, jnp.log(k_true), solver="rodas5p", rtol=1e-10, atol=1e-16,
                            max_steps=MAX_STEPS)
    rng = np.random.default_rng(0)
    obs = np.asarray(truth[1:]) * (1 + 0.01 * rng.standard_normal(truth[1:].shape))
    sigma = 0.01 * np.abs(obs)

    def loss(gradient, rtol=1e-6, atol=1e-12):
        def fn(log_k):
            ys = jaxode.odesolve(field, y0, ts, log_k, solver="rodas5p", rtol=rtol, atol=atol,
                                 gradient=gradient, max_steps=MAX_STEPS)
            return jnp.mean(((ys[1:] - obs) / sigma) ** 2)
        return fn

    log_k = jnp.log(k_true * np.array([10.0, 0.1, 10.0]))
    fine = jax.jit(loss("adjoint", 1e-10, 1e-16))
    h = 1e-4
    fd = np.array([(float(fine(log_k + h * e)) - float(fine(log_k - h * e))) / (2 * h) for e in np.eye(3)])

    def timed(fn):
        """(first call, median, fastest) of ``repeats`` calls after the first, in seconds."""
        start = time.perf_counter()
        jax.block_until_ready(fn(log_k))
        first = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(log_k))
            times.append(time.perf_counter() - start)
        return first, statistics.median(times), min(times)

    first_fwd, forward, forward_min = timed(jax.jit(loss("adjoint")))
    lines = [
        "## Adjoint gradient of a Robertson parameter fit", "",
        "Loss: `mean(((y(t_i; k) - obs_i) / σ_i)**2)` over the suite's 13 log-spaced Robertson "
        "outputs, `obs` the solution at the true `k` with 1% multiplicative noise (seed 0), "
        "`σ_i = 0.01 |obs_i|`; unknowns `log k` (3), evaluated at the start of a fit, "
        "`k = k_true × (10, 0.1, 10)`; `rodas5p`, rtol 1e-6, atol 1e-12. Time: median of "
        f"{repeats} calls of the compiled (`jax.jit`) function after a first, compiling one. "
        "Gradient error: relative 2-norm against float64 central differences (step 1e-4 in "
        "`log k`) of the loss solved at rtol 1e-10, atol 1e-16.", "",
        "| function | time (ms), median | × forward | fastest (ms) | × forward (fastest) | first call (s) "
        "| gradient rel. error vs FD |",
        "|---|---|---|---|---|---|---|",
        f"| forward: loss | {forward * 1e3:.2f} | 1.0 | {forward_min * 1e3:.2f} | 1.0 "
        f"| {first_fwd:.1f} | – |",
    ]
    out = {"forward": forward, "fd": fd}
    for gradient in ("adjoint", "checkpoint", "backprop"):
        grad = jax.jit(jax.grad(loss(gradient)))
        first, steady, fastest = timed(grad)
        g = np.asarray(grad(log_k))
        rel = float(np.linalg.norm(g - fd) / np.linalg.norm(fd))
        out[gradient] = dict(seconds=steady, fastest=fastest, rel_error=rel, grad=g)
        lines.append(f"| `jax.grad`, gradient=\"{gradient}\" | {steady * 1e3:.2f} | "
                     f"{steady / forward:.1f} | {fastest * 1e3:.2f} | {fastest / forward_min:.1f} | "
                     f"{first:.1f} | {rel:.1e} |")
        print(lines[-1], flush=True)
    out["ratio"] = out["adjoint"]["seconds"] / forward
    out["ratio_fastest"] = out["adjoint"]["fastest"] / forward_min
    lines += ["", f"Finite-difference gradient: {np.array2string(fd, precision=6)}; adjoint: "
              f"{np.array2string(out['adjoint']['grad'], precision=6)}.", ""]
    return lines, out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 5; 1 with --quick)")
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--no-adjoint", action="store_true", help="skip the adjoint-gradient section")
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out", default=os.path.join(here, "results", "stiff.md"))
    args = parser.parse_args(argv)
    rtols = (1e-4, 1e-6) if args.quick else (1e-4, 1e-6, 1e-8)
    repeats = args.repeats or (1 if args.quick else 5)
    command = "python benchmarks/stiff.py" + " ".join([""] + (argv if argv is not None else sys.argv[1:]))
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        "# Stiff suite", "",
        f"`{command}` ({when}; jax {jax.__version__}, {os.cpu_count()} cores, load "
        f"{os.getloadavg()[0]:.1f}). Time: median of {repeats} call(s) after a first (compiling) one. "
        "Error: max |y - y_ref| / (|y_ref| + atol_scale) over the outputs, against scipy Radau at "
        "rtol 1e-12. Steps: attempts (accepted + rejected); scipy's nfe includes its "
        "finite-difference Jacobians. A failed solve is marked *failed*.", "",
    ]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tables, results = [], {}
    for name in args.problems.split(","):
        pb = PROBLEMS[name]
        table, results[name] = problem_table(pb, rtols, repeats)
        tables += table
        plot(pb, results[name], os.path.join(os.path.dirname(args.out), f"stiff_{name}.png"))
    adjoint_lines, adjoint = ([], None) if args.no_adjoint else adjoint_section(max(repeats, 21))
    lines += summary(results, 1e-6, adjoint) + tables + adjoint_lines
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
