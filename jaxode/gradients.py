"""The gradient modes: how a solve is run so that it can be differentiated, in one table.

==============  ======================================================  ======================
mode            forward pass                                            reverse pass
==============  ======================================================  ======================
``adjoint``     ``drivers.automatic`` (nested or flat ``while_loop``)   ``adjoint.solve``'s
                inside ``adjoint.solve``'s ``custom_vjp``               backward solve of the
                                                                        augmented system
``backprop``    ``drivers.backprop`` (checkpointed scans)               JAX's, through the loop
``checkpoint``  ``drivers.checkpoint`` (``custom_vjp`` while loop)      recomputation from
                                                                        checkpoints
``reversible``  ``reversible.forward`` (the reversible method, step     ``reversible.backward``:
                times recorded) inside a ``custom_vjp``                 steps inverted, one
                                                                        ``vjp`` per step
==============  ======================================================  ======================

Each entry is a function ``(field, y0, ts, diff, nondiff, controls, adjoint_tols, cfg) ->
forward.Solution``. Adding a mode means one module (its driver or its custom rule) and one
line here.
"""

from __future__ import annotations

from collections.abc import Callable

from . import adjoint, reversible
from .forward import Config, Controls, FlatField, Solution, forward, forward_batched

Mode = Callable[..., Solution]


def _by_driver(driver: str) -> Mode:
    """The mode that differentiates the loop itself, run by ``driver``."""

    def solve(field: FlatField, y0, ts, diff, nondiff, controls: Controls, adjoint_tols, cfg: Config):
        run = forward_batched if cfg.batched else forward
        return run(field, y0, ts, diff, nondiff, controls, cfg, driver=driver)

    return solve


MODES: dict[str, Mode] = {
    "adjoint": adjoint.solve,
    "backprop": _by_driver("backprop"),
    "checkpoint": _by_driver("checkpoint"),
    "reversible": reversible.solve,
}
