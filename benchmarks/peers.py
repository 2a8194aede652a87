"""Adapters: every library solving a ``workloads.Workload`` the same way.

Each builder returns a ``Case``: a ``call()`` that runs one solve (or one gradient) to
completion and returns its raw output, a ``to_numpy`` for that output, and a ``count()`` that
runs the same computation once more with a vector field that counts its own evaluations (a
separate, untimed compile; for JAX libraries through ``jax.debug.callback``, so it counts the
evaluations actually executed, the backward pass's included).

Libraries (each imported only when used; only benchmarks/ imports peers):

* jaxode: ``odesolve`` with ``solver="dopri5" | "tsit5"``.
* diffrax: ``Dopri5`` / ``Tsit5`` + ``PIDController(rtol, atol)``, ``SaveAt(ts=ts)``,
  ``dt0=None`` (diffrax 0.7.2 then starts from 0.01: its automatic first step is skipped for
  the wrapped term ``diffeqsolve`` builds); gradients by ``BacksolveAdjoint`` (same solver and
  controller backwards) and ``RecursiveCheckpointAdjoint`` (the default).
* jax.experimental.ode.odeint: Dormand–Prince (dopri5 tableau), its own adjoint.
* torchdiffeq: ``odeint`` / ``odeint_adjoint`` with ``method="dopri5"``.
* scipy: ``solve_ivp(method="RK45")`` (the dopri5 tableau) and, for pendulum, ``odeint`` (LSODA).

Gradients are of the mlp-batch loss ``mean(ys**2)`` with respect to the six weight arrays; a
gradient ``call()`` returns ``(loss, ys, grads)``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import workloads as W

MAX_STEPS = 4096  # jaxode's and diffrax's default

JAX_LIBS = ("jaxode", "diffrax", "jax.experimental.ode")


@dataclasses.dataclass
class Case:
    """One library configuration on one problem.

    Attributes:
        library: ``"jaxode"``, ``"diffrax"``, ``"jax odeint"``, ``"torchdiffeq"``, ``"scipy"``.
        method: what it runs, e.g. ``"tsit5"``, ``"dopri5 adjoint"``, ``"RK45"``.
        call: one run, blocking; returns the raw output.
        to_numpy: raw output -> ``ys`` (forward) or ``(loss, ys, [grads])`` (gradient), numpy.
        count: ``() -> dict`` with ``nfe`` (and ``steps`` where the library reports it) from a
            separate run, or ``None``.
        stats: ``raw output -> dict`` of statistics the library itself reports, or ``None``.
        note: a remark for the report.
    """

    library: str
    method: str
    call: Callable[[], Any]
    to_numpy: Callable[[Any], Any]
    count: Callable[[], dict] | None = None
    stats: Callable[[Any], dict] | None = None
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.library} {self.method}"


def available(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    if name == "jax.experimental.ode":
        return hasattr(importlib.import_module(name), "odeint")
    return True


def versions() -> dict[str, str]:
    out = {}
    for mod in ("jax", "jaxlib", "jaxode", "equinox", "diffrax", "torch", "torchdiffeq", "scipy", "numpy"):
        try:
            out[mod] = getattr(importlib.import_module(mod), "__version__", "?")
        except ImportError:
            out[mod] = "not installed"
    out["jax.experimental.ode.odeint"] = "present" if available("jax.experimental.ode") else "absent"
    return out


# ---------------------------------------------------------------------------------------
# JAX helpers


def jax_data(w: W.Workload):
    import jax.numpy as jnp

    dtype = jnp.dtype(w.dtype)
    if dtype == jnp.float64:
        import jax

        if not jax.config.jax_enable_x64:
            raise RuntimeError(f"{w.name} is float64: run with JAX_ENABLE_X64=1")
    z0 = jnp.asarray(w.z0, dtype)
    ts = jnp.asarray(w.ts, dtype)
    params = tuple(jnp.asarray(p, dtype) for p in w.params)
    return z0, ts, params


def counting_field(f):
    """``(g, counter)``: ``g`` is ``f`` plus a host callback that adds 1 to ``counter[0]``."""
    import jax

    counter = [0]

    def bump():
        counter[0] += 1

    def g(z, t, params):
        jax.debug.callback(bump)
        return f(z, t, params)

    return g, counter


def _jax_count(build: Callable[[Callable], Callable[[], Any]], f) -> Callable[[], dict]:
    """``count()`` for a JAX case: builds the computation with a counting field and runs it."""
    import jax

    def count():
        g, counter = counting_field(f)
        run = build(g)
        jax.block_until_ready(run())
        jax.effects_barrier()
        return {"nfe": counter[0]}

    return count


def _block(x):
    import jax

    return jax.block_until_ready(x)


def _np_tree(x):
    import jax

    return jax.tree_util.tree_map(np.asarray, x)


# ---------------------------------------------------------------------------------------
# forward solves


def jaxode_forward(w: W.Workload, solver: str) -> Case:
    import jax

    import jaxode

    z0, ts, params = jax_data(w)

    def build(f):
        fn = jax.jit(lambda z0, ts, p: jaxode.odesolve(
            f, z0, ts, p, solver=solver, rtol=w.rtol, atol=w.atol, max_steps=MAX_STEPS, full_output=True))
        return lambda: _block(fn(z0, ts, params))

    def stats(out):
        info = out[1]
        return {"steps": int(info.num_steps), "rejected": int(info.num_rejected), "nfe_info": int(info.nfe)}

    return Case("jaxode", solver, build(w.f), lambda out: np.asarray(out[0]), _jax_count(build, w.f), stats)


def _diffrax_solver(solver: str):
    import diffrax

    return {"dopri5": diffrax.Dopri5, "tsit5": diffrax.Tsit5}[solver]()


def diffrax_solve(f, z0, ts, params, solver: str, rtol, atol, adjoint=None):
    import diffrax

    kw = {} if adjoint is None else {"adjoint": adjoint}
    return diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: f(y, t, args)),
        _diffrax_solver(solver),
        t0=ts[0],
        t1=ts[-1],
        dt0=None,
        y0=z0,
        args=params,
        saveat=diffrax.SaveAt(ts=ts),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=MAX_STEPS,
        **kw,
    )


def diffrax_forward(w: W.Workload, solver: str) -> Case:
    import jax

    z0, ts, params = jax_data(w)

    def build(f):
        fn = jax.jit(lambda z0, ts, p: diffrax_solve(f, z0, ts, p, solver, w.rtol, w.atol))
        return lambda: _block(fn(z0, ts, params))

    def stats(sol):
        return {"steps": int(sol.stats["num_steps"]), "rejected": int(sol.stats["num_rejected_steps"])}

    return Case("diffrax", solver, build(w.f), lambda sol: np.asarray(sol.ys), _jax_count(build, w.f), stats,
                note="dt0=None starts from 0.01 in diffrax 0.7.2")


def jax_odeint_forward(w: W.Workload, rtol=None, atol=None) -> Case:
    import jax
    from jax.experimental.ode import odeint

    z0, ts, params = jax_data(w)
    rtol = w.rtol if rtol is None else rtol
    atol = w.atol if atol is None else atol

    def build(f):
        fn = jax.jit(lambda z0, ts, p: odeint(f, z0, ts, p, rtol=rtol, atol=atol))
        return lambda: _block(fn(z0, ts, params))

    note = f"rtol={rtol:g}, atol={atol:g}" if (rtol, atol) != (w.rtol, w.atol) else ""
    return Case("jax odeint", "dopri5", build(w.f), np.asarray, _jax_count(build, w.f), note=note)


def torch_threads() -> int:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    return torch.get_num_threads()


def _torch_field(w: W.Workload, counter: list | None = None):
    """A ``torch.nn.Module`` ``forward(t, z)`` computing ``w``'s field with torch ops."""
    import torch

    dtype = torch.float32 if w.dtype == "float32" else torch.float64

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ps = torch.nn.ParameterList(
                [torch.nn.Parameter(torch.as_tensor(np.asarray(p, w.dtype))) for p in w.params])

        def forward(self, t, z):
            if counter is not None:
                counter[0] += 1
            ps = list(self.ps)
            if w.name == "spiral":
                return (z**3) @ ps[0]
            if w.name == "pendulum":
                b, c = ps
                return torch.stack([z[1], -b * z[1] - c * torch.sin(z[0])])
            w0, b0, w1, b1, w2, b2 = ps
            tt = t.to(z.dtype).expand(z.shape[:-1] + (1,))
            h = torch.tanh(torch.cat([z, tt], dim=-1) @ w0 + b0)
            h = torch.tanh(h @ w1 + b1)
            return h @ w2 + b2

    return Field(), dtype


