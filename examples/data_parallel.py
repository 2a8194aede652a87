"""Data-parallel neural-ODE training: the spiral model with its batch sharded over all devices.

The data: the trajectory of ``dz/dt = (z**3) @ A``, ``A = [[-0.1, 2.0], [-2.0, -0.1]]``,
``z(0) = [2, 0]``, observed at ``--num-times`` times in ``[0, 25]``. The model:
``dz/dt = f_θ(z)``, an autonomous ``jaxode.nn.MLPField`` in a ``jaxode.nn.NeuralODE``.
Each iteration draws a batch of random windows of ``W`` consecutive observations and
solves the model from the first point of each window over the window's times, relative to
its start (the field is autonomous, so every window shares the times ``τ = t[:W] - t[0]``);
the loss is the mean squared error, minimised with optax Adam.

Data parallelism with ``jax.sharding``: a 1-D ``Mesh`` named ``"batch"`` over all devices;
the batch of windows is placed with ``NamedSharding(mesh, P("batch"))`` (each device holds
``batch / num_devices`` windows), the weights and the optimiser state are replicated
(``P()``). Strategies (``--strategy``):

* ``vmap`` (default): ``jax.jit`` of ``jax.vmap(node)``: every window is solved with its own
  adaptive steps, and the compiler partitions the batch over the devices (GSPMD). The
  vmapped loop runs until the slowest window of the whole batch is done.
* ``batched``: ``jax.jit`` of ``odesolve(..., batched=True)``: per-window steps as under
  ``vmap``, and the adjoint sums the shared weights' adjoint over the batch in one backward
  solve instead of carrying one per window.
* ``shard_map``: ``jax.shard_map``: each device solves its own windows as **one** ODE of
  shape ``(batch / num_devices, 2)`` with its own step sizes and its own loop, computes
  its gradient locally, and the gradients are summed with ``lax.psum``.

A batch that does not divide evenly over the devices is padded with copies of its first
window, which are masked out of the loss (weight 0): the loss and the gradient are exactly
those of the real windows.

On a CPU-only machine the script asks XLA for 4 host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=4``) before it imports JAX, unless
``XLA_FLAGS`` already sets a count, and says so. Several hosts: pass ``--coordinator``,
``--num-processes`` and ``--process-id`` (or nothing, where ``jax.distributed.initialize()``
detects the cluster) and run the same command on every host; each host samples its own
share of the batch and ``jax.make_array_from_process_local_data`` assembles the global one.

Run: ``python examples/data_parallel.py [--out PATH] [--quick] [--strategy S] [--batch B]``.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys

FORCED_DEVICES = 4


def _accelerator_installed() -> bool:
    """Whether JAX may find a GPU/TPU: ``JAX_PLATFORMS`` names one, or a plugin is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return any(p and p != "cpu" for p in platforms.split(","))
    plugins = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin")
    if any(importlib.util.find_spec(m) is not None for m in plugins):
        return True
    try:
        return len(importlib.metadata.entry_points(group="jax_plugins")) > 0
    except Exception:  # noqa: BLE001 - metadata problems: assume plain CPU
        return False


def _force_host_devices(count: int = FORCED_DEVICES) -> bool:
    """Sets ``--xla_force_host_platform_device_count`` when JAX will run on the CPU, before
    JAX is imported, unless ``XLA_FLAGS`` already sets it. Returns whether it did."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "jax" in sys.modules or "xla_force_host_platform_device_count" in flags or _accelerator_installed():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    return True


FORCED = _force_host_devices()
if FORCED:
    print(f"data_parallel: CPU only, set XLA_FLAGS={os.environ['XLA_FLAGS']} before importing jax")

import time  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxode  # noqa: E402
from jaxode.nn import MLPField, NeuralODE  # noqa: E402

from _common import parser, save  # noqa: E402

A = np.array([[-0.1, 2.0], [-2.0, -0.1]])
Z0 = np.array([2.0, 0.0])
T_END = 25.0
AXIS = "batch"
STRATEGIES = ("vmap", "batched", "shard_map")


# --------------------------------------------------------------------------- sharding helpers


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh named ``"batch"`` over ``devices`` (default: all devices of all hosts).

    The axis type is ``Auto`` (the compiler propagates the shardings), which is what a
    ``jax.jit`` over a sharded batch wants; ``jax.make_mesh`` alone defaults to ``Explicit``.
    """
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), (AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def pad_batch(arrays, multiple: int):
    """Pads the leading (batch) axis of every array in ``arrays`` to a multiple of ``multiple``.

    The padding repeats the first sample (a real one, so it solves like the others and no
    NaN or stiff dummy input can reach the solver). Returns ``(padded_arrays, mask)`` with
    ``mask`` of shape ``(padded_batch,)``: 1 for the real samples, 0 for the copies.
    """
    arrays = tuple(np.asarray(a) for a in arrays)
    batch = arrays[0].shape[0]
    if batch == 0 or any(a.shape[0] != batch for a in arrays):
        raise ValueError(f"pad_batch: arrays need one common, nonzero batch size, got "
                         f"{[a.shape[0] for a in arrays]}")
    extra = -batch % multiple
    mask = np.concatenate([np.ones(batch), np.zeros(extra)])
    padded = tuple(np.concatenate([a, np.repeat(a[:1], extra, axis=0)]) for a in arrays)
    return padded, mask


def shard_batch(x, mesh: Mesh) -> jax.Array:
    """This host's part of the batch (leading axis) as a global array sharded over ``"batch"``.

    With one process this is ``jax.device_put(x, NamedSharding(mesh, P("batch")))``; with
    several, each process passes its own rows and the global batch is their concatenation
    in process order.
    """
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P(AXIS)), np.asarray(x))


