"""A continuous normalising flow (FFJORD) on a 2-D density known in closed form.

The data: FFJORD's ring of 8 Gaussians, an equal mixture of ``N(c_k, σ² I)`` with centres
``c_k = r (cos 2πk/8, sin 2πk/8)``, ``r = 2√2``, ``σ = 0.5/√2`` (Grathwohl et al. 2019's
"8gaussians": scale 4, noise 0.5, divided by 1.414). Its log density is known exactly, so the
model's held-out negative log-likelihood (NLL) can be compared with the data's own entropy
(the true density's NLL on the same points): the gap, in nats, is the headline figure (0 is
the best any model can do).

The model: ``jaxode.nn.CNF`` with a ``ConcatSquashField`` (3 hidden layers of 64, tanh),
exact trace, tsit5, adjoint gradients; the batch is solved as one state. Training: Adam on
``-mean log p(x)`` over fresh samples each step, twice: plain, and with Finlay et al.'s
(2020) regularisers ``λ (∫||f||² dt + ∫||∂f/∂z||_F² dt)``. Printed: the held-out NLL of
both against the true density's, and the vector-field evaluations (NFE, forward solve) per
training step. Plot: data, learned density on a grid, samples, and the flow carrying normal
noise to the data at a few times.

Run: ``python examples/cnf_toy.py [--out PATH] [--quick] [--iters N] [--reg-weight L]``.
"""

from __future__ import annotations

import math
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

from jaxode.nn import CNF, ConcatSquashField  # noqa: E402

from _common import parser, save  # noqa: E402

RADIUS = 4.0 / 1.414
SIGMA = 0.5 / 1.414
NUM_MODES = 8


def centres() -> np.ndarray:
    """The 8 mixture centres, ``(8, 2)``."""
    angle = 2 * np.pi * np.arange(NUM_MODES) / NUM_MODES
    return RADIUS * np.stack([np.cos(angle), np.sin(angle)], -1)


def sample_data(key, num: int) -> jax.Array:
    """``num`` points of the ring of Gaussians, ``(num, 2)``."""
    k1, k2 = jax.random.split(key)
    which = jax.random.randint(k1, (num,), 0, NUM_MODES)
    return jnp.asarray(centres())[which] + SIGMA * jax.random.normal(k2, (num, 2))


def true_log_prob(x) -> jax.Array:
    """The mixture's exact log density, ``log (1/8) Σ_k N(x; c_k, σ² I)``, shape ``x.shape[:-1]``."""
    sq = jnp.sum((x[..., None, :] - jnp.asarray(centres(), x.dtype)) ** 2, -1)
    log_n = -sq / (2 * SIGMA**2) - math.log(2 * math.pi * SIGMA**2)
    return jax.scipy.special.logsumexp(log_n, axis=-1) - math.log(NUM_MODES)


def parse(argv):
    p = parser(__doc__, "cnf_toy")
    p.add_argument("--iters", type=int, default=None, help="training steps per model")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--reg-weight", type=float, default=0.01, help="λ of the regularised run")
    p.add_argument("--rtol", type=float, default=1e-3, help="training tolerance (atol = rtol/100)")
    return p.parse_args(argv)