def torchdiffeq_forward(w: W.Workload, method: str = "dopri5") -> Case:
    import torch
    import torchdiffeq

    torch_threads()

    def build(counter=None):
        field, dtype = _torch_field(w, counter)
        z0 = torch.as_tensor(np.asarray(w.z0, w.dtype))
        ts = torch.as_tensor(np.asarray(w.ts, w.dtype))

        def call():
            with torch.no_grad():
                return torchdiffeq.odeint(field, z0, ts, rtol=w.rtol, atol=w.atol, method=method)

        return call

    def count():
        counter = [0]
        build(counter)()
        return {"nfe": counter[0]}

    return Case("torchdiffeq", method, build(), lambda ys: ys.numpy(), count,
                note=f"torch threads {torch_threads()}")


def scipy_forward(w: W.Workload, method: str = "RK45") -> Case:
    from scipy.integrate import odeint, solve_ivp

    shape = w.z0.shape
    params = tuple(np.asarray(p, np.float64) for p in w.params)
    ts = np.asarray(w.ts, np.float64)
    y0 = np.ravel(w.z0).astype(np.float64)

    if method == "odeint":
        def rhs_odeint(y, t):
            return np.ravel(w.f_np(y.reshape(shape), t, params))

        def call():
            ys, info = odeint(rhs_odeint, y0, ts, rtol=w.rtol, atol=w.atol, full_output=True)
            stats = {"nfe": int(info["nfe"][-1]), "steps": int(info["nst"][-1])}
            return ys.reshape((len(ts),) + shape), stats

        return Case("scipy", "odeint (LSODA)", call, lambda out: out[0], stats=lambda out: out[1])

    def rhs(t, y):
        return np.ravel(w.f_np(y.reshape(shape), t, params))

    def call():
        sol = solve_ivp(rhs, (ts[0], ts[-1]), y0, method=method, t_eval=ts, rtol=w.rtol, atol=w.atol)
        assert sol.success, sol.message
        return sol

    def stats(sol):
        return {"nfe": int(sol.nfev)}

    note = "float64 (solve_ivp computes in float64)" if w.dtype == "float32" else ""
    return Case("scipy", f"solve_ivp {method}", call, lambda sol: sol.y.T.reshape((len(ts),) + shape),
                stats=stats, note=note)


