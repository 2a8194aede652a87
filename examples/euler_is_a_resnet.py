"""Euler's method is a ResNet with shared weights, and its error falls linearly with h.

A residual network updates its hidden state by ``z_(k+1) = z_k + g_k(z_k)``. Euler's method
for ``dz/dt = f(z, t)`` with step ``h`` is ``z_(k+1) = z_k + h f(z_k, t_k)``: a ResNet whose
blocks all share the weights of ``f`` (and know the "depth" ``t_k = t_0 + k h``). So:

1. train ``f = jaxode.nn.MLPField`` *as that ResNet*: ``odesolve(solver="euler", dt0=h)`` with
   ``gradient="backprop"`` (the exact gradient of the discrete network), on the trajectory
   of a damped pendulum ``θ' = ω, ω' = -0.25 ω - 5 sin θ`` over ``t ∈ [0, 2]``;
2. check that jaxode's Euler solve equals a hand-written residual loop (``lax.scan``);
3. solve the trained field with Euler at several ``h`` and with ``dopri8`` at a tight
   tolerance (the reference: the ODE that the ResNet discretises), and plot the error
   ``max_i |z_h(t_i) - z(t_i)|`` against ``h`` on log-log axes. Euler is a first-order
   method: the error is ``O(h)``, and the fitted slope is printed (about 1).

The left plot shows a lesson of its own: the weights were fitted to the *discrete* network
at ``h = 0.05``, and the continuous ODE of the same field misses the data by about
``C h`` with a large ``C`` — a ResNet trained with a coarse step is not automatically a good
model of an ODE (train with an adaptive solver, or check convergence in ``h``, when the
continuous interpretation matters).

Runs in float64 (it enables ``jax_enable_x64``, a global flag).

Run: ``python examples/euler_is_a_resnet.py [--out PATH] [--quick] [--steps N]``.
"""

from __future__ import annotations

import time

import matplotlib

matplotlib.use("Agg")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxode  # noqa: E402
from jaxode.nn import MLPField  # noqa: E402

from _common import parser, save  # noqa: E402

T_END = 2.0
H_TRAIN = 0.05


def pendulum(y, t, params):
    theta, omega = y[0], y[1]
    return jnp.stack([omega, -0.25 * omega - 5.0 * jnp.sin(theta)])


def resnet_forward(field, z0, t0: float, h: float, num_blocks: int):
    """The residual network ``z_(k+1) = z_k + h f(z_k, t_k)``: ``[z_0, ..., z_K]``."""

    def block(z, k):
        z_next = z + h * field(z, t0 + k * h)
        return z_next, z_next

    _, zs = jax.lax.scan(block, z0, jnp.arange(num_blocks, dtype=z0.dtype))
    return jnp.concatenate([z0[None], zs])