def replicate(tree, mesh: Mesh):
    """Places every array of ``tree`` on every device of ``mesh`` (``P()``)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def to_host(x) -> np.ndarray:
    """A replicated array's value (works when the array spans several processes)."""
    return np.asarray(x.addressable_data(0))


# --------------------------------------------------------------------------- model and loss


def make_data(num_times: int):
    """The true trajectory at ``num_times`` times in ``[0, 25]``: numpy ``(ts, ys)``."""
    dtype = jnp.result_type(float)
    tol = 1e-10 if dtype == jnp.float64 else 1e-6
    ts = jnp.linspace(0.0, T_END, num_times, dtype=dtype)
    ys = jaxode.odesolve(lambda z, t, a: (z**3) @ a, jnp.asarray(Z0, dtype), ts, jnp.asarray(A, dtype),
                         rtol=tol, atol=tol, max_steps=100_000)
    return np.asarray(ts), np.asarray(ys)


def make_model(width: int, key, tau, gradient: str = "adjoint") -> NeuralODE:
    """``NeuralODE(MLPField)`` over the window times ``tau``; ``throw=False``: a failed solve
    gives NaN and a nonzero status, which the training loop checks on the host (no host
    callback inside the compiled step)."""
    field = MLPField(2, width=width, depth=2, autonomous=True, key=key)
    # A window is short: 256 steps is plenty, and it bounds gradient="backprop" under vmap,
    # which pays for max_steps steps (see jaxode.while_loops).
    return NeuralODE(field, ts=tuple(np.asarray(tau).tolist()), rtol=1e-3, atol=1e-4, max_steps=256,
                     gradient=gradient, throw=False, full_output=True)


def predict(model: NeuralODE, y0s, strategy: str):
    """The model's windows from ``y0s`` ``(b, 2)``: ``(pred (b, W, 2), status)``.

    ``vmap`` and ``batched``: each window with its own steps; ``shard_map`` (called on one
    device's windows): the windows as one ODE with shared steps.
    """
    if strategy == "vmap":
        pred, info = jax.vmap(model)(y0s)
    elif strategy == "batched":
        tau = jnp.asarray(model.ts, y0s.dtype)
        pred, info = jaxode.odesolve(model.field, y0s, tau, batched=True, rtol=model.rtol,
                                     atol=model.atol, max_steps=model.max_steps,
                                     gradient=model.gradient, throw=False, full_output=True)
    elif strategy == "shard_map":
        pred, info = model(y0s)  # (W, b, 2): one solve of the (b, 2) state
        pred = jnp.swapaxes(pred, 0, 1)
    else:
        raise ValueError(f"unknown strategy {strategy!r}: use one of {STRATEGIES}")
    return pred, jnp.max(info.status)


def masked_sums(model, y_win, mask, strategy):
    """``(Σ_b mask_b · mse_b, Σ_b mask_b, status)`` over the given windows ``(b, W, 2)``."""
    pred, status = predict(model, y_win[:, 0], strategy)
    per_window = jnp.mean((pred - y_win) ** 2, axis=(1, 2))
    mask = mask.astype(per_window.dtype)
    return jnp.sum(mask * per_window), jnp.sum(mask), status


