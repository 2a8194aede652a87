"""Terminal events: jaxode's ``Event`` against diffrax's ``Event`` on the falling ball.

A ball falls from rest at height ``h`` under gravity ``g`` (``z = [x, v]``, ``z' = [v, -g]``); a
terminal event on ``x = 0`` ends the solve at the impact time ``t* = sqrt(2h/g)``. Both libraries
run Tsit5 with a PI(D) controller at ``rtol = atol = tol`` from ``t = 0`` towards ``t = 3``, first
step chosen by the library, in float64; diffrax locates the event with ``optimistix.Newton``
(rtol = atol = 1e-12) on its dense output, jaxode with its bracketing root finder. Reported, per
tolerance: the error of ``t*``; the time of one jitted solve of a batch of ``B`` heights
(``jax.vmap``, warm, best of ``--repeats``); the vector-field evaluations (jaxode: ``info.nfe``;
diffrax: counted by a callback, one problem); the time of ``jax.grad`` of ``Σ t*`` w.r.t. the
heights and its error against ``dt*/dh = 1/sqrt(2hg)`` (jaxode in its three gradient modes,
diffrax with ``RecursiveCheckpointAdjoint``).

Run: ``python benchmarks/events.py [--quick] [--out PATH.md]``.
"""

from __future__ import annotations

import argparse
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxode  # noqa: E402

G = 9.81
T1 = 3.0


def field(z, t, g):
    return jnp.stack([z[1], -g * jnp.ones_like(z[0])])


def jaxode_solver(tol, count=None, gradient="backprop"):
    f = field if count is None else _counted(field, count)
    ev = jaxode.Event(lambda z, t, g: z[0])

    def impact(h):
        _, info = jaxode.odesolve(f, jnp.stack([h, 0.0]), jnp.array([0.0, T1]), G, events=ev, solver="tsit5",
                                  rtol=tol, atol=tol, gradient=gradient, full_output=True)
        return info.event_time, info.nfe

    return impact


def jaxode_checkpoint(tol, count=None):
    return jaxode_solver(tol, count, gradient="checkpoint")


def jaxode_adjoint(tol, count=None):
    return jaxode_solver(tol, count, gradient="adjoint")


def diffrax_solver(tol, count=None):
    import diffrax
    import optimistix as optx

    f = (lambda t, y, g: field(y, t, g)) if count is None else _counted(lambda t, y, g: field(y, t, g), count)
    event = diffrax.Event(lambda t, y, args, **kw: y[0], root_finder=optx.Newton(rtol=1e-12, atol=1e-12))

    def impact(h):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(f), diffrax.Tsit5(), t0=0.0, t1=T1, dt0=None, y0=jnp.stack([h, 0.0]), args=G,
            stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol), event=event,
            saveat=diffrax.SaveAt(t1=True), max_steps=4096,
        )
        return sol.ts[-1], jnp.zeros((), jnp.int32)

    return impact


def _counted(f, count):
    def counted(*args):
        jax.debug.callback(lambda: count.append(1), ordered=True)
        return f(*args)

    return counted


def _best_time(fn, arg, repeats):
    jax.block_until_ready(fn(arg))  # compile
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(arg))
        best = min(best, time.perf_counter() - start)
    return best


def measure(name, make, tol, hs, repeats):
    impact = make(tol)
    batch = jax.jit(jax.vmap(lambda h: impact(h)[0]))
    grad = jax.jit(jax.grad(lambda hs: jnp.sum(jax.vmap(lambda h: impact(h)[0])(hs))))
    t_star = np.asarray(batch(hs))
    exact = np.sqrt(2 * np.asarray(hs) / G)
    d_exact = 1 / np.sqrt(2 * np.asarray(hs) * G)
    d_got = np.asarray(grad(hs))
    calls = []
    jax.block_until_ready(jax.jit(make(tol, calls))(hs[0]))
    jax.effects_barrier()
    return {
        "library": name, "tol": tol,
        "t_err": float(np.max(np.abs(t_star - exact))),
        "solve_ms": 1e3 * _best_time(batch, hs, repeats),
        "nfe": len(calls),
        "grad_ms": 1e3 * _best_time(grad, hs, repeats),
        "grad_rel_err": float(np.max(np.abs(d_got - d_exact) / np.abs(d_exact))),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None, help="write the table (markdown) here")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    tols = (1e-6,) if args.quick else (1e-4, 1e-6, 1e-8, 1e-10)
    batch = 32 if args.quick else args.batch
    hs = jnp.linspace(1.0, 20.0, batch)
    rows = []
    for tol in tols:
        libs = (("jaxode backprop", jaxode_solver), ("jaxode checkpoint", jaxode_checkpoint),
                ("jaxode adjoint", jaxode_adjoint), ("diffrax", diffrax_solver))
        for name, make in libs:
            rows.append(measure(name, make, tol, hs, 2 if args.quick else args.repeats))
            print(rows[-1])
    lines = [
        f"Falling ball, terminal event, Tsit5, float64, batch {batch} (jax.vmap), "
        f"jax {jax.__version__}, {jax.devices()[0].platform}",
        "",
        "| tol | library | max error of t* | solve (ms) | nfe (one problem) | grad (ms) | grad rel. error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['tol']:g} | {r['library']} | {r['t_err']:.1e} | {r['solve_ms']:.2f} | "
                     f"{r['nfe']} | {r['grad_ms']:.2f} | {r['grad_rel_err']:.1e} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return rows


if __name__ == "__main__":
    main()