def parse(argv):
    p = parser(__doc__, "euler_is_a_resnet")
    p.add_argument("--steps", type=int, default=None, help="training steps")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Runs the example; returns ``hs``, ``errors``, ``slope``, ``resnet_vs_euler``, losses."""
    args = parse(argv)
    jax.config.update("jax_enable_x64", True)  # a global flag: float64 from here on
    t_start = time.perf_counter()
    steps = args.steps if args.steps is not None else (60 if args.quick else 600)

    # data: the pendulum observed at the 41 times of the training grid (h = 0.05)
    ts = jnp.linspace(0.0, T_END, int(round(T_END / H_TRAIN)) + 1)
    z0 = jnp.array([2.0, 0.0])
    data = jaxode.odesolve(pendulum, z0, ts, rtol=1e-10, atol=1e-10)

    # 1. train the field as a ResNet: Euler with h = 0.05 (40 blocks sharing weights), backprop
    field = MLPField(2, width=32, depth=2, key=jax.random.key(args.seed))

    def loss_fn(field):
        # max_steps bounds the reverse-differentiable loop: the network has len(ts) - 1 = 40 blocks
        ys = jaxode.odesolve(
            field, z0, ts, solver="euler", dt0=H_TRAIN, gradient="backprop", max_steps=64
        )
        return jnp.mean((ys - data) ** 2)

    optim = optax.adam(optax.cosine_decay_schedule(1e-2, steps, alpha=0.05))
    opt_state = optim.init(eqx.filter(field, eqx.is_inexact_array))

    @eqx.filter_jit
    def train_step(field, opt_state):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(field)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(field, eqx.is_inexact_array))
        return eqx.apply_updates(field, updates), opt_state, loss

    initial_loss = None
    for _ in range(steps):
        field, opt_state, loss = train_step(field, opt_state)
        initial_loss = float(loss) if initial_loss is None else initial_loss

    # 2. jaxode's Euler solve is the residual loop
    euler_train = jaxode.odesolve(field, z0, ts, solver="euler", dt0=H_TRAIN)
    final_loss = float(jnp.mean((euler_train - data) ** 2))
    print(f"trained the field as a {len(ts) - 1}-block ResNet (Euler, h={H_TRAIN}): "
          f"loss {initial_loss:.3e} -> {final_loss:.3e} in {steps} steps")
    resnet = resnet_forward(field, z0, 0.0, H_TRAIN, len(ts) - 1)
    resnet_vs_euler = float(jnp.max(jnp.abs(euler_train - resnet)))
    print(f"max |ResNet loop - jaxode euler| = {resnet_vs_euler:.2e}")

    # 3. error of Euler vs h, against an accurate solve of the same field
    fine = jnp.linspace(0.0, T_END, 201)  # the reference, also plotted
    ode = jaxode.odesolve(field, z0, fine, solver="dopri8", rtol=1e-12, atol=1e-12, max_steps=100_000)
    ts_eval, ref = fine[::50], ode[::50]  # t = 0, 0.5, 1, 1.5, 2
    hs = 0.1 * 2.0 ** -np.arange(7)  # 0.1 ... 0.0015625: each divides the output spacing 0.5
    solve_euler = eqx.filter_jit(
        lambda f, h: jaxode.odesolve(f, z0, ts_eval, solver="euler", dt0=h, max_steps=10_000)
    )
    errors = np.array([float(jnp.max(jnp.abs(solve_euler(field, h) - ref))) for h in hs])
    slope, intercept = np.polyfit(np.log(hs), np.log(errors), 1)
    print("      h     max error   error / h")
    for h, e in zip(hs, errors, strict=True):
        print(f"  {h:9.6f}  {e:10.3e}  {e / h:9.4f}")
    print(f"fitted slope of log(error) vs log(h): {slope:.3f}   (Euler is first order: 1)")

    _plot(args.out, ts, data, euler_train, fine, ode, hs, errors, slope, intercept)
    runtime = time.perf_counter() - t_start
    print(f"wrote {args.out}   ({runtime:.1f} s)")
    return {
        "hs": hs.tolist(),
        "errors": errors.tolist(),
        "slope": float(slope),
        "resnet_vs_euler": resnet_vs_euler,
        "initial_loss": initial_loss,
        "final_loss": final_loss,
        "runtime_s": runtime,
        "out": args.out,
    }


def _plot(out, ts, data, euler_train, fine, ode, hs, errors, slope, intercept):
    ts, data, euler_train, fine, ode = map(np.asarray, (ts, data, euler_train, fine, ode))
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    a = ax[0]
    for j, (c, name) in enumerate((("C0", r"\theta"), ("C1", r"\omega"))):
        a.plot(ts, data[:, j], "o", color=c, ms=6, alpha=0.3, label=f"data ${name}$")
        a.plot(ts, euler_train[:, j], ".", color=c, ms=5, label=f"ResNet / Euler h={H_TRAIN} ${name}$")
        a.plot(fine, ode[:, j], "-", color=c, lw=1, label=f"the trained field's ODE ${name}$")
    a.set(xlabel="t (= depth)", title="a ResNet with shared weights and its continuous limit")
    a.legend(fontsize=7)
    a = ax[1]
    a.loglog(hs, errors, "o-", label="Euler: max error at t = 0, 0.5, ..., 2")
    a.loglog(hs, np.exp(intercept) * hs**slope, "k--", lw=1, label=f"fit: slope {slope:.2f}")
    a.set(xlabel="step h", ylabel="max |z_h - z|", title="Euler's global error is O(h)")
    a.legend(fontsize=8)
    fig.tight_layout()
    save(fig, out, dpi=110)


if __name__ == "__main__":
    main()
