"""Events: learn gravity and restitution from a bouncing ball; aim a projectile with drag.

1. A ball dropped from rest at height ``h0`` falls, ``x'' = -g``, and bounces (a non-terminal
   ``jaxode.Event`` on ``x = 0``, downward, whose update is ``v → -e v``). The state also holds
   the times of the first bounces (the update writes ``t`` into the next slot), so the bounce
   times are outputs like any other. From noisy heights at 61 times and the three bounce times,
   gradient descent (through the resets, ``gradient="adjoint"``: the adjoint's jump condition)
   recovers ``g`` and ``e`` from a wrong guess. The bounce times have a closed form, a geometric
   series in ``e``: ``t_k = t_1 (1 + 2e + ... + 2e^{k-1})``, ``t_1 = sqrt(2 h0 / g)``.
2. A projectile with quadratic drag, ``v' = -k |v| v - g``, launched at speed ``v0``: a terminal
   event on the ground (``y = 0``, downward) ends the flight at ``t*``; the launch angle is chosen
   by gradient descent so that the landing point ``x(t*)`` hits a target (the gradient flows
   through the event time and the state there).

Run: ``python examples/bouncing_ball.py [--out PATH] [--quick]``.
"""

from __future__ import annotations

import time

import matplotlib

matplotlib.use("Agg")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxode  # noqa: E402

from _common import parser, save  # noqa: E402

H0, G_TRUE, E_TRUE = 10.0, 9.81, 0.8
SLOTS = 3  # bounce times recorded in the state
TOL = dict(rtol=1e-9, atol=1e-9)


def ball(z, t, p):
    """``z = [x, v, n, T_1 .. T_K]``: height, velocity, bounces so far, bounce times."""
    return jnp.concatenate([jnp.stack([z[1], -p["g"]]), jnp.zeros_like(z[2:])])


def bounce(z, t, p):
    """``v → -e v``; the time goes into slot ``n`` (if one is left), and ``n`` counts up."""
    slot = jnp.arange(SLOTS) == z[2]
    times = jnp.where(slot, t, z[3:])
    return jnp.concatenate([jnp.stack([z[0], -p["e"] * z[1], z[2] + 1]), times])


BOUNCE = jaxode.Event(lambda z, t, p: z[0], direction=-1, terminal=False, update=bounce)


def params_of(theta):
    """Unconstrained ``(log g, logit e)`` to ``{"g", "e"}``."""
    return {"g": jnp.exp(theta[0]), "e": jax.nn.sigmoid(theta[1])}


def simulate(p, ts):
    z0 = jnp.concatenate([jnp.array([H0, 0.0, 0.0]), jnp.zeros(SLOTS)])
    return jaxode.odesolve(ball, z0, ts, p, events=BOUNCE, full_output=True, max_steps=2000, **TOL)


def bounce_times_exact(g, e, k=SLOTS):
    t1 = np.sqrt(2 * H0 / g)
    return t1 * np.cumsum([1.0] + [2 * e**j for j in range(1, k)])


def fit_ball(ts, heights, bounce_times, steps, lr):
    def loss(theta):
        ys, _ = simulate(params_of(theta), ts)
        return jnp.mean((ys[:, 0] - heights) ** 2) + jnp.sum((ys[-1, 3:] - bounce_times) ** 2)

    opt = optax.adam(lr)
    # g = 6, e = 0.65: a wrong guess (a low e would bring the ball to rest, Zeno, within the horizon)
    theta = jnp.array([np.log(6.0), np.log(0.65 / 0.35)])
    state = opt.init(theta)

    @jax.jit
    def update(theta, state):
        value, grad = jax.value_and_grad(loss)(theta)
        change, state = opt.update(grad, state)
        return optax.apply_updates(theta, change), state, value

    history, estimates = [], []
    for _ in range(steps):
        theta, state, value = update(theta, state)
        history.append(float(value))
        p = params_of(theta)
        estimates.append((float(p["g"]), float(p["e"])))
    return theta, history, estimates


def projectile(z, t, p):
    """``z = [x, y, vx, vy]`` with quadratic drag ``k |v| v``."""
    v = z[2:]
    speed = jnp.sqrt(jnp.sum(v**2))
    return jnp.concatenate([v, -p["k"] * speed * v - jnp.array([0.0, p["g"]])])


GROUND = jaxode.Event(lambda z, t, p: z[1], direction=-1)  # terminal


def landing(angle, p, v0):
    """``x(t*)`` and ``t*``: where and when the projectile lands."""
    z0 = jnp.stack([0.0, 0.0, v0 * jnp.cos(angle), v0 * jnp.sin(angle)])
    _, info = jaxode.odesolve(projectile, z0, jnp.array([0.0, 100.0]), p, events=GROUND, full_output=True,
                              gradient="backprop", **TOL)
    return info.event_state[0], info.event_time


