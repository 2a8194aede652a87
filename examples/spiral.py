"""Learn the dynamics of a spiral from one observed trajectory (the README's main example).

The data: the trajectory of ``dz/dt = (z**3) @ A``, ``A = [[-0.1, 2.0], [-2.0, -0.1]]``,
``z(0) = [2, 0]``, observed at ``T`` times in ``[0, 25]`` (solved with jaxode's ``tsit5`` at
a tight tolerance). The model: ``dz/dt = f_θ(z, t)`` with ``f_θ`` a ``jaxode.nn.MLPField``
(input ``[z, t]``), wrapped in a ``jaxode.nn.NeuralODE``. Training: each iteration draws a
batch of random short windows of the trajectory, solves the model from the first point of
each window over the window's times (``eqx.filter_vmap`` over the windows), and takes an
optax Adam step on the mean squared error, with gradients by the continuous adjoint method.

Then the learned model is solved from ``z(0)`` over all of ``[0, 25]`` and compared with the
data. Plots: ``z(t)`` true vs learned, the phase portrait, and the learned and true vector
fields. Prints the loss before and after training (on a fixed set of evaluation windows)
and the error of the full learned trajectory.

Run: ``python examples/spiral.py [--out PATH] [--quick] [--iters N] [--seed S]``.
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
from tqdm import tqdm  # noqa: E402

import jaxode  # noqa: E402
from jaxode.nn import MLPField, NeuralODE  # noqa: E402

from _common import parser, save  # noqa: E402

A = np.array([[-0.1, 2.0], [-2.0, -0.1]])
Z0 = np.array([2.0, 0.0])
T_END = 25.0


def true_field(z, t, params):
    """The spiral's vector field ``(z**3) @ A``."""
    return (z**3) @ params


def make_data(num_times: int):
    """The true trajectory at ``num_times`` times in ``[0, 25]``: ``(ts, ys)``."""
    dtype = jnp.result_type(float)  # float64 with jax_enable_x64, else float32
    tol = 1e-10 if dtype == jnp.float64 else 1e-6
    ts = jnp.linspace(0.0, T_END, num_times, dtype=dtype)
    ys = jaxode.odesolve(
        true_field, jnp.asarray(Z0, dtype), ts, jnp.asarray(A, dtype),
        solver="tsit5", rtol=tol, atol=tol, max_steps=100_000,
    )
    return ts, ys


