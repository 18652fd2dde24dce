"""Analysis of per-particle latent coordinates: PCA, UMAP, k-means with on-data centres, paths.

Latents are arrays ``(N, d)`` in particles-STAR row order (as the training methods write them).
Every function takes plain arrays, so it works for the latents of any method (linear, VAE, ...).
The conventions follow cryoDRGN's ``analyze``: k-means centres are snapped to the nearest actual
particle latent ("on-data"), PC traversals run from the 5th to the 95th percentile of a PC coordinate.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

#: UMAP is fitted on at most this many particles by default; the rest are placed with ``transform``.
UMAP_MAX_POINTS = 50_000


def check_latents(z: np.ndarray, name: str = "latents") -> np.ndarray:
    """Return ``z`` as float64 ``(N, d)``; raise ValueError (naming ``name``) for bad shapes or values."""
    z = np.asarray(z)
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2 or z.shape[0] == 0 or z.shape[1] == 0:
        raise ValueError(f"{name}: expected an array (N, d) with N, d >= 1, got shape {z.shape}")
    if not np.issubdtype(z.dtype, np.number):
        raise ValueError(f"{name}: expected numbers, got dtype {z.dtype}")
    z = z.astype(np.float64)
    if not np.all(np.isfinite(z)):
        bad = int(np.flatnonzero(~np.all(np.isfinite(z), axis=1))[0])
        raise ValueError(f"{name}: non-finite value in row {bad}")
    return z


# ---------------------------------------------------------------------------------------------------
# PCA


@dataclass(frozen=True)
class PCAResult:
    """Principal axes of a latent cloud.

    ``components`` (k, d) are unit rows sorted by decreasing variance; each is signed so that its
    largest-magnitude entry is positive (deterministic). ``explained_variance`` (k,) in latent units²,
    ``explained_variance_ratio`` (k,) sums to 1 over all d axes.
    """

    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray

    @property
    def n_components(self) -> int:
        return int(self.components.shape[0])

    def transform(self, z: np.ndarray) -> np.ndarray:
        """PC coordinates (N, k) of latents ``z`` (N, d)."""
        return (np.asarray(z, dtype=np.float64) - self.mean) @ self.components.T

    def inverse_transform(self, coords: np.ndarray) -> np.ndarray:
        """Latents (N, d) at PC coordinates ``coords`` (N, k') with k' <= k (missing PCs are 0)."""
        coords = np.atleast_2d(np.asarray(coords, dtype=np.float64))
        k = coords.shape[1]
        return self.mean + coords @ self.components[:k]


def pca(z: np.ndarray, n_components: int | None = None) -> PCAResult:
    """PCA of latents ``z`` (N, d) through the eigen-decomposition of their d×d covariance."""
    z = check_latents(z)
    n, d = z.shape
    k = d if n_components is None else int(n_components)
    if not 1 <= k <= d:
        raise ValueError(f"n_components must be in 1..{d}, got {k}")
    mean = z.mean(axis=0)
    centred = z - mean
    cov = centred.T @ centred / max(n - 1, 1)
    evals, evecs = np.linalg.eigh(cov)
    order = np.argsort(evals)[::-1]
    evals = np.clip(evals[order], 0.0, None)
    evecs = evecs[:, order].T  # (d, d): rows are components
    signs = np.sign(evecs[np.arange(d), np.argmax(np.abs(evecs), axis=1)])
    evecs = evecs * np.where(signs == 0, 1.0, signs)[:, None]
    total = evals.sum()
    ratio = evals / total if total > 0 else np.zeros_like(evals)
    return PCAResult(mean, evecs[:k], evals[:k], ratio[:k])


def pc_traversal(z: np.ndarray, pcs: PCAResult, pc: int, n_frames: int = 10,
                 percentiles: tuple[float, float] = (5.0, 95.0)) -> tuple[np.ndarray, np.ndarray]:
    """Latent points along principal axis ``pc`` (0-based) through the mean of ``z``.

    The PC coordinate runs linearly from the ``percentiles[0]``-th to the ``percentiles[1]``-th
    percentile of the particles' PC coordinates; the other PC coordinates are 0.
    Returns ``(points (n_frames, d), pc_values (n_frames,))``.
    """
    if not 0 <= pc < pcs.n_components:
        raise ValueError(f"PC {pc + 1} does not exist: the PCA has {pcs.n_components} component(s)")
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    lo_pct, hi_pct = percentiles
    if not 0.0 <= lo_pct <= hi_pct <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low <= high <= 100, got {percentiles}")
    coords = pcs.transform(check_latents(z))[:, pc]
    lo, hi = np.percentile(coords, [lo_pct, hi_pct])
    values = np.linspace(lo, hi, n_frames) if n_frames > 1 else np.array([(lo + hi) / 2.0])
    points = pcs.mean + values[:, None] * pcs.components[pc]
    return points, values


# ---------------------------------------------------------------------------------------------------
# Nearest particles, k-means


def nearest_rows(z: np.ndarray, points: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Index (M,) of the latent row of ``z`` (N, d) nearest (Euclidean) to each of ``points`` (M, d)."""
    z = check_latents(z)
    points = check_latents(np.atleast_2d(points), "points")
    if points.shape[1] != z.shape[1]:
        raise ValueError(f"points have dimension {points.shape[1]}, latents {z.shape[1]}")
    best = np.full(points.shape[0], np.inf)
    index = np.zeros(points.shape[0], dtype=np.int64)
    p2 = (points ** 2).sum(axis=1)
    for start in range(0, z.shape[0], chunk):
        block = z[start:start + chunk]
        d2 = (block ** 2).sum(axis=1)[:, None] - 2.0 * block @ points.T + p2[None, :]
        arg = np.argmin(d2, axis=0)
        val = d2[arg, np.arange(points.shape[0])]
        better = val < best
        best[better] = val[better]
        index[better] = arg[better] + start
    return index


@dataclass(frozen=True)
class KMeansResult:
    """k-means of latents: ``labels`` (N,) in 0..k-1, ``centers`` (k, d) the snapped ("on-data")
    centres, equal to ``z[center_indices]``, and ``raw_centers`` (k, d) the k-means means."""

    labels: np.ndarray
    centers: np.ndarray
    center_indices: np.ndarray
    raw_centers: np.ndarray

    @property
    def k(self) -> int:
        return int(self.centers.shape[0])


def kmeans(z: np.ndarray, k: int, seed: int = 0, n_init: int = 10, on_data: bool = True) -> KMeansResult:
    """k-means clustering of latents ``z`` (N, d) into ``k`` clusters (scikit-learn, ``n_init`` starts).

    With ``on_data`` each centre is replaced by the nearest particle latent (cryoDRGN's convention),
    so the volumes generated at the centres are volumes of real particles.
    """
    from sklearn.cluster import KMeans

    z = check_latents(z)
    if not 1 <= k <= z.shape[0]:
        raise ValueError(f"k-means: number of clusters must be in 1..{z.shape[0]} (the number of particles), "
                         f"got {k}")
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(z)
    raw = km.cluster_centers_.astype(np.float64)
    if on_data:
        idx = nearest_rows(z, raw)
        centers = z[idx]
    else:
        idx = np.full(k, -1, dtype=np.int64)
        centers = raw
    return KMeansResult(km.labels_.astype(np.int64), centers, idx, raw)


# ---------------------------------------------------------------------------------------------------
# UMAP


def umap_embedding(z: np.ndarray, n_neighbors: int = 15, min_dist: float = 0.1,
                   max_points: int = UMAP_MAX_POINTS, seed: int = 0,
                   log: Callable[[str], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """2-D UMAP embedding (N, 2) float32 of latents ``z`` (N, d) (umap-learn).

    When N > ``max_points`` UMAP is fitted on a random subset of ``max_points`` particles and the
    others are placed with ``transform``. Returns ``(embedding, fitted_rows)``, ``fitted_rows`` the
    sorted indices of the particles used for the fit.
    """
    import warnings

    import umap

    z = check_latents(z)
    n = z.shape[0]
    if n < 4:
        raise ValueError(f"UMAP needs at least 4 particles, got {n}")
    if max_points < 4:
        raise ValueError(f"UMAP max_points must be >= 4, got {max_points}")
    rng = np.random.default_rng(seed)
    fit_rows = np.sort(rng.choice(n, max_points, replace=False)) if n > max_points else np.arange(n)
    reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, len(fit_rows) - 1),
                        min_dist=min_dist, random_state=seed)
    out = np.empty((n, 2), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*n_jobs value.*")
        if log:
            log(f"UMAP: fitting on {len(fit_rows)} of {n} particles")
        out[fit_rows] = reducer.fit_transform(z[fit_rows])
        if len(fit_rows) < n:
            rest = np.setdiff1d(np.arange(n), fit_rows)
            if log:
                log(f"UMAP: placing the other {len(rest)} particles with transform")
            out[rest] = reducer.transform(z[rest])
    return out, fit_rows


# ---------------------------------------------------------------------------------------------------
# Paths


def linear_path(anchors: np.ndarray, n_per_segment: int = 10) -> np.ndarray:
    """Points (M, d) on straight segments through ``anchors`` (A, d), A >= 2, ``n_per_segment``
    points per segment, each anchor included once: M = (A - 1)·(n_per_segment - 1) + 1."""
    anchors = check_latents(np.atleast_2d(anchors), "anchors")
    if anchors.shape[0] < 2:
        raise ValueError("a path needs at least 2 anchor points")
    if n_per_segment < 2:
        raise ValueError(f"n_per_segment must be >= 2, got {n_per_segment}")
    t = np.linspace(0.0, 1.0, n_per_segment)[:, None]
    parts = [anchors[i] + t * (anchors[i + 1] - anchors[i]) for i in range(anchors.shape[0] - 1)]
    return np.concatenate([parts[0]] + [p[1:] for p in parts[1:]], axis=0)


def snap_to_data(z: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Replace each of ``points`` (M, d) by the nearest particle latent: ``(z[idx], idx)``."""
    z = check_latents(z)
    idx = nearest_rows(z, points)
    return z[idx], idx
