"""The damped pendulum, solved with jaxode and checked against ``scipy.integrate.odeint``.

    θ'(t) = ω(t)
    ω'(t) = -b ω(t) - c sin θ(t),      b = 0.25, c = 5.0,
    θ(0) = π - 0.1, ω(0) = 0,          t = linspace(0, 10, 101)

(the example of SciPy's ``odeint`` documentation). Both solves use float64 and tight
tolerances (``rtol = atol = 1e-10``); the largest difference between them is printed, and
``θ(t)`` and ``ω(t)`` are plotted.

Run: ``python examples/pendulum.py [--out PATH] [--quick] [--solver NAME]``.
"""

from __future__ import annotations

import time

import matplotlib

matplotlib.use("Agg")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.integrate import odeint  # noqa: E402

import jaxode  # noqa: E402

from _common import parser, save  # noqa: E402

B, C = 0.25, 5.0
Y0 = (np.pi - 0.1, 0.0)


def pendulum(y, t, params):
    """``d/dt [θ, ω] = [ω, -b ω - c sin θ]`` (jaxode's ``f(z, t, params)`` convention)."""
    b, c = params
    theta, omega = y[0], y[1]
    return jnp.stack([omega, -b * omega - c * jnp.sin(theta)])


def pendulum_np(y, t, b, c):
    """The same field for ``scipy.integrate.odeint`` (``f(y, t, *args)``)."""
    theta, omega = y
    return [omega, -b * omega - c * np.sin(theta)]


def parse(argv):
    p = parser(__doc__, "pendulum", quick_help="a smoke run (the same solve: it is fast)", seed=False)
    p.add_argument("--solver", default="dopri8", help="jaxode solver name (default dopri8)")
    p.add_argument("--tol", type=float, default=1e-10, help="rtol = atol of both solves")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Runs the example; returns ``max_abs_diff`` (jaxode vs odeint), ``nfe``, ``num_steps``, ..."""
    args = parse(argv)
    jax.config.update("jax_enable_x64", True)  # a global flag: float64 from here on
    t_start = time.perf_counter()
    ts = np.linspace(0.0, 10.0, 101)

    ys, info = jaxode.odesolve(
        pendulum, jnp.asarray(Y0, jnp.float64), jnp.asarray(ts, jnp.float64), (B, C),
        solver=args.solver, rtol=args.tol, atol=args.tol, max_steps=100_000, full_output=True,
    )
    ys = np.asarray(ys)
    ref = odeint(pendulum_np, Y0, ts, args=(B, C), rtol=args.tol, atol=args.tol)
    diff = np.abs(ys - ref)
    max_abs_diff = float(diff.max())
    print(f"jaxode ({args.solver}, rtol=atol={args.tol:g}): {int(info.num_steps)} steps, "
          f"{int(info.nfe)} evaluations of f, dtype {ys.dtype}")
    print(f"max |jaxode - odeint| over {len(ts)} times: {max_abs_diff:.3e}   "
          f"(theta {diff[:, 0].max():.3e}, omega {diff[:, 1].max():.3e})")

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(ts, ref[:, 0], "k", lw=3, alpha=0.3, label=r"$\theta$ (odeint)")
    ax[0].plot(ts, ref[:, 1], "C7", lw=3, alpha=0.3, label=r"$\omega$ (odeint)")
    ax[0].plot(ts, ys[:, 0], "C0--", label=r"$\theta$ (jaxode)")
    ax[0].plot(ts, ys[:, 1], "C1--", label=r"$\omega$ (jaxode)")
    ax[0].set(xlabel="t", title=f"damped pendulum, b={B}, c={C}")
    ax[0].legend(fontsize=8)
    ax[1].semilogy(ts[1:], diff[1:, 0], "C0", label=r"$|\Delta\theta|$")
    ax[1].semilogy(ts[1:], diff[1:, 1], "C1", label=r"$|\Delta\omega|$")
    ax[1].set(xlabel="t", title="|jaxode - odeint|")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    save(fig, args.out, dpi=110)
    runtime = time.perf_counter() - t_start
    print(f"wrote {args.out}   ({runtime:.1f} s)")
    return {
        "max_abs_diff": max_abs_diff,
        "num_steps": int(info.num_steps),
        "nfe": int(info.nfe),
        "dtype": str(ys.dtype),
        "runtime_s": runtime,
        "out": args.out,
    }


if __name__ == "__main__":
    main()
