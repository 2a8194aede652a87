"""A ResNet with K residual blocks vs an ODE-Net with one continuous block (Chen et al. 2018).

Task: scikit-learn's bundled ``load_digits`` (8x8 images of handwritten digits, 10 classes,
1797 samples; no download), split 80/20 into train and test. Both models share the same
encoder (``Linear(64 -> h)``) and classifier head (``Linear(h -> 10)``); in between:

* ResNet: ``K`` residual blocks ``h <- h + g_k(h)``, each ``g_k = Linear(w -> h) ∘ tanh ∘
  Linear(h -> w)`` with its own weights;
* ODE-Net: ``h(1) = h(0) + ∫_0^1 f(h(t), t) dt`` with ``f`` of one block's architecture,
  ``f = Linear(w -> h) ∘ tanh ∘ Linear(h + 1 -> w)`` (a ``jaxode.nn.MLPField`` of depth 1,
  the time as an extra input), solved by a ``jaxode.nn.NeuralODE`` (tsit5, adaptive steps,
  adjoint gradients); the batch is solved as one state ``(B, h)``.

Both are trained with the same optax Adam schedule, mini-batches and cross-entropy loss.
The table printed gives test accuracy, parameter count, training time (after compilation)
and the number of field evaluations (NFE) per forward pass of the ODE-Net (from
``full_output``'s ``info.nfe``; the ResNet's "NFE" is its ``K`` blocks). The plot shows the
hidden-state trajectories of test samples through both networks, projected on the first
two principal components of the hidden states.

Run: ``python examples/resnet_vs_odenet.py [--out PATH] [--quick] [--blocks K] [--epochs N]``.
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
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from tqdm import tqdm  # noqa: E402

from jaxode.nn import MLPField, NeuralODE  # noqa: E402

from _common import parser, save  # noqa: E402

NUM_CLASSES = 10


class Block(eqx.Module):
    """One residual branch ``g(h) = W_2 tanh(W_1 h + b_1) + b_2`` on the last axis."""

    lin1: eqx.nn.Linear
    lin2: eqx.nn.Linear

    def __init__(self, hidden: int, width: int, key):
        k1, k2 = jax.random.split(key)
        self.lin1 = eqx.nn.Linear(hidden, width, key=k1)
        self.lin2 = eqx.nn.Linear(width, hidden, key=k2)

    def __call__(self, h):
        return jax.vmap(lambda x: self.lin2(jnp.tanh(self.lin1(x))))(h)


class ResNet(eqx.Module):
    """``head ∘ (id + g_K) ∘ ... ∘ (id + g_1) ∘ encoder`` on a batch ``(B, 64) -> (B, 10)``."""

    encoder: eqx.nn.Linear
    blocks: tuple[Block, ...]
    head: eqx.nn.Linear

    def __init__(self, in_size: int, hidden: int, width: int, num_blocks: int, key):
        keys = jax.random.split(key, num_blocks + 2)
        self.encoder = eqx.nn.Linear(in_size, hidden, key=keys[0])
        self.blocks = tuple(Block(hidden, width, k) for k in keys[1:-1])
        self.head = eqx.nn.Linear(hidden, NUM_CLASSES, key=keys[-1])

    def hidden_states(self, x):
        """``([h_0, ..., h_K], K)``: the states ``(K + 1, B, hidden)`` and the blocks applied."""
        h = jax.vmap(self.encoder)(x)
        states = [h]
        for block in self.blocks:
            h = h + block(h)
            states.append(h)
        return jnp.stack(states), len(self.blocks)

    def __call__(self, x):
        h = jax.vmap(self.encoder)(x)
        for block in self.blocks:
            h = h + block(h)
        return jax.vmap(self.head)(h), None


class ODENet(eqx.Module):
    """``head ∘ ODEBlock ∘ encoder``: the ODE block maps ``h(0)`` to ``h(1)``."""

    encoder: eqx.nn.Linear
    ode: NeuralODE
    head: eqx.nn.Linear

    def __init__(self, in_size: int, hidden: int, width: int, key, rtol: float, atol: float):
        k1, k2, k3 = jax.random.split(key, 3)
        self.encoder = eqx.nn.Linear(in_size, hidden, key=k1)
        field = MLPField(hidden, width=width, depth=1, key=k2)
        self.ode = NeuralODE(field, t0=0.0, t1=1.0, rtol=rtol, atol=atol, gradient="adjoint")
        self.head = eqx.nn.Linear(hidden, NUM_CLASSES, key=k3)

    def hidden_states(self, x, num: int = 21):
        """``(h(t), nfe)``: ``h`` at ``num`` times in ``[0, 1]``, shape ``(num, B, hidden)``,
        and the field evaluations of the solve (the same as for ``h(1)`` alone: the adaptive
        solver's steps do not depend on the output times, which are interpolated)."""
        h0 = jax.vmap(self.encoder)(x)
        states, info = self.ode(h0, jnp.linspace(0.0, 1.0, num, dtype=h0.dtype), full_output=True)
        return states, info.nfe

    def __call__(self, x):
        h0 = jax.vmap(self.encoder)(x)
        h1, info = self.ode(h0, full_output=True)  # the whole batch: one (B, hidden) state
        return jax.vmap(self.head)(h1), info.nfe


def num_params(model) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(eqx.filter(model, eqx.is_inexact_array)))