def forward_cases(w: W.Workload) -> list[tuple[str, Callable[[], Case]]]:
    """``[(label, builder)]`` of every forward configuration run on ``w`` (builders are lazy)."""
    out = []
    for s in w.solvers:
        out.append((f"jaxode {s}", lambda s=s: jaxode_forward(w, s)))
    if available("diffrax"):
        for s in w.solvers:
            out.append((f"diffrax {s}", lambda s=s: diffrax_forward(w, s)))
    if available("jax.experimental.ode"):
        if w.name == "pendulum":  # its defaults, as in the workload definition
            out.append(("jax odeint dopri5", lambda: jax_odeint_forward(w, 1.4e-8, 1.4e-8)))
        else:
            out.append(("jax odeint dopri5", lambda: jax_odeint_forward(w)))
    if available("torchdiffeq"):
        out.append(("torchdiffeq dopri5", lambda: torchdiffeq_forward(w)))
    out.append(("scipy solve_ivp RK45", lambda: scipy_forward(w, "RK45")))
    if w.name == "pendulum":
        out.append(("scipy odeint (LSODA)", lambda: scipy_forward(w, "odeint")))
    return out


# ---------------------------------------------------------------------------------------
# gradients (mlp-batch)


def jaxode_grad_fn(f, solver: str, mode: str, seminorm: bool = False, vmap: bool = False,
                   max_steps: int = MAX_STEPS, batched: bool = False):
    """A jitted ``fn(params, z0, ts, rtol, atol) -> ((loss, ys), grads)`` (tolerances traced).

    ``vmap``: ``jax.vmap`` of the solve over the samples; ``batched``: ``batched=True`` (the
    same per-sample steps, one shared parameter adjoint)."""
    import jax

    import jaxode

    def solve(z0, ts, p, rtol, atol):
        return jaxode.odesolve(f, z0, ts, p, solver=solver, rtol=rtol, atol=atol, gradient=mode,
                               adjoint_seminorm=seminorm, max_steps=max_steps, batched=batched)

    def loss(p, z0, ts, rtol, atol):
        if vmap:  # per-sample solves: ys (batch, T, 32) -> (T, batch, 32)
            ys = jax.vmap(lambda z: solve(z, ts, p, rtol, atol))(z0).swapaxes(0, 1)
        elif batched:
            ys = solve(z0, ts, p, rtol, atol).swapaxes(0, 1)
        else:
            ys = solve(z0, ts, p, rtol, atol)
        return W.mlp_loss(ys), ys

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _grad_to_numpy(out):
    (loss, ys), grads = out
    return float(loss), np.asarray(ys), [np.asarray(g) for g in grads]