def parse(argv):
    p = parser(__doc__, "spiral")
    p.add_argument("--iters", type=int, default=None, help="training iterations")
    p.add_argument("--window", type=int, default=None, help="observations per training window")
    p.add_argument("--num-times", type=int, default=None, help="observations in [0, 25]")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Runs the example; returns ``initial_loss``, ``final_loss``, ``trajectory_mse``, ..."""
    args = parse(argv)
    if args.quick:
        num_times, window, batch, iters, width, lr = 400, 10, 16, 300, 32, 1e-2
    else:
        num_times, window, batch, iters, width, lr = 1000, 20, 16, 1200, 64, 1e-2
    iters = args.iters if args.iters is not None else iters
    window = args.window if args.window is not None else window
    num_times = args.num_times if args.num_times is not None else num_times
    t_start = time.perf_counter()

    ts, ys = make_data(num_times)
    key_model, key_train = jax.random.split(jax.random.key(args.seed))
    field = MLPField(2, width=width, depth=2, activation=jnp.tanh, key=key_model)
    # ts=ts: model(z0) is the whole trajectory; model(z0, t_window) solves over one window.
    model = NeuralODE(field, ts=ts, rtol=1e-3, atol=1e-4, gradient="adjoint")

    offsets = jnp.arange(window)

    def loss_fn(model, starts):
        idx = starts[:, None] + offsets[None, :]  # (batch, window)
        t_win, y_win = ts[idx], ys[idx]
        pred = eqx.filter_vmap(lambda y0, t: model(y0, t))(y_win[:, 0], t_win)
        return jnp.mean((pred - y_win) ** 2)

    # One compiled function serves training and evaluation (compiling is most of a quick run).
    loss_and_grad = eqx.filter_jit(eqx.filter_value_and_grad(loss_fn))
    eval_starts = jnp.linspace(0, num_times - window, 4 * batch).astype(jnp.int32).reshape(4, batch)

    def eval_loss(model):
        """The loss on fixed, evenly spaced windows (4 batches covering the trajectory)."""
        return float(np.mean([loss_and_grad(model, s)[0] for s in eval_starts]))

    schedule = optax.cosine_decay_schedule(lr, iters, alpha=0.01)
    optim = optax.adam(schedule)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def update(model, grads, opt_state):
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt_state

    initial_loss = eval_loss(model)
    all_starts = jax.random.randint(key_train, (iters, batch), 0, num_times - window + 1, jnp.int32)
    bar = tqdm(range(iters), desc="spiral", unit="it", mininterval=0.5, disable=None)  # TTY only
    for i in bar:
        loss, grads = loss_and_grad(model, all_starts[i])
        model, opt_state = update(model, grads, opt_state)
        if i % 10 == 0 or i == iters - 1:
            bar.set_postfix(loss=f"{float(loss):.2e}")
    bar.close()
    final_loss = eval_loss(model)

    learned = model(ys[0])  # the learned model's whole trajectory from z(0)
    trajectory_mse = float(jnp.mean((learned - ys) ** 2))
    print(f"initial loss {initial_loss:.4e}   final loss {final_loss:.4e}   "
          f"(x{initial_loss / final_loss:.0f} lower)")
    print(f"full trajectory from z(0) over [0, {T_END:g}]: MSE {trajectory_mse:.4e}")

    _plot(args.out, model, ts, ys, learned)
    runtime = time.perf_counter() - t_start
    print(f"wrote {args.out}   ({runtime:.1f} s)")
    return {
        "initial_loss": initial_loss,
        "final_loss": final_loss,
        "trajectory_mse": trajectory_mse,
        "iters": iters,
        "runtime_s": runtime,
        "out": args.out,
    }


def _plot(out, model, ts, ys, learned):
    ts, ys, learned = np.asarray(ts), np.asarray(ys), np.asarray(learned)
    fig, ax = plt.subplots(2, 2, figsize=(11, 9))
    a = ax[0, 0]
    for j, c in enumerate(("C0", "C1")):
        a.plot(ts, ys[:, j], c, lw=2, alpha=0.5, label=f"true $z_{j + 1}$")
        a.plot(ts, learned[:, j], c, ls="--", lw=1, label=f"learned $z_{j + 1}$")
    a.set(xlabel="t", ylabel="z", title="trajectories")
    a.legend(fontsize=8, ncol=2)

    a = ax[0, 1]
    a.plot(ys[:, 0], ys[:, 1], "k", lw=2, alpha=0.4, label="true")
    a.plot(learned[:, 0], learned[:, 1], "C3--", lw=1, label="learned")
    a.set(xlabel="$z_1$", ylabel="$z_2$", title="phase portrait", aspect="equal")
    a.legend(fontsize=8)

    lim = 1.1 * np.max(np.abs(ys))
    g = np.linspace(-lim, lim, 41)
    Z1, Z2 = np.meshgrid(g, g)
    grid = jnp.asarray(np.stack([Z1, Z2], -1).reshape(-1, 2), ys.dtype)
    fields = {
        "learned vector field $f_\\theta(z, t=0)$": model.field(grid, jnp.zeros((), grid.dtype)),
        "true vector field $(z^3) A$": true_field(grid, 0.0, jnp.asarray(A, grid.dtype)),
    }
    for a, (title, v) in zip(ax[1], fields.items(), strict=True):
        v = np.asarray(v).reshape(Z1.shape + (2,))
        speed = np.hypot(v[..., 0], v[..., 1])
        a.streamplot(g, g, v[..., 0], v[..., 1], color=np.log10(speed + 1e-3), cmap="viridis",
                     density=1.2, linewidth=0.8)
        a.plot(ys[:, 0], ys[:, 1], "k", lw=1, alpha=0.4)
        a.set(xlabel="$z_1$", ylabel="$z_2$", title=title, aspect="equal", xlim=(-lim, lim),
              ylim=(-lim, lim))
    fig.tight_layout()
    save(fig, out, dpi=110)


if __name__ == "__main__":
    main()
