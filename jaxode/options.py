"""``Options``: the solve options of ``odesolve``, in one validated, immutable object.

``odesolve`` builds one from its keyword options; ``NeuralODE`` holds one (its static
configuration); ``adjoint_backward_info`` builds one from its ``**options``, so a misspelt key
is a ``TypeError`` naming it. The options are checked once, when the object is made::

    opts = jaxode.Options(solver="dopri5", rtol=1e-8, atol=1e-8)
    ys = jaxode.odesolve(f, z0, ts, **opts.as_dict())
    tight = opts.replace(rtol=1e-10)          # a new, re-validated object
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from . import errors, events, reversible
from .gradients import MODES
from .methods import ButcherTableau, Method, get_method
from .methods.reversible import check_coupling

__all__ = ["Options"]

_FLAGS = ("adjoint_seminorm", "batched", "throw", "full_output", "dense", "progress")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    """The options of a solve (see ``jaxode.odesolve`` for their meaning and defaults).

    Immutable; checked when made (``ValueError``/``TypeError`` naming the bad option, with
    the messages ``odesolve`` gives). Tolerances and ``dt0`` may be numbers or arrays, traced
    ones included (they are then checked when the program runs); the other options are
    Python values. Hashable (so usable as a static field or ``jit`` argument) when the
    tolerances and ``dt0`` are Python or NumPy scalars.

    Attributes:
        solver: a solver name, a ``ButcherTableau`` or a ``Method`` (default ``"tsit5"``).
        rtol, atol: the step-size controller's tolerances (default ``1e-6`` each).
        dt0: a fixed-step solver's step, or an adaptive one's first step (default ``None``).
        max_steps: the most steps, accepted and rejected (default 4096).
        gradient: ``"adjoint"`` (default), ``"backprop"``, ``"checkpoint"`` or ``"reversible"``.
        adjoint_rtol, adjoint_atol: the backward solve's tolerances (default: the forward ones).
        adjoint_seminorm: leave the parameter adjoints out of the backward error control.
        batched: ``z0`` carries a leading axis of independent problems.
        throw: raise on a failed solve (default ``True``).
        full_output: also return an ``Info`` (default ``False``).
        max_dt: the longest step (default ``None``: no bound).
        jump_ts: times at which the field is discontinuous (default ``None``).
        dense: also return a ``DenseSolution`` (default ``False``).
        progress: show a progress bar of the solve's time (default ``False``; needs tqdm).
        adjoint_interpolate: the adjoint reads ``z`` off the forward solution instead of
            integrating it backwards (default ``None``: for implicit methods only).
        reversible_coupling: ``λ`` of ``gradient="reversible"``, in ``(0, 1]`` (default 0.999).
        events: a ``jaxode.Event`` or a list of them (default ``None``), held as a tuple.
        max_events: the most events a solve may fire (default ``None``: ``max_steps``).
    """

    solver: str | ButcherTableau | Method = "tsit5"
    rtol: float | Array = 1e-6
    atol: float | Array = 1e-6
    dt0: float | Array | None = None
    max_steps: int = 4096
    gradient: str = "adjoint"
    adjoint_rtol: float | Array | None = None
    adjoint_atol: float | Array | None = None
    adjoint_seminorm: bool = False
    batched: bool = False
    throw: bool = True
    full_output: bool = False
    max_dt: float | Array | None = None
    jump_ts: Any = None
    dense: bool = False
    progress: bool = False
    adjoint_interpolate: bool | None = None
    reversible_coupling: float = 0.999
    events: Any = None
    max_events: int | None = None

    def __post_init__(self):
        if self.gradient not in MODES:
            raise ValueError(f"unknown gradient mode {self.gradient!r}: use one of {tuple(MODES)}")
        errors.check_options(
            self.method, self.rtol, self.atol, self.dt0, self.max_steps, self.adjoint_rtol,
            self.adjoint_atol, self.max_dt,
        )
        if self.jump_ts is not None:
            object.__setattr__(self, "jump_ts", errors.check_jump_ts(self.jump_ts))
        object.__setattr__(self, "events", events.check_events(self.events))
        object.__setattr__(self, "max_events", events.check_max_events(self.max_events, self.events))
        for name in _FLAGS:
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{name} must be True or False, got {value!r}")
            object.__setattr__(self, name, bool(value))
        if self.adjoint_interpolate not in (None, True, False):
            raise TypeError(
                f"adjoint_interpolate must be None, True or False, got {self.adjoint_interpolate!r}"
            )
        object.__setattr__(self, "max_steps", int(self.max_steps))
        object.__setattr__(self, "reversible_coupling", check_coupling(self.reversible_coupling))
        if self.gradient == "reversible":
            reversible.check_options(self.method, self.reversible_coupling, self.dense, self.jump_ts)
        if self.progress:
            try:
                import tqdm  # noqa: F401
            except ImportError:
                raise ImportError("progress=True needs tqdm: pip install tqdm") from None

    @property
    def interpolate(self) -> bool:
        """Whether the adjoint is the interpolating one (``adjoint_interpolate``, or by default
        whether the method is implicit)."""
        return self.method.implicit if self.adjoint_interpolate is None else bool(self.adjoint_interpolate)

    @property
    def method(self) -> Method:
        """The solver's ``Method``."""
        return get_method(self.solver)  # ValueError listing the names for an unknown one

    @classmethod
    def cached(cls, **values: Any) -> Options:
        """``Options(**values)``, made once per set of values (with their types) when they are
        all hashable (Python and NumPy scalars, strings, ``None``, functions, ``Event``s), as
        in an eager ``odesolve`` called again and again: checking them costs such a call more
        than a small solve does. Else made anew."""
        key = tuple((name, type(value), value) for name, value in values.items())
        try:
            hash(key)
        except TypeError:
            return cls(**values)
        return _cached_options(key)

    def replace(self, **changes: Any) -> Options:
        """A copy with ``changes`` applied, validated again; an unknown name is a ``TypeError``."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """The options as ``odesolve``'s keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def arrays(self) -> tuple[Array | None, ...]:
        """``(rtol, atol, dt0, adjoint_rtol, adjoint_atol, max_dt, jump_ts)`` as JAX arrays
        (``None`` kept): the values a compiled solve takes as inputs, so changing them does not
        recompile."""
        values = (self.rtol, self.atol, self.dt0, self.adjoint_rtol, self.adjoint_atol, self.max_dt,
                  self.jump_ts)
        return tuple(None if v is None else _as_array(v) for v in values)


def _as_array(value) -> Array:
    """``jnp.asarray(value)``; a Python number's array is kept (``_number_array``): making it
    dispatches a transfer, which costs an eager ``odesolve`` call more than its solve on a
    small system."""
    if type(value) in (int, float):
        return _number_array(value, type(value), jax.config.jax_enable_x64)
    return jnp.asarray(value)


@functools.lru_cache(maxsize=256)
def _cached_options(key) -> Options:
    return Options(**{name: value for name, _, value in key})


@functools.lru_cache(maxsize=64)
def _number_array(value, kind, x64) -> Array:
    """The (weakly typed) array of a Python number, kept per value, type and ``x64`` setting."""
    del kind, x64  # in the key only: 1 and 1.0 hash alike; the dtype follows jax_enable_x64
    with jax.ensure_compile_time_eval():  # a concrete array, also when first made under a trace
        return jnp.asarray(value)