def jaxode_grad(w: W.Workload, solver: str, mode: str, seminorm: bool = False, vmap: bool = False,
                batched: bool = False) -> Case:
    z0, ts, params = jax_data(w)

    def build(f):
        fn = jaxode_grad_fn(f, solver, mode, seminorm, vmap, batched=batched)
        return lambda: _block(fn(params, z0, ts, w.rtol, w.atol))

    method = f"{solver} {mode}" + (" seminorm" if seminorm else "") + (" vmap" if vmap else "")
    method += " batched=True" if batched else ""
    return Case("jaxode", method, build(w.f), _grad_to_numpy, _jax_count(build, w.f))


def diffrax_grad_fn(f, solver: str, adjoint: str, rtol, atol, vmap: bool = False):
    import diffrax
    import jax

    adj = {"backsolve": diffrax.BacksolveAdjoint, "recursive": diffrax.RecursiveCheckpointAdjoint}[adjoint]()

    def solve(z0, ts, p):
        return diffrax_solve(f, z0, ts, p, solver, rtol, atol, adj).ys

    def loss(p, z0, ts):
        ys = jax.vmap(lambda z: solve(z, ts, p))(z0).swapaxes(0, 1) if vmap else solve(z0, ts, p)
        return W.mlp_loss(ys), ys

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def diffrax_grad(w: W.Workload, solver: str, adjoint: str, vmap: bool = False) -> Case:
    z0, ts, params = jax_data(w)

    def build(f):
        fn = diffrax_grad_fn(f, solver, adjoint, w.rtol, w.atol, vmap)
        return lambda: _block(fn(params, z0, ts))

    name = {"backsolve": "BacksolveAdjoint", "recursive": "RecursiveCheckpointAdjoint"}[adjoint]
    method = f"{solver} {name}" + (" vmap" if vmap else "")
    return Case("diffrax", method, build(w.f), _grad_to_numpy, _jax_count(build, w.f))


def jax_odeint_grad_fn(f, rtol, atol):
    import jax
    from jax.experimental.ode import odeint

    def loss(p, z0, ts):
        ys = odeint(f, z0, ts, p, rtol=rtol, atol=atol)
        return W.mlp_loss(ys), ys

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def jax_odeint_grad(w: W.Workload) -> Case:
    z0, ts, params = jax_data(w)

    def build(f):
        fn = jax_odeint_grad_fn(f, w.rtol, w.atol)
        return lambda: _block(fn(params, z0, ts))

    return Case("jax odeint", "dopri5 adjoint", build(w.f), _grad_to_numpy, _jax_count(build, w.f))


SCAN_STEPS_PER_OUTPUT = 3


