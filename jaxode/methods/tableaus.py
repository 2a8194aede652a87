"""Explicit Runge–Kutta methods as Butcher tableaus.

A method with ``s`` stages advances ``y' = f(t, y)`` from ``(t, y)`` by a step ``h``::

    k_i     = f(t + c_i h, y + h Σ_{j<i} a_ij k_j)        i = 0 .. s-1
    y_new   = y + h Σ_i b_i k_i                            (order p)
    err     = h Σ_i e_i k_i,   e = b - b̂                    (b̂: the embedded method)

and its dense output inside the step is ``y(t + θh) = y + h Σ_i k_i Σ_j D_ij φ_j(θ)``
for ``θ ∈ [0, 1]``, with ``φ_j = θ^(j+1)`` (or DOP853's nested basis), where some methods
append extra stages (``extra_c``, ``extra_a``) that are only evaluated when an output time
falls inside the step.

The named methods (all data, no code):

============  ======  ==============  =========================================
name          order   error estimate  dense output
============  ======  ==============  =========================================
``euler``     1       none            (fixed step: lands on each output time)
``midpoint``  2       none
``heun``      2       none            explicit trapezoid
``rk4``       4       none            Kutta's classic 3/8-free method
``bosh3``     3       2nd order       Bogacki–Shampine (1989), cubic Hermite
``dopri5``    5       4th order       Dormand–Prince (1980); Shampine's 4th-order
``tsit5``     5       4th order       Tsitouras (2011); his 4th-order interpolant
``dopri8``    8       5th and 3rd     Hairer's DOP853; 7th order, 3 extra stages
============  ======  ==============  =========================================

Coefficients: Hairer, Nørsett & Wanner, *Solving ODEs I* (DOPRI5, DOP853 and its dense
output); Bogacki & Shampine, Appl. Math. Lett. 2 (1989); Tsitouras, Comput. Math. Appl. 62
(2011). First-same-as-last (FSAL) methods evaluate their last stage at ``(t + h, y_new)``,
so an accepted step costs one evaluation fewer.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["ButcherTableau", "SOLVERS", "get_solver"]


@dataclasses.dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge–Kutta method (hashable, so it can be a static argument).

    Attributes:
        name: a label used in messages.
        order: the order ``p`` of the solution ``y_new``.
        c: the ``s`` nodes; ``c[0]`` must be 0.
        a: the strictly lower-triangular matrix as rows, row ``i`` holding ``a_i0 .. a_i(i-1)``
            (``s - 1`` rows: the first stage has none).
        b: the ``s`` weights of the solution.
        b_error: ``b - b̂``, the weights of the local error estimate, or ``None`` for a
            fixed-step method.
        error_order: the order ``q`` of the embedded method: the error estimate behaves like
            ``h^(q+1)`` and sets the step-size controller's exponents.
        b_error3: a second error estimate, combined with the first as in DOP853
            (``|e5|² / sqrt(|e5|² + 0.01 |e3|²)``), or ``None``.
        dense: the dense-output matrix ``D`` of shape ``(s + len(extra_c), degree)``, or ``None``
            for a cubic Hermite interpolant built from ``y, y_new, f(y), f(y_new)``.
        extra_c, extra_a: nodes and rows of extra stages used only by the dense output.
        dense_nested: ``False``: column ``j`` of ``dense`` multiplies ``θ^(j+1)``; ``True``:
            Hairer's nested form ``θ(C_0 + (1-θ)(C_1 + θ(C_2 + (1-θ)(C_3 + ...))))``, whose
            coefficients stay small (DOP853's would reach ~550 in powers of θ, costing digits
            in float32).
    """

    name: str
    order: int
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_error: tuple[float, ...] | None = None
    error_order: int | None = None
    b_error3: tuple[float, ...] | None = None
    dense: tuple[tuple[float, ...], ...] | None = None
    extra_c: tuple[float, ...] = ()
    extra_a: tuple[tuple[float, ...], ...] = ()
    dense_nested: bool = False

    def __post_init__(self):
        s = len(self.c)
        if s < 1 or self.c[0] != 0:
            raise ValueError(f"tableau {self.name!r}: c must start with 0 (explicit method)")
        if len(self.a) != s - 1 or any(len(row) != i + 1 for i, row in enumerate(self.a)):
            raise ValueError(
                f"tableau {self.name!r}: a must have {s - 1} rows, row i holding i + 1 entries"
            )
        if len(self.b) != s:
            raise ValueError(f"tableau {self.name!r}: b must have {s} entries, one per stage")
        for i, row in enumerate(self.a):
            if abs(sum(row) - self.c[i + 1]) > 1e-10:
                raise ValueError(f"tableau {self.name!r}: row {i + 1} of a does not sum to c")
        if abs(sum(self.b) - 1) > 1e-10:
            raise ValueError(f"tableau {self.name!r}: b does not sum to 1 (not consistent)")
        if (self.b_error is None) != (self.error_order is None):
            raise ValueError(f"tableau {self.name!r}: give both b_error and error_order, or neither")
        for field in ("b_error", "b_error3"):
            v = getattr(self, field)
            if v is not None and len(v) != s:
                raise ValueError(f"tableau {self.name!r}: {field} must have {s} entries")
        if len(self.extra_a) != len(self.extra_c) or any(
            len(row) != s + i for i, row in enumerate(self.extra_a)
        ):
            raise ValueError(f"tableau {self.name!r}: extra_a must have one row per extra stage")
        if self.dense is not None and len(self.dense) != s + len(self.extra_c):
            raise ValueError(f"tableau {self.name!r}: dense needs one row per stage")

    @property
    def num_stages(self) -> int:
        return len(self.c)

    @property
    def adaptive(self) -> bool:
        """Whether the method has an error estimate (and so adaptive step sizes)."""
        return self.b_error is not None

    @property
    def fsal(self) -> bool:
        """First same as last: the last stage is ``f(t + h, y_new)``."""
        return (
            self.num_stages > 1
            and self.c[-1] == 1
            and self.b[-1] == 0
            and np.allclose(self.a[-1], self.b[:-1], rtol=0, atol=1e-15)
        )