def aim(target, p, v0, steps):
    """Newton's method on the miss ``r(a) = x(t*; a) - target``, ``a ← a - r / r'``, with
    ``r'`` the derivative of the landing point through the event time and state."""
    miss = jax.jit(jax.value_and_grad(lambda a: landing(a, p, v0)[0] - target))
    angle, history = jnp.array(0.2), []
    for _ in range(steps):
        r, slope = miss(angle)
        history.append(abs(float(r)))
        angle = angle - r / slope
    return angle, history


def parse(argv):
    p = parser(__doc__, "bouncing_ball", quick_help="fewer optimisation steps (for the tests)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    jax.config.update("jax_enable_x64", True)
    t_start = time.perf_counter()
    rng = np.random.default_rng(args.seed)

    # 1. the bouncing ball
    ts = jnp.linspace(0.0, 6.0, 61)
    truth = {"g": jnp.array(G_TRUE), "e": jnp.array(E_TRUE)}
    ys_true, info_true = simulate(truth, ts)
    heights = ys_true[:, 0] + 0.05 * rng.standard_normal(ts.shape[0])
    bounce_times = ys_true[-1, 3:]
    exact_times = bounce_times_exact(G_TRUE, E_TRUE)
    times_error = float(np.max(np.abs(np.asarray(bounce_times) - exact_times)))
    steps = 60 if args.quick else 300
    theta, history, estimates = fit_ball(ts, heights, bounce_times, steps, lr=0.05)
    est = params_of(theta)
    g_est, e_est = float(est["g"]), float(est["e"])
    ys_fit, _ = simulate(est, ts)
    print(f"bounce times {np.asarray(bounce_times).round(6)} (closed form {exact_times.round(6)}, "
          f"max error {times_error:.1e}); {int(info_true.num_events)} bounces")
    print(f"fit after {steps} steps: g = {g_est:.4f} (true {G_TRUE}), e = {e_est:.4f} (true {E_TRUE}); "
          f"loss {history[0]:.3g} -> {history[-1]:.3g}")

    # 2. aiming a projectile with drag
    drag = {"k": jnp.array(0.02), "g": jnp.array(G_TRUE)}
    v0, target = 30.0, 35.0
    angle, misses = aim(target, drag, v0, steps=6 if args.quick else 10)
    x_land, t_land = landing(angle, drag, v0)
    print(f"projectile: launch angle {np.degrees(float(angle)):.3f} deg lands at x = {float(x_land):.6f} "
          f"(target {target}) at t* = {float(t_land):.4f}; misses by Newton step {np.round(misses, 8)}")

    # plots: the trajectories with the bounces marked; the estimates; the projectile
    fine = jnp.linspace(0.0, 6.0, 601)
    y_true_fine, _ = simulate(truth, fine)
    y_fit_fine, _ = simulate(est, fine)
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].plot(fine, y_true_fine[:, 0], "k", lw=3, alpha=0.3, label="truth")
    ax[0].plot(ts, heights, "C7.", ms=4, label="observed heights")
    ax[0].plot(fine, y_fit_fine[:, 0], "C0--", label="fitted")
    ax[0].plot(bounce_times, np.zeros(SLOTS), "rv", label="observed bounces")
    ax[0].plot(ys_fit[-1, 3:], np.zeros(SLOTS), "C0^", label="fitted bounces")
    ax[0].set(xlabel="t", ylabel="height", title="bouncing ball (non-terminal events)")
    ax[0].legend(fontsize=8)
    est_arr = np.asarray(estimates)
    ax[1].plot(est_arr[:, 0] / G_TRUE, label="g / g_true")
    ax[1].plot(est_arr[:, 1] / E_TRUE, label="e / e_true")
    ax[1].axhline(1.0, color="k", lw=0.8)
    ax[1].set(xlabel="optimisation step", title="estimates against the truth")
    ax[1].legend(fontsize=8)
    z0 = jnp.stack([0.0, 0.0, v0 * jnp.cos(angle), v0 * jnp.sin(angle)])
    path = jaxode.odesolve(projectile, z0, jnp.linspace(0.0, float(t_land), 200), drag, **TOL)
    ax[2].plot(path[:, 0], path[:, 1], "C0")
    ax[2].plot([float(x_land)], [0.0], "rv", label="terminal event")
    ax[2].axvline(target, color="k", lw=0.8, ls=":", label="target")
    ax[2].set(xlabel="x", ylabel="y", title="projectile with drag, aimed by its event")
    ax[2].legend(fontsize=8)
    fig.tight_layout()
    save(fig, args.out, dpi=110)
    runtime = time.perf_counter() - t_start
    print(f"wrote {args.out}   ({runtime:.1f} s)")
    return {
        "bounce_times": np.asarray(bounce_times).tolist(),
        "bounce_times_error": times_error,
        "num_events": int(info_true.num_events),
        "g": g_est, "e": e_est, "g_true": G_TRUE, "e_true": E_TRUE,
        "initial_loss": history[0], "final_loss": history[-1],
        "landing_x": float(x_land), "target": target, "miss": abs(float(x_land) - target),
        "runtime_s": runtime, "out": args.out,
    }


if __name__ == "__main__":
    main()
