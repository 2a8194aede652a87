"""Dense LU factorisations and solves of the implicit methods' systems ``(I - γhJ) x = b``.

``factor`` is LAPACK's ``getrf`` through ``jax.scipy.linalg.lu_factor`` (partial pivoting,
``P A = L U``), with the row permutation it implies. ``solve`` permutes ``b`` and runs the two
triangular substitutions, ``L z = P b`` (``L`` unit lower) and ``U x = z``. For ``n <=
UNROLLED`` they are written out as array operations on the entries, which XLA fuses into a few
kernels: on the CPU a LAPACK triangular solve is a library call of its own (~0.5 µs for a 3 x 3
system, two per solve; a Rosenbrock step of ``rodas5p`` makes 8 solves). Beyond, ``n²`` unrolled
operations would outgrow the calls, and ``solve`` is ``jax.scipy.linalg.lu_solve``. Both are
the same substitutions in the same order. The unrolled ones are differentiated as a linear
solve (``lax.custom_linear_solve``), not operation by operation.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import Array, lax
from jax.scipy.linalg import lu_factor, lu_solve

UNROLLED = 8  # the largest n whose substitutions are unrolled


class LU(NamedTuple):
    """``P A = L U`` of a square matrix ``A`` ``(n, n)``."""

    lu: Array  # (n, n): L below the diagonal (its unit diagonal implied), U on and above it
    pivots: Array  # (n,) int32: LAPACK's row interchanges
    permutation: Array  # (n,) int32: row i of P A is row permutation[i] of A


def factor(matrix: Array) -> LU:
    """The LU factorisation of ``matrix`` ``(n, n)``, with partial pivoting."""
    lu, pivots = lu_factor(matrix)
    return LU(lu, pivots, lax.linalg.lu_pivots_to_permutation(pivots, matrix.shape[0]))


def solve(f: LU, b: Array) -> Array:
    """``x`` with ``A x = b``, ``b`` of shape ``(n,)``, from ``f = factor(A)``. Small systems:
    differentiated as a linear solve (``lax.custom_linear_solve``: a tangent or cotangent is one
    more substitution, with ``A`` or ``Aᵀ``), not through the unrolled operations."""
    n = b.shape[0]
    if n > UNROLLED:
        return lu_solve((f.lu, f.pivots), b)
    return lax.custom_linear_solve(
        lambda x: _matvec(f, x), b, lambda _, r: _substitute(f, r), lambda _, r: _substitute_transposed(f, r),
    )


def _unit_lower(f: LU) -> Array:
    return jnp.tril(f.lu, -1) + jnp.eye(f.lu.shape[0], dtype=f.lu.dtype)


def _matvec(f: LU, x: Array) -> Array:
    """``A x = Pᵀ L U x``."""
    y = _unit_lower(f) @ (jnp.triu(f.lu) @ x)
    return jnp.zeros_like(y).at[f.permutation].set(y, unique_indices=True)


def _substitute(f: LU, b: Array) -> Array:
    """``U⁻¹ L⁻¹ P b``, written out entry by entry."""
    m = f.lu
    z = _triangular(lambda i, j: m[i, j], b[f.permutation], lower=True, unit=True)  # L z = P b
    return _triangular(lambda i, j: m[i, j], z, lower=False, unit=False)  # U x = z


def _substitute_transposed(f: LU, b: Array) -> Array:
    """``A⁻ᵀ b = Pᵀ L⁻ᵀ U⁻ᵀ b``, written out entry by entry."""
    m = f.lu
    w = _triangular(lambda i, j: m[j, i], b, lower=True, unit=False)  # Uᵀ w = b
    v = _triangular(lambda i, j: m[j, i], w, lower=False, unit=True)  # Lᵀ v = w
    return jnp.zeros_like(v).at[f.permutation].set(v, unique_indices=True)


def _triangular(entry, b: Array, lower: bool, unit: bool) -> Array:
    """``x`` with ``T x = b`` for the triangular ``T`` whose ``(i, j)`` entry is ``entry(i, j)``
    (only its ``lower`` or upper part is read; ``unit``: a diagonal of ones, not read), by
    substitution, one entry of ``x`` after the other."""
    n = b.shape[0]
    x = [None] * n
    for i in range(n) if lower else reversed(range(n)):
        xi = b[i]
        for j in range(i) if lower else range(i + 1, n):
            xi = xi - entry(i, j) * x[j]
        x[i] = xi if unit else xi / entry(i, i)
    return jnp.stack(x)