def train(cnf: CNF, *, iters: int, batch: int, lr: float, reg_weight: float, key, desc: str):
    """Adam (cosine decay) on ``-mean log p + λ mean(kinetic + frobenius)`` over fresh batches.

    Returns ``(cnf, history)``, ``history`` a dict of per-step ``loss``, ``nll`` and ``nfe``
    (the forward solve's field evaluations) and the training ``time_s`` after compilation.
    """
    optim = optax.adam(optax.cosine_decay_schedule(lr, iters, alpha=0.1))
    opt_state = optim.init(eqx.filter(cnf, eqx.is_inexact_array))

    def loss_fn(cnf, x):
        if reg_weight > 0:
            (log_p, (kin, frob)), info = cnf.log_prob(x, regularize=True, full_output=True)
            loss = -jnp.mean(log_p) + reg_weight * jnp.mean(kin + frob)
        else:  # no regularisers: the solve carries only (z, ∫tr)
            log_p, info = cnf.log_prob(x, full_output=True)
            loss = -jnp.mean(log_p)
        return loss, (-jnp.mean(log_p), info.nfe)

    @eqx.filter_jit
    def step(cnf, opt_state, key):
        x = sample_data(key, batch)
        (loss, (nll, nfe)), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(cnf, x)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(cnf, eqx.is_inexact_array))
        return eqx.apply_updates(cnf, updates), opt_state, loss, nll, nfe

    history = {"loss": [], "nll": [], "nfe": []}
    bar = tqdm(range(iters), desc=desc, unit="step", mininterval=0.5, disable=None)  # TTY only
    t0 = None
    for i in bar:
        cnf, opt_state, loss, nll, nfe = step(cnf, opt_state, jax.random.fold_in(key, i))
        history["loss"].append(float(loss))
        history["nll"].append(float(nll))
        history["nfe"].append(int(nfe))
        if i == 0:  # the first step compiles
            t0 = time.perf_counter()
        if i % 10 == 0 or i == iters - 1:
            bar.set_postfix(loss=f"{float(loss):.3f}", nfe=int(nfe))
    bar.close()
    history["time_s"] = time.perf_counter() - t0
    return cnf, history


_log_prob_and_info = eqx.filter_jit(lambda cnf, x: cnf.log_prob(x, full_output=True))
CHUNK = 1024


def log_density(cnf: CNF, x) -> tuple[np.ndarray, float]:
    """``(log p(x), forward NFE per chunk)`` at a tight tolerance (rtol 1e-6, atol 1e-8),
    in chunks of ``CHUNK`` points (``len(x)`` a multiple of it: one compilation)."""
    tight = CNF(cnf.field, trace="exact", rtol=1e-6, atol=1e-8)
    out = [_log_prob_and_info(tight, x[i : i + CHUNK]) for i in range(0, len(x), CHUNK)]
    return np.concatenate([np.asarray(lp) for lp, _ in out]), float(np.mean([int(i.nfe) for _, i in out]))


@eqx.filter_jit
def _samples_and_path(cnf: CNF, key, num: int, times):
    """``num`` samples and their paths ``z(times)`` (data at ``times[0]``), ``(T, num, 2)``."""
    samples = cnf.sample(key, num)
    return cnf.forward(samples, times)


