"""Scores for heterogeneity results: volume FSC against a reference, and latent-versus-truth agreement.

Volume metrics take maps ``(box, box, box)`` in the same orientation and pixel size. Latent metrics take
per-particle arrays in the same particle order; every one of them is invariant to the sign, scale and
rotation of the latent space (the labels of a latent space are arbitrary), and each has a known value
for a perfect answer (1) and for a random one (about 0, or the stated chance level).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.model_selection import KFold
from sklearn.neighbors import KNeighborsRegressor, NearestNeighbors

from cryohet.geometry.fourier import fourier_crop_3d
from cryohet.reconstruct.fsc import fsc, fsc_auc, resolution_at

# ---------------------------------------------------------------------------------------------------
# Volumes


def volume_fsc(v: np.ndarray, ref: np.ndarray, apix: float, mask: np.ndarray | None = None) -> dict:
    """FSC of a map against a reference (same box, Å/pixel ``apix``): the curve over shells 0..box/2
    (shell i is i/(box·apix) 1/Å), its normalised area (1 = perfect at every frequency) and the
    resolutions in Å where it falls below 0.5 and 0.143 (2·apix when it never does).

    ``mask`` (box³, values in [0, 1]) multiplies both maps first.
    """
    v = np.asarray(v, dtype=np.float32)
    ref = np.asarray(ref, dtype=np.float32)
    if mask is not None:
        v, ref = v * mask, ref * mask
    curve = fsc(v, ref)
    box = v.shape[-1]
    return {"curve": curve, "auc": fsc_auc(curve), "res_0.5_A": resolution_at(curve, box, apix, 0.5),
            "res_0.143_A": resolution_at(curve, box, apix, 0.143)}


def match_box(vol: np.ndarray, box: int) -> np.ndarray:
    """Fourier-crop a cubic map to a smaller ``box`` (same physical extent; pixel size scales by
    old_box/box); returns it unchanged when already that size."""
    vol = np.asarray(vol, dtype=np.float32)
    if vol.shape[-1] == box:
        return vol
    return fourier_crop_3d(torch.as_tensor(vol), box).numpy().astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Latents


def _as2d(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"{name} must be (N,) or (N, d), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} holds NaN or infinite values")
    return x


def first_pc(x: np.ndarray) -> np.ndarray:
    """Coordinates of the points on their first principal component (N,)."""
    x = _as2d(x, "latents")
    xc = x - x.mean(axis=0)
    if x.shape[1] == 1:
        return xc[:, 0]
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    return xc @ vt[0]


def abs_spearman(a: np.ndarray, b: np.ndarray) -> float:
    """|Spearman rank correlation| of two (N,) arrays (0 when either is constant)."""
    a, b = np.ravel(a), np.ravel(b)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    rho = spearmanr(a, b).correlation
    return float(abs(rho)) if np.isfinite(rho) else 0.0


def spearman_pc1(latents: np.ndarray, tau: np.ndarray) -> float:
    """|Spearman| between the first principal component of the latents and a 1-D truth τ."""
    return abs_spearman(first_pc(latents), first_pc(tau))


def best_axis_spearman(latents: np.ndarray, tau: np.ndarray) -> list[float]:
    """For each true coordinate τ_j, the largest |Spearman| with any latent coordinate or principal
    component (a rotated latent space is not penalised)."""
    z = _as2d(latents, "latents")
    t = _as2d(tau, "tau")
    zc = z - z.mean(axis=0)
    _, _, vt = np.linalg.svd(zc, full_matrices=False)
    cands = np.concatenate([z, zc @ vt.T], axis=1)
    return [max(abs_spearman(c, t[:, j]) for c in cands.T) for j in range(t.shape[1])]


def knn_overlap(latents: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Neighbourhood preservation: mean fraction of each point's k nearest latent neighbours that are
    among its k nearest true neighbours.

    Ties in the truth (particles of one state share τ) count as neighbours: a latent neighbour j of i is
    a true neighbour when |τ_j − τ_i| ≤ the distance from τ_i to its k-th nearest other point. A perfect
    answer scores 1; a random one scores about the mean size of those true neighbourhoods over N−1.
    """
    z = _as2d(latents, "latents")
    t = _as2d(truth, "truth")
    n = len(z)
    if len(t) != n:
        raise ValueError(f"latents ({n}) and truth ({len(t)}) differ in length")
    k = int(min(k, n - 1))
    if k < 1:
        raise ValueError("k-NN overlap needs at least two points")
    # k-th nearest other point in the truth (column 0 is the point itself or a tie at distance 0)
    dt, _ = NearestNeighbors(n_neighbors=k + 1).fit(t).kneighbors(t)
    radius = dt[:, k]
    # k nearest latent neighbours, excluding the point itself
    _, iz = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z)
    nb = np.empty((n, k), dtype=np.int64)
    for i in range(n):
        row = iz[i][iz[i] != i][:k]
        nb[i] = row
    d = np.linalg.norm(t[nb] - t[:, None, :], axis=2)
    tol = 1e-9 * (1.0 + np.abs(t).max())
    return float(np.mean(d <= radius[:, None] + tol))