def make_train_step(optim, static, strategy: str, mesh: Mesh | None):
    """A compiled ``step(params, opt_state, y_win, mask) -> (params, opt_state, loss, status)``.

    ``params``: the model's arrays (``eqx.partition(model, eqx.is_inexact_array)``), with
    ``static`` the rest. ``loss``: the masked mean over the batch's real windows. With
    ``mesh=None`` the same computation runs unsharded (on the arrays' device).
    """

    def loss_terms(params, y_win, mask):
        total, count, status = masked_sums(eqx.combine(params, static), y_win, mask, strategy)
        return total, (count, status)

    def update(params, opt_state, grads):
        updates, opt_state = optim.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    if strategy != "shard_map" or mesh is None:

        def step(params, opt_state, y_win, mask):
            def loss_fn(params):
                total, (count, status) = loss_terms(params, y_win, mask)
                return total / count, status

            (loss, status), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            params, opt_state = update(params, opt_state, grads)
            return params, opt_state, loss, status

        if mesh is None:
            return jax.jit(step)
        replicated = NamedSharding(mesh, P())
        return jax.jit(step, out_shardings=(replicated, replicated, replicated, replicated))

    def local_step(params, opt_state, y_win, mask):
        # One device's windows: its own solve, its own steps; then sum over the devices.
        (total, (count, status)), grads = jax.value_and_grad(loss_terms, has_aux=True)(params, y_win, mask)
        total, count, grads = jax.lax.psum((total, count, grads), AXIS)
        status = jax.lax.pmax(status, AXIS)
        grads = jax.tree_util.tree_map(lambda g: g / count, grads)
        params, opt_state = update(params, opt_state, grads)
        return params, opt_state, total / count, status

    # check_vma=False: jaxode's solver loops start from unvarying counters (see docs/batching.md).
    sharded = jax.shard_map(local_step, mesh=mesh, in_specs=(P(), P(), P(AXIS), P(AXIS)),
                            out_specs=(P(), P(), P(), P()), check_vma=False)
    return jax.jit(sharded)


def make_eval(static, strategy: str, mesh: Mesh | None):
    """A compiled ``loss(params, y_win, mask)`` (the masked mean), sharded like the step."""

    def loss(params, y_win, mask):
        total, count, status = masked_sums(eqx.combine(params, static), y_win, mask, strategy)
        return total / count, status

    if strategy != "shard_map" or mesh is None:
        return jax.jit(loss)

    def local(params, y_win, mask):
        total, count, status = masked_sums(eqx.combine(params, static), y_win, mask, strategy)
        total, count = jax.lax.psum((total, count), AXIS)
        return total / count, jax.lax.pmax(status, AXIS)

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)),
                                 out_specs=(P(), P()), check_vma=False))


def check_status(status, what: str) -> None:
    code = int(to_host(status))
    if code != 0:
        raise RuntimeError(f"{what}: an ODE solve failed: {jaxode.errors.STATUS_MESSAGES[code]}")


# --------------------------------------------------------------------------- the script


def parse(argv):
    p = parser(__doc__, "data_parallel", out_help="where to write the loss-curve PNG")
    p.add_argument("--strategy", choices=STRATEGIES, default="vmap")
    p.add_argument("--gradient", choices=("adjoint", "backprop"), default="adjoint")
    p.add_argument("--iters", type=int, default=None, help="training iterations")
    p.add_argument("--batch", type=int, default=None,
                   help="windows per iteration over all hosts (padded to a multiple of the devices)")
    p.add_argument("--window", type=int, default=None, help="observations per window")
    p.add_argument("--num-times", type=int, default=None, help="observations in [0, 25]")
    p.add_argument("--coordinator", default=None, help="multi-host: the coordinator's host:port")
    p.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() with auto-detected settings")
    return p.parse_args(argv)


def _initialize_distributed(args) -> None:
    if args.distributed or args.coordinator is not None:
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id)


