"""Diffusion maps of a pairwise distance matrix, and sign synchronisation of coordinates found separately.

Diffusion maps (Coifman & Lafon 2006): a Gaussian kernel exp(−D²/ε) on the squared distances, normalised by the
sampling density to the power α (α = 1: the Laplace–Beltrami operator, so the coordinates do not depend on how
densely each part of the manifold is sampled, which is what lets occupancies along them become a landscape), then
the eigenvectors of the Markov matrix. On a one-dimensional manifold of length L the first non-trivial coordinate
is cos(π s / L) of the arc length s: :func:`arc_length` inverts it.

:func:`synchronise_signs` finds the signs σ_a ∈ {±1} of coordinates computed separately (per projection direction,
per bootstrap) that best agree with measured pairwise agreements W_ab ≈ σ_a σ_b: the leading eigenvector of W
(Z₂ synchronisation, Singer 2011).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import eigh


@dataclass
class DiffusionMap:
    eigenvalues: np.ndarray   # (k,) of the Markov matrix, non-trivial ones, decreasing
    coords: np.ndarray        # (n, k) eigenvectors ψ_1.. (unit mean square over the points), not scaled by λ
    epsilon: float            # the kernel's bandwidth (squared-distance units)


def default_epsilon(d2: np.ndarray, k: int = 10) -> float:
    """Bandwidth: the largest squared distance of a point to its k-th nearest neighbour, so that every point has
    k neighbours within the kernel's reach (a median leaves sparsely sampled stretches disconnected)."""
    n = len(d2)
    k = min(max(1, k), n - 1)
    kth = np.partition(d2 + np.diag(np.full(n, np.inf)), k - 1, axis=1)[:, k - 1]
    eps = float(np.max(kth))
    return eps if eps > 0 else float(np.mean(d2[d2 > 0])) if np.any(d2 > 0) else 1.0


def diffusion_map(d2: np.ndarray, n_coords: int = 2, alpha: float = 1.0, epsilon: float | None = None,
                  k_neighbours: int = 10) -> DiffusionMap:
    """Diffusion coordinates of points given their squared distances ``d2`` (n, n), symmetric.

    ``epsilon``: kernel bandwidth (default :func:`default_epsilon` with ``k_neighbours``); ``alpha``: density
    normalisation (1: density-free coordinates; 0: the classical graph Laplacian).
    """
    d2 = np.asarray(d2, dtype=np.float64)
    n = len(d2)
    if d2.shape != (n, n):
        raise ValueError(f"expected a square distance matrix, got shape {d2.shape}")
    if n < n_coords + 2:
        raise ValueError(f"{n} points: too few for {n_coords} diffusion coordinates")
    d2 = 0.5 * (d2 + d2.T)
    np.fill_diagonal(d2, 0.0)
    eps = float(epsilon) if epsilon else default_epsilon(d2, k_neighbours)
    K = np.exp(-d2 / eps)
    q = K.sum(1)
    K = K / np.outer(q, q) ** alpha
    d = K.sum(1)
    A = K / np.sqrt(np.outer(d, d))
    vals, vecs = eigh(A, subset_by_index=[n - n_coords - 1, n - 1])
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    psi = vecs / np.sqrt(d)[:, None]
    psi = psi / psi[:, :1]  # ψ_0 is constant; dividing by it removes any sign and scale it carries
    psi = psi[:, 1:]
    psi = psi / np.sqrt((psi ** 2).mean(0)).clip(1e-300)
    return DiffusionMap(vals[1:], psi, eps)


def nystrom(d2_new: np.ndarray, dm: DiffusionMap, d2_train: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """Diffusion coordinates (m, k) of new points from their squared distances (m, n) to the embedded ones."""
    Kt = np.exp(-np.clip(d2_train, 0, None) / dm.epsilon)
    np.fill_diagonal(Kt, 1.0)
    q = Kt.sum(1)
    Kn = np.exp(-np.clip(d2_new, 0, None) / dm.epsilon)
    qn = Kn.sum(1)
    Kn = Kn / np.outer(qn, q) ** alpha
    P = Kn / Kn.sum(1, keepdims=True).clip(1e-300)
    return (P @ dm.coords) / dm.eigenvalues[None, :]


def arc_length(psi: np.ndarray, trim: float = 0.01) -> np.ndarray:
    """Position s/L in [0, 1] along a one-dimensional manifold from its first diffusion coordinate ψ ∝ −cos(π s/L).

    The amplitude is taken robustly from the ``trim`` and 1 − ``trim`` quantiles; s increases with ψ.
    """
    lo, hi = np.quantile(psi, [trim, 1 - trim])
    u = np.clip(2 * (psi - lo) / max(hi - lo, 1e-300) - 1, -1, 1)
    return np.arccos(-u) / np.pi


def synchronise_signs(W: np.ndarray, max_sweeps: int = 100) -> tuple[np.ndarray, float]:
    """Signs (n,) ±1 that maximise Σ W_ab σ_a σ_b for a symmetric W (its diagonal ignored), and the fraction of the
    measured agreement Σ |W_ab| that they satisfy.

    The leading eigenvector of W normalised by each node's total |W| (Singer's spectral relaxation) starts it; then
    each sign is set to agree with the weighted vote of its neighbours until none changes (a local maximum)."""
    W = 0.5 * (np.asarray(W, dtype=np.float64) + np.asarray(W, dtype=np.float64).T)
    np.fill_diagonal(W, 0.0)
    if len(W) == 1:
        return np.ones(1), 1.0
    deg = np.abs(W).sum(1)
    scale = 1 / np.sqrt(np.where(deg > 0, deg, 1.0))
    _, vec = eigh(W * np.outer(scale, scale), subset_by_index=[len(W) - 1, len(W) - 1])
    signs = np.where(vec[:, 0] * scale >= 0, 1.0, -1.0)
    for _ in range(max_sweeps):
        changed = False
        for a in range(len(W)):
            vote = W[a] @ signs
            if vote * signs[a] < 0:
                signs[a] = -signs[a]
                changed = True
        if not changed:
            break
    if signs[0] < 0:
        signs = -signs
    total = np.abs(W).sum()
    agree = float((W * np.outer(signs, signs)).sum() / total) if total > 0 else 1.0
    return signs, agree
