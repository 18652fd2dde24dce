"""Zernike3D basis functions on a ball (the deformation basis of Scipion flexutils / Xmipp's Zernike3D).

    Z_nlm(x) = R_nl(|x|/R) · Y_lm(x/|x|)      inside the ball |x| ≤ R, 0 outside

with ``R_nl`` the 3-D Zernike radial polynomials (n ≥ l, n − l even; r^l times a polynomial of r²) and ``Y_lm``
the real spherical harmonics. Degrees as flexutils: radial degree n ≤ ``l1`` and angular degree l ≤ ``l2``
(``basis_degrees``, in Xmipp's ``fillVectorTerms`` order: l, then n, then m = −l…l); flexutils' defaults
L1 = 3, L2 = 2 give 13 functions per Cartesian component. Here the basis is orthonormal on the unit ball
(∫ Z Z' dV = δ for x in units of R), tested by exact quadrature; flexutils' functions are the same up to a
constant factor per function, which the fitted coefficients absorb.

Every function is a polynomial of (x, y, z): ``R_nl(r) Y_lm = q_nl(r²) S_lm(x)`` with S_lm the regular solid
harmonics (r^l Y_lm, homogeneous of degree l), so the basis and its gradients are smooth everywhere in the ball.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch


def basis_degrees(l1: int = 3, l2: int = 2) -> list[tuple[int, int, int]]:
    """(n, l, m) of every basis function: l = 0…l2, n = l, l+2, … ≤ l1, m = −l…l (Xmipp's order)."""
    if l1 < 0 or l2 < 0:
        raise ValueError(f"Zernike3D degrees must be ≥ 0, got L1 = {l1}, L2 = {l2}")
    return [(n, ll, m) for ll in range(l2 + 1) for n in range(ll, l1 + 1, 2) for m in range(-ll, ll + 1)]


@functools.lru_cache(maxsize=64)
def radial_coefficients(n: int, l: int) -> tuple[float, ...]:  # noqa: E741 (the harmonic degree's usual name)
    """Coefficients c_j of q_nl(s) = Σ_j c_j s^j, so that R_nl(r) = r^l q_nl(r²) is orthonormal with weight r²
    on [0, 1] (∫ R_nl R_n'l r² dr = δ_nn'), leading coefficient positive: Gram–Schmidt of r^l, r^(l+2), … (the
    exact inner products ∫ r^(2l+2i+2j+2) dr = 1/(2l+2i+2j+3)), i.e. √(2n+3) r^l P_k^(0, l+1/2)(2r²−1),
    k = (n−l)/2."""
    if n < l or (n - l) % 2:
        raise ValueError(f"no radial polynomial of degree n = {n} for l = {l} (n ≥ l, n − l even)")
    k = (n - l) // 2
    i = np.arange(k + 1)
    gram = 1.0 / (2 * l + 2 * i[:, None] + 2 * i[None, :] + 3)
    chol = np.linalg.cholesky(gram)           # rows of inv(chol) are the orthonormal combinations
    return tuple(np.linalg.inv(chol)[k, :k + 1].tolist())


def solid_harmonics(xyz: torch.Tensor, l_max: int) -> dict[tuple[int, int], torch.Tensor]:
    """Real regular solid harmonics S_lm(x) = r^l Y_lm(x/r) (orthonormal Y_lm on the unit sphere), l ≤ ``l_max``,
    of points ``xyz`` (..., 3) -> {(l, m): (...)}. Recurrences of Helgaker, Jørgensen & Olsen (Molecular
    Electronic-Structure Theory, eqs 6.4.70-6.4.73) for Racah's normalisation, scaled by √((2l+1)/4π)."""
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    r2 = (xyz * xyz).sum(-1)
    s: dict[tuple[int, int], torch.Tensor] = {(0, 0): torch.ones_like(x)}
    for ll in range(l_max):
        a = math.sqrt((2 ** (ll == 0)) * (2 * ll + 1) / (2 * ll + 2))
        top, bottom = s[(ll, ll)], s[(ll, -ll)]
        s[(ll + 1, ll + 1)] = a * (x * top - (ll > 0) * y * bottom)
        s[(ll + 1, -ll - 1)] = a * (y * top + (ll > 0) * x * bottom)
        for m in range(-ll, ll + 1):
            prev = s.get((ll - 1, m), torch.zeros_like(x))  # |m| = l: multiplied by 0
            s[(ll + 1, m)] = (((2 * ll + 1) * z * s[(ll, m)] - math.sqrt((ll + m) * (ll - m)) * r2 * prev)
                              / math.sqrt((ll + m + 1) * (ll - m + 1)))
    return {(ll, m): math.sqrt((2 * ll + 1) / (4 * math.pi)) * v for (ll, m), v in s.items()}


def zernike3d_basis(xyz: torch.Tensor, degrees: list[tuple[int, int, int]]) -> torch.Tensor:
    """The functions ``degrees`` ((n, l, m), ``basis_degrees``) at points ``xyz`` (..., 3) in units of the ball's
    radius -> (..., K), 0 outside the unit ball; differentiable in ``xyz``."""
    l_max = max(d[1] for d in degrees)
    sh = solid_harmonics(xyz, l_max)
    s = (xyz * xyz).sum(-1)
    inside = (s <= 1.0).to(xyz.dtype)
    out = []
    for n, ll, m in degrees:
        c = radial_coefficients(n, ll)
        q = torch.full_like(s, c[-1])
        for cj in reversed(c[:-1]):  # Horner in s = r²
            q = q * s + cj
        out.append(q * sh[(ll, m)] * inside)
    return torch.stack(out, -1)