def scan_floor_grad_fn(f, steps_per_output: int = SCAN_STEPS_PER_OUTPUT):
    """A jitted ``fn(params, z0, ts) -> ((loss, ys), grads)``: JAX's own reverse mode of a bare
    fixed-step dopri5, ``steps_per_output`` equal steps per output interval (so the outputs
    are steps' ends), each step under ``jax.checkpoint``: recomputed and differentiated one at
    a time, as jaxode's ``"checkpoint"`` and diffrax's RecursiveCheckpointAdjoint do, but with
    no step control, failure checks or interpolation. The floor of an exact gradient taking
    this many steps, in the same run."""
    import jax
    import jax.numpy as jnp

    from jaxode.methods.tableaus import DOPRI5 as tab

    def step(y, t, h, p):
        ks = [f(y, t, p)]
        for c_i, a_i in zip(tab.c[1:], tab.a):
            y_i = y + h * sum(a * k for a, k in zip(a_i, ks) if a != 0)
            ks.append(f(y_i, t + c_i * h, p))
        return y + h * sum(b * k for b, k in zip(tab.b, ks) if b != 0)

    def interval(y, t0_t1, p):
        t0, t1 = t0_t1
        h = (t1 - t0) / steps_per_output
        for j in range(steps_per_output):
            y = jax.checkpoint(step)(y, t0 + j * h, h, p)
        return y, y

    def loss(p, z0, ts):
        _, ys = jax.lax.scan(lambda y, tt: interval(y, tt, p), z0, (ts[:-1], ts[1:]))
        ys = jnp.concatenate([z0[None], ys])
        return W.mlp_loss(ys), ys

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def scan_floor_grad(w: W.Workload) -> Case:
    z0, ts, params = jax_data(w)
    fn = scan_floor_grad_fn(w.f)
    steps = SCAN_STEPS_PER_OUTPUT * (len(w.ts) - 1)
    return Case("JAX scan", f"dopri5 {steps} fixed steps, jax.checkpoint per step",
                lambda: _block(fn(params, z0, ts)), _grad_to_numpy, stats=lambda out: {"steps": steps},
                note="floor: no step control, checks or interpolation")


def torchdiffeq_grad(w: W.Workload, adjoint: bool) -> Case:
    import torch
    import torchdiffeq

    torch_threads()

    def build(counter=None):
        field, _ = _torch_field(w, counter)
        z0 = torch.as_tensor(np.asarray(w.z0, w.dtype))
        ts = torch.as_tensor(np.asarray(w.ts, w.dtype))
        solve = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint

        def call():
            field.zero_grad()
            ys = solve(field, z0, ts, rtol=w.rtol, atol=w.atol, method="dopri5")
            loss = torch.mean(ys**2)
            loss.backward()
            return loss.detach(), ys.detach(), [p.grad.clone() for p in field.ps]

        return call

    def count():
        counter = [0]
        build(counter)()
        return {"nfe": counter[0]}

    def to_numpy(out):
        loss, ys, grads = out
        return float(loss), ys.numpy(), [g.numpy() for g in grads]

    method = "dopri5 " + ("odeint_adjoint" if adjoint else "odeint (backprop)")
    return Case("torchdiffeq", method, build(), to_numpy, count)


def grad_cases(w: W.Workload) -> list[tuple[str, Callable[[], Case]]]:
    """``[(label, builder)]`` of the batched gradient configurations on mlp-batch."""
    out = []
    for s in w.solvers:
        out.append((f"jaxode {s} adjoint", lambda s=s: jaxode_grad(w, s, "adjoint")))
        out.append((f"jaxode {s} adjoint seminorm", lambda s=s: jaxode_grad(w, s, "adjoint", True)))
        out.append((f"jaxode {s} backprop", lambda s=s: jaxode_grad(w, s, "backprop")))
        out.append((f"jaxode {s} checkpoint", lambda s=s: jaxode_grad(w, s, "checkpoint")))
    if available("diffrax"):
        for s in w.solvers:
            out.append((f"diffrax {s} BacksolveAdjoint", lambda s=s: diffrax_grad(w, s, "backsolve")))
            out.append((f"diffrax {s} RecursiveCheckpointAdjoint",
                        lambda s=s: diffrax_grad(w, s, "recursive")))
    if available("jax.experimental.ode"):
        out.append(("jax odeint dopri5 adjoint", lambda: jax_odeint_grad(w)))
    out.append(("JAX scan dopri5 floor", lambda: scan_floor_grad(w)))
    if available("torchdiffeq"):
        out.append(("torchdiffeq dopri5 odeint (backprop)", lambda: torchdiffeq_grad(w, False)))
        out.append(("torchdiffeq dopri5 odeint_adjoint", lambda: torchdiffeq_grad(w, True)))
    return out