def main(argv: list[str] | None = None) -> dict:
    """Runs the example; returns the NLLs, the true density's NLL, NFE per step, ..."""
    args = parse(argv)
    if args.quick:
        iters, batch, width, depth, lr, n_test = 40, 128, 16, 1, 1e-2, CHUNK
    else:
        iters, batch, width, depth, lr, n_test = 1500, 512, 64, 3, 3e-3, 8 * CHUNK
    iters = args.iters or iters
    batch, width, lr = args.batch or batch, args.width or width, args.lr or lr
    t_start = time.perf_counter()
    k_model, k_train, k_test, k_sample = jax.random.split(jax.random.key(args.seed), 4)

    x_test = sample_data(k_test, n_test)
    true_nll = -float(jnp.mean(true_log_prob(x_test)))
    field = ConcatSquashField(2, width=width, depth=depth, key=k_model)
    options = dict(trace="exact", rtol=args.rtol, atol=args.rtol / 100, gradient="adjoint")
    initial_nll = -float(np.mean(log_density(CNF(field, **options), x_test)[0]))

    results = {}
    for name, weight in (("plain", 0.0), ("regularised", args.reg_weight)):
        cnf, hist = train(CNF(field, **options), iters=iters, batch=batch, lr=lr, reg_weight=weight,
                          key=k_train, desc=f"CNF {name}")
        log_p, eval_nfe = log_density(cnf, x_test)
        nll = -float(np.mean(log_p))
        tail = max(1, iters // 10)
        results[name] = {
            "cnf": cnf,
            "nll": nll,
            "gap": nll - true_nll,
            "nfe_per_step": float(np.mean(hist["nfe"])),
            "nfe_last_steps": float(np.mean(hist["nfe"][-tail:])),
            "step_s": hist["time_s"] / max(1, iters - 1),
            "train_s": hist["time_s"],
            "eval_nfe": eval_nfe,
            "history": hist,
        }

    print(f"8 Gaussians, {n_test} held-out points: true density's NLL {true_nll:.4f} nats; "
          f"untrained flow {initial_nll:.4f}")
    print(f"{'model':<12} {'NLL':>8} {'gap':>7} {'NFE/step':>9} {'(last 10%)':>11} "
          f"{'s/step':>7} {'train s':>8} {'NFE at rtol 1e-6':>17}")
    for name, r in results.items():
        print(f"{name:<12} {r['nll']:8.4f} {r['gap']:7.4f} {r['nfe_per_step']:9.1f} "
              f"{r['nfe_last_steps']:11.1f} {r['step_s']:7.3f} {r['train_s']:8.1f} {r['eval_nfe']:17.1f}")
    print("(NFE/step: the forward solve's field evaluations per training step, at the training "
          f"tolerance rtol={args.rtol:g}; last column: the trained flow's NFE per {CHUNK}-point "
          "batch at the evaluation tolerance)")
    plain, reg = results["plain"], results["regularised"]
    print(f"regularisers (λ = {args.reg_weight:g}): "
          f"NFE per step x{plain['nfe_per_step'] / reg['nfe_per_step']:.2f} fewer, "
          f"training time x{plain['train_s'] / reg['train_s']:.2f} shorter, "
          f"NLL {reg['nll'] - plain['nll']:+.4f} nats")

    _plot(args.out, results, x_test, true_nll, k_sample)
    runtime = time.perf_counter() - t_start
    print(f"wrote {args.out}   ({runtime:.1f} s)")
    return {
        "true_nll": true_nll,
        "initial_nll": initial_nll,
        **{name: {k: v for k, v in r.items() if k not in ("cnf", "history")} for name, r in results.items()},
        "loss_history": {name: r["history"]["loss"] for name, r in results.items()},
        "iters": iters,
        "runtime_s": runtime,
        "out": args.out,
    }


def _plot(out, results, x_test, true_nll, key):
    cnf = results["plain"]["cnf"]
    lim, n = 4.5, 64  # n * n a multiple of CHUNK
    g = np.linspace(-lim, lim, n)
    grid = jnp.asarray(np.stack(np.meshgrid(g, g), -1).reshape(-1, 2), x_test.dtype)
    true_density = np.exp(np.asarray(true_log_prob(grid))).reshape(n, n)
    times = np.linspace(cnf.t0, cnf.t1, 4)
    path = np.asarray(_samples_and_path(cnf, key, 2000, jnp.asarray(times, x_test.dtype)))
    colour = np.arctan2(path[0, :, 1], path[0, :, 0])  # each sample's angle in data space

    fig, ax = plt.subplots(2, 4, figsize=(16, 8.4))
    extent = (-lim, lim, -lim, lim)
    xt = np.asarray(x_test)
    ax[0, 0].hist2d(xt[:, 0], xt[:, 1], bins=n, range=[[-lim, lim]] * 2, cmap="viridis")
    ax[0, 0].set_title(f"data ({len(xt)} held-out points)")
    ax[0, 1].imshow(true_density, origin="lower", extent=extent, cmap="viridis")
    ax[0, 1].set_title(f"true density (NLL {true_nll:.3f})")
    for a, name in zip(ax[0, 2:], ("plain", "regularised"), strict=True):
        r = results[name]
        density = np.exp(log_density(r["cnf"], grid)[0]).reshape(n, n)
        a.imshow(density, origin="lower", extent=extent, cmap="viridis")
        a.set_title(f"learned, {name}: NLL {r['nll']:.3f} (gap {r['gap']:.3f}),\n"
                    f"{r['nfe_per_step']:.0f} NFE/step")
    for j, a in enumerate(ax[1]):
        k = len(times) - 1 - j  # from noise (t1) to data (t0)
        a.scatter(path[k, :, 0], path[k, :, 1], s=1, alpha=0.5, c=colour, cmap="hsv")
        a.set_title(("samples, " if k == 0 else "") + f"flow at t = {times[k]:.2f}"
                    + (" (noise)" if k == len(times) - 1 else ""))
    for a in ax.ravel():
        a.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xticks=[], yticks=[])
    fig.tight_layout(h_pad=2.5)
    save(fig, out, dpi=90)


if __name__ == "__main__":
    main()