def kmeans_ari(latents: np.ndarray, labels: np.ndarray, n_clusters: int | None = None, seed: int = 0) -> float:
    """Adjusted Rand index between k-means clusters of the latents (k = number of true states) and the
    true states: 1 perfect, about 0 at chance."""
    z = _as2d(latents, "latents")
    labels = np.asarray(labels)
    k = int(n_clusters or len(np.unique(labels)))
    if k < 2:
        raise ValueError("the adjusted Rand index needs at least two true states")
    pred = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(z)
    return float(adjusted_rand_score(labels, pred))


def knn_regression_r2(latents: np.ndarray, tau: np.ndarray, k: int = 10, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated R² of predicting τ from the latents with k-nearest-neighbour regression, averaged
    over τ's coordinates: how much of the truth the latent space determines, however it is curved
    (1 perfect, ≤ 0 at chance)."""
    z = _as2d(latents, "latents")
    t = _as2d(tau, "tau")
    n = len(z)
    folds = int(min(folds, n))
    pred = np.empty_like(t)
    for train, test in KFold(folds, shuffle=True, random_state=seed).split(z):
        reg = KNeighborsRegressor(n_neighbors=int(min(k, len(train)))).fit(z[train], t[train])
        pred[test] = reg.predict(z[test])
    ss_res = ((t - pred) ** 2).sum(axis=0)
    ss_tot = ((t - t.mean(axis=0)) ** 2).sum(axis=0)
    ok = ss_tot > 0
    if not ok.any():
        return 0.0
    return float(np.mean(1.0 - ss_res[ok] / ss_tot[ok]))


def _whitener(x: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    mu = x.mean(axis=0)
    xc = x - mu
    cov = xc.T @ xc / max(len(x) - 1, 1)
    cov += ridge * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0]) + 1e-12 * np.eye(cov.shape[0])
    w, v = np.linalg.eigh(cov)
    return mu, v @ np.diag(1.0 / np.sqrt(np.maximum(w, 1e-12))) @ v.T


def cca_fit(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Canonical correlation analysis -> (mean_x, A, mean_y, B): columns of (x − mean_x) A and
    (y − mean_y) B are the paired canonical variates, strongest first."""
    x = _as2d(x, "x")
    y = _as2d(y, "y")
    mx, wx = _whitener(x, ridge)
    my, wy = _whitener(y, ridge)
    c = (wx @ ((x - mx).T @ (y - my)) @ wy) / max(len(x) - 1, 1)
    u, _, vt = np.linalg.svd(c, full_matrices=False)
    return mx, wx @ u, my, wy @ vt.T


def cca_correlations(x: np.ndarray, y: np.ndarray, max_components: int = 3, cross_validate: bool = True,
                     seed: int = 0) -> np.ndarray:
    """Canonical correlations between two latent spaces of the same particles.

    With ``cross_validate`` the directions are fitted on one half of the particles and the correlations
    measured on the other (both ways, averaged), so unrelated latent spaces score about 0 rather than the
    positive bias of in-sample CCA. Returns at most ``max_components`` values, strongest first.
    """
    x = _as2d(x, "x")
    y = _as2d(y, "y")
    if len(x) != len(y):
        raise ValueError(f"CCA needs the same particles: {len(x)} != {len(y)} rows")
    m = int(min(max_components, x.shape[1], y.shape[1]))

    def corr_on(fit_idx: np.ndarray, eval_idx: np.ndarray) -> np.ndarray:
        mx, a, my, b = cca_fit(x[fit_idx], y[fit_idx])
        u = (x[eval_idx] - mx) @ a[:, :m]
        v = (y[eval_idx] - my) @ b[:, :m]
        out = np.zeros(m)
        for j in range(m):
            su, sv = u[:, j].std(), v[:, j].std()
            out[j] = 0.0 if su == 0 or sv == 0 else np.corrcoef(u[:, j], v[:, j])[0, 1]
        return out

    n = len(x)
    if not cross_validate or n < 8:
        return np.abs(corr_on(np.arange(n), np.arange(n)))
    perm = np.random.default_rng(seed).permutation(n)
    h1, h2 = perm[: n // 2], perm[n // 2:]
    return np.clip((corr_on(h1, h2) + corr_on(h2, h1)) / 2, 0.0, 1.0)


def subsample(n: int, max_points: int, seed: int = 0) -> np.ndarray:
    """Indices of at most ``max_points`` of ``n`` points (all, in order, when n ≤ max_points)."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))


# ---------------------------------------------------------------------------------------------------
# CryoBench's metrics (Jeon et al. 2024: ml-struct-bio/CryoBench metrics/)


def cryobench_fsc(v: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """FSC as CryoBench computes it (box D): value 1 at shell 0, then shell i = 1 … D/2−1 holds the Fourier
    voxels at distance r from the centre with i−1 ≤ r < i; ``mask`` multiplies both maps first. (D/2,)."""
    a = torch.as_tensor(np.asarray(v, dtype=np.float64))
    b = torch.as_tensor(np.asarray(ref, dtype=np.float64))
    if mask is not None:
        m = torch.as_tensor(np.asarray(mask, dtype=np.float64))
        a, b = a * m, b * m
    box = a.shape[-1]
    fa, fb = torch.fft.fftn(a), torch.fft.fftn(b)
    f = torch.fft.fftfreq(box, d=1.0 / box, dtype=torch.float64)
    r = torch.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + f[None, None, :] ** 2)
    shell = torch.floor(r).long() + 1                       # r in [i-1, i) -> shell i
    keep = shell < box // 2
    idx = shell[keep]
    n = box // 2
    num = torch.zeros(n, dtype=torch.float64).index_add_(0, idx, (fa[keep] * fb[keep].conj()).real)
    pa = torch.zeros(n, dtype=torch.float64).index_add_(0, idx, fa[keep].abs() ** 2)
    pb = torch.zeros(n, dtype=torch.float64).index_add_(0, idx, fb[keep].abs() ** 2)
    den = torch.sqrt(pa * pb)
    curve = torch.where(den > 0, num / den.clamp_min(1e-300), torch.ones_like(num)).numpy()
    curve[0] = 1.0
    return curve


def cryobench_auc(curve: np.ndarray) -> float:
    """CryoBench's FSC AUC: area under |FSC| against frequency k/D, k = 0 … D/2−1 (trapezoids; at most
    (D/2−1)/D: 0.492 at D = 128, 0.484 at D = 64)."""
    curve = np.abs(np.asarray(curve, dtype=np.float64))
    box = 2 * len(curve)
    return float(np.sum((curve[1:] + curve[:-1]) / 2) / box)


def _neighbour_table(x: np.ndarray, k: int, chunk: int = 512) -> np.ndarray:
    """(N, k) indices of each point's k nearest other points, nearest first (Euclidean; ties in index order)."""
    n = len(x)
    out = np.empty((n, k), dtype=np.int64)
    sq = (x * x).sum(axis=1)
    for s in range(0, n, chunk):
        d = sq[s:s + chunk, None] + sq[None, :] - 2.0 * x[s:s + chunk] @ x.T
        d[np.arange(len(d)), np.arange(s, s + len(d))] = np.inf     # not its own neighbour
        out[s:s + chunk] = np.argsort(d, axis=1, kind="stable")[:, :k]
    return out


def _shared_counts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row, how many indices the rows of (N, k) ``a`` and ``b`` share (each row's indices distinct)."""
    both = np.sort(np.concatenate([a, b], axis=1), axis=1)
    return (both[:, 1:] == both[:, :-1]).sum(axis=1)


def neighbourhood_similarity(truth: np.ndarray, latents: np.ndarray, ks: np.ndarray | list[int]) -> np.ndarray:
    """CryoBench's neighbourhood similarity at each k of ``ks``: the mean fraction of each point's k nearest
    true neighbours that are also among its k nearest latent neighbours (self excluded; 1 perfect, k/(N−1) at
    chance). Invariant to rotations, translations and uniform scaling of the latent space (not to curving it:
    a non-linear monotone map of a 1-D latent changes which side the nearest neighbours lie on)."""
    t, z = _as2d(truth, "truth"), _as2d(latents, "latents")
    if len(t) != len(z):
        raise ValueError(f"latents ({len(z)}) and truth ({len(t)}) differ in length")
    ks = np.asarray(ks, dtype=np.int64)
    if len(t) < 3 or ks.min() < 1 or ks.max() > len(t) - 1:
        raise ValueError(f"k must be within 1 … N−1 = {len(t) - 1}, got {ks.tolist()}")
    kmax = int(ks.max())
    nt, nz = _neighbour_table(t, kmax), _neighbour_table(z, kmax)
    return np.array([_shared_counts(nt[:, :k], nz[:, :k]).mean() / k for k in ks])


def information_imbalance(a: np.ndarray, b: np.ndarray, k: int = 1) -> float:
    """Information imbalance Δ(A → B) (Glielmo et al. 2022, dadapy's definition, as CryoBench uses it):
    2/N × the mean rank in B of each point's k nearest neighbours in A (ranks from 1, self excluded). About 0
    when A's neighbours are B's (A predicts B), about 1 when A says nothing about B."""
    x, y = _as2d(a, "A"), _as2d(b, "B")
    n = len(x)
    if len(y) != n:
        raise ValueError(f"A ({n}) and B ({len(y)}) differ in length")
    if not 1 <= k < n - 1:
        raise ValueError(f"k must be within 1 … N−2 = {n - 2}, got {k}")
    nb = _neighbour_table(x, k)
    sq = (y * y).sum(axis=1)
    ranks = np.empty((n, k))
    for s in range(0, n, 512):
        d = sq[s:s + 512, None] + sq[None, :] - 2.0 * y[s:s + 512] @ y.T
        rows = np.arange(len(d))
        d[rows, np.arange(s, s + len(d))] = -np.inf                   # self first: rank 0
        target = np.take_along_axis(d, nb[s:s + 512], axis=1)
        ranks[s:s + 512] = (d[:, :, None] < target[:, None, :]).sum(axis=1)  # points strictly closer (self too)
    return float(2.0 * ranks.mean() / n)
