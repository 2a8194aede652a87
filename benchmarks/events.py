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

torchdiffeq (where torch is installed; its rows are skipped with a note otherwise): its
``odeint_event`` with ``dopri5`` at the same tolerances, float64, one thread. It takes one
initial state whose event ends the solve for all of it (one ``t*``), so a batch of problems
with their own event times is a Python loop over them: its times are those of that loop over
the first ``--torch-subset`` problems, scaled to the batch (``× B / subset``), and its errors are
over those problems. Its event time comes from bisection on its interpolant down to ``atol``;
its gradient is autograd through the solver (``odeint``) with the implicit function theorem at
``t*`` (``odeint_event``'s rerouting).

Second workload, a neural field with a terminal event: ``z' = W2 tanh(W1 z + b1) + b2``
(``z`` in R², 32 hidden units, fixed random weights, float64; ``b2 = (1, 0)`` and the first row
of ``W2`` scaled to ``|W2[0]|_1 = 1/2``, so ``z_0' >= 1/2`` and the event surely fires), from
64 starts in ``[-1, 1]²`` until ``z_0`` crosses 2 upwards (``t* <= 6 < T = 10``). Columns as
above; the reference event times are diffrax's ``Dopri8`` at ``rtol = atol = 1e-13`` (Newton
on its dense output to 1e-14), checked against scipy's ``DOP853`` at the same tolerances; the
gradient is that of ``Σ t*`` w.r.t. all the weights (162 numbers), its error
``max |g - g_ref| / max |g_ref|`` against central differences of the reference (Richardson-
extrapolated from steps 2e-3 and 1e-3, per problem, so torchdiffeq's subset can be compared).

Run: ``python benchmarks/events.py [--quick] [--out PATH.md]``.
"""

from __future__ import annotations

import argparse
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.flatten_util  # noqa: E402
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


def have_torch() -> bool:
    try:
        import torch  # noqa: F401
        import torchdiffeq  # noqa: F401
    except ImportError:
        return False
    return True


def _torch_setup():
    import torch

    torch.set_num_threads(1)
    return torch


def _best_loop(fn, items, repeats):
    """The best of ``repeats`` runs of ``fn`` over every item (seconds), and the last results."""
    best, out = np.inf, None
    fn(items[0])  # warm-up
    for _ in range(repeats):
        start = time.perf_counter()
        out = [fn(x) for x in items]
        best = min(best, time.perf_counter() - start)
    return best, out


def measure_torch_ball(tol, hs, repeats, subset):
    """torchdiffeq's ``odeint_event`` (dopri5) on the falling ball, one problem at a time."""
    torch = _torch_setup()
    from torchdiffeq import odeint_event

    calls = []

    def f(t, z):
        calls.append(1)
        return torch.stack([z[1], -G * torch.ones_like(z[0])])

    def impact(h, grad):
        h = torch.tensor(h, dtype=torch.float64, requires_grad=grad)
        z0 = torch.stack([h, torch.zeros_like(h)])
        t_star, _ = odeint_event(f, z0, torch.tensor(0.0, dtype=torch.float64), event_fn=lambda t, z: z[0],
                                 method="dopri5", rtol=tol, atol=tol)
        if not grad:
            return t_star.item()
        t_star.backward()
        return h.grad.item()

    hs = [float(h) for h in np.asarray(hs)]
    part = hs[:subset]
    solve_s, t_star = _best_loop(lambda h: impact(h, False), part, repeats)
    grad_s, d_got = _best_loop(lambda h: impact(h, True), part, repeats)
    calls.clear()
    impact(hs[0], False)
    arr = np.asarray(part)
    scale = 1e3 * len(hs) / len(part)
    return {
        "library": "torchdiffeq dopri5 (*)", "tol": tol,
        "t_err": float(np.max(np.abs(np.asarray(t_star) - np.sqrt(2 * arr / G)))),
        "solve_ms": scale * solve_s, "nfe": len(calls), "grad_ms": scale * grad_s,
        "grad_rel_err": float(np.max(np.abs(np.asarray(d_got) * np.sqrt(2 * arr * G) - 1))),
    }


# ---------------------------------------------------------------- the neural field workload

N_FIELD, HIDDEN, T_FIELD, THRESHOLD = 2, 32, 10.0, 2.0


def mlp_weights(seed=0):
    """Fixed random weights (float64); ``|W2[0]|_1 = 1/2`` and ``b2 = (1, 0)``: ``z_0' >= 1/2``."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    w1 = jax.random.normal(k1, (HIDDEN, N_FIELD), jnp.float64) / np.sqrt(N_FIELD)
    b1 = 0.5 * jax.random.normal(k2, (HIDDEN,), jnp.float64)
    w2 = jax.random.normal(k3, (N_FIELD, HIDDEN), jnp.float64) / np.sqrt(HIDDEN)
    w2 = w2.at[0].set(0.5 * w2[0] / jnp.sum(jnp.abs(w2[0])))
    b2 = jnp.array([1.0, 0.0])
    return {"w1": w1, "b1": b1, "w2": w2, "b2": b2}


def mlp(z, t, p):
    return p["w2"] @ jnp.tanh(p["w1"] @ z + p["b1"]) + p["b2"]


def starts(batch, seed=1):
    return jax.random.uniform(jax.random.PRNGKey(seed), (batch, N_FIELD), jnp.float64, -1.0, 1.0)


def jaxode_field(tol, count=None, gradient="backprop"):
    f = mlp if count is None else _counted(mlp, count)
    ev = jaxode.Event(lambda z, t, p: z[0] - THRESHOLD, direction=1)

    def crossing(z0, p):
        _, info = jaxode.odesolve(f, z0, jnp.array([0.0, T_FIELD]), p, events=ev, solver="tsit5",
                                  rtol=tol, atol=tol, gradient=gradient, full_output=True)
        return info.event_time

    return crossing


def diffrax_field(tol, count=None, solver=None, root_tol=1e-12):
    import diffrax
    import optimistix as optx

    f = lambda t, y, p: mlp(y, t, p)
    f = f if count is None else _counted(f, count)
    event = diffrax.Event(lambda t, y, args, **kw: y[0] - THRESHOLD, direction=True,
                          root_finder=optx.Newton(rtol=root_tol, atol=root_tol))

    def crossing(z0, p):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(f), diffrax.Tsit5() if solver is None else solver, t0=0.0, t1=T_FIELD,
            dt0=None, y0=z0, args=p, stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
            event=event, saveat=diffrax.SaveAt(t1=True), max_steps=4096,
        )
        return sol.ts[-1]

    return crossing


def field_reference(z0s, p, fd_steps=(2e-3, 1e-3)):
    """Reference event times ``(B,)`` (diffrax Dopri8, 1e-13) and per-problem gradients ``(B, P)``
    w.r.t. the flattened weights by Richardson-extrapolated central differences; also the
    largest difference of the event times from scipy's DOP853 (a check of the reference)."""
    import diffrax

    flat, unravel = jax.flatten_util.ravel_pytree(p)
    ref = diffrax_field(1e-13, solver=diffrax.Dopri8(), root_tol=1e-14)
    batch = jax.jit(jax.vmap(lambda z0, th: ref(z0, unravel(th)), in_axes=(0, None)))
    t_ref = np.asarray(batch(z0s, flat))
    eye = np.eye(flat.shape[0])
    shifted = jax.jit(jax.vmap(lambda th: jax.vmap(lambda z0: ref(z0, unravel(th)))(z0s)))
    diffs = []
    for eps in fd_steps:
        thetas = jnp.concatenate([flat + eps * eye, flat - eps * eye])
        out = np.asarray(shifted(thetas))  # (2P, B)
        diffs.append((out[: len(eye)] - out[len(eye):]).T / (2 * eps))  # (B, P)
    ratio = fd_steps[0] / fd_steps[1]
    g_ref = (ratio**2 * diffs[1] - diffs[0]) / (ratio**2 - 1)
    return t_ref, g_ref, _scipy_check(z0s, p, t_ref)


def _scipy_check(z0s, p, t_ref):
    from scipy.integrate import solve_ivp

    w = {k: np.asarray(v) for k, v in p.items()}
    f = lambda t, z: w["w2"] @ np.tanh(w["w1"] @ z + w["b1"]) + w["b2"]
    ev = lambda t, z: z[0] - THRESHOLD
    ev.terminal, ev.direction = True, 1
    worst = 0.0
    for z0, t in zip(np.asarray(z0s), t_ref):
        sol = solve_ivp(f, (0.0, T_FIELD), z0, method="DOP853", rtol=1e-13, atol=1e-13, events=ev)
        worst = max(worst, abs(sol.t_events[0][0] - t))
    return worst


def measure_field(name, make, tol, z0s, p, ref, repeats):
    t_ref, g_ref, _ = ref
    crossing = make(tol)
    flat, unravel = jax.flatten_util.ravel_pytree(p)
    batch = jax.jit(jax.vmap(crossing, in_axes=(0, None)))
    loss = lambda th: jnp.sum(jax.vmap(crossing, in_axes=(0, None))(z0s, unravel(th)))
    grad = jax.jit(jax.grad(loss))
    t_star = np.asarray(batch(z0s, p))
    g = np.asarray(grad(flat))
    g_exact = g_ref.sum(axis=0)
    calls = []
    jax.block_until_ready(jax.jit(make(tol, calls))(z0s[0], p))
    jax.effects_barrier()
    return {
        "library": name, "tol": tol,
        "t_err": float(np.max(np.abs(t_star - t_ref))),
        "solve_ms": 1e3 * _best_time(lambda z: batch(z, p), z0s, repeats),
        "nfe": len(calls),
        "grad_ms": 1e3 * _best_time(grad, flat, repeats),
        "grad_rel_err": float(np.max(np.abs(g - g_exact)) / np.max(np.abs(g_exact))),
    }


def measure_torch_field(tol, z0s, p, ref, repeats, subset):
    """torchdiffeq's ``odeint_event`` (dopri5) on the neural field, one problem at a time."""
    torch = _torch_setup()
    from torchdiffeq import odeint_event

    t_ref, g_ref, _ = ref
    names = ("w1", "b1", "w2", "b2")
    weights = {k: torch.tensor(np.asarray(p[k]), dtype=torch.float64, requires_grad=True) for k in names}
    calls = []

    def f(t, z):
        calls.append(1)
        return weights["w2"] @ torch.tanh(weights["w1"] @ z + weights["b1"]) + weights["b2"]

    def crossing(z0, grad):
        z0 = torch.tensor(z0, dtype=torch.float64)
        t_star, _ = odeint_event(f, z0, torch.tensor(0.0, dtype=torch.float64),
                                 event_fn=lambda t, z: z[0] - THRESHOLD, method="dopri5", rtol=tol, atol=tol)
        if not grad:
            return t_star.item()
        gs = torch.autograd.grad(t_star, [weights[k] for k in names])
        # flattened in ravel_pytree's order (the dict's keys sorted)
        by_name = dict(zip(names, gs))
        return np.concatenate([by_name[k].detach().numpy().ravel() for k in sorted(names)])

    part = [np.asarray(z) for z in np.asarray(z0s)[:subset]]
    solve_s, t_star = _best_loop(lambda z: crossing(z, False), part, repeats)
    grad_s, gs = _best_loop(lambda z: crossing(z, True), part, repeats)
    calls.clear()
    crossing(part[0], False)
    scale = 1e3 * z0s.shape[0] / len(part)
    g, g_exact = np.sum(gs, axis=0), g_ref[: len(part)].sum(axis=0)
    return {
        "library": "torchdiffeq dopri5 (*)", "tol": tol,
        "t_err": float(np.max(np.abs(np.asarray(t_star) - t_ref[: len(part)]))),
        "solve_ms": scale * solve_s, "nfe": len(calls), "grad_ms": scale * grad_s,
        "grad_rel_err": float(np.max(np.abs(g - g_exact)) / np.max(np.abs(g_exact))),
    }


HEADER = ("| tol | library | max error of t* | solve (ms) | nfe (one problem) | grad (ms) "
          "| grad rel. error |\n|---|---|---|---|---|---|---|")


def _table(rows):
    return [HEADER] + [
        f"| {r['tol']:g} | {r['library']} | {r['t_err']:.1e} | {r['solve_ms']:.2f} | "
        f"{r['nfe']} | {r['grad_ms']:.2f} | {r['grad_rel_err']:.1e} |" for r in rows
    ]


READING = "<!-- reading: kept when the tables are rewritten -->"


def write_report(path, tables):
    """Writes the title and the tables to ``path``, keeping what follows the ``READING`` marker
    in the file already there (the written reading of the measurement)."""
    kept = ""
    try:
        with open(path) as fh:
            old = fh.read()
        if READING in old:
            kept = old[old.index(READING):]
    except FileNotFoundError:
        pass
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    title = (f"# Terminal events: jaxode vs diffrax vs torchdiffeq\n\n"
             f"`python benchmarks/events.py --out {path}` (setup: the script's docstring); {when}.\n")
    with open(path, "w") as fh:
        fh.write(title + "\n" + tables + "\n" + ("\n" + kept if kept else ""))


JAXODE_MODES = (("backprop", "jaxode backprop"), ("checkpoint", "jaxode checkpoint"),
                ("adjoint", "jaxode adjoint"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None, help="write the tables (markdown) here")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--field-batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--torch-subset", type=int, default=16, help="problems torchdiffeq solves (one by one)")
    p.add_argument("--skip-field", action="store_true")
    args = p.parse_args(argv)
    tols = (1e-6,) if args.quick else (1e-4, 1e-6, 1e-8, 1e-10)
    field_tols = (1e-6,) if args.quick else (1e-6, 1e-9)
    batch = 32 if args.quick else args.batch
    repeats = 2 if args.quick else args.repeats
    torch_ok = have_torch()
    hs = jnp.linspace(1.0, 20.0, batch)
    rows = []
    for tol in tols:
        libs = [(name, lambda tol, count=None, m=m: jaxode_solver(tol, count, gradient=m))
                for m, name in JAXODE_MODES]
        for name, make in libs + [("diffrax", diffrax_solver)]:
            rows.append(measure(name, make, tol, hs, repeats))
            print(rows[-1], flush=True)
        if torch_ok:
            rows.append(measure_torch_ball(tol, hs, min(repeats, 3), min(args.torch_subset, batch)))
            print(rows[-1], flush=True)
    field_rows, check = [], None
    if not args.skip_field:
        weights, z0s = mlp_weights(), starts(8 if args.quick else args.field_batch)
        ref = field_reference(z0s, weights)
        check = ref[2]
        print("reference vs scipy DOP853: max |dt*| =", check, flush=True)
        for tol in field_tols:
            libs = [(name, lambda tol, count=None, m=m: jaxode_field(tol, count, gradient=m))
                    for m, name in JAXODE_MODES]
            for name, make in libs + [("diffrax", diffrax_field)]:
                field_rows.append(measure_field(name, make, tol, z0s, weights, ref, repeats))
                print(field_rows[-1], flush=True)
            if torch_ok:
                field_rows.append(measure_torch_field(tol, z0s, weights, ref, min(repeats, 3),
                                                      min(args.torch_subset, z0s.shape[0])))
                print(field_rows[-1], flush=True)
    platform = f"jax {jax.__version__}, {jax.devices()[0].platform}"
    if torch_ok:
        import torch
        import torchdiffeq

        platform += f", torch {torch.__version__}, torchdiffeq {torchdiffeq.__version__}"
    torch_note = (
        f"(*) torchdiffeq: a Python loop over the first {args.torch_subset} problems (best of 3), one "
        "`odeint_event` each, times scaled to the whole batch; errors over those problems."
        if torch_ok else "torchdiffeq: not installed here, its rows are skipped."
    )
    lines = [
        f"Falling ball, terminal event, Tsit5 (torchdiffeq: dopri5), float64, batch {batch} (jax.vmap), "
        f"best of {repeats}; {platform}",
        "",
        *_table(rows),
        "",
        torch_note,
    ]
    if field_rows:
        lines += [
            "",
            f"Neural field (2-D state, MLP 2-{HIDDEN}-2, tanh), terminal event z_0 = {THRESHOLD:g} upwards, "
            f"Tsit5 (torchdiffeq: dopri5), float64, {z0s.shape[0]} starts (jax.vmap), best of {repeats}; "
            f"reference: diffrax Dopri8 at 1e-13 (max |t*_ref - t*_scipy DOP853| = {check:.1e}); gradient: "
            f"of Σ t* w.r.t. the {jax.flatten_util.ravel_pytree(weights)[0].shape[0]} weights against "
            "Richardson-extrapolated central differences of the reference",
            "",
            *_table(field_rows),
            "",
            torch_note,
        ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_report(args.out, text)
    return rows, field_rows


if __name__ == "__main__":
    main()
