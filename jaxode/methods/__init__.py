"""Time-stepping methods behind one interface (``base.Method``), and their names.

``get_method(solver)`` turns ``odesolve``'s ``solver`` argument (a name, a
``ButcherTableau`` or a ``Method``) into a ``Method``. ``METHODS`` names them all.
"""

from __future__ import annotations

from .auto import AutoSwitch
from .base import Method, StepResult
from .esdirk import ESDIRK
from .esdirk import TABLEAUS as _ESDIRK_TABLEAUS
from .explicit import ExplicitRK
from .rosenbrock import ROSENBROCK_TABLEAUS, Rosenbrock
from .tableaus import SOLVERS, ButcherTableau

__all__ = [
    "ESDIRK", "METHODS", "AutoSwitch", "ButcherTableau", "ExplicitRK", "Method", "Rosenbrock", "StepResult",
    "get_method",
]

METHODS: dict[str, Method] = {name: ExplicitRK(tableau) for name, tableau in SOLVERS.items()}
METHODS.update({name: Rosenbrock(tableau) for name, tableau in ROSENBROCK_TABLEAUS.items()})
METHODS.update({name: ESDIRK(tableau) for name, tableau in _ESDIRK_TABLEAUS.items()})
METHODS["auto"] = AutoSwitch(METHODS["tsit5"], METHODS["rodas5p"])


def get_method(solver: str | ButcherTableau | Method) -> Method:
    """The ``Method`` named by ``solver``; ``ValueError`` listing the names if there is none."""
    if isinstance(solver, Method):
        return solver
    if isinstance(solver, ButcherTableau):
        return ExplicitRK(solver)
    if isinstance(solver, str) and solver in METHODS:
        return METHODS[solver]
    raise ValueError(
        f"unknown solver {solver!r}: use one of {', '.join(map(repr, METHODS))} "
        "or a jaxode.ButcherTableau"
    )
