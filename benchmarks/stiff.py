"""The stiff suite: jaxode's stiff methods against diffrax's ESDIRKs and scipy's implicit solvers.

Problems (float64; Hairer & Wanner, *Solving ODEs II*, and their test set):

* ``robertson``: Robertson's kinetics, ``k = (0.04, 3e7, 1e4)``, ``y0 = (1, 0, 0)``, to
  ``t = 1e5``, outputs at 0 and 13 log-spaced times from 1e-4 to 1e5.
* ``vdp``: Van der Pol, ``x'' = μ(1 - x²)x' - x``, ``μ = 1e3``, ``y0 = (2, 0)``, on [0, 3000]
  (about two periods, with their fast jumps), 11 equally spaced outputs.
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

    python benchmarks/stiff.py [--quick] [--repeats N] [--out benchmarks/results/stiff.md]

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


PROBLEMS = {
    "robertson": Problem("robertson", robertson, (1.0, 0.0, 0.0),
                         tuple([0.0] + list(np.logspace(-4, 5, 13))), 1e-6),
    "vdp": Problem("vdp", vdp, (2.0, 0.0), tuple(np.linspace(0.0, 3000.0, 11)), 1.0),
    "hires": Problem("hires", hires, (1.0, 0, 0, 0, 0, 0, 0, 0.0057),
                     tuple(np.linspace(0, 321.8122, 11)), 1e-2),
    "orego": Problem("orego", orego, (1.0, 2.0, 3.0), tuple(np.linspace(0.0, 360.0, 11)), 1.0),
}


def reference(pb: Problem) -> np.ndarray:
    jac = jax.jit(jax.jacfwd(pb.field))
    sol = solve_ivp(_numpy_field(pb.field), (pb.ts[0], pb.ts[-1]), np.array(pb.y0, float), method="Radau",
                    t_eval=np.array(pb.ts), rtol=1e-12, atol=1e-3 * 1e-8 * pb.atol_scale,
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


def problem_table(pb: Problem, rtols, repeats: int) -> list[str]:
    ref = reference(pb)
    lines = [f"## {pb.name}", "", HEADER]
    for label, run in solvers(pb).items():
        for rtol in rtols:
            try:
                ys, stats, first, steady = measure(run, rtol, rtol * pb.atol_scale, repeats)
            except Exception as exc:  # a solver that raises is reported, not fatal
                lines.append(f"| {label} | {rtol:g} | | | | | | *error: {type(exc).__name__}* |")
                continue
            lines.append(row(label, rtol, stats, first, steady, error(pb, ys, ref) if stats["ok"] else None))
            print(lines[-1], flush=True)
    return lines + [""]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 5; 1 with --quick)")
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument("--out", default=os.path.join(here, "results", "stiff.md"))
    args = parser.parse_args(argv)
    rtols = (1e-4, 1e-6) if args.quick else (1e-4, 1e-6, 1e-8)
    repeats = args.repeats or (1 if args.quick else 5)
    command = "python benchmarks/stiff.py" + (" --quick" if args.quick else "")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        "# Stiff suite", "",
        f"`{command}` ({when}; jax {jax.__version__}, {os.cpu_count()} cores, load "
        f"{os.getloadavg()[0]:.1f}). Time: median of {repeats} call(s) after a first (compiling) one. "
        "Error: max |y - y_ref| / (|y_ref| + atol_scale) over the outputs, against scipy Radau at "
        "rtol 1e-12. Steps: attempts (accepted + rejected); scipy's nfe includes its "
        "finite-difference Jacobians. A failed solve is marked *failed*.", "",
    ]
    for name in args.problems.split(","):
        lines += problem_table(PROBLEMS[name], rtols, repeats)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