def cross_entropy(model, x, y):
    logits, nfe = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), nfe


def train(model, x, y, *, epochs: int, batch: int, lr: float, key, desc: str = "train"):
    """Adam with cosine decay on mini-batches; returns ``(model, losses, train_s, compile_s)``."""
    steps_per_epoch = max(1, len(x) // batch)
    schedule = optax.cosine_decay_schedule(lr, epochs * steps_per_epoch, alpha=0.05)
    optim = optax.adam(schedule)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, opt_state, xb, yb):
        (loss, _), grads = eqx.filter_value_and_grad(cross_entropy, has_aux=True)(model, xb, yb)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), opt_state, loss

    losses, compile_s, t0 = [], 0.0, time.perf_counter()
    # a progress bar on a terminal only (disable=None), so test logs stay clean
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, unit="step", mininterval=0.5, disable=None)
    for epoch in range(epochs):
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), len(x)))
        for i in range(steps_per_epoch):
            idx = perm[i * batch : (i + 1) * batch]
            model, opt_state, loss = step(model, opt_state, x[idx], y[idx])
            if epoch == 0 and i == 0:  # the first step compiles
                loss.block_until_ready()
                compile_s = time.perf_counter() - t0
                t0 = time.perf_counter()
            losses.append(float(loss) if i == steps_per_epoch - 1 else None)
            bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    jax.block_until_ready(model)
    train_s = time.perf_counter() - t0
    return model, [v for v in losses if v is not None], train_s, compile_s


