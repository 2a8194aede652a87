"""The benchmark workloads of ``benchmarks/WORKLOADS.md``, defined once.

Every workload is plain numpy data (``z0``, ``ts``, ``params``) plus a JAX vector field
``f(z, t, params)`` (jaxode's signature) and a numpy one for scipy. Peers adapt the signature
in ``benchmarks/peers.py``; nothing here imports a peer.

* ``spiral()``: torchdiffeq's ``ode_demo.py`` dynamics, float64, rtol=1e-7, atol=1e-9.
* ``mlp_batch(batch=256, t1=1.0)``: the 33-128-128-32 tanh MLP field on a (batch, 32) float32
  state, rtol=atol=1e-5; ``t1`` != 1 gives the memory-vs-horizon variant.
* ``pendulum()``: scipy's ``odeint`` documentation example, float64.

References:

* ``reference_trajectory(w)``: scipy ``solve_ivp(method="DOP853")`` at the tolerances of the
  workload definition (spiral 1e-13/1e-15, mlp-batch 1e-10/1e-12, pendulum 1e-13/1e-15),
  float64, cached in ``benchmarks/reference/``.
* ``reference_gradient(batch, t1)``: the gradient of ``mean(ys**2)`` with respect to the MLP
  weights, by jaxode ``gradient="backprop"`` in float64 at rtol=1e-10, atol=1e-12 (dopri8;
  the dopri5 value is computed too and their difference stored as a check), cached. It runs
  in a subprocess with ``jax_enable_x64`` so the caller's JAX configuration is untouched.

``python benchmarks/workloads.py`` (re)builds the caches and prints a summary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE_DIR = os.path.join(HERE, "reference")

SPIRAL_A = np.array([[-0.1, 2.0], [-2.0, -0.1]])
MLP_SIZES = (33, 128, 128, 32)
MLP_GAIN = 4.5
MLP_BATCH = 256
QUICK_BATCH = 64  # the batch of ``run.py --quick``


@dataclasses.dataclass
class Workload:
    """One problem: the same data for every library.

    Attributes:
        name: ``"spiral"``, ``"mlp-batch"`` or ``"pendulum"``.
        z0: the initial state (numpy, the workload's dtype).
        ts: the output times (numpy, the workload's dtype).
        params: a tuple of numpy arrays passed as ``params`` to ``f``.
        f: the JAX field ``f(z, t, params)``.
        f_np: the numpy field ``f_np(z, t, params)`` on arrays of ``z0``'s shape (float64).
        rtol, atol: the tolerances every library is run at.
        dtype: ``"float32"`` or ``"float64"``.
        solvers: the tableaus the workload is run with.
        ref_rtol, ref_atol: the tolerances of the scipy DOP853 reference.
        meta: extra facts (batch, t1) for the report.
    """

    name: str
    z0: np.ndarray
    ts: np.ndarray
    params: tuple
    f: Callable
    f_np: Callable
    rtol: float
    atol: float
    dtype: str
    solvers: tuple[str, ...]
    ref_rtol: float
    ref_atol: float
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> str:
        extra = "".join(f"_{k}{v:g}" for k, v in sorted(self.meta.items()))
        return f"{self.name}{extra}"


# ---------------------------------------------------------------------------------------
# spiral


def spiral_field(z, t, params):
    (a,) = params
    return (z**3) @ a


def spiral_field_np(z, t, params):
    (a,) = params
    return (z**3) @ a


def spiral() -> Workload:
    return Workload(
        name="spiral",
        z0=np.array([2.0, 0.0]),
        ts=np.linspace(0.0, 25.0, 1000),
        params=(SPIRAL_A.copy(),),
        f=spiral_field,
        f_np=spiral_field_np,
        rtol=1e-7,
        atol=1e-9,
        dtype="float64",
        solvers=("dopri5", "tsit5"),
        ref_rtol=1e-13,
        ref_atol=1e-15,
    )


# ---------------------------------------------------------------------------------------
# mlp-batch


def mlp_weights(dtype=np.float32) -> tuple:
    """``(W0, b0, W1, b1, W2, b2)``: Glorot normal with gain 4.5, biases N(0, 0.1²), rng(0)."""
    rng = np.random.default_rng(0)
    out = []
    for fan_in, fan_out in zip(MLP_SIZES[:-1], MLP_SIZES[1:], strict=True):
        std = MLP_GAIN * np.sqrt(2.0 / (fan_in + fan_out))
        out.append(rng.normal(0.0, std, size=(fan_in, fan_out)))
        out.append(rng.normal(0.0, 0.1, size=(fan_out,)))
    return tuple(np.asarray(w, dtype) for w in out)


def mlp_z0(batch: int = MLP_BATCH, dtype=np.float32) -> np.ndarray:
    """The first ``batch`` rows of the ``(256, 32)`` N(0, 1) batch drawn from rng(1).

    A larger batch (GPU timings) continues the same stream: its first 256 rows are the batch.
    """
    z = np.random.default_rng(1).normal(size=(max(batch, MLP_BATCH), MLP_SIZES[-1]))
    return np.asarray(z[:batch], dtype)


def mlp_field(z, t, params):
    """``MLP([z, t])`` for ``z`` of shape ``(..., 32)``: works batched and under ``vmap``."""
    import jax.numpy as jnp

    w0, b0, w1, b1, w2, b2 = params
    tt = jnp.broadcast_to(jnp.asarray(t, z.dtype), z.shape[:-1] + (1,))
    h = jnp.concatenate([z, tt], axis=-1)
    h = jnp.tanh(h @ w0 + b0)
    h = jnp.tanh(h @ w1 + b1)
    return h @ w2 + b2


def mlp_field_np(z, t, params):
    w0, b0, w1, b1, w2, b2 = params
    h = np.concatenate([z, np.full(z.shape[:-1] + (1,), t)], axis=-1)
    h = np.tanh(h @ w0 + b0)
    h = np.tanh(h @ w1 + b1)
    return h @ w2 + b2


def mlp_batch(
    batch: int = MLP_BATCH, t1: float = 1.0, rtol: float = 1e-5, atol: float | None = None
) -> Workload:
    meta = {"batch": batch}
    if t1 != 1.0:
        meta["t1"] = t1
    return Workload(
        name="mlp-batch",
        z0=mlp_z0(batch),
        ts=np.linspace(0.0, t1, 11).astype(np.float32),
        params=mlp_weights(),
        f=mlp_field,
        f_np=mlp_field_np,
        rtol=rtol,
        atol=rtol if atol is None else atol,
        dtype="float32",
        solvers=("dopri5", "tsit5"),
        ref_rtol=1e-10,
        ref_atol=1e-12,
        meta=meta,
    )


def mlp_loss(ys):
    """The loss of the mlp-batch gradient: ``mean(ys**2)`` over outputs, batch and features."""
    import jax.numpy as jnp

    return jnp.mean(ys**2)


# ---------------------------------------------------------------------------------------
# pendulum


def pendulum_field(y, t, params):
    import jax.numpy as jnp

    b, c = params
    theta, w = y[0], y[1]
    return jnp.stack([w, -b * w - c * jnp.sin(theta)])


def pendulum_field_np(y, t, params):
    b, c = params
    theta, w = y
    return np.array([w, -b * w - c * np.sin(theta)])


def pendulum() -> Workload:
    return Workload(
        name="pendulum",
        z0=np.array([np.pi - 0.1, 0.0]),
        ts=np.linspace(0.0, 10.0, 101),
        params=(np.float64(0.25), np.float64(5.0)),
        f=pendulum_field,
        f_np=pendulum_field_np,
        rtol=1.49012e-8,
        atol=1.49012e-8,
        dtype="float64",
        solvers=("dopri5", "tsit5"),
        ref_rtol=1e-13,
        ref_atol=1e-15,
    )


def horizons() -> tuple[float, ...]:
    """The memory-vs-horizon final times."""
    return (1.0, 4.0, 16.0)


def get(name: str, **kw) -> Workload:
    return {"spiral": spiral, "mlp-batch": mlp_batch, "pendulum": pendulum}[name](**kw)


# ---------------------------------------------------------------------------------------
# errors against references


def rms(x) -> float:
    x = np.asarray(x, np.float64)
    return float(np.sqrt(np.mean(x**2)))


def trajectory_error(ys, ref) -> float:
    """RMS error of ``ys`` (all outputs) against the reference."""
    return rms(np.asarray(ys, np.float64) - ref)


def final_scaled_error(y_final, ref_final, rtol, atol) -> float:
    """RMS of ``(y - ref) / (atol + rtol |ref|)`` at the last output: ~1 is 'one tolerance'."""
    ref_final = np.asarray(ref_final, np.float64)
    d = np.asarray(y_final, np.float64) - ref_final
    return rms(d / (atol + rtol * np.abs(ref_final)))


def gradient_error(g, g_ref) -> float:
    """``|g - g_ref| / |g_ref|`` over all weights and biases together."""
    g = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in g])
    r = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in g_ref])
    return float(np.linalg.norm(g - r) / np.linalg.norm(r))


# ---------------------------------------------------------------------------------------
# references (cached)


def _cache_path(kind: str, w: Workload) -> str:
    return os.path.join(REFERENCE_DIR, f"{kind}_{w.key}.npz")


def reference_trajectory(w: Workload, compute: bool = True) -> np.ndarray | None:
    """scipy DOP853 at the reference tolerances, float64, at ``w.ts``; shape ``(T,) + z0.shape``.

    Cached; when not cached and ``compute`` is false, ``None``.
    """
    path = _cache_path("traj", w)
    if os.path.exists(path):
        return np.load(path)["ys"]
    if not compute:
        return None
    from scipy.integrate import solve_ivp

    shape = w.z0.shape
    params = tuple(np.asarray(p, np.float64) for p in w.params)
    ts = np.asarray(w.ts, np.float64)

    def rhs(t, y):
        return np.ravel(w.f_np(y.reshape(shape), t, params))

    sol = solve_ivp(rhs, (ts[0], ts[-1]), np.ravel(w.z0).astype(np.float64), method="DOP853",
                    t_eval=ts, rtol=w.ref_rtol, atol=w.ref_atol)
    if not sol.success:
        raise RuntimeError(f"reference solve of {w.key} failed: {sol.message}")
    ys = sol.y.T.reshape((len(ts),) + shape)
    os.makedirs(REFERENCE_DIR, exist_ok=True)
    np.savez(path, ys=ys, nfev=sol.nfev)
    return ys


def _gradient_reference_worker(batch: int, t1: float, path: str) -> None:
    """Runs in a subprocess with x64: the float64 backprop gradient, dopri8 and dopri5."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import jaxode

    w = mlp_batch(batch, t1)
    z0 = jnp.asarray(w.z0, jnp.float64)
    ts = jnp.asarray(np.linspace(0.0, t1, 11), jnp.float64)
    params = tuple(jnp.asarray(p, jnp.float64) for p in w.params)

    def grad_and_info(solver):
        def loss(p):
            ys, info = jaxode.odesolve(mlp_field, z0, ts, p, solver=solver, rtol=1e-10, atol=1e-12,
                                       gradient="backprop", max_steps=65536, full_output=True)
            return mlp_loss(ys), (ys, info)

        (val, (ys, info)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return [np.asarray(x) for x in g], float(val), np.asarray(ys), int(info.num_steps)

    g8, loss8, ys8, steps8 = grad_and_info("dopri8")
    g5, _, _, steps5 = grad_and_info("dopri5")
    check = gradient_error(g5, g8)
    np.savez(path, *g8, loss=loss8, ys_final=ys8[-1], steps_dopri8=steps8, steps_dopri5=steps5,
             dopri5_vs_dopri8=check)


def reference_gradient(
    batch: int = MLP_BATCH, t1: float = 1.0, compute: bool = True
) -> dict[str, Any] | None:
    """The float64 gradient reference of mlp-batch: ``{"grad": [6 arrays], "loss", "check", ...}``.

    ``check`` is ``|g_dopri5 - g_dopri8| / |g_dopri8|``, both at rtol=1e-10, atol=1e-12: an
    estimate of the reference's own error. ``ys_final``: the float64 state at ``t1``. Cached;
    when not cached and ``compute`` is false, ``None``.
    """
    w = mlp_batch(batch, t1)
    path = _cache_path("grad", w)
    if not os.path.exists(path):
        if not compute:
            return None
        os.makedirs(REFERENCE_DIR, exist_ok=True)
        code = (f"import sys; sys.path.insert(0, {HERE!r}); import workloads; "
                f"workloads._gradient_reference_worker({batch}, {t1!r}, {path!r})")
        env = dict(os.environ, JAX_ENABLE_X64="1")
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
    d = np.load(path)
    return {
        "grad": [d[f"arr_{i}"] for i in range(6)],
        "loss": float(d["loss"]),
        "ys_final": d["ys_final"],
        "steps_dopri8": int(d["steps_dopri8"]),
        "steps_dopri5": int(d["steps_dopri5"]),
        "check": float(d["dopri5_vs_dopri8"]),
    }


def main() -> None:
    summary = {}
    for w in (spiral(), pendulum(), mlp_batch()):
        ys = reference_trajectory(w)
        summary[w.key] = {"final": np.ravel(ys[-1])[:4].tolist()}
    cases = [(MLP_BATCH, t1) for t1 in horizons()] + [(QUICK_BATCH, 1.0)]
    for batch, t1 in cases:
        r = reference_gradient(batch, t1)
        traj = reference_trajectory(mlp_batch(batch, t1))
        summary[f"grad_b{batch}_t{t1:g}"] = {
            "loss": r["loss"], "dopri5_vs_dopri8": r["check"], "steps_dopri8": r["steps_dopri8"],
            "final_vs_scipy_rms": trajectory_error(r["ys_final"], traj[-1]),
        }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