def _hermite_free(name, order, c, a, b):
    return ButcherTableau(name=name, order=order, c=c, a=a, b=b)


EULER = _hermite_free("euler", 1, (0.0,), (), (1.0,))
MIDPOINT = _hermite_free("midpoint", 2, (0.0, 0.5), ((0.5,),), (0.0, 1.0))
HEUN = _hermite_free("heun", 2, (0.0, 1.0), ((1.0,),), (0.5, 0.5))
RK4 = _hermite_free(
    "rk4",
    4,
    (0.0, 0.5, 0.5, 1.0),
    ((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
    (1 / 6, 1 / 3, 1 / 3, 1 / 6),
)

BOSH3 = ButcherTableau(
    name="bosh3",
    order=3,
    c=(0.0, 1 / 2, 3 / 4, 1.0),
    a=((1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
    b=(2 / 9, 1 / 3, 4 / 9, 0.0),
    b_error=(2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
    error_order=2,
)

_DOPRI5_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DOPRI5_BHAT = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
DOPRI5 = ButcherTableau(
    name="dopri5",
    order=5,
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    a=(
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        _DOPRI5_B[:-1],
    ),
    b=_DOPRI5_B,
    b_error=tuple(x - y for x, y in zip(_DOPRI5_B, _DOPRI5_BHAT)),
    error_order=4,
    dense=(
        (1.0, -2.8535800653862835, 3.0717434641059005, -1.1270175653862835),
        (0.0, 0.0, 0.0, 0.0),
        (0.0, 4.023133379230305, -6.249321565289, 2.675424484351598),
        (0.0, -3.7324019615885042, 10.068970589843675, -5.685526961588504),
        (0.0, 2.5548038301849423, -6.399112377351017, 3.5219323679207912),
        (0.0, -1.3744241142186024, 3.272657752246729, -1.7672812570757455),
        (0.0, 1.3824689317781436, -3.764937863556287, 2.382468931778144),
    ),
)

_TSIT5_B = (
    0.09646076681806523,
    0.01,
    0.4798896504144996,
    1.379008574103742,
    -3.290069515436081,
    2.324710524099774,
    0.0,
)
_TSIT5_BHAT = (
    0.09468075576583945,
    0.009183565540343254,
    0.4877705284247616,
    1.234297566930479,
    -2.7077123499835256,
    1.866628418170587,
    1 / 66,
)
TSIT5 = ButcherTableau(
    name="tsit5",
    order=5,
    c=(0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0),
    a=(
        (0.161,),
        (-0.008480655492356989, 0.335480655492357),
        (2.8971530571054935, -6.359448489975075, 4.3622954328695815),
        (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
        (
            5.86145544294642,
            -12.92096931784711,
            8.159367898576159,
            -0.071584973281401,
            -0.028269050394068383,
        ),
        _TSIT5_B[:-1],
    ),
    b=_TSIT5_B,
    b_error=tuple(x - y for x, y in zip(_TSIT5_B, _TSIT5_BHAT)),
    error_order=4,
    dense=(
        (1.0, -2.763706197274826, 2.9132554618219126, -1.0530884977290216),
        (0.0, 0.1317, -0.2234, 0.1017),
        (0.0, 3.930296236894751, -5.941033872131505, 2.490627285651253),
        (0.0, -12.411077166933676, 30.338188630282318, -16.548102889244902),
        (0.0, 37.50931341651104, -88.1789048947664, 47.37952196281928),
        (0.0, -27.896526289197286, 65.09189467479368, -34.87065786149661),
        (0.0, 1.5, -4.0, 2.5),
    ),
)

# DOP853 (Hairer's dop853.f coefficients; the dense-output matrix holds his 7th-order
# continuous extension in its nested form, see ButcherTableau.dense_nested).
_DOP853_C = (0.0, 0.05260015195876773, 0.0789002279381516, 0.1183503419072274, 0.2816496580927726, 0.3333333333333333, 0.25, 0.3076923076923077, 0.6512820512820513, 0.6, 0.8571428571428571, 1.0, 1.0)
_DOP853_A = (
    (0.05260015195876773,),
    (0.0197250569845379, 0.0591751709536137),
    (0.02958758547680685, 0.0, 0.08876275643042054),
    (0.2413651341592667, 0.0, -0.8845494793282861, 0.924834003261792),
    (0.037037037037037035, 0.0, 0.0, 0.17082860872947386, 0.12546768756682242),
    (0.037109375, 0.0, 0.0, 0.17025221101954405, 0.06021653898045596, -0.017578125),
    (0.03709200011850479, 0.0, 0.0, 0.17038392571223998, 0.10726203044637328, -0.015319437748624402, 0.008273789163814023),
    (0.6241109587160757, 0.0, 0.0, -3.3608926294469414, -0.868219346841726, 27.59209969944671, 20.154067550477894, -43.48988418106996),
    (0.47766253643826434, 0.0, 0.0, -2.4881146199716677, -0.590290826836843, 21.230051448181193, 15.279233632882423, -33.28821096898486, -0.020331201708508627),
    (-0.9371424300859873, 0.0, 0.0, 5.186372428844064, 1.0914373489967295, -8.149787010746927, -18.52006565999696, 22.739487099350505, 2.4936055526796523, -3.0467644718982196),
    (2.273310147516538, 0.0, 0.0, -10.53449546673725, -2.0008720582248625, -17.9589318631188, 27.94888452941996, -2.8589982771350235, -8.87285693353063, 12.360567175794303, 0.6433927460157636),
    (0.054293734116568765, 0.0, 0.0, 0.0, 0.0, 4.450312892752409, 1.8915178993145003, -5.801203960010585, 0.3111643669578199, -0.1521609496625161, 0.20136540080403034, 0.04471061572777259),  # the FSAL stage: f at the new point
)
_DOP853_B = (0.054293734116568765, 0.0, 0.0, 0.0, 0.0, 4.450312892752409, 1.8915178993145003, -5.801203960010585, 0.3111643669578199, -0.1521609496625161, 0.20136540080403034, 0.04471061572777259, 0.0)
_DOP853_E5 = (0.01312004499419488, 0.0, 0.0, 0.0, 0.0, -1.2251564463762044, -0.4957589496572502, 1.6643771824549864, -0.35032884874997366, 0.3341791187130175, 0.08192320648511571, -0.022355307863886294, 0.0)
_DOP853_E3 = (-0.18980075407240762, 0.0, 0.0, 0.0, 0.0, 4.450312892752409, 1.8915178993145003, -5.801203960010585, -0.4226823213237919, -0.1521609496625161, 0.20136540080403034, 0.02265179219836082, 0.0)
_DOP853_EXTRA_C = (0.1, 0.2, 0.7777777777777778)
_DOP853_EXTRA_A = (
    (0.056167502283047954, 0.0, 0.0, 0.0, 0.0, 0.0, 0.25350021021662483, -0.2462390374708025, -0.12419142326381637, 0.15329179827876568, 0.00820105229563469, 0.007567897660545699, -0.008298),
    (0.03183464816350214, 0.0, 0.0, 0.0, 0.0, 0.028300909672366776, 0.053541988307438566, -0.05492374857139099, 0.0, 0.0, -0.00010834732869724932, 0.0003825710908356584, -0.00034046500868740456, 0.1413124436746325),
    (-0.42889630158379194, 0.0, 0.0, 0.0, 0.0, -4.697621415361164, 7.683421196062599, 4.06898981839711, 0.3567271874552811, 0.0, 0.0, 0.0, -0.0013990241651590145, 2.9475147891527724, -9.15095847217987),
)
_DOP853_DENSE = (
    (0.054293734116568765, 0.9457062658834312, -0.8914125317668624, -8.428938276109013, 10.427508642579134, 19.985053242002433, -25.69393346270375),
    (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    (4.450312892752409, -4.450312892752409, 8.900625785504818, 0.5667149535193777, 242.28349177525817, -387.0373087493518, -154.18974869023643),
    (1.8915178993145003, -1.8915178993145003, 3.7830357986290006, -3.0689499459498917, 165.20045171727028, -189.17813819516758, -231.5293791760455),
    (-5.801203960010585, 5.801203960010585, -11.60240792002117, 2.38466765651207, -374.5467547226902, 527.8081592054236, 357.6391179106141),
    (0.3111643669578199, -0.3111643669578199, 0.6223287339156398, 2.117034582445028, -22.113666853125306, -11.57390253995963, 93.40532418362432),
    (-0.1521609496625161, 0.1521609496625161, -0.3043218993250322, -0.871391583777973, 7.733432668472264, 6.8812326946963, -37.45832313645163),
    (0.20136540080403034, -0.20136540080403034, 0.4027308016080607, 2.2404374302607883, -30.674084731089398, -1.0006050966910838, 104.0996495089623),
    (0.04471061572777259, -0.04471061572777259, 0.08942123145554517, 0.6315787787694688, -9.332130526430229, 0.7777137798053443, 29.8402934266605),
    (0.0, 0.0, -1.0, -0.08899033645133331, 15.697238121770845, -2.778205752353508, -43.53345659001114),
    (0.0, 0.0, 0.0, 18.148505520854727, -31.139403219565178, -60.19669523126412, 96.32455395918828),
    (0.0, 0.0, 0.0, -9.194632392478356, -9.35292435884448, 84.32040550667716, -39.17726167561544),
    (0.0, 0.0, 0.0, -4.436036387594894, 35.81684148639408, 11.99229113618279, -149.72683625798564),
)

DOPRI8 = ButcherTableau(
    name="dopri8",
    order=8,
    c=_DOP853_C,
    a=_DOP853_A,
    b=_DOP853_B,
    b_error=_DOP853_E5,
    error_order=7,
    b_error3=_DOP853_E3,
    dense=_DOP853_DENSE,
    extra_c=_DOP853_EXTRA_C,
    extra_a=_DOP853_EXTRA_A,
    dense_nested=True,
)

SOLVERS: dict[str, ButcherTableau] = {
    t.name: t for t in (EULER, MIDPOINT, HEUN, RK4, BOSH3, DOPRI5, TSIT5, DOPRI8)
}


def get_solver(solver: str | ButcherTableau) -> ButcherTableau:
    """The tableau for a solver name, or ``solver`` itself if it is already a tableau."""
    if isinstance(solver, ButcherTableau):
        return solver
    if isinstance(solver, str) and solver in SOLVERS:
        return SOLVERS[solver]
    raise ValueError(
        f"unknown solver {solver!r}: use one of {', '.join(map(repr, SOLVERS))} "
        "or a jaxode.ButcherTableau"
    )
