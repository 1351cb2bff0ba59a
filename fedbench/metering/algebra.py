"""Multiply-adds of server-side linear algebra, by formula, in one place (methods declare them with
``party.count_macs``). One multiply-add = 2 flops, as everywhere in fedbench's meter.

Sources: Golub & Van Loan, Matrix Computations, 4th ed. (Fig. 8.6.1 for the SVD, Sec. 5.2 for
Householder QR).
"""

from __future__ import annotations


def svd_macs(m: int, n: int) -> int:
    """Thin SVD (U_p, S, V) of an m x n matrix, p = min(m, n), q = max(m, n): Golub-Reinsch
    14 q p^2 + 8 p^3 flops, R-SVD 6 q p^2 + 20 p^3 flops; we take the cheaper, and halve (MACs)."""
    p, q = min(m, n), max(m, n)
    return min(14 * q * p * p + 8 * p ** 3, 6 * q * p * p + 20 * p ** 3) // 2


def qr_macs(m: int, n: int) -> int:
    """Householder QR of an m x n matrix (m >= n) with the thin Q formed: 2 m n^2 - 2 n^3 / 3 flops for
    R plus as much again to form Q; halved (MACs)."""
    q, p = max(m, n), min(m, n)
    return (4 * q * p * p - (4 * p ** 3) // 3) // 2


def product_macs(m: int, k: int, n: int) -> int:
    """(m x k) @ (k x n)."""
    return m * k * n


def solve_macs(n: int, k: int) -> int:
    """Solve X M = Y (or M X = Y) for an n x n M and k right-hand sides by LU: n^3 / 3 MACs for the
    factorisation plus n^2 per right-hand side for the two triangular solves."""
    return n ** 3 // 3 + k * n * n
