"""``progress=True``: a tqdm bar of a solve's time, fed from inside the compiled loop.

The loop calls ``open`` in its first state, ``update`` on every step attempt and ``close`` when
it finishes; each sends host callbacks (``jax.debug.callback``). ``update`` sends one every
``max_steps // 256`` attempts at most, so a solve makes a few hundred callbacks whatever its
length, and tqdm redraws at most ten times a second. With ``progress=False`` none of this is
traced. Under ``jax.vmap`` the bar follows the batch's slowest problem. A reverse-mode
driver that recomputes steps does not move the bar again: it is closed by then.
"""

from __future__ import annotations

import jax
import numpy as np
from jax import lax

_CALLBACKS_PER_SOLVE = 256
_bar = None  # the bar of the solve now running (one at a time)


def open(t0, t1) -> None:  # noqa: A001 (the module is used qualified: progress_bar.open)
    """Opens a bar from ``t0`` to ``t1``."""
    jax.debug.callback(_open, t0, t1)


def update(t, attempts, max_steps: int) -> None:
    """Moves the bar to ``t`` every ``max_steps // 256`` attempts."""
    every = max(1, max_steps // _CALLBACKS_PER_SOLVE)
    if every == 1:
        jax.debug.callback(_update, t)
    else:
        lax.cond(attempts % every == 0, lambda: jax.debug.callback(_update, t), lambda: None)


def close(t) -> None:
    """Moves the bar to ``t`` and closes it."""
    jax.debug.callback(_close, t)


def _open(t0, t1) -> None:
    global _bar
    from tqdm.auto import tqdm

    if _bar is not None:
        _bar.close()
    t0, t1 = float(np.ravel(t0)[0]), float(np.ravel(t1)[0])
    _bar = tqdm(total=abs(t1 - t0), desc=_label(t0), mininterval=0.1,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
    _bar.t0, _bar.sign = t0, (1.0 if t1 >= t0 else -1.0)


def _label(t: float) -> str:
    return f"jaxode t={t:.4g}"


def _update(t) -> None:
    if _bar is None:
        return
    done = float(np.min(np.abs(np.asarray(t) - _bar.t0)))  # the slowest problem of a batch
    done = min(done, _bar.total)
    if done > _bar.n:
        _bar.set_description_str(_label(_bar.t0 + _bar.sign * done), refresh=False)
        _bar.update(done - _bar.n)


def _close(t) -> None:
    global _bar
    if _bar is None:
        return
    _update(t)
    _bar.close()
    _bar = None