def main(argv: list[str] | None = None) -> dict:
    """Runs the example; returns the losses (``losses``: per iteration; ``initial_loss`` and
    ``final_loss`` on fixed evaluation windows) and the run's layout."""
    args = parse(argv)
    _initialize_distributed(args)
    if args.quick:
        num_times, window, batch, iters, width, lr = 400, 10, 16, 40, 16, 1e-2
    else:
        num_times, window, batch, iters, width, lr = 1000, 12, 32, 1200, 32, 1e-2
    iters = args.iters if args.iters is not None else iters
    batch = args.batch if args.batch is not None else batch
    window = args.window if args.window is not None else window
    num_times = args.num_times if args.num_times is not None else num_times
    t_start = time.perf_counter()

    mesh = make_mesh()
    num_devices, procs, rank = mesh.devices.size, jax.process_count(), jax.process_index()
    local_devices = jax.local_device_count()
    if batch % procs:
        raise ValueError(f"--batch {batch} must divide over the {procs} processes")
    local_batch = batch // procs
    padded_local = local_batch + (-local_batch % local_devices)
    leader = rank == 0
    if leader:
        print(f"mesh: {dict(mesh.shape)} over {num_devices} {jax.devices()[0].platform} devices "
              f"({procs} process{'es' if procs > 1 else ''}); strategy {args.strategy}, "
              f"gradient {args.gradient}")
        pad_note = f" ({padded_local - local_batch} padding copies per host, masked out)" \
            if padded_local != local_batch else ""
        print(f"batch {batch} windows -> {padded_local * procs} placed{pad_note}; "
              f"{padded_local // local_devices} windows per device")

    ts, ys = make_data(num_times)
    tau = ts[:window] - ts[0]
    key_model, _ = jax.random.split(jax.random.key(args.seed))
    model = make_model(width, key_model, tau, args.gradient)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    params = replicate(params, mesh)
    optim = optax.adam(optax.cosine_decay_schedule(lr, iters, alpha=0.05))
    opt_state = replicate(optim.init(params), mesh)
    step = make_train_step(optim, static, args.strategy, mesh)
    evaluate = make_eval(static, args.strategy, mesh)

    offsets = np.arange(window)
    rng = np.random.default_rng([args.seed, rank])  # each host draws its own windows

    def host_batch(starts, show=False):
        (y_win,), mask = pad_batch((ys[starts[:, None] + offsets],), local_devices)
        y_win = shard_batch(y_win, mesh)
        if show and leader:
            shapes = {str(s.device): s.data.shape for s in y_win.addressable_shards}
            print(f"per-device training batch (windows, times, state): {shapes}")
        return y_win, shard_batch(mask, mesh)

    # Evaluation: evenly spaced windows over the whole trajectory, split over the hosts.
    eval_starts = np.linspace(0, num_times - window, 4 * batch).astype(int)
    eval_batch = host_batch(np.array_split(eval_starts, procs)[rank])

    def eval_loss(params):
        loss, status = evaluate(params, *eval_batch)
        check_status(status, "evaluation")
        return float(to_host(loss))

    initial_loss = eval_loss(params)
    losses = []
    for i in range(iters):
        starts = rng.integers(0, num_times - window + 1, size=local_batch)
        params, opt_state, loss, status = step(params, opt_state, *host_batch(starts, i == 0))
        check_status(status, f"iteration {i}")
        losses.append(float(to_host(loss)))
        if leader and (i % max(1, iters // 10) == 0 or i == iters - 1):
            print(f"  iter {i:4d}   loss {losses[-1]:.4e}")
    final_loss = eval_loss(params)
    runtime = time.perf_counter() - t_start
    if leader:
        print(f"initial loss {initial_loss:.4e}   final loss {final_loss:.4e}   "
              f"(x{initial_loss / final_loss:.1f} lower)   {runtime:.1f} s")
        model = eqx.combine(jax.device_get(params), static)
        learned = jaxode.odesolve(model.field, jnp.asarray(ys[0]), jnp.asarray(ts), rtol=1e-6,
                                  atol=1e-6, max_steps=100_000, throw=False)
        _plot(args.out, losses, ys, np.asarray(learned), args.strategy, num_devices)
        print(f"wrote {args.out}")
    return {
        "losses": losses,
        "initial_loss": initial_loss,
        "final_loss": final_loss,
        "num_devices": num_devices,
        "per_device_batch": padded_local // local_devices,
        "padded_batch": padded_local * procs,
        "strategy": args.strategy,
        "forced_host_devices": FORCED,
        "runtime_s": runtime,
        "out": args.out,
    }


def _plot(out, losses, ys, learned, strategy, num_devices):
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.5))
    a = ax[0]
    a.semilogy(np.arange(len(losses)), losses, lw=1)
    a.set(xlabel="iteration", ylabel="training loss (MSE)",
          title=f"spiral, batch sharded over {num_devices} devices ({strategy})")
    a.grid(alpha=0.3)
    a = ax[1]
    a.plot(ys[:, 0], ys[:, 1], "k", lw=2, alpha=0.4, label="true")
    a.plot(learned[:, 0], learned[:, 1], "C3--", lw=1, label="learned, from z(0)")
    a.set(xlabel="$z_1$", ylabel="$z_2$", title="phase portrait", aspect="equal")
    a.legend(fontsize=8)
    fig.tight_layout()
    save(fig, out, dpi=100)


if __name__ == "__main__":
    main()
