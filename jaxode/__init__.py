"""jaxode: neural ordinary differential equations in JAX.

``odesolve`` solves ``dz/dt = f(z, t, params)`` with explicit Runge–Kutta methods under
``jit``/``vmap``/``grad``; gradients by the continuous adjoint method or by backpropagation
through the solver.
"""

from . import nn
from .cnf import CNF
from .dense import DenseSolution
from .errors import SolveError
from .events import Event
from .loop import Info
from .methods import METHODS, ButcherTableau, Method
from .methods.tableaus import SOLVERS
from .nn import ConcatSquashField, MLPField, NeuralODE, ODEBlock
from .odesolve import adjoint_backward_info, odesolve
from .options import Options

__all__ = [
    "odesolve",
    "adjoint_backward_info",
    "Options",
    "Info",
    "DenseSolution",
    "Method",
    "METHODS",
    "SolveError",
    "Event",
    "ButcherTableau",
    "SOLVERS",
    "nn",
    "MLPField",
    "ConcatSquashField",
    "NeuralODE",
    "ODEBlock",
    "CNF",
]
__version__ = "0.1.0"