def parse(argv):
    p = parser(__doc__, "resnet_vs_odenet")
    p.add_argument("--blocks", type=int, default=6, help="K, the ResNet's residual blocks")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--width", type=int, default=64)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Runs the example; returns the accuracies, parameter counts, times and NFE per model."""
    args = parse(argv)
    t_start = time.perf_counter()
    epochs = args.epochs if args.epochs is not None else (4 if args.quick else 30)
    dtype = jnp.result_type(float)
    digits = load_digits()
    x = (digits.data / 16.0).astype(dtype)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, digits.target, test_size=0.2, random_state=args.seed, stratify=digits.target
    )
    x_tr, x_te, y_tr, y_te = map(jnp.asarray, (x_tr, x_te, y_tr, y_te))
    keys = jax.random.split(jax.random.key(args.seed), 4)
    models = {
        f"ResNet (K={args.blocks})": ResNet(x.shape[1], args.hidden, args.width, args.blocks, keys[0]),
        "ODE-Net": ODENet(x.shape[1], args.hidden, args.width, keys[1], rtol=1e-3, atol=1e-3),
    }
    results, trained = {}, {}
    for name, model in models.items():
        model, losses, train_s, compile_s = train(
            model, x_tr, y_tr, epochs=epochs, batch=128, lr=3e-3, key=keys[2], desc=name
        )
        # one compiled evaluation: the hidden states (plotted) and the logits of the last one
        states, nfe = eqx.filter_jit(lambda m, x: m.hidden_states(x))(model, x_te)
        logits = jax.vmap(model.head)(states[-1])
        acc = float(jnp.mean(jnp.argmax(logits, -1) == y_te))
        results[name] = {
            "test_accuracy": acc,
            "params": num_params(model),
            "train_s": train_s,
            "compile_s": compile_s,
            "nfe": int(nfe),
            "final_train_loss": losses[-1],
        }
        trained[name] = (model, losses, np.asarray(states))

    print(f"load_digits: {len(x_tr)} train / {len(x_te)} test, {NUM_CLASSES} classes "
          f"(chance {1 / NUM_CLASSES:.0%}), {epochs} epochs")
    header = (f"{'model':14s} {'test acc':>8s} {'params':>7s} {'train s':>8s} {'compile s':>9s} "
              f"{'NFE/fwd':>8s}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(f"{name:14s} {r['test_accuracy']:8.3f} {r['params']:7d} {r['train_s']:8.1f} "
              f"{r['compile_s']:9.1f} {r['nfe']:8d}")
    print("(NFE/fwd: the ResNet's blocks; the ODE-Net's field evaluations, one solve for the "
          "whole test set)")

    _plot(args.out, trained, x_te, np.asarray(y_te), args.blocks)
    runtime = time.perf_counter() - t_start
    print(f"wrote {args.out}   ({runtime:.1f} s)")
    resnet, odenet = results.values()
    return {
        "resnet": resnet,
        "odenet": odenet,
        "chance": 1 / NUM_CLASSES,
        "epochs": epochs,
        "runtime_s": runtime,
        "out": args.out,
    }


def _pca_2d(states):
    """Projects ``(S, B, h)`` hidden states on their first two principal components."""
    flat = states.reshape(-1, states.shape[-1])
    mean = flat.mean(0)
    _, _, vt = np.linalg.svd(flat - mean, full_matrices=False)
    return (states - mean) @ vt[:2].T


def _plot(out, trained, x_te, y_te, num_blocks):
    fig, ax = plt.subplots(1, 3, figsize=(16, 5))
    show = np.concatenate([np.flatnonzero(y_te == c)[:4] for c in range(NUM_CLASSES)])
    cmap = plt.get_cmap("tab10")
    for a, (name, (model, _, states)) in zip(ax[:2], trained.items(), strict=True):
        proj = _pca_2d(states)[:, show]  # principal components of all test samples' states
        marker = "o-" if isinstance(model, ResNet) else "-"
        for j, c in enumerate(y_te[show]):
            a.plot(proj[:, j, 0], proj[:, j, 1], marker, color=cmap(c), lw=1, ms=2.5, alpha=0.8)
            a.plot(proj[-1, j, 0], proj[-1, j, 1], "*", color=cmap(c), ms=9, mec="k", mew=0.4)
            a.plot(proj[0, j, 0], proj[0, j, 1], "s", color=cmap(c), ms=3.5)
        steps = f"{num_blocks} blocks (dots)" if isinstance(model, ResNet) else "continuous, t in [0, 1]"
        a.set(title=f"{name}: hidden states, {steps}", xlabel="PC 1", ylabel="PC 2")
    handles = [plt.Line2D([], [], color=cmap(c), label=str(c)) for c in range(NUM_CLASSES)]
    ax[1].legend(handles=handles, title="digit", fontsize=7, ncol=2, loc="best")
    for name, (_, losses, _) in trained.items():
        ax[2].semilogy(np.arange(1, len(losses) + 1), losses, label=name)
    ax[2].set(title="training loss (last mini-batch of each epoch)", xlabel="epoch",
              ylabel="cross-entropy")
    ax[2].legend()
    fig.tight_layout()
    save(fig, out, dpi=100)


if __name__ == "__main__":
    main()
